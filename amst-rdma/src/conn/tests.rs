//! Two [`Conn`]s joined back to back in memory, as two queue pairs would be: every posted
//! segment lands, in order, in the peer's receive buffer (SEND) or ring slot (WRITE with
//! immediate). No device: this is the whole protocol the verbs driver executes.

use std::time::{Duration, Instant};

use amst_core::MemoryBudget;
use amst_core::codec::{Close, CloseCode, Psk};
use amst_core::session::Event;
use bytes::Bytes;

use super::*;

fn config(budget: &MemoryBudget) -> RdmaConfig {
    let mut c = RdmaConfig::new(Psk::new(b"a test key 0123456789").unwrap());
    c.recv_depth = 16;
    c.ring_slots = 8;
    c.slot_size = 64 << 10;
    c.small_max = 1000;
    c.receive_window = 4 << 20;
    c.memory_budget = budget.clone();
    c.validate().unwrap();
    c
}

fn pair(c: &RdmaConfig, now: Instant) -> (Conn, Conn) {
    (
        Conn::new(c, c.recv_depth, c.ring_slots, now),
        Conn::new(c, c.recv_depth, c.ring_slots, now),
    )
}

/// Posts everything `from` can post into `to`; returns how many segments moved.
fn carry(from: &mut Conn, to: &mut Conn, now: Instant, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while let Some(p) = from.poll_segment(now, buf) {
        let slot = match p.op {
            Op::RingWrite { slot } => Some(slot),
            Op::Send | Op::Control => {
                assert!(p.len <= SEGMENT_HEADER_LEN + 1000, "a SEND fits a receive");
                None
            }
        };
        to.on_segment(slot, &buf[..p.len], now).unwrap();
        n += 1;
    }
    n
}

/// Runs both directions and their timers until nothing moves for 10 ms of simulated time.
fn settle(a: &mut Conn, b: &mut Conn, now: &mut Instant) {
    let mut buf = vec![0u8; 64 << 10];
    let mut quiet = 0;
    for _ in 0..100_000 {
        for c in [&mut *a, &mut *b] {
            if c.session().poll_timeout().is_some_and(|t| t <= *now) {
                c.session_mut().on_timeout(*now);
            }
        }
        let moved = carry(a, b, *now, &mut buf) + carry(b, a, *now, &mut buf);
        if moved == 0 {
            quiet += 1;
            if quiet > 10 {
                return;
            }
            *now += Duration::from_millis(1);
        } else {
            quiet = 0;
        }
    }
    panic!("the pair never settled");
}

fn message(i: usize, len: usize) -> Bytes {
    Bytes::from((0..len).map(|k| (k + i) as u8).collect::<Vec<u8>>())
}

#[test]
fn messages_arrive_whole_in_order_and_are_acknowledged() {
    let budget = MemoryBudget::new(64 << 20);
    let c = config(&budget);
    let mut now = Instant::now();
    let (mut a, mut b) = pair(&c, now);
    let sizes = [0usize, 1, 999, 1000, 1001, 65_000, (1 << 20) + 3, 7];
    for (i, len) in sizes.iter().enumerate() {
        a.session_mut().push(message(i, *len), now).unwrap();
    }
    // And one the other way, to share the queue pair.
    b.session_mut().push(message(99, 5000), now).unwrap();
    settle(&mut a, &mut b, &mut now);
    for (i, len) in sizes.iter().enumerate() {
        let m = b.session_mut().read(now).expect("delivered");
        assert_eq!(m, message(i, *len), "message {i}");
    }
    assert!(b.session_mut().read(now).is_none());
    assert_eq!(a.session_mut().read(now).unwrap(), message(99, 5000));
    let mut acked = 0;
    while let Some(e) = a.poll_event(now) {
        if let Event::Acked { messages } = e {
            acked = messages;
        }
    }
    assert_eq!(acked, sizes.len() as u64);
    let m = a.metrics();
    assert_eq!(m.messages_acked, sizes.len() as u64);
    assert!(m.rtt.is_some(), "acks time the RTT");
    assert!(m.credit_window.is_some_and(|w| w > 0));
    assert_eq!(m.chunk_size, Some(c.chunk_payload() as u64));
    assert_eq!(
        (m.cwnd, m.pacing_rate, m.retransmitted_bytes),
        (None, None, None),
        "RC retransmission and congestion control run in the NIC, out of sight"
    );
    assert_eq!(b.metrics().messages_received, sizes.len() as u64);
}

/// The parting Close (after a flush, as `close` does) goes out in one segment that says so,
/// and nothing follows it.
#[test]
fn a_goodbye_is_delivered_after_the_data_and_ends_the_peer_gracefully() {
    let budget = MemoryBudget::new(64 << 20);
    let c = config(&budget);
    let mut now = Instant::now();
    let (mut a, mut b) = pair(&c, now);
    a.session_mut().push(message(1, 200_000), now).unwrap();
    settle(&mut a, &mut b, &mut now);
    assert_eq!(a.session().send_buffer().messages_acked(), 1);
    a.session_mut()
        .close(Some(Close::new(CloseCode::Normal, "done")));
    let mut buf = vec![0u8; 64 << 10];
    let p = a.poll_segment(now, &mut buf).expect("the Close");
    assert!(p.parting);
    assert!(!matches!(p.op, Op::RingWrite { .. }), "a Close is small");
    b.on_segment(None, &buf[..p.len], now).unwrap();
    assert!(a.poll_segment(now, &mut buf).is_none(), "nothing after it");
    assert_eq!(b.session_mut().read(now).unwrap(), message(1, 200_000));
    assert!(b.session().is_peer_closed());
    let events: Vec<_> = std::iter::from_fn(|| b.poll_event(now)).collect();
    assert!(events.contains(&Event::Closed), "{events:?}");
}

/// A corrupt chunk fails the receiving session with ChunkCorrupt, and its parting Close tells
/// the sender why.
#[test]
fn corruption_fails_the_session_and_the_peer_hears_why() {
    let budget = MemoryBudget::new(64 << 20);
    let c = config(&budget);
    let now = Instant::now();
    let (mut a, mut b) = pair(&c, now);
    a.session_mut().push(message(1, 30_000), now).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // b's first segment grants a its credit.
    carry(&mut b, &mut a, now, &mut buf);
    let p = a.poll_segment(now, &mut buf).unwrap();
    let len = p.len;
    buf[len - 1] ^= 0xff;
    let slot = match p.op {
        Op::RingWrite { slot } => Some(slot),
        _ => None,
    };
    let e = b.on_segment(slot, &buf[..len], now).unwrap_err();
    assert!(
        matches!(e, Fatal::Protocol(ProtocolError::ChunkCorrupt { .. })),
        "{e:?}"
    );
    // b's parting Close: a fails on it, naming the code.
    let p = b.poll_segment(now, &mut buf).expect("the parting Close");
    assert!(p.parting);
    assert!(b.poll_segment(now, &mut buf).is_none(), "nothing after it");
    assert!(a.on_segment(None, &buf[..p.len], now).is_err());
    match a.session().fatal() {
        Some(Fatal::PeerClosed { code, .. }) => assert_eq!(*code, CloseCode::Corrupt),
        other => panic!("{other:?}"),
    }
    assert!(a.session().check_can_send().is_err());
}

/// A segment carrying a whole message and then a bad frame: the message stays readable, and
/// the session fails on the bad frame.
#[test]
fn a_message_ahead_of_a_bad_frame_in_one_segment_is_delivered() {
    let budget = MemoryBudget::new(64 << 20);
    let c = config(&budget);
    let now = Instant::now();
    let (mut a, mut b) = pair(&c, now);
    a.session_mut().push(message(2, 100), now).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    carry(&mut b, &mut a, now, &mut buf);
    let p = a.poll_segment(now, &mut buf).unwrap();
    let mut h = SegmentHeader::decode(&buf[..p.len]).unwrap();
    buf[p.len..p.len + 5].copy_from_slice(&[0xee, 0, 0, 0, 0]);
    h.payload_len += 5;
    h.encode(&mut buf);
    let e = b.on_segment(None, &buf[..p.len + 5], now).unwrap_err();
    assert!(
        matches!(e, Fatal::Protocol(ProtocolError::UnknownFrameType(0xee))),
        "{e:?}"
    );
    assert_eq!(b.session_mut().read(now), Some(message(2, 100)));
}

/// How much one receiver holds when its application reads nothing: `senders` pairs share
/// `budget`, each sender pushes 8 MiB.
fn held_unread(budget: &MemoryBudget, pairs: usize) -> Vec<u64> {
    let c = config(budget);
    let mut now = Instant::now();
    let mut conns: Vec<(Conn, Conn)> = (0..pairs).map(|_| pair(&c, now)).collect();
    for (a, _) in conns.iter_mut() {
        for i in 0..8 {
            a.session_mut().push(message(i, 1 << 20), now).unwrap();
        }
    }
    for (a, b) in conns.iter_mut() {
        settle(a, b, &mut now);
    }
    // Once more: a receiver that settled first may have been granted less while the others
    // held more.
    for (a, b) in conns.iter_mut() {
        settle(a, b, &mut now);
    }
    let held: Vec<u64> = conns
        .iter()
        .map(|(_, b)| b.session().reassembler().buffered_bytes())
        .collect();
    for (a, _) in &conns {
        assert!(
            a.session().send_buffer().queued_bytes() > 0,
            "credit, not the data, ran out"
        );
    }
    // Reading frees the budget: everything arrives, in order.
    for (a, b) in conns.iter_mut() {
        let mut got = 0;
        for _ in 0..1000 {
            while let Some(m) = b.session_mut().read(now) {
                assert_eq!(m, message(got, 1 << 20), "message {got}");
                got += 1;
            }
            if got == 8 {
                break;
            }
            settle(a, b, &mut now);
        }
        assert_eq!(got, 8);
    }
    drop(conns);
    assert_eq!(budget.held(), 0, "every charge is given back");
    held
}

/// Receive credit derives from the process memory budget, as amst-tcp's does: four sessions
/// on one budget each get at most their share (plus the head message, which is held whole),
/// far below the 4 MiB receive window that one session alone is granted.
#[test]
fn sessions_share_one_memory_budget() {
    let c = config(&MemoryBudget::new(1 << 40));
    let pinned = c.pinned_receive_bytes();
    assert_eq!(pinned, 16 * (24 + 1000) + 8 * (64 << 10));

    let alone = held_unread(&MemoryBudget::new(1 << 40), 1);
    assert!(
        alone[0] >= 4 << 20,
        "alone, the receive window is granted: {alone:?}"
    );

    let limit = 16u64 << 20;
    let budget = MemoryBudget::new(limit);
    {
        // The registered receive memory counts as soon as a session exists.
        let now = Instant::now();
        let _p = pair(&c, now);
        assert!(budget.held() == 0);
        let _q = pair(&config(&budget), now);
        assert!(budget.held() >= 2 * pinned, "{}", budget.held());
        assert_eq!(budget.receivers(), 2);
    }
    let shared = held_unread(&budget, 4);
    // Eight members (each session receives too): a share of 2 MiB each.
    let share = limit / 8;
    for h in &shared {
        assert!(*h > 0, "every session makes progress: {shared:?}");
        assert!(
            *h <= share + (1 << 20),
            "at most its share and the head message: {shared:?}"
        );
    }
    assert!(shared.iter().sum::<u64>() < limit);
}

/// Both directions saturated at once, with few receives and slots: the segments without Data
/// bytes (acks, byte credit, receive credit) still get through on the reserve, and everything
/// arrives.
#[test]
fn both_directions_at_once_never_deadlock() {
    let budget = MemoryBudget::new(64 << 20);
    let mut c = config(&budget);
    c.recv_depth = 4;
    c.ring_slots = 2;
    let mut now = Instant::now();
    let (mut a, mut b) = pair(&c, now);
    for i in 0..40 {
        a.session_mut().push(message(i, 100_000 + i), now).unwrap();
        b.session_mut().push(message(i + 1, 3000 * i), now).unwrap();
    }
    let (mut got_a, mut got_b) = (0, 0);
    for _ in 0..200 {
        settle(&mut a, &mut b, &mut now);
        while let Some(m) = b.session_mut().read(now) {
            assert_eq!(m, message(got_b, 100_000 + got_b));
            got_b += 1;
        }
        while let Some(m) = a.session_mut().read(now) {
            assert_eq!(m, message(got_a + 1, 3000 * got_a));
            got_a += 1;
        }
        if got_a == 40 && got_b == 40 {
            break;
        }
    }
    assert_eq!((got_a, got_b), (40, 40));
    settle(&mut a, &mut b, &mut now);
    assert_eq!(a.session().send_buffer().messages_acked(), 40);
    assert_eq!(b.session().send_buffer().messages_acked(), 40);
}
