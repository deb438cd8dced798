//! The data-rate half of BBR's path model (draft §"Data Rate Network Path Model
//! Parameters"): `BBR.max_bw` (long-term), `BBR.bw_shortterm` (short-term) and their
//! minimum, `BBR.bw`.

use super::Bbr;
use crate::filter::MaxFilter;

/// `BBR.MaxBwFilterLen`: "2 (representing up to 2 ProbeBW cycles, the current cycle and the
/// previous full cycle)". Our filter counts a sample as in the window while it is at most
/// `len - 1` cycles old.
const MAX_BW_FILTER_LEN: u64 = 2;

#[derive(Clone, Debug)]
pub(super) struct BandwidthModel {
    /// `BBR.max_bw_filter`, keyed by `BBR.cycle_count`.
    max_bw_filter: MaxFilter<f64, u64>,
    /// `BBR.cycle_count`: "The virtual time used by the BBR.max_bw filter window."
    pub(super) cycle_count: u64,
    /// `BBR.bw_shortterm` (Infinity while unset).
    pub(super) bw_shortterm: f64,
    /// `BBR.bw_latest`: "a 1-round-trip max of delivered bandwidth (RS.delivery_rate)".
    pub(super) bw_latest: f64,
    /// `BBR.bw = min(BBR.max_bw, BBR.bw_shortterm)`.
    pub(super) bw: f64,
}

impl BandwidthModel {
    pub(super) fn new() -> Self {
        //# InitWindowedMaxFilter(filter=BBR.max_bw_filter, value=0, time=0)
        Self {
            max_bw_filter: MaxFilter::new(MAX_BW_FILTER_LEN - 1),
            cycle_count: 0,
            bw_shortterm: f64::INFINITY,
            bw_latest: 0.0,
            bw: 0.0,
        }
    }

    /// `BBR.max_bw`.
    pub(super) fn max_bw(&self) -> f64 {
        self.max_bw_filter.get().unwrap_or(0.0)
    }
}

impl Bbr {
    /// `UpdateMaxBw()`.
    pub(super) fn update_max_bw(&mut self) {
        //# UpdateMaxBw()
        //#   UpdateRound()
        //#   if (RS.delivery_rate > 0 &&
        //#       (RS.delivery_rate >= BBR.max_bw || !RS.is_app_limited))
        //#       BBR.max_bw = UpdateWindowedMaxFilter(
        //#                     filter=BBR.max_bw_filter,
        //#                     value=RS.delivery_rate,
        //#                     time=BBR.cycle_count,
        //#                     window_length=BBR.MaxBwFilterLen)
        self.update_round();
        let rate = self.rs.delivery_rate;
        if rate > 0.0 && (rate >= self.bw.max_bw() || !self.rs.is_app_limited) {
            let cycle = self.bw.cycle_count;
            self.bw.max_bw_filter.update(cycle, rate);
        }
    }

    /// `AdvanceMaxBwFilter()`.
    pub(super) fn advance_max_bw_filter(&mut self) {
        //# AdvanceMaxBwFilter():
        //#   BBR.cycle_count++
        self.bw.cycle_count += 1;
        // Samples from two cycles back leave the window now, not only at the next sample
        // (which may be an app-limited one that is not fed to the filter).
        let cycle = self.bw.cycle_count;
        self.bw.max_bw_filter.expire(cycle);
    }

    /// `BoundBWForModel()`.
    pub(super) fn bound_bw_for_model(&mut self) {
        //# BoundBWForModel():
        //#   BBR.bw = min(BBR.max_bw, BBR.bw_shortterm)
        self.bw.bw = self.bw.max_bw().min(self.bw.bw_shortterm);
    }
}
