//! The classic loss-based controller: slow start (HyStart++), recovery epochs, ssthresh,
//! spurious-loss undo, application-limited handling and pacing, composed with a
//! [`WindowGrowth`] for congestion avoidance.

use std::time::{Duration, Instant};

use super::growth::WindowGrowth;
use crate::slow_start::{HyStart, SlowStartAction, SlowStartPhase};
use crate::{Ack, CongestionController, ControllerMetrics, Loss, Phase};

/// Parameters shared by every loss-based controller.
#[derive(Clone, Debug, PartialEq)]
pub struct LossBasedConfig {
    /// Bytes per datagram (SMSS).
    pub max_datagram_size: u64,
    /// Initial window in bytes; `None` for RFC 9002 §7.2's
    /// `min(10 * max_datagram_size, max(14720, 2 * max_datagram_size))`.
    pub initial_window: Option<u64>,
    /// Minimum window in datagrams (RFC 9002's kMinimumWindow is 2).
    pub minimum_window_packets: u64,
    /// Use HyStart++ in the initial slow start (RFC 9406). Off means classic slow start.
    pub hystart: bool,
    /// The sender paces (selects HyStart++'s `L`).
    pub paced: bool,
    /// The RTT assumed before the first sample (RFC 9002 §6.2.2's kInitialRtt is 333 ms).
    pub initial_rtt: Duration,
    /// Pacing rate as a multiple of cwnd/srtt in slow start (Linux's default is 2.0).
    pub pacing_gain_slow_start: f64,
    /// Pacing rate as a multiple of cwnd/srtt otherwise (Linux's default is 1.2).
    pub pacing_gain_avoidance: f64,
}

impl Default for LossBasedConfig {
    fn default() -> Self {
        Self::with_mss(1200)
    }
}

impl LossBasedConfig {
    /// The defaults for a given datagram size.
    pub fn with_mss(max_datagram_size: u64) -> Self {
        Self {
            max_datagram_size,
            initial_window: None,
            minimum_window_packets: 2,
            hystart: true,
            paced: true,
            initial_rtt: Duration::from_millis(333),
            pacing_gain_slow_start: 2.0,
            pacing_gain_avoidance: 1.2,
        }
    }

    fn initial_window_bytes(&self) -> u64 {
        let mss = self.max_datagram_size;
        self.initial_window
            .unwrap_or_else(|| (10 * mss).min(14_720.max(2 * mss)))
    }
}

/// A recovery epoch (RFC 9002 §7.3.2): one reduction per round trip of losses.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Recovery {
    /// `congestion_recovery_start_time`.
    start: Instant,
    /// Bytes sent when recovery began; once more than this much has been resolved, an ack
    /// for a packet sent during recovery has arrived and recovery is over.
    end_marker: u64,
}

/// The state that a spurious-loss undo restores.
#[derive(Clone, Debug, PartialEq)]
struct Snapshot<G> {
    cwnd: f64,
    ssthresh: u64,
    growth: G,
    slow_start: HyStart,
}

/// A loss-based controller: slow start, then `G`'s window growth. See [`super::Cubic`].
#[derive(Clone, Debug)]
pub struct LossBased<G> {
    config: LossBasedConfig,
    growth: G,
    slow_start: HyStart,
    cwnd: f64,
    ssthresh: u64,
    recovery: Option<Recovery>,
    /// Running totals for round and recovery bookkeeping.
    sent_total: u64,
    resolved_total: u64,
    bytes_in_flight: u64,
    srtt: Option<Duration>,
    rttvar: Duration,
    min_rtt: Option<Duration>,
    latest_rtt: Option<Duration>,
    /// Since when the sender has been application-limited, if it is.
    app_limited_since: Option<Instant>,
    undo: Option<Box<Snapshot<G>>>,
    congestion_events: u64,
}

impl<G: WindowGrowth> LossBased<G> {
    /// A controller with the given window growth.
    pub fn with_growth(config: LossBasedConfig, growth: G) -> Self {
        let cwnd = config.initial_window_bytes() as f64;
        let slow_start = HyStart::new(config.paced);
        Self {
            config,
            growth,
            slow_start,
            cwnd,
            ssthresh: u64::MAX,
            recovery: None,
            sent_total: 0,
            resolved_total: 0,
            bytes_in_flight: 0,
            srtt: None,
            rttvar: Duration::ZERO,
            min_rtt: None,
            latest_rtt: None,
            app_limited_since: None,
            undo: None,
            congestion_events: 0,
        }
    }

    /// The window-growth part (for example CUBIC's `W_max`, `K`, `W_est`).
    pub fn growth(&self) -> &G {
        &self.growth
    }

    /// The slow-start part's phase.
    pub fn slow_start_phase(&self) -> SlowStartPhase {
        self.slow_start.phase()
    }

    /// The slow-start threshold in bytes (`u64::MAX` before the first exit).
    pub fn ssthresh(&self) -> u64 {
        self.ssthresh
    }

    /// Whether a recovery epoch is in progress.
    pub fn in_recovery(&self) -> bool {
        self.recovery.is_some()
    }

    /// How many window reductions have happened.
    pub fn congestion_events(&self) -> u64 {
        self.congestion_events
    }

    /// The parameters.
    pub fn config(&self) -> &LossBasedConfig {
        &self.config
    }

    fn mss(&self) -> f64 {
        self.config.max_datagram_size as f64
    }

    fn minimum_window(&self) -> f64 {
        self.config.minimum_window_packets as f64 * self.config.max_datagram_size as f64
    }

    fn in_slow_start(&self) -> bool {
        (self.cwnd as u64) < self.ssthresh
    }

    fn rtt(&self) -> Duration {
        self.srtt.unwrap_or(self.config.initial_rtt)
    }

    fn congestion_event(&mut self, now: Instant) {
        self.undo = Some(Box::new(Snapshot {
            cwnd: self.cwnd,
            ssthresh: self.ssthresh,
            growth: self.growth.clone(),
            slow_start: self.slow_start.clone(),
        }));
        // RFC 9002 §7.3.2: "the sender enters a recovery period and reduces its congestion
        // window"; the epoch ends when a packet sent after its start is acknowledged.
        self.recovery = Some(Recovery {
            start: now,
            end_marker: self.sent_total,
        });
        // RFC 9406 §4.2: "If loss or ECN-marking is observed anytime during standard slow
        // start or CSS, enter congestion avoidance".
        self.slow_start.on_congestion();
        // Reduce from the whole-byte window the transport saw, so that the result is
        // exactly β × cwnd().
        let reduced = self
            .growth
            .on_congestion_event(self.cwnd.floor(), self.mss());
        // RFC 9438 §4.6: "cwnd = max(ssthresh, 2)  // reduction on loss, cwnd >= 2 SMSS".
        self.cwnd = reduced.max(self.minimum_window());
        self.ssthresh = self.cwnd as u64;
        self.congestion_events += 1;
    }

    fn is_app_limited(&self, ack: &Ack) -> bool {
        self.app_limited_since.is_some() || ack.rate_sample.is_some_and(|rs| rs.is_app_limited)
    }
}

impl<G: WindowGrowth> CongestionController for LossBased<G> {
    fn on_packet_sent(&mut self, now: Instant, bytes: u64, bytes_in_flight: u64) {
        self.sent_total = self.sent_total.saturating_add(bytes);
        self.bytes_in_flight = bytes_in_flight;
        // The window is full again: the application-limited period is over.
        if let Some(since) = self.app_limited_since
            && bytes_in_flight.saturating_add(self.config.max_datagram_size) > self.cwnd as u64
        {
            self.app_limited_since = None;
            self.growth
                .on_app_limited_period(now.saturating_duration_since(since));
        }
    }

    fn on_ack(&mut self, now: Instant, ack: &Ack) {
        self.resolved_total = self.resolved_total.saturating_add(ack.bytes_acked);
        self.bytes_in_flight = ack.bytes_in_flight;
        if let Some(r) = self.recovery {
            if self.resolved_total <= r.end_marker {
                // RFC 9002 §7.3.2: no window growth during recovery.
                return;
            }
            self.recovery = None;
        }
        // RFC 9002 §7.8: the window does not grow while the sender is not
        // using it ("When bytes in flight is smaller than the congestion window and sending
        // is not pacing limited, the congestion window is underutilized ... the congestion
        // window SHOULD NOT be increased").
        let app_limited = self.is_app_limited(ack);
        if self.in_slow_start() {
            let mss = self.config.max_datagram_size;
            let hystart = self.config.hystart
                && self.ssthresh == u64::MAX
                && self.slow_start.phase() != SlowStartPhase::Done;
            if hystart {
                // The slow-start part counts rounds even when app-limited, but the window
                // does not grow then.
                match self.slow_start.on_ack(
                    ack.bytes_acked,
                    self.resolved_total,
                    self.sent_total,
                    mss,
                ) {
                    SlowStartAction::Grow(n) if !app_limited => self.cwnd += n as f64,
                    SlowStartAction::Grow(_) => {}
                    SlowStartAction::EnterCongestionAvoidance => {
                        // RFC 9406 §4.2: "enter congestion avoidance by setting the ssthresh
                        // to the current cwnd".
                        self.ssthresh = self.cwnd as u64;
                        self.growth.on_slow_start_exit(self.cwnd);
                    }
                }
            } else if !app_limited {
                // Classic slow start (RFC 9002 §7.3.1), used after persistent congestion:
                // RFC 9406: "An implementation SHOULD use HyStart++ only for the initial
                // slow start".
                self.cwnd = (self.cwnd + ack.bytes_acked as f64).min(self.ssthresh as f64);
            }
            return;
        }
        if app_limited {
            return;
        }
        let rtt = self.rtt();
        let mss = self.mss();
        self.cwnd = self
            .growth
            .on_ack(now, self.cwnd, ack.bytes_acked, rtt, mss)
            .max(self.minimum_window());
    }

    fn on_loss(&mut self, now: Instant, loss: &Loss) {
        self.resolved_total = self.resolved_total.saturating_add(loss.bytes_lost);
        self.bytes_in_flight = loss.bytes_in_flight;
        if loss.persistent_congestion {
            // RFC 9002 §7.6.2: "When persistent congestion is declared, the sender's
            // congestion window MUST be reduced to the minimum congestion window". RFC 9438
            // §4.8 sets ssthresh with β_cubic as for a loss.
            if self.recovery.is_none() {
                self.congestion_event(now);
            }
            self.undo = None;
            self.cwnd = self.minimum_window();
            self.recovery = None;
            return;
        }
        if loss.bytes_lost == 0 {
            return;
        }
        // RFC 9002 §7.3.2: a sender already in a recovery period stays in it and does not
        // reduce again; only losses of packets sent after the epoch began start a new one.
        if let Some(r) = self.recovery
            && loss.largest_lost_sent_at <= r.start
        {
            return;
        }
        self.congestion_event(now);
    }

    fn on_rtt_sample(&mut self, _now: Instant, rtt: Duration, ack_delay: Duration) {
        self.latest_rtt = Some(rtt);
        let min_rtt = self.min_rtt.map_or(rtt, |m| m.min(rtt));
        self.min_rtt = Some(min_rtt);
        // RFC 9002 §5.3: subtract the ack delay only when the result stays above min_rtt.
        let adjusted = if rtt >= min_rtt.saturating_add(ack_delay) {
            rtt - ack_delay
        } else {
            rtt
        };
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(adjusted);
                // Weighted as RFC 9002 §5.3 says, without overflowing on absurd samples.
                self.rttvar = self.rttvar / 4 * 3 + diff / 4;
                self.srtt = Some(srtt / 8 * 7 + adjusted / 8);
            }
        }
        // HyStart++ looks at raw samples: it wants the queue, not a smoothed estimate.
        self.slow_start.on_rtt_sample(rtt);
    }

    fn on_ecn(&mut self, now: Instant, bytes_marked: u64, bytes_in_flight: u64) {
        self.bytes_in_flight = bytes_in_flight;
        // RFC 9438 §4.6 treats an ECN-Echo like a loss; one reduction per recovery epoch.
        if bytes_marked > 0 && self.recovery.is_none() {
            self.congestion_event(now);
        }
    }

    fn on_mtu_update(&mut self, max_datagram_size: u64) {
        // Same sanity bound as BBR: no real path has datagrams over 16 MiB.
        self.config.max_datagram_size = max_datagram_size.clamp(1, crate::bbr::MAX_DATAGRAM_SIZE);
        self.cwnd = self.cwnd.max(self.minimum_window());
    }

    fn on_spurious_loss(&mut self, _now: Instant) {
        // RFC 9438 §4.9: when a congestion event turns out to be spurious, a sender may
        // restore cwnd, ssthresh, W_max, K, t_epoch and W_est to their values before it —
        // only if that does not shrink the window.
        if let Some(snap) = self.undo.take()
            && self.cwnd < snap.cwnd
        {
            self.cwnd = snap.cwnd;
            self.ssthresh = snap.ssthresh;
            self.growth = snap.growth;
            self.slow_start = snap.slow_start;
            self.recovery = None;
        }
    }

    fn on_app_limited(&mut self, now: Instant, bytes_in_flight: u64) {
        self.bytes_in_flight = bytes_in_flight;
        if self.app_limited_since.is_none() {
            self.app_limited_since = Some(now);
        }
    }

    fn cwnd(&self) -> u64 {
        (self.cwnd as u64).max(self.config.max_datagram_size)
    }

    fn pacing_rate(&self) -> f64 {
        let gain = if self.in_slow_start() {
            self.config.pacing_gain_slow_start
        } else {
            self.config.pacing_gain_avoidance
        };
        let secs = self.rtt().as_secs_f64().max(1e-6);
        (gain * self.cwnd / secs).max(1.0)
    }

    fn send_quantum(&self) -> u64 {
        // About 1 ms of data at the pacing rate, between 2 datagrams and 64 KiB, as Linux's
        // tcp_tso_autosize does.
        let mss = self.config.max_datagram_size;
        let per_ms = (self.pacing_rate() / 1000.0) as u64;
        let q = per_ms.clamp(2 * mss, (64 * 1024).max(2 * mss));
        (q / mss).max(1) * mss
    }

    fn metrics(&self) -> ControllerMetrics {
        let phase = if self.recovery.is_some() {
            Phase::Recovery
        } else if self.in_slow_start() {
            Phase::SlowStart
        } else {
            Phase::CongestionAvoidance
        };
        let bw = self.cwnd / self.rtt().as_secs_f64().max(1e-6);
        ControllerMetrics {
            phase,
            cwnd: self.cwnd(),
            pacing_rate: self.pacing_rate(),
            bottleneck_bw: bw,
            min_rtt: self.min_rtt,
            srtt: self.srtt,
            ssthresh: self.ssthresh,
        }
    }

    fn clone_box(&self) -> Box<dyn CongestionController> {
        Box::new(self.clone())
    }
}
