//! ProbeRTT and the min_rtt estimate (draft §"ProbeRTT" and §"BBR.min_rtt").
//!
//! "Up to once every BBR.ProbeRTTInterval = 5 seconds, the flow enters ProbeRTT,
//! decelerating by setting its cwnd_gain to BBR.ProbeRTTCwndGain = 0.5 to reduce C.inflight
//! to half of its estimated BDP, to try to measure the unloaded two-way propagation delay."

use std::time::Instant;

use super::data_volume::to_bytes;
use super::probe_bw::AckPhase;
use super::{
    Bbr, MIN_RTT_FILTER_LEN, PROBE_RTT_CWND_GAIN, PROBE_RTT_DURATION, PROBE_RTT_INTERVAL, State,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ProbeRtt {
    /// `BBR.probe_rtt_done_stamp` (0 is `None`).
    pub(super) done_stamp: Option<Instant>,
    /// `BBR.probe_rtt_round_done`.
    pub(super) round_done: bool,
}

impl Bbr {
    /// `UpdateMinRTT()`.
    pub(super) fn update_min_rtt(&mut self, now: Instant) {
        //# BBR.probe_rtt_expired =
        //#   Now() > BBR.probe_rtt_min_stamp + BBR.ProbeRTTInterval
        //# if (RS.rtt >= 0 &&
        //#     (RS.rtt < BBR.probe_rtt_min_delay ||
        //#      BBR.probe_rtt_expired))
        //#    BBR.probe_rtt_min_delay = RS.rtt
        //#    BBR.probe_rtt_min_stamp = Now()
        //# min_rtt_expired =
        //#   Now() > BBR.min_rtt_stamp + BBR.MinRTTFilterLen
        //# if (BBR.probe_rtt_min_delay < BBR.min_rtt ||
        //#     min_rtt_expired)
        //#   BBR.min_rtt       = BBR.probe_rtt_min_delay
        //#   BBR.min_rtt_stamp = BBR.probe_rtt_min_stamp
        let v = &mut self.volume;
        v.probe_rtt_expired = now > v.probe_rtt_min_stamp + PROBE_RTT_INTERVAL;
        if let Some(rtt) = self.rs.rtt
            && (v.probe_rtt_min_delay.is_none_or(|d| rtt < d) || v.probe_rtt_expired)
        {
            v.probe_rtt_min_delay = Some(rtt);
            v.probe_rtt_min_stamp = now;
        }
        let min_rtt_expired = now > v.min_rtt_stamp + MIN_RTT_FILTER_LEN;
        if let Some(d) = v.probe_rtt_min_delay
            && (v.min_rtt.is_none_or(|m| d < m) || min_rtt_expired)
        {
            v.min_rtt = Some(d);
            v.min_rtt_stamp = v.probe_rtt_min_stamp;
        }
    }

    /// `CheckProbeRTT()`.
    pub(super) fn check_probe_rtt(&mut self, now: Instant) {
        //# if (BBR.state != ProbeRTT &&
        //#     BBR.probe_rtt_expired &&
        //#     !BBR.idle_restart)
        //#   EnterProbeRTT()
        //#   SaveCwnd()
        //#   BBR.probe_rtt_done_stamp = 0
        //#   BBR.ack_phase = ACKS_PROBE_STOPPING
        //#   StartRound()
        //# if (BBR.state == ProbeRTT)
        //#   HandleProbeRTT()
        //# if (RS.delivered > 0)
        //#   BBR.idle_restart = false
        if self.state != State::ProbeRtt && self.volume.probe_rtt_expired && !self.idle_restart {
            self.enter_probe_rtt();
            self.save_cwnd();
            self.probe_rtt.done_stamp = None;
            self.probe_bw.ack_phase = AckPhase::ProbeStopping;
            self.start_round();
        }
        if self.state == State::ProbeRtt {
            self.handle_probe_rtt(now);
        }
        if self.rs.delivered > 0 {
            self.idle_restart = false;
        }
    }

    /// `EnterProbeRTT()`.
    fn enter_probe_rtt(&mut self) {
        //# BBR.state = ProbeRTT
        //# BBR.pacing_gain = 1
        //# BBR.cwnd_gain = BBR.ProbeRTTCwndGain  /* 0.5 */
        self.set_state(State::ProbeRtt);
        self.pacing_gain = 1.0;
        self.cwnd_gain = PROBE_RTT_CWND_GAIN;
    }

    /// `HandleProbeRTT()`.
    fn handle_probe_rtt(&mut self, now: Instant) {
        //# /* Ignore low rate samples during ProbeRTT: */
        //# MarkConnectionAppLimited()
        //# if (BBR.probe_rtt_done_stamp == 0 &&
        //#     C.inflight <= ProbeRTTCwnd())
        //#   /* Wait for at least BBR.ProbeRTTDuration to elapse: */
        //#   BBR.probe_rtt_done_stamp =
        //#     Now() + BBR.ProbeRTTDuration
        //#   /* Wait for at least one round to elapse: */
        //#   BBR.probe_rtt_round_done = false
        //#   StartRound()
        //# else if (BBR.probe_rtt_done_stamp != 0)
        //#   if (BBR.round_start)
        //#     BBR.probe_rtt_round_done = true
        //#   if (BBR.probe_rtt_round_done)
        //#     CheckProbeRTTDone()
        self.mark_connection_app_limited();
        if self.probe_rtt.done_stamp.is_none() && self.inflight <= self.probe_rtt_cwnd() {
            self.probe_rtt.done_stamp = Some(now + PROBE_RTT_DURATION);
            self.probe_rtt.round_done = false;
            self.start_round();
        } else if self.probe_rtt.done_stamp.is_some() {
            if self.round.round_start {
                self.probe_rtt.round_done = true;
            }
            if self.probe_rtt.round_done {
                self.check_probe_rtt_done(now);
            }
        }
    }

    /// `CheckProbeRTTDone()`.
    pub(super) fn check_probe_rtt_done(&mut self, now: Instant) {
        //# if (BBR.probe_rtt_done_stamp != 0 &&
        //#     Now() > BBR.probe_rtt_done_stamp)
        //#   /* schedule next ProbeRTT: */
        //#   BBR.probe_rtt_min_stamp = Now()
        //#   RestoreCwnd()
        //#   ExitProbeRTT()
        if let Some(done) = self.probe_rtt.done_stamp
            && now > done
        {
            self.volume.probe_rtt_min_stamp = now;
            self.restore_cwnd();
            self.exit_probe_rtt(now);
        }
    }

    /// `ExitProbeRTT()`.
    fn exit_probe_rtt(&mut self, now: Instant) {
        //# ResetShortTermModel()
        //# if (BBR.full_bw_reached)
        //#   StartProbeBW_DOWN()
        //#   StartProbeBW_CRUISE()
        //# else
        //#   EnterStartup()
        self.reset_short_term_model();
        if self.full_pipe.full_bw_reached {
            self.start_probe_bw_down(now);
            self.start_probe_bw_cruise();
        } else {
            self.enter_startup();
        }
    }

    /// `ProbeRTTCwnd()`.
    pub(super) fn probe_rtt_cwnd(&self) -> u64 {
        //# probe_rtt_cwnd = BDPMultiple(BBR.bw, BBR.ProbeRTTCwndGain)
        //# probe_rtt_cwnd = max(probe_rtt_cwnd, BBR.MinPipeCwnd)
        //# return probe_rtt_cwnd
        let cwnd = match self.volume.min_rtt {
            Some(_) => to_bytes(PROBE_RTT_CWND_GAIN * self.bdp() as f64),
            None => self.config.initial_cwnd,
        };
        cwnd.max(self.min_pipe_cwnd())
    }

    /// `BoundCwndForProbeRTT()`.
    pub(super) fn bound_cwnd_for_probe_rtt(&mut self) {
        //# if (BBR.state == ProbeRTT)
        //#   C.cwnd = min(C.cwnd, ProbeRTTCwnd())
        if self.state == State::ProbeRtt {
            self.cwnd = self.cwnd.min(self.probe_rtt_cwnd());
        }
    }
}
