//! ProbeBW and its four phases, DOWN, CRUISE, REFILL and UP (draft §"ProbeBW").
//!
//! "In the ProbeBW states, a BBR flow sequentially accelerates, decelerates, and cruises, to
//! measure the network path, improve its operating point (increase throughput and reduce
//! queue pressure), and converge toward a more fair allocation of bottleneck bandwidth."

use std::time::{Duration, Instant};

use super::{Bbr, DEFAULT_CWND_GAIN, State};

/// ProbeBW_DOWN's pacing gain: "sending at 90% of BBR.bw".
pub const PROBE_DOWN_PACING_GAIN: f64 = 0.90;
/// ProbeBW_CRUISE's and ProbeBW_REFILL's pacing gain.
pub const PROBE_CRUISE_PACING_GAIN: f64 = 1.0;
/// ProbeBW_UP's pacing gain: "using a BBR.pacing_gain of 1.25".
pub const PROBE_UP_PACING_GAIN: f64 = 1.25;
/// ProbeBW_UP's cwnd gain: "It also raises BBR.cwnd_gain to 2.25".
pub const PROBE_UP_CWND_GAIN: f64 = 2.25;
/// `IsRenoCoexistenceProbeTime()`: "rounds = min(reno_rounds, 63)".
const MAX_RENO_ROUNDS: u64 = 63;

/// `BBR.ack_phase`: "the meaning of the ACK feedback the connection is receiving, with respect
/// to the bandwidth probing".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckPhase {
    /// `ACKS_INIT`: not probing bandwidth; not getting probe feedback.
    Init,
    /// `ACKS_REFILLING`: sending at estimated bandwidth to fill pipe.
    Refilling,
    /// `ACKS_PROBE_STARTING`: inflight rising to probe bandwidth.
    ProbeStarting,
    /// `ACKS_PROBE_FEEDBACK`: getting feedback from bandwidth probing.
    ProbeFeedback,
    /// `ACKS_PROBE_STOPPING`: stopped bandwidth probing; still getting feedback.
    ProbeStopping,
}

#[derive(Clone, Debug)]
pub(super) struct ProbeBw {
    pub(super) ack_phase: AckPhase,
    /// `BBR.is_bw_probe_sample`.
    pub(super) is_bw_probe_sample: bool,
    /// `BBR.bw_probe_up_acked`.
    pub(super) bw_probe_up_acked: u64,
    /// `BBR.probe_up_acked_per_inc` (`u64::MAX` is "Infinity").
    pub(super) probe_up_acked_per_inc: u64,
    /// `BBR.bw_probe_up_rounds`.
    pub(super) bw_probe_up_rounds: u32,
    /// `BBR.rounds_since_probe_up`.
    pub(super) rounds_since_probe_up: u64,
    /// `BBR.bw_probe_wait`.
    pub(super) bw_probe_wait: Duration,
    /// `BBR.cycle_stamp`.
    pub(super) cycle_stamp: Instant,
    /// `BBR.prev_probe_too_high`.
    pub(super) prev_probe_too_high: bool,
    /// `BBR.prev_probe_precautionary`.
    pub(super) prev_probe_precautionary: bool,
}

impl ProbeBw {
    pub(super) fn new(now: Instant) -> Self {
        //# BBR.probe_up_acked_per_inc = Infinity
        //# BBR.bw_probe_up_acked = 0
        //# BBR.bw_probe_up_rounds = 0
        //# BBR.rounds_since_probe_up = 0
        //# BBR.is_bw_probe_sample = false
        //# BBR.prev_probe_too_high = false
        //# BBR.prev_probe_precautionary = false
        //# BBR.ack_phase = ACKS_INIT
        //# BBR.cycle_stamp = 0
        //# BBR.bw_probe_wait = 0
        Self {
            ack_phase: AckPhase::Init,
            is_bw_probe_sample: false,
            bw_probe_up_acked: 0,
            probe_up_acked_per_inc: u64::MAX,
            bw_probe_up_rounds: 0,
            rounds_since_probe_up: 0,
            bw_probe_wait: Duration::ZERO,
            cycle_stamp: now,
            prev_probe_too_high: false,
            prev_probe_precautionary: false,
        }
    }
}

impl Bbr {
    /// `EnterProbeBW()`.
    pub(super) fn enter_probe_bw(&mut self, now: Instant) {
        //# EnterProbeBW():
        //#   BBR.cwnd_gain = BBR.DefaultCwndGain
        //#   StartProbeBW_DOWN()
        self.cwnd_gain = DEFAULT_CWND_GAIN;
        self.start_probe_bw_down(now);
    }

    /// `StartProbeBW_DOWN()`.
    pub(super) fn start_probe_bw_down(&mut self, now: Instant) {
        //# StartProbeBW_DOWN():
        //#   ResetCongestionSignals()
        //#   BBR.probe_up_acked_per_inc = Infinity /* not growing BBR.inflight_longterm */
        //#   PickProbeWait()
        //#   BBR.cycle_stamp = Now()  /* start wall clock */
        //#   BBR.ack_phase  = ACKS_PROBE_STOPPING
        //#   StartRound()
        //#   BBR.state = ProbeBW_DOWN
        self.reset_congestion_signals();
        self.probe_bw.probe_up_acked_per_inc = u64::MAX;
        self.pick_probe_wait();
        self.probe_bw.cycle_stamp = now;
        self.probe_bw.ack_phase = AckPhase::ProbeStopping;
        self.start_round();
        self.set_state(State::ProbeBwDown);
        // Gains per the draft's "Summary of Control Behavior" table.
        self.pacing_gain = PROBE_DOWN_PACING_GAIN;
        self.cwnd_gain = DEFAULT_CWND_GAIN;
    }

    /// `StartProbeBW_CRUISE()`.
    pub(super) fn start_probe_bw_cruise(&mut self) {
        //# StartProbeBW_CRUISE():
        //#   BBR.state = ProbeBW_CRUISE
        self.set_state(State::ProbeBwCruise);
        self.pacing_gain = PROBE_CRUISE_PACING_GAIN;
        self.cwnd_gain = DEFAULT_CWND_GAIN;
    }

    /// `StartProbeBW_REFILL()`.
    pub(super) fn start_probe_bw_refill(&mut self) {
        //# StartProbeBW_REFILL():
        //#   ResetShortTermModel()
        //#   BBR.bw_probe_up_rounds = 0
        //#   BBR.bw_probe_up_acked = 0
        //#   BBR.prev_probe_precautionary = false
        //#   BBR.ack_phase = ACKS_REFILLING
        //#   StartRound()
        //#   BBR.state = ProbeBW_REFILL
        self.reset_short_term_model();
        self.probe_bw.bw_probe_up_rounds = 0;
        self.probe_bw.bw_probe_up_acked = 0;
        self.probe_bw.prev_probe_precautionary = false;
        self.probe_bw.ack_phase = AckPhase::Refilling;
        self.start_round();
        self.set_state(State::ProbeBwRefill);
        self.pacing_gain = PROBE_CRUISE_PACING_GAIN;
        self.cwnd_gain = DEFAULT_CWND_GAIN;
    }

    /// `StartProbeBW_UP()`.
    pub(super) fn start_probe_bw_up(&mut self) {
        //# StartProbeBW_UP():
        //#   BBR.ack_phase = ACKS_PROBE_STARTING
        //#   StartRound()
        //#   ResetFullBW()
        //#   BBR.full_bw = RS.delivery_rate
        //#   BBR.state = ProbeBW_UP
        //#   RaiseInflightLongtermSlope()
        self.probe_bw.ack_phase = AckPhase::ProbeStarting;
        self.start_round();
        self.reset_full_bw();
        self.full_pipe.full_bw = self.rs.delivery_rate;
        self.set_state(State::ProbeBwUp);
        self.pacing_gain = PROBE_UP_PACING_GAIN;
        self.cwnd_gain = PROBE_UP_CWND_GAIN;
        self.raise_inflight_longterm_slope();
    }

    /// `UpdateProbeBWCyclePhase()`: "The core state machine logic for ProbeBW".
    pub(super) fn update_probe_bw_cycle_phase(&mut self, now: Instant) {
        //# if (!BBR.full_bw_reached)
        //#   return  /* only handling steady-state behavior here */
        //# if (AdaptLongTermModel())
        //#   return  /* already decided state transition */
        //# if (!IsInAProbeBWState())
        //#   return /* only handling ProbeBW states here: */
        if !self.full_pipe.full_bw_reached {
            return;
        }
        if self.adapt_long_term_model() {
            return;
        }
        match self.state {
            //# ProbeBW_DOWN:
            //#   if (IsTimeToProbeBW())
            //#     return /* already decided state transition */
            //#   if (IsTimeToCruise())
            //#     StartProbeBW_CRUISE()
            State::ProbeBwDown => {
                if self.is_time_to_probe_bw(now) {
                    return;
                }
                if self.is_time_to_cruise() {
                    self.start_probe_bw_cruise();
                }
            }
            //# ProbeBW_CRUISE:
            //#   if (IsTimeToProbeBW())
            //#     return /* already decided state transition */
            State::ProbeBwCruise => {
                self.is_time_to_probe_bw(now);
            }
            //# ProbeBW_REFILL:
            //#   /* After one round of REFILL, start UP */
            //#   if (BBR.round_start)
            //#     BBR.is_bw_probe_sample = true
            //#     StartProbeBW_UP()
            State::ProbeBwRefill => {
                if self.round.round_start {
                    self.probe_bw.is_bw_probe_sample = true;
                    self.start_probe_bw_up();
                }
            }
            //# ProbeBW_UP:
            //#   if (IsTimeToGoDown())
            //#     BBR.prev_probe_too_high = false  /* no high loss (yet) */
            //#     StartProbeBW_DOWN()
            State::ProbeBwUp => {
                if self.is_time_to_go_down() {
                    self.probe_bw.prev_probe_too_high = false;
                    self.start_probe_bw_down(now);
                }
            }
            State::Startup | State::Drain | State::ProbeRtt => {}
        }
    }

    /// `IsTimeToCruise()`: "Time to transition from DOWN to CRUISE?"
    fn is_time_to_cruise(&self) -> bool {
        //# if (C.inflight > InflightWithHeadroom())
        //#   return false /* not enough headroom */
        //# if (C.inflight > Inflight(BBR.max_bw, 1.0))
        //#   return false /* C.inflight > estimated BDP */
        //# return true
        if self.inflight > self.inflight_with_headroom_raw() {
            return false;
        }
        let bdp_at_max_bw = match self.volume.min_rtt {
            Some(rtt) => super::data_volume::to_bytes(self.bw.max_bw() * rtt.as_secs_f64()),
            None => self.config.initial_cwnd,
        };
        self.inflight <= self.quantization_budget(bdp_at_max_bw)
    }

    /// `IsTimeToGoDown()`: "Time to transition from UP to DOWN?"
    fn is_time_to_go_down(&mut self) -> bool {
        //# /* Precautionary Bandwidth Probing: Deceleration */
        //# if (BBR.prev_probe_too_high && C.inflight >= BBR.inflight_longterm)
        //#   BBR.prev_probe_precautionary = true
        //#   return true
        //# if (C.is_cwnd_limited && C.cwnd >= BBR.inflight_longterm)
        //#   ResetFullBW()   /* bw is limited by BBR.inflight_longterm */
        //#   BBR.full_bw = RS.delivery_rate
        //# else if (BBR.full_bw_now)
        //#   return true  /* we estimate we've fully used path bw */
        //# return false
        if self.probe_bw.prev_probe_too_high && self.inflight >= self.volume.inflight_longterm {
            self.probe_bw.prev_probe_precautionary = true;
            return true;
        }
        if self.is_cwnd_limited() && self.cwnd >= self.volume.inflight_longterm {
            self.reset_full_bw();
            self.full_pipe.full_bw = self.rs.delivery_rate;
        } else if self.full_pipe.full_bw_now {
            return true;
        }
        false
    }

    /// `IsProbingBW()`.
    pub(super) fn is_probing_bw(&self) -> bool {
        //# return (BBR.state == Startup or
        //#         BBR.state == ProbeBW_REFILL or
        //#         BBR.state == ProbeBW_UP)
        matches!(
            self.state,
            State::Startup | State::ProbeBwRefill | State::ProbeBwUp
        )
    }

    /// `HasElapsedInPhase(interval)`.
    fn has_elapsed_in_phase(&self, now: Instant, interval: Duration) -> bool {
        //# return Now() > BBR.cycle_stamp + interval
        now > self.probe_bw.cycle_stamp + interval
    }

    /// `RaiseInflightLongtermSlope()`.
    fn raise_inflight_longterm_slope(&mut self) {
        //# growth_this_round = 1 << BBR.bw_probe_up_rounds
        //# BBR.bw_probe_up_rounds = min(BBR.bw_probe_up_rounds + 1, 30)
        //# BBR.probe_up_acked_per_inc = max(C.cwnd / growth_this_round, C.SMSS)
        let growth_this_round = 1u64 << self.probe_bw.bw_probe_up_rounds;
        self.probe_bw.bw_probe_up_rounds = (self.probe_bw.bw_probe_up_rounds + 1).min(30);
        self.probe_bw.probe_up_acked_per_inc = (self.cwnd / growth_this_round).max(self.mss);
    }

    /// `ProbeInflightLongtermUpward()`.
    fn probe_inflight_longterm_upward(&mut self) {
        //# if (!C.is_cwnd_limited || C.cwnd < BBR.inflight_longterm)
        //#   return  /* not fully using BBR.inflight_longterm, so don't grow it */
        //# BBR.bw_probe_up_acked += RS.newly_acked
        //# if (BBR.bw_probe_up_acked >= BBR.probe_up_acked_per_inc)
        //#   delta = BBR.bw_probe_up_acked / BBR.probe_up_acked_per_inc
        //#   BBR.bw_probe_up_acked -= delta * BBR.probe_up_acked_per_inc
        //#   BBR.inflight_longterm += delta * C.SMSS
        //# if (BBR.round_start)
        //#   RaiseInflightLongtermSlope()
        if !self.is_cwnd_limited() || self.cwnd < self.volume.inflight_longterm {
            return;
        }
        let p = &mut self.probe_bw;
        p.bw_probe_up_acked = p.bw_probe_up_acked.saturating_add(self.rs.newly_acked);
        if p.bw_probe_up_acked >= p.probe_up_acked_per_inc {
            let per_inc = p.probe_up_acked_per_inc.max(1);
            let delta = p.bw_probe_up_acked / per_inc;
            p.bw_probe_up_acked -= delta * per_inc;
            self.volume.inflight_longterm = self
                .volume
                .inflight_longterm
                .saturating_add(delta.saturating_mul(self.mss));
        }
        if self.round.round_start {
            self.raise_inflight_longterm_slope();
        }
    }

    /// `AdaptLongTermModel()`: "Track ACK state and update BBR.max_bw window and
    /// BBR.inflight_longterm. Returns true if it decided a state transition".
    fn adapt_long_term_model(&mut self) -> bool {
        //# if (BBR.ack_phase == ACKS_PROBE_STARTING && BBR.round_start)
        //#   /* starting to get bw probing samples */
        //#   BBR.ack_phase = ACKS_PROBE_FEEDBACK
        if self.probe_bw.ack_phase == AckPhase::ProbeStarting && self.round.round_start {
            self.probe_bw.ack_phase = AckPhase::ProbeFeedback;
        }
        //# if (BBR.ack_phase == ACKS_PROBE_STOPPING && BBR.round_start)
        //#   /* end of samples from bw probing phase */
        //#   BBR.is_bw_probe_sample = false
        //#   BBR.ack_phase = ACKS_INIT
        //#   if (IsInAProbeBWState() && !RS.is_app_limited)
        //#     AdvanceMaxBwFilter()
        //#   /* Precautionary Bandwidth Probing: Acceleration */
        //#   if (IsInAProbeBWState() &&
        //#       BBR.prev_probe_precautionary &&
        //#       !BBR.prev_probe_too_high)
        //#     StartProbeBW_REFILL()
        //#     return true
        if self.probe_bw.ack_phase == AckPhase::ProbeStopping && self.round.round_start {
            self.probe_bw.is_bw_probe_sample = false;
            self.probe_bw.ack_phase = AckPhase::Init;
            if self.state.is_probe_bw() && !self.rs.is_app_limited {
                self.advance_max_bw_filter();
            }
            if self.state.is_probe_bw()
                && self.probe_bw.prev_probe_precautionary
                && !self.probe_bw.prev_probe_too_high
            {
                self.start_probe_bw_refill();
                return true;
            }
        }
        //# if (!IsInflightTooHigh())
        //#   /* Loss rate is safe. Adjust upper bounds upward. */
        //#   if (BBR.inflight_longterm == Infinity)
        //#     return false /* no upper bounds to raise */
        //#   if (RS.tx_in_flight > BBR.inflight_longterm)
        //#     BBR.inflight_longterm = RS.tx_in_flight
        //#   if (BBR.state == ProbeBW_UP)
        //#     ProbeInflightLongtermUpward()
        //# return false
        if !self.is_inflight_too_high(self.rs.lost, self.rs.tx_in_flight) {
            if self.volume.inflight_longterm == u64::MAX {
                return false;
            }
            if self.rs.tx_in_flight > self.volume.inflight_longterm {
                self.volume.inflight_longterm = self.rs.tx_in_flight;
            }
            if self.state == State::ProbeBwUp {
                self.probe_inflight_longterm_upward();
            }
        }
        false
    }

    /// `IsTimeToProbeBW()`: "Is it time to transition from DOWN or CRUISE to REFILL?"
    fn is_time_to_probe_bw(&mut self, now: Instant) -> bool {
        //# if (HasElapsedInPhase(BBR.bw_probe_wait) ||
        //#     IsRenoCoexistenceProbeTime())
        //#   StartProbeBW_REFILL()
        //#   return true
        //# return false
        if self.has_elapsed_in_phase(now, self.probe_bw.bw_probe_wait)
            || self.is_reno_coexistence_probe_time()
        {
            self.start_probe_bw_refill();
            return true;
        }
        false
    }

    /// `PickProbeWait()`: "Randomized decision about how long to wait until probing for
    /// bandwidth, using round count and wall clock."
    fn pick_probe_wait(&mut self) {
        //# /* Decide random round-trip bound for wait: */
        //# BBR.rounds_since_probe_up =
        //#   random_int_between(0, 1); /* 0 or 1 */
        //# /* Decide the random wall clock bound for wait: */
        //# BBR.bw_probe_wait =
        //#   2 + random_float_between(0.0, 1.0) /* 0..1 sec */
        self.probe_bw.rounds_since_probe_up = self.rng.next_u64() & 1;
        self.probe_bw.bw_probe_wait = Duration::from_secs_f64(2.0 + self.rng.next_f64());
    }

    /// `IsRenoCoexistenceProbeTime()`.
    fn is_reno_coexistence_probe_time(&self) -> bool {
        //# reno_rounds = TargetInflight()
        //# rounds = min(reno_rounds, 63)
        //# return BBR.rounds_since_probe_up >= rounds
        // TargetInflight() is a volume; Reno grows by one packet per round, so in rounds it is
        // the target in packets.
        let reno_rounds = self.target_inflight() / self.mss;
        let rounds = reno_rounds.min(MAX_RENO_ROUNDS);
        self.probe_bw.rounds_since_probe_up >= rounds
    }
}
