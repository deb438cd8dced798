//! Congestion-avoidance window growth: the part of a loss-based controller that says how
//! cwnd grows after slow start and how far it falls on a congestion event.
//!
//! [`CubicGrowth`] is RFC 9438's window function; [`RenoGrowth`] is RFC 5681/9002's AIMD,
//! kept as a second implementation so that the composition stays honest (and for contrast in
//! the simulator).

use std::fmt;
use std::time::{Duration, Instant};

/// How the window grows in congestion avoidance and shrinks on congestion. The slow-start
/// part and the recovery bookkeeping live in [`super::LossBased`]; this trait only sees
/// window sizes in bytes (as `f64`, so fractional growth per ack is not lost).
pub trait WindowGrowth: Clone + fmt::Debug + Send + Sync + 'static {
    /// A new ack of `bytes_acked` arrived in congestion avoidance (not in recovery, not
    /// application-limited). Returns the new cwnd.
    fn on_ack(
        &mut self,
        now: Instant,
        cwnd: f64,
        bytes_acked: u64,
        srtt: Duration,
        mss: f64,
    ) -> f64;

    /// A congestion event (loss or ECN-CE) with cwnd at `cwnd` before the reduction. Returns
    /// the reduced cwnd, which is also the new ssthresh.
    fn on_congestion_event(&mut self, cwnd: f64, mss: f64) -> f64;

    /// Slow start ended at `cwnd` without a congestion event (HyStart++).
    fn on_slow_start_exit(&mut self, cwnd: f64);

    /// The sender was application-limited for `idle`; time-based growth should not count it.
    fn on_app_limited_period(&mut self, idle: Duration);

    /// The multiplicative-decrease factor, for reports.
    fn beta(&self) -> f64;
}

/// RFC 9438 §5: "C SHOULD be set to 0.4".
pub const CUBIC_C: f64 = 0.4;
/// RFC 9438 §4.6: "β_cubic SHOULD be set to 0.7".
pub const CUBIC_BETA: f64 = 0.7;

/// CUBIC's window function (RFC 9438 §4.2–§4.7), in bytes.
///
/// Internally the RFC's segment-based formulas are scaled by the datagram size: with
/// `W` in bytes, `W_cubic(t) = C·MSS·(t−K)³ + W_max` and `K = ∛((W_max − cwnd_epoch)/(C·MSS))`.
#[derive(Clone, Debug, PartialEq)]
pub struct CubicGrowth {
    c: f64,
    beta: f64,
    fast_convergence: bool,
    /// `W_max`: the window just before the last reduction (bytes).
    w_max: f64,
    /// `cwnd_prior`: cwnd when ssthresh was last set (bytes).
    cwnd_prior: f64,
    /// `t_epoch`: start of the current congestion-avoidance stage, set on its first ack.
    t_epoch: Option<Instant>,
    /// `cwnd_epoch`: cwnd at `t_epoch` (bytes).
    cwnd_epoch: f64,
    /// `K` in seconds.
    k: f64,
    /// `W_est`: the Reno-friendly estimate (bytes).
    w_est: f64,
}

impl Default for CubicGrowth {
    fn default() -> Self {
        Self::new(CUBIC_C, CUBIC_BETA, true)
    }
}

impl CubicGrowth {
    /// A window function with the given `C`, `β_cubic` and fast convergence on or off.
    pub fn new(c: f64, beta: f64, fast_convergence: bool) -> Self {
        Self {
            c,
            beta,
            fast_convergence,
            w_max: 0.0,
            cwnd_prior: 0.0,
            t_epoch: None,
            cwnd_epoch: 0.0,
            k: 0.0,
            w_est: 0.0,
        }
    }

    /// `W_max` in bytes.
    pub fn w_max(&self) -> f64 {
        self.w_max
    }

    /// `cwnd_prior` in bytes.
    pub fn cwnd_prior(&self) -> f64 {
        self.cwnd_prior
    }

    /// `t_epoch`, once the current congestion-avoidance stage has seen its first ack.
    pub fn epoch_start(&self) -> Option<Instant> {
        self.t_epoch
    }

    /// `cwnd_epoch` in bytes.
    pub fn cwnd_epoch(&self) -> f64 {
        self.cwnd_epoch
    }

    /// `K` in seconds.
    pub fn k(&self) -> f64 {
        self.k
    }

    /// `W_est` in bytes.
    pub fn w_est(&self) -> f64 {
        self.w_est
    }

    /// RFC 9438 §4.2, Figure 1: "W_cubic(t) = C * (t - K)^3 + W_max", in bytes.
    pub fn w_cubic(&self, t: f64, mss: f64) -> f64 {
        self.c * mss * (t - self.k).powi(3) + self.w_max
    }

    /// RFC 9438 §4.3: "alpha_cubic = 3 * (1 - β_cubic) / (1 + β_cubic)" until "W_est >=
    /// cwnd_prior", then 1.
    fn alpha(&self) -> f64 {
        if self.w_est >= self.cwnd_prior {
            1.0
        } else {
            3.0 * (1.0 - self.beta) / (1.0 + self.beta)
        }
    }

    fn start_epoch(&mut self, now: Instant, cwnd: f64, mss: f64) {
        self.t_epoch = Some(now);
        self.cwnd_epoch = cwnd;
        // RFC 9438 §4.3: "W_est is set equal to cwnd_epoch at the start of the congestion
        // avoidance stage."
        self.w_est = cwnd;
        // RFC 9438 §4.2, Figure 2: "K = cubic_root((W_max - cwnd_epoch) / C)", "where
        // cwnd_epoch is the cwnd at the beginning of the current congestion avoidance stage".
        self.k = ((self.w_max - cwnd) / (self.c * mss)).cbrt();
    }
}

impl WindowGrowth for CubicGrowth {
    fn on_ack(
        &mut self,
        now: Instant,
        cwnd: f64,
        bytes_acked: u64,
        srtt: Duration,
        mss: f64,
    ) -> f64 {
        let t_epoch = match self.t_epoch {
            Some(t) => t,
            None => {
                self.start_epoch(now, cwnd, mss);
                now
            }
        };
        // "t is the elapsed time in seconds from the beginning of the current congestion
        // avoidance stage, that is, t = t_current - t_epoch".
        let t = now.saturating_duration_since(t_epoch).as_secs_f64();

        // RFC 9438 §4.3, Figure 4: "W_est = W_est + alpha_cubic * segments_acked / cwnd"
        // (in bytes: segments_acked = bytes_acked / MSS and the result is scaled by MSS).
        self.w_est += self.alpha() * bytes_acked as f64 * mss / cwnd;

        // "When receiving a new ACK in congestion avoidance (where cwnd could be greater than
        // or less than W_max), CUBIC checks whether W_cubic(t) is less than W_est. If so,
        // CUBIC is in the Reno-friendly region and cwnd SHOULD be set to W_est at each
        // reception of a new ACK."
        if self.w_cubic(t, mss) < self.w_est {
            return self.w_est.max(cwnd);
        }

        // RFC 9438 §4.2, Figure 3: target is W_cubic(t + RTT) clamped to [cwnd, 1.5 × cwnd]:
        // "cwnd if W_cubic(t + RTT) < cwnd; 1.5 × cwnd if W_cubic(t + RTT) > 1.5 × cwnd;
        // W_cubic(t + RTT) otherwise."
        let target = self
            .w_cubic(t + srtt.as_secs_f64(), mss)
            .clamp(cwnd, 1.5 * cwnd);
        // §4.4/§4.5 (concave and convex regions): "cwnd MUST be incremented by
        // (target - cwnd) / cwnd for each received new ACK", per segment acknowledged.
        cwnd + (target - cwnd) * (bytes_acked as f64 / cwnd)
    }

    fn on_congestion_event(&mut self, cwnd: f64, _mss: f64) -> f64 {
        // RFC 9438 §4.7 (fast convergence): "if (cwnd < W_max AND fast convergence
        // enabled) { W_max = cwnd * (1 + β_cubic) / 2 } else { W_max = cwnd }", evaluated with
        // the cwnd from just before this reduction.
        self.w_max = if self.fast_convergence && cwnd < self.w_max {
            cwnd * (1.0 + self.beta) / 2.0
        } else {
            cwnd
        };
        // RFC 9438 §4.6: "cwnd_prior = cwnd" and "ssthresh = cwnd * β_cubic" (the RFC's
        // alternative to flight_size; controllers using cwnd "MUST use other measures to
        // prevent cwnd from growing when the volume of bytes in flight is smaller than
        // cwnd", which LossBased does with its application-limited check).
        self.cwnd_prior = cwnd;
        // A new congestion-avoidance stage begins once recovery ends.
        self.t_epoch = None;
        cwnd * self.beta
    }

    fn on_slow_start_exit(&mut self, cwnd: f64) {
        // Leaving slow start without a loss (HyStart++): there is no earlier maximum to
        // return to, so the plateau is the current window and growth starts convex (K = 0),
        // as Linux's tcp_cubic does when it has no last_max_cwnd.
        self.w_max = cwnd;
        self.cwnd_prior = cwnd;
        self.t_epoch = None;
    }

    fn on_app_limited_period(&mut self, idle: Duration) {
        // Time spent application-limited does not count towards t, so that a flow returning
        // from a pause resumes on the curve where it left it (Linux tcp_cubic shifts
        // epoch_start on CA_EVENT_TX_START for the same reason).
        if let Some(t) = self.t_epoch.as_mut() {
            *t += idle;
        }
    }

    fn beta(&self) -> f64 {
        self.beta
    }
}

/// Reno's AIMD (RFC 5681 §3.1, RFC 9002 §7.3.3): one datagram per window per round trip,
/// halving on congestion.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenoGrowth;

impl WindowGrowth for RenoGrowth {
    fn on_ack(
        &mut self,
        _now: Instant,
        cwnd: f64,
        bytes_acked: u64,
        _srtt: Duration,
        mss: f64,
    ) -> f64 {
        // RFC 9002 §7.3.3: "the congestion window is increased by one maximum datagram size
        // for each congestion window acknowledged".
        cwnd + mss * bytes_acked as f64 / cwnd
    }

    fn on_congestion_event(&mut self, cwnd: f64, _mss: f64) -> f64 {
        // RFC 9002 §7.3.2: kLossReductionFactor = 0.5.
        cwnd * 0.5
    }

    fn on_slow_start_exit(&mut self, _cwnd: f64) {}

    fn on_app_limited_period(&mut self, _idle: Duration) {}

    fn beta(&self) -> f64 {
        0.5
    }
}
