//! The verbs side: device and GID selection, registered pools, one RC queue pair, and a driver
//! task that turns completion-channel events (in tokio's `AsyncFd`) into batch polls of the
//! CQ, and [`Flow`]/[`Segmenter`]/[`Assembler`] decisions into posted work requests.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use amst_core::codec::CloseCode;
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
use crate::credit::{Flow, Op};
use crate::path::PathEstimate;
use crate::wire::{Assembler, SEGMENT_HEADER_LEN, SegmentHeader, SegmentKind, Segmenter};

/// Receive credits held back for control segments.
const CONTROL_RESERVE: u64 = 2;
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

/// Why the session ended badly; kept so every later call reports the same thing.
#[derive(Clone, Debug)]
enum Fatal {
    Io(String),
    Protocol(ProtocolError),
    PeerClosed(String),
}

impl Fatal {
    fn to_error(&self) -> Error {
        match self {
            Fatal::Io(s) => Error::io(
                "RDMA transport",
                io::Error::new(io::ErrorKind::ConnectionAborted, s.clone()),
            ),
            Fatal::Protocol(p) => Error::Protocol(p.clone()),
            Fatal::PeerClosed(r) => Error::PeerClosed {
                code: CloseCode::Aborted,
                reason: r.clone(),
            },
        }
    }
}

/// State shared between the application's calls and the driver task.
#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Bytes>,
    unacked_sizes: VecDeque<u64>,
    window_used: u64,
    messages_sent: u64,
    acked: u64,
    delivered: VecDeque<Bytes>,
    messages_received: u64,
    bytes_sent: u64,
    bytes_received: u64,
    closing: bool,
    close_sent: bool,
    /// Our Close segment's send completed: the peer's queue pair acknowledged it (RC), so it
    /// is received, and tearing our queue pair down can no longer lose it.
    close_delivered: bool,
    peer_closed: bool,
    closed: bool,
    fatal: Option<Fatal>,
    /// Ack-timed RTT and the peer's credit, which the driver updates and `metrics` reads.
    path: PathEstimate,
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
            state: Mutex::new(State::default()),
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
            let r = match Driver::new(&me, verbs).run(&me, stream).await {
                Ok(Some(stream)) => {
                    *amst_core::util::lock(&me.parked) = Some(stream);
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(f) => Err(f),
            };
            let mut st = me.lock();
            if let Err(f) = r {
                warn!(error = ?f, "RDMA session failed");
                st.fatal.get_or_insert(f);
            }
            st.closed = true;
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

    /// Waits until `ready` says done (Some), re-checking after every state change.
    async fn wait<T>(&self, mut ready: impl FnMut(&mut State) -> Option<Result<T>>) -> Result<T> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(r) = ready(&mut st) {
                    return r;
                }
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
            if let Some(f) = &st.fatal {
                return Some(Err(f.to_error()));
            }
            if st.closing || st.closed {
                return Some(Err(Error::Closed));
            }
            // One message larger than the window may go alone.
            if st.window_used > 0 && st.window_used + len > window {
                return None;
            }
            st.window_used += len;
            st.unacked_sizes.push_back(len);
            st.messages_sent += 1;
            st.queue.push_back(message.take().expect("queued once"));
            Some(Ok(()))
        })
        .await?;
        self.wake_driver.notify_one();
        Ok(())
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        let target = self.lock().messages_sent;
        self.wait(|st| {
            if st.acked >= target {
                return Some(Ok(()));
            }
            if let Some(f) = &st.fatal {
                return Some(Err(f.to_error()));
            }
            st.closed.then(|| {
                Err(Error::PeerClosed {
                    code: CloseCode::Aborted,
                    reason: format!(
                        "the session ended with {} of {target} messages acknowledged",
                        st.acked
                    ),
                })
            })
        })
        .await
    }

    pub(crate) async fn recv(&self) -> Result<Option<Bytes>> {
        self.wait(|st| {
            if let Some(m) = st.delivered.pop_front() {
                return Some(Ok(Some(m)));
            }
            // A graceful close that arrived wins over a QP error after it (the peer tears its
            // QP down right behind its Close).
            if st.peer_closed {
                return Some(Ok(None));
            }
            if let Some(f) = &st.fatal {
                return Some(Err(f.to_error()));
            }
            if st.closed {
                return Some(Err(Error::Closed));
            }
            None
        })
        .await
    }

    pub(crate) fn acked(&self) -> AckWatch {
        self.acked_messages.watch()
    }

    pub(crate) fn metrics(&self) -> TransportMetrics {
        let st = self.lock();
        let mut m = TransportMetrics::new(TransportKind::Rdma);
        m.bytes_sent = st.bytes_sent;
        m.bytes_received = st.bytes_received;
        m.messages_sent = st.messages_sent;
        m.messages_received = st.messages_received;
        m.messages_acked = st.acked;
        m.active_streams = usize::from(!st.closed);
        st.path.report(&mut m);
        m.chunk_size = Some(self.config.slot_payload() as u64);
        m
    }

    pub(crate) async fn close(&self) -> Result<()> {
        {
            let mut st = self.lock();
            if let Some(f) = &st.fatal
                && !close_done(&st)
            {
                return Err(f.to_error());
            }
            st.closing = true;
        }
        self.wake_driver.notify_one();
        let limit = self.config.handshake_timeout.max(Duration::from_secs(30));
        tokio::time::timeout(
            limit,
            self.wait(|st| {
                if close_done(st) {
                    return Some(Ok(()));
                }
                if let Some(f) = &st.fatal {
                    return Some(Err(f.to_error()));
                }
                st.closed.then(|| {
                    Err(Error::PeerClosed {
                        code: CloseCode::Aborted,
                        reason: format!(
                            "the peer closed first; {} of {} messages acknowledged",
                            st.acked, st.messages_sent
                        ),
                    })
                })
            }),
        )
        .await
        .map_err(|_| Error::Timeout {
            what: "draining the RDMA send queue on close",
            after: limit,
        })??;
        self.abort();
        Ok(())
    }
}

/// Whether a graceful close is complete: everything we sent is acknowledged, and either the
/// peer has our Close, or the peer has ended the session itself.
///
/// The Close must be *delivered* (its send completion, the peer's RC acknowledgement), not
/// just posted: destroying the queue pair with the Close still queued loses it, and the peer
/// then sees its own in-flight segments fail against our dying queue pair (rxe answers them
/// with RemoteInvalidRequest) instead of a graceful end.
fn close_done(st: &State) -> bool {
    st.acked >= st.messages_sent
        && (st.close_delivered
            // The peer closed first: our Close has no reader left.
            || st.peer_closed
            // The peer went away after our Close was posted, with everything acknowledged.
            || (st.close_sent && st.closed))
}

fn post_recv(qp: &mut BasicQueuePair, pool: &Pool, index: usize, size: usize) -> Result<()> {
    let mut guard = qp.start_post_recv();
    let wr = guard.construct_wr(WR_RECV | index as u64);
    // SAFETY: the buffer is inside the registered receive pool, which outlives the QP.
    unsafe { wr.setup_sge(pool.mr.lkey(), pool.addr(index * size), size as u32) };
    guard.post().map_err(|e| rdma_err("posting a receive", e))
}

/// The driver: owns the verbs objects and the sans-IO state machines.
struct Driver {
    v: Verbs,
    flow: Flow,
    segmenter: Segmenter,
    assembler: Assembler,
    free_send: Vec<u32>,
    send_len: Vec<u64>,
    small_max: usize,
    slot_payload: u64,
    recv_buf: usize,
    slot: usize,
    close_posted: bool,
    /// The send slot carrying our Close, until its completion.
    close_slot: Option<usize>,
}

impl Driver {
    fn new(s: &Session, v: Verbs) -> Self {
        let c = &s.config;
        let flow = Flow::new(
            v.peer.recv_depth as u64,
            v.peer.ring_slots as u64,
            c.recv_depth as u64,
            c.ring_slots as u64,
            CONTROL_RESERVE,
        );
        Driver {
            flow,
            segmenter: Segmenter::new(c.slot_payload()),
            assembler: Assembler::new(c.max_message),
            free_send: (0..SEND_SLOTS).rev().collect(),
            send_len: vec![0; SEND_SLOTS as usize],
            small_max: c.small_max as usize,
            slot_payload: c.slot_payload() as u64,
            recv_buf: c.recv_buf_size(),
            slot: c.slot_size as usize,
            close_posted: false,
            close_slot: None,
            v,
        }
    }

    /// Runs until the session ends; returns the bootstrap stream when asked to keep it.
    async fn run(
        mut self,
        s: &Session,
        mut stream: TcpStream,
    ) -> std::result::Result<Option<TcpStream>, Fatal> {
        self.arm()?;
        let mut byte = [0u8; 1];
        loop {
            if s.aborted.load(Ordering::SeqCst) {
                return Ok(s.keep_bootstrap.load(Ordering::SeqCst).then_some(stream));
            }
            self.poll(s)?;
            self.pump(s)?;
            // Re-arm, then poll once more: a completion that raced the arming is not lost.
            self.arm()?;
            if self.poll(s)? {
                continue;
            }
            tokio::select! {
                r = self.v.channel.readable() => {
                    let mut guard = r.map_err(|e| Fatal::Io(format!("waiting on the completion channel: {e}")))?;
                    self.drain_events();
                    guard.clear_ready();
                }
                _ = s.wake_driver.notified() => {}
                r = stream.read(&mut byte) => {
                    // Completions that raced the EOF (our Close's, the peer's last segments)
                    // count first.
                    let _ = self.poll(s);
                    let peer_closed = s.lock().peer_closed;
                    match r {
                        // The peer closed gracefully and then tore its QP down: done.
                        Ok(0) | Err(_) if peer_closed => return Ok(None),
                        Ok(0) => return Err(Fatal::PeerClosed("the peer's bootstrap connection closed: the peer is gone".into())),
                        Ok(_) => return Err(Fatal::Protocol(ProtocolError::Inconsistent("unexpected bytes on the RDMA bootstrap connection".into()))),
                        Err(e) => return Err(Fatal::Io(format!("bootstrap connection failed: {e}"))),
                    }
                }
            }
        }
    }

    fn arm(&self) -> std::result::Result<(), Fatal> {
        // SAFETY: the CQ is alive for the call.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.v.cq.cq().as_ptr(), 0) };
        if rc != 0 {
            return Err(Fatal::Io(format!(
                "ibv_req_notify_cq failed: {}",
                io::Error::from_raw_os_error(rc)
            )));
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
    fn poll(&mut self, s: &Session) -> std::result::Result<bool, Fatal> {
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
            for (wr_id, status, opcode, len, imm, vendor) in batch {
                self.complete(s, wr_id, status, opcode, len, imm, vendor)?;
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
        s: &Session,
        wr_id: u64,
        status: u32,
        opcode: u32,
        len: u32,
        imm: u32,
        vendor: u32,
    ) -> std::result::Result<(), Fatal> {
        if status != WorkCompletionStatus::Success as u32 {
            let st: WorkCompletionStatus = status.into();
            let hint = match st {
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
            return Err(Fatal::Io(format!(
                "RDMA work completion failed: {st:?}{hint}, vendor error {vendor:#x}, wr {wr_id:#x}"
            )));
        }
        let index = (wr_id & WR_INDEX) as usize;
        if wr_id & WR_SEND == WR_SEND {
            let mut st = s.lock();
            st.bytes_sent += self.send_len[index];
            if self.close_slot == Some(index) {
                self.close_slot = None;
                st.close_delivered = true;
            }
            drop(st);
            self.free_send.push(index as u32);
            return Ok(());
        }
        // A receive: a SEND into our buffer, or a WRITE with immediate into our ring.
        let with_imm = opcode == WorkCompletionOperationType::ReceiveWithImmediate as u32;
        let slot = with_imm.then(|| u32::from_be(imm));
        self.flow.on_receive(slot).map_err(Fatal::Protocol)?;
        let (header, payload) = if let Some(slot) = slot {
            let buf = self.v.ring.slice(slot as usize * self.slot, self.slot);
            let h = SegmentHeader::decode(buf).map_err(Fatal::Protocol)?;
            (
                h,
                buf[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + h.payload_len as usize].to_vec(),
            )
        } else {
            let buf = self
                .v
                .recv_pool
                .slice(index * self.recv_buf, (len as usize).min(self.recv_buf));
            let h = SegmentHeader::decode(buf).map_err(Fatal::Protocol)?;
            (
                h,
                buf[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + h.payload_len as usize].to_vec(),
            )
        };
        // The bytes are copied out: the slot and the buffer go back at once.
        if slot.is_some() {
            self.flow.on_ring_released();
        }
        post_recv(&mut self.v.qp, &self.v.recv_pool, index, self.recv_buf)
            .map_err(|e| Fatal::Io(e.to_string()))?;
        self.flow.on_recv_posted(1);

        let mut st = s.lock();
        self.flow
            .on_peer_header(
                header.recv_advertised,
                header.ring_advertised,
                header.acked,
                st.messages_sent,
            )
            .map_err(Fatal::Protocol)?;
        let newly = self.flow.peer_acked() - st.acked;
        for _ in 0..newly {
            let n = st.unacked_sizes.pop_front().unwrap_or(0);
            st.window_used -= n;
        }
        st.acked = self.flow.peer_acked();
        let acked = st.acked;
        st.path.on_acked(acked, Instant::now());
        s.acked_messages.advance_to(st.acked);
        match header.kind {
            SegmentKind::Data => {
                st.bytes_received += payload.len() as u64;
                if let Some(msg) = self
                    .assembler
                    .push(&header, &payload)
                    .map_err(Fatal::Protocol)?
                {
                    st.messages_received += 1;
                    st.delivered.push_back(msg);
                    self.flow.on_delivered();
                }
            }
            SegmentKind::Control => {}
            SegmentKind::Close => st.peer_closed = true,
        }
        Ok(())
    }

    /// Posts as many segments as credit and staging buffers allow, then any owed control.
    fn pump(&mut self, s: &Session) -> std::result::Result<(), Fatal> {
        let mut posted = false;
        loop {
            if !self.segmenter.in_progress() {
                let next = s.lock().queue.pop_front();
                match next {
                    Some(m) => self.segmenter.start(m),
                    None => break,
                }
            }
            let len = self.segmenter.peek_len().expect("in progress");
            let ring = len > self.small_max;
            let ok = if ring {
                self.flow.can_write_ring()
            } else {
                self.flow.can_send()
            };
            if !ok || self.free_send.is_empty() {
                break;
            }
            let seg = self.segmenter.next_segment().expect("in progress");
            let op = self.flow.on_post_data(ring);
            self.post(SegmentKind::Data, seg.flags, seg.msg_len, &seg.payload, op)?;
            if !self.segmenter.in_progress() {
                s.lock().path.on_message_posted(Instant::now());
            }
            posted = true;
        }
        let (closing, drained) = {
            let st = s.lock();
            (
                st.closing,
                st.queue.is_empty() && !self.segmenter.in_progress(),
            )
        };
        if closing
            && drained
            && !self.close_posted
            && self.flow.can_send_control()
            && !self.free_send.is_empty()
        {
            let op = self.flow.on_post_control();
            self.close_slot = self.free_send.last().map(|i| *i as usize);
            self.post(SegmentKind::Close, 0, 0, &[], op)?;
            self.close_posted = true;
            s.lock().close_sent = true;
            posted = true;
        } else if self.flow.needs_update()
            && self.flow.can_send_control()
            && !self.free_send.is_empty()
        {
            let op = self.flow.on_post_control();
            self.post(SegmentKind::Control, 0, 0, &[], op)?;
            posted = true;
        }
        s.lock()
            .path
            .on_credit(&self.flow, self.small_max as u64, self.slot_payload);
        if posted {
            s.changed.notify_waiters();
        }
        Ok(())
    }

    fn post(
        &mut self,
        kind: SegmentKind,
        flags: u8,
        msg_len: u64,
        payload: &[u8],
        op: Op,
    ) -> std::result::Result<(), Fatal> {
        let adv = self.flow.advertise();
        let header = SegmentHeader {
            kind,
            flags,
            payload_len: payload.len() as u32,
            msg_len,
            recv_advertised: adv.recv_advertised,
            ring_advertised: adv.ring_advertised,
            acked: adv.acked,
            crc: amst_core::crc32c(payload),
        };
        let idx = self.free_send.pop().expect("checked by the caller") as usize;
        let total = SEGMENT_HEADER_LEN + payload.len();
        let buf = self.v.send_pool.slice_mut(idx * self.slot, total);
        header.encode(buf);
        buf[SEGMENT_HEADER_LEN..].copy_from_slice(payload);
        self.send_len[idx] = payload.len() as u64;
        let lkey = self.v.send_pool.mr.lkey();
        let addr = self.v.send_pool.addr(idx * self.slot);
        let peer = self.v.peer;
        let mut guard = self.v.qp.start_post_send();
        let wr = guard.construct_wr(WR_SEND | idx as u64, WorkRequestFlags::Signaled);
        let handle = match op {
            Op::RingWrite { slot } => wr.setup_write_imm(
                peer.ring_rkey,
                peer.ring_addr + slot as u64 * peer.slot_size as u64,
                slot.to_be(),
            ),
            Op::Send | Op::Control => wr.setup_send(),
        };
        // SAFETY: the staging buffer is in the registered send pool and stays untouched until
        // this work request completes (its index is off the free list until then).
        unsafe { handle.setup_sge(lkey, addr, total as u32) };
        guard
            .post()
            .map_err(|e| Fatal::Io(format!("posting a work request: {e}")))
    }
}
