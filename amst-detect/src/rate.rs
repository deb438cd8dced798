//! Measuring the path's rate: a sans-IO plan of packet trains ([`RateProbe`]) and the
//! async loop that runs it on a transport ([`measure_rate`]).
//!
//! Why a single short burst under-reads: it is smaller than the bandwidth-delay product, so
//! TCP's window (after slow start or idle) and not the bottleneck paces it; its first
//! answer comes a round trip after it started, so a short train is mostly start-up; and
//! timing it at the sender mixes in the sender's own queueing. So the probe sends trains
//! that grow until each lasts several round trips, times every train by the dispersion of
//! the receiver's answers (each Pong leaves the receiver when its Ping has fully arrived),
//! and stops once two long trains agree, or when its byte or time budget is spent.

use std::time::{Duration, Instant};

use amst_core::{Error, Result, Transport};

use crate::sample::Bandwidth;

/// Limits and targets of one rate measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct RateProbeConfig {
    /// The first train (default 256 KiB).
    pub first_train: u64,
    /// The largest single train (default 32 MiB).
    pub max_train: u64,
    /// Most bytes all trains together may send (default 128 MiB; about 60 ms at 17 Gbit/s,
    /// 1 s at 1 Gbit/s).
    pub max_bytes: u64,
    /// Longest the whole measurement may take (default 3 s). At 2 s, on a 200 Mbit/s,
    /// 20 ms link, the fifth train (twice the fourth, 1 s) did not fit in 5 of 8 runs, and
    /// the measurement ended with a lower bound; at 3 s 5 of 5 converged (in 1.1-2.5 s).
    pub max_time: Duration,
    /// A train counts only if it lasted at least this many round trips (default 12), so
    /// that its start-up (the first answer needs a round trip) and its end (the streams
    /// finish their shares at slightly different times) are a small part of it. At 4, a
    /// 1 MiB and a 2 MiB train at 50 Mbit/s agreed at 0.90 of the link. At 8, on a
    /// 200 Mbit/s, 20 ms link, a 3.4 MB train (9 round trips) read 147-173 Mbit/s and the
    /// 7 MB one after it 176-193: when the first read high they agreed at 0.86-0.89 of the
    /// link (2 of 10 runs). At 12 the pair is 6 and 12 MB, which read 184-192.
    pub min_train_rtts: u32,
    /// ...and at least this long (default 20 ms), so that timer granularity and a
    /// scheduling delay are small parts of it. At 4 ms, on a sub-millisecond emulated link
    /// that carries 1.4-3.4 Gbit/s, a 1 MiB and a 2 MiB train held back alike by a loaded
    /// CPU agreed at 370 Mbit/s, and the path was called slow. A train of `max_train`
    /// needs only a fifth of it: on a faster path none could last the whole.
    pub min_train_time: Duration,
    /// A counted train whose rate is within this fraction of the best counted train before
    /// it (default 0.05) ends the measurement: the rate no longer grows with the train, so
    /// it is the path's. At 0.08, trains still held back by their start-up agreed at 0.87–0.92
    /// of the link at 50 Mbit/s; the tighter bound lets one more, longer train run.
    pub tolerance: f64,
}

impl Default for RateProbeConfig {
    fn default() -> Self {
        RateProbeConfig {
            first_train: 256 << 10,
            max_train: 32 << 20,
            max_bytes: 128 << 20,
            max_time: Duration::from_secs(3),
            min_train_rtts: 12,
            min_train_time: Duration::from_millis(20),
            tolerance: 0.05,
        }
    }
}

impl RateProbeConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Error::Config { field, reason };
        if self.first_train == 0 || self.first_train > self.max_train {
            return Err(bad(
                "rate_probe.first_train",
                format!(
                    "is {}; must be 1..=max_train ({})",
                    self.first_train, self.max_train
                ),
            ));
        }
        if self.max_bytes < self.first_train {
            return Err(bad(
                "rate_probe.max_bytes",
                format!(
                    "is {}; must be ≥ first_train ({})",
                    self.max_bytes, self.first_train
                ),
            ));
        }
        if self.max_time.is_zero() {
            return Err(bad("rate_probe.max_time", "is 0".into()));
        }
        if !(self.tolerance > 0.0 && self.tolerance < 1.0) {
            return Err(bad(
                "rate_probe.tolerance",
                format!("is {}; must be in (0, 1)", self.tolerance),
            ));
        }
        Ok(())
    }
}

/// One train's result, as the transport measured it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Train {
    /// Padding bytes asked for.
    pub bytes: u64,
    /// Delivery rate at the receiver, bytes per second (`None` if it could not be timed).
    pub rate: Option<u64>,
    /// The round trip the probe measured before the train.
    pub rtt: Duration,
    /// How long the train took, from its first byte sent to its last answer.
    pub took: Duration,
    /// Bytes the probe put on the wire, both directions.
    pub wire_bytes: u64,
}

/// What [`RateProbe::next`] asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RateStep {
    /// Send a train of this many bytes and report it with [`RateProbe::on_train`].
    Send(u64),
    /// Done.
    Done(RateEstimate),
}

/// The outcome of a rate measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateEstimate {
    /// The rate, bytes per second: [`Bandwidth::measured`] when two long trains agreed,
    /// [`Bandwidth::at_least`] (the best train) when the budget ran out first. `None` if no
    /// train could be timed.
    pub bandwidth: Option<Bandwidth>,
    /// Trains sent.
    pub trains: usize,
    /// Padding bytes sent.
    pub bytes: u64,
    /// Bytes the probes put on the wire, both directions (their pings and answers too).
    pub wire_bytes: u64,
    /// Time from the first train to the end.
    pub took: Duration,
    /// The smallest RTT the probe saw.
    pub rtt: Option<Duration>,
}

/// How far above the smallest RTT seen a train's own RTT may be, beyond twice it, for the
/// train to make a lower bound ([`RateProbe::conclude`]).
const RTT_SLACK: Duration = Duration::from_millis(1);

/// Counted trains of the largest size whose median is the rate when no two agreed.
const LARGEST_QUORUM: usize = 5;

/// The sans-IO plan of a rate measurement: trains that grow (at least doubling) until they
/// last [`min_train_rtts`](RateProbeConfig::min_train_rtts) round trips, and on until a
/// train twice as large as the one before reads the same rate within the tolerance.
///
/// ```
/// use std::time::{Duration, Instant};
/// use amst_detect::{RateProbe, RateProbeConfig, RateStep, Train};
///
/// let t0 = Instant::now();
/// let mut p = RateProbe::new(RateProbeConfig::default(), t0);
/// let rtt = Duration::from_millis(20);
/// let rate = 25_000_000; // 200 Mbit/s
/// let mut now = t0;
/// let estimate = loop {
///     match p.next(now) {
///         RateStep::Send(bytes) => {
///             let took = rtt + Duration::from_secs_f64(bytes as f64 / rate as f64);
///             now += took + rtt; // the ping before the train
///             p.on_train(Train { bytes, rate: Some(rate), rtt, took, wire_bytes: bytes });
///         }
///         RateStep::Done(e) => break e,
///     }
/// };
/// let bw = estimate.bandwidth.unwrap();
/// assert!(!bw.lower_bound);
/// assert_eq!(bw.bytes_per_sec, rate);
/// ```
#[derive(Clone, Debug)]
pub struct RateProbe {
    config: RateProbeConfig,
    started: Instant,
    trains: Vec<Train>,
    sent: u64,
    wire: u64,
    done: Option<RateEstimate>,
}

impl RateProbe {
    /// A measurement starting at `now`.
    pub fn new(config: RateProbeConfig, now: Instant) -> Self {
        RateProbe {
            config,
            started: now,
            trains: Vec::new(),
            sent: 0,
            wire: 0,
            done: None,
        }
    }

    /// The trains so far.
    pub fn trains(&self) -> &[Train] {
        &self.trains
    }

    /// Records one train.
    pub fn on_train(&mut self, train: Train) {
        self.sent = self.sent.saturating_add(train.bytes);
        self.wire = self.wire.saturating_add(train.wire_bytes);
        self.trains.push(train);
    }

    /// A train is long enough when it lasted `min_train_rtts` round trips and
    /// `min_train_time`; one of the largest size, a fifth of `min_train_time` will do.
    ///
    /// On a path faster than `max_train / min_train_time` (13 Gbit/s at the defaults) no
    /// train can last `min_train_time`, and none counted: over loopback at 20-35 Gbit/s the
    /// probe always ended with a lower bound. The largest trains are the ones least held back
    /// by start-up and stalls, and 4 ms is still thousands of timer ticks.
    fn long_enough(&self, t: &Train) -> bool {
        let rtts = t.rtt * self.config.min_train_rtts;
        let need = if t.bytes >= self.config.max_train {
            self.config.min_train_time / 5
        } else {
            self.config.min_train_time
        };
        t.rate.is_some() && t.took >= need.max(rtts)
    }

    fn min_rtt(&self) -> Option<Duration> {
        self.trains.iter().map(|t| t.rtt).min()
    }

    fn finish(&mut self, now: Instant, bandwidth: Option<Bandwidth>) -> RateEstimate {
        let e = RateEstimate {
            bandwidth,
            trains: self.trains.len(),
            bytes: self.sent,
            wire_bytes: self.wire,
            took: now.saturating_duration_since(self.started),
            rtt: self.min_rtt(),
        };
        self.done = Some(e);
        e
    }

    /// The path's rate, once the newest counted train (at least 1.5 times larger than the
    /// counted train before it, or the largest allowed) reads within the tolerance of the
    /// best counted train before it: the better of the two.
    ///
    /// Why the best and not simply the train before: a train never reads faster than the
    /// path (the transport takes the slower of two timings), but it reads slower whenever
    /// something held it back: the window's start-up after idle, a stall of the sender or
    /// the receiver, or, on a loaded machine, of the link emulator. Two trains held back
    /// alike, e.g. the two right after a stall, used to agree with each other and end the
    /// measurement early with a low rate (0.85–0.9 of the link at 50 Mbit/s and 1 Gbit/s
    /// in loaded runs). Compared with the best, a low pair no longer ends it; the trains
    /// keep growing, and a stall becomes a smaller part of each. The rate must still stop
    /// growing with the train: a larger train has to confirm the best, within the
    /// tolerance, and the better of the two is the closer to the path's rate.
    fn agreed(&self) -> Option<u64> {
        let counted: Vec<&Train> = self.trains.iter().filter(|t| self.long_enough(t)).collect();
        let [.., prev, newest] = counted[..] else {
            return None;
        };
        let grew =
            newest.bytes as f64 >= 1.5 * prev.bytes as f64 || newest.bytes >= self.config.max_train;
        let best_before = counted[..counted.len() - 1]
            .iter()
            .filter_map(|t| t.rate)
            .max()?;
        let newest_rate = newest.rate?;
        let (lo, hi) = (
            best_before.min(newest_rate) as f64,
            best_before.max(newest_rate) as f64,
        );
        if grew && hi > 0.0 && (hi - lo) / hi <= self.config.tolerance {
            return Some(best_before.max(newest_rate));
        }
        self.largest_trains_median()
    }

    /// The median of the counted trains of the largest size, once [`LARGEST_QUORUM`] ran.
    ///
    /// At the largest size a train can no longer grow, so the question the pairwise rule
    /// asks (does the rate still grow with the train?) has no further answer; what is left
    /// is the machine's noise between equal trains. Over loopback one train read 33.9
    /// Gbit/s and the thirteen after it 17.7-28.0: none came within the tolerance of that
    /// best, and the probe ended with "at least" after 512 MiB (1 run in 20). The median of
    /// several is what such a path carries, and one outlier either way cannot move it.
    fn largest_trains_median(&self) -> Option<u64> {
        let mut rates: Vec<u64> = self
            .trains
            .iter()
            .filter(|t| t.bytes >= self.config.max_train && self.long_enough(t))
            .filter_map(|t| t.rate)
            .collect();
        if rates.len() < LARGEST_QUORUM {
            return None;
        }
        rates.sort_unstable();
        Some(rates[rates.len() / 2])
    }

    /// Ends the measurement now with what the trains so far show.
    pub fn conclude(&mut self, now: Instant) -> RateEstimate {
        if let Some(e) = self.done {
            return e;
        }
        let bandwidth = match self.agreed() {
            Some(rate) => Some(Bandwidth::measured(rate)),
            None => self.best_trusted().map(Bandwidth::at_least),
        };
        self.finish(now, bandwidth)
    }

    /// The best rate of a train timed against a sound round trip, for a lower bound.
    ///
    /// A train is timed as the longer of its answers' spread and the whole exchange less
    /// the RTT of the ping just before it; when a stall delays that one ping, the second
    /// shrinks toward nothing and the train reads fast. Such a train never counts toward
    /// agreement (it must last [`min_train_rtts`](RateProbeConfig::min_train_rtts) of its
    /// own RTTs), but the best of all trains did make the lower bound: a full bench run
    /// reported "at least 209.8 Gbit/s" over loopback once. A train whose RTT was over
    /// twice the smallest seen, and [`RTT_SLACK`] more, is left out.
    fn best_trusted(&self) -> Option<u64> {
        let min = self.min_rtt()?;
        let limit = (min * 2).max(min + RTT_SLACK);
        self.trains
            .iter()
            .filter(|t| t.rtt <= limit)
            .filter_map(|t| t.rate)
            .max()
    }

    /// The next train to send, or the result. Once done, it stays done.
    pub fn next(&mut self, now: Instant) -> RateStep {
        if let Some(e) = self.done {
            return RateStep::Done(e);
        }
        if let Some(rate) = self.agreed() {
            return RateStep::Done(self.finish(now, Some(Bandwidth::measured(rate))));
        }
        let best = self.trains.iter().filter_map(|t| t.rate).max();
        let elapsed = now.saturating_duration_since(self.started);
        let size = match self.trains.last() {
            None => self.config.first_train,
            Some(last) => {
                let need = self
                    .config
                    .min_train_time
                    .max(last.rtt * self.config.min_train_rtts);
                match last.rate {
                    // Aim at 1.5 × the needed length at the last rate, at least double a
                    // short train (the rate may still be window-limited), never more than
                    // eight times it. Not fourfold: with trains growing ×4 at 200 Mbit/s,
                    // the 4 and 8 MiB trains agreed at 0.74 of the link in 2 of 9 runs
                    // (likely each stream's BBR still pacing at its estimate from fewer,
                    // shorter trains before).
                    Some(r) if !self.long_enough(last) => {
                        let want = (r as f64 * need.as_secs_f64() * 1.5) as u64;
                        want.clamp(last.bytes.saturating_mul(2), last.bytes.saturating_mul(8))
                    }
                    // Twice the last: the next comparison tests whether the rate still
                    // grows with the train.
                    Some(r) => ((r as f64 * need.as_secs_f64() * 1.5) as u64)
                        .max(last.bytes.saturating_mul(2)),
                    None => last.bytes.saturating_mul(2),
                }
            }
        };
        let size = size.min(self.config.max_train);
        let left_bytes = self.config.max_bytes.saturating_sub(self.sent);
        // Time the next train would take at the best rate seen, plus two round trips (the
        // ping and the last answer).
        let rtt = self.min_rtt().unwrap_or_default();
        let eta = best.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(size as f64 / r.max(1) as f64)
        }) + rtt * 2;
        if size > left_bytes || elapsed + eta > self.config.max_time {
            let bound = self.best_trusted().map(Bandwidth::at_least);
            return RateStep::Done(self.finish(now, bound));
        }
        RateStep::Send(size)
    }
}

/// Runs a [`RateProbe`] on `transport` with [`Transport::probe`], each train bounded by
/// the time left. Fails only if the very first probe fails (e.g. the transport has no
/// probe); a later failure ends the measurement with what it has.
pub async fn measure_rate(
    transport: &dyn Transport,
    config: &RateProbeConfig,
) -> Result<RateEstimate> {
    measure_rate_until(transport, config, |_| false).await
}

/// [`measure_rate`] that also ends, with what it has, once `stop` returns true; it is asked
/// before each train with the bytes the probe has put on the wire so far (the detector
/// stops when the application starts moving data, which the trains would only compete
/// with).
pub async fn measure_rate_until(
    transport: &dyn Transport,
    config: &RateProbeConfig,
    mut stop: impl FnMut(u64) -> bool,
) -> Result<RateEstimate> {
    config.validate()?;
    let start = now();
    let mut plan = RateProbe::new(config.clone(), start);
    loop {
        let bytes = match plan.next(now()) {
            RateStep::Send(_) if stop(plan.wire) => return Ok(plan.conclude(now())),
            RateStep::Send(b) => b,
            RateStep::Done(e) => return Ok(e),
        };
        let left = config
            .max_time
            .saturating_sub(now().saturating_duration_since(start))
            .max(Duration::from_millis(100));
        let t0 = now();
        let sample = match tokio::time::timeout(left, transport.probe(bytes)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if plan.trains().is_empty() => return Err(e),
            Err(_) if plan.trains().is_empty() => {
                return Err(Error::Timeout {
                    what: "the first rate-probe train",
                    after: left,
                });
            }
            // Out of time or failed mid-way: report what the finished trains showed.
            _ => return Ok(plan.conclude(now())),
        };
        // The train took the whole call minus the ping's round trip before it.
        let took = now()
            .saturating_duration_since(t0)
            .saturating_sub(sample.rtt);
        let train = Train {
            bytes,
            rate: sample.delivery_rate,
            rtt: sample.rtt,
            took,
            wire_bytes: sample.bytes_used,
        };
        tracing::debug!(target: "amst_detect", ?train, "rate-probe train");
        plan.on_train(train);
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: RateProbeConfig, rate_of: impl Fn(usize, u64) -> u64) -> RateEstimate {
        run_on(config, Duration::from_millis(10), rate_of)
    }

    fn run_on(
        config: RateProbeConfig,
        rtt: Duration,
        rate_of: impl Fn(usize, u64) -> u64,
    ) -> RateEstimate {
        let t0 = Instant::now();
        let mut p = RateProbe::new(config, t0);
        let mut now = t0;
        for i in 0.. {
            match p.next(now) {
                RateStep::Send(bytes) => {
                    let rate = rate_of(i, bytes);
                    let took = rtt + Duration::from_secs_f64(bytes as f64 / rate as f64);
                    now += took + rtt;
                    p.on_train(Train {
                        bytes,
                        rate: Some(rate),
                        rtt,
                        took,
                        wire_bytes: bytes + 100,
                    });
                }
                RateStep::Done(e) => return e,
            }
        }
        unreachable!()
    }

    #[test]
    fn converges_on_a_steady_rate() {
        let e = run(RateProbeConfig::default(), |_, _| 125_000_000);
        assert_eq!(e.bandwidth, Some(Bandwidth::measured(125_000_000)));
        assert!(e.trains >= 3, "{e:?}");
    }

    #[test]
    fn a_path_too_fast_for_a_long_train_is_measured_by_the_largest_ones() {
        // Loopback: 30 Gbit/s and 50 µs. A 32 MiB train lasts 9 ms, under min_train_time.
        let rate = 3_750_000_000;
        let e = run_on(
            RateProbeConfig::default(),
            Duration::from_micros(50),
            |_, _| rate,
        );
        assert_eq!(e.bandwidth, Some(Bandwidth::measured(rate)), "{e:?}");
        assert!(e.bytes <= RateProbeConfig::default().max_bytes, "{e:?}");
    }

    #[test]
    fn a_rate_that_never_settles_is_a_lower_bound_within_the_byte_budget() {
        let config = RateProbeConfig {
            max_bytes: 16 << 20,
            ..Default::default()
        };
        // Grows by a quarter per train: never two alike.
        let e = run(config.clone(), |i, _| {
            (12_500_000.0 * 1.25f64.powi(i as i32)) as u64
        });
        let bw = e.bandwidth.unwrap();
        assert!(bw.lower_bound, "{e:?}");
        assert!(bw.bytes_per_sec > 12_500_000, "the best train: {e:?}");
        assert!(e.bytes <= config.max_bytes, "{e:?}");
    }

    #[test]
    fn a_train_timed_against_a_stalled_ping_does_not_make_the_lower_bound() {
        let t0 = Instant::now();
        let mut p = RateProbe::new(RateProbeConfig::default(), t0);
        let train = |rate: u64, rtt_us: u64| Train {
            bytes: 8 << 20,
            rate: Some(rate),
            rtt: Duration::from_micros(rtt_us),
            took: Duration::from_millis(3),
            wire_bytes: 8 << 20,
        };
        // Loopback trains too short to count, one of them timed against a ping that came
        // back 9 ms late and reading ten times the others.
        p.on_train(train(2_500_000_000, 80));
        p.on_train(train(26_000_000_000, 9_000));
        p.on_train(train(3_000_000_000, 120));
        let e = p.conclude(t0 + Duration::from_millis(40));
        assert_eq!(
            e.bandwidth,
            Some(Bandwidth::at_least(3_000_000_000)),
            "{e:?}"
        );
    }

    #[test]
    fn the_time_budget_ends_a_slow_measurement() {
        let config = RateProbeConfig {
            max_time: Duration::from_millis(300),
            ..Default::default()
        };
        let e = run(config, |i, _| 1_000_000 + 100_000 * i as u64);
        assert!(e.took <= Duration::from_millis(300), "{e:?}");
        assert!(e.bandwidth.unwrap().lower_bound, "{e:?}");
    }

    #[test]
    fn two_trains_held_back_alike_do_not_end_it_below_the_best() {
        // The third and fourth trains both read 0.85 of the rate (a stall); the old rule
        // (newest against the one before) ended there with 0.85. One round trip is long
        // enough here, so that every train counts.
        let config = RateProbeConfig {
            min_train_rtts: 1,
            ..Default::default()
        };
        let e = run(config, |i, _| match i {
            0 => 40_000_000,
            1 => 100_000_000,
            2 | 3 => 85_000_000,
            _ => 100_000_000,
        });
        assert_eq!(e.bandwidth, Some(Bandwidth::measured(100_000_000)), "{e:?}");
        assert!(e.trains >= 5, "{e:?}");
    }

    #[test]
    fn one_fast_train_of_the_largest_size_does_not_leave_only_a_lower_bound() {
        // Loopback at 30 µs: every 32 MiB train counts. The third of them reads 34 Gbit/s,
        // the rest 23.6-28 and never within 5% of it (the rates of a run that ended with
        // "at least" after 512 MiB).
        let config = RateProbeConfig {
            max_bytes: 512 << 20,
            ..Default::default()
        };
        let largest = [
            3_279_000_000u64,
            2_952_000_000,
            4_235_000_000,
            3_501_000_000,
            2_976_000_000,
            3_044_000_000,
            3_161_000_000,
        ];
        let e = run_on(config, Duration::from_micros(30), |i, bytes| {
            if bytes < 32 << 20 {
                2_000_000_000 + i as u64 * 300_000_000
            } else {
                largest[(i.saturating_sub(3)) % largest.len()]
            }
        });
        let bw = e.bandwidth.expect("measured");
        assert!(!bw.lower_bound, "{e:?}");
        // The median of the first five: 3.279 GB/s.
        assert_eq!(bw.bytes_per_sec, 3_279_000_000, "{e:?}");
    }

    #[test]
    fn bad_config_names_the_field() {
        let c = RateProbeConfig {
            tolerance: 0.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("tolerance"));
    }
}
