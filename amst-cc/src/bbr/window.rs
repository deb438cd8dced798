//! The congestion window (draft §"Congestion Window").
//!
//! "When C.cwnd is above the BBR.max_inflight derived from BBR's path model, BBR cuts C.cwnd
//! immediately to the BBR.max_inflight. When C.cwnd is below BBR.max_inflight, BBR raises
//! C.cwnd gradually and cautiously, increasing C.cwnd by no more than the amount of data
//! acknowledged (cumulatively or selectively) upon each ACK."

use super::{Bbr, State};

impl Bbr {
    /// `SetCwnd()`.
    pub(super) fn set_cwnd(&mut self) {
        //# SetCwnd():
        //#   UpdateMaxInflight()
        //#   if (BBR.full_bw_reached)
        //#     C.cwnd = min(C.cwnd + RS.newly_acked, BBR.max_inflight)
        //#   else if (C.cwnd < BBR.max_inflight || C.delivered < C.InitialCwnd)
        //#     C.cwnd = C.cwnd + RS.newly_acked
        //#   C.cwnd = max(C.cwnd, BBR.MinPipeCwnd)
        //#   BoundCwndForProbeRTT()
        //#   BoundCwndForModel()
        self.update_max_inflight();
        let grown = self.cwnd.saturating_add(self.rs.newly_acked);
        if self.full_pipe.full_bw_reached {
            self.cwnd = grown.min(self.volume.max_inflight);
        } else if self.cwnd < self.volume.max_inflight || self.delivered < self.config.initial_cwnd
        {
            self.cwnd = grown;
        }
        self.cwnd = self.cwnd.max(self.min_pipe_cwnd());
        self.bound_cwnd_for_probe_rtt();
        self.bound_cwnd_for_model();
    }

    /// `BoundCwndForModel()`: "BBR bounds C.cwnd based on recent congestion".
    pub(super) fn bound_cwnd_for_model(&mut self) {
        //# cap = Infinity
        //# if (IsInAProbeBWState() &&
        //#     BBR.state != ProbeBW_CRUISE)
        //#   cap = BBR.inflight_longterm
        //# else if (BBR.state == ProbeRTT ||
        //#          BBR.state == ProbeBW_CRUISE)
        //#   cap = InflightWithHeadroom()
        //# /* apply BBR.inflight_shortterm (possibly infinite): */
        //# cap = min(cap, BBR.inflight_shortterm)
        //# cap = max(cap, BBR.MinPipeCwnd)
        //# C.cwnd = min(C.cwnd, cap)
        let mut cap = u64::MAX;
        if self.state.is_probe_bw() && self.state != State::ProbeBwCruise {
            cap = self.volume.inflight_longterm;
        } else if matches!(self.state, State::ProbeRtt | State::ProbeBwCruise) {
            cap = self.inflight_with_headroom_raw();
        }
        cap = cap.min(self.volume.inflight_shortterm);
        cap = cap.max(self.min_pipe_cwnd());
        self.cwnd = self.cwnd.min(cap);
    }
}
