//! The async half: sampling, the probe budget and the loop, on tokio's paused clock.
//!
//! `ScriptedLink` below is a test double, not a network transport: it reports the RTT and
//! rate the test sets, and answers `probe` from them. It exists to test the detector's
//! loop logic (when it probes, how much, what it publishes); the measurement itself is
//! exercised through amst-linkem in `tests/linkem.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amst_core::{
    BoxFuture, InMemoryTransport, Mode, PathSample, Result, Transport, TransportKind,
    TransportMetrics,
};
use amst_detect::{
    Detector, DetectorConfig, GBIT_PER_SEC, MaybePath, RateProbeConfig, Reason, SampleSource,
};
use bytes::Bytes;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
struct LinkState {
    rtt: Duration,
    /// Link rate, bytes per second.
    rate: u64,
    /// Application traffic, bytes per second (0 = idle).
    app_rate: u64,
    /// Whether `metrics()` carries a delivery-rate estimate while busy.
    reports_delivery_rate: bool,
    /// Trains shorter than the bandwidth-delay product measure only `burst / rtt`, as a
    /// real TCP train does when its window, not the bottleneck, limits it.
    trains_window_limited: bool,
    /// The next this many pings (probes without a burst) answer `spike` late, as pings do
    /// when a loaded CPU schedules either end or the emulator late.
    slow_pings: u32,
    spike: Duration,
}

#[derive(Debug)]
struct ScriptedLink {
    state: Mutex<LinkState>,
    /// Application bytes so far, integrated over tokio time.
    app_bytes: Mutex<(f64, Instant)>,
    probes: Mutex<Vec<(u64, u64)>>,
    probe_bytes: AtomicU64,
}

const PROBE_OVERHEAD: u64 = 96;

impl ScriptedLink {
    fn new(rtt: Duration, rate: u64) -> Arc<Self> {
        Arc::new(ScriptedLink {
            state: Mutex::new(LinkState {
                rtt,
                rate,
                app_rate: 0,
                reports_delivery_rate: true,
                trains_window_limited: false,
                slow_pings: 0,
                spike: Duration::ZERO,
            }),
            app_bytes: Mutex::new((0.0, Instant::now())),
            probes: Mutex::new(Vec::new()),
            probe_bytes: AtomicU64::new(0),
        })
    }

    fn app_bytes(&self) -> u64 {
        let mut a = self.app_bytes.lock().unwrap();
        let now = Instant::now();
        let rate = self.state.lock().unwrap().app_rate;
        a.0 += rate as f64 * (now - a.1).as_secs_f64();
        a.1 = now;
        a.0 as u64
    }

    fn set(&self, f: impl FnOnce(&mut LinkState)) {
        self.app_bytes(); // integrate up to now at the old rate
        f(&mut self.state.lock().unwrap());
    }

    /// Every probe call as (burst, bytes used).
    fn probes(&self) -> Vec<(u64, u64)> {
        self.probes.lock().unwrap().clone()
    }

    /// The probes that carried a burst (packet trains).
    fn trains(&self) -> Vec<(u64, u64)> {
        self.probes().into_iter().filter(|p| p.0 > 0).collect()
    }
}

impl Transport for ScriptedLink {
    fn send(&self, _: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>>> {
        Box::pin(async { Ok(None) })
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Sends nothing, so nothing is ever acknowledged: a watch that has ended at 0.
    fn acked(&self) -> amst_core::AckWatch {
        amst_core::AckCounter::new().watch()
    }

    fn metrics(&self) -> TransportMetrics {
        let s = *self.state.lock().unwrap();
        let mut m = TransportMetrics::new(TransportKind::Tcp);
        // Probe padding is counted too, as a real transport might: the detector must not
        // mistake its own probe for application traffic.
        m.bytes_sent = self.app_bytes() + self.probe_bytes.load(Ordering::Relaxed);
        m.rtt = Some(s.rtt);
        m.min_rtt = Some(s.rtt);
        if s.app_rate > 0 && s.reports_delivery_rate {
            m.delivery_rate = Some(s.app_rate.min(s.rate));
        }
        m
    }

    fn probe(&self, burst_bytes: u64) -> BoxFuture<'_, Result<PathSample>> {
        Box::pin(async move {
            let mut s = *self.state.lock().unwrap();
            if burst_bytes == 0 && s.slow_pings > 0 {
                self.state.lock().unwrap().slow_pings -= 1;
                s.rtt += s.spike;
            }
            let busy_for = Duration::from_secs_f64(burst_bytes as f64 / s.rate as f64);
            tokio::time::sleep(s.rtt + busy_for).await;
            let used = burst_bytes + PROBE_OVERHEAD;
            self.probes.lock().unwrap().push((burst_bytes, used));
            self.probe_bytes.fetch_add(used, Ordering::Relaxed);
            let measured = if s.trains_window_limited {
                s.rate
                    .min((burst_bytes as f64 / s.rtt.as_secs_f64()) as u64)
            } else {
                s.rate
            };
            Ok(PathSample {
                rtt: s.rtt,
                delivery_rate: (burst_bytes > 0).then_some(measured),
                bytes_used: used,
            })
        })
    }
}

/// The periodic-train behaviour alone: no start-of-path rate measurement and no short
/// start-up periods (both tested below).
fn config(period: Duration) -> DetectorConfig {
    let mut c = DetectorConfig {
        period,
        startup_samples: 0,
        ..Default::default()
    };
    c.probe.rate = None;
    c
}

#[tokio::test(start_paused = true)]
async fn an_idle_datacenter_link_is_classified_by_probes() {
    let link = ScriptedLink::new(Duration::from_micros(100), 10 * GBIT_PER_SEC);
    let mut det = Detector::new(config(Duration::from_secs(5)), link.clone()).unwrap();
    let d1 = det.step().await;
    assert_eq!(d1.reason, Reason::Warmup, "{d1}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let d2 = det.step().await;
    assert_eq!(d2.mode, Mode::Datacenter, "{d2}");
    assert_eq!(d2.source, Some(SampleSource::Probe));
    assert_eq!(link.probes().len(), 4, "a ping and a train per period");
    assert_eq!(link.trains().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn probe_traffic_stays_within_one_percent_of_the_measured_rate() {
    // (rtt, rate, period): the cap of 4 MiB applies at 10 Gbit/s and 5 s.
    let cases = [
        (
            Duration::from_micros(100),
            10 * GBIT_PER_SEC,
            Duration::from_secs(5),
        ),
        (
            Duration::from_micros(500),
            GBIT_PER_SEC,
            Duration::from_secs(5),
        ),
        (
            Duration::from_millis(80),
            GBIT_PER_SEC / 5,
            Duration::from_secs(5),
        ),
        (
            Duration::from_millis(80),
            GBIT_PER_SEC / 5,
            Duration::from_millis(100),
        ),
        (
            Duration::from_millis(30),
            GBIT_PER_SEC / 100,
            Duration::from_secs(1),
        ),
        (
            Duration::from_millis(30),
            GBIT_PER_SEC / 1000,
            Duration::from_secs(1),
        ),
    ];
    for (rtt, rate, period) in cases {
        let link = ScriptedLink::new(rtt, rate);
        let mut det = Detector::new(config(period), link.clone()).unwrap();
        let one_percent = (0.01 * rate as f64 * period.as_secs_f64()) as u64;
        let ctx = format!("{rtt:?} {rate} B/s every {period:?}");
        let mut per_period = Vec::new();
        for _ in 0..40 {
            det.step().await;
            per_period.push(det.stats().last_period_bytes);
            tokio::time::sleep(period).await;
        }
        let trains = link.trains();
        // The first train runs before any rate is known: the bootstrap burst.
        assert_eq!(trains[0].0, 16 * 1024, "{ctx}: {trains:?}");
        for &used in &per_period[1..] {
            // The RTT ping alone is always allowed.
            assert!(
                used <= one_percent.max(PROBE_OVERHEAD),
                "{used} > {one_percent}: {ctx}"
            );
        }
        // Overhead per period: the ping and the train's own framing.
        let overhead = 2 * PROBE_OVERHEAD;
        let expected_train = if one_percent > (4 << 20) + overhead {
            Some(4 << 20) // capped at max_burst
        } else if one_percent < 4096 + overhead {
            None // below min_burst: the ping only
        } else {
            Some(one_percent - overhead)
        };
        match expected_train {
            Some(b) => {
                assert_eq!(trains.len(), 40, "{ctx}");
                assert_eq!(trains.last().unwrap().0, b, "{ctx}");
            }
            None => assert_eq!(trains.len(), 1, "{ctx}: only the bootstrap"),
        }
        assert_eq!(
            link.probes().len(),
            40 + trains.len(),
            "one ping per period: {ctx}"
        );
        let total: u64 = link.probes().iter().map(|p| p.1).sum();
        assert_eq!(det.stats().bytes_total, total);
        let last = *per_period.last().unwrap();
        println!(
            "probe overhead, default config except period: rtt {rtt:?}, link {} Mbit/s, period {period:?}: {last} bytes/period ({:.3} % of the link)",
            rate * 8 / 1_000_000,
            100.0 * last as f64 / (rate as f64 * period.as_secs_f64()),
        );
    }
}

#[tokio::test(start_paused = true)]
async fn window_limited_trains_do_not_shrink_the_budget() {
    // 80 ms, 200 Mbit/s, the default 5 s period: a train of B bytes measures B / 80 ms, and
    // 1 % of that × 5 s is 0.625 B. Sized by its own last measurement the budget would
    // shrink each period until only pings were left; sized by the best lower bound seen,
    // it holds.
    let link = ScriptedLink::new(Duration::from_millis(80), GBIT_PER_SEC / 5);
    link.set(|s| s.trains_window_limited = true);
    let mut det = Detector::new(config(Duration::from_secs(5)), link.clone()).unwrap();
    for _ in 0..30 {
        det.step().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let trains = link.trains();
    assert_eq!(trains.len(), 30, "{trains:?}");
    assert_eq!(trains[0].0, 16 * 1024);
    // The bootstrap train's 16 KiB / 80 ms = 204.8 kB/s; 1 % of it over 5 s.
    let budget = (0.01 * (16384.0 / 0.08_f64) * 5.0) as u64;
    assert_eq!(det.probe_budget(), budget);
    assert!(trains[1..].iter().all(|t| t.0 == trains[1].0), "{trains:?}");
    assert_eq!(trains[1].0, budget - 2 * PROBE_OVERHEAD);
    assert_eq!(det.mode(), Mode::Internet);
}

#[tokio::test(start_paused = true)]
async fn a_busy_link_is_measured_passively_without_probes() {
    let link = ScriptedLink::new(Duration::from_millis(80), GBIT_PER_SEC / 5);
    link.set(|s| s.app_rate = GBIT_PER_SEC / 5);
    let mut det = Detector::new(config(Duration::from_secs(1)), link.clone()).unwrap();
    // No baseline yet: a ping, which overlapped the application's traffic, so neither its
    // RTT nor a train counts.
    det.step().await;
    assert_eq!(link.probes().len(), 1);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let d = det.step().await;
        assert_eq!(d.source, Some(SampleSource::Passive), "{d}");
    }
    assert_eq!(link.probes().len(), 1, "no probe while data flows");
    assert_eq!(det.mode(), Mode::Internet);
    let d = det.step().await;
    assert_eq!(d.bandwidth, Some(GBIT_PER_SEC / 5), "{d}");
}

#[tokio::test(start_paused = true)]
async fn an_application_limited_flow_does_not_make_a_fast_path_internet() {
    // 10 Gbit/s, 0.2 ms, an application sending only 400 Mbit/s, and a transport without a
    // delivery-rate estimate: the counters give a lower bound, which proves nothing.
    let link = ScriptedLink::new(Duration::from_micros(200), 10 * GBIT_PER_SEC);
    link.set(|s| {
        s.app_rate = GBIT_PER_SEC * 4 / 10;
        s.reports_delivery_rate = false;
    });
    let mut det = Detector::new(config(Duration::from_secs(1)), link.clone()).unwrap();
    for _ in 0..12 {
        det.step().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let d = det.step().await;
    assert_eq!(d.mode, Mode::Datacenter, "{d}");
    assert_eq!(d.source, Some(SampleSource::Passive));
    // The bootstrap probe has left the window; the passive samples gave no bandwidth, so
    // this is an RTT-only datacenter at the RTT-only weight.
    assert!(d.rtt_only(), "{d}");
    assert!((d.confidence - 0.75).abs() < 1e-9, "{d}");
    // Once the application moves 3 Gbit/s, the lower bound is evidence.
    link.set(|s| s.app_rate = 3 * GBIT_PER_SEC);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        det.step().await;
    }
    let d = det.step().await;
    assert!(
        d.bandwidth.unwrap() >= 3 * GBIT_PER_SEC - GBIT_PER_SEC / 100,
        "{d}"
    );
    assert_eq!(d.confidence, 1.0, "{d}");
}

#[tokio::test(start_paused = true)]
async fn the_loop_follows_a_step_within_two_periods_and_publishes_it() {
    let period = Duration::from_secs(1);
    let link = ScriptedLink::new(Duration::from_micros(100), 10 * GBIT_PER_SEC);
    let handle = Detector::new(config(period), link.clone()).unwrap().spawn();
    let mut modes = handle.subscribe();
    modes.wait_for(|m| *m == Mode::Datacenter).await.unwrap();
    // Flip at a point that is not aligned with the ticks.
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    let flipped = Instant::now();
    link.set(|s| {
        s.rtt = Duration::from_millis(80);
        s.rate = GBIT_PER_SEC / 5;
    });
    modes.wait_for(|m| *m == Mode::Internet).await.unwrap();
    let took = flipped.elapsed();
    // Two ticks after the flip, plus the second probe's own duration (RTT + burst).
    assert!(
        took <= 2 * period + Duration::from_millis(200),
        "took {took:?}"
    );
    let report = handle.reports().borrow().clone().unwrap();
    assert_eq!(report.decision.mode, Mode::Internet);
    assert_eq!(
        report.decision.reason,
        Reason::ChangePoint,
        "{}",
        report.decision
    );
    assert!(report.probe.probes >= 5);
    assert!(handle.shutdown().await.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_busy_link_that_flips_is_followed_between_periods() {
    // The seed's 5 s period, a transfer running: the loop's peeks at the transport's own
    // counters (every 200 ms, no probe) see the RTT past 75 ms and step at once, then
    // confirm a start-up period later, instead of waiting for the next 5 s tick.
    let period = Duration::from_secs(5);
    let link = ScriptedLink::new(Duration::from_micros(100), 10 * GBIT_PER_SEC);
    link.set(|s| s.app_rate = 10 * GBIT_PER_SEC);
    let handle = Detector::new(config(period), link.clone()).unwrap().spawn();
    let mut modes = handle.subscribe();
    modes.wait_for(|m| *m == Mode::Datacenter).await.unwrap();
    // A steady busy link: no step between the ticks (the peeks stay quiet).
    let steps =
        |h: &amst_detect::DetectorHandle| h.reports().borrow().as_ref().unwrap().decision.at;
    let last = steps(&handle);
    tokio::time::sleep(Duration::from_millis(4_100)).await;
    assert_eq!(
        steps(&handle),
        last,
        "stepped between ticks on a steady link"
    );
    let flipped = Instant::now();
    link.set(|s| {
        s.rtt = Duration::from_millis(80);
        s.rate = GBIT_PER_SEC / 5;
        s.app_rate = GBIT_PER_SEC / 5;
    });
    modes.wait_for(|m| *m == Mode::Internet).await.unwrap();
    let took = flipped.elapsed();
    println!("internet {took:?} after the flip");
    // A peek (≤ 200 ms), then the confirmation a start-up period (200 ms) later.
    assert!(took <= Duration::from_millis(450), "took {took:?}");
    let d = handle.last_decision().unwrap();
    assert_eq!(d.reason, Reason::ChangePoint, "{d}");
    assert_eq!(d.source, Some(SampleSource::Passive), "{d}");
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn force_mode_through_the_handle_and_back() {
    let link = ScriptedLink::new(Duration::from_micros(100), 10 * GBIT_PER_SEC);
    let handle = Detector::new(config(Duration::from_secs(1)), link.clone())
        .unwrap()
        .spawn();
    let mut modes = handle.subscribe();
    modes.wait_for(|m| *m == Mode::Datacenter).await.unwrap();
    let d = handle.force_mode(Mode::Internet).await.unwrap();
    assert_eq!((d.mode, d.reason), (Mode::Internet, Reason::Forced));
    assert_eq!(
        handle.mode(),
        Mode::Internet,
        "published before force_mode returned"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        handle.mode(),
        Mode::Internet,
        "the loop keeps the forced mode"
    );
    let last = handle.last_decision().unwrap();
    assert_eq!(
        (last.reason, last.candidate),
        (Reason::Forced, Mode::Datacenter)
    );
    let d = handle.clear_force().await.unwrap();
    assert_eq!(
        (d.mode, d.reason),
        (Mode::Datacenter, Reason::Switched),
        "{d}"
    );
    assert_eq!(handle.mode(), Mode::Datacenter);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_stops_the_loop() {
    let link = ScriptedLink::new(Duration::from_micros(100), 10 * GBIT_PER_SEC);
    let handle = Detector::new(config(Duration::from_millis(100)), link.clone())
        .unwrap()
        .spawn();
    // Between ticks (every 100 ms), when the loop is not inside a probe.
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    assert_eq!(Arc::strong_count(&link), 2, "the loop holds the transport");
    let modes = handle.subscribe();
    drop(handle);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        Arc::strong_count(&link),
        1,
        "the loop ended and released it"
    );
    let probes = link.probes().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(link.probes().len(), probes);
    assert!(modes.has_changed().is_err(), "the mode channel is closed");
}

#[tokio::test(start_paused = true)]
async fn a_swapped_transport_is_followed() {
    // Stands in for amst-hybrid's ArcSwap of the active transport.
    let dc: Arc<dyn Transport> = ScriptedLink::new(Duration::from_micros(100), 10 * GBIT_PER_SEC);
    let wan = ScriptedLink::new(Duration::from_millis(80), GBIT_PER_SEC / 5);
    let active = Arc::new(Mutex::new(Some(dc)));
    let source = {
        let active = active.clone();
        MaybePath(move || active.lock().unwrap().clone())
    };
    let mut det = Detector::with_source(config(Duration::from_secs(1)), source).unwrap();
    for _ in 0..3 {
        det.step().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(det.mode(), Mode::Datacenter);
    *active.lock().unwrap() = None;
    let d = det.step().await;
    assert_eq!(
        d.mode,
        Mode::Datacenter,
        "no transport: the period is skipped"
    );
    *active.lock().unwrap() = Some(wan.clone());
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        det.step().await;
    }
    assert_eq!(det.mode(), Mode::Internet);
    // The RTT moved ×800: the stale 10 Gbit/s must not size a train on the new path. (80 ms
    // is firmly internet, so the pings are not confirmed by a second: one per period.)
    assert_eq!(wan.probes().len(), 2, "{:?}", wan.probes());
    assert!(wan.trains().is_empty(), "{:?}", wan.probes());
}

#[tokio::test(start_paused = true)]
async fn a_transport_without_probe_is_measured_passively_only() {
    // amst-core's in-memory pair has neither RTT nor probe: the detector must cope, asking
    // for a probe only once.
    let (a, b) = InMemoryTransport::pair(64);
    let a: Arc<dyn Transport> = Arc::new(a);
    let mut det = Detector::new(config(Duration::from_secs(1)), a.clone()).unwrap();
    for _ in 0..3 {
        a.send(Bytes::from(vec![0u8; 100_000])).await.unwrap();
        b.recv().await.unwrap().unwrap();
        let d = det.step().await;
        assert_eq!(d.mode, Mode::Hybrid, "no RTT, so nothing to classify: {d}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(det.stats().failures, 0);
    assert_eq!(det.stats().probes, 0);
}

fn with_rate_measurement(period: Duration) -> DetectorConfig {
    DetectorConfig {
        period,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_idle_period_measures_the_rate_once_per_path() {
    // 20 ms at 200 Mbit/s, with trains that measure only burst / RTT until they exceed the
    // bandwidth-delay product (500 kB), as a TCP train held back by its window does.
    let rate = GBIT_PER_SEC / 5;
    let link = ScriptedLink::new(Duration::from_millis(20), rate);
    link.set(|s| s.trains_window_limited = true);
    // Trains count from 12 round trips (240 ms) on: a first counted train and a confirming
    // one twice its size take about a second here, so the period (which caps the
    // measurement) is 2 s; the default is 5 s.
    let period = Duration::from_secs(2);
    let mut det = Detector::new(with_rate_measurement(period), link.clone()).unwrap();
    let d1 = det.step().await;
    let e = det.stats().last_rate.expect("a rate measurement ran");
    println!("{e:?}");
    let bw = e.bandwidth.unwrap();
    assert!(!bw.lower_bound, "{e:?}");
    assert_eq!(bw.bytes_per_sec, rate, "{e:?}");
    assert!(e.bytes <= RateProbeConfig::default().max_bytes);
    assert_eq!(d1.bandwidth, Some(rate), "{d1}");
    // A measured slow rate is evidence: internet at full confidence on a 20 ms path that
    // RTT alone would call hybrid.
    tokio::time::sleep(period).await;
    let d2 = det.step().await;
    assert_eq!(d2.mode, Mode::Internet, "{d2}");
    assert_eq!(d2.confidence, 1.0, "{d2}");
    for _ in 0..5 {
        tokio::time::sleep(period).await;
        let d = det.step().await;
        assert_eq!(d.bandwidth, Some(rate), "remembered for the path: {d}");
        let one_percent = (0.01 * rate as f64 * det.current_period().as_secs_f64()) as u64;
        assert!(
            det.stats().last_period_bytes <= one_percent,
            "{:?}",
            det.stats()
        );
    }
    assert_eq!(det.stats().rate_measurements, 1, "once per path");
}

#[tokio::test(start_paused = true)]
async fn one_late_ping_is_not_a_path_change() {
    // 0.1 ms at 10 Gbit/s; one ping answers 4 ms late (what a loaded CPU did to pings on
    // amst-linkem's 0.1 ms link). It must neither count as a 4 ms RTT nor drop the measured
    // rate and re-run the measurement; a rise that a second ping confirms still does.
    let link = ScriptedLink::new(Duration::from_micros(100), 10 * GBIT_PER_SEC);
    let period = Duration::from_millis(200);
    let mut det = Detector::new(with_rate_measurement(period), link.clone()).unwrap();
    for _ in 0..3 {
        det.step().await;
        tokio::time::sleep(period).await;
    }
    assert_eq!(det.mode(), Mode::Datacenter);
    assert_eq!(det.stats().rate_measurements, 1);
    link.set(|s| {
        s.slow_pings = 1;
        s.spike = Duration::from_millis(4);
    });
    let d = det.step().await;
    assert_eq!(det.stats().rate_measurements, 1, "no re-measurement: {d}");
    assert_eq!(d.bandwidth, Some(10 * GBIT_PER_SEC), "rate kept: {d}");
    assert!(d.rtt.unwrap() < Duration::from_millis(1), "{d}");
    // (Taken as a path change, it would have dropped the rate, and the next idle period
    // would measure it again.)
    tokio::time::sleep(period).await;
    det.step().await;
    assert_eq!(det.stats().rate_measurements, 1, "{:?}", det.stats());
    // A real rise (both pings late) is a path change: no train sized by the old rate, and
    // the path's RTT moves the estimate.
    link.set(|s| s.rtt = Duration::from_millis(4));
    let before = link.probes().len();
    for _ in 0..8 {
        tokio::time::sleep(period).await;
        det.step().await;
    }
    let after = &link.probes()[before..];
    assert_eq!(
        &after[..2],
        &[(0, 96), (0, 96)],
        "two pings, no train: {after:?}"
    );
    let (rtt, _) = det.classifier().estimate();
    assert!(rtt.unwrap() >= Duration::from_millis(2), "{rtt:?}");
}

#[tokio::test(start_paused = true)]
async fn a_new_session_is_classified_within_a_second() {
    // The default 5 s period: the start-up periods (200 ms) decide long before the first
    // full period ends.
    let link = ScriptedLink::new(Duration::from_micros(100), 10 * GBIT_PER_SEC);
    let start = Instant::now();
    let handle = Detector::new(with_rate_measurement(Duration::from_secs(5)), link.clone())
        .unwrap()
        .spawn();
    let mut modes = handle.subscribe();
    modes.wait_for(|m| *m == Mode::Datacenter).await.unwrap();
    let took = start.elapsed();
    println!("datacenter after {took:?}");
    assert!(took <= Duration::from_secs(1), "took {took:?}");
    let d = handle.last_decision().unwrap();
    assert!(!d.rtt_only(), "{d}");
    handle.shutdown().await;
}
