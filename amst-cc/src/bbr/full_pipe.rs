//! The "full pipe" estimator (draft §"Exiting Acceleration Based on Bandwidth Plateau"),
//! used to leave Startup and ProbeBW_UP.
//!
//! "if BBR counts several (three) non-application-limited rounds where attempts to
//! significantly increase the delivery rate actually result in little increase (less than 25
//! percent), then it estimates that it has fully utilized the per-flow available bandwidth,
//! and sets both BBR.full_bw_now and BBR.full_bw_reached to true."

use super::Bbr;

/// The growth per round below which a round counts as "no growth": 1.25.
pub(super) const FULL_BW_THRESH: f64 = 1.25;
/// Rounds without growth before the pipe counts as full: 3.
pub(super) const FULL_BW_COUNT: u32 = 3;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct FullPipe {
    /// `BBR.full_bw_reached`: "whether BBR estimates that it has ever fully utilized its
    /// available bandwidth over the lifetime of the connection".
    pub(super) full_bw_reached: bool,
    /// `BBR.full_bw_now`: "... since it most recently started looking".
    pub(super) full_bw_now: bool,
    /// `BBR.full_bw`: "A recent baseline BBR.max_bw to estimate if BBR has filled the pipe".
    pub(super) full_bw: f64,
    /// `BBR.full_bw_count`.
    pub(super) full_bw_count: u32,
}

impl Bbr {
    /// `ResetFullBW()`.
    pub(super) fn reset_full_bw(&mut self) {
        //# ResetFullBW():
        //#   BBR.full_bw = 0
        //#   BBR.full_bw_count = 0
        //#   BBR.full_bw_now = 0
        self.full_pipe.full_bw = 0.0;
        self.full_pipe.full_bw_count = 0;
        self.full_pipe.full_bw_now = false;
    }

    /// `CheckFullBWReached()`.
    pub(super) fn check_full_bw_reached(&mut self) {
        //# CheckFullBWReached():
        //#   if (BBR.full_bw_now || !BBR.round_start || RS.is_app_limited)
        //#     return  /* no need to check for a full pipe now */
        //#   if (RS.delivery_rate >= BBR.full_bw * 1.25)
        //#     ResetFullBW()       /* bw is still growing, so reset */
        //#     BBR.full_bw = RS.delivery_rate  /* record new baseline bw */
        //#     return
        //#   BBR.full_bw_count++   /* another round w/o much growth */
        //#   BBR.full_bw_now = (BBR.full_bw_count >= 3)
        //#   if (BBR.full_bw_now)
        //#     BBR.full_bw_reached = true
        if self.full_pipe.full_bw_now || !self.round.round_start || self.rs.is_app_limited {
            return;
        }
        // A sample without a reliable rate (shorter than min_rtt) says nothing either way.
        if self.rs.delivery_rate <= 0.0 {
            return;
        }
        if self.rs.delivery_rate >= self.full_pipe.full_bw * FULL_BW_THRESH {
            self.reset_full_bw();
            self.full_pipe.full_bw = self.rs.delivery_rate;
            return;
        }
        self.full_pipe.full_bw_count += 1;
        self.full_pipe.full_bw_now = self.full_pipe.full_bw_count >= FULL_BW_COUNT;
        if self.full_pipe.full_bw_now {
            self.full_pipe.full_bw_reached = true;
        }
    }
}
