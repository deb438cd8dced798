//! BBR in the deterministic bottleneck simulator: the numbers issue 3 asks for.
//!
//! Run with `cargo test -p amst-cc --features sim --test bbr_sim`.

#![cfg(feature = "sim")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amst_cc::bbr::{Bbr, BbrConfig, State};
use amst_cc::delivery_rate::LostPacketSample;
use amst_cc::sim::{Flow, Link, LinkChange, Report, Scenario};
use amst_cc::{Ack, CongestionController, ControllerMetrics, Loss, Phase};

const MSS: u64 = 1500;

/// What the observer wrapper records on every ack.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Obs {
    at: Instant,
    state: State,
    round: u64,
    cycle: u64,
    max_bw: f64,
    bw: f64,
    pacing_rate: f64,
    cwnd: u64,
}

/// A controller that forwards to [`Bbr`] and records its internal state after each ack, so
/// tests can assert on rounds and ProbeBW cycles, which the simulator's report does not see.
#[derive(Debug)]
struct Observed {
    inner: Bbr,
    log: Arc<Mutex<Vec<Obs>>>,
}

impl Observed {
    fn new(now: Instant) -> (Self, Arc<Mutex<Vec<Obs>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let inner = Bbr::new(BbrConfig::with_datagram_size(MSS), now);
        (
            Self {
                inner,
                log: log.clone(),
            },
            log,
        )
    }

    fn record(&self, at: Instant) {
        let b = &self.inner;
        let obs = Obs {
            at,
            state: b.state(),
            round: b.round_count(),
            cycle: b.cycle_count(),
            max_bw: b.max_bw(),
            bw: b.bw(),
            pacing_rate: b.pacing_rate(),
            cwnd: b.cwnd(),
        };
        let mut log = self.log.lock().unwrap();
        // Keep the log small: one entry per change of round, state or cycle.
        if log
            .last()
            .is_none_or(|l| (l.round, l.state, l.cycle) != (obs.round, obs.state, obs.cycle))
        {
            log.push(obs);
        }
    }
}

impl CongestionController for Observed {
    fn on_packet_sent(&mut self, now: Instant, bytes: u64, bytes_in_flight: u64) {
        self.inner.on_packet_sent(now, bytes, bytes_in_flight);
    }
    fn on_ack(&mut self, now: Instant, ack: &Ack) {
        self.inner.on_ack(now, ack);
        self.record(now);
    }
    fn on_loss(&mut self, now: Instant, loss: &Loss) {
        self.inner.on_loss(now, loss);
        self.record(now);
    }
    fn on_rtt_sample(&mut self, now: Instant, rtt: Duration, ack_delay: Duration) {
        self.inner.on_rtt_sample(now, rtt, ack_delay);
    }
    fn on_ecn(&mut self, now: Instant, bytes_marked: u64, bytes_in_flight: u64) {
        self.inner.on_ecn(now, bytes_marked, bytes_in_flight);
    }
    fn on_mtu_update(&mut self, max_datagram_size: u64) {
        self.inner.on_mtu_update(max_datagram_size);
    }
    fn on_spurious_loss(&mut self, now: Instant) {
        self.inner.on_spurious_loss(now);
    }
    fn on_app_limited(&mut self, now: Instant, bytes_in_flight: u64) {
        self.inner.on_app_limited(now, bytes_in_flight);
    }
    fn on_packet_lost(&mut self, now: Instant, lost: &LostPacketSample) {
        self.inner.on_packet_lost(now, lost);
    }
    fn cwnd(&self) -> u64 {
        self.inner.cwnd()
    }
    fn pacing_rate(&self) -> f64 {
        self.inner.pacing_rate()
    }
    fn send_quantum(&self) -> u64 {
        self.inner.send_quantum()
    }
    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }
    fn clone_box(&self) -> Box<dyn CongestionController> {
        Box::new(Observed {
            inner: self.inner.clone(),
            log: self.log.clone(),
        })
    }
}

fn bbr(origin: Instant) -> Box<dyn CongestionController> {
    Box::new(Bbr::new(BbrConfig::with_datagram_size(MSS), origin))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn is_probe_bw(p: Phase) -> bool {
    matches!(
        p,
        Phase::ProbeBwDown | Phase::ProbeBwCruise | Phase::ProbeBwRefill | Phase::ProbeBwUp
    )
}

/// Goodput of flow 0 over `(from, to]`, as a fraction of `target_bps`.
fn utilization(report: &Report, from: f64, to: f64, target_bps: f64) -> f64 {
    report.throughput_between(0, secs(from), secs(to)) / target_bps
}

/// The random-loss runs use AMST's random-loss tolerance extension (off in the draft
/// configuration); `bbr_draft_loss_response_is_the_expected_contrast` compares the two.
fn random_loss_run(loss: f64) -> (Report, f64) {
    random_loss_run_with(
        loss,
        BbrConfig::with_datagram_size(MSS).with_random_loss_tolerance(true),
    )
}

fn random_loss_run_with(loss: f64, config: BbrConfig) -> (Report, f64) {
    let origin = Instant::now();
    let rate = 100e6;
    let link = Link::new(rate, Duration::from_millis(100))
        .with_buffer_bdp(1.0)
        .with_loss(loss);
    let report = Scenario::new(link)
        .seed(42)
        .mss(MSS)
        .duration(secs(20.0))
        .flow(Flow::new("bbr", Box::new(Bbr::new(config, origin))))
        .run(origin);
    let target = (1.0 - loss) * rate;
    (report, target)
}

/// 100 Mbit/s, 100 ms, a 1-BDP buffer and 1% random loss: BBR with random-loss tolerance
/// reaches at least 95% of
/// (1 - loss) x rate within 20 s (measured over the second half of the run, once past
/// Startup).
#[test]
fn bbr_one_percent_random_loss_reaches_95_percent() {
    let (report, target) = random_loss_run(0.01);
    let u = utilization(&report, 10.0, 20.0, target);
    eprintln!(
        "1% loss: utilization {u:.3} over 10-20 s, whole-run goodput {:.1} Mbit/s, phases {}",
        report.flows[0].goodput_bps / 1e6,
        report.flows[0].phase_trace.len()
    );
    assert!(u >= 0.95, "utilization {u:.3} < 0.95");
}

/// The same at 5% random loss: at least 85%.
#[test]
fn bbr_five_percent_random_loss_reaches_85_percent() {
    let (report, target) = random_loss_run(0.05);
    let u = utilization(&report, 10.0, 20.0, target);
    eprintln!(
        "5% loss: utilization {u:.3} over 10-20 s, whole-run goodput {:.1} Mbit/s",
        report.flows[0].goodput_bps / 1e6
    );
    assert!(u >= 0.85, "utilization {u:.3} < 0.85");
}

/// The contrast behind `BbrConfig::random_loss_tolerance`: with the draft's exact loss
/// response (every loss is congestion), the same 1% and 5% random-loss paths are used clearly
/// less, because the short-term model lowers `bw_shortterm` in every round with a loss (at 5%
/// the long-term bound and max_bw spiral down as well: about 0.2 of the link).
#[test]
fn bbr_draft_loss_response_is_the_expected_contrast() {
    let draft = BbrConfig::with_datagram_size(MSS);
    assert!(draft.is_draft());
    for loss in [0.01, 0.05] {
        let (tolerant, target) = random_loss_run(loss);
        let (strict, _) = random_loss_run_with(loss, draft);
        let t = utilization(&tolerant, 10.0, 20.0, target);
        let d = utilization(&strict, 10.0, 20.0, target);
        eprintln!(
            "{}% loss, 10-20 s: draft {d:.3} of (1 - loss) x link ({:.1} Mbit/s), with \
             random-loss tolerance {t:.3} ({:.1} Mbit/s); whole-run goodput {:.1} vs {:.1} Mbit/s",
            loss * 100.0,
            strict.throughput_between(0, secs(10.0), secs(20.0)) / 1e6,
            tolerant.throughput_between(0, secs(10.0), secs(20.0)) / 1e6,
            strict.flows[0].goodput_bps / 1e6,
            tolerant.flows[0].goodput_bps / 1e6,
        );
        assert!(d < t - 0.05, "draft {d:.3} vs tolerant {t:.3}");
        assert!(d > 0.1, "the draft response still moves data: {d:.3}");
    }
}

/// Without random loss the extension changes nothing: on a loss-free path, and on a shallow
/// buffer where every loss is congestion (0.25 BDP, two flows), the two configurations give
/// the same report, bit for bit (loss rounds there always have a queue, so no baseline).
#[test]
fn bbr_random_loss_tolerance_is_inert_without_random_loss() {
    let run = |config: BbrConfig, buffer_bdp: f64, flows: usize| {
        let origin = Instant::now();
        let link = Link::new(50e6, Duration::from_millis(40)).with_buffer_bdp(buffer_bdp);
        let mut scenario = Scenario::new(link).seed(4).mss(MSS).duration(secs(15.0));
        for i in 0..flows {
            scenario = scenario.flow(
                Flow::new(format!("bbr{i}"), Box::new(Bbr::new(config, origin)))
                    .starting_at(secs(i as f64)),
            );
        }
        scenario.run(origin)
    };
    let draft = BbrConfig::with_datagram_size(MSS);
    let tolerant = draft.with_random_loss_tolerance(true);
    assert_eq!(run(draft, 2.0, 1), run(tolerant, 2.0, 1));
    let (d, t) = (run(draft, 0.25, 2), run(tolerant, 0.25, 2));
    let total = |r: &Report| {
        r.throughput_between(0, secs(5.0), secs(15.0))
            + r.throughput_between(1, secs(5.0), secs(15.0))
    };
    let (dt, tt) = (total(&d), total(&t));
    eprintln!(
        "0.25-BDP buffer, two flows, 5-15 s: draft {:.1} Mbit/s (Jain {:.3}, {} drops), \
         tolerant {:.1} Mbit/s (Jain {:.3}, {} drops)",
        dt / 1e6,
        d.jain_index(secs(5.0), secs(15.0)),
        d.link.overflow_drops,
        tt / 1e6,
        t.jain_index(secs(5.0), secs(15.0)),
        t.link.overflow_drops,
    );
    assert!(
        d.link.overflow_drops > 100,
        "the shallow buffer drops packets"
    );
    assert_eq!(d, t, "draft {dt} vs tolerant {tt}");
}

/// A 10-BDP buffer: in ProbeBW, BBR keeps the mean queueing delay at most 25% of the base
/// RTT (CUBIC would fill the buffer: 10 RTTs of delay).
#[test]
fn bbr_deep_buffer_keeps_queue_delay_low_in_probe_bw() {
    let origin = Instant::now();
    let rtt = Duration::from_millis(40);
    let link = Link::new(50e6, rtt).with_buffer_bdp(10.0);
    let report = Scenario::new(link)
        .seed(1)
        .mss(MSS)
        .duration(secs(12.0))
        .flow(Flow::new("bbr", bbr(origin)))
        .run(origin);
    let in_probe_bw: Vec<Duration> = report
        .samples
        .iter()
        .filter(|s| s.at > secs(2.0) && is_probe_bw(s.flows[0].phase))
        .map(|s| s.queue_delay)
        .collect();
    assert!(
        in_probe_bw.len() > 50,
        "{} ProbeBW samples",
        in_probe_bw.len()
    );
    let mean = in_probe_bw.iter().sum::<Duration>() / in_probe_bw.len() as u32;
    let u = utilization(&report, 2.0, 12.0, 50e6);
    eprintln!("10-BDP buffer: mean ProbeBW queue delay {mean:?}, utilization {u:.3}");
    assert!(
        mean <= rtt / 4,
        "mean queueing delay {mean:?} > 25% of {rtt:?}"
    );
    assert!(u >= 0.9, "and still uses the link: {u:.3}");
}

/// Startup exits within 3 rounds of reaching the bottleneck rate.
#[test]
fn bbr_startup_exits_within_three_rounds_of_bottleneck_rate() {
    let origin = Instant::now();
    let rate = 100e6;
    let (ctl, log) = Observed::new(origin);
    let link = Link::new(rate, Duration::from_millis(100)).with_buffer_bdp(1.0);
    let _report = Scenario::new(link)
        .mss(MSS)
        .duration(secs(4.0))
        .flow(Flow::new("bbr", Box::new(ctl)))
        .run(origin);
    let log = log.lock().unwrap();
    let btl = rate / 8.0;
    // "Reaching the bottleneck rate": the first round whose max_bw is within 10% of it.
    let reached = log
        .iter()
        .find(|o| o.max_bw >= 0.9 * btl)
        .expect("max_bw reached the bottleneck rate");
    let exit = log
        .iter()
        .find(|o| o.state != State::Startup)
        .expect("left Startup");
    eprintln!(
        "reached {:.1} Mbit/s at round {}, left Startup at round {} ({:?})",
        reached.max_bw * 8e-6,
        reached.round,
        exit.round,
        exit.at - origin
    );
    assert!(exit.round >= reached.round);
    assert!(
        exit.round - reached.round <= 3,
        "left Startup {} rounds after reaching the bottleneck rate",
        exit.round - reached.round
    );
    let err = (exit.max_bw - btl).abs() / btl;
    assert!(
        err <= 0.02,
        "max_bw within 2% of the link at exit: {err:.3}"
    );
}

/// Two BBR flows (the second starting 2 s later) share the link fairly: Jain's index at
/// least 0.9 over the last 10 s of a 30 s run.
#[test]
fn bbr_two_flows_converge_to_fairness() {
    let origin = Instant::now();
    let link = Link::new(50e6, Duration::from_millis(40)).with_buffer_bdp(2.0);
    let report = Scenario::new(link)
        .seed(3)
        .mss(MSS)
        .duration(secs(30.0))
        .flow(Flow::new("a", bbr(origin)))
        .flow(Flow::new("b", bbr(origin)).starting_at(secs(2.0)))
        .run(origin);
    let jain = report.jain_index(secs(20.0), secs(30.0));
    let a = report.throughput_between(0, secs(20.0), secs(30.0));
    let b = report.throughput_between(1, secs(20.0), secs(30.0));
    eprintln!(
        "two flows: {:.1} and {:.1} Mbit/s, Jain {jain:.3}",
        a / 1e6,
        b / 1e6
    );
    assert!(jain >= 0.9, "Jain's index {jain:.3}");
    assert!((a + b) >= 0.85 * 50e6, "and they fill the link: {}", a + b);
}

/// After a 10x bandwidth drop, BBR's model adapts within 3 ProbeBW cycles: max_bw and the
/// pacing rate come down to the new rate, and the flow keeps using the link.
#[test]
fn bbr_adapts_to_a_tenfold_bandwidth_drop_within_three_cycles() {
    let origin = Instant::now();
    let (ctl, log) = Observed::new(origin);
    let link = Link::new(100e6, Duration::from_millis(40)).with_buffer_bdp(1.0);
    let drop_at = secs(6.0);
    let report = Scenario::new(link)
        .seed(5)
        .mss(MSS)
        .duration(secs(30.0))
        .change_link_at(
            drop_at,
            LinkChange {
                rate_bps: Some(10e6),
                ..LinkChange::default()
            },
        )
        .flow(Flow::new("bbr", Box::new(ctl)))
        .run(origin);
    let log = log.lock().unwrap();
    let new_btl = 10e6 / 8.0;
    let at_drop = log
        .iter()
        .rfind(|o| o.at - origin <= drop_at)
        .expect("state at the drop");
    assert!(
        at_drop.max_bw > 5.0 * new_btl,
        "before the drop it knew the old rate"
    );
    let adapted = log
        .iter()
        .filter(|o| o.at - origin > drop_at)
        .find(|o| o.max_bw <= 1.25 * new_btl)
        .expect("max_bw adapted to the new rate");
    let cycles = adapted.cycle - at_drop.cycle;
    eprintln!(
        "10x drop at {drop_at:?}: max_bw {:.1} Mbit/s after {cycles} cycles ({:?} later)",
        adapted.max_bw * 8e-6,
        adapted.at - origin - drop_at
    );
    assert!(cycles <= 3, "took {cycles} ProbeBW cycles");
    // From then on the model stays near the new rate and the link stays busy.
    let later: Vec<&Obs> = log.iter().filter(|o| o.at >= adapted.at).collect();
    assert!(
        later.iter().all(|o| o.bw <= 1.5 * new_btl),
        "bw stays near the new rate"
    );
    let t_adapted = (adapted.at - origin).as_secs_f64();
    let u = utilization(&report, t_adapted + 1.0, 30.0, 10e6);
    assert!(u >= 0.85, "utilization after adapting {u:.3}");
}

/// The state-transition trace of one scenario, pinned by an insta snapshot: 20 Mbit/s, 40 ms,
/// 2-BDP buffer, no random loss, 12 s (Startup, Drain, ProbeBW cycles and two ProbeRTTs).
#[test]
fn bbr_state_trace_snapshot() {
    let origin = Instant::now();
    let link = Link::new(20e6, Duration::from_millis(40)).with_buffer_bdp(2.0);
    let report = Scenario::new(link)
        .seed(9)
        .mss(MSS)
        .duration(secs(12.0))
        .flow(Flow::new("bbr", bbr(origin)))
        .run(origin);
    let trace = report.flows[0].phase_trace_text();
    let phases: Vec<Phase> = report.flows[0]
        .phase_trace
        .iter()
        .map(|c| c.phase)
        .collect();
    assert_eq!(phases[0], Phase::Startup);
    assert!(phases.contains(&Phase::ProbeRtt));
    insta::assert_snapshot!("bbr_state_trace_20mbit_40ms_2bdp", trace);
}
