//! CUBIC against the numbers in RFC 9438 and RFC 9406.

use std::time::{Duration, Instant};

use amst_cc::cubic::{Cubic, CubicConfig, NewReno, WindowGrowth};
use amst_cc::slow_start::SlowStartPhase;
use amst_cc::{Ack, CongestionController, Loss, Phase, RateSample};

const MSS: u64 = 1000;
const RTT: Duration = Duration::from_millis(100);

/// An ack-clocked driver: every ack of one MSS is followed by sending enough new packets to
/// fill the window, and acks of one window are spread evenly over one RTT.
struct Driver {
    cc: Cubic,
    now: Instant,
    in_flight: u64,
    rtt: Duration,
}

impl Driver {
    fn new(cfg: CubicConfig) -> Self {
        let mut d = Self {
            cc: Cubic::new(cfg),
            now: Instant::now(),
            in_flight: 0,
            rtt: RTT,
        };
        d.fill();
        d
    }

    fn fill(&mut self) {
        while self.in_flight + MSS <= self.cc.cwnd() {
            self.in_flight += MSS;
            self.cc.on_packet_sent(self.now, MSS, self.in_flight);
        }
    }

    /// One ack of one MSS, `rtt × MSS / cwnd` after the previous one.
    fn ack(&mut self) {
        let step = self.rtt.mul_f64(MSS as f64 / self.cc.cwnd() as f64);
        self.now += step;
        self.cc.on_rtt_sample(self.now, self.rtt, Duration::ZERO);
        self.in_flight -= MSS;
        self.cc.on_ack(
            self.now,
            &Ack {
                bytes_acked: MSS,
                bytes_in_flight: self.in_flight,
                rate_sample: None,
            },
        );
        self.fill();
    }

    fn lose_one(&mut self) {
        self.in_flight -= MSS;
        self.cc.on_loss(
            self.now,
            &Loss {
                bytes_lost: MSS,
                bytes_in_flight: self.in_flight,
                largest_lost_sent_at: self.now - Duration::from_millis(1),
                persistent_congestion: false,
            },
        );
        self.fill();
    }

    /// Acks until recovery is over (one window).
    fn finish_recovery(&mut self) {
        for _ in 0..10_000 {
            if !self.cc.in_recovery() {
                return;
            }
            self.ack();
        }
        panic!("recovery never ended");
    }
}

fn config(initial_window: u64) -> CubicConfig {
    let mut cfg = CubicConfig::with_mss(MSS);
    cfg.base.initial_window = Some(initial_window);
    cfg
}

#[test]
fn window_after_loss_is_exactly_beta_times_cwnd() {
    for w in [14_720u64, 100_000, 123_457, 1_000_003] {
        let mut d = Driver::new(config(w));
        d.ack();
        let before = d.cc.cwnd();
        d.lose_one();
        assert_eq!(d.cc.cwnd(), (before as f64 * 0.7) as u64, "cwnd {before}");
        assert_eq!(d.cc.ssthresh(), d.cc.cwnd());
        assert_eq!(d.cc.metrics().phase, Phase::Recovery);
        // A second loss in the same recovery epoch (packet sent before it began) is ignored.
        d.lose_one();
        assert_eq!(d.cc.cwnd(), (before as f64 * 0.7) as u64);
        assert_eq!(d.cc.congestion_events(), 1);
    }
}

#[test]
fn loss_in_congestion_avoidance_is_also_beta_times_cwnd() {
    let mut d = Driver::new(config(50_000));
    d.lose_one();
    d.finish_recovery();
    for _ in 0..500 {
        d.ack();
    }
    assert_eq!(d.cc.metrics().phase, Phase::CongestionAvoidance);
    let before = d.cc.cwnd();
    d.now += Duration::from_millis(5);
    d.cc.on_loss(
        d.now,
        &Loss {
            bytes_lost: MSS,
            bytes_in_flight: d.in_flight,
            largest_lost_sent_at: d.now,
            persistent_congestion: false,
        },
    );
    assert_eq!(d.cc.cwnd(), (before as f64 * 0.7) as u64);
}

/// RFC 9438 §4.2: "W_cubic(t) = C * (t - K)^3 + W_max", "K = cubic_root((W_max -
/// cwnd_epoch) / C)", with C = 0.4 and everything in segments. The controller's window must
/// follow it to within one MSS across the epoch: through the concave region, the plateau at
/// K and into the convex region, for as long as CUBIC is not Reno-friendly (§4.3: once
/// W_cubic(t) < W_est, cwnd is W_est instead, which is checked too).
#[test]
fn window_follows_the_cubic_function_within_one_mss() {
    let w_max_segments = 100.0;
    let mut d = Driver::new(config(100 * MSS));
    d.lose_one();
    assert_eq!(d.cc.cwnd(), 70 * MSS);
    d.finish_recovery();
    // The epoch starts with the first ack after recovery, at cwnd_epoch = 70 segments.
    let t_epoch = d.cc.growth().epoch_start().expect("epoch started");
    assert_eq!(d.cc.growth().cwnd_epoch(), 70_000.0);
    let k = ((w_max_segments - 70.0) / 0.4f64).cbrt();
    assert!((d.cc.growth().k() - k).abs() < 1e-9);
    let mut checked = 0;
    let mut reno_friendly = 0;
    let mut worst: f64 = 0.0;
    let mut last_cubic_t = 0.0;
    while d.now.duration_since(t_epoch).as_secs_f64() < 2.0 * k {
        d.ack();
        let t = d.now.duration_since(t_epoch).as_secs_f64();
        let w = 0.4 * (t - k).powi(3) + w_max_segments;
        let cwnd_segments = d.cc.cwnd() as f64 / MSS as f64;
        let w_est = d.cc.growth().w_est() / MSS as f64;
        if w < w_est {
            // Reno-friendly region: cwnd is W_est (never below the window it had).
            assert!(
                (cwnd_segments - w_est).abs() <= 1.0,
                "t={t:.3}s: cwnd {cwnd_segments:.2}, W_est {w_est:.2}"
            );
            reno_friendly += 1;
            continue;
        }
        let err = (cwnd_segments - w).abs();
        worst = worst.max(err);
        assert!(
            err <= 1.0,
            "t={t:.3}s: cwnd {cwnd_segments:.2} segments, W_cubic {w:.2} segments"
        );
        last_cubic_t = t;
        checked += 1;
    }
    // The cubic region covers the concave part, K and beyond.
    assert!(checked > 5_000, "only {checked} acks checked");
    assert!(
        last_cubic_t > 1.3 * k,
        "cubic region ended at {last_cubic_t:.2} s, K = {k:.2} s"
    );
    assert!(
        reno_friendly > 0,
        "W_est (alpha = 1 after cwnd_prior) should overtake eventually"
    );
    eprintln!("worst |cwnd - W_cubic(t)| = {worst:.3} segments over {checked} acks");
    assert!(worst < 0.1, "tracking error {worst} segments");
}

/// RFC 9438 §4.7: a loss below the previous W_max lowers W_max to cwnd × (1 + β) / 2.
#[test]
fn fast_convergence_releases_bandwidth() {
    let mut d = Driver::new(config(100 * MSS));
    d.lose_one();
    d.finish_recovery();
    assert_eq!(d.cc.growth().w_max(), 100_000.0);
    for _ in 0..100 {
        d.ack();
    }
    let cwnd = d.cc.cwnd();
    assert!(cwnd < 100 * MSS);
    d.now += Duration::from_millis(1);
    d.cc.on_loss(
        d.now,
        &Loss {
            bytes_lost: MSS,
            bytes_in_flight: d.in_flight,
            largest_lost_sent_at: d.now,
            persistent_congestion: false,
        },
    );
    assert_eq!(d.cc.growth().w_max(), cwnd as f64 * 1.7 / 2.0);
    assert_eq!(d.cc.growth().cwnd_prior(), cwnd as f64);
}

/// RFC 9438 §4.3: W_est grows by alpha_cubic = 3(1-β)/(1+β) segments per window until it
/// reaches cwnd_prior, then by one segment per window.
#[test]
fn reno_friendly_estimate_switches_alpha_to_one_at_cwnd_prior() {
    // A short RTT keeps CUBIC in the Reno-friendly region.
    let mut d = Driver::new(config(20 * MSS));
    d.rtt = Duration::from_millis(1);
    d.lose_one();
    d.finish_recovery();
    let alpha = 3.0 * 0.3 / 1.7;
    let start = d.cc.growth().w_est();
    // One window of acks.
    let n = d.cc.cwnd() / MSS;
    for _ in 0..n {
        d.ack();
    }
    let grown = (d.cc.growth().w_est() - start) / MSS as f64;
    assert!(
        (grown - alpha).abs() < 0.05,
        "grew {grown} segments, alpha {alpha}"
    );
    for _ in 0..20_000 {
        d.ack();
        if d.cc.growth().w_est() >= d.cc.growth().cwnd_prior() + 2.0 * MSS as f64 {
            break;
        }
    }
    let before = d.cc.growth().w_est();
    let n = d.cc.cwnd() / MSS;
    for _ in 0..n {
        d.ack();
    }
    let grown = (d.cc.growth().w_est() - before) / MSS as f64;
    assert!((grown - 1.0).abs() < 0.05, "grew {grown} segments, want 1");
    // In the Reno-friendly region cwnd is W_est.
    assert_eq!(d.cc.cwnd(), d.cc.growth().w_est() as u64);
}

/// RFC 9438 §4.2: the target is at most 1.5 × cwnd, so one window of acks at most grows
/// cwnd by half, however far below W_cubic it is.
#[test]
fn growth_per_rtt_is_clamped_to_one_and_a_half() {
    // With a 10 s RTT, W_cubic(t + RTT) is far above 1.5 × cwnd from the first ack on
    // (W_cubic(10 s) = 0.4 × (10 − 4.2)³ + 100 ≈ 178 segments against cwnd = 70), so every
    // ack grows cwnd by (1.5·cwnd − cwnd)/cwnd = half a segment: exactly ×1.5 per window.
    let mut d = Driver::new(config(100 * MSS));
    d.rtt = Duration::from_secs(10);
    d.lose_one();
    d.finish_recovery();
    for _ in 0..3 {
        let before = d.cc.cwnd();
        let n = before / MSS;
        for _ in 0..n {
            d.ack();
        }
        let ratio = d.cc.cwnd() as f64 / before as f64;
        assert!(ratio <= 1.5 + 1e-9, "grew ×{ratio}");
        assert!(
            ratio > 1.49,
            "clamped growth should reach ×1.5, got ×{ratio}"
        );
    }
}

/// RFC 9406: rising RTT moves slow start into CSS, CSS_ROUNDS later into congestion
/// avoidance with ssthresh = cwnd, without any loss.
#[test]
fn hystart_exits_slow_start_on_rtt_increase() {
    let mut d = Driver::new(config(10 * MSS));
    d.rtt = Duration::from_millis(50);
    // Four rounds at the base RTT: exponential growth.
    for _ in 0..4 {
        let n = d.in_flight / MSS;
        for _ in 0..n {
            d.ack();
        }
    }
    assert_eq!(d.cc.slow_start_phase(), SlowStartPhase::Exponential);
    let cwnd_ss = d.cc.cwnd();
    assert!(cwnd_ss >= 150 * MSS, "cwnd {cwnd_ss}");
    // The queue builds: RTT + 25 ms (threshold is max(4, min(50/8, 16)) = 6.25 ms).
    d.rtt = Duration::from_millis(75);
    let mut rounds = 0;
    while d.cc.slow_start_phase() == SlowStartPhase::Exponential {
        let n = d.in_flight / MSS;
        for _ in 0..n {
            d.ack();
        }
        rounds += 1;
        assert!(rounds < 3, "no CSS after {rounds} rounds");
    }
    assert_eq!(d.cc.slow_start_phase(), SlowStartPhase::Conservative);
    assert_eq!(d.cc.metrics().phase, Phase::SlowStart);
    // CSS grows at a quarter of the slow-start rate.
    let before = d.cc.cwnd();
    for _ in 0..40 {
        d.ack();
    }
    assert_eq!(d.cc.cwnd() - before, 40 * MSS / 4);
    // CSS lasts CSS_ROUNDS = 5 rounds: at most six windows of acks (the first is partial).
    let mut budget: u64 = 0;
    let mut w = d.in_flight / MSS;
    for _ in 0..6 {
        budget += w;
        w += w / 4;
    }
    let mut acks = 0;
    while d.cc.slow_start_phase() != SlowStartPhase::Done {
        d.ack();
        acks += 1;
        assert!(acks <= budget, "CSS lasted more than {budget} acks");
    }
    assert!(acks > budget / 3, "CSS ended after only {acks} acks");
    assert_eq!(d.cc.metrics().phase, Phase::CongestionAvoidance);
    assert_eq!(d.cc.ssthresh(), d.cc.cwnd());
    assert_eq!(d.cc.congestion_events(), 0);
    // Growth continues from cwnd as W_max (K = 0, convex).
    assert_eq!(d.cc.growth().w_max(), d.cc.ssthresh() as f64);
}

#[test]
fn spurious_loss_undo_restores_the_window() {
    let mut d = Driver::new(config(80 * MSS));
    for _ in 0..20 {
        d.ack();
    }
    let before = d.cc.cwnd();
    let phase = d.cc.slow_start_phase();
    d.lose_one();
    assert!(d.cc.cwnd() < before);
    d.cc.on_spurious_loss(d.now);
    assert_eq!(d.cc.cwnd(), before);
    assert_eq!(d.cc.ssthresh(), u64::MAX);
    assert_eq!(d.cc.slow_start_phase(), phase);
    assert!(!d.cc.in_recovery());
    // Undo happens once.
    d.lose_one();
    d.cc.on_spurious_loss(d.now);
    d.cc.on_spurious_loss(d.now);
    assert_eq!(d.cc.cwnd(), before);
}

#[test]
fn app_limited_sender_does_not_grow_the_window() {
    let mut d = Driver::new(config(50 * MSS));
    let cwnd = d.cc.cwnd();
    d.cc.on_app_limited(d.now, d.in_flight);
    // Acks arrive, but the sender sends nothing new.
    for _ in 0..10 {
        d.now += Duration::from_millis(2);
        d.in_flight -= MSS;
        d.cc.on_ack(
            d.now,
            &Ack {
                bytes_acked: MSS,
                bytes_in_flight: d.in_flight,
                rate_sample: None,
            },
        );
    }
    assert_eq!(d.cc.cwnd(), cwnd);
    // A rate sample flagged app-limited also stops growth.
    let mut c = Cubic::new(config(50 * MSS));
    let rs = RateSample {
        delivered: MSS,
        interval: RTT,
        is_app_limited: true,
        prior_delivered: 0,
        lost: 0,
        tx_in_flight: MSS,
    };
    c.on_packet_sent(d.now, 50 * MSS, 50 * MSS);
    c.on_ack(
        d.now,
        &Ack {
            bytes_acked: MSS,
            bytes_in_flight: 0,
            rate_sample: Some(rs),
        },
    );
    assert_eq!(c.cwnd(), 50 * MSS);
    // Filling the window again ends the app-limited period; growth resumes.
    d.fill();
    d.ack();
    assert!(d.cc.cwnd() > cwnd);
}

#[test]
fn persistent_congestion_collapses_to_minimum_window_then_slow_starts() {
    let mut d = Driver::new(config(60 * MSS));
    d.cc.on_loss(
        d.now,
        &Loss {
            bytes_lost: 60 * MSS,
            bytes_in_flight: 0,
            largest_lost_sent_at: d.now,
            persistent_congestion: true,
        },
    );
    d.in_flight = 0;
    assert_eq!(d.cc.cwnd(), 2 * MSS);
    assert_eq!(d.cc.ssthresh(), 42 * MSS);
    d.fill();
    d.ack();
    assert_eq!(d.cc.cwnd(), 3 * MSS);
    assert_eq!(d.cc.metrics().phase, Phase::SlowStart);
}

#[test]
fn ecn_reduces_like_a_loss() {
    let mut d = Driver::new(config(40 * MSS));
    d.cc.on_ecn(d.now, MSS, d.in_flight);
    assert_eq!(d.cc.cwnd(), 28 * MSS);
}

#[test]
fn new_reno_composes_the_same_controller_with_aimd() {
    let mut cfg = amst_cc::cubic::LossBasedConfig::with_mss(MSS);
    cfg.initial_window = Some(40 * MSS);
    let mut r = NewReno::new(cfg);
    let now = Instant::now();
    r.on_packet_sent(now, MSS, MSS);
    r.on_loss(
        now,
        &Loss {
            bytes_lost: MSS,
            bytes_in_flight: 0,
            largest_lost_sent_at: now,
            persistent_congestion: false,
        },
    );
    assert_eq!(r.cwnd(), 20 * MSS);
    assert_eq!(r.growth().beta(), 0.5);
}
