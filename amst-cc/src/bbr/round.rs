//! Packet-timed round trips (draft §"BBR.round_count: Tracking Packet-Timed Round Trips").
//!
//! "BBR counts packet-timed round trips by recording state about a sentinel packet, and
//! waiting for an ACK of any data packet that was sent after that sentinel packet."

use super::Bbr;

/// `BBR.round_count`, `BBR.round_start` and `BBR.next_round_delivered`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct RoundCounter {
    //# InitRoundCounting():
    //#   BBR.next_round_delivered = 0
    //#   BBR.round_start = false
    //#   BBR.round_count = 0
    pub(super) next_round_delivered: u64,
    pub(super) round_start: bool,
    pub(super) round_count: u64,
}

impl Bbr {
    /// `UpdateRound()`, run for the newest packet an ack covers.
    pub(super) fn update_round(&mut self) {
        //# UpdateRound():
        //#   if (P.delivered >= BBR.next_round_delivered)
        //#     StartRound()
        //#     BBR.round_count++
        //#     BBR.rounds_since_probe_up++
        //#     BBR.round_start = true
        //#   else
        //#     BBR.round_start = false
        if self.rs.prior_delivered >= self.round.next_round_delivered {
            self.start_round();
            self.round.round_count += 1;
            self.probe_bw.rounds_since_probe_up += 1;
            self.round.round_start = true;
            // C.is_cwnd_limited looks back one packet-timed round.
            self.cwnd_limited_prev_round = self.cwnd_limited_this_round;
            self.cwnd_limited_this_round = false;
            self.congestion.lost_at_round_start = self.lost;
        } else {
            self.round.round_start = false;
        }
    }

    /// `StartRound()`.
    pub(super) fn start_round(&mut self) {
        //# StartRound():
        //#   BBR.next_round_delivered = C.delivered
        self.round.next_round_delivered = self.delivered;
    }
}
