//! Slow start with HyStart++ (RFC 9406), as a part that a loss-based controller composes with
//! its congestion-avoidance window growth (see [`crate::cubic`]).
//!
//! The part owns only the decision "how much does cwnd grow on this ack, and is slow start
//! over"; the controller owns cwnd, ssthresh and recovery.
//!
//! Rounds are counted in bytes, not packet numbers, so the part works for any transport:
//! a round that began when `sent` bytes had been sent ends once at least that many bytes
//! have been resolved (acknowledged or declared lost). That is RFC 9406's
//! "windowEnd = SND.NXT" marker expressed without sequence numbers.

use std::time::Duration;

/// RFC 9406 §4.3: "MIN_RTT_THRESH = 4 msec".
pub const MIN_RTT_THRESH: Duration = Duration::from_millis(4);
/// RFC 9406 §4.3: "MAX_RTT_THRESH = 16 msec".
pub const MAX_RTT_THRESH: Duration = Duration::from_millis(16);
/// RFC 9406 §4.3: "MIN_RTT_DIVISOR = 8".
pub const MIN_RTT_DIVISOR: u32 = 8;
/// RFC 9406 §4.3: "N_RTT_SAMPLE = 8".
pub const N_RTT_SAMPLE: u32 = 8;
/// RFC 9406 §4.3: "CSS_GROWTH_DIVISOR = 4".
pub const CSS_GROWTH_DIVISOR: u64 = 4;
/// RFC 9406 §4.3: "CSS_ROUNDS = 5".
pub const CSS_ROUNDS: u32 = 5;
/// RFC 9406 §4.3: "L = infinity if paced, L = 8 if non-paced".
pub const L_NON_PACED: u64 = 8;

/// Where HyStart++ is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlowStartPhase {
    /// Standard (exponential) slow start.
    Exponential,
    /// RFC 9406's Conservative Slow Start, entered on an RTT increase.
    Conservative,
    /// Slow start is over; the controller is in congestion avoidance.
    Done,
}

/// What the controller should do after an ack in slow start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowStartAction {
    /// Grow cwnd by this many bytes and stay in slow start.
    Grow(u64),
    /// RFC 9406: "If CSS_ROUNDS rounds are complete, enter congestion avoidance by setting
    /// the ssthresh to the current cwnd."
    EnterCongestionAvoidance,
}

/// HyStart++ state (RFC 9406 §4.2).
#[derive(Clone, Debug, PartialEq)]
pub struct HyStart {
    phase: SlowStartPhase,
    paced: bool,
    /// `windowEnd` in resolved bytes; `None` before the first round starts.
    window_end: Option<u64>,
    last_round_min_rtt: Option<Duration>,
    current_round_min_rtt: Option<Duration>,
    rtt_sample_count: u32,
    css_baseline_min_rtt: Option<Duration>,
    css_rounds: u32,
}

impl HyStart {
    /// A fresh slow start. `paced` selects RFC 9406's `L` (unbounded when the sender paces,
    /// 8 segments per ack otherwise).
    pub fn new(paced: bool) -> Self {
        Self {
            phase: SlowStartPhase::Exponential,
            paced,
            window_end: None,
            last_round_min_rtt: None,
            current_round_min_rtt: None,
            rtt_sample_count: 0,
            css_baseline_min_rtt: None,
            css_rounds: 0,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> SlowStartPhase {
        self.phase
    }

    /// The RTT that made HyStart++ leave exponential growth, while in CSS.
    pub fn css_baseline_min_rtt(&self) -> Option<Duration> {
        self.css_baseline_min_rtt
    }

    /// RFC 9406 §4.2: "If loss or ECN-marking is observed anytime during standard slow start
    /// or CSS, enter congestion avoidance".
    pub fn on_congestion(&mut self) {
        self.phase = SlowStartPhase::Done;
    }

    /// Slow start begins again (after persistent congestion, RFC 9002 §7.6.2).
    pub fn restart(&mut self) {
        *self = Self::new(self.paced);
    }

    /// An RTT sample arrived. RFC 9406 §4.2: "keep track of the minimum observed RTT:
    /// currentRoundMinRTT = min(currentRoundMinRTT, RTT); rttSampleCount += 1".
    pub fn on_rtt_sample(&mut self, rtt: Duration) {
        if self.phase == SlowStartPhase::Done {
            return;
        }
        self.current_round_min_rtt = Some(self.current_round_min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.rtt_sample_count = self.rtt_sample_count.saturating_add(1);
        match self.phase {
            SlowStartPhase::Exponential => {
                // "For rounds where at least N_RTT_SAMPLE RTT samples have been obtained and
                // currentRoundMinRTT and lastRoundMinRTT are valid, check to see if delay
                // increase triggers slow start exit"
                if self.rtt_sample_count < N_RTT_SAMPLE {
                    return;
                }
                let (Some(current), Some(last)) =
                    (self.current_round_min_rtt, self.last_round_min_rtt)
                else {
                    return;
                };
                // "RttThresh = max(MIN_RTT_THRESH,
                //    min(lastRoundMinRTT / MIN_RTT_DIVISOR, MAX_RTT_THRESH))"
                let thresh = (last / MIN_RTT_DIVISOR).clamp(MIN_RTT_THRESH, MAX_RTT_THRESH);
                // "if (currentRoundMinRTT >= (lastRoundMinRTT + RttThresh))
                //    cssBaselineMinRtt = currentRoundMinRTT
                //    exit slow start and enter CSS"
                if current >= last + thresh {
                    self.css_baseline_min_rtt = Some(current);
                    self.phase = SlowStartPhase::Conservative;
                    self.css_rounds = 0;
                }
            }
            SlowStartPhase::Conservative => {
                // "For CSS rounds where at least N_RTT_SAMPLE RTT samples have been obtained,
                // check to see if the current round's minRTT drops below baseline
                // (cssBaselineMinRtt) indicating that slow start exit was spurious:
                //   if (currentRoundMinRTT < cssBaselineMinRtt)
                //     cssBaselineMinRtt = infinity
                //     resume slow start including HyStart++"
                if self.rtt_sample_count < N_RTT_SAMPLE {
                    return;
                }
                if let (Some(current), Some(base)) =
                    (self.current_round_min_rtt, self.css_baseline_min_rtt)
                    && current < base
                {
                    self.css_baseline_min_rtt = None;
                    self.phase = SlowStartPhase::Exponential;
                }
            }
            SlowStartPhase::Done => {}
        }
    }

    /// `bytes_acked` were acknowledged; `resolved` is the running total of bytes acked or
    /// lost, `sent` the running total of bytes sent, `mss` the datagram size. Returns how to
    /// grow the window.
    pub fn on_ack(
        &mut self,
        bytes_acked: u64,
        resolved: u64,
        sent: u64,
        mss: u64,
    ) -> SlowStartAction {
        // Round bookkeeping. RFC 9406 §4.2: "At the start of each round during standard slow
        // start and CSS, initialize the variables used to compute the last round's and
        // current round's minimum RTT: lastRoundMinRTT = currentRoundMinRTT;
        // currentRoundMinRTT = infinity; rttSampleCount = 0".
        let round_over = self.window_end.is_none_or(|end| resolved >= end);
        if round_over {
            self.window_end = Some(sent);
            self.last_round_min_rtt = self.current_round_min_rtt;
            self.current_round_min_rtt = None;
            self.rtt_sample_count = 0;
            if self.phase == SlowStartPhase::Conservative {
                self.css_rounds += 1;
                if self.css_rounds >= CSS_ROUNDS {
                    self.phase = SlowStartPhase::Done;
                    return SlowStartAction::EnterCongestionAvoidance;
                }
            }
        }
        // "cwnd = cwnd + min(N, L * SMSS)" in slow start and
        // "cwnd = cwnd + (min(N, L * SMSS) / CSS_GROWTH_DIVISOR)" in CSS.
        let limited = if self.paced {
            bytes_acked
        } else {
            bytes_acked.min(L_NON_PACED * mss)
        };
        match self.phase {
            SlowStartPhase::Conservative => SlowStartAction::Grow(limited / CSS_GROWTH_DIVISOR),
            _ => SlowStartAction::Grow(limited),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Drives one round: `n` acks of one MSS each with the given RTT, while the next
    /// round's `n` packets are sent (one round is always in flight).
    fn round(hs: &mut HyStart, sent: &mut u64, resolved: &mut u64, rtt: Duration, n: u64) {
        let mss = 1000;
        if *sent == 0 {
            *sent = n * mss;
        }
        *sent += n * mss;
        for _ in 0..n {
            *resolved += mss;
            hs.on_rtt_sample(rtt);
            let _ = hs.on_ack(mss, *resolved, *sent, mss);
        }
    }

    #[test]
    fn rtt_increase_enters_css_and_css_rounds_end_slow_start() {
        let mut hs = HyStart::new(true);
        let (mut sent, mut resolved) = (0, 0);
        for _ in 0..3 {
            round(&mut hs, &mut sent, &mut resolved, 100 * MS, 10);
        }
        assert_eq!(hs.phase(), SlowStartPhase::Exponential);
        // 100 ms / 8 = 12.5 ms threshold: 112 ms is not enough, 113 ms is.
        round(&mut hs, &mut sent, &mut resolved, 112 * MS, 10);
        assert_eq!(hs.phase(), SlowStartPhase::Exponential);
        round(&mut hs, &mut sent, &mut resolved, 126 * MS, 10);
        assert_eq!(hs.phase(), SlowStartPhase::Conservative);
        assert_eq!(hs.css_baseline_min_rtt(), Some(126 * MS));
        assert_eq!(
            hs.on_ack(1000, resolved, sent, 1000),
            SlowStartAction::Grow(250)
        );
        for _ in 0..5 {
            round(&mut hs, &mut sent, &mut resolved, 130 * MS, 10);
        }
        assert_eq!(hs.phase(), SlowStartPhase::Done);
    }

    #[test]
    fn rtt_drop_in_css_resumes_slow_start() {
        let mut hs = HyStart::new(true);
        let (mut sent, mut resolved) = (0, 0);
        round(&mut hs, &mut sent, &mut resolved, 50 * MS, 10);
        round(&mut hs, &mut sent, &mut resolved, 50 * MS, 10);
        round(&mut hs, &mut sent, &mut resolved, 60 * MS, 10);
        assert_eq!(hs.phase(), SlowStartPhase::Conservative);
        round(&mut hs, &mut sent, &mut resolved, 55 * MS, 10);
        assert_eq!(hs.phase(), SlowStartPhase::Exponential);
    }

    #[test]
    fn unpaced_growth_is_capped_at_l_segments() {
        let mut hs = HyStart::new(false);
        assert_eq!(
            hs.on_ack(20_000, 20_000, 40_000, 1000),
            SlowStartAction::Grow(8000)
        );
    }
}
