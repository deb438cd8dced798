//! One session's driver state: amst-core's sans-IO [`Session`] behind a lock, the wake-ups
//! of the tasks that drive it, and the registry of live streams with their sockets.
//!
//! Locks are `std::sync::Mutex`, held for a few bookkeeping operations and never across an
//! `await`. The protocol (acks, credit, pings, parting, the fatal latch) is all in `proto`;
//! this file only turns its events into wake-ups, tasks and socket calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amst_core::codec::{Limits, SessionId};
pub(crate) use amst_core::session::Fatal;
use amst_core::session::{Event, Session, SessionConfig};
use amst_core::{AckCounter, Error, PathId};
use bytes::BytesMut;
use socket2::Socket;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::config::TcpConfig;
use crate::conn::Conn;
use crate::sockopt::{self, Applied};
use crate::stats::{BufferStats, StreamCtl, StreamStats};

/// Which side of the session we are; only the client dials streams.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    Client { addr: SocketAddr },
    Server,
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
    /// The session protocol itself.
    pub proto: Mutex<Session>,
    /// Writers wait here for chunks or control frames.
    pub tx_wake: Notify,
    /// `send` waits here for queue space.
    pub space: Notify,
    /// `flush` waits here for acks.
    pub acked: Notify,
    /// Messages the peer acknowledged, for `Transport::acked` subscribers.
    pub acked_messages: AckCounter,
    /// `recv` waits here for messages.
    pub rx_wake: Notify,
    /// Tells the monitor that the protocol's next timeout moved earlier.
    pub timer: Notify,
    pub streams: Mutex<Vec<StreamEntry>>,
    pub streams_changed: Notify,
    pub next_path: AtomicU32,
    /// Stream count the client aims for (adaptive tuning, add/remove_stream).
    pub target_streams: AtomicUsize,
    pub chunk_size: AtomicUsize,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub tasks: Mutex<Vec<AbortHandle>>,
    pub pings: Mutex<HashMap<u64, oneshot::Sender<Instant>>>,
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
    /// The session failed locally: readers drop what still comes (a lock-free copy of the
    /// protocol's latch, read on every read).
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
const ACK_DELAY: Duration = Duration::from_millis(1);

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
        let proto = Session::new(
            SessionConfig {
                max_message: config.max_message,
                receive_window: config.receive_window,
                ack_delay: ACK_DELAY,
                idle_timeout: config.idle_timeout,
                stall_timeout: config.stall_timeout,
            },
            config.memory_budget.clone(),
            Instant::now(),
        );
        let shared = Arc::new(Shared {
            target_streams: AtomicUsize::new(config.streams),
            chunk_size: AtomicUsize::new(config.chunk_size),
            proto: Mutex::new(proto),
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
            timer: Notify::new(),
            streams: Mutex::new(Vec::new()),
            streams_changed: Notify::new(),
            next_path: AtomicU32::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
            pings: Mutex::new(HashMap::new()),
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
            failed: AtomicBool::new(false),
        });
        let monitor = tokio::spawn(crate::monitor::run(shared.clone()));
        lock(&shared.tasks).push(monitor.abort_handle());
        shared
    }

    // ----- driving the protocol -----

    /// Runs `f` on the protocol, then acts on what it asks: wakes a writer if something can
    /// be sent, the monitor if its timeout moved, and handles the events it raised.
    pub(crate) fn update<R>(self: &Arc<Self>, f: impl FnOnce(&mut Session) -> R) -> R {
        let mut events = Vec::new();
        let (r, transmit, timer) = {
            let mut p = lock(&self.proto);
            let r = f(&mut p);
            while let Some(e) = p.poll_event() {
                events.push(e);
            }
            (r, p.wants_transmit(), p.take_timeout_moved())
        };
        if transmit {
            self.tx_wake.notify_last();
        }
        if timer {
            self.timer.notify_one();
        }
        for e in events {
            self.on_event(e);
        }
        r
    }

    fn on_event(self: &Arc<Self>, event: Event) {
        match event {
            Event::Readable => self.rx_wake.notify_waiters(),
            Event::Acked { messages } => {
                self.acked_messages.advance_to(messages);
                self.acked.notify_waiters();
                self.space.notify_waiters();
            }
            Event::Pong { id } => {
                if let Some(tx) = lock(&self.pings).remove(&id) {
                    let _ = tx.send(Instant::now());
                }
            }
            Event::PathStopped { path } => {
                // The peer removes this stream: answer in kind once our writer is done.
                if let Some(e) = lock(&self.streams).iter().find(|e| e.path == path) {
                    e.ctl.mark_stopping();
                }
            }
            Event::Closed => {
                let socks: Vec<_> = lock(&self.streams).iter().map(|e| e.sock.clone()).collect();
                debug!(session = %hex(&self.session_id), "peer closed the session");
                // Nothing more will be sent either way: half-close so its readers end.
                for s in socks {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
                self.wake_all();
            }
            Event::Failed(fatal) => self.on_failed(fatal),
        }
    }

    /// Fails the session (the first failure latches; see `on_failed`).
    pub(crate) fn fail(self: &Arc<Self>, fatal: Fatal) {
        self.update(|p| p.fail(fatal));
    }

    /// The session failed: tell the peer (best effort), stop every task and wake every
    /// waiter, who will report it.
    fn on_failed(self: &Arc<Self>, fatal: Fatal) {
        warn!(session = %hex(&self.session_id), error = %fatal.to_error(), "session failed");
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

    /// Aborts every task and shuts every stream. Idempotent.
    pub(crate) fn teardown(&self) {
        // Closed first, then the streams (never both locks at once): `attach` checks closed
        // under the streams lock, so a stream it adds is either refused or drained here.
        lock(&self.proto).set_closed();
        let entries: Vec<StreamEntry> = lock(&self.streams).drain(..).collect();
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
        let p = lock(&self.proto);
        if p.is_closed() {
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
            let p = lock(&self.proto);
            if p.is_closed() || p.is_closing() || p.is_peer_closed() {
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
        // The handshake's RTT until the monitor's first sample: it decides whether the
        // session's first chunk is small (a long path's slow start).
        let rtt = lock(&self.proto)
            .srtt()
            .is_none()
            .then(|| sockopt::tcp_info(std::os::fd::AsRawFd::as_raw_fd(&*sock)).ok())
            .flatten()
            .map(|i| i.rtt)
            .filter(|r| !r.is_zero());
        // A new stream may be the only one; the peer hears our state on it.
        self.update(|p| {
            p.add_path(path);
            if p.srtt().is_none() && rtt.is_some() {
                p.set_srtt(rtt);
            }
        });
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
            let p = lock(&self.proto);
            (
                p.is_closing() || p.is_peer_closed(),
                p.is_closed() || p.fatal().is_some(),
            )
        };
        // Unless graceful or ending, its unacknowledged chunks go out again on the others,
        // and our state with them (control frames written to it may be lost).
        let requeued = self.update(|p| p.path_ended(path, graceful));
        let left = self.stream_count();
        self.streams_changed.notify_waiters();
        if closed {
            return;
        }
        if graceful || closing {
            debug!(session = %hex(&self.session_id), path, streams = left, why, "stream closed");
            return;
        }
        info!(
            session = %hex(&self.session_id), path, slot = entry.slot, requeued, streams = left, why,
            "stream died; its unacknowledged chunks go out on the others"
        );
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
            None,
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
    pub(crate) fn shrink(self: &Arc<Self>) {
        let path = {
            let streams = lock(&self.streams);
            let live: Vec<_> = streams.iter().filter(|e| !e.ctl.stopping()).collect();
            if live.len() <= 1 {
                return;
            }
            live.iter().max_by_key(|e| e.slot).map(|e| e.path)
        };
        if let Some(path) = path {
            self.stop_stream(path);
        }
    }

    /// Ends a stream gracefully: its writer stops taking chunks, sends Close(StreamClosed)
    /// and half-closes; nothing is resent.
    pub(crate) fn stop_stream(self: &Arc<Self>, path: PathId) {
        self.update(|p| p.stop_path(path));
        if let Some(e) = lock(&self.streams).iter().find(|e| e.path == path) {
            e.ctl.mark_stopping();
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
        let b = lock(&self.proto).buffers();
        BufferStats {
            send_queued: b.send_queued,
            send_unacked: b.send_unacked,
            send_peak: b.send_peak,
            recv_buffered: b.recv_buffered,
            recv_peak: b.recv_peak,
            receive_window: self.config.receive_window,
            duplicates: b.duplicates,
        }
    }
}
