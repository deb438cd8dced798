//! The data-volume half of BBR's path model (draft §"Data Volume Network Path Model
//! Parameters"): `BBR.min_rtt`, the BDP, `BBR.extra_acked`, the offload budget,
//! `BBR.max_inflight`, and the long- and short-term inflight bounds.

use std::time::{Duration, Instant};

use super::{Bbr, HEADROOM, State};
use crate::filter::MaxFilter;

/// `BBR.ExtraAckedFilterLen`: "10 (in units of packet-timed round trips)".
const EXTRA_ACKED_FILTER_LEN: u64 = 10;

#[derive(Clone, Debug)]
pub(super) struct InflightModel {
    /// `BBR.min_rtt` ("Infinity" is `None`).
    pub(super) min_rtt: Option<Duration>,
    /// `BBR.min_rtt_stamp`.
    pub(super) min_rtt_stamp: Instant,
    /// `BBR.probe_rtt_min_delay`: "The minimum RTT sample recorded in the last
    /// BBR.ProbeRTTInterval."
    pub(super) probe_rtt_min_delay: Option<Duration>,
    /// `BBR.probe_rtt_min_stamp`.
    pub(super) probe_rtt_min_stamp: Instant,
    /// `BBR.probe_rtt_expired`.
    pub(super) probe_rtt_expired: bool,
    /// `BBR.inflight_longterm` (`u64::MAX` is "Infinity").
    pub(super) inflight_longterm: u64,
    /// `BBR.inflight_shortterm` (`u64::MAX` is "Infinity").
    pub(super) inflight_shortterm: u64,
    /// `BBR.inflight_latest`: "a 1-round-trip max of delivered volume of data (RS.delivered)".
    pub(super) inflight_latest: u64,
    /// `BBR.extra_acked_filter`, keyed by round count.
    extra_acked_filter: MaxFilter<u64, u64>,
    /// `BBR.extra_acked_interval_start`.
    pub(super) extra_acked_interval_start: Instant,
    /// `BBR.extra_acked_delivered`.
    extra_acked_delivered: u64,
    /// `BBR.max_inflight`.
    pub(super) max_inflight: u64,
}

impl InflightModel {
    pub(super) fn new(now: Instant) -> Self {
        //# BBR.min_rtt = C.srtt ? C.srtt : Infinity
        //# BBR.min_rtt_stamp = Now()
        //# BBR.extra_acked_interval_start = Now()
        //# BBR.extra_acked_delivered = 0
        //# BBR.inflight_longterm = Infinity
        Self {
            min_rtt: None,
            min_rtt_stamp: now,
            probe_rtt_min_delay: None,
            probe_rtt_min_stamp: now,
            probe_rtt_expired: false,
            inflight_longterm: u64::MAX,
            inflight_shortterm: u64::MAX,
            inflight_latest: 0,
            extra_acked_filter: MaxFilter::new(0),
            extra_acked_interval_start: now,
            extra_acked_delivered: 0,
            max_inflight: 0,
        }
    }

    /// `BBR.extra_acked`.
    pub(super) fn extra_acked(&self) -> u64 {
        self.extra_acked_filter.get().unwrap_or(0)
    }
}

impl Bbr {
    /// `BBR.bdp = BBR.bw * BBR.min_rtt`, bytes (0 before the first RTT sample).
    pub(super) fn bdp(&self) -> u64 {
        match self.volume.min_rtt {
            Some(rtt) => to_bytes(self.bw.bw * rtt.as_secs_f64()),
            None => 0,
        }
    }

    /// `BDPMultiple(gain)`.
    pub(super) fn bdp_multiple(&self, gain: f64) -> u64 {
        //# BDPMultiple(gain):
        //#   if (BBR.min_rtt == Infinity)
        //#     return C.InitialCwnd /* no valid RTT samples yet */
        //#   BBR.bdp = BBR.bw * BBR.min_rtt
        //#   return gain * BBR.bdp
        if self.volume.min_rtt.is_none() {
            return self.config.initial_cwnd;
        }
        to_bytes(gain * self.bdp() as f64)
    }

    /// `BBR.offload_budget`: "For QUIC, in the simplest case, offload_budget is equal to the
    /// send quantum"; "For TCP ... 3 * C.send_quantum".
    pub(super) fn offload_budget(&self) -> u64 {
        //# UpdateOffloadBudget():
        //#   BBR.offload_budget = 3 * C.send_quantum   (TCP)
        //#   BBR.offload_budget = C.send_quantum       (QUIC)
        self.config.offload_quanta.saturating_mul(self.send_quantum)
    }

    /// `QuantizationBudget(inflight_cap)`.
    pub(super) fn quantization_budget(&self, inflight_cap: u64) -> u64 {
        //# QuantizationBudget(inflight_cap)
        //#   UpdateOffloadBudget()
        //#   inflight_cap = max(inflight_cap, BBR.offload_budget)
        //#   inflight_cap = max(inflight_cap, BBR.MinPipeCwnd)
        //#   if (BBR.state == ProbeBW_UP)
        //#     inflight_cap += 2*C.SMSS
        //#   return inflight_cap
        let mut cap = inflight_cap
            .max(self.offload_budget())
            .max(self.min_pipe_cwnd());
        if self.state == State::ProbeBwUp {
            cap = cap.saturating_add(2 * self.mss);
        }
        cap
    }

    /// `Inflight(gain)`.
    pub(super) fn inflight(&self, gain: f64) -> u64 {
        //# Inflight(gain):
        //#   inflight_cap = BDPMultiple(gain)
        //#   return QuantizationBudget(inflight_cap)
        self.quantization_budget(self.bdp_multiple(gain))
    }

    /// `UpdateMaxInflight()`.
    pub(super) fn update_max_inflight(&mut self) {
        //# UpdateMaxInflight():
        //#   inflight_cap = BDPMultiple(BBR.cwnd_gain)
        //#   inflight_cap += BBR.extra_acked
        //#   BBR.max_inflight = QuantizationBudget(inflight_cap)
        let cap = self
            .bdp_multiple(self.cwnd_gain)
            .saturating_add(self.volume.extra_acked());
        self.volume.max_inflight = self.quantization_budget(cap);
    }

    /// `InflightWithHeadroom()`, with `u64::MAX` for "Infinity".
    pub(super) fn inflight_with_headroom_raw(&self) -> u64 {
        //# InflightWithHeadroom():
        //#   if (BBR.inflight_longterm == Infinity)
        //#     return Infinity
        //#   headroom = max(1*C.SMSS, BBR.Headroom * BBR.inflight_longterm)
        //#   return max(BBR.inflight_longterm - headroom,
        //#              BBR.MinPipeCwnd)
        let hi = self.volume.inflight_longterm;
        if hi == u64::MAX {
            return u64::MAX;
        }
        let headroom = self.mss.max(to_bytes(HEADROOM * hi as f64));
        hi.saturating_sub(headroom).max(self.min_pipe_cwnd())
    }

    /// `TargetInflight()`: "Our estimated BDP, unless congestion cut C.cwnd."
    pub(super) fn target_inflight(&self) -> u64 {
        //# TargetInflight()
        //#   return min(BBR.bdp, C.cwnd)
        self.bdp().min(self.cwnd)
    }

    /// `UpdateACKAggregation()`.
    pub(super) fn update_ack_aggregation(&mut self, now: Instant) {
        //# /* Find excess ACKed beyond expected amount over this interval */
        //# interval = (Now() - BBR.extra_acked_interval_start)
        //# expected_delivered = BBR.bw * interval
        //# /* Reset interval if ACK rate is below expected rate: */
        //# if (BBR.extra_acked_delivered <= expected_delivered)
        //#     BBR.extra_acked_delivered = 0
        //#     BBR.extra_acked_interval_start = Now()
        //#     expected_delivered = 0
        //# BBR.extra_acked_delivered += RS.newly_acked
        //# extra = BBR.extra_acked_delivered - expected_delivered
        //# extra = min(extra, C.cwnd)
        //# if (BBR.full_bw_reached)
        //#   filter_len = BBR.ExtraAckedFilterLen
        //# else
        //#   filter_len = 1  /* in Startup, just remember 1 round */
        //# BBR.extra_acked =
        //#   UpdateWindowedMaxFilter(filter=BBR.extra_acked_filter, value=extra,
        //#     time=BBR.round_count, window_length=filter_len)
        let interval = now.saturating_duration_since(self.volume.extra_acked_interval_start);
        let mut expected = to_bytes(self.bw.bw * interval.as_secs_f64());
        if self.volume.extra_acked_delivered <= expected {
            self.volume.extra_acked_delivered = 0;
            self.volume.extra_acked_interval_start = now;
            expected = 0;
        }
        self.volume.extra_acked_delivered = self
            .volume
            .extra_acked_delivered
            .saturating_add(self.rs.newly_acked);
        let extra = self
            .volume
            .extra_acked_delivered
            .saturating_sub(expected)
            .min(self.cwnd);
        // Our filter keeps a sample while it is at most `window` rounds old, so a length of
        // N rounds is a window of N - 1.
        let filter_len = if self.full_pipe.full_bw_reached {
            EXTRA_ACKED_FILTER_LEN
        } else {
            1
        };
        self.volume.extra_acked_filter.set_window(filter_len - 1);
        let round = self.round.round_count;
        self.volume.extra_acked_filter.update(round, extra);
    }
}

/// A finite, non-negative byte count from a float (NaN and negatives become 0, overflow
/// saturates).
pub(super) fn to_bytes(v: f64) -> u64 {
    if v.is_nan() || v <= 0.0 {
        0
    } else if v >= u64::MAX as f64 {
        u64::MAX
    } else {
        v as u64
    }
}
