//! Drain (draft §"Drain").
//!
//! "In Drain, BBR aims to quickly drain any queue at the bottleneck link that was created in
//! Startup by switching to a pacing_gain well below 1.0, until any estimated queue has been
//! drained."

use std::time::Instant;

use super::{Bbr, DEFAULT_CWND_GAIN, DRAIN_PACING_GAIN, State};

/// "BBR enters ProbeBW after 3 round trips, allowing the bandwidth max filter to advance".
const DRAIN_MAX_ROUNDS: u64 = 3;

impl Bbr {
    /// `EnterDrain()`.
    pub(super) fn enter_drain(&mut self) {
        //# EnterDrain():
        //#   BBR.state = Drain
        //#   BBR.pacing_gain = BBR.DrainPacingGain    /* pace slowly */
        //#   BBR.cwnd_gain = BBR.DefaultCwndGain      /* maintain cwnd */
        //#   BBR.drain_start_round = BBR.round_count
        self.set_state(State::Drain);
        self.pacing_gain = DRAIN_PACING_GAIN;
        self.cwnd_gain = DEFAULT_CWND_GAIN;
        self.drain_start_round = self.round.round_count;
    }

    /// `CheckDrainDone()`.
    pub(super) fn check_drain_done(&mut self, now: Instant) {
        //# CheckDrainDone():
        //#   if (BBR.state == Drain &&
        //#       (C.inflight <= Inflight(1.0) ||
        //#        BBR.round_count > BBR.drain_start_round + 3))
        //#     EnterProbeBW()
        if self.state == State::Drain
            && (self.inflight <= self.inflight(1.0)
                || self.round.round_count > self.drain_start_round.saturating_add(DRAIN_MAX_ROUNDS))
        {
            self.enter_probe_bw(now);
        }
    }
}
