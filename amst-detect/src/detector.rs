//! The measuring half: one [`Detector::step`] per period reads the live transport's metrics
//! (passive) or, on an idle link, runs its budgeted active probe, and feeds the result to
//! the [`Classifier`].

use std::sync::Arc;
use std::time::Instant;

use amst_core::{Error, Mode, Result, Transport, TransportMetrics};

use crate::classifier::{Classifier, Decision};
use crate::config::DetectorConfig;
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
}

/// Byte counter at the end of the previous period, per transport object.
#[derive(Clone, Copy, Debug)]
struct Baseline {
    transport: usize,
    bytes: u64,
    at: Instant,
}

/// Samples a live session once per [`step`](Self::step) and classifies it.
///
/// Passive when the transport moved at least `busy_bytes` in the period: the RTT is the
/// transport's smoothed RTT and the bandwidth its delivery-rate estimate, or, if it has
/// none, the bytes moved per second (a lower bound: see [`Bandwidth::lower_bound`]).
/// Active when idle: one [`Transport::probe`] whose burst is at most
/// `probe.max_fraction` (1 %) of the measured bandwidth × period.
pub struct Detector {
    config: DetectorConfig,
    classifier: Classifier,
    source: Box<dyn PathSource>,
    baseline: Option<Baseline>,
    stats: ProbeStats,
    /// Rate of the newest probe burst, for the budget before the classifier has a rate.
    last_probe_rate: Option<u64>,
    /// Bytes a probe uses beyond its burst (ping, pong, framing), learnt from answers.
    probe_overhead: u64,
    /// The transport that answered `probe` with `Unavailable`; not asked again.
    probe_unsupported: Option<usize>,
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
            last_probe_rate: None,
            probe_overhead: 128,
            probe_unsupported: None,
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

    /// The probe's byte budget for the next period: `max_fraction` of the bandwidth
    /// estimate × period, or the bootstrap burst before any rate is known, never more than
    /// `max_burst` plus the probe's own overhead.
    ///
    /// Two cases can exceed the fraction, both bounded: the very first probe on a link of
    /// unknown rate (`bootstrap_burst`, 16 KiB), and the first probe after the path's rate
    /// dropped, which is sized by the old rate (at most `max_burst`, 4 MiB).
    pub fn probe_budget(&self) -> u64 {
        let p = &self.config.probe;
        // The newest probe rate caps the window's estimate: after a drop in the path's rate
        // the median still remembers the fast path for a few periods.
        let rate = match (self.classifier.estimate().1, self.last_probe_rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match rate {
            None => p.bootstrap_burst.min(p.max_burst) + self.probe_overhead,
            Some(r) => {
                let allowed = p.max_fraction * r as f64 * self.config.period.as_secs_f64();
                (allowed as u64).min(p.max_burst + self.probe_overhead)
            }
        }
    }

    /// Takes one sample of the current transport and decides. Call once per period.
    pub async fn step(&mut self) -> Decision {
        self.stats.last_period_bytes = 0;
        if let Some(obs) = self.sample().await {
            self.classifier.observe(now(), obs);
        }
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
        // The kernel's srtt only moves while acks arrive, so it is trusted only for a period
        // in which data moved. min_rtt is a fallback: it never rises on a longer path.
        let passive_rtt = if fresh {
            metrics.rtt.or(metrics.min_rtt)
        } else {
            None
        };
        let obs = if busy {
            let bandwidth = metrics
                .delivery_rate
                .map(Bandwidth::measured)
                .or_else(|| delta.map(|(_, per_sec)| Bandwidth::at_least(per_sec as u64)));
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
            let budget = self.probe_budget();
            let burst = budget.saturating_sub(self.probe_overhead);
            let burst = if burst < self.config.probe.min_burst {
                0
            } else {
                burst.min(self.config.probe.max_burst)
            };
            match self.probe(&transport, burst).await {
                Some(s) => {
                    self.stats.last_budget = budget;
                    Observation {
                        rtt: Some(s.rtt),
                        bandwidth: s.delivery_rate.map(Bandwidth::measured),
                        source: SampleSource::Probe,
                    }
                }
                None => Observation {
                    rtt: passive_rtt,
                    bandwidth: None,
                    source: SampleSource::Passive,
                },
            }
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
                if burst > 0 {
                    self.probe_overhead =
                        sample.bytes_used.saturating_sub(burst).clamp(64, 64 * 1024);
                    self.last_probe_rate = sample.delivery_rate.or(self.last_probe_rate);
                }
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
