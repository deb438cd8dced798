//! The verbs side: device and GID selection, registered pools, one RC queue pair, and a driver
//! task that turns completion-channel events (in tokio's `AsyncFd`) into batch polls of the
//! CQ, and the sans-IO [`Conn`]'s decisions into posted work requests.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use amst_core::codec::{Close, CloseCode};
use amst_core::session::{Event, Fatal};
use amst_core::{
    AckCounter, AckWatch, Error, ProtocolError, Result, TransportKind, TransportMetrics,
};
use bytes::Bytes;
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, GenericCompletionQueue,
    WorkCompletionOperationType, WorkCompletionStatus,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry, WorkRequestFlags,
};
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::bootstrap::{self, Endpoint};
use crate::config::RdmaConfig;
use crate::conn::{Conn, Post};
use crate::credit::Op;

/// Longest wait, after this side failed the session, for the peer to take our Close.
const FAIL_LINGER: Duration = Duration::from_secs(2);
/// Completions taken per poll.
const POLL_BATCH: u32 = 64;
/// Staging buffers for outgoing segments (each `slot_size` bytes, registered once).
const SEND_SLOTS: u32 = 32;

const WR_RECV: u64 = 1 << 62;
const WR_SEND: u64 = 2 << 62;
const WR_INDEX: u64 = (1 << 32) - 1;

/// Names of the devices, or why there are none.
pub(crate) fn device_names() -> std::result::Result<Vec<String>, String> {
    let list = DeviceList::new().map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|c| c.to_string())
            .unwrap_or_else(|| e.to_string());
        format!(
            "no RDMA device: libibverbs could not list devices ({cause}); \
             is rdma-core (libibverbs1) installed and an RDMA or rxe device configured?"
        )
    })?;
    let names: Vec<String> = list.iter().map(|d| d.name()).collect();
    if names.is_empty() {
        return Err(
            "no RDMA device: libibverbs found none (no NIC, and no rxe/siw soft device configured)"
                .into(),
        );
    }
    Ok(names)
}

fn rdma_err(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::io(what, io::Error::other(e.to_string()))
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        transport: TransportKind::Rdma,
        reason,
    }
}

/// Opens the named device, or the first one with an active port.
fn open_device(config: &RdmaConfig) -> Result<Arc<DeviceContext>> {
    let list = DeviceList::new().map_err(|e| unavailable(format!("no RDMA device: {e}")))?;
    let mut tried = Vec::new();
    for dev in list.iter() {
        let name = dev.name();
        if config.device.as_ref().is_some_and(|want| *want != name) {
            continue;
        }
        let ctx = match dev.open() {
            Ok(c) => c,
            Err(e) => {
                tried.push(format!("{name}: open failed ({e})"));
                continue;
            }
        };
        match ctx.query_port(config.port) {
            Ok(p) if p.port_state() == PortState::Active => return Ok(ctx),
            Ok(p) => tried.push(format!(
                "{name}: port {} is {:?}",
                config.port,
                p.port_state()
            )),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(unavailable(match &config.device {
        Some(want) if tried.is_empty() => format!("no RDMA device named {want}"),
        _ => format!("no RDMA device with an active port: {}", tried.join("; ")),
    }))
}

/// The configured GID index, else a RoCE v2 GID holding an IPv4-mapped address, else any
/// RoCE v2 GID, else index 0 (InfiniBand, where GIDs are not addresses).
fn choose_gid(ctx: &DeviceContext, config: &RdmaConfig) -> Result<(u32, Gid)> {
    if let Some(i) = config.gid_index {
        let gid = ctx
            .query_gid(config.port, i)
            .map_err(|e| rdma_err(format!("querying GID index {i}"), e))?;
        return Ok((i, gid));
    }
    let table = ctx.query_gid_table().unwrap_or_default();
    let port_entries = || {
        table
            .iter()
            .filter(|e| e.port_num() == config.port as u32 && !e.gid().is_zero())
    };
    let v4_mapped = |g: &Gid| g.raw[..10].iter().all(|b| *b == 0) && g.raw[10..12] == [0xff, 0xff];
    let pick = port_entries()
        .find(|e| e.gid_type() == GidType::RoceV2 && v4_mapped(&e.gid()))
        .or_else(|| port_entries().find(|e| e.gid_type() == GidType::RoceV2))
        .map(|e| (e.gid_index(), e.gid()));
    match pick {
        Some(p) => Ok(p),
        None => {
            let gid = ctx
                .query_gid(config.port, 0)
                .map_err(|e| rdma_err("querying GID index 0", e))?;
            Ok((0, gid))
        }
    }
}

/// Page-aligned memory registered once for the session's life.
struct Pool {
    mem: Vec<u8>,
    offset: usize,
    len: usize,
    mr: Arc<MemoryRegion>,
}

impl Pool {
    fn new(
        pd: &Arc<ProtectionDomain>,
        len: usize,
        access: AccessFlags,
        what: &str,
    ) -> Result<Self> {
        let mut mem = vec![0u8; len + 4096];
        let offset = mem.as_ptr().align_offset(4096);
        // SAFETY: the range lies inside `mem`, which lives (unmoved: a Vec's heap buffer does
        // not move while it is not resized) as long as the MR, both being fields of this Pool.
        let mr = unsafe { pd.reg_mr(mem.as_mut_ptr().add(offset) as usize, len, access) }
            .map_err(|e| rdma_err(format!("registering the {what} ({len} bytes)"), e))?;
        Ok(Pool {
            mem,
            offset,
            len,
            mr,
        })
    }

    fn addr(&self, at: usize) -> u64 {
        (self.mem.as_ptr() as usize + self.offset + at) as u64
    }

    fn slice(&self, at: usize, n: usize) -> &[u8] {
        assert!(at + n <= self.len);
        &self.mem[self.offset + at..self.offset + at + n]
    }

    fn slice_mut(&mut self, at: usize, n: usize) -> &mut [u8] {
        assert!(at + n <= self.len);
        &mut self.mem[self.offset + at..self.offset + at + n]
    }
}

/// The completion channel's fd, for `AsyncFd`.
struct ChannelFd(Arc<CompletionChannel>);

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The verbs objects. Field order is drop order: the QP before its CQ, MRs before the PD.
struct Verbs {
    qp: BasicQueuePair,
    cq: Arc<BasicCompletionQueue>,
    channel: AsyncFd<ChannelFd>,
    send_pool: Pool,
    recv_pool: Pool,
    ring: Pool,
    _pd: Arc<ProtectionDomain>,
    _ctx: Arc<DeviceContext>,
    peer: Endpoint,
}

/// State shared between the application's calls and the driver task: the session protocol
/// and what only the verbs side knows.
struct State {
    conn: Conn,
    /// The queue pair or the driver failed (a work completion, a post): not a protocol
    /// matter, so it is not in the session's latch, but every later call reports it too.
    link_error: Option<String>,
    /// The driver task ended.
    closed: bool,
    /// The segment ending our parting Close completed: the peer's queue pair acknowledged it
    /// (RC), so tearing ours down can no longer lose it.
    close_delivered: bool,
}

impl State {
    /// The error every call reports once the session failed: the protocol's latch first (it
    /// came first: a queue pair torn down after a Close fails the peer's next post), else the
    /// queue pair's.
    fn failure(&self) -> Option<Error> {
        if let Some(f) = self.conn.session().fatal() {
            return Some(f.to_error());
        }
        self.link_error.as_ref().map(|s| {
            Error::io(
                "RDMA transport",
                io::Error::new(io::ErrorKind::ConnectionAborted, s.clone()),
            )
        })
    }
}

/// One RDMA session: shared state plus the verbs objects, which the driver task owns once it
/// starts.
pub(crate) struct Session {
    config: RdmaConfig,
    state: Mutex<State>,
    verbs: Mutex<Option<Verbs>>,
    wake_driver: Notify,
    changed: Notify,
    aborted: AtomicBool,
    keep_bootstrap: AtomicBool,
    parked: Mutex<Option<TcpStream>>,
    /// Messages the peer acknowledged, for `Transport::acked` subscribers.
    acked_messages: AckCounter,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaSession").finish_non_exhaustive()
    }
}

fn mtu_from(v: u8) -> Mtu {
    Mtu::from(v as u32)
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, State> {
        amst_core::util::lock(&self.state)
    }

    /// Opens the device, builds the QP and pools, exchanges endpoints over the authenticated
    /// bootstrap stream, and brings the QP to RTS.
    pub(crate) async fn establish(
        stream: &mut TcpStream,
        leftover: &mut bytes::BytesMut,
        config: RdmaConfig,
    ) -> Result<Arc<Self>> {
        let ctx = open_device(&config)?;
        let (gid_index, gid) = choose_gid(&ctx, &config)?;
        let port = ctx
            .query_port(config.port)
            .map_err(|e| rdma_err("querying the port", e))?;
        let pd = ctx
            .alloc_pd()
            .map_err(|e| rdma_err("allocating a protection domain", e))?;
        let channel = ctx
            .create_comp_channel()
            .map_err(|e| rdma_err("creating a completion channel", e))?;
        channel
            .set_nonblocking(true)
            .map_err(|e| Error::io("making the completion channel non-blocking", e))?;
        let cqe = SEND_SLOTS + config.recv_depth + 16;
        let cq = ctx
            .create_cq_builder()
            .setup_cqe(cqe)
            .setup_comp_channel(&channel, 0)
            .build()
            .map_err(|e| rdma_err("creating the completion queue", e))?;
        let mut qp = pd
            .create_qp_builder()
            .setup_max_send_wr(SEND_SLOTS)
            .setup_max_recv_wr(config.recv_depth)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&cq)))
            .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&cq)))
            .build()
            .map_err(|e| rdma_err("creating the RC queue pair", e))?;
        let slot = config.slot_size as usize;
        let send_pool = Pool::new(
            &pd,
            SEND_SLOTS as usize * slot,
            AccessFlags::LocalWrite,
            "send pool",
        )?;
        let recv_pool = Pool::new(
            &pd,
            config.recv_depth as usize * config.recv_buf_size(),
            AccessFlags::LocalWrite,
            "receive pool",
        )?;
        let ring = Pool::new(
            &pd,
            config.ring_slots as usize * slot,
            AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
            "receive ring",
        )?;

        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(config.port)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite);
        qp.modify(&attr)
            .map_err(|e| rdma_err("moving the QP to INIT", e))?;
        // Receives go up before the peer may send: the barrier below orders that.
        for i in 0..config.recv_depth as usize {
            post_recv(&mut qp, &recv_pool, i, config.recv_buf_size())?;
        }

        let psn = u32::from_be_bytes(amst_core::codec::random_bytes::<4>()) & 0x00ff_ffff;
        let ours = Endpoint {
            qpn: qp.qp_number(),
            psn,
            gid: gid.raw,
            lid: port.lid(),
            mtu: port.active_mtu() as u8,
            ring_addr: ring.addr(0),
            ring_rkey: ring.mr.rkey(),
            ring_slots: config.ring_slots,
            slot_size: config.slot_size,
            recv_depth: config.recv_depth,
            recv_buf_size: config.recv_buf_size() as u32,
        };
        let peer = bootstrap::exchange(stream, leftover, &ours, &config).await?;
        debug!(
            local_qpn = ours.qpn,
            peer_qpn = peer.qpn,
            gid_index,
            "RDMA endpoints exchanged"
        );

        let mtu = ours.mtu.min(peer.mtu);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu_from(mtu))
            .setup_dest_qp_num(peer.qpn)
            .setup_rq_psn(peer.psn)
            .setup_max_dest_read_atomic(0)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(peer.lid)
            .setup_port(config.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(gid_index as u8)
            .setup_grh_dest_gid(&Gid { raw: peer.gid })
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        qp.modify(&attr)
            .map_err(|e| rdma_err("moving the QP to RTR", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(psn)
            .setup_timeout(config.ack_timeout)
            .setup_retry_cnt(config.retry_count)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(0);
        qp.modify(&attr)
            .map_err(|e| rdma_err("moving the QP to RTS", e))?;
        bootstrap::barrier(stream, leftover, &config).await?;

        // SAFETY: ChannelFd holds the channel, so its fd stays open and the same for as long
        // as the AsyncFd that owns it.
        let channel = unsafe {
            AsyncFd::register_with_interest(ChannelFd(channel), tokio::io::Interest::READABLE)
        }
        .map_err(|e| rdma_err("registering the completion channel with tokio", e))?;
        let conn = Conn::new(&config, peer.recv_depth, peer.ring_slots, Instant::now());
        let verbs = Verbs {
            qp,
            cq,
            channel,
            send_pool,
            recv_pool,
            ring,
            _pd: pd,
            _ctx: ctx,
            peer,
        };
        Ok(Arc::new(Session {
            config,
            state: Mutex::new(State {
                conn,
                link_error: None,
                closed: false,
                close_delivered: false,
            }),
            verbs: Mutex::new(Some(verbs)),
            wake_driver: Notify::new(),
            changed: Notify::new(),
            aborted: AtomicBool::new(false),
            keep_bootstrap: AtomicBool::new(false),
            parked: Mutex::new(None),
            acked_messages: AckCounter::new(),
        }))
    }

    /// Spawns the driver task; it owns the verbs objects and the bootstrap stream.
    pub(crate) fn start(self: &Arc<Self>, stream: TcpStream) {
        let verbs = amst_core::util::lock(&self.verbs)
            .take()
            .expect("started once");
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let r = match Driver::new(&me.config, verbs).run(&me, stream).await {
                Ok(Some(stream)) => {
                    *amst_core::util::lock(&me.parked) = Some(stream);
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            let mut st = me.lock();
            if let Err(e) = r {
                if st.conn.session().fatal().is_none() {
                    warn!(error = %e, "RDMA session failed");
                }
                st.link_error.get_or_insert(e);
            }
            st.closed = true;
            st.conn.session_mut().set_closed();
            drop(st);
            me.changed.notify_waiters();
        });
    }

    /// Test hook: destroys the QP but keeps the bootstrap connection open, so the peer can
    /// only learn of it from its failing work requests.
    pub(crate) fn destroy_qp_keep_bootstrap(&self) {
        self.keep_bootstrap.store(true, Ordering::SeqCst);
        self.abort();
    }

    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.wake_driver.notify_one();
    }

    /// Runs `f` on the state and wakes the driver when the protocol has something to send
    /// or a new deadline.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (r, wake) = {
            let mut st = self.lock();
            let r = f(&mut st);
            let p = st.conn.session_mut();
            (r, p.wants_transmit() | p.take_timeout_moved())
        };
        if wake {
            self.wake_driver.notify_one();
        }
        r
    }

    /// Waits until `ready` says done (Some), re-checking after every state change.
    async fn wait<T>(&self, mut ready: impl FnMut(&mut State) -> Option<Result<T>>) -> Result<T> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.update(&mut ready) {
                return r;
            }
            notified.await;
        }
    }

    pub(crate) async fn send(&self, message: Bytes) -> Result<()> {
        let len = message.len() as u64;
        if len > self.config.max_message {
            return Err(Error::MessageTooLarge {
                len,
                limit: self.config.max_message,
            });
        }
        let window = self.config.send_window;
        let mut message = Some(message);
        self.wait(|st| {
            if let Some(e) = st.failure() {
                return Some(Err(e));
            }
            if st.closed {
                return Some(Err(Error::Closed));
            }
            if let Err(e) = st.conn.session().check_can_send() {
                return Some(Err(e));
            }
            // One message larger than the window may go alone.
            let held = st.conn.send_held();
            if held > 0 && held + len > window {
                return None;
            }
            let m = message.take().expect("queued once");
            Some(st.conn.session_mut().push(m, Instant::now()).map(|_| ()))
        })
        .await
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        let target = self.lock().conn.session().send_buffer().messages_sent();
        self.wait(|st| flushed(st, target)).await
    }

    pub(crate) async fn recv(&self) -> Result<Option<Bytes>> {
        self.wait(|st| {
            if let Some(m) = st.conn.session_mut().read(Instant::now()) {
                return Some(Ok(Some(m)));
            }
            // A graceful close that arrived wins over a QP error after it (the peer tears its
            // QP down right behind its Close).
            if st.conn.session().is_peer_closed() {
                return Some(Ok(None));
            }
            if let Some(e) = st.failure() {
                return Some(Err(e));
            }
            st.closed.then_some(Err(Error::Closed))
        })
        .await
    }

    pub(crate) fn acked(&self) -> AckWatch {
        self.acked_messages.watch()
    }

    pub(crate) fn metrics(&self) -> TransportMetrics {
        let st = self.lock();
        let mut m = st.conn.metrics();
        m.active_streams = usize::from(!st.closed);
        m
    }

    /// Flushes, then sends the parting Close and waits until the peer's queue pair has it
    /// (or the peer ended the session itself), then tears the queue pair down.
    ///
    /// The Close must be *delivered* (its send completion, the peer's RC acknowledgement), not
    /// just posted: destroying the queue pair with the Close still queued loses it, and the
    /// peer then sees its own in-flight segments fail against our dying queue pair (rxe
    /// answers them with RemoteInvalidRequest) instead of a graceful end.
    pub(crate) async fn close(&self) -> Result<()> {
        let limit = self.config.handshake_timeout.max(Duration::from_secs(30));
        let target = self.update(|st| {
            let p = st.conn.session_mut();
            let target = p.send_buffer().messages_sent();
            // No new sends from here on.
            p.close(None);
            target
        });
        let drained = tokio::time::timeout(limit, async {
            self.wait(|st| flushed(st, target)).await?;
            self.wait(|st| {
                let p = st.conn.session_mut();
                if st.close_delivered || p.is_peer_closed() || st.closed {
                    return Some(Ok(()));
                }
                if !p.parting() {
                    p.close(Some(Close::new(CloseCode::Normal, "done")));
                }
                None
            })
            .await
        })
        .await
        .map_err(|_| Error::Timeout {
            what: "draining the RDMA send queue on close",
            after: limit,
        })
        .and_then(|r| r);
        self.abort();
        drained
    }
}

/// Whether every message up to `target` is acknowledged; an error if it never will be.
fn flushed(st: &State, target: u64) -> Option<Result<()>> {
    let p = st.conn.session();
    let acked = p.send_buffer().messages_acked();
    if acked >= target {
        return Some(Ok(()));
    }
    if let Some(e) = st.failure() {
        return Some(Err(e));
    }
    if p.is_peer_closed() || st.closed {
        return Some(Err(Error::PeerClosed {
            code: CloseCode::Aborted,
            reason: format!("the session ended with {acked} of {target} messages acknowledged"),
        }));
    }
    None
}

fn post_recv(qp: &mut BasicQueuePair, pool: &Pool, index: usize, size: usize) -> Result<()> {
    let mut guard = qp.start_post_recv();
    let wr = guard.construct_wr(WR_RECV | index as u64);
    // SAFETY: the buffer is inside the registered receive pool, which outlives the QP.
    unsafe { wr.setup_sge(pool.mr.lkey(), pool.addr(index * size), size as u32) };
    guard.post().map_err(|e| rdma_err("posting a receive", e))
}

/// The driver: owns the verbs objects and executes what the sans-IO [`Conn`] decides.
struct Driver {
    v: Verbs,
    free_send: Vec<u32>,
    recv_buf: usize,
    slot: usize,
    ring_slots: usize,
    /// The send slot carrying the end of our parting Close, until its completion.
    close_slot: Option<usize>,
    /// After a failure: the latest moment to leave, Close delivered or not.
    linger_until: Option<Instant>,
}

impl Driver {
    fn new(c: &RdmaConfig, v: Verbs) -> Self {
        Driver {
            free_send: (0..SEND_SLOTS).rev().collect(),
            recv_buf: c.recv_buf_size(),
            slot: c.slot_size as usize,
            ring_slots: c.ring_slots as usize,
            close_slot: None,
            linger_until: None,
            v,
        }
    }

    /// Runs until the session ends; returns the bootstrap stream when asked to keep it.
    async fn run(
        mut self,
        s: &Session,
        mut stream: TcpStream,
    ) -> std::result::Result<Option<TcpStream>, String> {
        self.arm()?;
        let mut byte = [0u8; 1];
        loop {
            if s.aborted.load(Ordering::SeqCst) {
                return Ok(s.keep_bootstrap.load(Ordering::SeqCst).then_some(stream));
            }
            self.poll(s)?;
            let deadline = self.step(s)?;
            if self.linger_until.is_some_and(|t| Instant::now() >= t) {
                // Failed, and the parting Close is delivered or its time is up.
                return Ok(None);
            }
            // Re-arm, then poll once more: a completion that raced the arming is not lost.
            self.arm()?;
            if self.poll(s)? {
                continue;
            }
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.v.channel.readable() => {
                    let mut guard = r.map_err(|e| format!("waiting on the completion channel: {e}"))?;
                    self.drain_events();
                    guard.clear_ready();
                }
                _ = s.wake_driver.notified() => {}
                _ = sleep => {}
                r = stream.read(&mut byte) => {
                    // Completions that raced the EOF (our Close's, the peer's last segments)
                    // count first.
                    let _ = self.poll(s);
                    let mut st = s.lock();
                    let p = st.conn.session_mut();
                    if p.is_peer_closed() || p.fatal().is_some() {
                        // The peer closed (gracefully, or after a failure) and then tore its
                        // QP down: done.
                        return Ok(None);
                    }
                    let fatal = match r {
                        Ok(0) => Fatal::PeerClosed {
                            code: CloseCode::Aborted,
                            reason: "the peer's bootstrap connection closed: the peer is gone".into(),
                        },
                        Ok(_) => Fatal::Protocol(ProtocolError::Inconsistent(
                            "unexpected bytes on the RDMA bootstrap connection".into(),
                        )),
                        Err(e) => return Err(format!("bootstrap connection failed: {e}")),
                    };
                    warn!(error = %fatal.to_error(), "RDMA session failed");
                    p.fail(fatal);
                    return Ok(None);
                }
            }
        }
    }

    /// Runs the protocol's timers, posts what it wants sent and hands its events on; returns
    /// the next deadline.
    fn step(&mut self, s: &Session) -> std::result::Result<Option<Instant>, String> {
        let now = Instant::now();
        let mut st = s.lock();
        let p = st.conn.session_mut();
        if p.poll_timeout().is_some_and(|t| t <= now) {
            p.on_timeout(now);
        }
        let mut posted = false;
        while let Some(&idx) = self.free_send.last() {
            let idx = idx as usize;
            let buf = self.v.send_pool.slice_mut(idx * self.slot, self.slot);
            let Some(post) = st.conn.poll_segment(now, buf) else {
                break;
            };
            self.free_send.pop();
            if post.parting {
                self.close_slot = Some(idx);
            }
            self.post(idx, post)?;
            posted = true;
        }
        let mut changed = posted;
        while let Some(e) = st.conn.poll_event(now) {
            changed = true;
            match e {
                Event::Acked { messages } => s.acked_messages.advance_to(messages),
                Event::Failed(f) => {
                    warn!(error = %f.to_error(), "RDMA session failed; telling the peer");
                    self.linger_until = Some(now + FAIL_LINGER);
                }
                Event::Closed => debug!("the peer closed the RDMA session"),
                Event::Readable | Event::Pong { .. } | Event::PathStopped { .. } => {}
            }
        }
        if st.conn.session().fatal().is_some() && self.linger_until.is_none() {
            self.linger_until = Some(now + FAIL_LINGER);
        }
        if self.linger_until.is_some() && st.close_delivered {
            // The peer has our reason: nothing to wait for.
            self.linger_until = Some(now);
        }
        let deadline = [st.conn.session().poll_timeout(), self.linger_until]
            .into_iter()
            .flatten()
            .min();
        drop(st);
        if changed {
            s.changed.notify_waiters();
        }
        Ok(deadline)
    }

    fn arm(&self) -> std::result::Result<(), String> {
        // SAFETY: the CQ is alive for the call.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.v.cq.cq().as_ptr(), 0) };
        if rc != 0 {
            return Err(format!(
                "ibv_req_notify_cq failed: {}",
                io::Error::from_raw_os_error(rc)
            ));
        }
        Ok(())
    }

    /// Takes and acknowledges every pending channel event (non-blocking fd).
    fn drain_events(&self) {
        let mut n = 0;
        loop {
            let mut cq = std::ptr::null_mut();
            let mut ctx = std::ptr::null_mut();
            // SAFETY: the channel is alive; on EAGAIN nothing is written.
            let rc = unsafe {
                rdma_mummy_sys::ibv_get_cq_event(
                    self.v.channel.get_ref().0.comp_channel().as_ptr(),
                    &mut cq,
                    &mut ctx,
                )
            };
            if rc != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: acknowledges exactly the events taken above.
            unsafe { rdma_mummy_sys::ibv_ack_cq_events(self.v.cq.cq().as_ptr(), n) };
        }
    }

    /// Polls the CQ in batches; returns whether anything completed.
    fn poll(&mut self, s: &Session) -> std::result::Result<bool, String> {
        let mut any = false;
        loop {
            let mut batch = Vec::with_capacity(POLL_BATCH as usize);
            match self.v.cq.start_poll() {
                Ok(poller) => {
                    for wc in poller {
                        batch.push((
                            wc.wr_id(),
                            wc.status(),
                            wc.opcode(),
                            wc.byte_len(),
                            wc.imm_data(),
                            wc.vendor_err(),
                        ));
                        if batch.len() >= POLL_BATCH as usize {
                            break;
                        }
                    }
                }
                Err(_) => break,
            }
            if batch.is_empty() {
                break;
            }
            any = true;
            let now = Instant::now();
            let mut st = s.lock();
            for (wr_id, status, opcode, len, imm, vendor) in batch {
                self.complete(&mut st, now, wr_id, status, opcode, len, imm, vendor)?;
            }
        }
        if any {
            s.changed.notify_waiters();
        }
        Ok(any)
    }

    #[allow(clippy::too_many_arguments)]
    fn complete(
        &mut self,
        st: &mut State,
        now: Instant,
        wr_id: u64,
        status: u32,
        opcode: u32,
        len: u32,
        imm: u32,
        vendor: u32,
    ) -> std::result::Result<(), String> {
        if status != WorkCompletionStatus::Success as u32 {
            let wcs: WorkCompletionStatus = status.into();
            let hint = match wcs {
                WorkCompletionStatus::RetryCounterExceededError => {
                    " (retry exceeded: the peer is unreachable or its queue pair is gone)"
                }
                WorkCompletionStatus::ResponderNotReadyRetryCounterExceededError => {
                    " (the peer posted no receive in time)"
                }
                WorkCompletionStatus::WorkRequestFlushedError => {
                    " (the queue pair is in the error state)"
                }
                _ => "",
            };
            return Err(format!(
                "RDMA work completion failed: {wcs:?}{hint}, vendor error {vendor:#x}, wr {wr_id:#x}"
            ));
        }
        let index = (wr_id & WR_INDEX) as usize;
        if wr_id & WR_SEND == WR_SEND {
            if self.close_slot == Some(index) {
                self.close_slot = None;
                st.close_delivered = true;
            }
            self.free_send.push(index as u32);
            return Ok(());
        }
        // A receive: a SEND into our buffer, or a WRITE with immediate into our ring.
        let with_imm = opcode == WorkCompletionOperationType::ReceiveWithImmediate as u32;
        let slot = with_imm.then(|| u32::from_be(imm));
        let bytes = match slot {
            Some(slot) => {
                // A slot out of range is refused by the ledger before the bytes are read.
                if (slot as usize) < self.ring_slots {
                    self.v.ring.slice(slot as usize * self.slot, self.slot)
                } else {
                    &[]
                }
            }
            None => self
                .v
                .recv_pool
                .slice(index * self.recv_buf, (len as usize).min(self.recv_buf)),
        };
        // The bytes are copied out, so the buffer and the slot go back at once. A protocol
        // error is latched in the session, whose parting Close goes out next.
        let _ = st.conn.on_segment(slot, bytes, now);
        post_recv(&mut self.v.qp, &self.v.recv_pool, index, self.recv_buf)
            .map_err(|e| e.to_string())
    }

    fn post(&mut self, idx: usize, post: Post) -> std::result::Result<(), String> {
        let lkey = self.v.send_pool.mr.lkey();
        let addr = self.v.send_pool.addr(idx * self.slot);
        let peer = self.v.peer;
        let mut guard = self.v.qp.start_post_send();
        let wr = guard.construct_wr(WR_SEND | idx as u64, WorkRequestFlags::Signaled);
        let handle = match post.op {
            Op::RingWrite { slot } => wr.setup_write_imm(
                peer.ring_rkey,
                peer.ring_addr + slot as u64 * peer.slot_size as u64,
                slot.to_be(),
            ),
            Op::Send | Op::Control => wr.setup_send(),
        };
        // SAFETY: the staging buffer is in the registered send pool and stays untouched until
        // this work request completes (its index is off the free list until then).
        unsafe { handle.setup_sge(lkey, addr, post.len as u32) };
        guard
            .post()
            .map_err(|e| format!("posting a work request: {e}"))
    }
}
