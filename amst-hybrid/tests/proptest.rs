//! Property tests of the sans-IO halves: whatever the switches, resends, acknowledgement
//! orders and duplicate deliveries, the ledger keeps exactly the unacknowledged messages and
//! the merger yields every message once, in order.

use std::collections::BTreeSet;

use amst_hybrid::ledger::{Pushed, SendLedger};
use amst_hybrid::merger::ReceiveMerger;
use bytes::Bytes;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Send a message of this size on lane `route[idx % len]`.
    Send(usize, usize),
    /// The lane at this index of all lanes reports this many more messages acknowledged.
    Ack(usize, u64),
    /// Switch to one or two fresh lanes.
    Switch(bool),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            6 => (0usize..5000, 0usize..2).prop_map(|(n, l)| Op::Send(n, l)),
            4 => (0usize..8, 1u64..6).prop_map(|(l, n)| Op::Ack(l, n)),
            1 => any::<bool>().prop_map(Op::Switch),
        ],
        1..300,
    )
}

proptest! {
    /// Model: every transport (lane) delivers its messages in order and acknowledges a
    /// prefix. Checks that (1) the ledger releases a message only after some lane that carried
    /// it acknowledged it, (2) after a switch the unacknowledged set is resent, (3) once every
    /// lane of the final route acknowledges all, the ledger is empty, and (4) the merger fed
    /// with every lane's deliveries (duplicates included, lanes interleaved arbitrarily)
    /// yields 0..n exactly once in order.
    #[test]
    fn ledger_and_merger_lose_and_repeat_nothing(ops in ops(), interleave in any::<u64>()) {
        let mut ledger = SendLedger::new(64 << 10);
        // Per lane: what it carried (seqs in transport order) and its acked count.
        let mut lanes: Vec<(Vec<u64>, u64)> = vec![(Vec::new(), 0)];
        let mut route = vec![0usize];
        ledger.switch_route(&[0]);
        let mut sent_payload: Vec<Bytes> = Vec::new();
        for op in ops {
            match op {
                Op::Send(n, l) => {
                    let lane = route[l % route.len()];
                    let msg = Bytes::from(vec![(sent_payload.len() % 251) as u8; n]);
                    let idx_end = lanes[lane].0.len() as u64 + 1;
                    match ledger.push(lane as u64, &msg, idx_end) {
                        Pushed::Seq(s) => {
                            prop_assert_eq!(s, sent_payload.len() as u64);
                            lanes[lane].0.push(s);
                            sent_payload.push(msg);
                        }
                        Pushed::Full => prop_assert!(ledger.unacked_bytes() + n as u64 > 64 << 10),
                        Pushed::Stale => prop_assert!(false, "route lane was stale"),
                    }
                }
                Op::Ack(l, more) => {
                    let l = l % lanes.len();
                    let (carried, acked) = &mut lanes[l];
                    *acked = (*acked + more).min(carried.len() as u64);
                    ledger.on_lane_acked(l as u64, *acked);
                }
                Op::Switch(two) => {
                    let first = lanes.len();
                    lanes.push((Vec::new(), 0));
                    route = vec![first];
                    if two {
                        lanes.push((Vec::new(), 0));
                        route.push(first + 1);
                    }
                    let ids: Vec<u64> = route.iter().map(|&l| l as u64).collect();
                    let resend = ledger.switch_route(&ids);
                    for (seq, msg) in resend {
                        prop_assert_eq!(&msg, &sent_payload[seq as usize]);
                        let lane = route[(seq as usize) % route.len()];
                        let idx_end = lanes[lane].0.len() as u64 + 1;
                        ledger.record_resend(lane as u64, seq, idx_end);
                        lanes[lane].0.push(seq);
                    }
                }
            }
            // (1): released ⇒ acknowledged by some lane that carried it.
            for seq in 0..sent_payload.len() as u64 {
                let acked_somewhere = lanes
                    .iter()
                    .any(|(c, a)| c[..*a as usize].contains(&seq));
                prop_assert_eq!(!ledger.is_unacked(seq), acked_somewhere, "seq {}", seq);
            }
        }
        // (3): the final route acknowledges everything it carried.
        for &l in &route {
            let n = lanes[l].0.len() as u64;
            lanes[l].1 = n;
            ledger.on_lane_acked(l as u64, n);
        }
        // Anything not yet acked was resent on the final route at the last switch or sent
        // there since, so the ledger must now be empty.
        prop_assert!(ledger.is_empty(), "{} left", ledger.unacked_messages());

        // (4): feed the merger every lane's full delivery stream, interleaved pseudo-randomly.
        let mut merger = ReceiveMerger::new(u64::MAX, u64::MAX);
        let mut cursors = vec![0usize; lanes.len()];
        let mut rng = interleave | 1;
        let mut out = Vec::new();
        loop {
            let live: Vec<usize> = (0..lanes.len()).filter(|&i| cursors[i] < lanes[i].0.len()).collect();
            if live.is_empty() { break; }
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            let l = live[(rng as usize) % live.len()];
            let seq = lanes[l].0[cursors[l]];
            cursors[l] += 1;
            merger.insert(seq, sent_payload[seq as usize].clone()).unwrap();
            while let Some(m) = merger.pop() { out.push(m); }
        }
        prop_assert_eq!(out.len(), sent_payload.len());
        prop_assert_eq!(out, sent_payload);
    }

    /// The merger alone: any arrival order with any duplicates gives 0..n once, in order.
    #[test]
    fn merger_orders_any_arrivals(n in 0u64..200, extra in prop::collection::vec(0u64..200, 0..200), seed in any::<u64>()) {
        let mut arrivals: Vec<u64> = (0..n).chain(extra.into_iter().filter(|&e| e < n)).collect();
        let mut rng = seed | 1;
        for i in (1..arrivals.len()).rev() {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            arrivals.swap(i, (rng as usize) % (i + 1));
        }
        let mut m = ReceiveMerger::new(u64::MAX, u64::MAX);
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for s in arrivals {
            let dup = !seen.insert(s);
            let r = m.insert(s, Bytes::from(s.to_be_bytes().to_vec())).unwrap();
            prop_assert_eq!(r == amst_hybrid::merger::Merged::Duplicate, dup);
            while let Some(b) = m.pop() { out.push(u64::from_be_bytes(b[..].try_into().unwrap())); }
        }
        prop_assert_eq!(out, (0..n).collect::<Vec<_>>());
        m.set_end(n).unwrap();
        prop_assert!(m.is_finished());
    }
}
