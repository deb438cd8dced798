//! One authenticated QUIC connection carrying AMST messages both ways: the shared state and
//! the tasks that move chunks, acks and probes.
//!
//! Data goes on unidirectional streams as amst-core Data frames; the control stream (the
//! bidirectional one the PSK handshake used) carries Ack and Credit frames; Ping and Pong go
//! in QUIC DATAGRAM frames. QUIC already retransmits, so amst-core's `SendBuffer` is used for
//! chunking, credit and the application-level acknowledgement that makes `messages_acked`
//! truthful, and its chunks are never requeued within one connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amst_core::codec::{CloseCode, Decoder, Frame, Limits, Ping, Pong};
use amst_core::{
    AckCounter, Error, PathSample, ProtocolError, Reassembler, ReassemblyConfig, Result,
    SendBuffer, TransportKind, TransportMetrics,
};
use bytes::{Bytes, BytesMut};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{Notify, oneshot};

use crate::config::{SharedConfig, StreamMapping};

/// Why the session can no longer carry data; the first one recorded wins.
#[derive(Clone, Debug)]
pub(crate) enum Failure {
    Protocol(ProtocolError),
    PeerClosed(CloseCode, String),
    Lost(String),
    Closed,
}

impl Failure {
    pub(crate) fn to_error(&self) -> Error {
        match self {
            Failure::Protocol(p) => Error::Protocol(p.clone()),
            Failure::PeerClosed(code, reason) => Error::PeerClosed {
                code: *code,
                reason: reason.clone(),
            },
            Failure::Lost(why) => Error::io(
                "QUIC connection lost",
                io::Error::new(io::ErrorKind::ConnectionAborted, why.clone()),
            ),
            Failure::Closed => Error::Closed,
        }
    }

    fn from_connection(e: &ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(ac) => Failure::PeerClosed(
                CloseCode::from_u16(u16::try_from(ac.error_code.into_inner()).unwrap_or(u16::MAX)),
                String::from_utf8_lossy(&ac.reason).into_owned(),
            ),
            ConnectionError::LocallyClosed => Failure::Closed,
            other => Failure::Lost(other.to_string()),
        }
    }
}

/// Maps a QUIC error met while reading to AMST's error.
pub(crate) fn connection_error(e: &ConnectionError) -> Error {
    Failure::from_connection(e).to_error()
}

pub(crate) fn close_code(code: CloseCode) -> VarInt {
    VarInt::from_u32(u32::from(code.to_u16()))
}

/// What can go wrong reading frames from a stream.
#[derive(Debug)]
pub(crate) enum ReadFail {
    Protocol(ProtocolError),
    Stream(quinn::ReadError),
}

impl ReadFail {
    pub(crate) fn into_error(self) -> Error {
        match self {
            ReadFail::Protocol(p) => Error::Protocol(p),
            ReadFail::Stream(quinn::ReadError::ConnectionLost(e)) => connection_error(&e),
            ReadFail::Stream(e) => Error::io(
                "reading a QUIC stream",
                io::Error::new(io::ErrorKind::ConnectionAborted, e),
            ),
        }
    }
}

/// Frames off one QUIC receive stream.
#[derive(Debug)]
pub(crate) struct FrameReader {
    stream: RecvStream,
    buf: BytesMut,
    decoder: Decoder,
}

impl FrameReader {
    pub(crate) fn new(stream: RecvStream, limits: Limits) -> Self {
        FrameReader {
            stream,
            buf: BytesMut::new(),
            decoder: Decoder::new(limits),
        }
    }

    /// The next frame, or `None` when the stream ended cleanly between frames.
    pub(crate) async fn next(&mut self) -> std::result::Result<Option<Frame>, ReadFail> {
        loop {
            if let Some(f) = self
                .decoder
                .decode(&mut self.buf)
                .map_err(ReadFail::Protocol)?
            {
                return Ok(Some(f));
            }
            if let Some(need) = self
                .decoder
                .frame_len(&self.buf)
                .map_err(ReadFail::Protocol)?
            {
                // Validated against the limits, so this reserve is bounded.
                self.buf.reserve(need.saturating_sub(self.buf.len()));
            }
            match self.stream.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return self
                        .decoder
                        .decode_eof(&mut self.buf)
                        .map_err(ReadFail::Protocol);
                }
                Err(e) => return Err(ReadFail::Stream(e)),
            }
        }
    }
}

use amst_core::util::lock;

/// Waits until `check` returns `Some`, re-checking after every notification. The waiter is
/// registered before the check, so a change between the check and the wait is not missed.
async fn wait_until<T>(notify: &Notify, mut check: impl FnMut() -> Option<T>) -> T {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(v) = check() {
            return v;
        }
        notified.await;
    }
}

#[derive(Debug, Default)]
struct RateEstimate {
    since: Option<(Instant, u64)>,
    rate: Option<u64>,
}

/// Everything the transport's handles and tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) conn: Connection,
    /// The endpoint, when this side created it for one connection (the client).
    pub(crate) endpoint: Option<Endpoint>,
    config: SharedConfig,
    epoch: Instant,
    tx: Mutex<SendBuffer>,
    /// Messages the peer acknowledged, for `Transport::acked` subscribers.
    pub(crate) acked_messages: AckCounter,
    /// Data queued, credit or acks arrived, or the session failed.
    tx_changed: Notify,
    rx: Mutex<Reassembler>,
    /// A message completed, or the session failed.
    rx_changed: Notify,
    /// The acker should send the current Ack and Credit.
    ack_wanted: Notify,
    failure: Mutex<Option<Failure>>,
    closing: AtomicBool,
    control_tx: tokio::sync::Mutex<SendStream>,
    probes: Mutex<HashMap<u64, oneshot::Sender<Instant>>>,
    next_probe: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    active_streams: AtomicUsize,
    rate: Mutex<RateEstimate>,
    limits: Limits,
    /// quinn's path statistics (cwnd, lost packets, lost bytes) and the controller's pacing
    /// rate (bytes/s, 0 when it sets none), sampled at most every `PATH_STATS_PERIOD` because
    /// `metrics` runs every millisecond in amst-hybrid's ack pump.
    path_stats: [AtomicU64; 4],
    path_sampled_ns: AtomicU64,
}

const PATH_STATS_PERIOD: Duration = Duration::from_millis(100);

impl Shared {
    /// Starts the session's tasks on an authenticated connection.
    pub(crate) fn start(
        conn: Connection,
        endpoint: Option<Endpoint>,
        config: SharedConfig,
        control_tx: SendStream,
        control_rx: FrameReader,
    ) -> Arc<Self> {
        let limits = Limits {
            max_message: config.max_message,
            ..Limits::default()
        };
        let reassembly = ReassemblyConfig {
            window: config.window,
            max_message: config.max_message,
            ..ReassemblyConfig::default()
        };
        let shared = Arc::new(Shared {
            conn,
            endpoint,
            epoch: Instant::now(),
            tx: Mutex::new(SendBuffer::new(config.max_message)),
            acked_messages: AckCounter::new(),
            tx_changed: Notify::new(),
            rx: Mutex::new(Reassembler::with_budget(
                reassembly,
                config.memory_budget.clone(),
            )),
            rx_changed: Notify::new(),
            ack_wanted: Notify::new(),
            failure: Mutex::new(None),
            closing: AtomicBool::new(false),
            control_tx: tokio::sync::Mutex::new(control_tx),
            probes: Mutex::new(HashMap::new()),
            next_probe: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            active_streams: AtomicUsize::new(0),
            rate: Mutex::new(RateEstimate::default()),
            limits,
            path_stats: Default::default(),
            path_sampled_ns: AtomicU64::new(0),
            config,
        });
        // Control data should not queue behind bulk data in quinn's scheduler.
        if let Ok(g) = shared.control_tx.try_lock() {
            let _ = g.set_priority(16);
        }
        for lane in 0..shared.config.mapping.lanes() {
            spawn(writer(shared.clone(), lane));
        }
        spawn(accept_data(shared.clone()));
        spawn(control_reader(shared.clone(), control_rx));
        spawn(acker(shared.clone()));
        spawn(datagrams(shared.clone()));
        spawn(monitor(shared.clone()));
        // The first Credit lets the peer start sending.
        shared.ack_wanted.notify_one();
        shared
    }

    fn failure(&self) -> Option<Failure> {
        lock(&self.failure).clone()
    }

    /// Records why the session ended (the first reason wins), closes the connection for a
    /// protocol error, and wakes every waiter.
    pub(crate) fn fail(&self, f: Failure) {
        {
            let mut g = lock(&self.failure);
            if g.is_none() {
                if let Failure::Protocol(p) = &f {
                    tracing::warn!(error = %p, "closing the QUIC session: the peer broke the protocol");
                    self.conn.close(
                        close_code(CloseCode::ProtocolError),
                        p.to_string().as_bytes(),
                    );
                }
                *g = Some(f);
            }
        }
        self.tx_changed.notify_waiters();
        self.rx_changed.notify_waiters();
        self.ack_wanted.notify_one();
        lock(&self.probes).clear();
    }

    /// Queues one message, `header` then `payload`, without joining them.
    pub(crate) async fn send(&self, header: Bytes, payload: Bytes) -> Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let len = (header.len() + payload.len()) as u64;
        if len > self.config.max_message {
            return Err(Error::MessageTooLarge {
                len,
                limit: self.config.max_message,
            });
        }
        let limit = self.config.window.max(u64::from(self.config.max_chunk));
        let mut message = Some((header, payload));
        let r = wait_until(&self.tx_changed, || {
            if let Some(f) = self.failure() {
                return Some(Err(f.to_error()));
            }
            let mut tx = lock(&self.tx);
            let held = tx.queued_bytes() + tx.unacked_bytes();
            // A message larger than the limit still goes when nothing else is held.
            if held == 0 || held + len <= limit {
                let (h, p) = message.take().unwrap_or_default();
                Some(tx.push_parts(h, p).map(drop))
            } else {
                None
            }
        })
        .await;
        self.tx_changed.notify_waiters();
        r
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        let target = lock(&self.tx).messages_sent();
        wait_until(&self.tx_changed, || {
            if lock(&self.tx).messages_acked() >= target {
                return Some(Ok(()));
            }
            self.failure().map(|f| Err(f.to_error()))
        })
        .await
    }

    pub(crate) async fn recv(&self) -> Result<Option<Bytes>> {
        let r = wait_until(&self.rx_changed, || {
            if let Some(m) = lock(&self.rx).pop() {
                return Some(Ok(Some(m)));
            }
            match self.failure()? {
                Failure::PeerClosed(CloseCode::Normal, _) => Some(Ok(None)),
                f => Some(Err(f.to_error())),
            }
        })
        .await;
        // Popping freed window: the peer may have been waiting for this credit.
        self.ack_wanted.notify_one();
        r
    }

    pub(crate) async fn close(&self) -> Result<()> {
        self.closing.store(true, Ordering::Release);
        let drained = self.flush().await;
        self.conn
            .close(close_code(CloseCode::Normal), b"closed by the application");
        self.fail(Failure::Closed);
        if let Some(ep) = &self.endpoint {
            // Lets the CONNECTION_CLOSE reach the peer before the socket goes away.
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        }
        match drained {
            Err(Error::Closed) => Ok(()),
            other => other,
        }
    }

    /// Closes without draining (`abort`, or the handle was dropped).
    pub(crate) fn abort(&self) {
        if self.failure().is_none() {
            self.conn.close(
                close_code(CloseCode::Aborted),
                b"aborted by the application",
            );
        }
        self.fail(Failure::Closed);
    }

    pub(crate) fn metrics(&self) -> TransportMetrics {
        let mut m = TransportMetrics::new(TransportKind::Quic);
        {
            let tx = lock(&self.tx);
            m.messages_sent = tx.messages_sent();
            m.messages_acked = tx.messages_acked();
            m.chunks_retransmitted = tx.retransmissions();
            m.credit_window = Some(tx.credit_limit().saturating_sub(tx.cumulative_acked()));
        }
        {
            let rx = lock(&self.rx);
            m.messages_received = rx.delivered_messages();
            m.receive_held_bytes = Some(rx.buffered_bytes());
        }
        m.bytes_sent = self.bytes_sent.load(Ordering::Relaxed);
        m.bytes_received = self.bytes_received.load(Ordering::Relaxed);
        m.rtt = Some(self.conn.rtt());
        m.min_rtt = Some(self.conn.min_rtt());
        m.delivery_rate = lock(&self.rate).rate;
        m.active_streams = self.active_streams.load(Ordering::Relaxed);
        // quinn's path statistics: amst-cc's window (it is quinn's controller) and losses.
        let now = (self.epoch.elapsed().as_nanos() as u64).max(1);
        let last = self.path_sampled_ns.load(Ordering::Relaxed);
        if last == 0 || now - last.min(now) >= PATH_STATS_PERIOD.as_nanos() as u64 {
            let path = self.conn.stats().path;
            // quinn reports the pacing rate in bits per second.
            let pacing = self.conn.congestion_state().metrics().pacing_rate;
            let pacing = pacing.map_or(0, |bits| bits / 8);
            for (slot, v) in
                self.path_stats
                    .iter()
                    .zip([path.cwnd, path.lost_packets, path.lost_bytes, pacing])
            {
                slot.store(v, Ordering::Relaxed);
            }
            self.path_sampled_ns.store(now, Ordering::Relaxed);
        }
        let [cwnd, lost_packets, lost_bytes, pacing] = &self.path_stats;
        m.cwnd = Some(cwnd.load(Ordering::Relaxed));
        let pacing = pacing.load(Ordering::Relaxed);
        m.pacing_rate = (pacing > 0).then_some(pacing);
        // Every Data frame carries at most this much of a message.
        m.chunk_size = Some(u64::from(self.config.max_chunk));
        m.lost_packets = Some(lost_packets.load(Ordering::Relaxed));
        m.retransmitted_bytes = Some(lost_bytes.load(Ordering::Relaxed));
        m
    }

    pub(crate) async fn probe(&self, burst_bytes: u64) -> Result<PathSample> {
        let unavailable = |reason: &str| Error::Unavailable {
            transport: TransportKind::Quic,
            reason: reason.into(),
        };
        let max = self
            .conn
            .max_datagram_size()
            .ok_or_else(|| unavailable("the peer does not accept QUIC DATAGRAM frames"))?;
        // Frame header (5) and Ping fields (16).
        let overhead = 21usize;
        if max <= overhead {
            return Err(unavailable("the path's datagrams are too small for a Ping"));
        }
        let timeout = Duration::from_secs(2) + 4 * self.conn.rtt();
        // Pongs that never come must not leave their waiters behind.
        let mut guard = ProbeGuard {
            shared: self,
            ids: Vec::new(),
        };
        let (rtt, mut used) = {
            let (id, rx) = self.register_probe();
            guard.ids.push(id);
            let sent = Instant::now();
            self.send_ping(id, 0).await?;
            let pong = tokio::time::timeout(timeout, rx)
                .await
                .map_err(|_| Error::Timeout {
                    what: "waiting for a Pong datagram",
                    after: timeout,
                })?
                .map_err(|_| self.failure().map_or(Error::Closed, |f| f.to_error()))?;
            (pong.saturating_duration_since(sent), (2 * overhead) as u64)
        };
        let mut delivery_rate = None;
        if burst_bytes > 0 {
            let size = max;
            let count = burst_bytes.div_ceil(size as u64).clamp(2, 4096) as usize;
            let mut waits = Vec::with_capacity(count);
            for _ in 0..count {
                let (id, rx) = self.register_probe();
                guard.ids.push(id);
                self.send_ping(id, (size - overhead) as u32).await?;
                waits.push(rx);
                used += size as u64;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut arrivals = Vec::with_capacity(count);
            for rx in waits {
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(t)) => {
                        arrivals.push(t);
                        used += overhead as u64;
                    }
                    _ => continue,
                }
            }
            arrivals.sort();
            if let (Some(first), Some(last)) = (arrivals.first(), arrivals.last()) {
                let span = last.saturating_duration_since(*first).as_secs_f64();
                if arrivals.len() >= 2 && span > 0.0 {
                    let bytes = (arrivals.len() - 1) * size;
                    delivery_rate = Some((bytes as f64 / span) as u64);
                }
            }
        }
        Ok(PathSample {
            rtt,
            delivery_rate,
            bytes_used: used,
        })
    }

    fn register_probe(&self) -> (u64, oneshot::Receiver<Instant>) {
        let id = self.next_probe.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.probes).insert(id, tx);
        (id, rx)
    }

    async fn send_ping(&self, id: u64, padding: u32) -> Result<()> {
        let ping = Frame::Ping(Ping {
            id,
            timestamp_ns: self.epoch.elapsed().as_nanos() as u64,
            padding,
        });
        self.conn
            .send_datagram_wait(ping.to_bytes())
            .await
            .map_err(|e| match e {
                quinn::SendDatagramError::ConnectionLost(c) => connection_error(&c),
                other => Error::Unavailable {
                    transport: TransportKind::Quic,
                    reason: format!("sending a Ping datagram: {other}"),
                },
            })
    }

    fn on_ack_progress(&self, acked_bytes: u64) {
        let now = Instant::now();
        let window = self.conn.rtt().max(Duration::from_millis(50));
        let mut r = lock(&self.rate);
        match r.since {
            Some((t0, b0)) if now.saturating_duration_since(t0) >= window => {
                let dt = now.saturating_duration_since(t0).as_secs_f64();
                r.rate = Some(((acked_bytes - b0) as f64 / dt) as u64);
                r.since = Some((now, acked_bytes));
            }
            Some(_) => {}
            None => r.since = Some((now, acked_bytes)),
        }
    }

    fn deliver(&self, chunk: amst_core::codec::DataChunk) {
        self.bytes_received
            .fetch_add(chunk.payload.len() as u64, Ordering::Relaxed);
        let r = lock(&self.rx).insert(chunk);
        if let Err(p) = r {
            self.fail(Failure::Protocol(p));
            return;
        }
        self.rx_changed.notify_waiters();
        self.ack_wanted.notify_one();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.failure().is_some()
    }
}

/// Removes a probe's waiters from the table however the probe ends.
struct ProbeGuard<'a> {
    shared: &'a Shared,
    ids: Vec<u64>,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        let mut probes = lock(&self.shared.probes);
        for id in &self.ids {
            probes.remove(id);
        }
    }
}

fn spawn(fut: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(fut);
}

/// One sending lane: takes chunks from the send buffer and writes them, as Data frames, on
/// its own unidirectional stream.
async fn writer(shared: Arc<Shared>, lane: usize) {
    let per_message = matches!(shared.config.mapping, StreamMapping::PerMessage { .. });
    let max_chunk = shared.config.max_chunk as usize;
    let mut stream: Option<SendStream> = None;
    let mut parts: Vec<Bytes> = Vec::new();
    loop {
        let batch = wait_until(&shared.tx_changed, || {
            if shared.is_closed() {
                return Some(None);
            }
            let mut tx = lock(&shared.tx);
            let now = Instant::now();
            let mut chunks = Vec::new();
            let mut bytes = 0;
            let mut ends_message = false;
            // A batch of small chunks makes one write; one large chunk is a batch by itself.
            while bytes < max_chunk && chunks.len() < 64 {
                let Some(out) = tx.next_chunk(max_chunk) else {
                    break;
                };
                tx.on_sent(&out.chunk, lane as u32, now);
                let c = out.chunk;
                bytes += c.payload.len();
                ends_message = c.msg_offset + c.payload.len() as u64 == c.msg_len;
                chunks.push(c);
                if per_message && ends_message {
                    break;
                }
            }
            (!chunks.is_empty()).then_some(Some((chunks, ends_message)))
        })
        .await;
        let Some((chunks, ends_message)) = batch else {
            break;
        };
        // Chunks were taken from the buffer: other lanes may now find the credit exhausted
        // or more data behind these.
        shared.tx_changed.notify_waiters();
        let s = match &mut stream {
            Some(s) => s,
            None => match shared.conn.open_uni().await {
                Ok(s) => {
                    shared.active_streams.fetch_add(1, Ordering::Relaxed);
                    stream.insert(s)
                }
                Err(e) => {
                    shared.fail(Failure::from_connection(&e));
                    break;
                }
            },
        };
        let mut payload = 0u64;
        parts.clear();
        for c in &chunks {
            parts.push(Bytes::copy_from_slice(&c.encode_header()));
            parts.push(c.payload.clone());
            payload += c.payload.len() as u64;
        }
        if let Err(e) = s.write_all_chunks(&mut parts).await {
            match e {
                quinn::WriteError::ConnectionLost(c) => shared.fail(Failure::from_connection(&c)),
                other => shared.fail(Failure::Lost(format!("writing a data stream: {other}"))),
            }
            break;
        }
        shared.bytes_sent.fetch_add(payload, Ordering::Relaxed);
        if per_message && ends_message {
            let _ = s.finish();
            stream = None;
            shared.active_streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
    if stream.is_some() {
        shared.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts the peer's data streams and reads each on its own task.
async fn accept_data(shared: Arc<Shared>) {
    while let Ok(stream) = shared.conn.accept_uni().await {
        let s = shared.clone();
        spawn(async move {
            s.active_streams.fetch_add(1, Ordering::Relaxed);
            let mut r = FrameReader::new(stream, s.limits);
            loop {
                match r.next().await {
                    Ok(Some(Frame::Data(chunk))) => s.deliver(chunk),
                    Ok(Some(other)) => {
                        s.fail(Failure::Protocol(ProtocolError::UnexpectedFrame {
                            got: other.kind(),
                            state: "reading a QUIC data stream",
                        }));
                        break;
                    }
                    Ok(None) => break,
                    Err(ReadFail::Protocol(p)) => {
                        s.fail(Failure::Protocol(p));
                        break;
                    }
                    // The connection is ending; `monitor` records why.
                    Err(ReadFail::Stream(_)) => break,
                }
            }
            s.active_streams.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Applies the peer's Ack and Credit frames.
async fn control_reader(shared: Arc<Shared>, mut reader: FrameReader) {
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) | Err(ReadFail::Stream(_)) => break,
            Err(ReadFail::Protocol(p)) => {
                shared.fail(Failure::Protocol(p));
                break;
            }
        };
        match frame {
            Frame::Ack(ack) => {
                let r = {
                    let mut tx = lock(&shared.tx);
                    let r = tx.on_ack(&ack);
                    r.map(|_| (tx.cumulative_acked(), tx.messages_acked()))
                };
                match r {
                    Ok((acked, messages)) => {
                        shared.acked_messages.advance_to(messages);
                        shared.on_ack_progress(acked);
                    }
                    Err(p) => {
                        shared.fail(Failure::Protocol(p));
                        break;
                    }
                }
            }
            Frame::Credit(c) => lock(&shared.tx).on_credit(c),
            Frame::Close(c) => {
                shared.fail(Failure::PeerClosed(c.code, c.reason));
                break;
            }
            other => {
                shared.fail(Failure::Protocol(ProtocolError::UnexpectedFrame {
                    got: other.kind(),
                    state: "reading the QUIC control stream",
                }));
                break;
            }
        }
        shared.tx_changed.notify_waiters();
    }
}

/// Sends our Ack and Credit whenever they change; bursts of changes coalesce into one write.
async fn acker(shared: Arc<Shared>) {
    let mut last = None;
    let mut buf = BytesMut::new();
    loop {
        shared.ack_wanted.notified().await;
        if shared.is_closed() {
            break;
        }
        let now = {
            let rx = lock(&shared.rx);
            (rx.ack(), rx.credit())
        };
        if last.as_ref() == Some(&now) {
            continue;
        }
        buf.clear();
        Frame::Ack(now.0.clone()).encode(&mut buf);
        Frame::Credit(now.1).encode(&mut buf);
        if shared
            .control_tx
            .lock()
            .await
            .write_all(&buf)
            .await
            .is_err()
        {
            break;
        }
        last = Some(now);
    }
}

/// Answers Pings and hands Pongs to the probes waiting for them.
async fn datagrams(shared: Arc<Shared>) {
    let decoder = Decoder::new(shared.limits);
    while let Ok(d) = shared.conn.read_datagram().await {
        let mut b = BytesMut::from(&d[..]);
        match decoder.decode(&mut b) {
            Ok(Some(Frame::Ping(p))) => {
                let pong = Frame::Pong(Pong {
                    id: p.id,
                    timestamp_ns: p.timestamp_ns,
                });
                // A probe tolerates a lost Pong; never block the reader on it.
                let _ = shared.conn.send_datagram(pong.to_bytes());
            }
            Ok(Some(Frame::Pong(p))) => {
                if let Some(tx) = lock(&shared.probes).remove(&p.id) {
                    let _ = tx.send(Instant::now());
                }
            }
            // Datagrams are only for probes; anything else is ignored, not fatal.
            other => tracing::debug!(?other, "ignoring an unexpected datagram"),
        }
    }
}

/// Records why the connection ended.
async fn monitor(shared: Arc<Shared>) {
    let e = shared.conn.closed().await;
    shared.fail(Failure::from_connection(&e));
}
