//! `TcpTransport`: the public handle of one session, and its `Transport` implementation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amst_core::codec::{Close, CloseCode, SessionId};
use amst_core::{
    AckWatch, BoxFuture, Error, PathSample, Result, Transport, TransportKind, TransportMetrics,
};
use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::config::TcpConfig;
use crate::handshake;
use crate::session::{Role, Shared, hex, lock};
use crate::sockopt;
use crate::stats::{BufferStats, StreamStats};

/// One AMST session over N TCP streams. Cheap to share: wrap it in an `Arc` (it is
/// `Send + Sync`, and works as `Arc<dyn Transport>`). Dropping it tears the session down.
#[derive(Debug)]
pub struct TcpTransport {
    shared: Arc<Shared>,
}

/// Longest wait for the peer's FIN after a graceful close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Longest wait for a probe's answers.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest padding per probe Ping (the decoder's default limit).
const PROBE_PADDING: u64 = 64 << 10;

impl TcpTransport {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        TcpTransport { shared }
    }

    /// Opens a session: dials and authenticates the first stream, then the other
    /// `config.streams - 1` in parallel, and returns once they are up or once twice as long
    /// as the first took (at least 250 ms) has passed; stragglers attach in the background.
    /// Streams that fail beyond the first are logged and re-dialled in the background.
    pub async fn connect(addr: SocketAddr, config: TcpConfig) -> Result<Self> {
        config.validate()?;
        let tls = config.tls.as_ref().map(crate::tls::client).transpose()?;
        let began = Instant::now();
        let n = config.streams;
        // Once the server has answered the first stream's SYN, the other streams connect
        // (TCP, and TLS when it is on) while the first one authenticates, and join the
        // session once the server has it: on a long path each then joins one round trip
        // after the first instead of three (the session started 0.8 s after connect on the
        // 100 ms benchmark link, with 8 streams and TLS).
        let first_tcp = handshake::connect_tcp_within(addr, &config).await?;
        let (go, joining) = tokio::sync::watch::channel(None::<SessionId>);
        let mut dials = tokio::task::JoinSet::new();
        for slot in 1..n as u16 {
            let config = config.clone();
            let tls = tls.clone();
            let mut joining = joining.clone();
            dials.spawn(async move {
                let joined = async {
                    let opened = handshake::open(addr, &config, tls.as_ref()).await?;
                    let Ok(id) = joining.wait_for(Option::is_some).await.map(|id| *id) else {
                        return Err(Error::Closed);
                    };
                    handshake::authenticate(opened, &config, id, slot).await
                };
                (slot, joined.await)
            });
        }
        drop(joining);
        let first = handshake::dial(addr, Some(first_tcp), &config, tls.as_ref(), None, 0).await?;
        let first_took = began.elapsed();
        let id = first.established.session_id;
        let shared = Shared::new(config, tls, Role::Client { addr }, id);
        let transport = TcpTransport {
            shared: shared.clone(),
        };
        shared.attach(first.stream, 0, first.leftover, first.applied)?;
        // The server registers the session before its first frame (the initial credit):
        // until we hear it, the other streams' Hellos could name a session it does not know.
        let heard_by = Instant::now() + shared.config.handshake_timeout;
        while Instant::now() < heard_by {
            {
                let p = lock(&shared.proto);
                if p.heard() || p.fatal().is_some() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = go.send(Some(id));
        // On a lossy long path one of eight handshakes often loses a SYN and waits out the
        // kernel's one-second retransmission timer (connect took 0.7-1.7 s on the 100 ms, 1%
        // loss benchmark link): the session starts on the streams it has by then.
        let patience = (first_took * 2).max(Duration::from_millis(250));
        let until = tokio::time::Instant::now() + patience;
        loop {
            match tokio::time::timeout_at(until, dials.join_next()).await {
                Ok(Some(res)) => attach_dialed(&shared, addr, res),
                Ok(None) => break,
                Err(_) => {
                    debug!(
                        session = %hex(&id),
                        pending = dials.len(),
                        ?patience,
                        "starting before every stream is up; the rest attach as they come"
                    );
                    let me = shared.clone();
                    shared.spawn_task(async move {
                        while let Some(res) = dials.join_next().await {
                            attach_dialed(&me, addr, res);
                        }
                    });
                    break;
                }
            }
        }
        info!(session = %hex(&id), %addr, streams = shared.stream_count(), "connected");
        Ok(transport)
    }

    /// The session's 128-bit id.
    pub fn session_id(&self) -> SessionId {
        self.shared.session_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &TcpConfig {
        &self.shared.config
    }

    /// A snapshot of every live stream, ordered by slot.
    pub fn stream_stats(&self) -> Vec<StreamStats> {
        self.shared.stream_stats()
    }

    /// The memory held for messages, with peaks.
    pub fn buffer_stats(&self) -> BufferStats {
        self.shared.buffer_stats()
    }

    /// The chunk size writers use now.
    pub fn chunk_size(&self) -> usize {
        self.shared.chunk_size.load(Ordering::Relaxed)
    }

    /// Sets the chunk size (1 byte to 4 MiB); the adaptive tuner may change it later.
    pub fn set_chunk_size(&self, bytes: usize) -> Result<()> {
        if !(1..=(4 << 20)).contains(&bytes) {
            return Err(Error::Config {
                field: "chunk_size",
                reason: format!("is {bytes}; must be 1..=4 MiB"),
            });
        }
        self.shared.chunk_size.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The aggregate pacing rate the model set, bytes/s, if pacing is on and a model exists.
    pub fn pacing_rate(&self) -> Option<u64> {
        let r = self.shared.pacing_rate.load(Ordering::Relaxed);
        (self.shared.config.pacing && r > 0).then_some(r)
    }

    /// Dials one more stream into the session (client side only).
    pub async fn add_stream(&self) -> Result<()> {
        let Role::Client { addr } = self.shared.role else {
            return Err(Error::Unavailable {
                transport: TransportKind::Tcp,
                reason: "only the connecting side can add streams".into(),
            });
        };
        let slot = self.shared.free_slot().ok_or_else(|| Error::Config {
            field: "max_streams",
            reason: format!("all {} slots are in use", self.shared.config.max_streams),
        })?;
        self.shared.target_streams.fetch_add(1, Ordering::Relaxed);
        let res = handshake::dial(
            addr,
            None,
            &self.shared.config,
            self.shared.client_tls.as_ref(),
            Some(self.shared.session_id),
            slot,
        )
        .await
        .and_then(|a| self.shared.attach(a.stream, slot, a.leftover, a.applied));
        if res.is_err() {
            self.shared.target_streams.fetch_sub(1, Ordering::Relaxed);
        }
        res.map(|_| ())
    }

    /// Removes one stream gracefully: its writer stops taking chunks, tells the peer and
    /// half-closes; nothing is resent. Refuses to remove the last stream.
    pub async fn remove_stream(&self) -> Result<()> {
        let path = {
            let streams = lock(&self.shared.streams);
            if streams.len() <= 1 {
                return Err(Error::Config {
                    field: "streams",
                    reason: "cannot remove the last stream of a session".into(),
                });
            }
            let e = streams
                .iter()
                .filter(|e| !e.ctl.stopping())
                .max_by_key(|e| e.slot)
                .ok_or_else(|| Error::Config {
                    field: "streams",
                    reason: "every stream is already being removed".into(),
                })?;
            e.path
        };
        let _ =
            self.shared
                .target_streams
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.saturating_sub(1).max(1))
                });
        self.shared.stop_stream(path);
        Ok(())
    }

    /// Test hook: `shutdown(2)` the sockets of the first `n` streams, as if the network
    /// killed them. Returns how many were shut.
    #[doc(hidden)]
    pub fn fault_shutdown_streams(&self, n: usize) -> usize {
        let socks: Vec<_> = lock(&self.shared.streams)
            .iter()
            .take(n)
            .map(|e| e.sock.clone())
            .collect();
        for s in &socks {
            let _ = sockopt::shutdown_fd(&**s);
        }
        socks.len()
    }

    fn check_can_send(&self) -> Result<()> {
        lock(&self.shared.proto).check_can_send()
    }

    async fn send_inner(&self, header: Bytes, payload: Bytes) -> Result<()> {
        let s = &self.shared;
        let len = (header.len() + payload.len()) as u64;
        if len > s.config.max_message {
            return Err(Error::MessageTooLarge {
                len,
                limit: s.config.max_message,
            });
        }
        let mut message = Some((header, payload));
        loop {
            let space = s.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut p = lock(&s.proto);
                p.check_can_send()?;
                let queued = p.send_buffer().queued_bytes();
                if queued == 0 || queued + len <= s.config.send_queue {
                    if let Some((h, m)) = message.take() {
                        p.push_parts(h, m, Instant::now())?;
                    }
                    drop(p);
                    s.tx_wake.notify_last();
                    return Ok(());
                }
            }
            space.await;
        }
    }

    async fn flush_inner(&self) -> Result<()> {
        let s = &self.shared;
        let target = lock(&s.proto).send_buffer().messages_sent();
        loop {
            let acked = s.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            {
                let p = lock(&s.proto);
                if p.send_buffer().messages_acked() >= target {
                    return Ok(());
                }
                if let Some(f) = p.fatal() {
                    return Err(f.to_error());
                }
                if p.is_peer_closed() {
                    return Err(peer_closed());
                }
                if p.is_closed() {
                    return Err(Error::Closed);
                }
            }
            acked.await;
        }
    }

    async fn recv_inner(&self) -> Result<Option<Bytes>> {
        let s = &self.shared;
        loop {
            let woken = s.rx_wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // Some(answer), or None to wait.
            let got = s.update(|p| {
                if let Some(m) = p.read(Instant::now()) {
                    return Some(Ok(Some(m)));
                }
                if let Some(f) = p.fatal() {
                    return Some(Err(f.to_error()));
                }
                (p.is_peer_closed() || p.is_closed()).then_some(Ok(None))
            });
            if let Some(answer) = got {
                return answer;
            }
            woken.await;
        }
    }

    async fn close_inner(&self) -> Result<()> {
        let s = &self.shared;
        {
            let p = lock(&s.proto);
            if p.is_closed() && p.fatal().is_none() {
                return Ok(());
            }
        }
        let flushed = self.flush_inner().await;
        let peer_gone = {
            let mut p = lock(&s.proto);
            p.close(None);
            p.is_peer_closed() || p.is_closed()
        };
        if !peer_gone && flushed.is_ok() {
            say_goodbye(s, Close::new(CloseCode::Normal, "done")).await;
        }
        s.teardown();
        flushed
    }

    async fn probe_inner(&self, burst_bytes: u64) -> Result<PathSample> {
        self.check_can_send()?;
        let s = &self.shared;
        // Registers the answer's channel before the Ping can go out.
        let ping = |padding: u32, probe: bool| {
            let (tx, rx) = oneshot::channel();
            let mut pings = lock(&s.pings);
            let id = lock(&s.proto).ping(padding, probe, Instant::now());
            pings.insert(id, tx);
            rx
        };
        let wait = |rx: oneshot::Receiver<Instant>| async move {
            match tokio::time::timeout(PROBE_TIMEOUT, rx).await {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => Err(Error::Timeout {
                    what: "waiting for a probe Pong",
                    after: PROBE_TIMEOUT,
                }),
            }
        };
        // Ping and Pong frames: 5 header + 16 fields each.
        const FRAME: u64 = 21;
        let sent = Instant::now();
        let rx = ping(0, false);
        s.tx_wake.notify_one();
        let rtt = wait(rx).await?.saturating_duration_since(sent);
        let mut used = 2 * FRAME;
        let mut delivery_rate = None;
        if burst_bytes > 0 {
            let _unpaced = Unpaced::new(s);
            let mut left = burst_bytes;
            let mut pending = Vec::new();
            let mut sizes = Vec::new();
            let start = Instant::now();
            while left > 0 {
                let pad = left.min(PROBE_PADDING);
                left -= pad;
                // Free writers take it a slice at a time: the train spreads over the streams.
                let rx = ping(pad as u32, true);
                pending.push(rx);
                sizes.push(pad + FRAME);
            }
            s.tx_wake.notify_waiters();
            let mut times = Vec::with_capacity(pending.len());
            for rx in pending {
                times.push(wait(rx).await?);
            }
            used += sizes.iter().sum::<u64>() + FRAME * sizes.len() as u64;
            let first = *times.iter().min().unwrap_or(&start);
            let last = *times.iter().max().unwrap_or(&first);
            // Both estimate how long the train took to arrive at the receiver (each Pong
            // leaves it when its Ping has arrived whole). The answers' dispersion misses
            // the first Ping and shrinks when the receiver answers a batch of Pings read
            // together; the whole exchange minus one RTT counts the sender's queueing and
            // shrinks when the RTT was overestimated. The longer span is the safer: a
            // train never reads faster than it arrived.
            let spread = last.saturating_duration_since(first);
            let whole = last.saturating_duration_since(start).saturating_sub(rtt);
            let total: u64 = sizes.iter().sum();
            let after_first: u64 = sizes[1..].iter().sum();
            let by_spread = (spread >= Duration::from_micros(50))
                .then(|| after_first as f64 / spread.as_secs_f64());
            let by_whole = total as f64 / whole.max(Duration::from_micros(10)).as_secs_f64();
            delivery_rate = Some(by_spread.map_or(by_whole, |r| r.min(by_whole)) as u64);
        }
        Ok(PathSample {
            rtt,
            delivery_rate,
            bytes_used: used,
        })
    }
}

/// Lifts the pacing model's cap on every stream while a probe train runs, so that the
/// train measures the path and not the model's current rate (an idle session's model may
/// be far below the path); restores the cap when the last train ends, even if the probe
/// was cancelled. Kernel congestion control still governs the train.
struct Unpaced<'a> {
    shared: &'a Shared,
}

impl<'a> Unpaced<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.probing.fetch_add(1, Ordering::AcqRel);
        if shared.config.pacing {
            set_stream_pacing(shared, u64::MAX);
        }
        Unpaced { shared }
    }
}

impl Drop for Unpaced<'_> {
    fn drop(&mut self) {
        let s = self.shared;
        if s.probing.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A cancelled probe's train goes no further.
            lock(&s.proto).clear_probes();
            if let Some(per) = s.per_stream_pacing(s.stream_count()) {
                set_stream_pacing(s, per);
            }
        }
    }
}

/// Attaches a stream dialled at connect, or re-dials its slot in the background if the
/// dial or the attach failed.
fn attach_dialed(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    res: std::result::Result<(u16, Result<handshake::Authenticated>), tokio::task::JoinError>,
) {
    let Ok((slot, res)) = res else { return };
    if let Err(e) = res.and_then(|a| shared.attach(a.stream, slot, a.leftover, a.applied)) {
        warn!(slot, error = %e, "extra stream failed at connect; re-dialling");
        let me = shared.clone();
        shared.spawn_task(async move { handshake::redial(me, addr, slot).await });
    }
}

fn set_stream_pacing(s: &Shared, per_stream: u64) {
    use std::os::fd::AsRawFd;
    for e in lock(&s.streams).iter() {
        if let Err(e) = sockopt::set_max_pacing_rate(e.sock.as_raw_fd(), per_stream) {
            warn!(error = %e, "SO_MAX_PACING_RATE refused");
        }
    }
}

use amst_core::session::peer_closed;

impl Transport for TcpTransport {
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.send_inner(Bytes::new(), message))
    }

    fn send_parts(&self, header: Bytes, payload: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.send_inner(header, payload))
    }

    fn acked(&self) -> AckWatch {
        self.shared.acked_messages.watch()
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.flush_inner())
    }

    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>>> {
        Box::pin(self.recv_inner())
    }

    fn metrics(&self) -> TransportMetrics {
        let s = &self.shared;
        let mut m = TransportMetrics::new(TransportKind::Tcp);
        m.bytes_sent = s.bytes_sent.load(Ordering::Relaxed);
        m.bytes_received = s.bytes_received.load(Ordering::Relaxed);
        {
            let p = lock(&s.proto);
            let sb = p.send_buffer();
            m.messages_sent = sb.messages_sent();
            m.messages_acked = sb.messages_acked();
            m.chunks_retransmitted = sb.retransmissions();
            m.credit_window = Some(sb.credit_limit().saturating_sub(sb.cumulative_acked()));
            let rx = p.reassembler();
            m.messages_received = rx.delivered_messages();
            m.receive_held_bytes = Some(rx.buffered_bytes());
        }
        let us = |a: &std::sync::atomic::AtomicU64| {
            let v = a.load(Ordering::Relaxed);
            (v > 0).then(|| Duration::from_micros(v))
        };
        m.rtt = us(&s.srtt_us);
        m.min_rtt = us(&s.min_rtt_us);
        let rate = s.delivery_rate.load(Ordering::Relaxed);
        m.delivery_rate = (rate > 0).then_some(rate);
        m.active_streams = s.stream_count();
        // Sampled by the monitor, so that this stays a few loads: the hybrid ack pump calls
        // it every millisecond.
        let kernel_cwnd = s.kernel_cwnd.load(Ordering::Relaxed);
        if kernel_cwnd > 0 {
            m.retransmitted_bytes = Some(s.kernel_bytes_retrans.load(Ordering::Relaxed));
            m.lost_outstanding = Some(s.kernel_lost.load(Ordering::Relaxed));
        }
        // The aggregate BBR model when pacing runs; otherwise the kernel's own windows.
        let model = s.model_cwnd.load(Ordering::Relaxed);
        m.cwnd = [model, kernel_cwnd].into_iter().find(|&w| w > 0);
        m.pacing_rate = self.pacing_rate();
        m.chunk_size = Some(s.chunk_size.load(Ordering::Relaxed) as u64);
        m
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.close_inner())
    }

    fn probe(&self, burst_bytes: u64) -> BoxFuture<'_, Result<PathSample>> {
        Box::pin(self.probe_inner(burst_bytes))
    }
}

/// Sends `close` on every stream, each then half-closed, and waits (up to `CLOSE_LINGER`)
/// for the peer's FIN on each, so that closing our sockets cannot reset data the peer has
/// not read yet, our Close included. On every stream, because the peer reads its streams
/// in any order: one that saw only a FIN would look lost and be re-dialled.
async fn say_goodbye(s: &Shared, close: Close) {
    lock(&s.proto).close(Some(close));
    s.tx_wake.notify_waiters();
    for e in lock(&s.streams).iter() {
        e.ctl.wake.notify_one();
    }
    s.streams_gone_within(CLOSE_LINGER).await;
}

impl Drop for TcpTransport {
    /// A session dropped without `close` still tells the peer, so that the peer ends it
    /// rather than re-dialling streams that vanished: Close(Normal) when everything sent was
    /// acknowledged, Close(Aborted) otherwise. Then, or at once outside a tokio runtime, the
    /// session is torn down.
    fn drop(&mut self) {
        let s = self.shared.clone();
        let live = {
            let mut p = lock(&s.proto);
            let live =
                !(p.is_closed() || p.is_closing() || p.is_peer_closed() || p.fatal().is_some());
            p.close(None);
            live
        };
        let runtime = tokio::runtime::Handle::try_current();
        let (Ok(runtime), true) = (runtime, live) else {
            s.teardown();
            return;
        };
        let unacked = {
            let p = lock(&s.proto);
            p.send_buffer().queued_bytes() + p.send_buffer().unacked_bytes()
        };
        let close = if unacked == 0 {
            Close::new(CloseCode::Normal, "the session was dropped")
        } else {
            Close::new(
                CloseCode::Aborted,
                format!("the session was dropped with {unacked} bytes not yet acknowledged"),
            )
        };
        runtime.spawn(async move {
            say_goodbye(&s, close).await;
            s.teardown();
        });
    }
}
