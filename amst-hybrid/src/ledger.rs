//! The sender's half of lossless switching, sans-IO: every message gets a hybrid sequence
//! number and is kept until a transport that carried it reports it acknowledged.
//!
//! Acknowledgement comes from the transports themselves: `Transport::acked` says the first N
//! messages *sent on that transport* reached the peer whole (a prefix). Each
//! lane (one transport in one session) logs, for every data message it carried, the transport
//! message count after it (`idx_end`) and its sequence number. When the lane's acked count
//! reaches `idx_end`, the message is released. A message resent on a second lane is released by
//! whichever lane acknowledges it first.
//!
//! Messages are only pushed on lanes of the current route. [`SendLedger::switch_route`] changes
//! the route and returns every unacknowledged message, to be resent on the new lanes; a sender
//! that raced the switch gets [`Pushed::Stale`] and retries on the new route.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// Identifies one transport within one session.
pub type LaneId = u64;

#[derive(Debug, Default)]
struct LaneLog {
    acked: u64,
    /// (transport message count after this message, hybrid seq), ascending in the count,
    /// which is all the prefix release needs.
    log: VecDeque<(u64, u64)>,
}

/// What [`SendLedger::push`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored under this sequence number; send it.
    Seq(u64),
    /// The window is full; wait for acknowledgements and try again.
    Full,
    /// The lane is not in the current route any more; reload the route and try again.
    Stale,
}

/// What an acknowledgement released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Messages released.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Numbers messages, keeps each until acknowledged, and bounds what is unacknowledged.
#[derive(Debug)]
pub struct SendLedger {
    window: u64,
    next_seq: u64,
    /// Sequence number of `slots[0]`.
    base: u64,
    /// `None` once acknowledged; the front is trimmed so the first slot is always unacked.
    slots: VecDeque<Option<Bytes>>,
    unacked_bytes: u64,
    unacked_messages: u64,
    acked_bytes: u64,
    route: Vec<LaneId>,
    lanes: HashMap<LaneId, LaneLog>,
}

impl SendLedger {
    /// An empty ledger that lets at most `window` bytes be unacknowledged (a single larger
    /// message is still allowed when nothing else is outstanding).
    pub fn new(window: u64) -> Self {
        SendLedger {
            window,
            next_seq: 0,
            base: 0,
            slots: VecDeque::new(),
            unacked_bytes: 0,
            unacked_messages: 0,
            acked_bytes: 0,
            route: Vec::new(),
            lanes: HashMap::new(),
        }
    }

    /// Whether `lane` belongs to the current route.
    pub fn in_route(&self, lane: LaneId) -> bool {
        self.route.contains(&lane)
    }

    /// Stores `msg` as the next message, sent on `lane`, whose transport will have carried
    /// `idx_end` messages once it is queued.
    pub fn push(&mut self, lane: LaneId, msg: &Bytes, idx_end: u64) -> Pushed {
        if !self.in_route(lane) {
            return Pushed::Stale;
        }
        let len = msg.len() as u64;
        if self.unacked_messages > 0 && self.unacked_bytes + len > self.window {
            return Pushed::Full;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.slots.is_empty() {
            self.base = seq;
        }
        self.slots.push_back(Some(msg.clone()));
        self.unacked_bytes += len;
        self.unacked_messages += 1;
        self.lanes
            .entry(lane)
            .or_default()
            .log
            .push_back((idx_end, seq));
        Pushed::Seq(seq)
    }

    /// Records that unacknowledged message `seq` was sent again on `lane`.
    pub fn record_resend(&mut self, lane: LaneId, seq: u64, idx_end: u64) {
        if self.get(seq).is_some() {
            self.lanes
                .entry(lane)
                .or_default()
                .log
                .push_back((idx_end, seq));
        }
    }

    /// Installs a new route and returns every unacknowledged message in sequence order, to be
    /// resent on it. Logs of lanes that left the route stay until [`remove_lane`]: their
    /// acknowledgements still release messages.
    ///
    /// [`remove_lane`]: SendLedger::remove_lane
    pub fn switch_route(&mut self, lanes: &[LaneId]) -> Vec<(u64, Bytes)> {
        self.route = lanes.to_vec();
        for &l in lanes {
            self.lanes.entry(l).or_default();
        }
        self.unacked()
    }

    /// Every unacknowledged message, in sequence order.
    pub fn unacked(&self) -> Vec<(u64, Bytes)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|b| (self.base + i as u64, b.clone())))
            .collect()
    }

    fn get(&self, seq: u64) -> Option<&Bytes> {
        let i = seq.checked_sub(self.base)?;
        self.slots.get(i as usize)?.as_ref()
    }

    /// Applies a lane's acknowledged prefix (its transport's `acked` count).
    pub fn on_lane_acked(&mut self, lane: LaneId, acked: u64) -> Released {
        let mut out = Released::default();
        let Some(log) = self.lanes.get_mut(&lane) else {
            return out;
        };
        if acked <= log.acked {
            return out;
        }
        log.acked = acked;
        let mut seqs = Vec::new();
        while let Some(&(end, seq)) = log.log.front() {
            if end > acked {
                break;
            }
            log.log.pop_front();
            seqs.push(seq);
        }
        for seq in seqs {
            let Some(i) = seq.checked_sub(self.base) else {
                continue;
            };
            if let Some(slot) = self.slots.get_mut(i as usize)
                && let Some(b) = slot.take()
            {
                out.messages += 1;
                out.bytes += b.len() as u64;
            }
        }
        self.unacked_bytes -= out.bytes;
        self.unacked_messages -= out.messages;
        self.acked_bytes += out.bytes;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        out
    }

    /// Forgets a lane (closed or failed); its unacknowledged messages stay in the ledger.
    pub fn remove_lane(&mut self, lane: LaneId) {
        self.lanes.remove(&lane);
        self.route.retain(|&l| l != lane);
    }

    /// Whether `lane` has messages it has not yet seen acknowledged.
    pub fn lane_outstanding(&self, lane: LaneId) -> bool {
        self.lanes.get(&lane).is_some_and(|l| !l.log.is_empty())
    }

    /// Whether message `seq` is still unacknowledged.
    pub fn is_unacked(&self, seq: u64) -> bool {
        self.get(seq).is_some()
    }

    /// Whether nothing is unacknowledged.
    pub fn is_empty(&self) -> bool {
        self.unacked_messages == 0
    }

    /// The sequence number the next message will get (= messages pushed so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes of unacknowledged messages.
    pub fn unacked_bytes(&self) -> u64 {
        self.unacked_bytes
    }

    /// Unacknowledged messages.
    pub fn unacked_messages(&self) -> u64 {
        self.unacked_messages
    }

    /// Bytes acknowledged so far.
    pub fn acked_bytes(&self) -> u64 {
        self.acked_bytes
    }

    /// The lowest sequence number below which everything is acknowledged.
    pub fn acked_prefix(&self) -> u64 {
        if self.slots.is_empty() {
            self.next_seq
        } else {
            self.base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn releases_by_lane_prefix_and_resends_on_switch() {
        let mut l = SendLedger::new(1 << 20);
        l.switch_route(&[1]);
        for i in 0..5u64 {
            assert_eq!(l.push(1, &b(10), i + 1), Pushed::Seq(i));
        }
        assert_eq!(
            l.on_lane_acked(1, 2),
            Released {
                messages: 2,
                bytes: 20
            }
        );
        assert_eq!(l.acked_prefix(), 2);
        // Switch: messages 2..5 must be resent; pushes on lane 1 are now stale.
        let resend = l.switch_route(&[2]);
        assert_eq!(resend.iter().map(|r| r.0).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(l.push(1, &b(1), 6), Pushed::Stale);
        for (i, (seq, _)) in resend.iter().enumerate() {
            // Lane 2 carried an Attach first: data starts at transport index 2.
            l.record_resend(2, *seq, i as u64 + 2);
        }
        // The old lane acknowledges message 2 late; the new one acknowledges the rest.
        assert_eq!(l.on_lane_acked(1, 3).messages, 1);
        assert_eq!(l.on_lane_acked(2, 4).messages, 2, "seq 2 already released");
        assert!(l.is_empty());
        assert_eq!(l.acked_bytes(), 50);
        assert_eq!(l.acked_prefix(), 5);
    }

    #[test]
    fn window_blocks_but_never_a_lone_message() {
        let mut l = SendLedger::new(100);
        l.switch_route(&[1]);
        assert_eq!(l.push(1, &b(1000), 1), Pushed::Seq(0), "alone: allowed");
        assert_eq!(l.push(1, &b(1), 2), Pushed::Full);
        l.on_lane_acked(1, 1);
        assert_eq!(l.push(1, &b(60), 2), Pushed::Seq(1));
        assert_eq!(l.push(1, &b(60), 3), Pushed::Full);
        assert_eq!(l.push(1, &b(40), 3), Pushed::Seq(2));
        assert_eq!(l.unacked_bytes(), 100);
    }

    #[test]
    fn out_of_order_release_across_two_lanes() {
        let mut l = SendLedger::new(1 << 20);
        l.switch_route(&[1, 2]);
        assert_eq!(l.push(1, &b(1), 1), Pushed::Seq(0)); // small lane
        assert_eq!(l.push(2, &b(5), 2), Pushed::Seq(1)); // bulk: header + payload
        assert_eq!(l.push(1, &b(1), 2), Pushed::Seq(2));
        assert_eq!(l.on_lane_acked(1, 2).messages, 2);
        assert_eq!(l.acked_prefix(), 1, "message 1 is still out");
        assert!(l.is_unacked(1) && !l.is_unacked(2));
        assert_eq!(l.on_lane_acked(2, 1).messages, 0, "only the header");
        assert_eq!(l.on_lane_acked(2, 2).messages, 1);
        assert_eq!(l.acked_prefix(), 3);
    }
}
