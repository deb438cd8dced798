//! One queue pair's protocol state, sans-IO: amst-core's session protocol
//! ([`amst_core::session::Session`]: send buffer, reassembly, acks and byte credit from the
//! memory budget, pings, the parting Close, the fatal latch) carried over RDMA segments, with
//! the queue pair's own receive and ring-slot ledger ([`Flow`]).
//!
//! The verbs driver only executes what this decides: it asks [`Conn::poll_segment`] to fill a
//! staging buffer and posts it as the returned [`Op`], and hands every receive completion's
//! bytes to [`Conn::on_segment`]. Time is an argument; nothing here touches a device, so the
//! whole protocol runs in tests without RDMA hardware.

use std::time::{Duration, Instant};

use amst_core::codec::{DataChunk, Frame, Limits};
use amst_core::session::{Event, Fatal, Session, SessionConfig, Transmit};
use amst_core::{Charge, PathId, ProtocolError, TransportKind, TransportMetrics};
use bytes::BytesMut;

use crate::config::RdmaConfig;
use crate::credit::{Flow, Op};
use crate::path::PathEstimate;
use crate::wire::{Inbox, Outbox, SEGMENT_HEADER_LEN, SegmentHeader};

/// Receive credits held back for segments without Data frame bytes.
pub const CONTROL_RESERVE: u64 = 2;
/// The one path of a queue pair, in amst-core's terms.
const PATH: PathId = 0;
/// Delay before an ack that no threshold forced goes out.
const ACK_DELAY: Duration = Duration::from_millis(1);
/// amst-core resends chunks unacknowledged this long. An RC queue pair never loses a segment
/// it completed (the NIC retransmits, and a queue pair that gives up ends the session), and
/// it is the only path: a resend could only duplicate. So the stall timer is effectively off.
pub const STALL_NEVER: Duration = Duration::from_secs(24 * 3600);

/// What [`Conn::poll_segment`] put in the staging buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Post {
    /// How to post it: SEND into a receive, or WRITE with immediate into this ring slot.
    pub op: Op,
    /// Bytes to post from the start of the buffer, header included.
    pub len: usize,
    /// It carries the last byte of the parting Close: once it completes (the peer's queue
    /// pair acknowledged it), the queue pair may be torn down without losing it.
    pub parting: bool,
}

/// One queue pair's session. See the [module docs](self).
#[derive(Debug)]
pub struct Conn {
    session: Session,
    flow: Flow,
    out: Outbox,
    inbox: Inbox,
    small_max: usize,
    slot_payload: usize,
    chunk: usize,
    control: BytesMut,
    chunks: Vec<DataChunk>,
    frames: Vec<Frame>,
    /// The parting Close is in `out`.
    finishing: bool,
    /// Its last byte was posted.
    finished: bool,
    path: PathEstimate,
    bytes_sent: u64,
    bytes_received: u64,
    /// The registered receive memory (buffers and ring), pinned for the session's life.
    _pinned: Charge,
}

impl Conn {
    /// A session with a peer that posted `peer_recv_depth` receives and owns a ring of
    /// `peer_ring_slots` slots (from its endpoint record). Its receive credit, and the
    /// registered receive memory, are charged to `config.memory_budget`.
    pub fn new(
        config: &RdmaConfig,
        peer_recv_depth: u32,
        peer_ring_slots: u32,
        now: Instant,
    ) -> Self {
        let budget = config.memory_budget.clone();
        let session = Session::new(
            SessionConfig {
                max_message: config.max_message,
                receive_window: config.receive_window,
                ack_delay: ACK_DELAY,
                idle_timeout: config.idle_timeout,
                stall_timeout: STALL_NEVER,
            },
            budget.clone(),
            now,
        );
        let limits = Limits {
            max_message: config.max_message,
            ..Limits::default()
        };
        Conn {
            session,
            flow: Flow::new(
                peer_recv_depth as u64,
                peer_ring_slots as u64,
                config.recv_depth as u64,
                config.ring_slots as u64,
                CONTROL_RESERVE,
            ),
            out: Outbox::default(),
            inbox: Inbox::new(limits, 2 * config.slot_size as usize, budget.clone()),
            small_max: config.small_max as usize,
            slot_payload: config.slot_payload(),
            chunk: config.chunk_payload(),
            control: BytesMut::with_capacity(4096),
            chunks: Vec::new(),
            frames: Vec::new(),
            finishing: false,
            finished: false,
            path: PathEstimate::default(),
            bytes_sent: 0,
            bytes_received: 0,
            _pinned: budget.charge(config.pinned_receive_bytes()),
        }
    }

    /// The session protocol, for the application's calls (push, read, close, fail).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// See [`session`](Self::session).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// The queue pair's credit ledger.
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// Bytes the application queued and the peer has not acknowledged yet.
    pub fn send_held(&self) -> u64 {
        let sb = self.session.send_buffer();
        sb.queued_bytes() + sb.unacked_bytes()
    }

    /// Fills `buf` (at least `slot_size` bytes) with the next segment, if the peer's credit
    /// allows one and something is owed: frame bytes, or a standalone credit update.
    pub fn poll_segment(&mut self, now: Instant, buf: &mut [u8]) -> Option<Post> {
        if self.finished || !self.flow.can_send_control() {
            return None;
        }
        if self.out.is_empty() && !self.finishing {
            self.refill(now);
        }
        let waiting = self.out.len();
        let (op, room) = if self.flow.can_write_ring() && waiting > self.small_max {
            (self.flow.on_post_data(true), self.slot_payload)
        } else if self.flow.can_send() && waiting > 0 {
            (self.flow.on_post_data(false), self.small_max)
        } else {
            // Only the reserve is left: it carries what holds no Data frame bytes (while
            // parting, anything: the Close must get out), or else a credit update.
            let allowed = if self.finishing {
                waiting
            } else {
                self.out.control_prefix()
            };
            if allowed == 0 && !self.flow.needs_update() {
                return None;
            }
            (self.flow.on_post_control(), allowed.min(self.small_max))
        };
        let n = self
            .out
            .take_into(&mut buf[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + room]);
        let adv = self.flow.advertise();
        SegmentHeader {
            payload_len: n as u32,
            recv_advertised: adv.recv_advertised,
            ring_advertised: adv.ring_advertised,
        }
        .encode(buf);
        let parting = self.finishing && self.out.is_empty();
        self.finished |= parting;
        Some(Post {
            op,
            len: SEGMENT_HEADER_LEN + n,
            parting,
        })
    }

    /// Takes what the session wants sent next into the outbox.
    fn refill(&mut self, now: Instant) {
        let max = if self.flow.can_send() { self.chunk } else { 0 };
        self.control.clear();
        self.chunks.clear();
        let t = self
            .session
            .poll_transmit(PATH, now, max, &mut self.control, &mut self.chunks);
        self.out.push_control(self.control.split().freeze());
        for c in self.chunks.iter_mut() {
            c.seal();
            self.out.push_chunk(c);
            self.bytes_sent += c.payload.len() as u64;
            if c.msg_offset + c.payload.len() as u64 == c.msg_len {
                // The message's last bytes: its ack times the RTT from here.
                self.path.on_message_posted(now);
            }
        }
        if t == Transmit::Finish {
            self.finishing = true;
        }
    }

    /// A receive completed: `bytes` are the segment as it sits in the receive buffer (the
    /// completion's length) or in ring slot `slot` (the immediate). The caller re-posts the
    /// buffer right after; the slot is free once this returns (the bytes are copied out).
    /// An error is latched in the session (its parting Close goes out next) and returned.
    pub fn on_segment(
        &mut self,
        slot: Option<u32>,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), Fatal> {
        // The frames decoded before a bad one are sound: what they complete stays readable.
        let taken = self.take_segment(slot, bytes);
        for f in self.frames.drain(..) {
            if let Frame::Data(c) = &f {
                self.bytes_received += c.payload.len() as u64;
            }
            self.session.on_frame(PATH, f, now)?;
        }
        taken.map_err(|e| self.session.fail(Fatal::Protocol(e)))
    }

    /// Updates the ledger from a segment and decodes its frames into `self.frames`.
    fn take_segment(&mut self, slot: Option<u32>, bytes: &[u8]) -> Result<(), ProtocolError> {
        self.flow.on_receive(slot)?;
        if slot.is_some() {
            self.flow.on_ring_released();
        }
        self.flow.on_recv_posted(1);
        let h = SegmentHeader::decode(bytes)?;
        self.flow
            .on_peer_header(h.recv_advertised, h.ring_advertised)?;
        let payload = &bytes[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + h.payload_len as usize];
        self.frames.clear();
        self.inbox.push(payload, &mut self.frames)
    }

    /// The next event of the session; acknowledgements also time the RTT.
    pub fn poll_event(&mut self, now: Instant) -> Option<Event> {
        let e = self.session.poll_event()?;
        if let Event::Acked { messages } = e {
            self.path.on_acked(messages, now);
        }
        Some(e)
    }

    /// The counters `Transport::metrics` reports.
    pub fn metrics(&self) -> TransportMetrics {
        let mut m = TransportMetrics::new(TransportKind::Rdma);
        let sb = self.session.send_buffer();
        m.bytes_sent = self.bytes_sent;
        m.bytes_received = self.bytes_received;
        m.messages_sent = sb.messages_sent();
        m.messages_acked = sb.messages_acked();
        m.credit_window = Some(sb.credit_limit().saturating_sub(sb.cumulative_acked()));
        let rx = self.session.reassembler();
        m.messages_received = rx.delivered_messages();
        m.receive_held_bytes = Some(rx.buffered_bytes());
        self.path.report(&mut m);
        m.chunk_size = Some(self.chunk as u64);
        m
    }
}

#[cfg(test)]
mod tests;
