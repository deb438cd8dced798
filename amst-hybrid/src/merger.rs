//! The receiver's half of lossless switching, sans-IO: messages arrive from any number of
//! transports, in any order, any number of times; they leave exactly once, in sequence order.
//!
//! Memory: messages that arrive ahead of a gap wait in `pending`. The sender never has more than
//! its window unacknowledged, so a gap is at most one window wide plus whatever the transports
//! acknowledged but have not handed over yet; `max_pending_bytes` and `max_pending_messages`
//! are the safety net that turns a misbehaving peer into an error instead of growth. Each
//! message counts [`REORDER_MESSAGE_COST`] bytes besides its payload, so a flood of empty
//! messages is bounded too. (The payloads stay charged to the transports' memory budget
//! while they wait here.) Messages ready for the application wait
//! in `ready`, and the reader stops pulling from transports while `ready` is over its limit, so
//! that transport credit pushes back on the sender.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::{Error, Result};

/// Bytes each message held ahead of a gap counts besides its payload: about what its entry
/// costs in memory.
pub const REORDER_MESSAGE_COST: u64 = 128;

/// What [`ReceiveMerger::insert`] did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merged {
    /// New; delivered or held until the gap before it fills.
    New,
    /// Seen before; dropped.
    Duplicate,
}

/// Merges per-transport deliveries into one ordered, duplicate-free sequence.
#[derive(Debug)]
pub struct ReceiveMerger {
    next: u64,
    pending: BTreeMap<u64, Bytes>,
    pending_bytes: u64,
    max_pending_bytes: u64,
    max_pending_messages: u64,
    ready: VecDeque<Bytes>,
    ready_bytes: u64,
    duplicates: u64,
    delivered: u64,
    delivered_bytes: u64,
    end: Option<u64>,
}

impl ReceiveMerger {
    /// An empty merger expecting message 0 that holds at most `max_pending_bytes` (payloads
    /// plus [`REORDER_MESSAGE_COST`] each) and `max_pending_messages` ahead of a gap.
    pub fn new(max_pending_bytes: u64, max_pending_messages: u64) -> Self {
        ReceiveMerger {
            next: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            max_pending_bytes,
            max_pending_messages,
            ready: VecDeque::new(),
            ready_bytes: 0,
            duplicates: 0,
            delivered: 0,
            delivered_bytes: 0,
            end: None,
        }
    }

    /// Takes message `seq`.
    pub fn insert(&mut self, seq: u64, msg: Bytes) -> Result<Merged> {
        if seq < self.next || self.pending.contains_key(&seq) {
            self.duplicates += 1;
            return Ok(Merged::Duplicate);
        }
        if let Some(end) = self.end
            && seq >= end
        {
            return Err(Error::protocol(format!(
                "message {seq} arrived after the peer said it sent only {end}"
            )));
        }
        if seq == self.next {
            self.push_ready(msg);
            while let Some(m) = self.pending.remove(&self.next) {
                self.pending_bytes -= m.len() as u64 + REORDER_MESSAGE_COST;
                self.push_ready(m);
            }
        } else {
            let len = msg.len() as u64 + REORDER_MESSAGE_COST;
            if self.pending_bytes + len > self.max_pending_bytes {
                return Err(Error::protocol(format!(
                    "message {seq} would hold {} bytes out of order waiting for message {} (max_reorder_bytes {}, counting {REORDER_MESSAGE_COST} per message)",
                    self.pending_bytes + len,
                    self.next,
                    self.max_pending_bytes
                )));
            }
            if self.pending.len() as u64 >= self.max_pending_messages {
                return Err(Error::protocol(format!(
                    "message {seq} would be message {} held out of order waiting for message {} (max_reorder_messages {})",
                    self.pending.len() + 1,
                    self.next,
                    self.max_pending_messages
                )));
            }
            self.pending_bytes += len;
            self.pending.insert(seq, msg);
        }
        Ok(Merged::New)
    }

    fn push_ready(&mut self, m: Bytes) {
        self.ready_bytes += m.len() as u64;
        self.ready.push_back(m);
        self.next += 1;
    }

    /// The next message in order, if it is here.
    pub fn pop(&mut self) -> Option<Bytes> {
        let m = self.ready.pop_front()?;
        self.ready_bytes -= m.len() as u64;
        self.delivered += 1;
        self.delivered_bytes += m.len() as u64;
        Some(m)
    }

    /// The peer said it sent exactly `messages` messages.
    pub fn set_end(&mut self, messages: u64) -> Result<()> {
        let highest = self.pending.keys().next_back().map(|s| s + 1).unwrap_or(0);
        if messages < self.next.max(highest) {
            return Err(Error::protocol(format!(
                "the peer said it sent {messages} messages, but {} arrived",
                self.next.max(highest)
            )));
        }
        self.end = Some(messages);
        Ok(())
    }

    /// Whether the peer said goodbye and every message it sent has been popped.
    pub fn is_finished(&self) -> bool {
        self.end == Some(self.next) && self.ready.is_empty()
    }

    /// The sequence number expected next.
    pub fn next_expected(&self) -> u64 {
        self.next
    }

    /// Bytes waiting for the application.
    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }

    /// Bytes held ahead of a gap, with [`REORDER_MESSAGE_COST`] for each message.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Duplicates dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Messages popped so far, and their bytes.
    pub fn delivered(&self) -> (u64, u64) {
        (self.delivered, self.delivered_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(i: u64) -> Bytes {
        Bytes::from(i.to_be_bytes().to_vec())
    }

    #[test]
    fn reorders_drops_duplicates_and_finishes() {
        let mut r = ReceiveMerger::new(1 << 20, 100);
        assert_eq!(r.insert(1, m(1)).unwrap(), Merged::New);
        assert_eq!(r.pop(), None, "gap at 0");
        assert_eq!(r.insert(1, m(1)).unwrap(), Merged::Duplicate);
        r.insert(0, m(0)).unwrap();
        assert_eq!(r.insert(0, m(0)).unwrap(), Merged::Duplicate);
        assert_eq!(r.pop(), Some(m(0)));
        assert_eq!(r.pop(), Some(m(1)));
        r.set_end(3).unwrap();
        assert!(!r.is_finished());
        r.insert(2, m(2)).unwrap();
        assert!(r.insert(3, m(3)).is_err(), "past the announced end");
        assert_eq!(r.pop(), Some(m(2)));
        assert!(r.is_finished());
        assert_eq!(r.duplicates(), 2);
    }

    #[test]
    fn out_of_order_bytes_are_bounded() {
        let mut r = ReceiveMerger::new(2 * (8 + REORDER_MESSAGE_COST), 100);
        r.insert(1, m(1)).unwrap();
        r.insert(2, m(2)).unwrap();
        let err = r.insert(3, m(3)).unwrap_err().to_string();
        assert!(
            err.contains("waiting for message 0") && err.contains("max_reorder_bytes"),
            "{err}"
        );
        assert_eq!(r.pending_bytes(), 2 * (8 + REORDER_MESSAGE_COST));
        r.insert(0, m(0)).unwrap();
        assert_eq!(r.pending_bytes(), 0);
        assert!(r.set_end(2).is_err(), "3 messages arrived");
    }

    #[test]
    fn out_of_order_messages_are_counted_even_when_empty() {
        let mut r = ReceiveMerger::new(1 << 20, 3);
        for seq in 1..=3 {
            r.insert(seq, Bytes::new()).unwrap();
        }
        let err = r.insert(4, Bytes::new()).unwrap_err().to_string();
        assert!(err.contains("max_reorder_messages 3"), "{err}");
        let mut r = ReceiveMerger::new(10 * REORDER_MESSAGE_COST, 1000);
        for seq in 1..=10 {
            r.insert(seq, Bytes::new()).unwrap();
        }
        let err = r.insert(11, Bytes::new()).unwrap_err().to_string();
        assert!(err.contains("max_reorder_bytes"), "{err}");
    }
}
