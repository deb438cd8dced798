//! The sender's half of reliable delivery: messages in, chunks out, each kept until the peer
//! acknowledges it, and sent again when the stream that carried it dies or stalls.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{AckFrame, Credit, DataChunk};
use crate::{Error, ProtocolError};

/// Identifies the path a chunk went out on (a TCP stream index, a transport generation), so
/// that its chunks can be sent again when that path dies.
pub type PathId = u32;

#[derive(Debug)]
struct InFlight {
    chunk: DataChunk,
    path: Option<PathId>,
    sent_at: Option<Instant>,
    sends: u32,
}

fn key(chunk: &DataChunk) -> (u64, u64) {
    (chunk.session_offset, chunk.msg_id)
}

/// A chunk to put on the wire, and whether it is a retransmission.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The chunk; cloning it is cheap (the payload is a `Bytes`).
    pub chunk: DataChunk,
    /// Whether this chunk was sent before.
    pub retransmit: bool,
}

/// What an acknowledgement changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Payload bytes acknowledged for the first time.
    pub newly_acked_bytes: u64,
    /// Messages whose every byte is now acknowledged, counted from the first.
    pub messages_acked: u64,
}

/// A queued message: a header and a payload sent as one message without being joined. A
/// chunk never spans the two, so both go out as slices of what the caller gave.
#[derive(Debug)]
struct Parts {
    head: Bytes,
    body: Bytes,
}

impl Parts {
    fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` bytes from `offset`, stopping at the end of the header.
    fn slice(&self, offset: usize, max: usize) -> Bytes {
        let h = self.head.len();
        if offset < h {
            self.head.slice(offset..h.min(offset + max))
        } else {
            let o = offset - h;
            self.body.slice(o..self.body.len().min(o + max))
        }
    }
}

/// Chunks messages, tracks what is unacknowledged and where it went, and obeys the peer's
/// credit. Sans-IO: the caller supplies `now` and does the sending.
#[derive(Debug)]
pub struct SendBuffer {
    max_message: u64,
    next_msg_id: u64,
    /// Session offset of the next byte not yet chunked.
    next_offset: u64,
    /// Messages queued, not fully chunked yet: (msg_id, base offset, bytes, next msg offset).
    queue: VecDeque<(u64, u64, Parts, u64)>,
    queued_bytes: u64,
    /// Keyed by (session offset, message id): an empty message shares its offset with the
    /// first chunk of the next one.
    unacked: BTreeMap<(u64, u64), InFlight>,
    retransmit: BTreeMap<(u64, u64), ()>,
    unacked_bytes: u64,
    cumulative_acked: u64,
    messages_acked: u64,
    credit: Credit,
    retransmissions: u64,
}

impl SendBuffer {
    /// An empty buffer that may send nothing until the peer grants credit.
    pub fn new(max_message: u64) -> Self {
        SendBuffer {
            max_message,
            next_msg_id: 0,
            next_offset: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            unacked: BTreeMap::new(),
            retransmit: BTreeMap::new(),
            unacked_bytes: 0,
            cumulative_acked: 0,
            messages_acked: 0,
            credit: Credit {
                limit: 0,
                max_msg_id: 0,
            },
            retransmissions: 0,
        }
    }

    /// Queues a message; returns its id.
    pub fn push(&mut self, message: Bytes) -> Result<u64, Error> {
        self.push_parts(Bytes::new(), message)
    }

    /// Queues one message made of `header` then `payload`, without joining them: the header
    /// goes out as its own chunk (or chunks) and the payload as slices of itself. Returns the
    /// message's id.
    pub fn push_parts(&mut self, header: Bytes, payload: Bytes) -> Result<u64, Error> {
        let message = Parts {
            head: header,
            body: payload,
        };
        let len = message.len() as u64;
        if len > self.max_message {
            return Err(Error::MessageTooLarge {
                len,
                limit: self.max_message,
            });
        }
        let id = self.next_msg_id;
        self.next_msg_id += 1;
        let base = self
            .queue
            .back()
            .map(|(_, b, m, _)| b + m.len() as u64)
            .unwrap_or(self.next_offset);
        self.queued_bytes += len;
        self.queue.push_back((id, base, message, 0));
        Ok(id)
    }

    /// Applies the peer's credit; stale (smaller) credit is ignored.
    pub fn on_credit(&mut self, credit: Credit) {
        self.credit.limit = self.credit.limit.max(credit.limit);
        self.credit.max_msg_id = self.credit.max_msg_id.max(credit.max_msg_id);
    }

    /// The next chunk to send, at most `max_chunk` payload bytes: a retransmission first,
    /// else new data if credit allows. Record where it went with [`on_sent`](Self::on_sent).
    pub fn next_chunk(&mut self, max_chunk: usize) -> Option<Outgoing> {
        self.take_chunk(max_chunk, true)
    }

    /// Like [`next_chunk`](Self::next_chunk), but leaves the chunk's `crc` at 0, so that a
    /// caller holding this buffer behind a lock can compute it after releasing the lock with
    /// [`DataChunk::seal`]. Retransmitted chunks come back unsealed too: a buffer used this
    /// way must have every chunk sealed before it goes out.
    pub fn next_chunk_unsealed(&mut self, max_chunk: usize) -> Option<Outgoing> {
        self.take_chunk(max_chunk, false)
    }

    fn take_chunk(&mut self, max_chunk: usize, seal: bool) -> Option<Outgoing> {
        while let Some((key, ())) = self.retransmit.pop_first() {
            let Some(f) = self.unacked.get(&key) else {
                continue;
            };
            return Some(Outgoing {
                chunk: f.chunk.clone(),
                retransmit: true,
            });
        }
        let (id, base, msg, msg_offset) = self.queue.front_mut()?;
        if *id >= self.credit.max_msg_id {
            return None;
        }
        let start = *base + *msg_offset;
        let remaining = msg.len() as u64 - *msg_offset;
        let allowed = self.credit.limit.saturating_sub(start);
        let take = remaining.min(max_chunk.max(1) as u64).min(allowed);
        if take == 0 && remaining > 0 {
            return None;
        }
        let payload = msg.slice(*msg_offset as usize, take as usize);
        let take = payload.len() as u64;
        let chunk = if seal {
            DataChunk::new(start, *id, *msg_offset, msg.len() as u64, payload)
        } else {
            DataChunk {
                session_offset: start,
                msg_id: *id,
                msg_offset: *msg_offset,
                msg_len: msg.len() as u64,
                crc: 0,
                payload,
            }
        };
        *msg_offset += take;
        self.queued_bytes -= take;
        self.next_offset = start + take;
        if *msg_offset == msg.len() as u64 {
            self.queue.pop_front();
        }
        self.unacked_bytes += take;
        self.unacked.insert(
            (start, chunk.msg_id),
            InFlight {
                chunk: chunk.clone(),
                path: None,
                sent_at: None,
                sends: 0,
            },
        );
        Some(Outgoing {
            chunk,
            retransmit: false,
        })
    }

    /// Records that `chunk` went out on `path` at `now`.
    pub fn on_sent(&mut self, chunk: &DataChunk, path: PathId, now: Instant) {
        if let Some(f) = self.unacked.get_mut(&key(chunk)) {
            f.sends += 1;
            if f.sends > 1 {
                self.retransmissions += 1;
            }
            f.path = Some(path);
            f.sent_at = Some(now);
        }
    }

    /// Puts a chunk that was taken but could not be sent back at the front of the line.
    pub fn unsend(&mut self, chunk: &DataChunk) {
        if self.unacked.contains_key(&key(chunk)) {
            self.retransmit.insert(key(chunk), ());
        }
    }

    /// Applies an acknowledgement. Acks beyond what was sent are a protocol error.
    pub fn on_ack(&mut self, ack: &AckFrame) -> Result<AckOutcome, ProtocolError> {
        let sent_end = self.next_offset;
        let top = ack.ranges.last().map_or(ack.cumulative, |r| r.end);
        if top > sent_end || ack.messages > self.next_msg_id {
            return Err(ProtocolError::Inconsistent(format!(
                "ack of {top} bytes and {} messages, but {sent_end} bytes and {} messages were sent",
                ack.messages, self.next_msg_id
            )));
        }
        let mut out = AckOutcome::default();
        self.cumulative_acked = self.cumulative_acked.max(ack.cumulative);
        if ack.messages > self.messages_acked {
            out.messages_acked = ack.messages - self.messages_acked;
            self.messages_acked = ack.messages;
        }
        let (cumulative, messages) = (self.cumulative_acked, self.messages_acked);
        // Chunks wholly below the cumulative point, or of messages known complete (which
        // covers empty messages, whose chunks carry no bytes to acknowledge).
        while let Some(entry) = self.unacked.first_entry() {
            let c = &entry.get().chunk;
            let done = if c.payload.is_empty() {
                c.msg_id < messages
            } else {
                c.session_end() <= cumulative || c.msg_id < messages
            };
            if !done {
                break;
            }
            let f = entry.remove();
            self.forget(&f, &mut out);
        }
        for r in &ack.ranges {
            let inside: Vec<(u64, u64)> = self
                .unacked
                .range((r.start, 0)..(r.end, 0))
                .filter(|(_, f)| !f.chunk.payload.is_empty() && f.chunk.session_end() <= r.end)
                .map(|(&o, _)| o)
                .collect();
            for o in inside {
                if let Some(f) = self.unacked.remove(&o) {
                    self.forget(&f, &mut out);
                }
            }
        }
        Ok(out)
    }

    fn forget(&mut self, f: &InFlight, out: &mut AckOutcome) {
        self.retransmit.remove(&key(&f.chunk));
        let len = f.chunk.payload.len() as u64;
        self.unacked_bytes -= len;
        out.newly_acked_bytes += len;
    }

    /// Queues every unacknowledged chunk that went out on `path` for retransmission; returns
    /// how many.
    pub fn requeue_path(&mut self, path: PathId) -> usize {
        let lost: Vec<(u64, u64)> = self
            .unacked
            .iter()
            .filter(|(_, f)| f.path == Some(path))
            .map(|(&o, _)| o)
            .collect();
        let n = lost.len();
        for o in lost {
            self.retransmit.insert(o, ());
        }
        n
    }

    /// Queues every unacknowledged chunk sent before `now - timeout` for retransmission;
    /// returns how many.
    pub fn requeue_older_than(&mut self, now: Instant, timeout: Duration) -> usize {
        let lost: Vec<(u64, u64)> = self
            .unacked
            .iter()
            .filter(|(o, f)| {
                f.sent_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= timeout)
                    && !self.retransmit.contains_key(o)
            })
            .map(|(&o, _)| o)
            .collect();
        let n = lost.len();
        for o in lost {
            self.retransmit.insert(o, ());
        }
        n
    }

    /// Queues every unacknowledged chunk for retransmission (a new transport takes over).
    pub fn requeue_all(&mut self) -> usize {
        let all: Vec<(u64, u64)> = self.unacked.keys().copied().collect();
        let n = all.len();
        for o in all {
            self.retransmit.insert(o, ());
        }
        n
    }

    /// The oldest send time among unacknowledged chunks, for a stall timer.
    pub fn oldest_unacked_sent_at(&self) -> Option<Instant> {
        self.unacked.values().filter_map(|f| f.sent_at).min()
    }

    /// Payload bytes queued but not yet chunked.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// Payload bytes chunked and not yet acknowledged.
    pub fn unacked_bytes(&self) -> u64 {
        self.unacked_bytes
    }

    /// Whether anything is queued, unacknowledged or waiting for retransmission.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.unacked.is_empty() && self.messages_acked == self.next_msg_id
    }

    /// The byte offset up to which the peer's credit allows sending.
    pub fn credit_limit(&self) -> u64 {
        self.credit.limit
    }

    /// Whether a chunk is ready to go now (a retransmission, or new data within credit).
    pub fn has_sendable(&self) -> bool {
        !self.retransmit.is_empty()
            || self.queue.front().is_some_and(|(id, base, m, off)| {
                *id < self.credit.max_msg_id
                    && (base + off < self.credit.limit
                        || (m.is_empty() && *base <= self.credit.limit))
            })
    }

    /// Messages queued so far.
    pub fn messages_sent(&self) -> u64 {
        self.next_msg_id
    }

    /// The first `n` messages are acknowledged whole.
    pub fn messages_acked(&self) -> u64 {
        self.messages_acked
    }

    /// Chunks sent more than once.
    pub fn retransmissions(&self) -> u64 {
        self.retransmissions
    }

    /// Every byte below this session offset is acknowledged.
    pub fn cumulative_acked(&self) -> u64 {
        self.cumulative_acked
    }
}
