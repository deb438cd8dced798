//! The measuring half: one [`Detector::step`] per period reads the live transport's metrics
//! (passive) or, on an idle link, runs its budgeted active probe, and feeds the result to
//! the [`Classifier`].

use std::sync::Arc;
use std::time::Instant;

use amst_core::{Error, Mode, Result, Transport, TransportMetrics};

use crate::classifier::{Classifier, Decision};
use crate::config::DetectorConfig;
use crate::rate::{RateEstimate, measure_rate_until};
use crate::sample::{Bandwidth, Observation, SampleSource};
use crate::source::{PathSource, transport_id};

/// What the active probe has cost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Probes that answered.
    pub probes: u64,
    /// Probes that failed or timed out.
    pub failures: u64,
    /// Bytes all probes put on the wire, both directions.
    pub bytes_total: u64,
    /// Bytes the probe used in the latest period (0 if none ran).
    pub last_period_bytes: u64,
    /// The byte budget of the latest period in which a probe ran.
    pub last_budget: u64,
    /// The burst size requested in the latest probe.
    pub last_burst: u64,
    /// Rate measurements run (see [`ProbeConfig::rate`](crate::ProbeConfig::rate)).
    pub rate_measurements: u64,
    /// The latest rate measurement.
    pub last_rate: Option<RateEstimate>,
}

/// RTT differences below this never count as a path change for the probe budget.
const RTT_JITTER_FLOOR: std::time::Duration = std::time::Duration::from_millis(1);

/// Byte counter at the end of the previous period, per transport object.
#[derive(Clone, Copy, Debug)]
struct Baseline {
    transport: usize,
    bytes: u64,
    at: Instant,
}

/// Samples a live session once per [`step`](Self::step) and classifies it.
///
/// - **Busy** (the transport moved at least `busy_bytes` in the period): passive. The RTT
///   is the transport's smoothed RTT. The bandwidth is its delivery-rate estimate, trusted
///   as a measurement only if the application moved at least half that rate (otherwise the
///   flow was application-limited and the rate is a lower bound); without an estimate, the
///   bytes moved per second, as a lower bound.
/// - **Idle**: active. An RTT ping ([`Transport::probe`] with no burst), then a packet train
///   within the budget ([`probe_budget`](Self::probe_budget): 1 % of the rate × period,
///   at most 4 MiB). A train's rate is a lower bound: it proves a fast path, never a slow
///   one. If the ping shows the RTT moved by the change-point margin (×1.5, and ≥ 1 ms),
///   the train is skipped and the remembered rates are dropped, so that a stale fast rate
///   never sizes a train on a slow new path.
///
/// A transport that answers `probe` with [`Error::Unavailable`] is measured passively only.
pub struct Detector {
    config: DetectorConfig,
    classifier: Classifier,
    source: Box<dyn PathSource>,
    baseline: Option<Baseline>,
    stats: ProbeStats,
    /// The highest rate seen on this path: probe trains' rates are lower bounds, so their
    /// maximum is the best lower bound, and 1 % of it is at most 1 % of the real rate. A
    /// measured passive rate replaces it; a path change (RTT moved, transport swapped)
    /// clears it. A sliding window would not do: trains sized by a low
    /// estimate measure a low rate, and the budget would spiral down.
    rate_floor: Option<u64>,
    /// Bytes a period's probing uses beyond its burst (the RTT ping, pongs, framing),
    /// learnt from answers.
    probe_overhead: u64,
    /// The transport that answered `probe` with `Unavailable`; not asked again.
    probe_unsupported: Option<usize>,
    /// The rate measured on the current path by a converged rate measurement: evidence in
    /// every idle period until the path changes. Cleared with `rate_floor`.
    path_rate: Option<u64>,
    /// The transport on which a rate measurement ran (converged or not) since the last
    /// path change; none runs again until the path changes.
    rate_measured_on: Option<usize>,
    /// Steps taken, for the start-up periods.
    steps: u64,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("mode", &self.classifier.mode())
            .field("period", &self.config.period)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Detector {
    /// A detector measuring one fixed transport.
    pub fn new(config: DetectorConfig, transport: Arc<dyn Transport>) -> Result<Self> {
        Self::with_source(config, move || transport.clone())
    }

    /// A detector measuring whatever transport `source` returns at each period, e.g. the
    /// hybrid manager's active one.
    pub fn with_source(config: DetectorConfig, source: impl PathSource) -> Result<Self> {
        config.validate()?;
        Ok(Detector {
            classifier: Classifier::new(config.classifier.clone())?,
            config,
            source: Box::new(source),
            baseline: None,
            stats: ProbeStats::default(),
            rate_floor: None,
            probe_overhead: 256,
            probe_unsupported: None,
            path_rate: None,
            rate_measured_on: None,
            steps: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// The classifier, for its estimates.
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// The mode in effect.
    pub fn mode(&self) -> Mode {
        self.classifier.mode()
    }

    /// The period until the next step: [`startup_period`](DetectorConfig::startup_period)
    /// for the first [`startup_samples`](DetectorConfig::startup_samples) steps, then
    /// [`period`](DetectorConfig::period). [`spawn`](Self::spawn)'s loop follows it; the
    /// probe budget is sized by it.
    ///
    /// After an observation that lies firmly in another mode, the next period is also the
    /// start-up period: the change point needs one more such observation, and waiting a
    /// full period for it would add most of a period to every switch (a link that flipped
    /// under a transfer was followed 2–2.5 s later with 500 ms periods, the design asks
    /// for well under 2 s). A steady link never takes the short period after start-up.
    pub fn current_period(&self) -> std::time::Duration {
        if self.classifier.change_pending() {
            self.config.startup_period.min(self.config.period)
        } else {
            self.budget_period()
        }
    }

    /// The period the probe budget is sized by: the start-up or the regular one. A short
    /// confirmation period after a firm change keeps the regular budget; it happens once
    /// per change, so the probe stays at 1 % over time.
    fn budget_period(&self) -> std::time::Duration {
        if self.steps < self.config.startup_samples as u64 {
            self.config.startup_period.min(self.config.period)
        } else {
            self.config.period
        }
    }

    /// What the probe has cost so far.
    pub fn stats(&self) -> ProbeStats {
        self.stats
    }

    /// Pins the mode (see [`Classifier::force_mode`]) and returns the resulting decision.
    pub fn force_mode(&mut self, mode: Mode) -> Decision {
        self.classifier.force_mode(mode);
        self.classifier.decide(now())
    }

    /// Returns to automatic classification and returns the resulting decision.
    pub fn clear_force(&mut self) -> Decision {
        self.classifier.clear_force();
        self.classifier.decide(now())
    }

    /// The probe's byte budget for the next period: `max_fraction` of the reference rate ×
    /// period, never more than `max_burst` plus the probe's own overhead. The reference is
    /// the highest rate seen on this path (trains, passive samples, the classifier's
    /// estimate); before any is known it is the bootstrap burst (16 KiB).
    ///
    /// Train rates are lower bounds of the path's rate (a short train is held back by
    /// TCP's window, the sender, its own length; it cannot beat the bottleneck), so this is
    /// at most `max_fraction` of the real rate while the path stays the same. A path change
    /// that shows in the RTT clears the reference (see [`step`](Self::step)); a pure drop
    /// in rate on an idle link cannot be seen by lower bounds, and until traffic measures
    /// it, trains stay sized by the old rate (at most `max_burst`).
    pub fn probe_budget(&self) -> u64 {
        let p = &self.config.probe;
        let rate = self.rate_floor.max(self.classifier.estimate().1);
        match rate {
            None => p.bootstrap_burst.min(p.max_burst) + self.probe_overhead,
            Some(r) => {
                let allowed = p.max_fraction * r as f64 * self.budget_period().as_secs_f64();
                (allowed as u64).min(p.max_burst + self.probe_overhead)
            }
        }
    }

    /// Whether the transport's own counters show, between periods, what a step would take
    /// as a firm sample of internet: data moved since the last step (at least `busy_bytes`)
    /// and its smoothed RTT is past the change-point margin (75 ms by default), which a
    /// step takes as the path's RTT. Reads only the transport's metrics: no probe, no
    /// bytes on the wire. [`spawn`](Self::spawn)'s loop peeks every start-up period and
    /// steps at once when this is true, so that a link that flips under a transfer is
    /// noticed within a start-up period (200 ms) rather than at the next tick (up to a
    /// whole period, 5 s by default). A steady link never peeks true (a firm sample of
    /// another mode is what a change point is made of), so the no-flap rules still decide:
    /// the change point needs `step_samples` firm samples in a row.
    pub fn peek(&self) -> bool {
        if self.classifier.forced().is_some() || self.classifier.mode() == Mode::Internet {
            return false;
        }
        let (Some(transport), Some(b)) = (self.source.current(), self.baseline) else {
            return false;
        };
        if b.transport != transport_id(&transport) {
            return false;
        }
        let m = transport.metrics();
        let c = &self.config.classifier;
        let firmly_long = c.thresholds.internet_min_rtt.mul_f64(c.step_margin);
        moved(&m).saturating_sub(b.bytes) >= self.config.busy_bytes
            && m.rtt.is_some_and(|r| r > firmly_long)
    }

    /// Takes one sample of the current transport and decides. Call once per period.
    pub async fn step(&mut self) -> Decision {
        self.stats.last_period_bytes = 0;
        if let Some(obs) = self.sample().await {
            self.classifier.observe(now(), obs);
        }
        self.steps += 1;
        self.classifier.decide(now())
    }

    async fn sample(&mut self) -> Option<Observation> {
        let Some(transport) = self.source.current() else {
            self.baseline = None;
            return None;
        };
        let metrics = transport.metrics();
        let at = now();
        let id = transport_id(&transport);
        let total = moved(&metrics);
        let delta = match self.baseline {
            Some(b) if b.transport == id && at > b.at => {
                let bytes = total.saturating_sub(b.bytes);
                Some((bytes, bytes as f64 / (at - b.at).as_secs_f64()))
            }
            Some(b) if b.transport != id => {
                tracing::debug!(target: "amst_detect", "transport swapped; counters re-baselined");
                self.forget_rates();
                None
            }
            _ => None,
        };
        self.baseline = Some(Baseline {
            transport: id,
            bytes: total,
            at,
        });
        let fresh = delta.is_some_and(|(bytes, _)| bytes > 0);
        let busy = delta.is_some_and(|(bytes, _)| bytes >= self.config.busy_bytes);
        // Only a period in which data moved has fresh estimates (see `busy_rtt`).
        let passive_rtt = if fresh { self.busy_rtt(&metrics) } else { None };
        if busy && passive_rtt.is_some_and(|r| self.rtt_moved(r)) {
            // The path changed under the transfer: a rate measured on the old one must not
            // stand as evidence (or size trains) in the next idle periods.
            tracing::debug!(target: "amst_detect", rtt = ?passive_rtt, "RTT moved while busy; rate memory cleared");
            self.forget_rates();
        }
        let obs = if busy {
            let moved_per_sec = delta.map_or(0.0, |(_, per_sec)| per_sec);
            // A delivery rate proves a slow path only if the application kept the path
            // busy: then it moved at least half that rate. An application-limited rate (a
            // trickle of RPCs on a fast link) is only a lower bound.
            let bandwidth = match metrics.delivery_rate {
                Some(d) if moved_per_sec >= d as f64 / 2.0 => {
                    self.rate_floor = Some(d);
                    Some(Bandwidth::measured(d))
                }
                Some(d) => Some(Bandwidth::at_least(d.max(moved_per_sec as u64))),
                None => delta.map(|(_, per_sec)| Bandwidth::at_least(per_sec as u64)),
            };
            let rtt = match passive_rtt {
                Some(r) => Some(r),
                None => self.probe(&transport, 0).await.map(|s| s.rtt),
            };
            Observation {
                rtt,
                bandwidth,
                source: SampleSource::Passive,
            }
        } else {
            self.probe_idle(&transport, passive_rtt).await
        };
        if self.stats.last_period_bytes > 0 {
            // The probe's own bytes are not the application's traffic.
            self.baseline = Some(Baseline {
                transport: id,
                bytes: moved(&transport.metrics()),
                at: now(),
            });
        }
        Some(obs)
    }

    /// The path's RTT from a period in which data moved.
    ///
    /// Normally the transport's minimum RTT: a bulk transfer's smoothed RTT includes the
    /// queue it builds itself (10–12 ms on loopback under the internet profile, which
    /// would read as a hybrid path). But the minimum (TCP's is a 5-minute window) does not
    /// rise when a busy path gets longer, so a link that flips from datacenter to
    /// internet mid-transfer would keep its old RTT for minutes. So when the smoothed RTT
    /// is firmly internet by itself (above the internet threshold by the change-point
    /// margin, 75 ms by default), it is the path's RTT: a round trip that long is an
    /// internet path whether the delay is propagation or a queue, and a queue that deep
    /// on a fast path (≥ 9 MB at 1 Gbit/s) is not what a datacenter link looks like. One
    /// such period cannot flip the mode alone: the classifier's change point needs
    /// `step_samples` firm samples in a row, and its window a 0.7 majority.
    fn busy_rtt(&self, metrics: &TransportMetrics) -> Option<std::time::Duration> {
        let c = &self.config.classifier;
        let firmly_long = c.thresholds.internet_min_rtt.mul_f64(c.step_margin);
        match (metrics.min_rtt, metrics.rtt) {
            (Some(min), Some(srtt)) if srtt > firmly_long => Some(srtt.max(min)),
            (min, srtt) => min.or(srtt),
        }
    }

    /// An idle period: an RTT ping first; then, unless the RTT moved by the change-point
    /// margin (the path changed, so the remembered rate may be stale and the budget too
    /// large), a burst within the budget.
    async fn probe_idle(
        &mut self,
        transport: &Arc<dyn Transport>,
        passive_rtt: Option<std::time::Duration>,
    ) -> Observation {
        let fallback = Observation {
            rtt: passive_rtt,
            bandwidth: None,
            source: SampleSource::Passive,
        };
        let before = moved(&transport.metrics());
        let Some(mut ping) = self.probe(transport, 0).await else {
            return fallback;
        };
        let c = &self.config.classifier;
        let firmly_long = c.thresholds.internet_min_rtt.mul_f64(c.step_margin);
        let rose = self.classifier.estimate().0.is_some_and(|e| ping.rtt > e);
        if rose && ping.rtt <= firmly_long && self.rtt_moved(ping.rtt) {
            // One ping is one scheduling of both ends and, on an emulated link, of the
            // emulator: on a loaded 2-core machine a 0.1 ms link's pings read 0.3-4 ms, and
            // a single slow one both pulled the window's median RTT past 2 ms and read as a
            // path change, which dropped the measured rate and re-ran the rate measurement
            // in a 200 ms start-up period (where it often ends as a lower bound). A real
            // change shows in a second ping too; noise rarely does twice. The smaller of
            // the two is the sample, as a round trip can be delayed, never hurried. Only a
            // rise can be noise, and one past the firm internet RTT (75 ms) is not the few
            // milliseconds a busy CPU adds: those are taken at once, so that a link that
            // flipped to internet is not followed a round trip later.
            if let Some(again) = self.probe(transport, 0).await {
                ping.bytes_used += again.bytes_used;
                ping.rtt = ping.rtt.min(again.rtt);
            }
        }
        // A ping answered while the application was moving data waited behind it: on a
        // session's first period (no byte count yet to tell busy from idle) a 0.1 ms link
        // read 56–107 ms this way under a starting bulk transfer, and two such pings
        // switched a datacenter link to internet. Such a ping is not the path's RTT, and
        // trains would only compete with the application; the next period is passive.
        let app_moved = moved(&transport.metrics())
            .saturating_sub(before)
            .saturating_sub(ping.bytes_used);
        if app_moved > self.config.busy_bytes {
            tracing::debug!(target: "amst_detect", rtt = ?ping.rtt, app_moved, "ping overlapped traffic; not a sample");
            return fallback;
        }
        let mut obs = Observation {
            rtt: Some(ping.rtt),
            bandwidth: None,
            source: SampleSource::Probe,
        };
        let moved = self.rtt_moved(ping.rtt);
        if moved {
            tracing::debug!(target: "amst_detect", rtt = ?ping.rtt, "RTT moved; burst skipped, rate memory cleared");
            self.forget_rates();
            return obs;
        }
        let id = transport_id(transport);
        let rtt_decides = ping.rtt > self.config.classifier.thresholds.internet_min_rtt;
        if let Some(rc) = self.config.probe.rate.clone()
            && self.rate_measured_on != Some(id)
            && self.probe_unsupported != Some(id)
            && !rtt_decides
        {
            self.rate_measured_on = Some(id);
            let done = self.stats.rate_measurements;
            obs.bandwidth = self.measure_path_rate(transport, rc).await;
            // The measurement pings before every train; its smallest round trip is as
            // much the path's as the period's ping, and less likely held up by a busy CPU.
            if self.stats.rate_measurements > done
                && let Some(r) = self.stats.last_rate.and_then(|e| e.rtt)
            {
                obs.rtt = obs.rtt.map(|p| p.min(r));
            }
            return obs;
        }
        let budget = self.probe_budget();
        self.stats.last_budget = budget;
        let burst = budget.saturating_sub(self.probe_overhead);
        if burst < self.config.probe.min_burst {
            return obs;
        }
        let burst = burst.min(self.config.probe.max_burst);
        if let Some(s) = self.probe(transport, burst).await {
            self.probe_overhead =
                (s.bytes_used.saturating_sub(burst) + ping.bytes_used).clamp(64, 64 * 1024);
            if let Some(rate) = s.delivery_rate {
                self.rate_floor = self.rate_floor.max(Some(rate));
                obs.bandwidth = Some(Bandwidth::at_least(rate));
            }
        }
        // A measured rate of this path is evidence until a train shows more.
        if let Some(measured) = self.path_rate
            && obs.bandwidth.is_none_or(|b| b.bytes_per_sec <= measured)
        {
            obs.bandwidth = Some(Bandwidth::measured(measured));
        }
        obs
    }

    /// Whether `rtt` differs from the classifier's RTT estimate by the change-point margin
    /// (×1.5 by default) and by at least [`RTT_JITTER_FLOOR`]: a new path.
    fn rtt_moved(&self, rtt: std::time::Duration) -> bool {
        let margin = self.config.classifier.step_margin;
        self.classifier.estimate().0.is_some_and(|est| {
            let (a, b) = (rtt.as_secs_f64(), est.as_secs_f64());
            // Sub-millisecond RTTs jitter by ×2 on their own; that is not a new path.
            (a - b).abs() >= RTT_JITTER_FLOOR.as_secs_f64()
                && (a / b.max(1e-9) > margin || b / a.max(1e-9) > margin)
        })
    }

    fn forget_rates(&mut self) {
        self.rate_floor = None;
        self.path_rate = None;
        self.rate_measured_on = None;
    }

    /// One rate measurement (see [`ProbeConfig::rate`](crate::ProbeConfig::rate)), its time
    /// capped at the period. The rate is a measurement only if it converged and the
    /// application moved (almost) nothing meanwhile; otherwise it is a lower bound.
    async fn measure_path_rate(
        &mut self,
        transport: &Arc<dyn Transport>,
        mut rc: crate::rate::RateProbeConfig,
    ) -> Option<Bandwidth> {
        rc.max_time = rc.max_time.min(self.config.period);
        let before = moved(&transport.metrics());
        let busy_bytes = self.config.busy_bytes;
        let app_busy = |wire: u64| {
            // A transport may count its probe bytes among the application's.
            moved(&transport.metrics()).saturating_sub(before) > wire + busy_bytes
        };
        let result = measure_rate_until(&**transport, &rc, app_busy).await;
        let app_moved = moved(&transport.metrics()).saturating_sub(before);
        let e = match result {
            Ok(e) => e,
            Err(e) => {
                self.stats.failures += 1;
                tracing::debug!(target: "amst_detect", error = %e, "rate measurement failed");
                return None;
            }
        };
        self.stats.rate_measurements += 1;
        self.stats.last_rate = Some(e);
        self.stats.probes += e.trains as u64;
        self.stats.bytes_total += e.wire_bytes;
        self.stats.last_period_bytes += e.wire_bytes;
        self.stats.last_burst = e.bytes;
        let mut bw = e.bandwidth?;
        // A transport may count its probe bytes among the application's.
        if app_moved.saturating_sub(e.wire_bytes) > self.config.busy_bytes {
            bw = Bandwidth::at_least(bw.bytes_per_sec);
        }
        tracing::debug!(target: "amst_detect", estimate = ?e, measured = !bw.lower_bound, "path rate");
        self.rate_floor = self.rate_floor.max(Some(bw.bytes_per_sec));
        if !bw.lower_bound {
            self.path_rate = Some(bw.bytes_per_sec);
        }
        Some(bw)
    }

    /// One active probe, bounded in time; `None` if disabled, unsupported or failed.
    async fn probe(
        &mut self,
        transport: &Arc<dyn Transport>,
        burst: u64,
    ) -> Option<amst_core::PathSample> {
        let id = transport_id(transport);
        if !self.config.probe.enabled || self.probe_unsupported == Some(id) {
            return None;
        }
        let limit = self.config.probe.timeout.min(self.config.period);
        self.stats.last_burst = burst;
        match tokio::time::timeout(limit, transport.probe(burst)).await {
            Ok(Ok(sample)) => {
                self.stats.probes += 1;
                self.stats.bytes_total += sample.bytes_used;
                self.stats.last_period_bytes += sample.bytes_used;
                Some(sample)
            }
            Ok(Err(Error::Unavailable { transport, reason })) => {
                tracing::debug!(target: "amst_detect", %transport, %reason, "no active probe; passive only");
                self.probe_unsupported = Some(id);
                None
            }
            Ok(Err(e)) => {
                self.stats.failures += 1;
                tracing::debug!(target: "amst_detect", error = %e, "probe failed");
                None
            }
            Err(_) => {
                self.stats.failures += 1;
                tracing::debug!(target: "amst_detect", after = ?limit, "probe timed out");
                None
            }
        }
    }
}

fn moved(m: &TransportMetrics) -> u64 {
    m.bytes_sent.saturating_add(m.bytes_received)
}

/// `now` from tokio's clock, so that tests with a paused clock are deterministic.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
