//! The sans-IO classifier: observations in, a [`Decision`] out, time always an argument.
//!
//! How it decides, in order:
//!
//! 1. Every observation in the history *votes* for one mode, using the seed's thresholds
//!    widened by the hysteresis band in favour of the current mode. A vote without a usable
//!    bandwidth counts [`rtt_only_weight`](ClassifierConfig::rtt_only_weight); a vote for
//!    internet because RTT > 50 ms always counts fully, since no bandwidth could overturn it.
//! 2. A mode's *confidence* is its weighted share of the votes (window) or the EWMA of its
//!    votes. The classifier switches only when another mode's confidence reaches
//!    [`switch_confidence`](ClassifierConfig::switch_confidence) (0.7).
//! 3. Change points: when the last [`step_samples`](ClassifierConfig::step_samples)
//!    observations all lie firmly (past a threshold by
//!    [`step_margin`](ClassifierConfig::step_margin)) in one other mode, the older history
//!    is dropped, so a real step is followed at once instead of after 7 of 10 votes.
//!
//! Noise at a boundary therefore cannot flap the mode: a sample inside the dead band votes
//! for the current mode, and a switch needs 70 % of the window beyond the band's far edge.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use amst_core::{Mode, Result};

use crate::config::{ClassifierConfig, History, Thresholds};
use crate::sample::{Bandwidth, Observation, SampleSource};
use crate::units::{Ms, Rate};

/// Why a [`Decision`] came out as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No observations in the history; the mode is kept.
    NoData,
    /// The evidence points elsewhere, but there are fewer than `min_samples` observations.
    Warmup,
    /// An operator forced the mode.
    Forced,
    /// The evidence agrees with the current mode.
    Held,
    /// The evidence leans to another mode, below the switch confidence: kept.
    Uncertain,
    /// Another mode reached the switch confidence.
    Switched,
    /// The last observations all fell firmly in another mode: the history was restarted
    /// from them and the mode switched.
    ChangePoint,
}

impl Reason {
    /// Lower-case phrase for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoData => "no data",
            Reason::Warmup => "warming up",
            Reason::Forced => "forced by operator",
            Reason::Held => "held",
            Reason::Uncertain => "held, evidence below switch confidence",
            Reason::Switched => "switched",
            Reason::ChangePoint => "switched at a change point",
        }
    }
}

/// The outcome of one [`Classifier::decide`], with the numbers behind it. Its `Display`
/// is a one-line human explanation, e.g.
/// `internet (was datacenter; switched at a change point): rtt 80.2 ms > 50 ms;
/// bandwidth 199.8 Mbit/s < 1 Gbit/s; internet confidence 1.00 ≥ 0.70 over 2 samples (probe)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// When it was made.
    pub at: Instant,
    /// The mode in effect after this decision.
    pub mode: Mode,
    /// The mode before it.
    pub previous: Mode,
    /// The mode the evidence favours (may differ from `mode` when held or forced).
    pub candidate: Mode,
    /// The candidate's confidence in [0, 1].
    pub confidence: f64,
    /// Confidence of each mode, in the order of [`Mode::ALL`].
    pub confidences: [f64; 3],
    /// The RTT estimate (window median or EWMA).
    pub rtt: Option<Duration>,
    /// The bandwidth estimate in bytes per second, if any usable bandwidth was observed.
    pub bandwidth: Option<u64>,
    /// Observations behind this decision.
    pub samples: usize,
    /// Where the newest observation came from.
    pub source: Option<SampleSource>,
    /// Why.
    pub reason: Reason,
    /// The thresholds used, so that the decision explains itself.
    pub thresholds: Thresholds,
    /// The confidence a switch needs.
    pub switch_confidence: f64,
}

impl Decision {
    /// True if this decision changed the mode.
    pub fn changed(&self) -> bool {
        self.mode != self.previous
    }

    /// True if the evidence had no usable bandwidth, so datacenter/hybrid were told apart
    /// from internet by RTT alone.
    pub fn rtt_only(&self) -> bool {
        self.bandwidth.is_none()
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.thresholds;
        write!(f, "{}", self.mode)?;
        if self.changed() {
            write!(f, " (was {}; {})", self.previous, self.reason.as_str())?;
        } else {
            write!(f, " ({})", self.reason.as_str())?;
        }
        if self.samples == 0 {
            return f.write_str(": no observations");
        }
        f.write_str(": ")?;
        match self.rtt {
            Some(r) if r > t.internet_min_rtt => {
                write!(f, "rtt {} > {}", Ms(r), Ms(t.internet_min_rtt))?
            }
            Some(r) if r < t.datacenter_max_rtt => {
                write!(f, "rtt {} < {}", Ms(r), Ms(t.datacenter_max_rtt))?
            }
            Some(r) => write!(
                f,
                "rtt {} within {}..={}",
                Ms(r),
                Ms(t.datacenter_max_rtt),
                Ms(t.internet_min_rtt)
            )?,
            None => f.write_str("rtt unknown")?,
        }
        match self.bandwidth {
            Some(b) if b < t.fast_bandwidth => {
                write!(f, "; bandwidth {} < {}", Rate(b), Rate(t.fast_bandwidth))?
            }
            Some(b) => write!(f, "; bandwidth {} ≥ {}", Rate(b), Rate(t.fast_bandwidth))?,
            None => f.write_str("; bandwidth unknown (RTT-only, lower confidence)")?,
        }
        let cmp = if self.confidence >= self.switch_confidence {
            "≥"
        } else {
            "<"
        };
        write!(
            f,
            "; {} confidence {:.2} {cmp} {:.2} over {} sample{}",
            self.candidate,
            self.confidence,
            self.switch_confidence,
            self.samples,
            if self.samples == 1 { "" } else { "s" }
        )?;
        if let Some(s) = self.source {
            write!(f, " ({})", s.as_str())?;
        }
        Ok(())
    }
}

fn idx(m: Mode) -> usize {
    match m {
        Mode::Datacenter => 0,
        Mode::Internet => 1,
        Mode::Hybrid => 2,
    }
}

/// One observation's vote.
#[derive(Clone, Copy, Debug)]
struct Vote {
    mode: Option<Mode>,
    weight: f64,
}

#[derive(Clone, Copy, Debug)]
struct Stamped {
    at: Instant,
    obs: Observation,
}

#[derive(Clone, Debug)]
struct EwmaState {
    alpha: f64,
    log_rtt: Option<f64>,
    log_bw: Option<f64>,
    votes: [f64; 3],
    samples: usize,
}

#[derive(Clone, Debug)]
enum Store {
    Window {
        capacity: usize,
        items: VecDeque<Stamped>,
    },
    Ewma(EwmaState),
}

/// The mode classifier. Feed it [`Observation`]s with [`observe`](Self::observe), ask for a
/// [`Decision`] with [`decide`](Self::decide) once per period.
///
/// ```
/// use std::time::{Duration, Instant};
/// use amst_core::Mode;
/// use amst_detect::{Classifier, ClassifierConfig, Observation};
///
/// let mut c = Classifier::new(ClassifierConfig::default())?;
/// let t0 = Instant::now();
/// for i in 0..3 {
///     let now = t0 + Duration::from_secs(5 * i);
///     c.observe(now, Observation::new(Duration::from_millis(80), 25_000_000)); // 200 Mbit/s
///     c.decide(now);
/// }
/// assert_eq!(c.mode(), Mode::Internet);
/// # Ok::<(), amst_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Classifier {
    config: ClassifierConfig,
    mode: Mode,
    forced: Option<Mode>,
    store: Store,
    /// The newest `step_samples` observations, for change-point detection.
    recent: VecDeque<Stamped>,
    last_at: Option<Instant>,
    last_source: Option<SampleSource>,
}

impl Classifier {
    /// A classifier in `config.initial_mode` with an empty history.
    pub fn new(config: ClassifierConfig) -> Result<Self> {
        config.validate()?;
        let store = match config.history {
            History::Window(n) => Store::Window {
                capacity: n,
                items: VecDeque::with_capacity(n),
            },
            History::Ewma { alpha } => Store::Ewma(EwmaState {
                alpha,
                log_rtt: None,
                log_bw: None,
                votes: [0.0; 3],
                samples: 0,
            }),
        };
        Ok(Classifier {
            mode: config.initial_mode,
            forced: None,
            store,
            recent: VecDeque::with_capacity(config.step_samples),
            last_at: None,
            last_source: None,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// The mode in effect.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The operator's forced mode, if any.
    pub fn forced(&self) -> Option<Mode> {
        self.forced
    }

    /// Pins the mode until [`clear_force`](Self::clear_force). Observations are still
    /// recorded and decisions still report what the evidence says, so that clearing the
    /// force returns to a well-informed automatic mode.
    pub fn force_mode(&mut self, mode: Mode) {
        self.forced = Some(mode);
        self.mode = mode;
    }

    /// Returns to automatic classification, starting from the forced mode: the next
    /// decision switches away from it only with the usual confidence.
    pub fn clear_force(&mut self) {
        self.forced = None;
    }

    /// Forgets every observation (e.g. the path was replaced); the mode is kept.
    pub fn reset(&mut self) {
        self.recent.clear();
        self.last_at = None;
        self.last_source = None;
        match &mut self.store {
            Store::Window { items, .. } => items.clear(),
            Store::Ewma(e) => {
                e.log_rtt = None;
                e.log_bw = None;
                e.votes = [0.0; 3];
                e.samples = 0;
            }
        }
    }

    /// Records one observation taken at `now`. Empty observations are ignored.
    pub fn observe(&mut self, now: Instant, obs: Observation) {
        if obs.is_empty() {
            return;
        }
        self.expire(now);
        let stamped = Stamped { at: now, obs };
        if self.recent.len() == self.config.step_samples {
            self.recent.pop_front();
        }
        self.recent.push_back(stamped);
        self.last_at = Some(now);
        self.last_source = Some(obs.source);
        let vote = self.vote(&obs);
        let fast = self.config.thresholds.fast_bandwidth;
        match &mut self.store {
            Store::Window { capacity, items } => {
                if items.len() == *capacity {
                    items.pop_front();
                }
                items.push_back(stamped);
            }
            Store::Ewma(e) => {
                let first = e.samples == 0;
                let a = if first { 1.0 } else { e.alpha };
                for m in Mode::ALL {
                    let v = if vote.mode == Some(m) {
                        vote.weight
                    } else {
                        0.0
                    };
                    e.votes[idx(m)] = (1.0 - a) * e.votes[idx(m)] + a * v;
                }
                if let Some(r) = obs.rtt {
                    let x = ln_nanos(r);
                    e.log_rtt = Some(
                        e.log_rtt
                            .map_or(x, |old| (1.0 - e.alpha) * old + e.alpha * x),
                    );
                }
                if let Some(b) = usable_bandwidth(obs.bandwidth, fast) {
                    let x = (b.max(1) as f64).ln();
                    e.log_bw = Some(
                        e.log_bw
                            .map_or(x, |old| (1.0 - e.alpha) * old + e.alpha * x),
                    );
                }
                e.samples += 1;
            }
        }
    }

    /// The current RTT and bandwidth (bytes/s) estimates.
    pub fn estimate(&self) -> (Option<Duration>, Option<u64>) {
        let fast = self.config.thresholds.fast_bandwidth;
        match &self.store {
            Store::Window { items, .. } => {
                let rtts: Vec<f64> = items
                    .iter()
                    .filter_map(|s| s.obs.rtt.map(|r| r.as_nanos() as f64))
                    .collect();
                let bws: Vec<f64> = items
                    .iter()
                    .filter_map(|s| usable_bandwidth(s.obs.bandwidth, fast).map(|b| b as f64))
                    .collect();
                (
                    median(rtts).map(|n| Duration::from_nanos(n as u64)),
                    median(bws).map(|b| b as u64),
                )
            }
            Store::Ewma(e) => (
                e.log_rtt.map(|x| Duration::from_nanos(x.exp() as u64)),
                e.log_bw.map(|x| x.exp() as u64),
            ),
        }
    }

    /// Evaluates the evidence at `now` and possibly switches. Call once per period.
    pub fn decide(&mut self, now: Instant) -> Decision {
        self.expire(now);
        let previous = self.mode;
        let (mut confidences, mut samples) = self.confidences();
        // A change point restarts the history only when the window's vote would not switch
        // anyway, and never while forced: the forced mode is not evidence, and restarting
        // every period would leave two samples when the force is cleared.
        let mut change_point = false;
        if self.forced.is_none()
            && let Some(m) = self.change_point()
            && m != self.mode
            && confidences[idx(m)] < self.config.switch_confidence
        {
            self.restart_from_recent();
            change_point = true;
            (confidences, samples) = self.confidences();
        }
        // Ties go to the current mode, then to the fixed order.
        let mut candidate = self.mode;
        for m in Mode::ALL {
            if confidences[idx(m)] > confidences[idx(candidate)] {
                candidate = m;
            }
        }
        let confidence = confidences[idx(candidate)];
        let reason = if let Some(f) = self.forced {
            self.mode = f;
            Reason::Forced
        } else if samples == 0 {
            Reason::NoData
        } else if candidate == self.mode {
            Reason::Held
        } else if samples < self.config.min_samples {
            Reason::Warmup
        } else if confidence >= self.config.switch_confidence {
            self.mode = candidate;
            if change_point {
                Reason::ChangePoint
            } else {
                Reason::Switched
            }
        } else {
            Reason::Uncertain
        };
        let (rtt, bandwidth) = self.estimate();
        let d = Decision {
            at: now,
            mode: self.mode,
            previous,
            candidate,
            confidence,
            confidences,
            rtt,
            bandwidth,
            samples,
            source: if samples == 0 { None } else { self.last_source },
            reason,
            thresholds: self.config.thresholds,
            switch_confidence: self.config.switch_confidence,
        };
        if d.changed() {
            tracing::info!(target: "amst_detect", decision = %d, "mode changed");
        } else {
            tracing::debug!(target: "amst_detect", decision = %d, "mode decision");
        }
        d
    }

    fn expire(&mut self, now: Instant) {
        let Some(max_age) = self.config.max_sample_age else {
            return;
        };
        let old = |s: &Stamped| now.saturating_duration_since(s.at) > max_age;
        while self.recent.front().is_some_and(old) {
            self.recent.pop_front();
        }
        let stale = self
            .last_at
            .is_some_and(|t| now.saturating_duration_since(t) > max_age);
        match &mut self.store {
            Store::Window { items, .. } => {
                while items.front().is_some_and(old) {
                    items.pop_front();
                }
            }
            Store::Ewma(_) if stale => self.reset(),
            Store::Ewma(_) => {}
        }
    }

    /// Weighted vote shares and the number of observations behind them.
    fn confidences(&self) -> ([f64; 3], usize) {
        match &self.store {
            Store::Window { items, .. } => {
                let mut c = [0.0; 3];
                for s in items {
                    let v = self.vote(&s.obs);
                    if let Some(m) = v.mode {
                        c[idx(m)] += v.weight;
                    }
                }
                let n = items.len();
                if n > 0 {
                    c.iter_mut().for_each(|x| *x /= n as f64);
                }
                (c, n)
            }
            Store::Ewma(e) => (e.votes, e.samples),
        }
    }

    /// The seed's rules, with each threshold moved by the hysteresis band so that staying
    /// in the current mode is easier than entering it.
    fn vote(&self, obs: &Observation) -> Vote {
        let t = &self.config.thresholds;
        let widen = 1.0 + self.config.hysteresis;
        let cur = self.mode;
        let scale = |d: Duration, f: f64| d.mul_f64(f);
        let dc_rtt = if cur == Mode::Datacenter {
            scale(t.datacenter_max_rtt, widen)
        } else {
            scale(t.datacenter_max_rtt, 1.0 / widen)
        };
        let inet_rtt = if cur == Mode::Internet {
            scale(t.internet_min_rtt, 1.0 / widen)
        } else {
            scale(t.internet_min_rtt, widen)
        };
        let fast = if cur == Mode::Internet {
            t.fast_bandwidth as f64 * widen
        } else {
            t.fast_bandwidth as f64 / widen
        };
        let bw = usable_bandwidth(obs.bandwidth, fast as u64);
        let full = |m| Vote {
            mode: Some(m),
            weight: 1.0,
        };
        if obs.rtt.is_some_and(|r| r > inet_rtt) {
            return full(Mode::Internet);
        }
        if bw.is_some_and(|b| (b as f64) < fast) {
            return full(Mode::Internet);
        }
        let Some(rtt) = obs.rtt else {
            // Fast bandwidth without an RTT cannot tell datacenter from hybrid.
            return Vote {
                mode: None,
                weight: 0.0,
            };
        };
        let m = if rtt < dc_rtt {
            Mode::Datacenter
        } else {
            Mode::Hybrid
        };
        Vote {
            mode: Some(m),
            weight: if bw.is_some() {
                1.0
            } else {
                self.config.rtt_only_weight
            },
        }
    }

    /// Whether the newest observation lies firmly in a mode other than the one in effect
    /// (and no mode is forced): a change point may be one observation away.
    pub fn change_pending(&self) -> bool {
        self.forced.is_none()
            && self
                .recent
                .back()
                .and_then(|s| self.firm(&s.obs))
                .is_some_and(|m| m != self.mode())
    }

    /// The mode every one of the newest `step_samples` observations lies firmly in, if any.
    fn change_point(&self) -> Option<Mode> {
        if self.recent.len() < self.config.step_samples {
            return None;
        }
        let mut agreed = None;
        for s in &self.recent {
            let m = self.firm(&s.obs)?;
            if agreed.is_some_and(|a| a != m) {
                return None;
            }
            agreed = Some(m);
        }
        agreed
    }

    /// The mode an observation lies in by at least `step_margin` past every threshold.
    /// Datacenter and hybrid are never firm without a bandwidth sample.
    fn firm(&self, obs: &Observation) -> Option<Mode> {
        let t = &self.config.thresholds;
        let k = self.config.step_margin;
        let fast_hi = t.fast_bandwidth as f64 * k;
        let fast_lo = t.fast_bandwidth as f64 / k;
        if obs.rtt.is_some_and(|r| r > t.internet_min_rtt.mul_f64(k)) {
            return Some(Mode::Internet);
        }
        let bw = obs.bandwidth?;
        if !bw.lower_bound && (bw.bytes_per_sec as f64) < fast_lo {
            return Some(Mode::Internet);
        }
        let rtt = obs.rtt?;
        if (bw.bytes_per_sec as f64) < fast_hi {
            return None;
        }
        if rtt < t.datacenter_max_rtt.div_f64(k) {
            Some(Mode::Datacenter)
        } else if rtt > t.datacenter_max_rtt.mul_f64(k) && rtt < t.internet_min_rtt.div_f64(k) {
            Some(Mode::Hybrid)
        } else {
            None
        }
    }

    fn restart_from_recent(&mut self) {
        let recent: Vec<Stamped> = self.recent.iter().copied().collect();
        let source = self.last_source;
        let last_at = self.last_at;
        self.reset();
        // A firm sample is past every hysteresis edge (step_margin ≥ 1 + hysteresis is
        // validated), so it votes for its mode whatever the current mode is.
        for s in recent {
            self.observe(s.at, s.obs);
        }
        self.last_source = source;
        self.last_at = last_at;
    }
}

/// A bandwidth usable as evidence: measured, or a lower bound that already reaches `fast`.
fn usable_bandwidth(bw: Option<Bandwidth>, fast: u64) -> Option<u64> {
    bw.filter(|b| !b.lower_bound || b.bytes_per_sec >= fast)
        .map(|b| b.bytes_per_sec)
}

fn ln_nanos(d: Duration) -> f64 {
    (d.as_nanos().max(1) as f64).ln()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}
