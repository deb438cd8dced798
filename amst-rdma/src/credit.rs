//! Credit and ring-slot accounting for one queue pair, sans-IO.
//!
//! Two resources at the receiver limit the sender:
//! - **receive work requests.** Every SEND and every RDMA WRITE with immediate consumes one
//!   posted receive at the peer; posting none in time is an RNR error.
//! - **ring slots.** A WRITE with immediate lands in the next slot of the peer's registered
//!   ring, which must not hold a segment the peer has not consumed yet.
//!
//! Both are counted cumulatively (never wrapping in practice: u64), and each side advertises
//! its totals in every segment header. A few receive credits are held back from data, so a
//! side that is out of data credit can still send the control segment that returns credit
//! to its peer; that is what keeps the two directions from deadlocking.

use amst_core::ProtocolError;

/// What a segment will consume at the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A SEND of a small segment into a posted receive buffer.
    Send,
    /// An RDMA WRITE with immediate into the given ring slot.
    RingWrite {
        /// The slot index in the peer's ring.
        slot: u32,
    },
    /// A control or close segment (a SEND that may use the reserved credits).
    Control,
}

/// The credit ledger of one queue pair.
#[derive(Clone, Debug)]
pub struct Flow {
    ring_slots: u64,
    reserve: u64,
    // Our view of the peer.
    peer_recv_advertised: u64,
    recv_ops_sent: u64,
    peer_ring_advertised: u64,
    ring_written: u64,
    // Our own resources.
    recv_posted: u64,
    recv_consumed: u64,
    recv_advertised: u64,
    ring_received: u64,
    ring_released: u64,
    ring_advertised: u64,
    delivered: u64,
    ack_sent: u64,
    peer_acked: u64,
    local_ring_slots: u64,
    update_threshold: u64,
}

/// The header fields to stamp on the next outgoing segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advertisement {
    /// Cumulative receives we have posted.
    pub recv_advertised: u64,
    /// Cumulative ring slots we have made available.
    pub ring_advertised: u64,
    /// Messages delivered to our application.
    pub acked: u64,
}

impl Flow {
    /// A ledger for a peer that posted `peer_recv_depth` receives and has a ring of
    /// `peer_ring_slots` slots, while we post `local_recv_depth` receives and own a ring of
    /// `local_ring_slots`. `reserve` receive credits are kept for control segments.
    pub fn new(
        peer_recv_depth: u64,
        peer_ring_slots: u64,
        local_recv_depth: u64,
        local_ring_slots: u64,
        reserve: u64,
    ) -> Self {
        assert!(
            reserve >= 1,
            "one credit must stay free for control segments"
        );
        Flow {
            ring_slots: peer_ring_slots,
            reserve,
            peer_recv_advertised: peer_recv_depth,
            recv_ops_sent: 0,
            peer_ring_advertised: peer_ring_slots,
            ring_written: 0,
            recv_posted: local_recv_depth,
            recv_consumed: 0,
            recv_advertised: local_recv_depth,
            ring_received: 0,
            ring_released: 0,
            ring_advertised: local_ring_slots,
            delivered: 0,
            ack_sent: 0,
            peer_acked: 0,
            local_ring_slots,
            update_threshold: (local_recv_depth / 4).max(1),
        }
    }

    fn recv_credit(&self) -> u64 {
        self.peer_recv_advertised - self.recv_ops_sent
    }

    /// Whether a small data SEND may go now.
    pub fn can_send(&self) -> bool {
        self.recv_credit() > self.reserve
    }

    /// Whether a ring write may go now (a receive credit and a free slot).
    pub fn can_write_ring(&self) -> bool {
        self.can_send() && self.peer_ring_advertised > self.ring_written
    }

    /// Whether a control segment may go now: it may use the reserve.
    pub fn can_send_control(&self) -> bool {
        self.recv_credit() > 0
    }

    /// Payload bytes the peer's credit lets this side post now: data SENDs into its posted
    /// receives (the control reserve left out) of up to `small_max` bytes each, of which as
    /// many as it has free ring slots may be ring writes of up to `slot_payload` bytes instead.
    pub fn credit_window_bytes(&self, small_max: u64, slot_payload: u64) -> u64 {
        let data = self.recv_credit().saturating_sub(self.reserve);
        let ring = data.min(self.peer_ring_advertised.saturating_sub(self.ring_written));
        ring * slot_payload + (data - ring) * small_max
    }

    /// Records a SEND or a ring write posted; returns what it consumed.
    /// Panics when called without credit: the caller checks first.
    pub fn on_post_data(&mut self, ring: bool) -> Op {
        if ring {
            assert!(self.can_write_ring(), "ring write without credit");
            let slot = (self.ring_written % self.ring_slots) as u32;
            self.ring_written += 1;
            self.recv_ops_sent += 1;
            Op::RingWrite { slot }
        } else {
            assert!(self.can_send(), "send without credit");
            self.recv_ops_sent += 1;
            Op::Send
        }
    }

    /// Records a control segment posted.
    pub fn on_post_control(&mut self) -> Op {
        assert!(self.can_send_control(), "control without credit");
        self.recv_ops_sent += 1;
        Op::Control
    }

    /// What to put in the header of a segment about to be posted; marks it advertised.
    pub fn advertise(&mut self) -> Advertisement {
        self.recv_advertised = self.recv_posted;
        self.ring_advertised = self.local_ring_slots + self.ring_released;
        self.ack_sent = self.delivered;
        Advertisement {
            recv_advertised: self.recv_advertised,
            ring_advertised: self.ring_advertised,
            acked: self.ack_sent,
        }
    }

    /// Whether the reverse path owes the peer a standalone control segment: enough unadvertised
    /// credit piled up, or deliveries not yet acknowledged.
    pub fn needs_update(&self) -> bool {
        let ring_unadvertised = self.local_ring_slots + self.ring_released - self.ring_advertised;
        self.recv_posted - self.recv_advertised >= self.update_threshold
            || ring_unadvertised >= (self.local_ring_slots / 4).max(1)
            || self.delivered > self.ack_sent
    }

    /// A receive completed (a SEND or a WRITE with immediate arrived). For a ring write,
    /// `slot` is the immediate: it must be the next slot in order.
    pub fn on_receive(&mut self, slot: Option<u32>) -> Result<(), ProtocolError> {
        if self.recv_consumed >= self.recv_advertised {
            return Err(ProtocolError::CreditExceeded {
                end: self.recv_consumed + 1,
                granted: self.recv_advertised,
            });
        }
        self.recv_consumed += 1;
        if let Some(slot) = slot {
            let expected = (self.ring_received % self.local_ring_slots) as u32;
            if slot != expected {
                return Err(ProtocolError::Inconsistent(format!(
                    "ring write into slot {slot}, expected slot {expected}"
                )));
            }
            if self.ring_received >= self.ring_advertised {
                return Err(ProtocolError::CreditExceeded {
                    end: self.ring_received + 1,
                    granted: self.ring_advertised,
                });
            }
            self.ring_received += 1;
        }
        Ok(())
    }

    /// We posted `n` more receives (replacing consumed ones).
    pub fn on_recv_posted(&mut self, n: u64) {
        self.recv_posted += n;
        debug_assert!(
            self.recv_posted - self.recv_consumed <= self.recv_advertised.max(self.recv_posted)
        );
    }

    /// Receives that were consumed and may be posted again.
    pub fn recv_to_repost(&self, depth: u64) -> u64 {
        depth - (self.recv_posted - self.recv_consumed)
    }

    /// The oldest unreleased ring slot is consumed; the peer may overwrite it once told.
    pub fn on_ring_released(&mut self) {
        assert!(
            self.ring_released < self.ring_received,
            "released a slot never received"
        );
        self.ring_released += 1;
    }

    /// A whole message was handed to the application.
    pub fn on_delivered(&mut self) {
        self.delivered += 1;
    }

    /// The peer's header arrived: takes its advertisements. `sent` is how many messages we
    /// have queued in total, the bound on what the peer may acknowledge.
    pub fn on_peer_header(
        &mut self,
        recv_advertised: u64,
        ring_advertised: u64,
        acked: u64,
        sent: u64,
    ) -> Result<(), ProtocolError> {
        if recv_advertised < self.peer_recv_advertised
            || ring_advertised < self.peer_ring_advertised
            || acked < self.peer_acked
        {
            return Err(ProtocolError::Inconsistent(
                "a credit or acknowledgement counter went backwards".into(),
            ));
        }
        // More slots than the ring holds beyond what we wrote would let us overwrite data.
        if ring_advertised > self.ring_written + self.ring_slots {
            return Err(ProtocolError::Inconsistent(format!(
                "peer advertised ring slot {ring_advertised} but only {} exist beyond the {} written",
                self.ring_slots, self.ring_written
            )));
        }
        if acked > sent {
            return Err(ProtocolError::Inconsistent(format!(
                "peer acknowledged {acked} messages but {sent} were sent"
            )));
        }
        self.peer_recv_advertised = recv_advertised;
        self.peer_ring_advertised = ring_advertised;
        self.peer_acked = acked;
        Ok(())
    }

    /// Messages the peer has acknowledged (a prefix).
    pub fn peer_acked(&self) -> u64 {
        self.peer_acked
    }

    /// Ring slots received and not yet released (their segments are still in use).
    pub fn ring_unreleased(&self) -> u64 {
        self.ring_received - self.ring_released
    }

    /// The slot the next ring write from the peer lands in.
    pub fn next_local_slot(&self) -> u32 {
        (self.ring_received % self.local_ring_slots) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ledgers wired back to back, moving segments one at a time.
    struct Pair {
        a: Flow,
        b: Flow,
        a_sent_msgs: u64,
    }

    impl Pair {
        fn new() -> Self {
            Pair {
                a: Flow::new(8, 4, 8, 4, 2),
                b: Flow::new(8, 4, 8, 4, 2),
                a_sent_msgs: 0,
            }
        }
    }

    #[test]
    fn data_stops_at_the_reserve_and_control_may_use_it() {
        let mut p = Pair::new();
        let mut n = 0;
        while p.a.can_send() {
            p.a.on_post_data(false);
            n += 1;
        }
        assert_eq!(n, 6, "8 credits minus a reserve of 2");
        assert!(p.a.can_send_control());
        p.a.on_post_control();
        p.a.on_post_control();
        assert!(!p.a.can_send_control());
    }

    #[test]
    fn ring_slots_wrap_in_order_and_are_limited_by_releases() {
        let mut p = Pair::new();
        let mut slots = Vec::new();
        while p.a.can_write_ring() {
            match p.a.on_post_data(true) {
                Op::RingWrite { slot } => slots.push(slot),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(slots, [0, 1, 2, 3], "4 slots, then the ring is full");
        for s in &slots {
            p.b.on_receive(Some(*s)).unwrap();
        }
        // B releases two slots and advertises.
        p.b.on_ring_released();
        p.b.on_ring_released();
        p.b.on_recv_posted(4);
        let adv = p.b.advertise();
        assert_eq!(adv.ring_advertised, 6);
        p.a.on_peer_header(adv.recv_advertised, adv.ring_advertised, adv.acked, 0)
            .unwrap();
        let mut more = Vec::new();
        while p.a.can_write_ring() {
            if let Op::RingWrite { slot } = p.a.on_post_data(true) {
                more.push(slot);
            }
        }
        assert_eq!(more, [0, 1], "exactly the released slots, in ring order");
    }

    #[test]
    fn out_of_order_slot_and_overrun_are_errors() {
        let mut b = Flow::new(8, 4, 8, 4, 2);
        assert!(matches!(
            b.on_receive(Some(1)),
            Err(ProtocolError::Inconsistent(_))
        ));
        let mut b = Flow::new(8, 4, 8, 2, 1);
        b.on_receive(Some(0)).unwrap();
        b.on_receive(Some(1)).unwrap();
        // Slot 0 again, but never released: the peer overran the ring.
        assert!(matches!(
            b.on_receive(Some(0)),
            Err(ProtocolError::CreditExceeded { .. })
        ));
        // More receives than advertised.
        let mut b = Flow::new(8, 4, 2, 4, 1);
        b.on_receive(None).unwrap();
        b.on_receive(None).unwrap();
        assert!(matches!(
            b.on_receive(None),
            Err(ProtocolError::CreditExceeded { .. })
        ));
    }

    #[test]
    fn peer_headers_are_validated() {
        let mut a = Flow::new(8, 4, 8, 4, 2);
        assert!(
            a.on_peer_header(7, 4, 0, 0).is_err(),
            "recv credit went back"
        );
        assert!(
            a.on_peer_header(8, 9, 0, 0).is_err(),
            "ring beyond its size"
        );
        assert!(
            a.on_peer_header(8, 4, 1, 0).is_err(),
            "ack of an unsent message"
        );
        a.on_peer_header(9, 4, 1, 1).unwrap();
        assert_eq!(a.peer_acked(), 1);
        assert!(a.on_peer_header(9, 4, 0, 1).is_err(), "ack went back");
    }

    #[test]
    fn updates_are_owed_for_deliveries_and_piled_up_credit() {
        let mut b = Flow::new(8, 4, 8, 4, 2);
        assert!(!b.needs_update());
        b.on_delivered();
        assert!(b.needs_update());
        b.advertise();
        assert!(!b.needs_update());
        b.on_receive(None).unwrap();
        b.on_recv_posted(1);
        assert!(!b.needs_update(), "one credit is below the threshold of 2");
        b.on_receive(None).unwrap();
        b.on_recv_posted(1);
        assert!(b.needs_update());
        assert_eq!(b.recv_to_repost(8), 0);
    }

    /// Both sides send as much as credit allows and return credit only through headers
    /// (piggybacked or control). Whatever the interleaving, no side ends up stuck with data
    /// to send while neither can send anything: the reserve breaks the cycle.
    #[test]
    fn bidirectional_traffic_never_deadlocks() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _round in 0..50 {
            let mut p = Pair::new();
            // In-flight segments each way: the advertisement they carry.
            let mut to_b: std::collections::VecDeque<(Advertisement, bool)> = Default::default();
            let mut to_a: std::collections::VecDeque<(Advertisement, bool)> = Default::default();
            let (mut a_left, mut b_left) = (500u64, 500u64);
            let mut steps = 0;
            while a_left + b_left > 0 || !to_a.is_empty() || !to_b.is_empty() {
                steps += 1;
                assert!(
                    steps < 100_000,
                    "no progress: a_left {a_left} b_left {b_left}"
                );
                match next() % 4 {
                    0 if a_left > 0 && p.a.can_send() => {
                        p.a.on_post_data(false);
                        to_b.push_back((p.a.advertise(), true));
                        a_left -= 1;
                        p.a_sent_msgs += 1;
                    }
                    1 if b_left > 0 && p.b.can_send() => {
                        p.b.on_post_data(false);
                        to_a.push_back((p.b.advertise(), true));
                        b_left -= 1;
                    }
                    2 => {
                        if let Some((adv, data)) = to_b.pop_front() {
                            p.b.on_receive(None).unwrap();
                            p.b.on_peer_header(
                                adv.recv_advertised,
                                adv.ring_advertised,
                                adv.acked,
                                500 - b_left,
                            )
                            .unwrap();
                            p.b.on_recv_posted(p.b.recv_to_repost(8));
                            if data {
                                p.b.on_delivered();
                            }
                            if p.b.needs_update() && p.b.can_send_control() {
                                p.b.on_post_control();
                                to_a.push_back((p.b.advertise(), false));
                            }
                        }
                    }
                    _ => {
                        if let Some((adv, data)) = to_a.pop_front() {
                            p.a.on_receive(None).unwrap();
                            p.a.on_peer_header(
                                adv.recv_advertised,
                                adv.ring_advertised,
                                adv.acked,
                                p.a_sent_msgs,
                            )
                            .unwrap();
                            p.a.on_recv_posted(p.a.recv_to_repost(8));
                            if data {
                                p.a.on_delivered();
                            }
                            if p.a.needs_update() && p.a.can_send_control() {
                                p.a.on_post_control();
                                to_b.push_back((p.a.advertise(), false));
                            }
                        }
                    }
                }
            }
            assert_eq!(
                p.a.peer_acked(),
                500,
                "every message A sent was acknowledged"
            );
        }
    }
}
