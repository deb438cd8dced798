//! What a simulation run reports, and the summaries tests assert on.

use std::fmt::Write as _;
use std::time::Duration;

use crate::Phase;

/// The outcome of [`super::Scenario::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Simulated time covered.
    pub duration: Duration,
    /// One entry per flow, in scenario order.
    pub flows: Vec<FlowReport>,
    /// The bottleneck's totals.
    pub link: LinkReport,
    /// The time series, one entry per sample interval.
    pub samples: Vec<Sample>,
    /// The sampling interval.
    pub sample_interval: Duration,
}

/// Totals for one flow.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowReport {
    /// The flow's name.
    pub name: String,
    /// When it started.
    pub start: Duration,
    /// When its last byte was delivered, for finite flows that finished.
    pub completed_at: Option<Duration>,
    /// Unique payload bytes delivered to the receiver.
    pub delivered_bytes: u64,
    /// `delivered_bytes` × 8 over the time from `start` to the end of the run (or to
    /// `completed_at`).
    pub goodput_bps: f64,
    /// Packets sent, including retransmissions and probes.
    pub packets_sent: u64,
    /// Packets the sender declared lost.
    pub packets_declared_lost: u64,
    /// Declared-lost packets that were later acked.
    pub spurious_losses: u64,
    /// Times `on_spurious_loss` was called.
    pub undo_events: u64,
    /// Packets of this flow dropped at the bottleneck (overflow and random).
    pub packets_dropped: u64,
    /// Mean of the flow's RTT samples.
    pub mean_rtt: Duration,
    /// Every change of the controller's [`Phase`], from the first (at the flow's start).
    pub phase_trace: Vec<PhaseChange>,
}

impl FlowReport {
    /// Dropped packets over packets sent.
    pub fn loss_rate(&self) -> f64 {
        if self.packets_sent == 0 {
            0.0
        } else {
            self.packets_dropped as f64 / self.packets_sent as f64
        }
    }

    /// The phase trace as one line per change, `"<ms> <phase>"`, for snapshots.
    pub fn phase_trace_text(&self) -> String {
        let mut s = String::new();
        for c in &self.phase_trace {
            let _ = writeln!(s, "{:>7} ms  {}", c.at.as_millis(), c.phase);
        }
        s
    }
}

/// A controller phase change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseChange {
    /// When, from the beginning of the run.
    pub at: Duration,
    /// The phase entered.
    pub phase: Phase,
}

/// Totals for the bottleneck.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkReport {
    /// Bytes serialised onto the link (all flows, including duplicates).
    pub transmitted_bytes: u64,
    /// Packets dropped because the buffer was full.
    pub overflow_drops: u64,
    /// Packets the policer dropped.
    pub policer_drops: u64,
    /// Packets dropped at random.
    pub random_drops: u64,
    /// Mean time packets waited in the queue.
    pub mean_queue_delay: Duration,
    /// Longest time a packet waited in the queue.
    pub max_queue_delay: Duration,
}

/// One point of the time series.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// End of the interval this sample covers.
    pub at: Duration,
    /// The link rate at `at`, bits per second.
    pub link_rate_bps: f64,
    /// Mean queueing delay of the packets that left the queue in the interval (zero if none).
    pub queue_delay: Duration,
    /// Bytes waiting in the queue at `at`.
    pub queue_bytes: u64,
    /// One entry per flow, in scenario order.
    pub flows: Vec<FlowSample>,
}

/// One flow's state at a sample.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSample {
    /// Unique bytes delivered in the interval, as bits per second.
    pub throughput_bps: f64,
    /// Congestion window at `at`.
    pub cwnd: u64,
    /// Pacing rate at `at`, bytes per second.
    pub pacing_rate: f64,
    /// The controller's smoothed RTT.
    pub srtt: Option<Duration>,
    /// The controller's phase.
    pub phase: Phase,
}

impl Report {
    fn window(&self, from: Duration, to: Duration) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| s.at > from && s.at <= to)
    }

    /// Mean throughput of flow `flow` over samples ending in `(from, to]`, bits per second.
    pub fn throughput_between(&self, flow: usize, from: Duration, to: Duration) -> f64 {
        let (sum, n) = self.window(from, to).fold((0.0, 0usize), |(s, n), x| {
            (s + x.flows[flow].throughput_bps, n + 1)
        });
        if n == 0 { 0.0 } else { sum / n as f64 }
    }

    /// Jain's fairness index `(Σx)² / (n·Σx²)` of the flows' mean throughputs over
    /// `(from, to]`; 1 is perfectly fair, `1/n` is one flow taking everything.
    pub fn jain_index(&self, from: Duration, to: Duration) -> f64 {
        let xs: Vec<f64> = (0..self.flows.len())
            .map(|i| self.throughput_between(i, from, to))
            .collect();
        jain_index(&xs)
    }

    /// Each flow's share of the total throughput per sample, for plotting convergence.
    pub fn shares(&self) -> Vec<(Duration, Vec<f64>)> {
        self.samples
            .iter()
            .map(|s| {
                let total: f64 = s.flows.iter().map(|f| f.throughput_bps).sum();
                let shares = s
                    .flows
                    .iter()
                    .map(|f| {
                        if total > 0.0 {
                            f.throughput_bps / total
                        } else {
                            0.0
                        }
                    })
                    .collect();
                (s.at, shares)
            })
            .collect()
    }

    /// Mean of the sampled queueing delays over `(from, to]`, weighting samples equally.
    pub fn mean_queue_delay_between(&self, from: Duration, to: Duration) -> Duration {
        let (sum, n) = self
            .window(from, to)
            .fold((Duration::ZERO, 0u32), |(s, n), x| {
                (s + x.queue_delay, n + 1)
            });
        if n == 0 { Duration::ZERO } else { sum / n }
    }

    /// Total goodput of all flows, bits per second.
    pub fn total_goodput_bps(&self) -> f64 {
        self.flows.iter().map(|f| f.goodput_bps).sum()
    }

    /// The time series as CSV: one row per sample and flow.
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "t_ms,link_mbps,queue_delay_ms,queue_bytes,flow,throughput_mbps,cwnd,pacing_mbps,srtt_ms,phase\n",
        );
        for x in &self.samples {
            for (i, f) in x.flows.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "{},{:.3},{:.3},{},{},{:.3},{},{:.3},{},{}",
                    x.at.as_millis(),
                    x.link_rate_bps / 1e6,
                    x.queue_delay.as_secs_f64() * 1e3,
                    x.queue_bytes,
                    self.flows[i].name,
                    f.throughput_bps / 1e6,
                    f.cwnd,
                    f.pacing_rate * 8.0 / 1e6,
                    f.srtt
                        .map_or(String::new(), |d| format!("{:.3}", d.as_secs_f64() * 1e3)),
                    f.phase,
                );
            }
        }
        s
    }

    /// Writes [`Self::to_csv`] to `path`.
    pub fn write_csv(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        std::fs::write(path, self.to_csv())
    }

    /// Writes an SVG plot of throughput per flow, queueing delay and cwnd to `path`.
    #[cfg(feature = "sim-plot")]
    pub fn write_svg(&self, path: impl AsRef<std::path::Path>) -> Result<(), String> {
        super::plot::write_svg(self, path.as_ref())
    }
}

/// Jain's fairness index of `xs`; 1.0 for an empty or all-zero input.
pub fn jain_index(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        1.0
    } else {
        sum * sum / (xs.len() as f64 * sq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index_bounds() {
        assert_eq!(jain_index(&[5.0, 5.0]), 1.0);
        assert_eq!(jain_index(&[10.0, 0.0]), 0.5);
        assert!((jain_index(&[3.0, 1.0]) - 0.8).abs() < 1e-12);
    }
}
