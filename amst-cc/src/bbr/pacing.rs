//! Pacing rate and send quantum (draft §"Pacing Rate: C.pacing_rate" and §"Send Quantum"),
//! and the pacing side of restarting from idle (§"Restarting From Idle").

use std::time::{Duration, Instant};

use super::{Bbr, PACING_MARGIN_PERCENT, STARTUP_PACING_GAIN, State};

/// `SetSendQuantum()`'s cap: 64 KBytes.
const MAX_SEND_QUANTUM: u64 = 64 * 1024;

impl Bbr {
    /// `InitPacingRate()`.
    pub(super) fn init_pacing_rate(&mut self) {
        //# InitPacingRate():
        //#   nominal_bandwidth = C.InitialCwnd / (C.srtt ? C.srtt : 1ms)
        //#   C.pacing_rate =  BBR.StartupPacingGain * nominal_bandwidth
        let srtt = self
            .srtt
            .filter(|s| !s.is_zero())
            .unwrap_or(Duration::from_millis(1));
        let nominal_bandwidth = self.config.initial_cwnd as f64 / srtt.as_secs_f64();
        self.pacing_rate = STARTUP_PACING_GAIN * nominal_bandwidth;
    }

    /// `SetPacingRateWithGain(pacing_gain)`.
    pub(super) fn set_pacing_rate_with_gain(&mut self, pacing_gain: f64) {
        //# rate = pacing_gain * bw * (100 - BBR.PacingMarginPercent) / 100
        //# if (BBR.full_bw_reached || rate > C.pacing_rate)
        //#   C.pacing_rate = rate
        let rate = pacing_gain * self.bw.bw * (100.0 - PACING_MARGIN_PERCENT) / 100.0;
        // Keep the output usable: a model that has no bandwidth yet (for example after the
        // max_bw filter emptied) must not pace at zero or at infinity.
        if !rate.is_finite() || rate <= 0.0 {
            return;
        }
        if self.full_pipe.full_bw_reached || rate > self.pacing_rate {
            self.pacing_rate = rate;
        }
    }

    /// `SetPacingRate()`.
    pub(super) fn set_pacing_rate(&mut self) {
        //# SetPacingRate():
        //#   SetPacingRateWithGain(C.pacing_gain)
        self.set_pacing_rate_with_gain(self.pacing_gain);
    }

    /// `SetSendQuantum()`.
    pub(super) fn set_send_quantum(&mut self) {
        //# C.send_quantum = C.pacing_rate * 1ms
        //# C.send_quantum = min(C.send_quantum, 64 KBytes)
        //# C.send_quantum = max(C.send_quantum, 2 * C.SMSS)
        let per_ms = super::data_volume::to_bytes(self.pacing_rate / 1000.0);
        self.send_quantum = per_ms.min(MAX_SEND_QUANTUM).max(2 * self.mss);
    }

    /// `HandleRestartFromIdle()`, run before each transmission.
    pub(super) fn handle_restart_from_idle(&mut self, now: Instant) {
        //# HandleRestartFromIdle():
        //#   if (C.inflight == 0 && C.app_limited)
        //#     BBR.idle_restart = true
        //#     BBR.extra_acked_interval_start = Now()
        //#     if (IsInAProbeBWState())
        //#       SetPacingRateWithGain(1)
        //#     else if (BBR.state == ProbeRTT)
        //#       CheckProbeRTTDone()
        if self.inflight == 0 && self.app_limited != 0 {
            self.idle_restart = true;
            self.volume.extra_acked_interval_start = now;
            if self.state.is_probe_bw() {
                self.set_pacing_rate_with_gain(1.0);
            } else if self.state == State::ProbeRtt {
                self.check_probe_rtt_done(now);
            }
        }
    }
}
