//! Loss recovery: saving and restoring cwnd, RTO-style collapse, and undo after a spurious
//! recovery (draft §"Modulating cwnd in Loss Recovery" and §"Updating the Model Upon
//! Detecting a Spurious Loss Recovery").
//!
//! "BBR interprets loss as a hint that there may be recent changes in path behavior that are
//! not yet fully reflected in its model of the path, and thus it needs to be more
//! conservative."

use std::time::Instant;

use super::{Bbr, State};
use crate::Loss;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Recovery {
    /// `InLossRecovery()`.
    pub(super) in_recovery: bool,
    /// When the current episode began; losses of packets sent before it belong to it.
    pub(super) start_time: Option<Instant>,
    /// `C.delivered` when the episode began: an ack of a packet sent after that ends it.
    pub(super) start_delivered: u64,
    /// `BBR.round_count` when the episode began.
    pub(super) start_round: u64,
    /// `BBR.prior_cwnd`: the last known good cwnd.
    pub(super) prior_cwnd: u64,
    /// `BBR.undo_state`.
    pub(super) undo_state: Option<State>,
    /// `BBR.undo_bw_shortterm`.
    pub(super) undo_bw_shortterm: f64,
    /// `BBR.undo_inflight_shortterm`.
    pub(super) undo_inflight_shortterm: u64,
    /// `BBR.undo_inflight_longterm`.
    pub(super) undo_inflight_longterm: u64,
    /// What `SaveStateUponLoss()` would save if the loss event the transport is reporting
    /// opens a recovery episode: the model just before its first lost packet.
    pub(super) pre_loss: Option<PreLoss>,
}

/// The model as it was before the current loss event's first lost packet.
///
/// The draft saves state when a recovery episode starts (`OnEnterFastRecovery()`,
/// `OnEnterRTO()`) and then handles the lost packets (`HandleLostPacket()`), which may end a
/// probe and set `BBR.undo_state = ProbeBW_UP`. Transports report the lost packets first
/// and the event after them (RFC 9002 declares packets lost, then reacts), so saving at
/// [`CongestionController::on_loss`](crate::CongestionController::on_loss) would record the
/// model the losses already lowered, and erase the `undo_state` they set: an undo would then
/// restore nothing. Keeping the pre-event model gives the draft's order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct PreLoss {
    cwnd: u64,
    bw_shortterm: f64,
    inflight_shortterm: u64,
    inflight_longterm: u64,
    /// `BBR.undo_state` as the lost packets of this event left it, had the save come first.
    undo_state: Option<State>,
}

impl Bbr {
    /// Start a recovery episode if this loss is not part of the current one (a packet sent
    /// after the episode began was lost), per `OnEnterFastRecovery()` or `OnEnterRTO()`.
    pub(super) fn maybe_enter_recovery(&mut self, now: Instant, loss: &Loss) {
        let new_episode = match (self.recovery.in_recovery, self.recovery.start_time) {
            (true, Some(start)) => loss.largest_lost_sent_at > start,
            _ => true,
        };
        let pre_loss = self.recovery.pre_loss;
        if loss.persistent_congestion {
            //# OnEnterRTO():
            //#   SaveCwnd()
            //#   SaveStateUponLoss()
            //#   C.cwnd = C.inflight + 1
            // "reduces C.cwnd to a value that will allow 1 C.SMSS to be transmitted"
            self.save_state_before_loss_event(pre_loss);
            self.cwnd = self.inflight.saturating_add(self.mss);
        } else if new_episode {
            //# OnEnterFastRecovery():
            //#   SaveCwnd()
            //#   SaveStateUponLoss()
            self.save_state_before_loss_event(pre_loss);
        }
        if new_episode || loss.persistent_congestion {
            self.recovery.in_recovery = true;
            self.recovery.start_time = Some(now);
            self.recovery.start_delivered = self.delivered;
            self.recovery.start_round = self.round.round_count;
        }
    }

    /// Remember the model before the first lost packet of a loss event (see [`PreLoss`]).
    pub(super) fn note_loss_event_start(&mut self) {
        if self.recovery.pre_loss.is_none() {
            self.recovery.pre_loss = Some(PreLoss {
                cwnd: self.cwnd,
                bw_shortterm: self.bw.bw_shortterm,
                inflight_shortterm: self.volume.inflight_shortterm,
                inflight_longterm: self.volume.inflight_longterm,
                undo_state: None,
            });
        }
    }

    /// `BBR.undo_state` was set by a lost packet of the event in progress.
    pub(super) fn note_loss_event_undo_state(&mut self, state: State) {
        if let Some(p) = &mut self.recovery.pre_loss {
            p.undo_state = Some(state);
        }
    }

    /// A loss event is over (or an ack arrived without one): forget its pre-loss model.
    pub(super) fn end_loss_event(&mut self) {
        self.recovery.pre_loss = None;
    }

    /// `SaveCwnd()` and `SaveStateUponLoss()` as of just before the loss event, then the
    /// event's own effect on `BBR.undo_state`; without per-packet reports, as of now.
    ///
    /// `NoteLoss()` saves through here too: a lost packet that ends a probe resets the
    /// congestion signals (`StartProbeBW_DOWN()` calls `ResetCongestionSignals()`), so the
    /// event's next lost packet counts as a round's first loss and would save the model this
    /// event already lowered, with `undo_state` cleared, and no undo could return to PROBE_UP
    /// as the draft's "Handling Spurious Fast Recovery" case expects.
    pub(super) fn save_state_before_loss_event(&mut self, pre_loss: Option<PreLoss>) {
        //# /* Save state in case a loss episode is later declared spurious */
        //# SaveStateUponLoss():
        //#   SaveCwnd()
        //#   BBR.undo_state              = None
        //#   BBR.undo_bw_shortterm       = BBR.bw_shortterm
        //#   BBR.undo_inflight_shortterm = BBR.inflight_shortterm
        //#   BBR.undo_inflight_longterm  = BBR.inflight_longterm
        // ... with the values from before the event's first lost packet, then that packet's
        //# HandleInflightTooHigh(): ... if (BBR.state == ProbeBW_UP) BBR.undo_state = ProbeBW_UP
        let Some(pre) = pre_loss else {
            self.save_cwnd();
            self.save_state_upon_loss();
            return;
        };
        let cwnd_now = self.cwnd;
        self.cwnd = pre.cwnd;
        self.save_cwnd();
        self.cwnd = cwnd_now;
        self.recovery.undo_bw_shortterm = pre.bw_shortterm;
        self.recovery.undo_inflight_shortterm = pre.inflight_shortterm;
        self.recovery.undo_inflight_longterm = pre.inflight_longterm;
        self.recovery.undo_state = pre.undo_state;
    }

    /// Leave recovery once a packet sent after it began is acknowledged, restoring cwnd:
    /// "When BBR exits loss recovery it restores C.cwnd to the "last known good" value that
    /// C.cwnd held before entering recovery."
    pub(super) fn check_recovery_exit(&mut self) {
        if self.recovery.in_recovery && self.rs.prior_delivered > self.recovery.start_delivered {
            self.recovery.in_recovery = false;
            self.restore_cwnd();
        }
    }

    /// `SaveCwnd()`.
    pub(super) fn save_cwnd(&mut self) {
        //# SaveCwnd():
        //#   if (!InLossRecovery() && BBR.state != ProbeRTT)
        //#     BBR.prior_cwnd = C.cwnd
        //#   else
        //#     BBR.prior_cwnd = max(BBR.prior_cwnd, C.cwnd)
        if !self.recovery.in_recovery && self.state != State::ProbeRtt {
            self.recovery.prior_cwnd = self.cwnd;
        } else {
            self.recovery.prior_cwnd = self.recovery.prior_cwnd.max(self.cwnd);
        }
    }

    /// `RestoreCwnd()`.
    pub(super) fn restore_cwnd(&mut self) {
        //# RestoreCwnd():
        //#   C.cwnd = max(C.cwnd, BBR.prior_cwnd)
        self.cwnd = self.cwnd.max(self.recovery.prior_cwnd);
    }

    /// `SaveStateUponLoss()`: "Save state in case a loss episode is later declared spurious".
    pub(super) fn save_state_upon_loss(&mut self) {
        //# SaveCwnd()
        //# BBR.undo_state              = None
        //# BBR.undo_bw_shortterm       = BBR.bw_shortterm
        //# BBR.undo_inflight_shortterm = BBR.inflight_shortterm
        //# BBR.undo_inflight_longterm  = BBR.inflight_longterm
        self.save_cwnd();
        self.recovery.undo_state = None;
        self.recovery.undo_bw_shortterm = self.bw.bw_shortterm;
        self.recovery.undo_inflight_shortterm = self.volume.inflight_shortterm;
        self.recovery.undo_inflight_longterm = self.volume.inflight_longterm;
    }

    /// `HandleSpuriousLossDetection()`: "Handle a declaration of a spurious loss episode".
    pub(super) fn handle_spurious_loss_detection(&mut self) {
        //# RestoreCwnd()
        //# BBR.is_loss_in_round = false
        //# ResetFullBW()
        //# BBR.bw_shortterm       = max(BBR.bw_shortterm, BBR.undo_bw_shortterm)
        //# BBR.inflight_shortterm = max(BBR.inflight_shortterm, BBR.undo_inflight_shortterm)
        //# BBR.inflight_longterm  = max(BBR.inflight_longterm, BBR.undo_inflight_longterm)
        //# /* If flow was probing bandwidth, return to that state: */
        //# if (BBR.undo_state == Startup && BBR.state != Startup)
        //#   BBR.full_bw_reached = false
        //#   if (BBR.state != ProbeRTT)
        //#     EnterStartup()
        //# else if (BBR.undo_state == ProbeBW_UP && BBR.state != ProbeBW_UP)
        //#   if (BBR.state != ProbeRTT)
        //#     StartProbeBW_REFILL()
        //# BBR.undo_state = None
        self.restore_cwnd();
        self.recovery.in_recovery = false;
        self.congestion.is_loss_in_round = false;
        self.reset_full_bw();
        self.bw.bw_shortterm = self.bw.bw_shortterm.max(self.recovery.undo_bw_shortterm);
        self.volume.inflight_shortterm = self
            .volume
            .inflight_shortterm
            .max(self.recovery.undo_inflight_shortterm);
        self.volume.inflight_longterm = self
            .volume
            .inflight_longterm
            .max(self.recovery.undo_inflight_longterm);
        match self.recovery.undo_state {
            Some(State::Startup) if self.state != State::Startup => {
                self.full_pipe.full_bw_reached = false;
                if self.state != State::ProbeRtt {
                    self.enter_startup();
                }
            }
            Some(State::ProbeBwUp)
                if self.state != State::ProbeBwUp && self.state != State::ProbeRtt =>
            {
                self.start_probe_bw_refill();
            }
            _ => {}
        }
        self.recovery.undo_state = None;
    }
}
