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
//!
//! This is the queue pair's own credit, in work requests and slots. The byte credit (how much
//! the peer may send before the application reads, from the process memory budget) and the
//! acknowledgements are amst-core's session protocol, carried inside the segments.

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
    /// A segment carrying no Data frame bytes (a SEND that may use the reserved credits).
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
            local_ring_slots,
            // At least 2: a standalone update consumes one receive at the peer, so with a
            // threshold of 1 two idle sides would answer each other's updates forever. At most
            // what a peer blocked on the reserve leaves unadvertised (depth - reserve).
            update_threshold: (local_recv_depth / 4)
                .max(2)
                .min(local_recv_depth.saturating_sub(reserve).max(1)),
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
        Advertisement {
            recv_advertised: self.recv_advertised,
            ring_advertised: self.ring_advertised,
        }
    }

    /// Whether the reverse path owes the peer a standalone credit segment: enough unadvertised
    /// credit piled up.
    pub fn needs_update(&self) -> bool {
        let ring_unadvertised = self.local_ring_slots + self.ring_released - self.ring_advertised;
        self.recv_posted - self.recv_advertised >= self.update_threshold
            || ring_unadvertised >= (self.local_ring_slots / 4).max(1)
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

    /// The peer's header arrived: takes its advertisements.
    pub fn on_peer_header(
        &mut self,
        recv_advertised: u64,
        ring_advertised: u64,
    ) -> Result<(), ProtocolError> {
        if recv_advertised < self.peer_recv_advertised
            || ring_advertised < self.peer_ring_advertised
        {
            return Err(ProtocolError::Inconsistent(
                "a receive or ring credit counter went backwards".into(),
            ));
        }
        // More slots than the ring holds beyond what we wrote would let us overwrite data.
        if ring_advertised > self.ring_written + self.ring_slots {
            return Err(ProtocolError::Inconsistent(format!(
                "peer advertised ring slot {ring_advertised} but only {} exist beyond the {} written",
                self.ring_slots, self.ring_written
            )));
        }
        self.peer_recv_advertised = recv_advertised;
        self.peer_ring_advertised = ring_advertised;
        Ok(())
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
    }

    impl Pair {
        fn new() -> Self {
            Pair {
                a: Flow::new(8, 4, 8, 4, 2),
                b: Flow::new(8, 4, 8, 4, 2),
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
        p.a.on_peer_header(adv.recv_advertised, adv.ring_advertised)
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
        assert!(a.on_peer_header(7, 4).is_err(), "recv credit went back");
        assert!(a.on_peer_header(8, 9).is_err(), "ring beyond its size");
        a.on_peer_header(9, 4).unwrap();
        assert!(a.on_peer_header(9, 3).is_err(), "ring credit went back");
    }

    #[test]
    fn updates_are_owed_for_piled_up_credit() {
        let mut b = Flow::new(8, 4, 8, 4, 2);
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
    /// (piggybacked or standalone). Whatever the interleaving, no side ends up stuck with data
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
            // In-flight segments each way: the advertisement they carry, and whether data.
            let mut to_b: std::collections::VecDeque<(Advertisement, bool)> = Default::default();
            let mut to_a: std::collections::VecDeque<(Advertisement, bool)> = Default::default();
            let (mut a_left, mut b_left) = (500u64, 500u64);
            let (mut a_got, mut b_got) = (0u64, 0u64);
            let mut steps = 0;
            while a_left + b_left > 0 || !to_a.is_empty() || !to_b.is_empty() {
                steps += 1;
                assert!(
                    steps < 100_000,
                    "no progress: a_left {a_left} b_left {b_left}"
                );
                let r = next() % 4;
                // Who acts, its data left, the segments it reads (None: it sends) and writes.
                let (me, left, inbox, outbox, got) = match r {
                    0 => (&mut p.a, &mut a_left, None, &mut to_b, &mut b_got),
                    1 => (&mut p.b, &mut b_left, None, &mut to_a, &mut a_got),
                    2 => (
                        &mut p.b,
                        &mut b_left,
                        Some(&mut to_b),
                        &mut to_a,
                        &mut b_got,
                    ),
                    _ => (
                        &mut p.a,
                        &mut a_left,
                        Some(&mut to_a),
                        &mut to_b,
                        &mut a_got,
                    ),
                };
                match inbox {
                    None => {
                        if *left > 0 && me.can_send() {
                            me.on_post_data(false);
                            outbox.push_back((me.advertise(), true));
                            *left -= 1;
                        }
                    }
                    Some(inbox) => {
                        if let Some((adv, data)) = inbox.pop_front() {
                            me.on_receive(None).unwrap();
                            me.on_peer_header(adv.recv_advertised, adv.ring_advertised)
                                .unwrap();
                            me.on_recv_posted(me.recv_to_repost(8));
                            if data {
                                *got += 1;
                            }
                            if me.needs_update() && me.can_send_control() {
                                me.on_post_control();
                                outbox.push_back((me.advertise(), false));
                            }
                        }
                    }
                }
            }
            assert_eq!((a_got, b_got), (500, 500), "every data segment arrived");
        }
    }
}
