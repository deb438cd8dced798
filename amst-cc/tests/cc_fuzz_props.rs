//! The property-test twin of the `cc_events` fuzz target (fuzz/fuzz_targets/cc_events.rs), so
//! that CI covers it without cargo-fuzz: BBR (both loss modes), CUBIC and NewReno, each fed an
//! arbitrary sequence of every event a transport can report, with numbers from 0 to
//! `u64::MAX`. After every event: no panic, cwnd > 0, the pacing rate finite and positive,
//! a positive send quantum, and metrics that agree with the accessors.

use std::time::{Duration, Instant};

use amst_cc::cubic::{LossBasedConfig, NewReno};
use amst_cc::delivery_rate::LostPacketSample;
use amst_cc::{Ack, Bbr, BbrConfig, CongestionController, Cubic, CubicConfig, Loss, RateSample};
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Bbr,
    BbrStrict,
    Cubic,
    NewReno,
}

#[derive(Clone, Debug)]
enum Event {
    Sent(u64, u64),
    Ack(u64, u64),
    AckSampled {
        acked: u64,
        in_flight: u64,
        sample: RateSample,
    },
    Loss {
        lost: u64,
        in_flight: u64,
        sent_ago: Duration,
        persistent: bool,
    },
    PacketLost(LostPacketSample),
    Rtt(Duration, Duration),
    Ecn(u64, u64),
    Mtu(u64),
    Spurious,
    AppLimited(u64),
    Advance(Duration),
}

/// Byte counts: mostly realistic, sometimes enormous; `hostile` adds the whole `u64` range
/// and its edges (what a buggy or malicious transport could pass).
fn bytes_in(hostile: bool) -> BoxedStrategy<u64> {
    if hostile {
        prop_oneof![
            4 => 0u64..200_000,
            2 => 0u64..(1 << 40),
            1 => any::<u64>(),
            1 => prop_oneof![Just(0), Just(1), Just(u64::MAX), Just(u64::MAX / 2)],
        ]
        .boxed()
    } else {
        prop_oneof![4 => 0u64..200_000, 1 => 0u64..(1 << 40), 1 => Just(0)].boxed()
    }
}

fn micros() -> impl Strategy<Value = Duration> {
    prop_oneof![
        3 => (0u64..500_000).prop_map(Duration::from_micros),
        1 => (0u64..20_000_000).prop_map(Duration::from_micros),
    ]
}

fn event(hostile: bool) -> impl Strategy<Value = Event> {
    let bytes = move || bytes_in(hostile);
    prop_oneof![
        4 => (bytes(), bytes()).prop_map(|(b, f)| Event::Sent(b, f)),
        2 => (bytes(), bytes()).prop_map(|(a, f)| Event::Ack(a, f)),
        4 => (
            bytes(),
            bytes(),
            (bytes(), micros(), any::<bool>(), bytes(), bytes(), bytes())
        )
            .prop_map(|(acked, in_flight, (d, i, app, prior, lost, tx))| Event::AckSampled {
                acked,
                in_flight,
                sample: RateSample {
                    delivered: d,
                    interval: i,
                    is_app_limited: app,
                    prior_delivered: prior,
                    lost,
                    tx_in_flight: tx,
                },
            }),
        2 => (bytes(), bytes(), micros(), any::<bool>()).prop_map(
            |(lost, in_flight, sent_ago, persistent)| Event::Loss {
                lost,
                in_flight,
                sent_ago,
                persistent
            }
        ),
        1 => (bytes(), bytes(), bytes(), any::<bool>()).prop_map(|(size, tx, lost, app)| {
            Event::PacketLost(LostPacketSample {
                size,
                tx_in_flight: tx,
                lost,
                is_app_limited: app,
            })
        }),
        2 => (micros(), micros()).prop_map(|(r, d)| Event::Rtt(r, d)),
        1 => (bytes(), bytes()).prop_map(|(m, f)| Event::Ecn(m, f)),
        1 => bytes().prop_map(Event::Mtu),
        1 => Just(Event::Spurious),
        1 => bytes().prop_map(Event::AppLimited),
        3 => micros().prop_map(Event::Advance),
    ]
}

fn controller(kind: Kind, mss: u64, t0: Instant) -> Box<dyn CongestionController> {
    match kind {
        Kind::Bbr => Box::new(Bbr::new(BbrConfig::with_datagram_size(mss), t0)),
        Kind::BbrStrict => {
            // The other configuration knobs: no SACK, TCP offload, random-loss tolerance.
            let mut c = BbrConfig::with_datagram_size(mss).with_random_loss_tolerance(true);
            c.has_selective_acks = false;
            c.offload_quanta = 3;
            Box::new(Bbr::new(c, t0))
        }
        Kind::Cubic => Box::new(Cubic::new(CubicConfig::with_mss(mss))),
        Kind::NewReno => Box::new(NewReno::new(LossBasedConfig::with_mss(mss))),
    }
}

fn check(cc: &dyn CongestionController, step: usize) -> Result<(), TestCaseError> {
    let cwnd = cc.cwnd();
    prop_assert!(cwnd > 0, "step {step}: cwnd is 0: {cc:?}");
    let p = cc.pacing_rate();
    prop_assert!(
        p.is_finite() && p > 0.0,
        "step {step}: pacing rate {p}: {cc:?}"
    );
    prop_assert!(cc.send_quantum() > 0, "step {step}: send quantum 0");
    let m = cc.metrics();
    prop_assert_eq!(m.cwnd, cwnd, "step {}: metrics disagree with cwnd()", step);
    prop_assert!(m.pacing_rate.is_finite() && m.pacing_rate > 0.0);
    prop_assert!(m.bottleneck_bw.is_finite() && m.bottleneck_bw >= 0.0);
    Ok(())
}

fn run(kind: Kind, mss: u64, events: Vec<Event>) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let mut now = t0;
    let mut cc = controller(kind, mss, t0);
    check(&*cc, 0)?;
    for (step, e) in events.into_iter().enumerate() {
        match e {
            Event::Sent(b, f) => cc.on_packet_sent(now, b, f),
            Event::Ack(a, f) => cc.on_ack(
                now,
                &Ack {
                    bytes_acked: a,
                    bytes_in_flight: f,
                    rate_sample: None,
                },
            ),
            Event::AckSampled {
                acked,
                in_flight,
                sample,
            } => cc.on_ack(
                now,
                &Ack {
                    bytes_acked: acked,
                    bytes_in_flight: in_flight,
                    rate_sample: Some(sample),
                },
            ),
            Event::Loss {
                lost,
                in_flight,
                sent_ago,
                persistent,
            } => cc.on_loss(
                now,
                &Loss {
                    bytes_lost: lost,
                    bytes_in_flight: in_flight,
                    largest_lost_sent_at: now - sent_ago.min(now - t0),
                    persistent_congestion: persistent,
                },
            ),
            Event::PacketLost(p) => cc.on_packet_lost(now, &p),
            Event::Rtt(r, d) => cc.on_rtt_sample(now, r, d),
            Event::Ecn(m, f) => cc.on_ecn(now, m, f),
            Event::Mtu(m) => cc.on_mtu_update(m),
            Event::Spurious => cc.on_spurious_loss(now),
            Event::AppLimited(f) => cc.on_app_limited(now, f),
            Event::Advance(d) => now += d,
        }
        check(&*cc, step + 1)?;
    }
    prop_assert_eq!(cc.clone_box().cwnd(), cc.cwnd());
    Ok(())
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Bbr),
        Just(Kind::BbrStrict),
        Just(Kind::Cubic),
        Just(Kind::NewReno),
    ]
}

fn mss() -> impl Strategy<Value = u64> {
    prop_oneof![Just(1200u64), Just(1448), Just(9000), 1u64..=256]
}

fn bbr_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Bbr), Just(Kind::BbrStrict)]
}

fn loss_based_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Cubic), Just(Kind::NewReno)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    /// Byte counts a real transport can produce (below 2^40 per event).
    #[test]
    fn every_controller_survives_arbitrary_events(
        kind in kind(),
        mss in mss(),
        events in proptest::collection::vec(event(false), 1..300),
    ) {
        run(kind, mss, events)?;
    }

    /// Any `u64`, including `u64::MAX`, in every field.
    #[test]
    fn bbr_survives_hostile_values(
        kind in bbr_kind(),
        mss in mss(),
        events in proptest::collection::vec(event(true), 1..300),
    ) {
        run(kind, mss, events)?;
    }

    /// Any `u64`, including `u64::MAX`, in every field.
    #[test]
    fn loss_based_survive_hostile_values(
        kind in loss_based_kind(),
        mss in mss(),
        events in proptest::collection::vec(event(true), 1..300),
    ) {
        run(kind, mss, events)?;
    }
}

/// A plausible flow punctuated by hostile values: the shape that found real overflows in BBR
/// (cwnd arithmetic on `u64::MAX` in-flight counts after a long, healthy run).
fn hostile_after_healthy(kinds: &[Kind]) {
    for &kind in kinds {
        let mut events = Vec::new();
        let mut delivered = 0u64;
        for i in 0..2_000u64 {
            events.push(Event::Sent(1448, 20 * 1448));
            events.push(Event::Advance(Duration::from_micros(500)));
            events.push(Event::Rtt(
                Duration::from_millis(20 + i % 5),
                Duration::ZERO,
            ));
            events.push(Event::AckSampled {
                acked: 1448,
                in_flight: 19 * 1448,
                sample: RateSample {
                    delivered: 20 * 1448,
                    interval: Duration::from_millis(20),
                    is_app_limited: false,
                    prior_delivered: delivered,
                    lost: 0,
                    tx_in_flight: 20 * 1448,
                },
            });
            delivered += 1448;
        }
        events.extend([
            Event::Sent(u64::MAX, u64::MAX),
            Event::Ack(u64::MAX, u64::MAX),
            Event::Loss {
                lost: u64::MAX,
                in_flight: u64::MAX,
                sent_ago: Duration::from_millis(1),
                persistent: true,
            },
            Event::Ecn(u64::MAX, u64::MAX),
            Event::Mtu(u64::MAX),
            Event::Spurious,
            Event::Mtu(0),
            Event::Advance(Duration::from_secs(20)),
            Event::Sent(1, 0),
        ]);
        if let Err(e) = run(kind, 1448, events) {
            panic!("{kind:?}: {e}");
        }
    }
}

#[test]
fn bbr_outputs_stay_valid_after_hostile_values_following_a_healthy_run() {
    hostile_after_healthy(&[Kind::Bbr, Kind::BbrStrict]);
}

#[test]
fn loss_based_outputs_stay_valid_after_hostile_values_following_a_healthy_run() {
    hostile_after_healthy(&[Kind::Cubic, Kind::NewReno]);
}
