//! One connection's session protocol as a sans-IO state machine, in the manner of
//! quinn-proto's `Connection`: the send buffer, reassembly, when acks and credit go out,
//! pings, the parting Close and the fatal latch. A transport drives it and does the IO.
//!
//! - Inputs: [`push`](Session::push) a message, [`on_frame`](Session::on_frame) for each
//!   frame read from any path, [`on_timeout`](Session::on_timeout) when
//!   [`poll_timeout`](Session::poll_timeout)'s instant has passed, and the path life cycle
//!   ([`add_path`](Session::add_path), [`path_ended`](Session::path_ended)).
//! - Outputs: [`poll_transmit`](Session::poll_transmit) fills what a path should write next,
//!   [`poll_timeout`](Session::poll_timeout), and [`poll_event`](Session::poll_event)
//!   (readable, acked, pong, path stopped, closed, failed); [`read`](Session::read) takes a
//!   delivered message.
//!
//! Time is always an argument. Paths are the transport's (TCP streams, a QUIC connection);
//! chunks may arrive on any of them in any order, any number of times.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::codec::{Close, CloseCode, DataChunk, DataHeader, Frame, Ping, Pong};
use crate::{
    Error, Inserted, MemoryBudget, PathId, Placed, Placement, ProtocolError, Reassembler,
    ReassemblyConfig, SendBuffer,
};

#[cfg(test)]
mod tests;

/// Control frames waiting for a writer, at most; Pongs beyond it are dropped, so a peer that
/// pings faster than it reads its answers cannot grow the queue. Room for every answer to
/// amst-detect's largest probe train (32 MiB = 512 Pings) with margin: a receiver whose reader
/// takes in a train before its writer runs must not drop the Pongs (the prober would wait for
/// them until its timeout).
pub const MAX_QUEUED_CONTROL: usize = 1024;
/// Pong events waiting for the driver, at most.
const MAX_PONG_EVENTS: usize = 1024;
/// How soon a receiver whose head message waits for room in the budget asks it again.
const BUDGET_RETRY: Duration = Duration::from_millis(2);
/// Bytes of a probe train one `poll_transmit` takes at a time: one full Ping, so that the
/// train spreads over the paths as data does. A larger slice commits more of the train to
/// one stream ahead of time, and the train's end then waits for the slowest stream's share
/// (at 50 Mbit/s one stream of 8 carries about 6 Mbit/s, so every 64 KiB left on it is 80 ms).
const PROBE_SLICE: usize = 64 << 10;
/// Most chunks one `poll_transmit` hands out (small messages).
pub const MAX_BATCH: usize = 64;
/// Largest first chunk of a session whose peer has granted no more than its first, minimal
/// window ([`MIN_WINDOW`](crate::MIN_WINDOW)). A receiver opens its window when the first
/// whole chunk arrives, and a fresh TCP stream (10 segments of initial window) delivers a
/// 128 KiB chunk only after four round trips of slow start: on a 100 ms path the session sent
/// 256 KiB in its first half second. A chunk this small arrives within the first round trip.
/// Only the first, and only on a path of [`STARTUP_CHUNK_MIN_RTT`] or more: more small chunks
/// bring the window no sooner, and on loopback, where four round trips are nothing, 64
/// sessions at once raised the receiver's peak by 2-12 MiB with it.
pub const STARTUP_CHUNK: usize = 8 << 10;
/// The smoothed RTT from which a session's first chunk is [`STARTUP_CHUNK`].
pub const STARTUP_CHUNK_MIN_RTT: Duration = Duration::from_millis(5);

/// The session's timing and size parameters.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Largest message, sent or received.
    pub max_message: u64,
    /// Credit window granted to the peer beyond what the application has taken.
    pub receive_window: u64,
    /// Delay before an ack that no threshold forced goes out: long enough to coalesce a
    /// burst, short against any RTT that matters for a flush.
    pub ack_delay: Duration,
    /// With data outstanding, the peer is pinged after a third of this much silence and the
    /// session fails after all of it.
    pub idle_timeout: Duration,
    /// Chunks unacknowledged this long (or 8 smoothed RTTs, if longer) are sent again on
    /// whichever path asks next.
    pub stall_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_message: 1 << 30,
            receive_window: 64 << 20,
            ack_delay: Duration::from_millis(1),
            idle_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(5),
        }
    }
}

/// A session-ending error, latched: every later call reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fatal {
    /// The peer broke the protocol (or a chunk failed its CRC).
    Protocol(ProtocolError),
    /// The peer closed the session with an error code.
    PeerClosed {
        /// The peer's code.
        code: CloseCode,
        /// The peer's reason.
        reason: String,
    },
    /// Something took too long.
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
}

impl Fatal {
    /// The error every later call reports.
    pub fn to_error(&self) -> Error {
        match self.clone() {
            Fatal::Protocol(p) => Error::Protocol(p),
            Fatal::PeerClosed { code, reason } => Error::PeerClosed { code, reason },
            Fatal::Timeout { what, after } => Error::Timeout { what, after },
        }
    }

    /// The code of the Close that tells the peer.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Fatal::Protocol(ProtocolError::ChunkCorrupt { .. }) => CloseCode::Corrupt,
            Fatal::Protocol(ProtocolError::AuthFailed) => CloseCode::AuthFailed,
            Fatal::Protocol(
                ProtocolError::MessageTooLarge { .. } | ProtocolError::MessageOverBudget { .. },
            ) => CloseCode::LimitExceeded,
            Fatal::Protocol(_) => CloseCode::ProtocolError,
            _ => CloseCode::Aborted,
        }
    }
}

/// What the driver should know about, from [`Session::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// At least one whole message is ready for [`Session::read`].
    Readable,
    /// The peer acknowledged more: `messages` whole messages from the first, in total.
    Acked {
        /// Messages acknowledged whole, counted from the first.
        messages: u64,
    },
    /// The peer answered our Ping `id`.
    Pong {
        /// The Ping's id.
        id: u64,
    },
    /// The peer removes `path` (it sent Close(StreamClosed) on it): the path's transmit will
    /// finish it once its writer is done.
    PathStopped {
        /// The path.
        path: PathId,
    },
    /// The peer closed the session gracefully: nothing more will arrive.
    Closed,
    /// The session failed; it now only sends the parting Close.
    Failed(Fatal),
}

/// What [`Session::poll_transmit`] asks the path to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Nothing to write now; wait for a wake-up.
    Idle,
    /// Write the control bytes, then each chunk (header and payload), and ask again.
    Send,
    /// Write the control bytes (a Close) and half-close the path: it is done.
    Finish,
}

#[derive(Debug, Default)]
struct PathState {
    /// Being removed: no more chunks, then Close(StreamClosed).
    stopping: bool,
    /// The parting or stream Close went out.
    finished: bool,
}

/// Memory held for messages, with the peaks seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffers {
    /// Bytes queued and not yet cut into chunks.
    pub send_queued: u64,
    /// Bytes sent and not yet acknowledged.
    pub send_unacked: u64,
    /// Peak of `send_queued + send_unacked`.
    pub send_peak: u64,
    /// Bytes received and not yet read.
    pub recv_buffered: u64,
    /// Peak of `recv_buffered`.
    pub recv_peak: u64,
    /// Duplicate chunks dropped.
    pub duplicates: u64,
}

/// One session's protocol state. See the [module docs](self).
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    epoch: Instant,
    sb: SendBuffer,
    send_peak: u64,
    reasm: Reassembler,
    recv_peak: u64,
    /// Payload bytes and chunks inserted since the last ack went out.
    bytes_since_ack: u64,
    chunks_since_ack: u64,
    /// The credit limit last sent.
    advertised: u64,
    /// An ack and a credit update go out with the next transmit.
    ack_now: bool,
    /// An ack is owed; it goes out at this instant unless a threshold sends it sooner.
    ack_at: Option<Instant>,
    /// The budget had no room to complete the head message: ask it again at this instant.
    budget_retry_at: Option<Instant>,
    /// The earliest deadline moved earlier since the driver last asked.
    timer_moved: bool,
    control: VecDeque<Frame>,
    probes: VecDeque<Frame>,
    next_ping: u64,
    paths: BTreeMap<PathId, PathState>,
    srtt: Option<Duration>,
    /// The stall timer counts from here: the oldest send among the chunks not yet
    /// requeued, as of the last check (kept coarse: finding it is a scan).
    stall_base: Option<Instant>,
    last_heard: Option<Instant>,
    /// The idle clock: the later of the last frame heard and the last time the send buffer
    /// went from empty to holding data.
    idle_since: Instant,
    last_ping: Option<Instant>,
    // Life cycle.
    closing: bool,
    peer_closed: bool,
    closed: bool,
    fatal: Option<Fatal>,
    goodbye: Option<Close>,
    // Pending events, coalesced so that none can pile up.
    ev_readable: bool,
    ev_acked: bool,
    ev_closed: bool,
    ev_failed: bool,
    ev_other: VecDeque<Event>,
}

impl Session {
    /// A session whose receive credit comes from `budget`. The peer's first transmit
    /// grants it nothing: our first write does.
    pub fn new(config: SessionConfig, budget: MemoryBudget, now: Instant) -> Self {
        let reasm = Reassembler::with_budget(
            ReassemblyConfig {
                window: config.receive_window,
                max_message: config.max_message,
                ..ReassemblyConfig::default()
            },
            budget,
        );
        Session {
            sb: SendBuffer::new(config.max_message),
            config,
            epoch: now,
            send_peak: 0,
            reasm,
            recv_peak: 0,
            bytes_since_ack: 0,
            chunks_since_ack: 0,
            advertised: 0,
            // The peer's send buffer starts with no credit: our first write grants it.
            ack_now: true,
            ack_at: None,
            budget_retry_at: None,
            timer_moved: false,
            control: VecDeque::new(),
            probes: VecDeque::new(),
            next_ping: 0,
            paths: BTreeMap::new(),
            srtt: None,
            stall_base: None,
            last_heard: None,
            idle_since: now,
            last_ping: None,
            closing: false,
            peer_closed: false,
            closed: false,
            fatal: None,
            goodbye: None,
            ev_readable: false,
            ev_acked: false,
            ev_closed: false,
            ev_failed: false,
            ev_other: VecDeque::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Bytes of new data after which the receiver acks at once.
    pub fn ack_threshold(&self) -> u64 {
        (self.config.receive_window / 8).clamp(64 << 10, 4 << 20)
    }

    /// Growth of the grantable credit after which it is advertised at once.
    pub fn credit_threshold(&self) -> u64 {
        (self.config.receive_window / 8).max(1)
    }

    // ----- sending -----

    /// Whether a new message may be pushed: not after a failure or a close.
    pub fn check_can_send(&self) -> Result<(), Error> {
        if let Some(f) = &self.fatal {
            return Err(f.to_error());
        }
        if self.closing || self.closed {
            return Err(Error::Closed);
        }
        if self.peer_closed {
            return Err(peer_closed());
        }
        Ok(())
    }

    /// Queues a message; returns its id.
    pub fn push(&mut self, message: Bytes, now: Instant) -> Result<u64, Error> {
        self.push_parts(Bytes::new(), message, now)
    }

    /// Queues one message made of `header` then `payload`, not joined; returns its id.
    pub fn push_parts(
        &mut self,
        header: Bytes,
        payload: Bytes,
        now: Instant,
    ) -> Result<u64, Error> {
        self.check_can_send()?;
        if self.sb.is_empty() {
            // An idle session is kept by keepalive: the idle clock starts with the send.
            self.idle_since = now;
            self.last_ping = None;
        }
        let id = self.sb.push_parts(header, payload)?;
        let held = self.sb.queued_bytes() + self.sb.unacked_bytes();
        self.send_peak = self.send_peak.max(held);
        Ok(id)
    }

    /// Asks that our ack and credit go out with the next transmit (a new path may be the only
    /// one, or control frames written to a dead one may be lost).
    pub fn request_ack(&mut self) {
        self.ack_now = true;
    }

    /// Queues a Ping and returns its id; `probe` Pings (a train measuring the path) are
    /// spread over the paths a slice at a time, after the other control frames.
    pub fn ping(&mut self, padding: u32, probe: bool, now: Instant) -> u64 {
        let ping = self.ping_detached(padding, now);
        let id = ping.id;
        let f = Frame::Ping(ping);
        if probe {
            self.probes.push_back(f);
        } else {
            self.control.push_back(f);
        }
        id
    }

    /// A Ping for the driver to send itself, outside [`poll_transmit`](Self::poll_transmit)
    /// (amst-quic sends probe Pings as QUIC datagrams, ahead of stream data). Its Pong, fed
    /// to [`on_frame`](Self::on_frame), raises [`Event::Pong`] like any other.
    pub fn ping_detached(&mut self, padding: u32, now: Instant) -> Ping {
        let id = self.next_ping;
        self.next_ping += 1;
        Ping {
            id,
            timestamp_ns: self.nanos(now),
            padding,
        }
    }

    /// Drops the probe Pings not yet sent (a cancelled probe's train goes no further).
    pub fn clear_probes(&mut self) {
        self.probes.clear();
    }

    /// Whether `poll_transmit` has something for some path now.
    pub fn wants_transmit(&self) -> bool {
        self.parting()
            || self.ack_now
            || !self.control.is_empty()
            || !self.probes.is_empty()
            || self.sb.has_sendable()
    }

    /// Whether `poll_transmit` has control frames (not data) for some path now: a driver
    /// with a path of its own for control frames wakes that path's writer on this.
    pub fn wants_control(&self) -> bool {
        self.parting() || self.ack_now || !self.control.is_empty() || !self.probes.is_empty()
    }

    /// What `path` should write next: control bytes appended to `control` and up to
    /// `max_bytes` of chunks (at most [`MAX_BATCH`]) to `chunks`, recorded as sent on `path`
    /// at `now`. Chunks come unsealed: the driver calls [`DataChunk::seal`] on each before
    /// writing, outside any lock it holds this session behind, so paths checksum in parallel.
    pub fn poll_transmit(
        &mut self,
        path: PathId,
        now: Instant,
        max_bytes: usize,
        control: &mut BytesMut,
        chunks: &mut Vec<DataChunk>,
    ) -> Transmit {
        let parting = self.parting();
        let state = self.paths.entry(path).or_default();
        if state.finished {
            return Transmit::Idle;
        }
        if parting {
            // Every path carries the reason, after whole frames only, then half-closes:
            // whichever path the peer reads first tells it why.
            state.finished = true;
            if let Some(close) = self.parting_close() {
                Frame::Close(close).encode(control);
            }
            return Transmit::Finish;
        }
        let stopping = state.stopping;
        if self.ack_now {
            self.ack_now = false;
            self.ack_at = None;
            self.bytes_since_ack = 0;
            self.chunks_since_ack = 0;
            let credit = self.reasm.credit();
            self.advertised = credit.limit;
            Frame::Ack(self.reasm.ack()).encode(control);
            Frame::Credit(credit).encode(control);
        }
        for f in self.control.drain(..) {
            f.encode(control);
        }
        let mut taken = 0;
        while taken < PROBE_SLICE
            && let Some(f) = self.probes.pop_front()
        {
            let before = control.len();
            f.encode(control);
            taken += control.len() - before;
        }
        if stopping {
            if let Some(s) = self.paths.get_mut(&path) {
                s.finished = true;
            }
            Frame::Close(Close::new(CloseCode::StreamClosed, "stream removed")).encode(control);
            return Transmit::Finish;
        }
        let first = self.sb.cumulative_acked() == 0 && self.sb.unacked_bytes() == 0;
        let long_path = self.srtt.is_some_and(|r| r >= STARTUP_CHUNK_MIN_RTT);
        let max_bytes = if first && long_path && self.sb.credit_limit() <= crate::MIN_WINDOW {
            max_bytes.min(STARTUP_CHUNK)
        } else {
            max_bytes
        };
        let mut bytes = 0usize;
        while chunks.len() < MAX_BATCH && bytes < max_bytes {
            let Some(out) = self.sb.next_chunk_unsealed(max_bytes) else {
                break;
            };
            self.sb.on_sent(&out.chunk, path, now);
            bytes += out.chunk.payload.len();
            chunks.push(out.chunk);
        }
        if !chunks.is_empty() && self.stall_base.is_none() {
            self.stall_base = Some(now);
        }
        if control.is_empty() && chunks.is_empty() {
            Transmit::Idle
        } else {
            Transmit::Send
        }
    }

    // ----- receiving -----

    /// Applies one frame read from `path` at `now`. An error latches the session's failure
    /// (reported once by [`poll_event`](Self::poll_event)) and is returned too.
    pub fn on_frame(&mut self, path: PathId, frame: Frame, now: Instant) -> Result<(), Fatal> {
        if let Some(f) = &self.fatal {
            // A failed session drops what still comes.
            return Err(f.clone());
        }
        self.last_heard = Some(now);
        match frame {
            Frame::Data(chunk) => {
                let len = chunk.payload.len() as u64;
                let inserted = self.reasm.insert(chunk);
                return self.on_chunk(inserted, len, now);
            }
            Frame::Ack(ack) => match self.sb.on_ack(&ack) {
                Ok(out) => {
                    if out.messages_acked > 0 || out.newly_acked_bytes > 0 {
                        self.ev_acked = true;
                    }
                    if self.sb.is_empty() {
                        self.stall_base = None;
                    }
                }
                Err(e) => return Err(self.fail(Fatal::Protocol(e))),
            },
            Frame::Credit(c) => self.sb.on_credit(c),
            Frame::Ping(p) => {
                if self.control.len() < MAX_QUEUED_CONTROL {
                    self.control.push_back(Frame::Pong(Pong {
                        id: p.id,
                        timestamp_ns: p.timestamp_ns,
                    }));
                }
            }
            Frame::Pong(p) => {
                if p.id < self.next_ping && self.ev_other.len() < MAX_PONG_EVENTS {
                    self.ev_other.push_back(Event::Pong { id: p.id });
                }
            }
            Frame::Close(c) => match c.code {
                CloseCode::StreamClosed => {
                    // The peer removes this path: answer in kind once its writer is done.
                    let s = self.paths.entry(path).or_default();
                    if !s.stopping {
                        s.stopping = true;
                        self.ev_other.push_back(Event::PathStopped { path });
                    }
                }
                CloseCode::Normal => {
                    if !self.peer_closed {
                        self.peer_closed = true;
                        self.ev_closed = true;
                    }
                }
                code => {
                    return Err(self.fail(Fatal::PeerClosed {
                        code,
                        reason: c.reason,
                    }));
                }
            },
            other => {
                return Err(self.fail(Fatal::Protocol(ProtocolError::UnexpectedFrame {
                    got: other.kind(),
                    state: "carrying data after the handshake",
                })));
            }
        }
        Ok(())
    }

    /// Where the payload of the Data frame whose header `path` has just delivered can be
    /// read straight into its message, skipping the copy out of the read buffer; `None` when
    /// the frame should be read whole and given to [`on_frame`](Self::on_frame) as usual.
    /// Fill it, [`verify`](Placement::verify) it outside the lock, and hand it to
    /// [`on_placed`](Self::on_placed). Errors as `on_frame` would give for the frame.
    pub fn place(&mut self, h: &DataHeader) -> Result<Option<Placement>, Fatal> {
        if let Some(f) = &self.fatal {
            return Err(f.clone());
        }
        self.reasm
            .place(h)
            .map_err(|e| self.fail(Fatal::Protocol(e)))
    }

    /// Applies a chunk read into its place at `now`, as
    /// [`on_frame`](Self::on_frame) applies a Data frame.
    pub fn on_placed(&mut self, placed: Placed, now: Instant) -> Result<(), Fatal> {
        if let Some(f) = &self.fatal {
            return Err(f.clone());
        }
        self.last_heard = Some(now);
        let len = placed.header().chunk_len as u64;
        let inserted = self.reasm.insert_placed(placed);
        self.on_chunk(inserted, len, now)
    }

    fn on_chunk(
        &mut self,
        inserted: Result<Inserted, ProtocolError>,
        len: u64,
        now: Instant,
    ) -> Result<(), Fatal> {
        match inserted {
            Ok(Inserted::New) => {
                self.bytes_since_ack += len;
                self.chunks_since_ack += 1;
            }
            Ok(Inserted::Duplicate) => {
                // The sender resent it (a path died or stalled); ack so it stops.
                self.chunks_since_ack += 1;
            }
            Err(e) => return Err(self.fail(Fatal::Protocol(e))),
        }
        self.recv_peak = self.recv_peak.max(self.reasm.buffered_bytes());
        if self.reasm.has_message() {
            self.ev_readable = true;
        }
        self.after_rx_change(now);
        Ok(())
    }

    /// The next whole message in send order, if one has arrived.
    pub fn read(&mut self, now: Instant) -> Option<Bytes> {
        let m = self.reasm.pop()?;
        self.after_rx_change(now);
        Some(m)
    }

    /// After data arrived or the application took a message: ack with the next transmit if
    /// a threshold is crossed, else after the ack delay.
    fn after_rx_change(&mut self, now: Instant) {
        let credit_growth = self.reasm.credit().limit.saturating_sub(self.advertised);
        if self.bytes_since_ack >= self.ack_threshold() || credit_growth >= self.credit_threshold()
        {
            self.ack_now = true;
            self.ack_at = None;
        } else if (self.chunks_since_ack > 0 || credit_growth > 0)
            && !self.ack_now
            && self.ack_at.is_none()
        {
            self.ack_at = Some(now + self.config.ack_delay);
            self.timer_moved = true;
        }
        // Room comes back when other receivers' applications drop messages, which nothing
        // here hears of: look again shortly.
        if !self.reasm.starved() {
            self.budget_retry_at = None;
        } else if self.budget_retry_at.is_none() {
            self.budget_retry_at = Some(now + BUDGET_RETRY);
            self.timer_moved = true;
        }
    }

    // ----- time -----

    /// The smoothed RTT, which lengthens the stall timeout on long paths and makes the first
    /// chunk small ([`STARTUP_CHUNK`]).
    pub fn set_srtt(&mut self, srtt: Option<Duration>) {
        self.srtt = srtt;
    }

    /// The smoothed RTT last set.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    fn stall_timeout(&self) -> Duration {
        self.config
            .stall_timeout
            .max(self.srtt.unwrap_or_default() * 8)
    }

    fn idle_clock(&self) -> Instant {
        self.last_heard
            .map_or(self.idle_since, |h| h.max(self.idle_since))
    }

    /// When [`on_timeout`](Self::on_timeout) should next run, if anything is timed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.fatal.is_some() || self.closed {
            return None;
        }
        let mut next = self.ack_at;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(t) = self.budget_retry_at {
            consider(t);
        }
        if let Some(t) = self.stall_base.filter(|_| !self.sb.is_empty()) {
            consider(t + self.stall_timeout());
        }
        if !self.sb.is_empty() {
            let clock = self.idle_clock();
            let idle = self.config.idle_timeout;
            consider(clock + idle);
            let ping_from = self.last_ping.map_or(clock, |p| p.max(clock));
            consider(ping_from + idle / 3);
        }
        next
    }

    /// Whether the earliest deadline moved earlier since the last call: a driver sleeping
    /// until the old one should look again.
    pub fn take_timeout_moved(&mut self) -> bool {
        std::mem::take(&mut self.timer_moved)
    }

    /// Runs what is due at `now`: the delayed ack, resending stalled chunks, and with data
    /// outstanding, pinging a silent peer or failing the session (idle timeout). Returns how
    /// many stalled chunks were queued to go out again, for the driver's log.
    pub fn on_timeout(&mut self, now: Instant) -> usize {
        let mut requeued = 0;
        if self.fatal.is_some() || self.closed {
            return requeued;
        }
        if self.budget_retry_at.is_some_and(|t| now >= t) {
            self.budget_retry_at = None;
            self.reasm.refresh_grant(now);
            self.after_rx_change(now);
        }
        if self.ack_at.is_some_and(|t| now >= t) {
            self.ack_at = None;
            if self.chunks_since_ack > 0 || self.reasm.credit().limit > self.advertised {
                self.ack_now = true;
            }
        }
        let stall = self.stall_timeout();
        if self.stall_base.is_some_and(|t| now >= t + stall) {
            requeued = self.sb.requeue_older_than(now, stall);
            // Chunks requeued keep their old send time until a path takes them; checking
            // again at most every eighth of the timeout keeps a session with no live path
            // from spinning on them.
            let floor = (now + stall / 8).checked_sub(stall).unwrap_or(now);
            self.stall_base = self
                .sb
                .oldest_unacked_sent_at()
                .map(|t| t.max(floor))
                .filter(|_| !self.sb.is_empty());
        }
        if self.sb.is_empty() {
            return requeued;
        }
        let clock = self.idle_clock();
        let silent = now.saturating_duration_since(clock);
        let limit = self.config.idle_timeout;
        if silent >= limit {
            self.fail(Fatal::Timeout {
                what: "waiting for the peer with data outstanding (idle timeout)",
                after: limit,
            });
            return requeued;
        }
        let ping_from = self.last_ping.map_or(clock, |p| p.max(clock));
        if now.saturating_duration_since(ping_from) >= limit / 3 {
            self.last_ping = Some(now);
            if self.control.len() < MAX_QUEUED_CONTROL {
                self.ping(0, false, now);
            }
        }
        requeued
    }

    /// Nanoseconds since the session began, for Ping timestamps.
    pub fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    // ----- paths -----

    /// A path joined the session; the peer hears our state on it.
    pub fn add_path(&mut self, path: PathId) {
        // Its writer may have asked for a transmit first: keep what that recorded.
        self.paths.entry(path).or_default();
        self.ack_now = true;
    }

    /// Asks that `path` be removed gracefully: it takes no more chunks, then sends
    /// Close(StreamClosed) and finishes. Returns false if it was already stopping.
    pub fn stop_path(&mut self, path: PathId) -> bool {
        let s = self.paths.entry(path).or_default();
        !std::mem::replace(&mut s.stopping, true)
    }

    /// Whether `path` is being removed.
    pub fn path_stopping(&self, path: PathId) -> bool {
        self.paths.get(&path).is_some_and(|s| s.stopping)
    }

    /// A path ended. Unless `graceful` (everything it carried arrived) or the session is
    /// ending, its unacknowledged chunks go out again on the others; returns how many.
    pub fn path_ended(&mut self, path: PathId, graceful: bool) -> usize {
        self.paths.remove(&path);
        if graceful || self.closing || self.peer_closed || self.closed || self.fatal.is_some() {
            return 0;
        }
        let n = self.sb.requeue_path(path);
        // Control frames written to the dead path may be lost: send the state again.
        self.ack_now = true;
        n
    }

    // ----- life cycle -----

    /// Ends the session with an error (the first one latches). Every path then sends the
    /// parting Close with its code and finishes.
    pub fn fail(&mut self, fatal: Fatal) -> Fatal {
        if let Some(f) = &self.fatal {
            return f.clone();
        }
        if !self.closed {
            self.fatal = Some(fatal.clone());
            self.ev_failed = true;
        }
        fatal
    }

    /// Begins a graceful end: no new sends. With `goodbye`, every path sends it and finishes.
    pub fn close(&mut self, goodbye: Option<Close>) {
        self.closing = true;
        if goodbye.is_some() {
            self.goodbye = goodbye;
        }
    }

    /// Marks the session torn down by its driver.
    pub fn set_closed(&mut self) {
        self.closed = true;
        self.control.clear();
        self.probes.clear();
    }

    /// Whether paths are sending their parting Close.
    pub fn parting(&self) -> bool {
        self.fatal.is_some() || self.goodbye.is_some()
    }

    /// The Close that tells the peer why this session ends: its failure, else its goodbye.
    pub fn parting_close(&self) -> Option<Close> {
        if let Some(f) = &self.fatal {
            return Some(Close::new(f.close_code(), f.to_error().to_string()));
        }
        self.goodbye.clone()
    }

    /// The latched failure, if any.
    pub fn fatal(&self) -> Option<&Fatal> {
        self.fatal.as_ref()
    }

    /// `close` was called.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// The peer closed gracefully.
    pub fn is_peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// The driver tore the session down.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// A frame has arrived from the peer.
    pub fn heard(&self) -> bool {
        self.last_heard.is_some()
    }

    /// The next thing the driver should know about.
    pub fn poll_event(&mut self) -> Option<Event> {
        if std::mem::take(&mut self.ev_failed) {
            return self.fatal.clone().map(Event::Failed);
        }
        if std::mem::take(&mut self.ev_readable) {
            return Some(Event::Readable);
        }
        if std::mem::take(&mut self.ev_acked) {
            return Some(Event::Acked {
                messages: self.sb.messages_acked(),
            });
        }
        if let Some(e) = self.ev_other.pop_front() {
            return Some(e);
        }
        if std::mem::take(&mut self.ev_closed) {
            return Some(Event::Closed);
        }
        None
    }

    // ----- accounting -----

    /// The send buffer, for counters.
    pub fn send_buffer(&self) -> &SendBuffer {
        &self.sb
    }

    /// The reassembler, for counters.
    pub fn reassembler(&self) -> &Reassembler {
        &self.reasm
    }

    /// Memory held for messages, with peaks.
    pub fn buffers(&self) -> Buffers {
        Buffers {
            send_queued: self.sb.queued_bytes(),
            send_unacked: self.sb.unacked_bytes(),
            send_peak: self.send_peak,
            recv_buffered: self.reasm.buffered_bytes(),
            recv_peak: self.recv_peak,
            duplicates: self.reasm.duplicates(),
        }
    }
}

/// The error for a send or flush after the peer closed gracefully.
pub fn peer_closed() -> Error {
    Error::PeerClosed {
        code: CloseCode::Normal,
        reason: "the peer closed the session".into(),
    }
}
