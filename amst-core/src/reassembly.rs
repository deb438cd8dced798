//! The receiver's half of reliable delivery: chunks in, whole messages out, in order,
//! exactly once, in bounded memory.
//!
//! Chunks may arrive in any order, from any number of streams or transports, and any number of
//! times. Messages are laid end to end in the session's byte sequence; the receiver grants
//! credit as an absolute offset in it, so the sender can never make it buffer more than the
//! window beyond what the application has taken, plus the message at the head of the line
//! (which must be held whole: a message is delivered as one `Bytes`).
//!
//! Credit is backed by a [`MemoryBudget`]: the window grows only by bytes reserved there, and
//! each session's window is at most its share of the budget, so many sessions divide one
//! budget. A delivered message takes its bytes' reservation along and gives it back when the
//! application drops it. A small minimum window is always granted, so that every session makes
//! progress however full the budget is.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes};

use crate::ProtocolError;
use crate::assembly::{Assembly, Lease};
use crate::budget::{BudgetMember, Charge, MemoryBudget, charged};
use crate::codec::{AckFrame, Credit, DataChunk, DataHeader};
use crate::ranges::RangeSet;

/// How much the receiver buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReassemblyConfig {
    /// Bytes the sender may have outstanding beyond the head message.
    pub window: u64,
    /// Largest message accepted.
    pub max_message: u64,
    /// Most SACK ranges reported in one ack.
    pub max_ack_ranges: usize,
    /// Messages the sender may have outstanding beyond the last one popped; with a budget,
    /// also at most one per KiB of the window granted now.
    pub max_pending_messages: u64,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        ReassemblyConfig {
            window: 64 << 20,
            max_message: 1 << 30,
            max_ack_ranges: 64,
            max_pending_messages: 1 << 16,
        }
    }
}

/// Credit every session gets whatever the budget holds (bounded by `window`): enough for
/// progress, small enough that 64 sessions' worth stays far below the default budget.
pub const MIN_WINDOW: u64 = 256 << 10;
/// Message ids granted per byte of window: a window of tiny (or empty) messages costs
/// bookkeeping, which bytes alone would not bound.
const BYTES_PER_MESSAGE_CREDIT: u64 = 1 << 10;
/// Message ids every session may have outstanding, however small its window.
const MIN_MESSAGE_CREDIT: u64 = 64;

/// How long a receiver waits for room in the budget before it asks for the overdraft.
///
/// A receiver is starved mostly because its own application still holds what it delivered:
/// `amst serve --output` queues whole blocks for the disk, and the hybrid layer keeps
/// delivered messages until `recv`. Those drain within milliseconds. Asking at once, a
/// single session storing a 4 GiB file took the overdraft 6-15 times and peaked at the
/// budget plus up to a quarter of it; the overdraft is for receivers that wait on each
/// other, which no drain will free.
pub const OVERDRAFT_GRACE: Duration = Duration::from_millis(20);

/// What [`Reassembler::insert`] did with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// New bytes were stored.
    New,
    /// Every byte had arrived before; the chunk was dropped.
    Duplicate,
}

/// Where a chunk's payload goes in its message, before the payload has been read: a
/// [`BufMut`] of exactly `chunk_len` bytes, from [`Reassembler::place`]. Read the payload
/// into it, then [`verify`](Self::verify) it. Nothing else writes its range meanwhile: a copy
/// of the same chunk that arrives on another stream moves the message to a new buffer and
/// voids the placement. Dropped unfilled, it gives the range back and the chunk counts as
/// never received.
#[derive(Debug)]
pub struct Placement {
    header: DataHeader,
    lease: Lease,
}

impl Placement {
    /// The chunk being placed.
    pub fn header(&self) -> &DataHeader {
        &self.header
    }

    /// Checks the filled payload against the header's CRC32C, outside any lock: the data
    /// was just written, so it is still in the CPU's caches.
    pub fn verify(self) -> Result<Placed, ProtocolError> {
        if self.lease.remaining() > 0 {
            return Err(ProtocolError::Inconsistent(format!(
                "the chunk of message {} at {} was handed back with {} of its {} bytes unread",
                self.header.msg_id,
                self.header.msg_offset,
                self.lease.remaining(),
                self.header.chunk_len
            )));
        }
        let actual = crate::crc32c(self.lease.filled());
        if actual != self.header.crc {
            return Err(self.header.corrupt(actual));
        }
        Ok(Placed {
            header: self.header,
            lease: self.lease,
        })
    }
}

// SAFETY: `chunk_mut` hands out the unfilled rest of the lease, which is this placement's
// alone, and `advance_mut` counts no more than that.
unsafe impl BufMut for Placement {
    fn remaining_mut(&self) -> usize {
        self.lease.remaining()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller wrote `cnt` bytes of what `chunk_mut` handed out.
        unsafe { self.lease.advance(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.lease.unfilled()
    }
}

/// A placed chunk whose payload has been read and matched its CRC32C, for
/// [`Reassembler::insert_placed`].
#[derive(Debug)]
pub struct Placed {
    header: DataHeader,
    lease: Lease,
}

impl Placed {
    /// The chunk placed.
    pub fn header(&self) -> &DataHeader {
        &self.header
    }
}

/// A message whose chunks are still arriving.
#[derive(Debug)]
struct Partial {
    base: u64,
    len: u64,
    /// The message's bytes as they come. Messages that come in one chunk never get here.
    asm: Assembly,
    received: u64,
}

/// Turns chunks into whole, ordered messages. Sans-IO: feed it chunks, poll it for messages,
/// and send the acks and credit it computes.
#[derive(Debug)]
pub struct Reassembler {
    config: ReassemblyConfig,
    /// Session bytes received, trimmed below the cumulative point.
    received: RangeSet,
    cumulative: u64,
    granted: u64,
    partial: BTreeMap<u64, Partial>,
    complete: VecDeque<(u64, Bytes)>,
    /// Known message extents `(base, len)` by id, for consistency checks; pruned as popped.
    extents: BTreeMap<u64, (u64, u64)>,
    next_pop: u64,
    /// Session offset where the next message to pop begins.
    popped_end: u64,
    buffered: u64,
    duplicates: u64,
    /// Reserves `granted - popped_end` bytes of the budget.
    reserved: Charge,
    /// Message ids below this may be sent; never lowered.
    granted_messages: u64,
    member: BudgetMember,
    /// Since when the head message could not be completed for want of room.
    starved_since: Option<Instant>,
}

impl Reassembler {
    /// A reassembler with a budget of its own that never runs out: it grants `config.window`
    /// bytes beyond what the application has taken.
    pub fn new(config: ReassemblyConfig) -> Self {
        Reassembler::with_budget(config, MemoryBudget::new(u64::MAX))
    }

    /// A reassembler whose credit comes from `budget`, shared with every other receiver
    /// given the same budget.
    pub fn with_budget(config: ReassemblyConfig, budget: MemoryBudget) -> Self {
        let member = budget.join();
        let mut r = Reassembler {
            config,
            received: RangeSet::new(),
            cumulative: 0,
            granted: 0,
            partial: BTreeMap::new(),
            complete: VecDeque::new(),
            extents: BTreeMap::new(),
            next_pop: 0,
            popped_end: 0,
            buffered: 0,
            duplicates: 0,
            reserved: budget.empty_charge(),
            granted_messages: 0,
            member,
            starved_since: None,
        };
        // Only the minimum until data arrives: a session that never receives (the sending
        // side of most) holds almost none of the budget, and the first data opens the window.
        let floor = config.window.min(MIN_WINDOW);
        r.reserved.grow(floor);
        r.granted = floor;
        r.granted_messages = (floor / BYTES_PER_MESSAGE_CREDIT)
            .max(MIN_MESSAGE_CREDIT)
            .min(config.max_pending_messages.max(1));
        r
    }

    /// Stores a chunk. Errors mean the peer broke the protocol (sent past credit, or chunks
    /// that disagree about a message's size or place); the session should end.
    pub fn insert(&mut self, chunk: DataChunk) -> Result<Inserted, ProtocolError> {
        let h = chunk.header();
        if let Some(early) = self.admit(&h)? {
            return Ok(early);
        }
        let (start, end) = (h.session_offset.max(self.cumulative), h.session_end());
        if h.chunk_len as u64 == h.msg_len && !self.partial.contains_key(&h.msg_id) {
            // The whole message came in one chunk, the common case: hand its payload on as
            // it is, no copy, and no partial entry to make and remove.
            self.buffered += self.received.insert(start, end);
            self.complete_message(h.msg_id, chunk.payload);
            self.advance();
            return Ok(Inserted::New);
        }
        self.partial_for(&h)
            .asm
            .write(h.msg_offset as usize, &chunk.payload);
        let fresh = self.received.insert(start, end);
        self.stored(h.msg_id, fresh)?;
        Ok(Inserted::New)
    }

    /// A place in its message for the payload of the chunk whose header is `h`, to be read
    /// there directly and handed back with [`insert_placed`](Self::insert_placed) once
    /// checked. `None` when the chunk should come through [`insert`](Self::insert) instead:
    /// a whole message (kept as the slice it was read into), a duplicate, or a range that
    /// is already being filled. Errors as for `insert`.
    pub fn place(&mut self, h: &DataHeader) -> Result<Option<Placement>, ProtocolError> {
        // A duplicate is counted when it comes through `insert`.
        if h.chunk_len as u64 == h.msg_len || self.is_duplicate(h) || self.admit(h)?.is_some() {
            return Ok(None);
        }
        let lease = self
            .partial_for(h)
            .asm
            .lease(h.msg_offset as usize, h.chunk_len as usize);
        Ok(lease.map(|lease| Placement { header: *h, lease }))
    }

    /// Stores a placed chunk whose payload has been read and checked.
    pub fn insert_placed(&mut self, placed: Placed) -> Result<Inserted, ProtocolError> {
        let Placed { header: h, lease } = placed;
        // A copy of the chunk that came meanwhile voids the lease (see `Assembly::write`);
        // the message may even be complete. Then this one is not counted.
        let filled = self
            .partial
            .get_mut(&h.msg_id)
            .is_some_and(|p| p.asm.fill(lease));
        if !filled {
            return Ok(Inserted::Duplicate);
        }
        let fresh = self
            .received
            .insert(h.session_offset.max(self.cumulative), h.session_end());
        self.stored(h.msg_id, fresh)?;
        Ok(Inserted::New)
    }

    /// The checks every chunk passes before it is stored; `Some` if it is a duplicate.
    fn admit(&mut self, h: &DataHeader) -> Result<Option<Inserted>, ProtocolError> {
        let len = h.chunk_len as u64;
        // The decoder checks these too; chunks may also come from elsewhere (RDMA, tests).
        if h.msg_offset.checked_add(len).is_none_or(|e| e > h.msg_len)
            || h.session_offset < h.msg_offset
            || h.session_offset.checked_add(h.msg_len).is_none()
        {
            return Err(ProtocolError::Inconsistent(format!(
                "chunk of message {} at msg_offset {} (session offset {}) with {len} bytes does not fit its msg_len {}",
                h.msg_id, h.msg_offset, h.session_offset, h.msg_len
            )));
        }
        let end = h.session_end();
        if end > self.granted {
            return Err(ProtocolError::CreditExceeded {
                end,
                granted: self.granted,
            });
        }
        if h.msg_id >= self.granted_messages {
            return Err(ProtocolError::MessageCreditExceeded {
                msg_id: h.msg_id,
                granted: self.granted_messages,
            });
        }
        if h.msg_len > self.config.max_message {
            return Err(ProtocolError::MessageTooLarge {
                msg_id: h.msg_id,
                len: h.msg_len,
                limit: self.config.max_message,
            });
        }
        let budget = self.member.budget();
        if h.msg_len > budget.largest_message() {
            return Err(ProtocolError::MessageOverBudget {
                msg_id: h.msg_id,
                len: h.msg_len,
                limit: budget.largest_message(),
                budget: budget.limit(),
            });
        }
        if self.is_duplicate(h) {
            self.duplicates += 1;
            return Ok(Some(Inserted::Duplicate));
        }
        self.check_extent(h.msg_id, h.session_offset - h.msg_offset, h.msg_len)?;
        Ok(None)
    }

    /// The partial message a chunk belongs to, made on its first chunk.
    fn partial_for(&mut self, h: &DataHeader) -> &mut Partial {
        let base = h.session_offset - h.msg_offset;
        let partial = self.partial.entry(h.msg_id).or_insert_with(|| Partial {
            base,
            len: h.msg_len,
            asm: Assembly::new(h.msg_len as usize),
            received: 0,
        });
        debug_assert_eq!((partial.base, partial.len), (base, h.msg_len));
        partial
    }

    /// Counts `fresh` bytes just written into message `msg_id`, completing it when they
    /// were its last.
    fn stored(&mut self, msg_id: u64, fresh: u64) -> Result<(), ProtocolError> {
        self.buffered += fresh;
        if let Some(partial) = self.partial.get_mut(&msg_id) {
            partial.received += fresh;
            if partial.received == partial.len
                && let Some(p) = self.partial.remove(&msg_id)
            {
                match p.asm.finish() {
                    Ok(message) => self.complete_message(msg_id, message),
                    Err(_) => {
                        return Err(ProtocolError::Inconsistent(format!(
                            "message {msg_id}: every byte counted but not every byte written"
                        )));
                    }
                }
            }
        }
        self.advance();
        Ok(())
    }

    /// Moves the cumulative point past what has arrived, and grants credit for it.
    fn advance(&mut self) {
        self.cumulative = self.received.contiguous_end(self.cumulative);
        self.received.trim_below(self.cumulative);
        self.update_grant(None);
    }

    fn is_duplicate(&self, h: &DataHeader) -> bool {
        if h.msg_id < self.next_pop {
            return true;
        }
        if h.chunk_len == 0 {
            // An empty message is a duplicate once it is known and no longer partial.
            return self.extents.contains_key(&h.msg_id) && !self.partial.contains_key(&h.msg_id);
        }
        let (start, end) = (h.session_offset.max(self.cumulative), h.session_end());
        start >= end || self.received.contains(start, end)
    }

    fn check_extent(&mut self, msg_id: u64, base: u64, len: u64) -> Result<(), ProtocolError> {
        if let Some(&(b, l)) = self.extents.get(&msg_id) {
            if (b, l) != (base, len) {
                return Err(ProtocolError::Inconsistent(format!(
                    "message {msg_id} was at session offset {b} with length {l}, now {base} with length {len}"
                )));
            }
            return Ok(());
        }
        if msg_id == self.next_pop && base != self.popped_end {
            return Err(ProtocolError::Inconsistent(format!(
                "message {msg_id} starts at session offset {base}, but the previous one ended at {}",
                self.popped_end
            )));
        }
        if let Some((&prev_id, &(pb, pl))) = self.extents.range(..msg_id).next_back()
            && (pb + pl > base || (prev_id + 1 == msg_id && pb + pl != base))
        {
            return Err(ProtocolError::Inconsistent(format!(
                "message {msg_id} at {base} overlaps or leaves a gap after message {prev_id} ({pb}+{pl})"
            )));
        }
        if let Some((&next_id, &(nb, _))) = self.extents.range(msg_id + 1..).next()
            && (base + len > nb || (msg_id + 1 == next_id && base + len != nb))
        {
            return Err(ProtocolError::Inconsistent(format!(
                "message {msg_id} ({base}+{len}) overlaps or leaves a gap before message {next_id} at {nb}"
            )));
        }
        self.extents.insert(msg_id, (base, len));
        Ok(())
    }

    fn complete_message(&mut self, msg_id: u64, msg: Bytes) {
        let pos = self.complete.partition_point(|(id, _)| *id < msg_id);
        self.complete.insert(pos, (msg_id, msg));
    }

    /// The next whole message in send order, if it has fully arrived.
    pub fn pop(&mut self) -> Option<Bytes> {
        let (id, _) = self.complete.front()?;
        if *id != self.next_pop {
            return None;
        }
        let (id, msg) = self.complete.pop_front()?;
        let (base, len) = self
            .extents
            .remove(&id)
            .unwrap_or((self.popped_end, msg.len() as u64));
        self.popped_end = base + len;
        self.buffered -= len;
        self.next_pop += 1;
        // The message's bytes stay charged until the application drops it.
        let charge = self.reserved.split(len);
        // The message the overdraft was for is complete: another receiver may need it.
        self.member.release_overdraft();
        self.update_grant(None);
        Some(charged(msg, charge))
    }

    /// Grants what the window and the budget allow; `now` is given by the timer's refresh
    /// only, which may ask for the overdraft once the receiver has starved for
    /// [`OVERDRAFT_GRACE`].
    fn update_grant(&mut self, now: Option<Instant>) {
        // The head message is held whole, so its received prefix does not use the window.
        let head_end = self.head_end();
        let consumed = self.cumulative.min(head_end).max(self.popped_end);
        let floor = self.floor();
        let budget = self.member.budget().share();
        let window = self.config.window.min(budget).max(floor);
        let target = consumed.saturating_add(window);
        // The minimum beyond what the application took is granted whatever the budget holds;
        // the rest only from room in the budget. A receiver that still cannot complete its
        // head message takes the overdraft when it is free, and then the minimum is granted
        // beyond what arrived of the head message too.
        self.grant_at_least(self.popped_end.saturating_add(floor));
        if target > self.granted {
            self.granted += self.reserved.grow_up_to(target - self.granted);
        }
        if !self.starved() && !self.member.holds_overdraft() {
            self.starved_since = None;
            self.member.stop_waiting();
        } else {
            // Time starts at the first refresh that finds it starved (the session's timer
            // comes within a few milliseconds); inserts and pops carry no clock.
            let due = now.is_some_and(|t| {
                let since = *self.starved_since.get_or_insert(t);
                t.saturating_duration_since(since) >= OVERDRAFT_GRACE
            });
            let want = consumed.saturating_add(floor);
            if (self.member.holds_overdraft() || due)
                && self.member.take_overdraft()
                && want > self.granted
            {
                self.granted += self.reserved.grow_into_overdraft(want - self.granted);
            }
        }
        let messages = (window / BYTES_PER_MESSAGE_CREDIT)
            .max(MIN_MESSAGE_CREDIT)
            .min(self.config.max_pending_messages.max(1));
        self.granted_messages = self
            .granted_messages
            .max(self.next_pop.saturating_add(messages));
    }

    /// Grants credit up to `limit` whatever the budget holds.
    fn grant_at_least(&mut self, limit: u64) {
        if limit > self.granted {
            self.reserved.grow(limit - self.granted);
            self.granted = limit;
        }
    }

    /// The acknowledgement to send now: everything received so far.
    pub fn ack(&self) -> AckFrame {
        let complete_prefix = self
            .complete
            .iter()
            .zip(self.next_pop..)
            .take_while(|((id, _), want)| id == want)
            .count() as u64;
        AckFrame {
            messages: self.next_pop + complete_prefix,
            cumulative: self.cumulative,
            ranges: self
                .received
                .ranges_from(self.cumulative + 1, self.config.max_ack_ranges),
        }
    }

    /// The credit to send now: the sender may send session bytes below `limit`, of
    /// messages with ids below `max_msg_id`.
    pub fn credit(&self) -> Credit {
        Credit {
            limit: self.granted,
            max_msg_id: self.granted_messages,
        }
    }

    /// Bytes of the budget this receiver reserves now: credit granted beyond the messages
    /// the application has taken (which carry their own share until dropped).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.bytes()
    }

    /// Every byte below this session offset has arrived.
    pub fn cumulative(&self) -> u64 {
        self.cumulative
    }

    /// Payload bytes held: partial and complete messages not yet popped.
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered
    }

    /// Messages handed out by [`pop`](Self::pop).
    pub fn delivered_messages(&self) -> u64 {
        self.next_pop
    }

    /// Chunks dropped because all their bytes had arrived before.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Whether [`pop`](Self::pop) would return a message now; cheap, so a reader can decide
    /// whether to wake the application without building an ack.
    pub fn has_message(&self) -> bool {
        self.complete
            .front()
            .is_some_and(|(id, _)| *id == self.next_pop)
    }

    /// Whether the head message cannot be completed: part of it is not granted, less than
    /// the minimum window is left beyond what arrived, and the budget has no room (the
    /// overdraft is another receiver's, or used up until applications drop what they hold).
    /// [`refresh_grant`](Self::refresh_grant) later.
    pub fn starved(&self) -> bool {
        let head_end = self.head_end();
        head_end > self.granted && self.granted.saturating_sub(self.cumulative) < self.floor()
    }

    /// Grants what the budget has room for now, or the overdraft if it has come free and
    /// this receiver has starved for [`OVERDRAFT_GRACE`] (the first refresh that finds it
    /// starved starts the wait).
    pub fn refresh_grant(&mut self, now: Instant) {
        self.update_grant(Some(now));
    }

    /// Where the head message ends, once a chunk of it has told its length.
    fn head_end(&self) -> u64 {
        self.extents
            .get(&self.next_pop)
            .map(|&(base, len)| base + len)
            .unwrap_or(self.popped_end)
    }

    /// Credit granted whatever the budget holds.
    fn floor(&self) -> u64 {
        self.config.window.min(MIN_WINDOW)
    }

    /// Whether nothing is buffered or half-received.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.complete.is_empty()
    }
}
