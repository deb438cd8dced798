//! Configuration of the classifier and of the probing loop, with the seed's defaults.

use std::time::Duration;

use amst_core::{Error, Mode, Result};

use crate::rate::RateProbeConfig;

/// One gigabit per second, in bytes per second (the unit of [`amst_core::TransportMetrics`]).
pub const GBIT_PER_SEC: u64 = 125_000_000;

/// The region boundaries, from the AMST v3 seed:
/// datacenter is RTT < 10 ms and bandwidth ≥ 1 Gbit/s; internet is RTT > 50 ms or bandwidth
/// < 1 Gbit/s; hybrid is everything else (10–50 ms at ≥ 1 Gbit/s).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// RTT strictly below this (with enough bandwidth) is datacenter.
    pub datacenter_max_rtt: Duration,
    /// RTT strictly above this is internet, whatever the bandwidth.
    pub internet_min_rtt: Duration,
    /// Bandwidth in bytes per second at or above which a path is fast; below it is internet.
    pub fast_bandwidth: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            datacenter_max_rtt: Duration::from_millis(10),
            internet_min_rtt: Duration::from_millis(50),
            fast_bandwidth: GBIT_PER_SEC,
        }
    }
}

/// How the classifier remembers past samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum History {
    /// The last `n` observations; estimates are medians, confidence is the share of votes.
    Window(usize),
    /// Exponentially weighted: estimates are EWMAs (in log space, so that one outlier
    /// cannot drag a 0.1 ms estimate to 10 ms), and confidence is an EWMA of the votes.
    Ewma {
        /// Weight of the newest observation, in (0, 1].
        alpha: f64,
    },
}

impl History {
    /// The EWMA whose memory matches a window of `n` samples (`alpha = 2 / (n + 1)`).
    pub fn ewma_like_window(n: usize) -> History {
        History::Ewma {
            alpha: 2.0 / (n as f64 + 1.0),
        }
    }
}

impl Default for History {
    fn default() -> Self {
        History::Window(10)
    }
}

/// Everything the sans-IO [`Classifier`](crate::Classifier) needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierConfig {
    /// Region boundaries.
    pub thresholds: Thresholds,
    /// Window or EWMA; default a window of 10 observations.
    pub history: History,
    /// Relative width of the dead band around each threshold (default 0.2): to leave the
    /// current mode, a sample must be past the threshold by this factor (RTT 12 ms, not
    /// 10.01 ms, leaves datacenter; 8.3 ms, not 9.99 ms, enters it).
    pub hysteresis: f64,
    /// Confidence a different mode needs before the classifier switches (the seed's 0.7).
    pub switch_confidence: f64,
    /// Observations needed before the first switch away from `initial_mode` (default 2).
    pub min_samples: usize,
    /// The mode reported before there is evidence (default hybrid, the middle ground that
    /// keeps both paths usable).
    pub initial_mode: Mode,
    /// Weight of a vote that has no usable bandwidth sample (default 0.75). Without
    /// bandwidth, "RTT > 50 ms → internet" is still certain, but datacenter and hybrid are
    /// guesses: a slow link can have a short RTT. At 0.75 a unanimous RTT-only window can
    /// still switch (0.75 ≥ 0.7), a single dissenting sample stops it.
    pub rtt_only_weight: f64,
    /// Change-point detection: when the last `step_samples` observations all fall firmly
    /// in one other mode, older history is discarded, so that a real step in the path is
    /// followed within `step_samples` periods instead of the window's 7-of-10.
    pub step_samples: usize,
    /// How far past a threshold (as a factor, default 1.5) a sample must be to count as
    /// firm for change-point detection: RTT < 6.7 ms or > 75 ms, bandwidth ≥ 1.5 Gbit/s or
    /// < 667 Mbit/s with the default thresholds.
    pub step_margin: f64,
    /// Observations older than this are forgotten (default: never). Useful when samples
    /// arrive irregularly, e.g. only while a transport exists.
    pub max_sample_age: Option<Duration>,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            thresholds: Thresholds::default(),
            history: History::default(),
            hysteresis: 0.2,
            switch_confidence: 0.7,
            min_samples: 2,
            initial_mode: Mode::Hybrid,
            rtt_only_weight: 0.75,
            step_samples: 2,
            step_margin: 1.5,
            max_sample_age: None,
        }
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Config {
        field,
        reason: reason.into(),
    }
}

impl ClassifierConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let t = &self.thresholds;
        if t.datacenter_max_rtt.is_zero() || t.datacenter_max_rtt >= t.internet_min_rtt {
            return Err(bad(
                "thresholds.datacenter_max_rtt",
                format!(
                    "is {:?}; must be > 0 and below internet_min_rtt ({:?})",
                    t.datacenter_max_rtt, t.internet_min_rtt
                ),
            ));
        }
        if t.fast_bandwidth == 0 {
            return Err(bad("thresholds.fast_bandwidth", "is 0; must be > 0"));
        }
        match self.history {
            History::Window(0) => return Err(bad("history", "window of 0 samples")),
            History::Ewma { alpha } if !(alpha > 0.0 && alpha <= 1.0) => {
                return Err(bad("history", format!("EWMA alpha {alpha} not in (0, 1]")));
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.hysteresis) {
            return Err(bad(
                "hysteresis",
                format!("is {}; must be in [0, 1)", self.hysteresis),
            ));
        }
        if !(self.switch_confidence > 0.0 && self.switch_confidence <= 1.0) {
            return Err(bad(
                "switch_confidence",
                format!("is {}; must be in (0, 1]", self.switch_confidence),
            ));
        }
        if !(0.0..=1.0).contains(&self.rtt_only_weight) {
            return Err(bad(
                "rtt_only_weight",
                format!("is {}; must be in [0, 1]", self.rtt_only_weight),
            ));
        }
        if self.min_samples == 0 {
            return Err(bad("min_samples", "is 0; must be ≥ 1"));
        }
        if self.step_samples == 0 {
            return Err(bad("step_samples", "is 0; must be ≥ 1"));
        }
        if self.step_margin.is_nan() || self.step_margin < 1.0 + self.hysteresis {
            return Err(bad(
                "step_margin",
                format!(
                    "is {}; must be ≥ 1 + hysteresis ({}), or noise inside the dead band would reset the history",
                    self.step_margin,
                    1.0 + self.hysteresis
                ),
            ));
        }
        Ok(())
    }
}

/// The active probe's budget. Probes run only in periods when the transport was idle.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    /// Run active probes when idle (default true). When false, an idle link keeps its last
    /// classification.
    pub enabled: bool,
    /// Probe bytes per period as a fraction of the measured bandwidth × period (default
    /// 0.01, i.e. 1 %). The one RTT ping per period is always allowed.
    pub max_fraction: f64,
    /// Burst size before any bandwidth has been measured (default 16 KiB): small enough to
    /// be harmless on any link, large enough to give a first rate to scale from.
    pub bootstrap_burst: u64,
    /// Upper bound of one burst (default 4 MiB; 3.4 ms at 10 Gbit/s).
    pub max_burst: u64,
    /// Bursts smaller than this measure nothing useful; below it only the RTT ping runs
    /// (default 4 KiB).
    pub min_burst: u64,
    /// A probe that has not answered after this long is abandoned for the period
    /// (default 2 s, capped at the period).
    pub timeout: Duration,
    /// Measure the path's rate once per path, in the first idle period on it (at start, and
    /// after the transport was swapped or the RTT moved): trains that grow until two agree,
    /// within this configuration's byte and time bounds (the time also capped at the
    /// period). A measurement that converged is a real rate, remembered for the path and
    /// used as evidence (slow as well as fast); later idle periods send only the 1 % trains.
    /// `None` (the old behaviour): only the 1 % trains, whose rates are lower bounds.
    /// Skipped when the ping alone already shows RTT > the internet threshold.
    pub rate: Option<RateProbeConfig>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            enabled: true,
            max_fraction: 0.01,
            bootstrap_burst: 16 * 1024,
            max_burst: 4 * 1024 * 1024,
            min_burst: 4 * 1024,
            timeout: Duration::from_secs(2),
            rate: Some(RateProbeConfig::default()),
        }
    }
}

/// The shortest detection period the loop accepts.
pub const MIN_PERIOD: Duration = Duration::from_millis(100);

/// Configuration of the whole detector: the classifier, the period and the probes.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectorConfig {
    /// The classifier's thresholds, history and hysteresis.
    pub classifier: ClassifierConfig,
    /// How often the loop samples and decides (default 5 s, as in the seed; ≥ 100 ms).
    pub period: Duration,
    /// The loop's first [`startup_samples`](Self::startup_samples) periods are this short
    /// (default 200 ms, never longer than `period`), so that a new session is classified
    /// within a second rather than after two full periods.
    pub startup_period: Duration,
    /// Periods at the start that use `startup_period` (default 5).
    pub startup_samples: usize,
    /// A period in which the transport moved at least this many payload bytes counts as
    /// busy: its passive RTT and delivery rate are fresh and no probe runs (default 64 KiB).
    pub busy_bytes: u64,
    /// Active probing when idle.
    pub probe: ProbeConfig,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            classifier: ClassifierConfig::default(),
            period: Duration::from_secs(5),
            startup_period: Duration::from_millis(200),
            startup_samples: 5,
            busy_bytes: 64 * 1024,
            probe: ProbeConfig::default(),
        }
    }
}

impl DetectorConfig {
    /// Checks every field, the classifier's included.
    pub fn validate(&self) -> Result<()> {
        self.classifier.validate()?;
        if self.period < MIN_PERIOD {
            return Err(bad(
                "period",
                format!("is {:?}; must be ≥ {MIN_PERIOD:?}", self.period),
            ));
        }
        if self.startup_period < MIN_PERIOD {
            return Err(bad(
                "startup_period",
                format!("is {:?}; must be ≥ {MIN_PERIOD:?}", self.startup_period),
            ));
        }
        let p = &self.probe;
        if let Some(r) = &p.rate {
            r.validate()?;
        }
        if !(p.max_fraction >= 0.0 && p.max_fraction <= 1.0) {
            return Err(bad(
                "probe.max_fraction",
                format!("is {}; must be in [0, 1]", p.max_fraction),
            ));
        }
        if p.min_burst > p.max_burst {
            return Err(bad(
                "probe.min_burst",
                format!(
                    "is {}; must be ≤ probe.max_burst ({})",
                    p.min_burst, p.max_burst
                ),
            ));
        }
        if p.timeout.is_zero() {
            return Err(bad("probe.timeout", "is 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds_and_validate() {
        let c = DetectorConfig::default();
        c.validate().unwrap();
        assert_eq!(c.period, Duration::from_secs(5));
        assert_eq!(c.classifier.switch_confidence, 0.7);
        assert_eq!(c.classifier.history, History::Window(10));
        assert_eq!(c.probe.max_fraction, 0.01);
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut c = DetectorConfig {
            period: Duration::from_millis(50),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("period"));
        c.period = MIN_PERIOD;
        c.validate().unwrap();
        c.classifier.history = History::Ewma { alpha: 0.0 };
        assert!(c.validate().unwrap_err().to_string().contains("history"));
        c.classifier.history = History::ewma_like_window(10);
        c.classifier.step_margin = 1.1;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("step_margin")
        );
        c.classifier.step_margin = 1.5;
        c.classifier.thresholds.datacenter_max_rtt = Duration::from_millis(60);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("datacenter_max_rtt")
        );
    }
}
