//! One session's shared state: the send buffer, the reassembler, the control frames waiting
//! for a writer, and the registry of live streams.
//!
//! Locks are `std::sync::Mutex`, held for a few bookkeeping operations and never across an
//! `await`. `tx` and `rx` are never held together.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amst_core::codec::{CloseCode, Frame, Limits, SessionId};
use amst_core::{
    AckCounter, Error, PathId, ProtocolError, Reassembler, ReassemblyConfig, SendBuffer,
};
use bytes::BytesMut;
use socket2::Socket;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::config::TcpConfig;
use crate::conn::Conn;
use crate::sockopt::{self, Applied};
use crate::stats::{BufferStats, StreamCtl, StreamStats};

/// Control frames waiting for a writer, at most; Pongs beyond it are dropped.
const MAX_QUEUED_CONTROL: usize = 256;

/// Bytes of a probe train one writer takes at a time.
const PROBE_SLICE: usize = 256 << 10;

/// Which side of the session we are; only the client dials streams.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    Client { addr: SocketAddr },
    Server,
}

/// A session-ending error, kept so that every later call can report it.
#[derive(Clone, Debug)]
pub(crate) enum Fatal {
    Protocol(ProtocolError),
    PeerClosed { code: CloseCode, reason: String },
    Timeout { what: &'static str, after: Duration },
}

impl Fatal {
    pub(crate) fn to_error(&self) -> Error {
        match self.clone() {
            Fatal::Protocol(p) => Error::Protocol(p),
            Fatal::PeerClosed { code, reason } => Error::PeerClosed { code, reason },
            Fatal::Timeout { what, after } => Error::Timeout { what, after },
        }
    }

    fn close_code(&self) -> CloseCode {
        match self {
            Fatal::Protocol(ProtocolError::ChunkCorrupt { .. }) => CloseCode::Corrupt,
            Fatal::Protocol(ProtocolError::AuthFailed) => CloseCode::AuthFailed,
            Fatal::Protocol(ProtocolError::MessageTooLarge { .. }) => CloseCode::LimitExceeded,
            Fatal::Protocol(_) => CloseCode::ProtocolError,
            _ => CloseCode::Aborted,
        }
    }
}

pub(crate) struct TxState {
    pub sb: SendBuffer,
    pub peak: u64,
}

pub(crate) struct RxState {
    pub reasm: Reassembler,
    /// Payload bytes and chunks inserted since the last ack went out.
    pub bytes_since_ack: u64,
    pub chunks_since_ack: u64,
    /// The credit limit last sent.
    pub advertised: u64,
    pub peak: u64,
}

#[derive(Default)]
pub(crate) struct LifeState {
    /// `close` has begun: no new sends, no re-dials.
    pub closing: bool,
    /// The peer sent Close(Normal).
    pub peer_closed: bool,
    /// Torn down: tasks aborted.
    pub closed: bool,
    pub fatal: Option<Fatal>,
    /// The Close a session ending without an error sends on every stream (see `parting`).
    pub goodbye: Option<amst_core::codec::Close>,
}

pub(crate) struct StreamEntry {
    pub path: PathId,
    pub slot: u16,
    pub ctl: Arc<StreamCtl>,
    /// A duplicate of the stream's descriptor, for getsockopt, pacing and shutdown.
    pub sock: Arc<Socket>,
    pub congestion: String,
    pub tasks: Vec<AbortHandle>,
}

/// Everything the stream tasks, the monitor and the public handle share.
pub(crate) struct Shared {
    pub config: TcpConfig,
    /// The client's TLS settings, built once so that every stream of the session uses them.
    pub client_tls: Option<crate::tls::ClientTls>,
    pub role: Role,
    pub session_id: SessionId,
    pub limits: Limits,
    pub tx: Mutex<TxState>,
    /// Writers wait here for chunks or control frames.
    pub tx_wake: Notify,
    /// `send` waits here for queue space.
    pub space: Notify,
    /// `flush` waits here for acks.
    pub acked: Notify,
    /// Messages the peer acknowledged, for `Transport::acked` subscribers.
    pub acked_messages: AckCounter,
    pub rx: Mutex<RxState>,
    /// `recv` waits here for messages.
    pub rx_wake: Notify,
    /// An ack and a credit update should go out with the next write.
    pub ctrl_pending: AtomicBool,
    /// Queued control frames (Ping, Pong).
    pub ctrl_queue: Mutex<VecDeque<Frame>>,
    pub ctrl_queued: AtomicBool,
    /// A probe train's padded Pings, taken a slice at a time by whichever writers are free,
    /// so that the train spreads over the streams as data does.
    pub probe_queue: Mutex<VecDeque<Frame>>,
    pub probe_queued: AtomicBool,
    /// Tells the monitor that an ack is owed and should go out after the ack delay.
    pub ack_timer: Notify,
    pub streams: Mutex<Vec<StreamEntry>>,
    pub streams_changed: Notify,
    pub next_path: AtomicU32,
    /// Stream count the client aims for (adaptive tuning, add/remove_stream).
    pub target_streams: AtomicUsize,
    pub chunk_size: AtomicUsize,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub life: Mutex<LifeState>,
    pub tasks: Mutex<Vec<AbortHandle>>,
    pub pings: Mutex<HashMap<u64, oneshot::Sender<Instant>>>,
    pub next_ping: AtomicU64,
    pub epoch: Instant,
    /// Aggregate pacing rate from the model, bytes/s (0 = none yet).
    pub pacing_rate: AtomicU64,
    /// The aggregate model's congestion window, bytes (0 = no model or none yet).
    pub model_cwnd: AtomicU64,
    /// Sum of the live streams' kernel congestion windows at the last sample, bytes.
    pub kernel_cwnd: AtomicU64,
    /// Sum of the live streams' `tcpi_bytes_retrans` at the last sample.
    pub kernel_bytes_retrans: AtomicU64,
    /// Sum of the live streams' `tcpi_lost` at the last sample, segments.
    pub kernel_lost: AtomicU64,
    /// Probe trains in flight: while any is, the model's cap is lifted (the probe measures
    /// the path, not the pacing) and not re-applied.
    pub probing: AtomicU32,
    /// The aggregate in-flight cap from the model, bytes (0 = none: the gate is lifted).
    pub inflight_cap: AtomicU64,
    /// The writers' share of that cap (see `aggregate`).
    pub gate: crate::aggregate::InflightGate,
    /// Sum of the streams' kernel delivery-rate estimates at the last sample, bytes/s.
    pub delivery_rate: AtomicU64,
    pub srtt_us: AtomicU64,
    pub min_rtt_us: AtomicU64,
    /// When a frame last arrived from the peer, ns since `epoch`.
    pub last_heard: AtomicU64,
    /// A frame has arrived from the peer since the session started.
    pub heard: AtomicBool,
    /// The session ends: writers send the parting Close on every stream and half-close.
    pub parting: AtomicBool,
    /// The session failed locally: readers drop what still comes.
    pub failed: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("session_id", &hex(&self.session_id))
            .field("profile", &self.config.profile)
            .finish_non_exhaustive()
    }
}

pub(crate) use amst_core::util::{hex, lock};

/// Delay before an ack that no threshold forced goes out: long enough to coalesce a burst,
/// short against any RTT that matters for `flush`.
pub(crate) const ACK_DELAY: Duration = Duration::from_millis(1);

/// Longest wait, after this side failed the session, for the peer to read our Close and
/// close its streams.
const FAIL_LINGER: Duration = Duration::from_secs(2);

impl Shared {
    pub(crate) fn new(
        config: TcpConfig,
        client_tls: Option<crate::tls::ClientTls>,
        role: Role,
        session_id: SessionId,
    ) -> Arc<Self> {
        let limits = Limits {
            max_message: config.max_message,
            ..Limits::default()
        };
        let reasm = Reassembler::with_budget(
            ReassemblyConfig {
                window: config.receive_window,
                max_message: config.max_message,
                ..ReassemblyConfig::default()
            },
            config.memory_budget.clone(),
        );
        let shared = Arc::new(Shared {
            target_streams: AtomicUsize::new(config.streams),
            chunk_size: AtomicUsize::new(config.chunk_size),
            tx: Mutex::new(TxState {
                sb: SendBuffer::new(config.max_message),
                peak: 0,
            }),
            rx: Mutex::new(RxState {
                reasm,
                bytes_since_ack: 0,
                chunks_since_ack: 0,
                advertised: 0,
                peak: 0,
            }),
            config,
            client_tls,
            role,
            session_id,
            limits,
            tx_wake: Notify::new(),
            space: Notify::new(),
            acked: Notify::new(),
            acked_messages: AckCounter::new(),
            rx_wake: Notify::new(),
            // The peer's send buffer starts with no credit: our first write grants it.
            ctrl_pending: AtomicBool::new(true),
            ctrl_queue: Mutex::new(VecDeque::new()),
            ctrl_queued: AtomicBool::new(false),
            probe_queue: Mutex::new(VecDeque::new()),
            probe_queued: AtomicBool::new(false),
            ack_timer: Notify::new(),
            streams: Mutex::new(Vec::new()),
            streams_changed: Notify::new(),
            next_path: AtomicU32::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            life: Mutex::new(LifeState::default()),
            tasks: Mutex::new(Vec::new()),
            pings: Mutex::new(HashMap::new()),
            next_ping: AtomicU64::new(0),
            epoch: Instant::now(),
            pacing_rate: AtomicU64::new(0),
            model_cwnd: AtomicU64::new(0),
            kernel_cwnd: AtomicU64::new(0),
            kernel_bytes_retrans: AtomicU64::new(0),
            kernel_lost: AtomicU64::new(0),
            probing: AtomicU32::new(0),
            inflight_cap: AtomicU64::new(0),
            gate: crate::aggregate::InflightGate::default(),
            delivery_rate: AtomicU64::new(0),
            srtt_us: AtomicU64::new(0),
            min_rtt_us: AtomicU64::new(0),
            last_heard: AtomicU64::new(0),
            heard: AtomicBool::new(false),
            parting: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        let monitor = tokio::spawn(crate::monitor::run(shared.clone()));
        lock(&shared.tasks).push(monitor.abort_handle());
        shared
    }

    /// Bytes of new data after which the receiver acks at once.
    pub(crate) fn ack_threshold(&self) -> u64 {
        (self.config.receive_window / 8).clamp(64 << 10, 4 << 20)
    }

    /// Growth of the grantable credit after which it is advertised at once.
    pub(crate) fn credit_threshold(&self) -> u64 {
        (self.config.receive_window / 8).max(1)
    }

    // ----- control frames -----

    /// Asks a writer to send the current ack and credit with its next write.
    pub(crate) fn request_ack(&self) {
        if !self.ctrl_pending.swap(true, Ordering::AcqRel) {
            self.tx_wake.notify_one();
        }
    }

    /// Queues a control frame (Ping, Pong) for the next writer.
    pub(crate) fn queue_frame(&self, frame: Frame) {
        {
            let mut q = lock(&self.ctrl_queue);
            if q.len() >= MAX_QUEUED_CONTROL && matches!(frame, Frame::Pong(_)) {
                // A peer that pings faster than it reads its answers loses some: the queue
                // stays small whatever it sends.
                return;
            }
            q.push_back(frame);
        }
        self.ctrl_queued.store(true, Ordering::Release);
        self.tx_wake.notify_one();
    }

    /// Appends the pending acks, credit and control frames to `out`.
    pub(crate) fn take_control(&self, out: &mut BytesMut) {
        if self.ctrl_pending.swap(false, Ordering::AcqRel) {
            let (ack, credit) = {
                let mut rx = lock(&self.rx);
                rx.bytes_since_ack = 0;
                rx.chunks_since_ack = 0;
                let credit = rx.reasm.credit();
                rx.advertised = credit.limit;
                (rx.reasm.ack(), credit)
            };
            Frame::Ack(ack).encode(out);
            Frame::Credit(credit).encode(out);
        }
        if self.ctrl_queued.swap(false, Ordering::AcqRel) {
            for f in lock(&self.ctrl_queue).drain(..) {
                f.encode(out);
            }
        }
        if self.probe_queued.load(Ordering::Acquire) {
            let mut q = lock(&self.probe_queue);
            let mut taken = 0;
            while taken < PROBE_SLICE
                && let Some(f) = q.pop_front()
            {
                let before = out.len();
                f.encode(out);
                taken += out.len() - before;
            }
            if q.is_empty() {
                self.probe_queued.store(false, Ordering::Release);
            } else {
                // More for the next free writer.
                self.tx_wake.notify_one();
            }
        }
    }

    /// After data arrived or the application took a message: ack now if a threshold is
    /// crossed, else let the monitor ack after [`ACK_DELAY`].
    pub(crate) fn after_rx_change(&self, rx: &RxState) {
        let credit_growth = rx.reasm.credit().limit.saturating_sub(rx.advertised);
        if rx.bytes_since_ack >= self.ack_threshold() || credit_growth >= self.credit_threshold() {
            self.request_ack();
        } else if rx.chunks_since_ack > 0 || credit_growth > 0 {
            self.ack_timer.notify_one();
        }
    }

    /// Called by the monitor after the ack delay.
    pub(crate) fn delayed_ack(&self) {
        let owed = {
            let rx = lock(&self.rx);
            rx.chunks_since_ack > 0 || rx.reasm.credit().limit > rx.advertised
        };
        if owed {
            self.request_ack();
        }
    }

    // ----- life cycle -----

    /// Ends the session with an error: tells the peer (best effort), stops every task and
    /// wakes every waiter, who will report it.
    pub(crate) fn fail(self: &Arc<Self>, fatal: Fatal) {
        {
            let mut life = lock(&self.life);
            if life.fatal.is_some() || life.closed {
                return;
            }
            warn!(session = %hex(&self.session_id), error = %fatal.to_error(), "session failed");
            life.fatal = Some(fatal.clone());
        }
        if matches!(fatal, Fatal::PeerClosed { .. }) || self.stream_count() == 0 {
            self.wake_all();
            self.teardown();
            return;
        }
        // Tell the peer why on every stream (writers finish the frame they are on, send the
        // Close and half-close) and keep reading until it closes, then tear down. Closing
        // at once would reset connections with unread data and could destroy the Close, and
        // the peer would re-dial instead of reporting our reason.
        self.failed.store(true, Ordering::Release);
        self.parting.store(true, Ordering::Release);
        self.wake_all();
        for e in lock(&self.streams).iter() {
            e.ctl.wake.notify_one();
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.streams_gone_within(FAIL_LINGER).await;
            me.teardown();
        });
    }

    /// Waits until every stream has ended (the peer closed its side too), or `linger` passed.
    pub(crate) async fn streams_gone_within(&self, linger: Duration) {
        let deadline = tokio::time::Instant::now() + linger;
        loop {
            let changed = self.streams_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.stream_count() == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// The Close that tells the peer why this session ends: its failure, else its goodbye.
    pub(crate) fn parting_close(&self) -> Option<Frame> {
        let life = lock(&self.life);
        if let Some(f) = life.fatal.as_ref() {
            return Some(Frame::Close(amst_core::codec::Close::new(
                f.close_code(),
                f.to_error().to_string(),
            )));
        }
        life.goodbye.clone().map(Frame::Close)
    }

    /// Aborts every task and shuts every stream. Idempotent.
    pub(crate) fn teardown(&self) {
        let entries: Vec<StreamEntry> = {
            let mut life = lock(&self.life);
            life.closed = true;
            lock(&self.streams).drain(..).collect()
        };
        for e in entries {
            for t in &e.tasks {
                t.abort();
            }
            let _ = sockopt::shutdown_fd(&*e.sock);
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        lock(&self.pings).clear();
        self.wake_all();
    }

    pub(crate) fn wake_all(&self) {
        self.rx_wake.notify_waiters();
        self.space.notify_waiters();
        self.acked.notify_waiters();
        self.tx_wake.notify_waiters();
        self.streams_changed.notify_waiters();
    }

    /// Spawns a task that dies with the session.
    pub(crate) fn spawn_task<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let life = lock(&self.life);
        if life.closed {
            return;
        }
        let h = tokio::spawn(fut);
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(h.abort_handle());
    }

    // ----- streams -----

    /// Puts an authenticated stream to work: a reader and a writer task.
    pub(crate) fn attach(
        self: &Arc<Self>,
        stream: Conn,
        slot: u16,
        leftover: BytesMut,
        applied: Applied,
    ) -> Result<PathId, Error> {
        let sock = Arc::new(
            socket2::SockRef::from(stream.tcp())
                .try_clone()
                .map_err(|e| Error::io("duplicating a stream descriptor", e))?,
        );
        let path = self.next_path.fetch_add(1, Ordering::Relaxed);
        let ctl = Arc::new(StreamCtl::default());
        let tls = stream.is_tls();
        let (read_side, write_side) = stream.split();
        let mut streams = lock(&self.streams);
        {
            let life = lock(&self.life);
            if life.closed || life.closing || life.peer_closed {
                return Err(Error::Closed);
            }
        }
        if streams.len() >= self.config.max_streams {
            return Err(Error::Config {
                field: "max_streams",
                reason: format!(
                    "session already has {} streams, the most allowed",
                    streams.len()
                ),
            });
        }
        let reader = tokio::spawn(crate::stream::reader(
            self.clone(),
            path,
            ctl.clone(),
            read_side,
            leftover,
        ));
        let writer = tokio::spawn(crate::stream::writer(
            self.clone(),
            path,
            ctl.clone(),
            write_side,
        ));
        streams.push(StreamEntry {
            path,
            slot,
            ctl,
            sock: sock.clone(),
            congestion: applied.congestion.clone(),
            tasks: vec![reader.abort_handle(), writer.abort_handle()],
        });
        let n = streams.len();
        drop(streams);
        let rate = self.per_stream_pacing(n);
        if let Some(rate) = rate {
            let _ = sockopt::set_max_pacing_rate(std::os::fd::AsRawFd::as_raw_fd(&*sock), rate);
        }
        // A new stream may be the only one; make sure the peer hears our state.
        self.request_ack();
        self.tx_wake.notify_one();
        self.streams_changed.notify_waiters();
        debug!(session = %hex(&self.session_id), path, slot, streams = n, tls, congestion = %applied.congestion, "stream attached");
        Ok(path)
    }

    pub(crate) fn per_stream_pacing(&self, n: usize) -> Option<u64> {
        let rate = self.pacing_rate.load(Ordering::Relaxed);
        let probing = self.probing.load(Ordering::Acquire) > 0;
        (self.config.pacing && rate > 0 && n > 0 && !probing).then(|| (rate / n as u64).max(1))
    }

    pub(crate) fn stream_count(&self) -> usize {
        lock(&self.streams).len()
    }

    /// A stream's reader or writer ended. `graceful`: it was removed on purpose (or the
    /// session is closing) and everything it carried arrived; otherwise its unacknowledged
    /// chunks go out again on the others, and the client dials a replacement.
    pub(crate) fn stream_ended(self: &Arc<Self>, path: PathId, graceful: bool, why: &str) {
        let entry = {
            let mut streams = lock(&self.streams);
            let Some(pos) = streams.iter().position(|e| e.path == path) else {
                return;
            };
            streams.swap_remove(pos)
        };
        for t in &entry.tasks {
            t.abort();
        }
        let _ = sockopt::shutdown_fd(&*entry.sock);
        let (closing, closed) = {
            let life = lock(&self.life);
            (
                life.closing || life.peer_closed,
                life.closed || life.fatal.is_some(),
            )
        };
        let left = self.stream_count();
        self.streams_changed.notify_waiters();
        if closed {
            return;
        }
        if graceful || closing {
            debug!(session = %hex(&self.session_id), path, streams = left, why, "stream closed");
            return;
        }
        let requeued = lock(&self.tx).sb.requeue_path(path);
        info!(
            session = %hex(&self.session_id), path, slot = entry.slot, requeued, streams = left, why,
            "stream died; its unacknowledged chunks go out on the others"
        );
        // Control frames written to the dead stream may be lost: send the state again.
        self.request_ack();
        self.tx_wake.notify_one();
        match self.role {
            Role::Client { addr } => {
                let me = self.clone();
                let slot = entry.slot;
                self.spawn_task(async move { crate::handshake::redial(me, addr, slot).await });
            }
            Role::Server if left == 0 => {
                let me = self.clone();
                self.spawn_task(async move { me.orphan_watchdog().await });
            }
            Role::Server => {}
        }
    }

    /// The server side cannot dial: if no stream returns in time, the session fails.
    async fn orphan_watchdog(self: Arc<Self>) {
        let limit = self.config.reconnect_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.streams_changed.notified();
            if self.stream_count() > 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                if self.stream_count() == 0 {
                    self.fail(Fatal::Timeout {
                        what: "waiting for the client to re-dial a stream",
                        after: limit,
                    });
                }
                return;
            }
        }
    }

    /// Dials one more stream (client side), for the tuner.
    pub(crate) async fn grow(self: Arc<Self>) {
        let Role::Client { addr } = self.role else {
            return;
        };
        let Some(slot) = self.free_slot() else {
            return;
        };
        let dialled = crate::handshake::dial(
            addr,
            &self.config,
            self.client_tls.as_ref(),
            Some(self.session_id),
            slot,
        );
        match dialled.await {
            Ok(a) => {
                if let Err(e) = self.attach(a.stream, slot, a.leftover, a.applied) {
                    debug!(slot, error = %e, "added stream not attached");
                }
            }
            Err(e) => warn!(slot, error = %e, "adding a stream failed"),
        }
    }

    /// Removes the highest-slot stream gracefully, for the tuner. Never the last one.
    pub(crate) fn shrink(&self) {
        let streams = lock(&self.streams);
        let live: Vec<_> = streams.iter().filter(|e| !e.ctl.stopping()).collect();
        if live.len() <= 1 {
            return;
        }
        if let Some(e) = live.iter().max_by_key(|e| e.slot) {
            e.ctl.request_stop();
        }
    }

    /// The lowest slot no live stream uses.
    pub(crate) fn free_slot(&self) -> Option<u16> {
        let streams = lock(&self.streams);
        (0..self.config.max_streams as u16).find(|s| streams.iter().all(|e| e.slot != *s))
    }

    pub(crate) fn stream_stats(&self) -> Vec<StreamStats> {
        let streams = lock(&self.streams);
        let mut out: Vec<StreamStats> = streams
            .iter()
            .map(|e| StreamStats {
                path: e.path,
                slot: e.slot,
                bytes_sent: e.ctl.bytes_sent.load(Ordering::Relaxed),
                bytes_received: e.ctl.bytes_received.load(Ordering::Relaxed),
                chunks_sent: e.ctl.chunks_sent.load(Ordering::Relaxed),
                chunks_received: e.ctl.chunks_received.load(Ordering::Relaxed),
                congestion: e.congestion.clone(),
                tcp_info: *lock(&e.ctl.info),
            })
            .collect();
        out.sort_by_key(|s| s.slot);
        out
    }

    pub(crate) fn buffer_stats(&self) -> BufferStats {
        let (send_queued, send_unacked, send_peak) = {
            let tx = lock(&self.tx);
            (tx.sb.queued_bytes(), tx.sb.unacked_bytes(), tx.peak)
        };
        let rx = lock(&self.rx);
        BufferStats {
            send_queued,
            send_unacked,
            send_peak,
            recv_buffered: rx.reasm.buffered_bytes(),
            recv_peak: rx.peak,
            receive_window: self.config.receive_window,
            duplicates: rx.reasm.duplicates(),
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}
