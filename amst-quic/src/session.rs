//! One authenticated QUIC connection carrying AMST messages both ways: the driver of
//! amst-core's sans-IO [`Session`], which holds the protocol itself (send buffer,
//! reassembly, when acks and credit go out, pings, the fatal latch). This file turns the
//! session's events into wake-ups and quinn calls; `streams.rs` holds the tasks doing IO.
//!
//! The session's paths here: path [`CONTROL_PATH`] is the control stream (the bidirectional
//! one the PSK handshake used, at a higher quinn priority than data), where every control
//! frame goes; paths `1..=lanes` are the sending lanes, each writing Data frames on its own
//! unidirectional stream (or a fresh one per message); every stream the peer opens is read
//! as a path of its own, from [`INCOMING_PATHS`] up. Probe Pings and their Pongs go in QUIC
//! DATAGRAM frames, which quinn sends ahead of stream data.
//!
//! QUIC retransmits lost packets itself, so the session's stall resend is only a backstop
//! (at the idle timeout), and the session's parting Close travels as QUIC's
//! CONNECTION_CLOSE, with the same code and reason.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amst_core::codec::{Close, CloseCode, Decoder, Frame, Limits};
use amst_core::codec::{DATA_HEADER_LEN, DataHeader};
use amst_core::session::{Event, Fatal, Session, SessionConfig, peer_closed};
use amst_core::util::lock;
use amst_core::{
    AckCounter, Error, PathId, Placed, Placement, ProtocolError, Result, TransportKind,
};
use amst_core::{PathSample, TransportMetrics};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;

use crate::config::SharedConfig;
use crate::stream_order::{InOrder, StreamOrder, Waiting, data_out_of_order};

/// The control stream's path.
pub(crate) const CONTROL_PATH: PathId = 0;
/// Streams the peer opens are paths from here up (our lanes are `1..=256`).
pub(crate) const INCOMING_PATHS: PathId = 1 << 16;
/// Pongs that arrive in datagrams.
pub(crate) const DATAGRAM_PATH: PathId = PathId::MAX;

/// Delay before an ack that no threshold forced goes out, as over TCP.
const ACK_DELAY: Duration = Duration::from_millis(1);

/// Why the connection ended outside the session protocol (which reports its own failures,
/// and the peer's close, first).
#[derive(Clone, Debug)]
pub(crate) enum Ended {
    /// The connection died (idle timeout, reset, a transport error).
    Lost(String),
    /// This side closed or aborted it.
    Closed,
}

impl Ended {
    fn to_error(&self) -> Error {
        match self {
            Ended::Lost(why) => Error::io(
                "QUIC connection lost",
                io::Error::new(io::ErrorKind::ConnectionAborted, why.clone()),
            ),
            Ended::Closed => Error::Closed,
        }
    }
}

/// Maps a QUIC error met in the handshake to AMST's error.
pub(crate) fn connection_error(e: &ConnectionError) -> Error {
    match e {
        ConnectionError::ApplicationClosed(ac) => {
            let (code, reason) = application_close(ac);
            Error::PeerClosed { code, reason }
        }
        ConnectionError::LocallyClosed => Error::Closed,
        other => Ended::Lost(other.to_string()).to_error(),
    }
}

fn application_close(ac: &quinn::ApplicationClose) -> (CloseCode, String) {
    (
        CloseCode::from_u16(u16::try_from(ac.error_code.into_inner()).unwrap_or(u16::MAX)),
        String::from_utf8_lossy(&ac.reason).into_owned(),
    )
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
    pending: Pending,
    /// The stream is read unordered and put back in order here (see `stream_order`).
    order: StreamOrder,
    /// The session declined to place the frame at the front of the buffer (a whole message,
    /// a duplicate): it is read as usual, without asking again at every read.
    declined: bool,
}

/// The bytes read and not yet decoded, and the decoder, without the stream.
#[derive(Debug)]
struct Pending {
    buf: BytesMut,
    decoder: Decoder,
    /// A bad frame found behind sound ones: reported on the next call, once the sound ones
    /// are handled (the decoder has consumed it, so it cannot be found again).
    bad: Option<ProtocolError>,
}

impl Pending {
    /// Appends up to `max` (at least 1) whole frames to `out` and returns how many. A bad
    /// frame is an error only once the frames before it have been returned.
    fn decode(
        &mut self,
        out: &mut Vec<Frame>,
        max: usize,
    ) -> std::result::Result<usize, ProtocolError> {
        if let Some(e) = self.bad.take() {
            return Err(e);
        }
        let mut n = 0;
        while n < max.max(1) {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(f)) => {
                    out.push(f);
                    n += 1;
                }
                Ok(None) => break,
                Err(e) if n > 0 => {
                    self.bad = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

impl FrameReader {
    /// Frames off `stream`, whose pieces behind a gap count against `waiting`.
    pub(crate) fn new(stream: RecvStream, limits: Limits, waiting: Waiting) -> Self {
        FrameReader {
            stream,
            pending: Pending {
                buf: BytesMut::new(),
                decoder: Decoder::new(limits),
                bad: None,
            },
            order: StreamOrder::new(waiting),
            declined: false,
        }
    }

    /// The next frame, or `None` when the stream ended cleanly between frames.
    pub(crate) async fn next(&mut self) -> std::result::Result<Option<Frame>, ReadFail> {
        let mut one = Vec::with_capacity(1);
        match self.next_batch(&mut one, 1, &mut |_| None).await? {
            Read::Frames => Ok(one.pop()),
            Read::End => Ok(None),
            Read::Placed(_) => unreachable!("nothing is placed without a placement"),
        }
    }

    /// Appends at least one and at most `max` frames (all that are already buffered, up to
    /// `max`) to `out`; or, when the next frame is a large Data chunk for which `place` gives
    /// a [`Placement`] in its message, reads its payload there (one copy fewer per byte than
    /// reading it into the frame buffer first) and returns it checked.
    pub(crate) async fn next_batch(
        &mut self,
        out: &mut Vec<Frame>,
        max: usize,
        place: &mut (dyn FnMut(&DataHeader) -> Option<Placement> + Send),
    ) -> std::result::Result<Read, ReadFail> {
        loop {
            let p = &mut self.pending;
            if p.decode(out, max).map_err(ReadFail::Protocol)? > 0 {
                self.declined = false;
                return Ok(Read::Frames);
            }
            if !self.declined
                && let Ok(Some(h)) = p.decoder.data_header(&p.buf)
                && h.chunk_len as usize >= MIN_IN_PLACE
            {
                match place(&h) {
                    Some(placement) => {
                        return self.read_in_place(placement).await.map(Read::Placed);
                    }
                    None => self.declined = true,
                }
            }
            let p = &mut self.pending;
            if let Some(need) = p.decoder.frame_len(&p.buf).map_err(ReadFail::Protocol)? {
                // Validated against the limits, so this reserve is bounded.
                p.buf.reserve(need.saturating_sub(p.buf.len()));
            }
            match self.stream.read_chunk(usize::MAX, false).await {
                Ok(Some(chunk)) => self
                    .order
                    .insert(chunk.offset, chunk.bytes, &mut p.buf)
                    .map_err(ReadFail::Protocol)?,
                Ok(None) if self.order.has_gap() => {
                    return Err(ReadFail::Protocol(ProtocolError::Inconsistent(
                        "a QUIC stream ended with a gap in its data".into(),
                    )));
                }
                Ok(None) => {
                    return match p
                        .decoder
                        .decode_eof(&mut p.buf)
                        .map_err(ReadFail::Protocol)?
                    {
                        Some(f) => {
                            out.push(f);
                            Ok(Read::Frames)
                        }
                        None => Ok(Read::End),
                    };
                }
                Err(e) => return Err(ReadFail::Stream(e)),
            }
        }
    }

    /// Reads the payload of the Data frame whose header starts the buffer into `placement`,
    /// then checks its CRC32C while the bytes are still in cache.
    async fn read_in_place(
        &mut self,
        mut placement: Placement,
    ) -> std::result::Result<Placed, ReadFail> {
        let buf = &mut self.pending.buf;
        buf.advance(DATA_HEADER_LEN);
        // What came with the header; never the whole payload, or the frame would have decoded.
        let came = buf.len().min(placement.remaining_mut());
        placement.put_slice(&buf.split_to(came));
        while placement.has_remaining_mut() {
            match self.stream.read_chunk(usize::MAX, false).await {
                Ok(Some(chunk)) => {
                    let mut into = Placing {
                        placement: &mut placement,
                        rest: &mut self.pending.buf,
                    };
                    self.order
                        .insert(chunk.offset, chunk.bytes, &mut into)
                        .map_err(ReadFail::Protocol)?;
                }
                Ok(None) => {
                    let h = placement.header();
                    return Err(ReadFail::Protocol(ProtocolError::Inconsistent(format!(
                        "a QUIC stream ended inside a Data frame ({} of its {} payload bytes read)",
                        h.chunk_len as usize - placement.remaining_mut(),
                        h.chunk_len
                    ))));
                }
                Err(e) => return Err(ReadFail::Stream(e)),
            }
        }
        placement.verify().map_err(ReadFail::Protocol)
    }
}

/// Chunks at least this large (of larger messages) are read straight into their message: for
/// smaller ones, the session's lock taken to place them costs more than the copy it saves.
const MIN_IN_PLACE: usize = 64 << 10;

/// What [`FrameReader::next_batch`] read.
pub(crate) enum Read {
    /// Frames, appended to the batch.
    Frames,
    /// A Data chunk's payload, in its message and checked, for `Session::on_placed`.
    Placed(Placed),
    /// The stream ended cleanly between frames.
    End,
}

/// In-order stream bytes that fill a placement first and go to the frame buffer after it.
struct Placing<'a> {
    placement: &'a mut Placement,
    rest: &'a mut BytesMut,
}

impl InOrder for Placing<'_> {
    fn append(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.placement.remaining_mut());
        self.placement.put_slice(&bytes[..n]);
        self.rest.extend_from_slice(&bytes[n..]);
    }
}

/// Waits until `check` returns `Some`, re-checking after every notification. The waiter is
/// registered before the check, so a change between the check and the wait is not missed.
pub(crate) async fn wait_until<T>(notify: &Notify, mut check: impl FnMut() -> Option<T>) -> T {
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
    pub(crate) config: SharedConfig,
    pub(crate) limits: Limits,
    /// What the peer's data streams hold behind gaps, together, and the bound.
    pub(crate) waiting: Waiting,
    /// The session protocol itself.
    pub(crate) proto: Mutex<Session>,
    /// Why the connection ended, if the session does not say.
    ended: Mutex<Option<Ended>>,
    /// Messages the peer acknowledged, for `Transport::acked` subscribers.
    pub(crate) acked_messages: AckCounter,
    /// Lanes wait here for data to send.
    pub(crate) tx_wake: Notify,
    /// The control writer waits here for control frames.
    pub(crate) control_wake: Notify,
    /// `send` and `flush` wait here for acks.
    acked: Notify,
    /// `recv` waits here for messages.
    rx_wake: Notify,
    /// Tells the timer task that the session's next timeout moved earlier.
    pub(crate) timer: Notify,
    /// The control stream's sending half, shared by every writer that has control bytes.
    pub(crate) control_tx: tokio::sync::Mutex<SendStream>,
    pings: Mutex<HashMap<u64, oneshot::Sender<Instant>>>,
    tasks: Mutex<Vec<AbortHandle>>,
    pub(crate) next_incoming: AtomicU32,
    epoch: Instant,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) active_streams: AtomicUsize,
    rate: Mutex<RateEstimate>,
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
        let now = Instant::now();
        let proto = Session::new(
            SessionConfig {
                max_message: config.max_message,
                receive_window: config.window,
                ack_delay: ACK_DELAY,
                idle_timeout: config.idle_timeout,
                // QUIC retransmits: a chunk unacknowledged this long is resent only as a
                // backstop (the receiver drops the duplicate).
                stall_timeout: config.idle_timeout,
            },
            config.memory_budget.clone(),
            now,
        );
        // Control data should not queue behind bulk data in quinn's scheduler.
        let _ = control_tx.set_priority(16);
        let shared = Arc::new(Shared {
            conn,
            endpoint,
            limits,
            waiting: Waiting::new(data_out_of_order(config.window)),
            proto: Mutex::new(proto),
            ended: Mutex::new(None),
            acked_messages: AckCounter::new(),
            tx_wake: Notify::new(),
            control_wake: Notify::new(),
            acked: Notify::new(),
            rx_wake: Notify::new(),
            timer: Notify::new(),
            control_tx: tokio::sync::Mutex::new(control_tx),
            pings: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            next_incoming: AtomicU32::new(INCOMING_PATHS),
            epoch: now,
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            active_streams: AtomicUsize::new(0),
            rate: Mutex::new(RateEstimate::default()),
            path_stats: Default::default(),
            path_sampled_ns: AtomicU64::new(0),
            config,
        });
        let lanes = shared.config.mapping.lanes();
        crate::streams::start(&shared, control_rx, lanes);
        // The first Credit lets the peer start sending.
        shared.update(|p| {
            p.add_path(CONTROL_PATH);
            for lane in 1..=lanes as PathId {
                p.add_path(lane);
            }
        });
        shared
    }

    /// Spawns a task that dies with the session.
    pub(crate) fn spawn_task<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut tasks = lock(&self.tasks);
        if lock(&self.ended).is_some() {
            return;
        }
        let h = tokio::spawn(fut);
        tasks.retain(|t| !t.is_finished());
        tasks.push(h.abort_handle());
    }

    // ----- driving the protocol -----

    /// Runs `f` on the protocol, then acts on what it asks: wakes the control writer or a
    /// lane if something can be sent, the timer if its deadline moved, and handles events.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R {
        let mut events = Vec::new();
        let (r, control, data, timer, acked_bytes) = {
            let mut p = lock(&self.proto);
            let r = f(&mut p);
            while let Some(e) = p.poll_event() {
                events.push(e);
            }
            (
                r,
                p.wants_control(),
                p.send_buffer().has_sendable(),
                p.take_timeout_moved(),
                p.send_buffer().cumulative_acked(),
            )
        };
        if control {
            self.control_wake.notify_one();
        }
        if data {
            self.tx_wake.notify_one();
        }
        if timer {
            self.timer.notify_one();
        }
        for e in events {
            self.on_event(e, acked_bytes);
        }
        r
    }

    fn on_event(&self, event: Event, acked_bytes: u64) {
        match event {
            Event::Readable => self.rx_wake.notify_waiters(),
            Event::Acked { messages } => {
                self.acked_messages.advance_to(messages);
                self.on_ack_progress(acked_bytes);
                self.acked.notify_waiters();
            }
            Event::Pong { id } => {
                if let Some(tx) = lock(&self.pings).remove(&id) {
                    let _ = tx.send(Instant::now());
                }
            }
            // The peer never removes a QUIC stream this way; its Close on a stream of its own
            // needs no answer (we do not write on the peer's streams).
            Event::PathStopped { path } => {
                tracing::debug!(path, "the peer sent Close(StreamClosed); ignored over QUIC");
            }
            Event::Closed => self.wake_all(),
            Event::Failed(fatal) => self.on_failed(fatal),
        }
    }

    /// Fails the session (the first failure latches; see `on_failed`).
    pub(crate) fn fail(&self, fatal: Fatal) {
        self.update(|p| p.fail(fatal));
    }

    /// The session failed: tell the peer why in QUIC's CONNECTION_CLOSE (the session's
    /// parting Close, as a frame every path would otherwise carry), stop every task and
    /// wake every waiter, who will report it.
    fn on_failed(&self, fatal: Fatal) {
        if !matches!(fatal, Fatal::PeerClosed { .. }) {
            let reason = lock(&self.proto)
                .parting_close()
                .map(|c| c.reason)
                .unwrap_or_default();
            tracing::warn!(error = %fatal.to_error(), "closing the QUIC session");
            self.conn
                .close(close_code(fatal.close_code()), reason.as_bytes());
        }
        self.teardown();
    }

    /// The connection ended (`closed()` resolved): the peer's close becomes the session's
    /// Close, anything else is recorded as why.
    pub(crate) fn connection_ended(&self, e: &ConnectionError) {
        match e {
            ConnectionError::ApplicationClosed(ac) => {
                let (code, reason) = application_close(ac);
                let now = Instant::now();
                self.update(|p| match code {
                    // A graceful close: what arrived stays readable, then `recv` ends.
                    CloseCode::Normal => {
                        let _ =
                            p.on_frame(CONTROL_PATH, Frame::Close(Close::new(code, reason)), now);
                    }
                    _ => {
                        p.fail(Fatal::PeerClosed { code, reason });
                    }
                });
                self.set_ended(Ended::Lost("the peer closed the connection".into()));
            }
            ConnectionError::LocallyClosed => self.set_ended(Ended::Closed),
            other => self.set_ended(Ended::Lost(other.to_string())),
        }
        self.teardown();
    }

    fn set_ended(&self, e: Ended) {
        let mut g = lock(&self.ended);
        if g.is_none() {
            *g = Some(e);
        }
    }

    /// Stops every task and wakes every waiter. Idempotent.
    pub(crate) fn teardown(&self) {
        self.set_ended(Ended::Closed);
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        lock(&self.pings).clear();
        self.wake_all();
    }

    fn wake_all(&self) {
        self.rx_wake.notify_waiters();
        self.acked.notify_waiters();
        self.tx_wake.notify_waiters();
        self.control_wake.notify_waiters();
    }

    /// Why nothing more can be sent or awaited, if so: the session's failure first, then the
    /// peer's graceful close, then the connection's end.
    fn stopped(&self, p: &Session) -> Option<Error> {
        if let Some(f) = p.fatal() {
            return Some(f.to_error());
        }
        if p.is_peer_closed() {
            return Some(peer_closed());
        }
        lock(&self.ended).as_ref().map(Ended::to_error)
    }

    pub(crate) fn is_ended(&self) -> bool {
        lock(&self.ended).is_some()
    }

    // ----- the Transport operations -----

    /// Queues one message, `header` then `payload`, without joining them; waits while the
    /// window's worth of bytes is queued or unacknowledged.
    pub(crate) async fn send(&self, header: Bytes, payload: Bytes) -> Result<()> {
        let len = (header.len() + payload.len()) as u64;
        if len > self.config.max_message {
            return Err(Error::MessageTooLarge {
                len,
                limit: self.config.max_message,
            });
        }
        let limit = self.config.window.max(u64::from(self.config.max_chunk));
        let mut message = Some((header, payload));
        wait_until(&self.acked, || {
            let pushed = self.update(|p| {
                p.check_can_send()?;
                if let Some(e) = self.stopped(p) {
                    return Err(e);
                }
                let sb = p.send_buffer();
                let held = sb.queued_bytes() + sb.unacked_bytes();
                // A message larger than the limit still goes when nothing else is held.
                if held == 0 || held + len <= limit {
                    let (h, m) = message.take().unwrap_or_default();
                    p.push_parts(h, m, Instant::now()).map(|_| true)
                } else {
                    Ok(false)
                }
            });
            match pushed {
                Ok(false) => None,
                Ok(true) => Some(Ok(())),
                Err(e) => Some(Err(e)),
            }
        })
        .await
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        let target = lock(&self.proto).send_buffer().messages_sent();
        wait_until(&self.acked, || {
            let p = lock(&self.proto);
            if p.send_buffer().messages_acked() >= target {
                return Some(Ok(()));
            }
            self.stopped(&p).map(Err)
        })
        .await
    }

    pub(crate) async fn recv(&self) -> Result<Option<Bytes>> {
        wait_until(&self.rx_wake, || {
            // Reading frees window: the session sends credit when enough has been freed.
            self.update(|p| {
                if let Some(m) = p.read(Instant::now()) {
                    return Some(Ok(Some(m)));
                }
                if let Some(f) = p.fatal() {
                    return Some(Err(f.to_error()));
                }
                if p.is_peer_closed() {
                    return Some(Ok(None));
                }
                lock(&self.ended).as_ref().map(|e| Err(e.to_error()))
            })
        })
        .await
    }

    pub(crate) async fn close(&self) -> Result<()> {
        lock(&self.proto).close(None);
        let drained = self.flush().await;
        self.conn
            .close(close_code(CloseCode::Normal), b"closed by the application");
        self.end_here();
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
        let quiet = {
            let p = lock(&self.proto);
            p.fatal().is_some() || p.is_peer_closed()
        };
        if !quiet && !self.is_ended() {
            self.conn.close(
                close_code(CloseCode::Aborted),
                b"aborted by the application",
            );
        }
        self.end_here();
    }

    /// This side ended the session: later calls report [`Error::Closed`].
    fn end_here(&self) {
        {
            let mut p = lock(&self.proto);
            p.close(None);
            p.set_closed();
        }
        self.teardown();
    }

    pub(crate) fn metrics(&self) -> TransportMetrics {
        let mut m = TransportMetrics::new(TransportKind::Quic);
        {
            let p = lock(&self.proto);
            let tx = p.send_buffer();
            m.messages_sent = tx.messages_sent();
            m.messages_acked = tx.messages_acked();
            m.chunks_retransmitted = tx.retransmissions();
            m.credit_window = Some(tx.credit_limit().saturating_sub(tx.cumulative_acked()));
            let rx = p.reassembler();
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

    /// One Ping/Pong round trip in QUIC DATAGRAM frames, then with `burst_bytes > 0` a train
    /// of full-size padded Pings whose Pongs' spacing gives the rate. The Pings are the
    /// session's (its ids, its Pong events); only their carriage is QUIC's.
    pub(crate) async fn probe(&self, burst_bytes: u64) -> Result<PathSample> {
        let unavailable = |reason: &str| Error::Unavailable {
            transport: TransportKind::Quic,
            reason: reason.into(),
        };
        if let Some(e) = self.stopped(&lock(&self.proto)) {
            return Err(e);
        }
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
            let sent = Instant::now();
            let rx = self.send_ping(0, &mut guard.ids).await?;
            let pong = tokio::time::timeout(timeout, rx)
                .await
                .map_err(|_| Error::Timeout {
                    what: "waiting for a Pong datagram",
                    after: timeout,
                })?
                .map_err(|_| self.stopped(&lock(&self.proto)).unwrap_or(Error::Closed))?;
            (pong.saturating_duration_since(sent), (2 * overhead) as u64)
        };
        let mut delivery_rate = None;
        if burst_bytes > 0 {
            let size = max;
            let count = burst_bytes.div_ceil(size as u64).clamp(2, 4096) as usize;
            let mut waits = Vec::with_capacity(count);
            for _ in 0..count {
                let padding = (size - overhead) as u32;
                waits.push(self.send_ping(padding, &mut guard.ids).await?);
                used += size as u64;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut arrivals = Vec::with_capacity(count);
            for rx in waits {
                if let Ok(Ok(t)) = tokio::time::timeout_at(deadline, rx).await {
                    arrivals.push(t);
                    used += overhead as u64;
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

    /// Sends one of the session's Pings in a datagram; the receiver gets its Pong's time.
    async fn send_ping(
        &self,
        padding: u32,
        ids: &mut Vec<u64>,
    ) -> Result<oneshot::Receiver<Instant>> {
        let (tx, rx) = oneshot::channel();
        let ping = {
            // The waiter is registered before the Ping can go out.
            let mut pings = lock(&self.pings);
            let ping = lock(&self.proto).ping_detached(padding, Instant::now());
            pings.insert(ping.id, tx);
            ping
        };
        ids.push(ping.id);
        self.conn
            .send_datagram_wait(Frame::Ping(ping).to_bytes())
            .await
            .map_err(|e| match e {
                quinn::SendDatagramError::ConnectionLost(c) => connection_error(&c),
                other => Error::Unavailable {
                    transport: TransportKind::Quic,
                    reason: format!("sending a Ping datagram: {other}"),
                },
            })?;
        Ok(rx)
    }

    fn on_ack_progress(&self, acked_bytes: u64) {
        let now = Instant::now();
        let window = self.conn.rtt().max(Duration::from_millis(50));
        let mut r = lock(&self.rate);
        match r.since {
            Some((t0, b0)) if now.saturating_duration_since(t0) >= window => {
                let dt = now.saturating_duration_since(t0).as_secs_f64();
                r.rate = Some((acked_bytes.saturating_sub(b0) as f64 / dt) as u64);
                r.since = Some((now, acked_bytes));
            }
            Some(_) => {}
            None => r.since = Some((now, acked_bytes)),
        }
    }
}

/// Removes a probe's waiters from the table however the probe ends.
struct ProbeGuard<'a> {
    shared: &'a Shared,
    ids: Vec<u64>,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        let mut probes = lock(&self.shared.pings);
        for id in &self.ids {
            probes.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use amst_core::codec::DataChunk;
    use bytes::Bytes;

    use super::*;

    #[test]
    fn frames_ahead_of_a_bad_one_are_returned_before_its_error() {
        let mut p = Pending {
            buf: BytesMut::new(),
            decoder: Decoder::new(Limits::default()),
            bad: None,
        };
        let whole = Frame::Data(DataChunk::new(0, 0, 0, 5, Bytes::from_static(b"whole")));
        p.buf.extend_from_slice(&whole.to_bytes());
        p.buf.extend_from_slice(&[0xee, 0, 0, 0, 0]);
        let mut out = Vec::new();
        assert_eq!(p.decode(&mut out, 8), Ok(1));
        assert_eq!(out, vec![whole]);
        assert_eq!(
            p.decode(&mut out, 8),
            Err(ProtocolError::UnknownFrameType(0xee))
        );
    }
}
