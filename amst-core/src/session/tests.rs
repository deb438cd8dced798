//! Deterministic tests of the session state machine: two sessions joined by frames moved by
//! hand, with `now` passed in.

use super::*;
use crate::codec::{Decoder, Limits};

const MS: Duration = Duration::from_millis(1);

fn config() -> SessionConfig {
    SessionConfig {
        max_message: 1 << 20,
        receive_window: 1 << 20,
        ack_delay: MS,
        idle_timeout: Duration::from_secs(30),
        stall_timeout: Duration::from_secs(1),
    }
}

fn pair(t0: Instant) -> (Session, Session) {
    let budget = MemoryBudget::new(u64::MAX);
    (
        Session::new(config(), budget.clone(), t0),
        Session::new(config(), budget, t0),
    )
}

/// Everything one `poll_transmit` of `path` produced, as frames (chunks sealed, as a driver
/// seals them), and what it asked.
fn transmit(s: &mut Session, path: PathId, now: Instant, max: usize) -> (Vec<Frame>, Transmit) {
    let mut control = BytesMut::new();
    let mut chunks = Vec::new();
    let t = s.poll_transmit(path, now, max, &mut control, &mut chunks);
    for c in chunks.iter_mut() {
        c.seal();
    }
    for c in chunks {
        Frame::Data(c).encode(&mut control);
    }
    let decoder = Decoder::new(Limits::default());
    let mut frames = Vec::new();
    while let Some(f) = decoder.decode(&mut control).expect("our own frames decode") {
        frames.push(f);
    }
    assert!(control.is_empty(), "whole frames only");
    (frames, t)
}

fn deliver(to: &mut Session, path: PathId, frames: Vec<Frame>, now: Instant) {
    for f in frames {
        to.on_frame(path, f, now).expect("frame accepted");
    }
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn kinds(frames: &[Frame]) -> Vec<crate::codec::FrameKind> {
    frames.iter().map(Frame::kind).collect()
}

fn acks(frames: &[Frame]) -> usize {
    frames.iter().filter(|f| matches!(f, Frame::Ack(_))).count()
}

/// Both sides exchange their opening credit on path 0, and a first message each way opens
/// the windows (the first data grows the credit past its threshold), so that later acks are
/// timed by the ack delay alone. Leaves nothing owed and nothing timed.
fn open(a: &mut Session, b: &mut Session, now: Instant) {
    a.add_path(0);
    b.add_path(0);
    fn step(x: &mut Session, y: &mut Session, now: Instant) {
        if x.send_buffer().messages_sent() == 0 {
            x.push(Bytes::from_static(b"warm"), now).unwrap();
        }
        x.on_timeout(now + MS);
        let (frames, _) = transmit(x, 0, now, 1 << 16);
        deliver(y, 0, frames, now);
        while y.read(now).is_some() {}
    }
    for _ in 0..3 {
        step(a, b, now);
        step(b, a, now);
    }
    for s in [a, b] {
        assert!(s.send_buffer().is_empty());
        assert_eq!(s.poll_timeout(), None);
        let _ = events(s);
        let _ = s.take_timeout_moved();
    }
}

#[test]
fn first_transmit_grants_credit_and_then_goes_idle() {
    let t0 = Instant::now();
    let (mut a, _) = pair(t0);
    let (frames, t) = transmit(&mut a, 0, t0, 1 << 16);
    assert_eq!(t, Transmit::Send);
    assert_eq!(
        kinds(&frames),
        vec![
            crate::codec::FrameKind::Ack,
            crate::codec::FrameKind::Credit
        ]
    );
    assert_eq!(transmit(&mut a, 0, t0, 1 << 16).1, Transmit::Idle);
    assert!(!a.wants_transmit());
    assert_eq!(a.poll_timeout(), None, "an idle session has nothing timed");
}

fn data_lens(frames: &[Frame]) -> Vec<usize> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Data(c) => Some(c.payload.len()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_first_chunk_is_small_while_the_peer_grants_its_minimum() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    a.add_path(0);
    b.add_path(0);
    a.set_srtt(Some(100 * MS));
    // The receiver's opening credit is its minimal window.
    let (frames, _) = transmit(&mut b, 0, t0, 1 << 16);
    deliver(&mut a, 0, frames, t0);
    assert_eq!(a.send_buffer().credit_limit(), crate::MIN_WINDOW);
    a.push(Bytes::from(vec![7u8; 512 << 10]), t0).unwrap();
    let (first, _) = transmit(&mut a, 0, t0, 128 << 10);
    assert_eq!(data_lens(&first), vec![STARTUP_CHUNK]);
    // Only the first: the rest of the minimal window goes in full chunks.
    let (second, _) = transmit(&mut a, 0, t0, 128 << 10);
    assert_eq!(data_lens(&second), vec![128 << 10]);
    // The first chunk, once whole at the receiver, opens its window.
    deliver(&mut b, 0, first, t0);
    let (frames, _) = transmit(&mut b, 0, t0, 1 << 16);
    deliver(&mut a, 0, frames, t0);
    assert!(a.send_buffer().credit_limit() > crate::MIN_WINDOW);
    deliver(&mut b, 0, second, t0);
    let (third, _) = transmit(&mut a, 0, t0, 128 << 10);
    assert_eq!(data_lens(&third), vec![128 << 10]);

    // On a short path four round trips of slow start cost nothing: full chunks from the start.
    let (mut a, mut b) = pair(t0);
    a.add_path(0);
    b.add_path(0);
    a.set_srtt(Some(MS / 10));
    let (frames, _) = transmit(&mut b, 0, t0, 1 << 16);
    deliver(&mut a, 0, frames, t0);
    a.push(Bytes::from(vec![7u8; 512 << 10]), t0).unwrap();
    let (first, _) = transmit(&mut a, 0, t0, 128 << 10);
    assert_eq!(data_lens(&first), vec![128 << 10]);
}

#[test]
fn small_data_is_acked_after_the_ack_delay_not_before() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    a.push(Bytes::from_static(b"hello"), t0).unwrap();
    let (data, _) = transmit(&mut a, 0, t0, 1 << 16);
    let t1 = t0 + 10 * MS;
    deliver(&mut b, 0, data, t1);
    assert_eq!(events(&mut b), vec![Event::Readable]);
    assert!(b.take_timeout_moved());
    assert_eq!(b.poll_timeout(), Some(t1 + MS));
    // Nothing forces the ack yet.
    assert_eq!(transmit(&mut b, 0, t1, 1 << 16).1, Transmit::Idle);
    b.on_timeout(t1 + MS / 2);
    assert_eq!(transmit(&mut b, 0, t1 + MS / 2, 1 << 16).1, Transmit::Idle);
    b.on_timeout(t1 + MS);
    let (frames, _) = transmit(&mut b, 0, t1 + MS, 1 << 16);
    assert_eq!(acks(&frames), 1);
    assert_eq!(b.poll_timeout(), None);
    deliver(&mut a, 0, frames, t1 + MS);
    assert_eq!(events(&mut a), vec![Event::Acked { messages: 2 }]);
    assert!(a.send_buffer().is_empty());
    assert_eq!(b.read(t1).as_deref(), Some(&b"hello"[..]));
}

#[test]
fn crossing_the_ack_threshold_acks_at_once() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    let threshold = b.ack_threshold() as usize;
    a.push(Bytes::from(vec![7u8; threshold - 1]), t0).unwrap();
    a.push(Bytes::from(vec![8u8; 1]), t0).unwrap();
    let (mut data, _) = transmit(&mut a, 0, t0, 1 << 20);
    assert_eq!(data.len(), 2);
    let last = data.pop().unwrap();
    deliver(&mut b, 0, data, t0);
    // One byte short: delayed.
    assert_eq!(transmit(&mut b, 0, t0, 1 << 16).1, Transmit::Idle);
    assert_eq!(b.poll_timeout(), Some(t0 + MS));
    deliver(&mut b, 0, vec![last], t0);
    let (frames, _) = transmit(&mut b, 0, t0, 1 << 16);
    assert_eq!(
        acks(&frames),
        1,
        "the threshold sends the ack without the timer"
    );
    assert_eq!(b.poll_timeout(), None, "the delayed ack was folded in");
}

#[test]
fn credit_is_advertised_at_once_when_reading_frees_enough() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    // Five messages of a quarter of the credit threshold each, acked before any is read.
    // Credit runs a window beyond the head message: each read grows it by one message.
    let size = (b.credit_threshold() / 4) as usize;
    for i in 0..5u8 {
        a.push(Bytes::from(vec![i; size]), t0).unwrap();
    }
    let (data, _) = transmit(&mut a, 0, t0, 5 * size);
    deliver(&mut b, 0, data, t0);
    b.on_timeout(t0 + MS);
    let (frames, _) = transmit(&mut b, 0, t0 + MS, 0);
    deliver(&mut a, 0, frames, t0 + MS);
    let before = a.send_buffer().credit_limit();
    // The first three reads owe a credit update only after the ack delay...
    let now = t0 + 2 * MS;
    for _ in 0..3 {
        assert!(b.read(now).is_some());
        assert_eq!(transmit(&mut b, 0, now, 0).1, Transmit::Idle);
        assert_eq!(b.poll_timeout(), Some(now + MS));
    }
    // ... the fourth crosses the threshold and it goes out at once.
    assert!(b.read(now).is_some());
    let (frames, _) = transmit(&mut b, 0, now, 0);
    assert!(frames.iter().any(|f| matches!(f, Frame::Credit(_))));
    assert_eq!(b.poll_timeout(), None);
    deliver(&mut a, 0, frames, now);
    assert_eq!(a.send_buffer().credit_limit(), before + 4 * size as u64);
}

#[test]
fn out_of_order_frames_across_paths_deliver_in_order() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    a.add_path(1);
    b.add_path(1);
    let msgs: Vec<Bytes> = (0..6u8).map(|i| Bytes::from(vec![i; 3000])).collect();
    for m in &msgs {
        a.push(m.clone(), t0).unwrap();
    }
    // Chunks of 1000 bytes, alternately on paths 0 and 1.
    let mut by_path: [Vec<Frame>; 2] = [Vec::new(), Vec::new()];
    let mut p = 0;
    loop {
        let (frames, t) = transmit(&mut a, p as PathId, t0, 1000);
        if t == Transmit::Idle {
            break;
        }
        by_path[p].extend(frames.into_iter().filter(|f| matches!(f, Frame::Data(_))));
        p ^= 1;
    }
    assert_eq!(by_path[0].len() + by_path[1].len(), 18);
    // Path 1 arrives first, each path's frames reversed.
    let [mut on0, mut on1] = by_path;
    on1.reverse();
    on0.reverse();
    deliver(&mut b, 1, on1, t0);
    deliver(&mut b, 0, on0, t0);
    let got: Vec<Bytes> = std::iter::from_fn(|| b.read(t0)).collect();
    assert_eq!(got, msgs);
}

#[test]
fn duplicate_frames_are_dropped_but_acked() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    a.push(Bytes::from_static(b"once"), t0).unwrap();
    let (data, _) = transmit(&mut a, 0, t0, 1 << 16);
    deliver(&mut b, 0, data.clone(), t0);
    b.on_timeout(t0 + MS);
    let (frames, _) = transmit(&mut b, 0, t0 + MS, 1 << 16);
    assert_eq!(acks(&frames), 1);
    // The same chunk again, on another path: dropped, and acked again so the sender stops.
    deliver(&mut b, 1, data, t0 + 2 * MS);
    assert_eq!(b.buffers().duplicates, 1);
    assert_eq!(b.poll_timeout(), Some(t0 + 3 * MS));
    b.on_timeout(t0 + 3 * MS);
    let (frames, _) = transmit(&mut b, 0, t0 + 3 * MS, 1 << 16);
    assert_eq!(acks(&frames), 1);
    assert_eq!(b.read(t0).as_deref(), Some(&b"once"[..]));
    assert_eq!(b.read(t0), None);
}

#[test]
fn a_dead_path_resends_its_chunks_on_another() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    a.add_path(1);
    a.push(Bytes::from(vec![1u8; 4000]), t0).unwrap();
    let (lost, _) = transmit(&mut a, 1, t0, 1 << 16);
    assert_eq!(
        lost.iter().filter(|f| matches!(f, Frame::Data(_))).count(),
        1
    );
    assert_eq!(a.path_ended(1, false), 1);
    let (again, _) = transmit(&mut a, 0, t0, 1 << 16);
    assert_eq!(acks(&again), 1, "state is resent after a path dies");
    deliver(&mut b, 0, again, t0);
    assert_eq!(b.read(t0).map(|m| m.len()), Some(4000));
    // A graceful end resends nothing.
    a.add_path(2);
    a.push(Bytes::from_static(b"x"), t0).unwrap();
    let _ = transmit(&mut a, 2, t0, 1 << 16);
    assert_eq!(a.path_ended(2, true), 0);
}

#[test]
fn stalled_chunks_go_out_again_after_the_stall_timeout() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    a.push(Bytes::from_static(b"stuck"), t0).unwrap();
    let _lost = transmit(&mut a, 0, t0, 1 << 16);
    let stall = config().stall_timeout;
    assert_eq!(a.poll_timeout(), Some(t0 + stall));
    // A long RTT lengthens it.
    a.set_srtt(Some(stall / 4));
    assert_eq!(a.poll_timeout(), Some(t0 + stall * 2));
    a.set_srtt(None);
    assert_eq!(a.on_timeout(t0 + stall - MS), 0);
    assert_eq!(
        transmit(&mut a, 1, t0 + stall - MS, 1 << 16).1,
        Transmit::Idle
    );
    assert_eq!(a.on_timeout(t0 + stall), 1);
    // Until a path takes the requeued chunk, the timer does not spin on it.
    assert!(
        a.poll_timeout()
            .is_some_and(|t| t >= t0 + stall + stall / 8)
    );
    let (frames, _) = transmit(&mut a, 1, t0 + stall, 1 << 16);
    deliver(&mut b, 1, frames, t0 + stall);
    assert_eq!(b.read(t0).as_deref(), Some(&b"stuck"[..]));
    assert_eq!(a.send_buffer().retransmissions(), 1);
}

#[test]
fn graceful_close_parts_on_every_path_and_the_peer_sees_closed() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    a.add_path(1);
    a.close(Some(Close::new(CloseCode::Normal, "done")));
    assert!(matches!(a.check_can_send(), Err(Error::Closed)));
    for path in [0, 1] {
        let (frames, t) = transmit(&mut a, path, t0, 1 << 16);
        assert_eq!(t, Transmit::Finish);
        assert_eq!(
            frames,
            vec![Frame::Close(Close::new(CloseCode::Normal, "done"))]
        );
        assert_eq!(transmit(&mut a, path, t0, 1 << 16).1, Transmit::Idle);
        if path == 0 {
            deliver(&mut b, 0, frames, t0);
        }
    }
    assert_eq!(events(&mut b), vec![Event::Closed]);
    assert!(b.is_peer_closed());
    assert!(matches!(
        b.check_can_send(),
        Err(Error::PeerClosed {
            code: CloseCode::Normal,
            ..
        })
    ));
    // A second Close(Normal) (from another path) is not a second event.
    b.on_frame(1, Frame::Close(Close::new(CloseCode::Normal, "done")), t0)
        .unwrap();
    assert_eq!(events(&mut b), vec![]);
}

#[test]
fn a_failure_latches_parts_with_its_code_and_fails_the_peer() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    a.push(Bytes::from_static(b"payload"), t0).unwrap();
    let (mut data, _) = transmit(&mut a, 0, t0, 1 << 16);
    let Some(Frame::Data(chunk)) = data.pop() else {
        panic!("a data frame")
    };
    // A chunk the reassembler rejects: past the credit granted.
    let mut bad = chunk;
    bad.session_offset = 1 << 40;
    let err = b.on_frame(0, Frame::Data(bad), t0).unwrap_err();
    assert!(matches!(err, Fatal::Protocol(_)));
    assert_eq!(events(&mut b), vec![Event::Failed(err.clone())]);
    // Latched: a later failure does not replace it, and every call reports it.
    let later = b.fail(Fatal::Timeout {
        what: "x",
        after: MS,
    });
    assert_eq!(later, err);
    assert_eq!(events(&mut b), vec![], "failed is reported once");
    assert!(b.push(Bytes::new(), t0).is_err());
    assert_eq!(
        b.on_frame(0, Frame::Credit(a.reassembler().credit()), t0),
        Err(err.clone())
    );
    assert_eq!(b.poll_timeout(), None);
    let (frames, t) = transmit(&mut b, 0, t0, 1 << 16);
    assert_eq!(t, Transmit::Finish);
    let [Frame::Close(close)] = &frames[..] else {
        panic!("only the Close: {frames:?}")
    };
    assert_eq!(close.code, CloseCode::ProtocolError);
    deliver_err(&mut a, frames);
    let ev = events(&mut a);
    assert!(
        matches!(
            &ev[..],
            [Event::Failed(Fatal::PeerClosed {
                code: CloseCode::ProtocolError,
                ..
            })]
        ),
        "{ev:?}"
    );
    // The failed side answers with its own Close on every path it still writes.
    let (frames, t) = transmit(&mut a, 0, t0, 1 << 16);
    assert_eq!(t, Transmit::Finish);
    assert!(matches!(&frames[..], [Frame::Close(c)] if c.code == CloseCode::Aborted));
}

fn deliver_err(to: &mut Session, frames: Vec<Frame>) {
    for f in frames {
        let _ = to.on_frame(0, f, Instant::now());
    }
}

#[test]
fn a_silent_peer_is_pinged_then_times_out_only_with_data_outstanding() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    let idle = config().idle_timeout;
    // Idle with nothing outstanding: nothing timed, however long.
    a.on_timeout(t0 + idle * 10);
    assert!(a.fatal().is_none());
    let t1 = t0 + idle * 10;
    a.push(Bytes::from_static(b"anyone?"), t1).unwrap();
    let _ = transmit(&mut a, 0, t1, 1 << 16);
    // The stall timer comes first; then the ping at a third of the idle timeout.
    let mut now = t1;
    let mut pings = 0;
    while a.fatal().is_none() {
        let next = a.poll_timeout().expect("timed while outstanding");
        assert!(next >= now, "time moves forward");
        now = next;
        a.on_timeout(now);
        let (frames, _) = transmit(&mut a, 0, now, 1 << 16);
        pings += frames
            .iter()
            .filter(|f| matches!(f, Frame::Ping(_)))
            .count();
        assert!(now <= t1 + idle, "fails at the idle timeout, not later");
    }
    assert_eq!(now, t1 + idle);
    assert!(pings >= 2, "pinged before giving up ({pings})");
    assert!(matches!(
        events(&mut a)[..],
        [Event::Failed(Fatal::Timeout { .. })]
    ));
}

#[test]
fn hearing_the_peer_keeps_the_session_alive() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    let idle = config().idle_timeout;
    a.push(Bytes::from_static(b"slow"), t0).unwrap();
    let _ = transmit(&mut a, 0, t0, 1 << 16);
    let mut now = t0;
    for _ in 0..10 {
        now += idle / 2;
        a.on_frame(
            0,
            Frame::Pong(Pong {
                id: 99,
                timestamp_ns: 0,
            }),
            now,
        )
        .unwrap();
        a.on_timeout(now);
    }
    assert!(a.fatal().is_none());
    assert_eq!(
        events(&mut a),
        vec![],
        "a Pong we never pinged for is no event"
    );
}

#[test]
fn pings_are_answered_and_pongs_reported() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    let id = a.ping(100, true, t0 + MS);
    let (frames, _) = transmit(&mut a, 0, t0 + MS, 1 << 16);
    assert!(
        matches!(&frames[..], [Frame::Ping(p)] if p.id == id && p.padding == 100 && p.timestamp_ns == 1_000_000)
    );
    deliver(&mut b, 0, frames, t0);
    let (frames, _) = transmit(&mut b, 0, t0, 1 << 16);
    assert!(matches!(&frames[..], [Frame::Pong(p)] if p.id == id));
    deliver(&mut a, 0, frames, t0);
    assert_eq!(events(&mut a), vec![Event::Pong { id }]);
}

#[test]
fn a_detached_ping_is_not_queued_and_its_pong_is_reported() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    let queued = a.ping(0, false, t0);
    let ping = a.ping_detached(1200, t0 + MS);
    assert_eq!(ping.id, queued + 1, "one id space with queued Pings");
    assert_eq!((ping.padding, ping.timestamp_ns), (1200, 1_000_000));
    // Only the queued Ping goes out with a transmit; the driver sends the detached one.
    let (frames, _) = transmit(&mut a, 0, t0 + MS, 1 << 16);
    assert!(matches!(&frames[..], [Frame::Ping(p)] if p.id == queued));
    assert!(!a.wants_control());
    deliver(&mut b, 0, vec![Frame::Ping(ping)], t0 + MS);
    assert!(b.wants_control(), "the Pong is a control frame");
    assert!(!b.send_buffer().has_sendable());
    let (frames, _) = transmit(&mut b, 0, t0 + MS, 0);
    assert!(matches!(&frames[..], [Frame::Pong(p)] if p.id == ping.id));
    deliver(&mut a, 7, frames, t0 + 2 * MS);
    assert_eq!(events(&mut a), vec![Event::Pong { id: ping.id }]);
}

#[test]
fn wants_control_is_control_frames_not_data() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    a.push(Bytes::from_static(b"data"), t0).unwrap();
    assert!(a.wants_transmit());
    assert!(!a.wants_control(), "data alone is not a control frame");
    a.request_ack();
    assert!(a.wants_control());
    // A control-only transmit (no room for data) takes the ack and leaves the data.
    let (frames, t) = transmit(&mut a, 0, t0, 0);
    assert_eq!(t, Transmit::Send);
    assert_eq!(acks(&frames), 1);
    assert!(!frames.iter().any(|f| matches!(f, Frame::Data(_))));
    assert!(!a.wants_control());
    assert!(a.send_buffer().has_sendable());
}

#[test]
fn a_ping_flood_queues_a_bounded_number_of_pongs() {
    let t0 = Instant::now();
    let (_, mut b) = pair(t0);
    for id in 0..10_000 {
        b.on_frame(
            0,
            Frame::Ping(Ping {
                id,
                timestamp_ns: 0,
                padding: 0,
            }),
            t0,
        )
        .unwrap();
    }
    let (frames, _) = transmit(&mut b, 0, t0, 1 << 16);
    let pongs = frames
        .iter()
        .filter(|f| matches!(f, Frame::Pong(_)))
        .count();
    assert_eq!(pongs, MAX_QUEUED_CONTROL);
}

#[test]
fn the_peer_stopping_a_path_finishes_it_with_a_stream_close() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    open(&mut a, &mut b, t0);
    b.add_path(1);
    b.on_frame(
        1,
        Frame::Close(Close::new(CloseCode::StreamClosed, "bye")),
        t0,
    )
    .unwrap();
    b.on_frame(
        1,
        Frame::Close(Close::new(CloseCode::StreamClosed, "bye")),
        t0,
    )
    .unwrap();
    assert_eq!(events(&mut b), vec![Event::PathStopped { path: 1 }]);
    assert!(b.path_stopping(1));
    b.push(Bytes::from_static(b"not on path 1"), t0).unwrap();
    let (frames, t) = transmit(&mut b, 1, t0, 1 << 16);
    assert_eq!(t, Transmit::Finish);
    assert!(frames.iter().all(|f| !matches!(f, Frame::Data(_))));
    assert!(matches!(frames.last(), Some(Frame::Close(c)) if c.code == CloseCode::StreamClosed));
    // The session goes on over path 0.
    let (frames, t) = transmit(&mut b, 0, t0, 1 << 16);
    assert_eq!(t, Transmit::Send);
    assert_eq!(
        frames
            .iter()
            .filter(|f| matches!(f, Frame::Data(_)))
            .count(),
        1
    );
    assert!(b.fatal().is_none());
}

#[test]
fn credit_comes_from_the_shared_memory_budget() {
    let t0 = Instant::now();
    let big = SessionConfig {
        receive_window: 64 << 20,
        max_message: 64 << 20,
        ..config()
    };
    let budget = MemoryBudget::new(4 << 20);
    let mut sender = Session::new(big.clone(), MemoryBudget::new(u64::MAX), t0);
    let mut rx1 = Session::new(big.clone(), budget.clone(), t0);
    let _rx2 = Session::new(big, budget.clone(), t0);
    let (credit, _) = transmit(&mut rx1, 0, t0, 0);
    deliver(&mut sender, 0, credit, t0);
    let first = sender.send_buffer().credit_limit();
    assert_eq!(
        first,
        crate::MIN_WINDOW,
        "only the minimum until data arrives"
    );
    // Send within credit; the window opens only as far as this session's share (half).
    let mut now = t0;
    let mut sent = 0u64;
    for _ in 0..64 {
        // At most a quarter of the budget: the largest message a receiver on it takes.
        let room = (sender.send_buffer().credit_limit() - sent).min(1 << 20);
        if room == 0 {
            break;
        }
        sender
            .push(Bytes::from(vec![0u8; room as usize]), now)
            .unwrap();
        sent += room;
        loop {
            let (frames, t) = transmit(&mut sender, 0, now, 1 << 20);
            if t == Transmit::Idle {
                break;
            }
            deliver(&mut rx1, 0, frames, now);
        }
        now += 10 * MS;
        rx1.on_timeout(now);
        let (frames, _) = transmit(&mut rx1, 0, now, 0);
        deliver(&mut sender, 0, frames, now);
    }
    let limit = sender.send_buffer().credit_limit();
    assert!(
        limit <= (2 << 20) + crate::MIN_WINDOW,
        "credit {limit} within the share"
    );
    assert!(
        budget.held() <= (4 << 20) + crate::MIN_WINDOW * 2,
        "{}",
        budget.held()
    );
    // Nothing read: the sender is blocked at the credit.
    assert_eq!(sent, limit);
    // Reading gives the bytes back once dropped, and the credit moves on.
    while let Some(m) = rx1.read(now) {
        drop(m);
    }
    // The window is the budget's share, far below the configured one whose eighth is the
    // credit threshold: the update goes out after the ack delay.
    rx1.on_timeout(now + MS);
    let (frames, _) = transmit(&mut rx1, 0, now, 0);
    deliver(&mut sender, 0, frames, now);
    let after = sender.send_buffer().credit_limit();
    assert!(after > limit, "credit {after} moved on from {limit}");
}
