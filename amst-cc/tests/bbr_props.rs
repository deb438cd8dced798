//! Property tests: whatever a transport feeds BBR, in whatever order, its outputs stay
//! usable: cwnd at least `BBR.MinPipeCwnd` (4 datagrams), a finite positive pacing rate, and
//! a send quantum between 2 datagrams and 64 KiB.

use std::time::{Duration, Instant};

use amst_cc::bbr::{Bbr, BbrConfig};
use amst_cc::delivery_rate::LostPacketSample;
use amst_cc::{Ack, CongestionController, Loss, RateSample};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Event {
    Sent(u64, u64),
    Ack {
        acked: u64,
        in_flight: u64,
        sample: Option<(u64, u64, bool, u64, u64, u64)>,
    },
    Loss(u64, u64, bool),
    PacketLost(u64, u64, u64, bool),
    Rtt(u64),
    Ecn(u64, u64),
    Mtu(u64),
    Spurious,
    AppLimited(u64),
    Advance(u64),
}

fn event() -> impl Strategy<Value = Event> {
    let bytes = prop_oneof![0u64..10_000, 0u64..u64::MAX / 4, Just(u64::MAX / 2)];
    prop_oneof![
        (bytes.clone(), bytes.clone()).prop_map(|(a, b)| Event::Sent(a, b)),
        (
            bytes.clone(),
            bytes.clone(),
            proptest::option::of((
                bytes.clone(),
                0u64..5_000_000,
                any::<bool>(),
                bytes.clone(),
                bytes.clone(),
                bytes.clone()
            ))
        )
            .prop_map(|(acked, in_flight, sample)| Event::Ack {
                acked,
                in_flight,
                sample
            }),
        (bytes.clone(), bytes.clone(), any::<bool>()).prop_map(|(a, b, c)| Event::Loss(a, b, c)),
        (bytes.clone(), bytes.clone(), bytes.clone(), any::<bool>())
            .prop_map(|(a, b, c, d)| Event::PacketLost(a, b, c, d)),
        (0u64..10_000_000).prop_map(Event::Rtt),
        (bytes.clone(), bytes.clone()).prop_map(|(a, b)| Event::Ecn(a, b)),
        (0u64..70_000).prop_map(Event::Mtu),
        Just(Event::Spurious),
        bytes.prop_map(Event::AppLimited),
        (0u64..20_000_000).prop_map(Event::Advance),
    ]
}

fn check(bbr: &Bbr) -> Result<(), TestCaseError> {
    let mss = bbr.config().max_datagram_size;
    prop_assert!(bbr.cwnd() >= 4 * mss, "cwnd {} < 4 x {mss}", bbr.cwnd());
    let p = bbr.pacing_rate();
    prop_assert!(p.is_finite() && p > 0.0, "pacing rate {p}");
    let q = bbr.send_quantum();
    prop_assert!(
        q >= 2 * mss && q <= (64 * 1024).max(2 * mss),
        "send quantum {q}"
    );
    let m = bbr.metrics();
    prop_assert!(m.bottleneck_bw.is_finite() && m.bottleneck_bw >= 0.0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn outputs_stay_valid_under_arbitrary_events(events in proptest::collection::vec(event(), 1..200)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut bbr = Bbr::new(BbrConfig::with_datagram_size(1200), t0);
        check(&bbr)?;
        for e in events {
            match e {
                Event::Sent(b, f) => bbr.on_packet_sent(now, b, f),
                Event::Ack { acked, in_flight, sample } => bbr.on_ack(
                    now,
                    &Ack {
                        bytes_acked: acked,
                        bytes_in_flight: in_flight,
                        rate_sample: sample.map(|(d, us, app, prior, lost, tx)| RateSample {
                            delivered: d,
                            interval: Duration::from_micros(us),
                            is_app_limited: app,
                            prior_delivered: prior,
                            lost,
                            tx_in_flight: tx,
                        }),
                    },
                ),
                Event::Loss(lost, f, pc) => bbr.on_loss(
                    now,
                    &Loss {
                        bytes_lost: lost,
                        bytes_in_flight: f,
                        largest_lost_sent_at: t0.max(now - Duration::from_millis(1).min(now - t0)),
                        persistent_congestion: pc,
                    },
                ),
                Event::PacketLost(size, tx, lost, app) => bbr.on_packet_lost(
                    now,
                    &LostPacketSample { size, tx_in_flight: tx, lost, is_app_limited: app },
                ),
                Event::Rtt(us) => bbr.on_rtt_sample(now, Duration::from_micros(us), Duration::ZERO),
                Event::Ecn(m, f) => bbr.on_ecn(now, m, f),
                Event::Mtu(m) => bbr.on_mtu_update(m),
                Event::Spurious => bbr.on_spurious_loss(now),
                Event::AppLimited(f) => bbr.on_app_limited(now, f),
                Event::Advance(us) => now += Duration::from_micros(us),
            }
            check(&bbr)?;
        }
    }
}
