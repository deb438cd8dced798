//! Responding to congestion: the loss model (draft §"Updating the Model Upon Packet Loss").
//!
//! "In every state, BBR responds to (filtered) congestion signals, including loss. The
//! response to those congestion signals depends on the flow's current state, since the
//! information that the flow can infer depends on what the flow was doing when the flow
//! experienced the signal."
//!
//! While probing (Startup, REFILL, UP), a loss rate above `BBR.LossThresh` sets the long-term
//! bound `inflight_longterm`; otherwise, each round with loss pulls the short-term bounds
//! `bw_shortterm` and `inflight_shortterm` toward the latest delivery process, by at most
//! `BBR.Beta` per round.

use std::time::{Duration, Instant};

use super::data_volume::to_bytes;
use super::{BETA, Bbr, LOSS_THRESH, State};
use crate::Loss;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct CongestionSignals {
    /// `BBR.is_loss_in_round`.
    pub(super) is_loss_in_round: bool,
    /// `BBR.loss_round_delivered`.
    pub(super) loss_round_delivered: u64,
    /// `BBR.loss_round_start`.
    pub(super) loss_round_start: bool,
    /// Loss events (our stand-in for "discontiguous sequence ranges") in this loss round.
    pub(super) round_loss_events: u64,
    /// Bytes lost in this loss round.
    pub(super) round_lost_bytes: u64,
    /// `C.delivered` when this loss round started.
    pub(super) round_start_delivered: u64,
    /// The same three figures for the loss round that just ended.
    pub(super) prev_round_loss_events: u64,
    pub(super) prev_round_lost_bytes: u64,
    pub(super) prev_round_delivered: u64,
    pub(super) prev_round_ecn: bool,
    /// `C.lost` at the start of the current packet-timed round: our estimate of `P.lost` for a
    /// packet declared lost now, when the transport gives no per-packet state.
    pub(super) lost_at_round_start: u64,
    /// CE marks arrived in this loss round (always a congestion signal).
    pub(super) ecn_in_round: bool,
    /// The largest RTT sample in this loss round, to tell queue-free rounds apart.
    pub(super) round_max_rtt: Option<Duration>,
    /// Decayed totals of bytes lost and bytes sent (delivered + lost) over queue-free loss
    /// rounds: the path's non-congestive loss rate (see [`Bbr::loss_baseline`]).
    pub(super) base_lost: f64,
    pub(super) base_total: f64,
}

/// Queue-free rounds must total this many datagrams before the baseline is trusted.
const BASELINE_MIN_PACKETS: f64 = 200.0;
/// The baseline's memory, in datagrams: older rounds fade with this half-life.
const BASELINE_HALF_LIFE_PACKETS: f64 = 20_000.0;
/// The highest random-loss rate the baseline will excuse; above it every loss is congestion.
const BASELINE_MAX: f64 = 0.10;

impl Bbr {
    /// The transport's loss event: recovery bookkeeping, then `HandleLostPacket()`.
    pub(super) fn on_loss_event(&mut self, now: Instant, loss: &Loss) {
        self.congestion.round_loss_events = self.congestion.round_loss_events.saturating_add(1);
        self.congestion.round_lost_bytes = self
            .congestion
            .round_lost_bytes
            .saturating_add(loss.bytes_lost);
        self.maybe_enter_recovery(now, loss);
        self.note_loss();
        if !self.exact_loss_samples && loss.bytes_lost > 0 {
            // Without per-packet state, estimate P.tx_in_flight by what was in flight when the
            // loss was detected (about one round trip after the send, so about the same in
            // steady state) and P.lost by the losses declared since the current round began.
            let tx_in_flight = loss.bytes_in_flight.saturating_add(loss.bytes_lost);
            let lost = self
                .lost
                .saturating_sub(self.congestion.lost_at_round_start);
            let app_limited = self.rs.is_app_limited;
            self.handle_lost_packet(loss.bytes_lost, tx_in_flight, lost, app_limited);
        }
    }

    /// `NoteLoss()`.
    pub(super) fn note_loss(&mut self) {
        //# NoteLoss()
        //#   if (!BBR.is_loss_in_round)   /* first loss in this round trip? */
        //#     BBR.loss_round_delivered = C.delivered
        //#     SaveStateUponLoss()
        //#   BBR.is_loss_in_round = true
        if !self.congestion.is_loss_in_round {
            self.congestion.loss_round_delivered = self.delivered;
            // SaveStateUponLoss(), as of before the loss event in progress, if any.
            self.save_state_before_loss_event(self.recovery.pre_loss);
        }
        self.congestion.is_loss_in_round = true;
    }

    /// `HandleLostPacket(P)`, given `P.size`, `P.tx_in_flight`, `C.lost - P.lost` and
    /// `P.is_app_limited`.
    pub(super) fn handle_lost_packet(
        &mut self,
        size: u64,
        tx_in_flight: u64,
        lost: u64,
        is_app_limited: bool,
    ) {
        //# HandleLostPacket(Packet P):
        //#   NoteLoss()
        //#   if (!BBR.is_bw_probe_sample)
        //#     return /* not a packet sent while probing bandwidth */
        //#   RS.tx_in_flight = P.tx_in_flight /* C.inflight at transmit */
        //#   RS.lost = C.lost - P.lost /* data lost since transmit */
        //#   RS.is_app_limited = P.is_app_limited
        //#   if (IsInflightTooHigh())
        //#     RS.tx_in_flight = InflightAtLoss(P)
        //#     HandleInflightTooHigh()
        self.note_loss();
        if !self.probe_bw.is_bw_probe_sample {
            return;
        }
        if self.is_inflight_too_high(lost, tx_in_flight) {
            let at_loss = inflight_at_loss(size, tx_in_flight, lost, self.loss_thresh());
            self.handle_inflight_too_high(at_loss, is_app_limited);
        }
    }

    /// `IsInflightTooHigh()`: "Do loss signals suggest C.inflight was too high?"
    pub(super) fn is_inflight_too_high(&self, lost: u64, tx_in_flight: u64) -> bool {
        //# return ((RS.lost > RS.tx_in_flight * BBR.LossThresh) ||
        //#         (RS.lost > 0 && !C.has_selective_acks))
        (lost as f64 > tx_in_flight as f64 * self.loss_thresh())
            || (lost > 0 && !self.config.has_selective_acks)
    }

    /// `HandleInflightTooHigh()`.
    fn handle_inflight_too_high(&mut self, tx_in_flight: u64, is_app_limited: bool) {
        //# BBR.prev_probe_too_high = true
        //# BBR.is_bw_probe_sample = false  /* only react once per bw probe */
        //# if (!RS.is_app_limited)
        //#   BBR.inflight_longterm = max(RS.tx_in_flight,
        //#                         TargetInflight() * BBR.Beta)
        //# if (BBR.state == ProbeBW_UP)
        //#   BBR.undo_state = ProbeBW_UP
        //#   StartProbeBW_DOWN()
        self.probe_bw.prev_probe_too_high = true;
        self.probe_bw.is_bw_probe_sample = false;
        if !is_app_limited {
            let floor = to_bytes(self.target_inflight() as f64 * BETA);
            self.volume.inflight_longterm = tx_in_flight.max(floor);
        }
        if self.state == State::ProbeBwUp {
            self.recovery.undo_state = Some(State::ProbeBwUp);
            self.note_loss_event_undo_state(State::ProbeBwUp);
            // The transition happens on a loss, which carries no clock of its own beyond the
            // event; the cycle starts at the time of the last event we saw.
            let now = self.last_event_time;
            self.start_probe_bw_down(now);
        }
    }

    /// `UpdateLatestDeliverySignals()`: "Near start of ACK processing".
    pub(super) fn update_latest_delivery_signals(&mut self) {
        //# BBR.loss_round_start = 0
        //# BBR.bw_latest       = max(BBR.bw_latest,       RS.delivery_rate)
        //# BBR.inflight_latest = max(BBR.inflight_latest, RS.delivered)
        //# if (RS.prior_delivered >= BBR.loss_round_delivered)
        //#   BBR.loss_round_delivered = C.delivered
        //#   BBR.loss_round_start = 1
        let c = &mut self.congestion;
        c.loss_round_start = false;
        self.bw.bw_latest = self.bw.bw_latest.max(self.rs.delivery_rate);
        self.volume.inflight_latest = self.volume.inflight_latest.max(self.rs.delivered);
        if self.rs.prior_delivered >= c.loss_round_delivered {
            c.loss_round_delivered = self.delivered;
            c.loss_round_start = true;
            // Close the books on the loss round that just ended (for CheckStartupHighLoss).
            c.prev_round_loss_events = c.round_loss_events;
            c.prev_round_lost_bytes = c.round_lost_bytes;
            c.prev_round_delivered = self.delivered.saturating_sub(c.round_start_delivered);
            c.prev_round_ecn = c.ecn_in_round;
            c.ecn_in_round = false;
            let max_rtt = c.round_max_rtt.take();
            self.learn_loss_baseline(max_rtt);
            let c = &mut self.congestion;
            c.round_loss_events = 0;
            c.round_lost_bytes = 0;
            c.round_start_delivered = self.delivered;
        }
    }

    /// `AdvanceLatestDeliverySignals()`: "Near end of ACK processing".
    pub(super) fn advance_latest_delivery_signals(&mut self) {
        //# if (BBR.loss_round_start)
        //#   BBR.bw_latest       = RS.delivery_rate
        //#   BBR.inflight_latest = RS.delivered
        if self.congestion.loss_round_start {
            self.bw.bw_latest = self.rs.delivery_rate;
            self.volume.inflight_latest = self.rs.delivered;
        }
    }

    /// `ResetCongestionSignals()`.
    pub(super) fn reset_congestion_signals(&mut self) {
        //# BBR.is_loss_in_round = false
        //# BBR.bw_latest = 0
        //# BBR.inflight_latest = 0
        self.congestion.is_loss_in_round = false;
        self.bw.bw_latest = 0.0;
        self.volume.inflight_latest = 0;
    }

    /// `UpdateCongestionSignals()`: "Update congestion state on every ACK".
    pub(super) fn update_congestion_signals(&mut self) {
        //# UpdateMaxBw()
        //# if (!BBR.loss_round_start)
        //#   return  /* wait until end of round trip */
        //# AdaptLowerBoundsFromCongestion()  /* once per round, adapt */
        //# BBR.is_loss_in_round = false
        self.update_max_bw();
        if !self.congestion.loss_round_start {
            return;
        }
        self.adapt_lower_bounds_from_congestion();
        self.congestion.is_loss_in_round = false;
    }

    /// `AdaptLowerBoundsFromCongestion()`: "Once per round trip respond to congestion".
    fn adapt_lower_bounds_from_congestion(&mut self) {
        //# if (IsProbingBW())
        //#   return
        //# if (BBR.is_loss_in_round)
        //#   InitLowerBounds()
        //#   LossLowerBounds()
        if self.is_probing_bw() {
            return;
        }
        if self.congestion.is_loss_in_round && self.round_was_congested() {
            self.init_lower_bounds();
            self.loss_lower_bounds();
        }
    }

    /// The loss rate above which probing counts as "too high": `BBR.LossThresh`, plus the
    /// path's non-congestive loss rate when random-loss tolerance is on.
    pub(super) fn loss_thresh(&self) -> f64 {
        LOSS_THRESH + self.loss_baseline()
    }

    /// The path's non-congestive ("random") loss rate, learned from loss rounds with no
    /// queue (every RTT sample within `max(min_rtt / 8, 1 ms)` of min_rtt). Always 0 when
    /// [`BbrConfig::random_loss_tolerance`](super::BbrConfig::random_loss_tolerance) is off.
    ///
    /// This is an AMST extension, not in the draft: BBRv3 treats every loss as congestion,
    /// so on a path with 1% random loss its short-term model pulls `bw_shortterm` down a
    /// little every round, and at 5% its probes stop at once. Loss that happens with no
    /// queue at all is not caused by this flow's sending rate, so it is measured and
    /// subtracted: probing tolerates `BBR.LossThresh` *above* it, and the short-term model
    /// reacts to a round whose loss rate exceeds twice it. With no random loss the baseline
    /// is 0 and the draft's behaviour is unchanged.
    pub(super) fn loss_baseline(&self) -> f64 {
        if !self.config.random_loss_tolerance {
            return 0.0;
        }
        let c = &self.congestion;
        if c.base_total < BASELINE_MIN_PACKETS * self.mss as f64 {
            return 0.0;
        }
        (c.base_lost / c.base_total).min(BASELINE_MAX)
    }

    /// Whether the loss round that just ended shows congestion rather than only the path's
    /// background loss (always true in draft mode, and for CE marks).
    fn round_was_congested(&self) -> bool {
        let c = &self.congestion;
        let base = self.loss_baseline();
        if base == 0.0 || c.prev_round_ecn {
            return true;
        }
        let total = c
            .prev_round_delivered
            .saturating_add(c.prev_round_lost_bytes);
        total > 0 && c.prev_round_lost_bytes as f64 > 2.0 * base * total as f64
    }

    /// Fold the loss round that just ended into the baseline if it was queue-free.
    fn learn_loss_baseline(&mut self, round_max_rtt: Option<Duration>) {
        if !self.config.random_loss_tolerance {
            return;
        }
        let (Some(max_rtt), Some(min_rtt)) = (round_max_rtt, self.volume.min_rtt) else {
            return;
        };
        let slack = (min_rtt / 8).max(Duration::from_millis(1));
        if max_rtt > min_rtt + slack || self.congestion.prev_round_ecn {
            return;
        }
        let c = &mut self.congestion;
        let lost = c.prev_round_lost_bytes as f64;
        c.base_lost += lost;
        c.base_total += lost + c.prev_round_delivered as f64;
        let cap = 2.0 * BASELINE_HALF_LIFE_PACKETS * self.mss as f64;
        if c.base_total > cap {
            c.base_lost /= 2.0;
            c.base_total /= 2.0;
        }
    }

    /// `InitLowerBounds()`: "Handle the first congestion episode in this cycle".
    fn init_lower_bounds(&mut self) {
        //# if (BBR.bw_shortterm == Infinity)
        //#   BBR.bw_shortterm = BBR.max_bw
        //# if (BBR.inflight_shortterm == Infinity)
        //#   BBR.inflight_shortterm = C.cwnd
        if self.bw.bw_shortterm.is_infinite() {
            self.bw.bw_shortterm = self.bw.max_bw();
        }
        if self.volume.inflight_shortterm == u64::MAX {
            self.volume.inflight_shortterm = self.cwnd;
        }
    }

    /// `LossLowerBounds()`: "Adjust model once per round based on loss".
    fn loss_lower_bounds(&mut self) {
        //# BBR.bw_shortterm       = max(BBR.bw_latest,
        //#                       BBR.Beta * BBR.bw_shortterm)
        //# BBR.inflight_shortterm = max(BBR.inflight_latest,
        //#                       BBR.Beta * BBR.inflight_shortterm)
        self.bw.bw_shortterm = self.bw.bw_latest.max(BETA * self.bw.bw_shortterm);
        self.volume.inflight_shortterm = self
            .volume
            .inflight_latest
            .max(to_bytes(BETA * self.volume.inflight_shortterm as f64));
    }

    /// `ResetShortTermModel()`.
    pub(super) fn reset_short_term_model(&mut self) {
        //# BBR.bw_shortterm       = Infinity
        //# BBR.inflight_shortterm = Infinity
        self.bw.bw_shortterm = f64::INFINITY;
        self.volume.inflight_shortterm = u64::MAX;
    }
}

/// `InflightAtLoss(P)`: "At what prefix of "packet" P did losses exceed BBR.LossThresh?"
pub(super) fn inflight_at_loss(size: u64, tx_in_flight: u64, lost: u64, loss_thresh: f64) -> u64 {
    //# size = P.size
    //# /* What was in flight before this packet? */
    //# inflight_prev = RS.tx_in_flight - size
    //# /* What was lost before this packet? */
    //# lost_prev = RS.lost - size
    //# lost_prefix = (BBR.LossThresh * inflight_prev - lost_prev) /
    //#               (1 - BBR.LossThresh)
    //# /* At what C.inflight value did losses cross BBR.LossThresh? */
    //# inflight_at_loss = inflight_prev + lost_prefix
    //# return inflight_at_loss
    let inflight_prev = tx_in_flight.saturating_sub(size) as f64;
    let lost_prev = lost.saturating_sub(size) as f64;
    let lost_prefix = (loss_thresh * inflight_prev - lost_prev) / (1.0 - loss_thresh);
    to_bytes(inflight_prev + lost_prefix)
}

#[cfg(test)]
mod tests {
    use super::inflight_at_loss;

    #[test]
    fn inflight_at_loss_solves_for_the_threshold_crossing() {
        // 100 packets before P, none lost before it: losses cross 2% after ~2.04 more.
        let v = inflight_at_loss(1, 101, 1, 0.02);
        assert_eq!(v, 102);
        // Already 5 lost among the 100 before: the threshold was crossed earlier.
        assert!(inflight_at_loss(1, 101, 6, 0.02) < 100);
    }
}
