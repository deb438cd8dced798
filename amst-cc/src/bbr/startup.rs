//! Startup (draft §"Startup").
//!
//! "BBR's Startup state does an exponential search of the rate space, doubling the sending
//! rate each round. ... in Startup BBR sets BBR.pacing_gain to BBR.StartupPacingGain (2.77)
//! and BBR.cwnd_gain to BBR.DefaultCwndGain (2)."

use super::{Bbr, DEFAULT_CWND_GAIN, STARTUP_PACING_GAIN, State};

/// `BBRStartupFullLossCnt`: "at least BBRStartupFullLossCnt=6 discontiguous sequence ranges
/// lost in that round trip".
pub(super) const STARTUP_FULL_LOSS_COUNT: u64 = 6;

impl Bbr {
    /// `EnterStartup()`.
    pub(super) fn enter_startup(&mut self) {
        //# EnterStartup():
        //#   BBR.state = Startup
        //#   BBR.pacing_gain = BBR.StartupPacingGain
        //#   BBR.cwnd_gain = BBR.DefaultCwndGain
        self.set_state(State::Startup);
        self.pacing_gain = STARTUP_PACING_GAIN;
        self.cwnd_gain = DEFAULT_CWND_GAIN;
    }

    /// `CheckStartupDone()`.
    pub(super) fn check_startup_done(&mut self) {
        //# CheckStartupDone():
        //#   CheckStartupHighLoss()
        //#   if (BBR.state == Startup && BBR.full_bw_reached)
        //#     EnterDrain()
        self.check_startup_high_loss();
        if self.state == State::Startup && self.full_pipe.full_bw_reached {
            self.enter_drain();
        }
    }

    /// `CheckStartupHighLoss()`, which the draft gives in prose:
    ///
    /// "CheckStartupHighLoss() exits Startup based on packet loss if the following criteria
    /// are all met:
    /// * The connection has been in fast recovery for at least one full packet-timed round
    ///   trip.
    /// * The loss rate over the time scale of a single full round trip exceeds
    ///   BBR.LossThresh (2%).
    /// * There are at least BBRStartupFullLossCnt=6 discontiguous sequence ranges lost in
    ///   that round trip.
    ///
    /// For connections for which C.has_selective_acks is false ... exits Startup based on
    /// packet loss if any packet loss is detected during fast recovery."
    ///
    /// The round trip judged is the loss round that just ended (checked on the ack that
    /// starts the next one); each loss event the transport reports counts as one range. The
    /// 2% threshold is measured above the path's random-loss baseline
    /// ([`Bbr::loss_baseline`]), which is 0 unless random-loss tolerance is on.
    pub(super) fn check_startup_high_loss(&mut self) {
        if self.state != State::Startup || self.full_pipe.full_bw_reached {
            return;
        }
        if !self.congestion.loss_round_start || !self.recovery.in_recovery {
            return;
        }
        let c = &self.congestion;
        let too_high = if self.config.has_selective_acks {
            let in_recovery_a_round = self.round.round_count > self.recovery.start_round;
            let volume = c
                .prev_round_delivered
                .saturating_add(c.prev_round_lost_bytes);
            in_recovery_a_round
                && c.prev_round_loss_events >= STARTUP_FULL_LOSS_COUNT
                && c.prev_round_lost_bytes as f64 > self.loss_thresh() * volume as f64
        } else {
            c.prev_round_lost_bytes > 0
        };
        if !too_high {
            return;
        }
        //# "First, it sets BBR.undo_state = Startup ... Second, it sets
        //# BBR.full_bw_reached = true. Then it sets BBR.inflight_longterm to ...
        //# max(BBR.bdp, BBR.inflight_latest) ... Finally, it exits Startup and enters Drain."
        self.recovery.undo_state = Some(State::Startup);
        self.full_pipe.full_bw_now = true;
        self.full_pipe.full_bw_reached = true;
        self.volume.inflight_longterm = self.bdp().max(self.volume.inflight_latest);
    }
}
