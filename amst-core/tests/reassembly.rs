//! Reliable delivery without a network: whatever order, duplication or loss the chunks go
//! through, the receiver yields exactly the messages sent, in order, once each, and never
//! buffers more than the credit it granted.

use std::time::{Duration, Instant};

use amst_core::codec::{Credit, DataChunk};
use amst_core::{
    Inserted, MIN_WINDOW, MemoryBudget, OVERDRAFT_GRACE, Placement, ProtocolError, Reassembler,
    ReassemblyConfig, SendBuffer,
};
use bytes::{BufMut, Bytes};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn messages(sizes: &[usize]) -> Vec<Bytes> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Bytes::from((0..n).map(|j| (i * 7 + j * 13) as u8).collect::<Vec<_>>()))
        .collect()
}

fn all_chunks(msgs: &[Bytes], chunk: usize) -> Vec<DataChunk> {
    let mut tx = SendBuffer::new(1 << 30);
    tx.on_credit(Credit {
        limit: u64::MAX,
        max_msg_id: u64::MAX,
    });
    for m in msgs {
        tx.push(m.clone()).unwrap();
    }
    std::iter::from_fn(|| tx.next_chunk(chunk).map(|o| o.chunk)).collect()
}

/// Takes every message the receiver has ready, in order.
fn pop_all(rx: &mut Reassembler, got: &mut Vec<Bytes>) {
    while let Some(m) = rx.pop() {
        got.push(m);
    }
}

proptest! {
    #[test]
    fn any_interleaving_and_duplication_yields_each_message_once_in_order(
        sizes in proptest::collection::vec(0usize..5000, 1..25),
        chunk in 1usize..2000,
        dup_every in 1usize..6,
        seed in any::<u64>(),
    ) {
        let msgs = messages(&sizes);
        let mut chunks = all_chunks(&msgs, chunk);
        let extra: Vec<DataChunk> = chunks.iter().step_by(dup_every).cloned().collect();
        chunks.extend(extra);
        chunks.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));

        let mut rx = Reassembler::new(ReassemblyConfig { window: u64::MAX / 4, ..Default::default() });
        let mut got = Vec::new();
        for c in chunks {
            rx.insert(c).unwrap();
            pop_all(&mut rx, &mut got);
        }
        prop_assert_eq!(&got, &msgs);
        prop_assert!(rx.is_idle());
        prop_assert_eq!(rx.buffered_bytes(), 0);
        prop_assert_eq!(rx.ack().messages, msgs.len() as u64);
    }

    /// The common case, chunks in order, mixed with local swaps (several streams) and
    /// resends cut at other sizes that overlap what came before; checks the copy into a
    /// message's buffer, which appends in order and fills gaps later.
    #[test]
    fn mostly_in_order_with_swaps_and_overlapping_resends(
        sizes in proptest::collection::vec(0usize..20_000, 1..20),
        chunk in 50usize..3000,
        recut in 50usize..3000,
        swap_percent in 0u32..50,
        resend_percent in 0u32..30,
        seed in any::<u64>(),
    ) {
        let msgs = messages(&sizes);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut chunks = all_chunks(&msgs, chunk);
        for i in 1..chunks.len() {
            if rng.random_ratio(swap_percent, 100) {
                chunks.swap(i - 1, i);
            }
        }
        let recuts = all_chunks(&msgs, recut);
        let (n, m) = (chunks.len(), recuts.len());
        let mut stream = Vec::new();
        for (i, c) in chunks.into_iter().enumerate() {
            stream.push(c);
            if rng.random_ratio(resend_percent, 100) {
                // A resend of about the same region, cut differently: it may overlap what
                // came, what did not yet, or both.
                let near = i * m / n;
                let j = rng.random_range(near.saturating_sub(2)..=(near + 2).min(m - 1));
                stream.push(recuts[j].clone());
            }
        }

        let mut rx = Reassembler::new(ReassemblyConfig { window: u64::MAX / 4, ..Default::default() });
        let mut got = Vec::new();
        for c in stream {
            rx.insert(c).unwrap();
            pop_all(&mut rx, &mut got);
        }
        prop_assert_eq!(&got, &msgs);
        prop_assert!(rx.is_idle());
        prop_assert_eq!(rx.buffered_bytes(), 0);
    }

    #[test]
    fn lossy_reordering_link_delivers_everything_within_the_window(
        sizes in proptest::collection::vec(0usize..20_000, 1..30),
        chunk in 100usize..4000,
        window in 4_000u64..40_000,
        loss_percent in 0u32..40,
        seed in any::<u64>(),
    ) {
        let msgs = messages(&sizes);
        let largest = sizes.iter().copied().max().unwrap_or(0) as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tx = SendBuffer::new(1 << 30);
        let mut rx = Reassembler::new(ReassemblyConfig { window, ..Default::default() });
        for m in &msgs {
            tx.push(m.clone()).unwrap();
        }
        let t0 = Instant::now();
        let mut got = Vec::new();
        let mut peak = 0;
        for round in 0..10_000u32 {
            tx.on_credit(rx.credit());
            let now = t0 + Duration::from_millis(round as u64);
            let mut in_flight = Vec::new();
            while let Some(out) = tx.next_chunk(chunk) {
                tx.on_sent(&out.chunk, 0, now);
                in_flight.push(out.chunk);
            }
            in_flight.shuffle(&mut rng);
            for c in in_flight {
                if rng.random_range(0..100) < loss_percent {
                    continue;
                }
                rx.insert(c).unwrap();
                peak = peak.max(rx.buffered_bytes());
                // The application reads slowly: one message per delivered chunk at most.
                if let Some(m) = rx.pop() {
                    got.push(m);
                }
            }
            tx.on_ack(&rx.ack()).unwrap();
            tx.requeue_older_than(now, Duration::ZERO);
            pop_all(&mut rx, &mut got);
            if tx.is_empty() {
                break;
            }
        }
        prop_assert!(tx.is_empty(), "sender still holds data after 10k rounds");
        prop_assert_eq!(&got, &msgs);
        // Memory: the window beyond the head message, plus the head message held whole.
        prop_assert!(peak <= window + largest, "peak {} > window {} + largest {}", peak, window, largest);
    }
}

#[test]
fn a_message_larger_than_the_window_still_arrives_and_memory_stays_bounded() {
    let window = 64 << 10;
    let big = messages(&[1 << 20, 10, 1 << 20]);
    let mut tx = SendBuffer::new(1 << 30);
    let mut rx = Reassembler::new(ReassemblyConfig {
        window,
        ..Default::default()
    });
    for m in &big {
        tx.push(m.clone()).unwrap();
    }
    let mut got = Vec::new();
    let mut peak = 0;
    for _ in 0..10_000 {
        tx.on_credit(rx.credit());
        while let Some(out) = tx.next_chunk(16 << 10) {
            rx.insert(out.chunk).unwrap();
            peak = peak.max(rx.buffered_bytes());
        }
        tx.on_ack(&rx.ack()).unwrap();
        pop_all(&mut rx, &mut got);
        if tx.is_empty() {
            break;
        }
    }
    assert_eq!(got, big);
    assert!(peak <= window + (1 << 20), "peak {peak}");
}

#[test]
fn data_beyond_the_granted_credit_is_a_protocol_error() {
    let mut rx = Reassembler::new(ReassemblyConfig {
        window: 100,
        ..Default::default()
    });
    let chunk = DataChunk::new(90, 0, 90, 200, Bytes::from(vec![0u8; 20]));
    assert_eq!(
        rx.insert(chunk),
        Err(ProtocolError::CreditExceeded {
            end: 110,
            granted: 100
        })
    );
}

#[test]
fn too_many_pending_messages_is_a_protocol_error() {
    let config = ReassemblyConfig {
        max_pending_messages: 4,
        ..Default::default()
    };
    let mut rx = Reassembler::new(config);
    for id in 0..4 {
        rx.insert(DataChunk::new(id, id, 0, 1, Bytes::from_static(b"x")))
            .unwrap();
    }
    assert!(matches!(
        rx.insert(DataChunk::new(4, 4, 0, 1, Bytes::from_static(b"x"))),
        Err(ProtocolError::MessageCreditExceeded { .. })
    ));
    assert_eq!(rx.credit().max_msg_id, 4);
    rx.pop().unwrap();
    assert_eq!(rx.credit().max_msg_id, 5);
}

#[test]
fn chunks_that_disagree_about_a_message_are_rejected() {
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    rx.insert(DataChunk::new(0, 0, 0, 100, Bytes::from(vec![1u8; 10])))
        .unwrap();
    let liar = DataChunk::new(10, 0, 10, 50, Bytes::from(vec![1u8; 10]));
    assert!(matches!(
        rx.insert(liar),
        Err(ProtocolError::Inconsistent(_))
    ));
    // Message 1 must start where message 0 ends.
    let gap = DataChunk::new(150, 1, 0, 10, Bytes::from(vec![2u8; 10]));
    assert!(matches!(
        rx.insert(gap),
        Err(ProtocolError::Inconsistent(_))
    ));
}

#[test]
fn a_chunk_that_runs_past_its_message_is_rejected_not_a_panic() {
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    rx.insert(DataChunk::new(0, 0, 0, 20, Bytes::from(vec![1u8; 10])))
        .unwrap();
    for bad in [
        DataChunk::new(15, 0, 15, 20, Bytes::from(vec![1u8; 10])),
        DataChunk::new(5, 0, 10, 20, Bytes::from(vec![1u8; 5])),
        DataChunk::new(u64::MAX - 4, 0, 0, 20, Bytes::from(vec![1u8; 5])),
    ] {
        let err = rx.insert(bad).unwrap_err();
        assert!(
            matches!(&err, ProtocolError::Inconsistent(m) if m.contains("msg_len")),
            "{err}"
        );
    }
}

#[test]
fn duplicates_are_counted_and_dropped() {
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    let c = DataChunk::new(0, 0, 0, 4, Bytes::from_static(b"abcd"));
    assert_eq!(rx.insert(c.clone()).unwrap(), Inserted::New);
    assert_eq!(rx.insert(c.clone()).unwrap(), Inserted::Duplicate);
    assert_eq!(rx.pop().unwrap(), Bytes::from_static(b"abcd"));
    assert_eq!(rx.insert(c).unwrap(), Inserted::Duplicate);
    assert_eq!(rx.duplicates(), 2);
    assert_eq!(rx.pop(), None);
}

#[test]
fn empty_messages_are_delivered_once_in_their_place() {
    let msgs = messages(&[3, 0, 0, 5, 0]);
    let mut chunks = all_chunks(&msgs, 2);
    let again = chunks.clone();
    chunks.reverse();
    chunks.extend(again);
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    let mut got = Vec::new();
    for c in chunks {
        rx.insert(c).unwrap();
        pop_all(&mut rx, &mut got);
    }
    assert_eq!(got, msgs);
}

#[test]
fn a_dead_path_is_resent_and_single_chunk_messages_are_not_copied() {
    let mut tx = SendBuffer::new(1 << 20);
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    tx.on_credit(rx.credit());
    let msg = Bytes::from(vec![42u8; 1000]);
    tx.push(msg.clone()).unwrap();
    tx.push(msg.clone()).unwrap();
    let now = Instant::now();
    let a = tx.next_chunk(4096).unwrap();
    let b = tx.next_chunk(4096).unwrap();
    tx.on_sent(&a.chunk, 1, now);
    tx.on_sent(&b.chunk, 2, now);
    // Path 2 dies: its chunk is lost and must come back, marked as a retransmission.
    rx.insert(a.chunk).unwrap();
    assert_eq!(tx.requeue_path(2), 1);
    let again = tx.next_chunk(4096).unwrap();
    assert!(again.retransmit);
    tx.on_sent(&again.chunk, 1, now);
    rx.insert(again.chunk).unwrap();
    let first = rx.pop().unwrap();
    assert_eq!(
        first.as_ptr(),
        msg.as_ptr(),
        "a one-chunk message is handed over without a copy"
    );
    assert_eq!(rx.pop().unwrap(), msg);
    let outcome = tx.on_ack(&rx.ack()).unwrap();
    assert_eq!(outcome.messages_acked, 2);
    assert_eq!(tx.retransmissions(), 1);
    assert!(tx.is_empty());
}

#[test]
fn acks_for_data_never_sent_are_rejected() {
    let mut tx = SendBuffer::new(1 << 20);
    let bogus = amst_core::codec::AckFrame {
        messages: 0,
        cumulative: 10,
        ranges: vec![],
    };
    assert!(matches!(
        tx.on_ack(&bogus),
        Err(ProtocolError::Inconsistent(_))
    ));
    assert!(matches!(
        tx.push(Bytes::from(vec![0u8; 2 << 20])),
        Err(amst_core::Error::MessageTooLarge { .. })
    ));
}

#[test]
fn has_message_tracks_what_pop_would_return() {
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    let msg = Bytes::from_static(b"0123456789");
    // Message 1 arrives whole before message 0 is complete: nothing is poppable yet.
    rx.insert(DataChunk::new(10, 1, 0, 3, Bytes::from_static(b"abc")))
        .unwrap();
    assert!(!rx.has_message());
    rx.insert(DataChunk::new(0, 0, 0, 10, msg.slice(..4)))
        .unwrap();
    assert!(!rx.has_message());
    rx.insert(DataChunk::new(4, 0, 4, 10, msg.slice(4..)))
        .unwrap();
    assert!(rx.has_message());
    assert_eq!(rx.pop(), Some(msg));
    assert!(rx.has_message());
    assert_eq!(rx.pop().as_deref(), Some(&b"abc"[..]));
    assert!(!rx.has_message());
    assert_eq!(rx.pop(), None);
}

#[test]
fn unsealed_chunks_match_sealed_ones_once_sealed() {
    let msg = Bytes::from((0..100_000u32).map(|i| (i * 31) as u8).collect::<Vec<_>>());
    let mut a = SendBuffer::new(1 << 20);
    let mut b = SendBuffer::new(1 << 20);
    let credit = Credit {
        limit: 1 << 20,
        max_msg_id: 10,
    };
    a.on_credit(credit);
    b.on_credit(credit);
    a.push(msg.clone()).unwrap();
    b.push(msg).unwrap();
    let now = Instant::now();
    while let Some(sealed) = a.next_chunk(30_000) {
        let mut raw = b.next_chunk_unsealed(30_000).unwrap();
        assert_eq!(raw.chunk.crc, 0);
        raw.chunk.seal();
        assert_eq!(raw.chunk, sealed.chunk);
        assert!(raw.chunk.crc_ok());
        b.on_sent(&raw.chunk, 0, now);
    }
    // A retransmission comes back unsealed, and seals to the same CRC.
    assert_eq!(b.requeue_path(0), 4);
    let mut again = b.next_chunk_unsealed(30_000).unwrap();
    assert!(again.retransmit);
    again.chunk.seal();
    assert!(again.chunk.crc_ok());
}

#[test]
fn a_header_and_payload_go_as_one_message_without_copying_the_payload() {
    let mut tx = SendBuffer::new(1 << 20);
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    tx.on_credit(rx.credit());
    let header = Bytes::from_static(b"\x01header!");
    let payload = Bytes::from(vec![7u8; 100 << 10]);
    tx.push_parts(header.clone(), payload.clone()).unwrap();
    tx.push_parts(Bytes::new(), Bytes::new()).unwrap();
    let mut chunks = Vec::new();
    while let Some(out) = tx.next_chunk(64 << 10) {
        chunks.push(out.chunk);
    }
    // The header is a chunk of its own; the payload chunks are slices of the payload.
    assert_eq!(chunks[0].payload, header);
    assert_eq!(chunks[1].payload.as_ptr(), payload.as_ptr());
    assert_eq!(chunks[1].payload.len(), 64 << 10);
    assert_eq!(chunks[2].payload.len(), 36 << 10);
    for c in chunks {
        rx.insert(c).unwrap();
    }
    let mut whole = header.to_vec();
    whole.extend_from_slice(&payload);
    assert_eq!(rx.pop().unwrap(), Bytes::from(whole));
    assert_eq!(rx.pop().unwrap(), Bytes::new());
    tx.on_ack(&rx.ack()).unwrap();
    assert!(tx.is_empty());
}

/// Credit comes from the shared budget: two receivers on one budget divide it, a delivered
/// message keeps its bytes charged until dropped, and the budget bounds what any peer can
/// make the receivers hold.
#[test]
fn receivers_sharing_a_budget_divide_it_and_delivered_messages_stay_charged() {
    let budget = MemoryBudget::new(8 << 20);
    let config = ReassemblyConfig::default(); // a 64 MiB window, more than the whole budget
    let mut a = Reassembler::with_budget(config, budget.clone());
    let mut b = Reassembler::with_budget(config, budget.clone());
    assert_eq!(
        a.credit().limit,
        MIN_WINDOW,
        "only the minimum before data arrives"
    );
    assert_eq!(budget.held(), 2 * MIN_WINDOW);

    // Data opens `a`'s window to its share: half the budget, two receivers sharing it.
    let msg = Bytes::from(vec![5u8; MIN_WINDOW as usize]);
    a.insert(DataChunk::new(0, 0, 0, MIN_WINDOW, msg)).unwrap();
    let got = a.pop().unwrap();
    assert_eq!(a.credit().limit, MIN_WINDOW + (4 << 20));
    assert_eq!(
        a.reserved_bytes(),
        4 << 20,
        "the popped message left the reservation"
    );
    assert_eq!(budget.held(), MIN_WINDOW + (4 << 20) + MIN_WINDOW);

    // `b` may grow to its share too, but only as far as the budget has room: the message
    // the application still holds counts.
    b.insert(DataChunk::new(0, 0, 0, 5, Bytes::from_static(b"hello")))
        .unwrap();
    drop(b.pop());
    assert!(b.credit().limit > MIN_WINDOW && b.credit().limit < 5 + (4 << 20));
    assert!(budget.held() <= budget.limit());
    let slice = got.slice(10..20);
    drop(got);
    let before = budget.held();
    drop(slice);
    assert_eq!(
        budget.held(),
        before - MIN_WINDOW,
        "the last slice gave the bytes back"
    );
    drop((a, b));
    assert_eq!(budget.held(), 0, "every byte came back");
}

/// A flood of empty messages is bounded by message credit derived from the window.
#[test]
fn empty_messages_are_bounded_by_message_credit() {
    let budget = MemoryBudget::new(128 << 10);
    let config = ReassemblyConfig {
        window: 64 << 20,
        ..Default::default()
    };
    let mut rx = Reassembler::with_budget(config, budget);
    let credit = rx.credit().max_msg_id;
    // The budget is smaller than the guaranteed minimum window, which sets the count.
    assert_eq!(
        credit,
        MIN_WINDOW / 1024,
        "one message id per KiB of the window"
    );
    // Out of order so that none can be popped: every one is held.
    for id in (1..credit).rev() {
        rx.insert(DataChunk::new(0, id, 0, 0, Bytes::new()))
            .unwrap();
    }
    let err = rx
        .insert(DataChunk::new(0, credit, 0, 0, Bytes::new()))
        .unwrap_err();
    assert!(
        matches!(err, ProtocolError::MessageCreditExceeded { msg_id, granted } if msg_id == credit && granted == credit),
        "{err:?}"
    );
}

/// Receivers fed by senders that send whatever their credit allows, in order, in chunks of
/// `chunk` bytes, with the application taking each message at once and keeping it for
/// `hold` more rounds. Returns the budget's peak and how many messages each delivered.
fn run_senders(
    receivers: usize,
    budget: &MemoryBudget,
    msgs: &[Bytes],
    chunk: usize,
    hold: usize,
) -> (u64, Vec<usize>) {
    let mut rx: Vec<Reassembler> = (0..receivers)
        .map(|_| Reassembler::with_budget(ReassemblyConfig::default(), budget.clone()))
        .collect();
    let chunks = all_chunks(msgs, chunk);
    let mut next = vec![0usize; receivers];
    let mut delivered = vec![0usize; receivers];
    let mut held: Vec<(usize, Bytes)> = Vec::new();
    let mut peak = budget.held();
    // A round is a millisecond of the session timer's clock.
    let t0 = Instant::now();
    // Bounded: each round moves at least one chunk or one refresh; far more than needed.
    for round in 0..100_000 {
        if delivered.iter().all(|&d| d == msgs.len()) {
            break;
        }
        held.retain(|(until, _)| *until > round);
        for (i, r) in rx.iter_mut().enumerate() {
            // What the session core's timer does for a receiver waiting on the budget.
            if r.starved() {
                r.refresh_grant(t0 + Duration::from_millis(round as u64));
            }
            while let Some(c) = chunks.get(next[i]) {
                if c.session_end() > r.credit().limit {
                    break;
                }
                r.insert(c.clone()).unwrap();
                next[i] += 1;
                peak = peak.max(budget.held());
            }
            while let Some(m) = r.pop() {
                assert_eq!(
                    m, msgs[delivered[i]],
                    "receiver {i} message {}",
                    delivered[i]
                );
                delivered[i] += 1;
                held.push((round + hold, m));
            }
        }
    }
    (peak, delivered)
}

/// 64 receivers share a budget smaller than their head messages together. Only one at a time
/// may go past the budget to complete a message, and by a quarter of the budget at most: the
/// overdraft passes from receiver to receiver in the order they asked (several in one round
/// here, whose completed messages the harness drops only at the round's end), everyone
/// finishes, and the peak is the budget, a quarter of it and each receiver's minimum.
#[test]
fn sixty_four_receivers_with_large_messages_overdraw_the_budget_by_a_quarter_at_most() {
    let budget = MemoryBudget::new(16 << 20);
    let msgs = messages(&[1 << 20, 3 << 20, 1 << 20]);
    let (peak, delivered) = run_senders(64, &budget, &msgs, 64 << 10, 0);
    assert!(
        delivered.iter().all(|&d| d == msgs.len()),
        "a receiver stalled: {delivered:?}"
    );
    let bound = budget.limit() + budget.largest_message() + 64 * MIN_WINDOW;
    assert!(
        peak <= bound,
        "peak {} MiB over the budget, a quarter of it and the minimums ({} MiB)",
        peak >> 20,
        bound >> 20
    );
    assert_eq!(budget.held(), 0, "every byte came back");
}

/// Applications that keep messages a while hold the budget; receivers wait for room and the
/// overdraft, and none waits forever.
#[test]
fn receivers_whose_applications_keep_messages_still_all_finish() {
    // Messages up to the largest the budget takes (a quarter of it), 16 receivers' worth of
    // head messages far over it.
    let budget = MemoryBudget::new(12 << 20);
    let msgs = messages(&[2 << 20, 3 << 20, 100, 2 << 20]);
    let (_, delivered) = run_senders(16, &budget, &msgs, 128 << 10, 20);
    assert!(
        delivered.iter().all(|&d| d == msgs.len()),
        "a receiver stalled: {delivered:?}"
    );
    assert_eq!(budget.held(), 0, "every byte came back");
}

/// One receiver alone, with a message as large as its budget takes (a quarter of it): the
/// overdraft lets it complete even while its application keeps the rest of the budget.
#[test]
fn a_message_of_a_quarter_of_the_budget_arrives_while_the_rest_is_held() {
    let budget = MemoryBudget::new(4 << 20);
    let msgs = messages(&[1 << 20, 1 << 20, 1 << 20, 1 << 20, 10]);
    let (_, delivered) = run_senders(1, &budget, &msgs, 256 << 10, 50);
    assert_eq!(delivered, vec![5]);
}

/// A message over a quarter of the budget is refused at its first chunk, before anything is
/// granted or held for it, with both limits named: it could only be completed by going past
/// the budget by more than the overdraft allows.
#[test]
fn a_message_over_a_quarter_of_the_budget_is_refused_with_the_limit_named() {
    let budget = MemoryBudget::new(4 << 20);
    let mut r = Reassembler::with_budget(ReassemblyConfig::default(), budget.clone());
    let held = budget.held();
    let len = (1 << 20) + 1;
    let chunk = DataChunk::new(0, 0, 0, len, Bytes::from_static(b"x"));
    let err = r.insert(chunk).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::MessageOverBudget {
            msg_id: 0,
            len,
            limit: 1 << 20,
            budget: 4 << 20,
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("1048577") && text.contains("1048576") && text.contains("4194304"),
        "{text}"
    );
    assert_eq!(
        budget.held(),
        held,
        "nothing is held for the refused message"
    );
}

/// A receiver starved because its own application still holds what it delivered waits for
/// that to drain, and asks for the overdraft only once it has waited `OVERDRAFT_GRACE`:
/// a file sink's queue drains within milliseconds, and the overdraft would add up to a
/// quarter of the budget to the peak for nothing.
#[test]
fn the_overdraft_waits_out_a_short_starvation() {
    let budget = MemoryBudget::new(8 << 20);
    let mut r = Reassembler::with_budget(ReassemblyConfig::default(), budget.clone());
    let msg = messages(&[1 << 20]).remove(0);
    let chunks = all_chunks(std::slice::from_ref(&msg), MIN_WINDOW as usize);
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);

    // Whatever the application holds fills the budget; the first quarter of the head message
    // arrives and the rest is not granted.
    let held_by_app = budget.charge(budget.limit() - budget.held());
    r.insert(chunks[0].clone()).unwrap();
    assert!(r.starved());
    r.refresh_grant(ms(0));
    r.refresh_grant(ms(10));
    assert_eq!(
        r.credit().limit,
        MIN_WINDOW,
        "no overdraft within the grace"
    );
    assert!(budget.held() <= budget.limit());

    // The application drops it: room, and no overdraft.
    drop(held_by_app);
    r.refresh_grant(ms(12));
    assert!(!r.starved());
    assert!(r.credit().limit >= 1 << 20, "{:?}", r.credit());
    for c in &chunks[1..] {
        r.insert(c.clone()).unwrap();
    }
    assert_eq!(r.pop().as_ref(), Some(&msg));

    // Another receiver whose application holds on: after the grace it takes the overdraft
    // and completes its head message past the limit.
    let mut r = Reassembler::with_budget(ReassemblyConfig::default(), budget.clone());
    let held_by_app = budget.charge(budget.limit() - budget.held());
    let chunks = all_chunks(std::slice::from_ref(&msg), MIN_WINDOW as usize);
    r.insert(chunks[0].clone()).unwrap();
    assert!(r.starved());
    r.refresh_grant(ms(100));
    r.refresh_grant(ms(110));
    assert_eq!(r.credit().limit, MIN_WINDOW, "still waiting");
    r.refresh_grant(ms(100) + OVERDRAFT_GRACE);
    assert!(r.credit().limit > MIN_WINDOW, "{:?}", r.credit());
    assert!(
        budget.held() > budget.limit(),
        "past the limit: the overdraft"
    );
    // The overdraft's holder is granted a minimum window beyond each chunk until its head
    // message is whole.
    for c in &chunks[1..] {
        assert!(c.session_end() <= r.credit().limit, "{:?}", r.credit());
        r.insert(c.clone()).unwrap();
    }
    assert_eq!(r.pop().as_ref(), Some(&msg));
    drop(held_by_app);
}

// ----- chunks read in place -----

/// Reads a chunk's payload into its placement as a socket would, in two pieces.
fn fill(mut p: Placement, payload: &[u8]) -> Placement {
    let half = payload.len() / 2;
    p.put_slice(&payload[..half]);
    p.put_slice(&payload[half..]);
    p
}

proptest! {
    /// Chunks read into place and chunks copied in, interleaved with resends, placements
    /// abandoned half-filled (a stream that died) and resends that arrive while their range
    /// is being filled (a stream that stalled, perhaps for good): exactly the messages sent,
    /// in order, once each.
    #[test]
    fn placed_and_copied_chunks_mix_in_any_order(
        sizes in proptest::collection::vec(1usize..20_000, 1..12),
        chunk in 100usize..3000,
        seed in any::<u64>(),
    ) {
        let msgs = messages(&sizes);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut chunks = all_chunks(&msgs, chunk);
        let resends: Vec<DataChunk> = chunks.iter().filter(|_| rng.random_bool(0.2)).cloned().collect();
        chunks.extend(resends);
        chunks.shuffle(&mut rng);
        let mut rx = Reassembler::new(ReassemblyConfig { window: u64::MAX / 4, ..Default::default() });
        let mut got = Vec::new();
        let mut open: Vec<(Placement, DataChunk)> = Vec::new();
        for c in chunks {
            match rx.place(&c.header()).unwrap() {
                Some(p) if rng.random_bool(0.15) => {
                    // The stream died half-way: the range is free again, and the chunk's
                    // resend fills it.
                    let mut p = p;
                    p.put_slice(&c.payload[..c.payload.len() / 2]);
                    drop(p);
                    rx.insert(c).unwrap();
                }
                Some(p) if rng.random_bool(0.3) => {
                    // Still being read when a resend of it arrives (its stream stalled): the
                    // resend is stored, and the placement no longer counts.
                    let before = rx.buffered_bytes();
                    prop_assert_eq!(rx.insert(c.clone()).unwrap(), Inserted::New);
                    prop_assert!(rx.buffered_bytes() > before);
                    open.push((p, c));
                }
                Some(p) => {
                    let placed = fill(p, &c.payload).verify().unwrap();
                    prop_assert_eq!(rx.insert_placed(placed).unwrap(), Inserted::New);
                }
                None => {
                    rx.insert(c).unwrap();
                }
            }
            pop_all(&mut rx, &mut got);
        }
        for (p, c) in open {
            let placed = fill(p, &c.payload).verify().unwrap();
            prop_assert_eq!(rx.insert_placed(placed).unwrap(), Inserted::Duplicate);
            pop_all(&mut rx, &mut got);
        }
        prop_assert_eq!(&got, &msgs);
        prop_assert!(rx.is_idle());
        prop_assert_eq!(rx.buffered_bytes(), 0);
    }
}

#[test]
fn a_placed_chunk_that_fails_its_crc_is_refused_naming_it() {
    let msgs = messages(&[4000]);
    let chunks = all_chunks(&msgs, 1000);
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    let c = &chunks[2];
    let p = rx
        .place(&c.header())
        .unwrap()
        .expect("a part of a larger message is placed");
    let mut bad = c.payload.to_vec();
    bad[10] ^= 0x40;
    match fill(p, &bad).verify() {
        Err(ProtocolError::ChunkCorrupt {
            msg_id: 0,
            msg_offset: 2000,
            expected,
            actual,
        }) => assert_ne!(expected, actual),
        other => panic!("expected ChunkCorrupt, got {other:?}"),
    }
    // Nothing of it counts: the good chunk is still wanted, and then the message is whole.
    assert_eq!(rx.buffered_bytes(), 0);
    for c in chunks {
        assert_eq!(rx.insert(c).unwrap(), Inserted::New);
    }
    assert_eq!(rx.pop(), Some(msgs[0].clone()));
}

#[test]
fn a_half_filled_placement_is_refused_not_counted() {
    let msgs = messages(&[4000]);
    let chunks = all_chunks(&msgs, 1000);
    let mut rx = Reassembler::new(ReassemblyConfig::default());
    let mut p = rx.place(&chunks[0].header()).unwrap().unwrap();
    p.put_slice(&chunks[0].payload[..999]);
    assert!(matches!(p.verify(), Err(ProtocolError::Inconsistent(_))));
}

#[test]
fn whole_messages_duplicates_and_bad_chunks_are_not_placed() {
    let msgs = messages(&[500, 4000]);
    let chunks = all_chunks(&msgs, 1000);
    let mut rx = Reassembler::new(ReassemblyConfig {
        window: 1 << 20,
        ..Default::default()
    });
    // A whole message stays the slice it was read into.
    assert!(rx.place(&chunks[0].header()).unwrap().is_none());
    rx.insert(chunks[1].clone()).unwrap();
    assert!(
        rx.place(&chunks[1].header()).unwrap().is_none(),
        "a duplicate"
    );
    let taken = rx.place(&chunks[2].header()).unwrap().unwrap();
    assert!(
        rx.place(&chunks[2].header()).unwrap().is_none(),
        "being placed"
    );
    drop(taken);
    assert!(
        rx.place(&chunks[2].header()).unwrap().is_some(),
        "given back"
    );
    // Placing checks what inserting checks.
    let mut past_credit = chunks[3].header();
    past_credit.session_offset += 1 << 30;
    assert!(matches!(
        rx.place(&past_credit),
        Err(ProtocolError::CreditExceeded { .. })
    ));
}
