//! A hybrid session's bookkeeping of its lanes, sans-IO: which transports belong to the
//! session and where each stands in the Retire handshake, the Attach rounds that move the
//! session to a new route, and the parting Bye.
//!
//! The async session feeds a [`Roster`] what happened (a frame arrived, a send went out, a
//! transport ended) and does what the returned step says (send a frame, close a transport,
//! install a route). Every decision about those frames is made here, under one lock, so the
//! two Retires that cross on a lane cannot both miss each other.
//!
//! The roster is generic over the lane handle `L` it keeps (the session keeps `Arc<Lane>`;
//! the tests keep names).

use std::collections::BTreeMap;

use crate::ledger::LaneId;

/// Where one lane stands. Only an `Open` lane may join a new route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneState {
    /// Carrying traffic, or able to (a warm lane that a switch left open).
    Open,
    /// A switch left it behind; our Retire is on its way out.
    Retiring,
    /// We sent Retire ("nothing more from me here") and wait for the peer's.
    RetireSent,
    /// The peer sent Retire; ours is still to go.
    RetireReceived,
    /// Both Retires crossed: the transport is being drained and closed.
    Retired,
    /// Failed, or closed.
    Dead,
}

/// What to do after an Attach arrived (server).
#[derive(Debug, PartialEq, Eq)]
pub enum AttachStep<L> {
    /// The generation is not newer than the session's: answer `Reject` with this reason.
    Reject(String),
    /// Other lanes of the generation are still to attach (or the frame disagreed with its
    /// siblings about the count, and is ignored).
    Wait,
    /// Every lane of the generation attached: install them, in lane-index order.
    Install(Vec<L>),
}

/// What to do after a Retire went out or came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetireStep {
    /// Nothing yet: the other side's Retire is still to come, or ours is already queued.
    Wait,
    /// Both sides retired the lane: drain and close its transport.
    Close,
    /// The peer retired a lane our route no longer holds: answer with our own Retire, report
    /// it with [`Roster::on_retire_sent`], and close.
    Answer,
    /// The peer retired a lane our route still holds; it stays unusable for new routes.
    InUse,
}

/// What a lane whose transport ended (without a Retire) means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneEnd {
    /// The peer said Bye: an ending transport is expected. Forget the lane.
    Gone,
    /// A failure: replace the transport (client) or wait for the client to (server).
    Failed,
}

/// What closing the session has to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parting {
    /// Flush, then send `Bye` with the count of messages sent.
    SayBye,
    /// The peer said Bye first and reads nothing more: only check that it acknowledged
    /// everything, and release the transports without waiting for a drain.
    PeerLeft,
}

/// The lanes of one session and its Attach, Retire and Bye state.
#[derive(Debug)]
pub struct Roster<L> {
    lanes: BTreeMap<LaneId, (L, LaneState)>,
    next_lane: LaneId,
    /// Server: lanes attached so far, per generation, by lane index.
    pending: BTreeMap<u64, Vec<Option<L>>>,
    /// Client: the highest generation the server acknowledged.
    attach_acked: u64,
    /// Client: why the server rejected the last Attach, until the next round starts.
    attach_rejected: Option<String>,
    peer_said_bye: bool,
    closing: bool,
}

impl<L: Clone> Roster<L> {
    /// A roster holding the session's first transport as lane 0.
    pub fn new(first: L) -> Self {
        Roster {
            lanes: BTreeMap::from([(0, (first, LaneState::Open))]),
            next_lane: 1,
            pending: BTreeMap::new(),
            attach_acked: 0,
            attach_rejected: None,
            peer_said_bye: false,
            closing: false,
        }
    }

    // ---- lanes ----------------------------------------------------------------------------

    /// Adds an open lane under a fresh id; `make` builds its handle from the id.
    pub fn add(&mut self, make: impl FnOnce(LaneId) -> L) -> L {
        let id = self.next_lane;
        self.next_lane += 1;
        let handle = make(id);
        self.lanes.insert(id, (handle.clone(), LaneState::Open));
        handle
    }

    /// The lane's state; `None` once it was removed (which only a dead lane is).
    pub fn state(&self, lane: LaneId) -> Option<LaneState> {
        self.lanes.get(&lane).map(|(_, s)| *s)
    }

    /// Whether the lane may join a new route.
    pub fn usable(&self, lane: LaneId) -> bool {
        self.state(lane) == Some(LaneState::Open)
    }

    /// Whether the lane failed, was closed, or was removed.
    pub fn is_dead(&self, lane: LaneId) -> bool {
        matches!(self.state(lane), None | Some(LaneState::Dead))
    }

    /// The open lane with the lowest id whose handle satisfies `fits`.
    pub fn find_open(&self, fits: impl Fn(&L) -> bool) -> Option<L> {
        self.lanes
            .values()
            .find(|(h, s)| *s == LaneState::Open && fits(h))
            .map(|(h, _)| h.clone())
    }

    /// Every lane's handle, in id order.
    pub fn handles(&self) -> impl Iterator<Item = &L> {
        self.lanes.values().map(|(h, _)| h)
    }

    /// Lanes not yet removed (current route, warm, draining).
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Whether every lane was removed.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Marks the lane dead. True the first time: the caller reports the failure once.
    pub fn fail(&mut self, lane: LaneId) -> bool {
        match self.lanes.get_mut(&lane) {
            Some((_, s)) if *s != LaneState::Dead => {
                *s = LaneState::Dead;
                true
            }
            _ => false,
        }
    }

    /// Forgets a lane (closed or failed).
    pub fn remove(&mut self, lane: LaneId) {
        self.lanes.remove(&lane);
    }

    // ---- Retire ---------------------------------------------------------------------------

    /// A switch left the lane behind. True: send Retire on it, then report
    /// [`on_retire_sent`](Roster::on_retire_sent).
    pub fn leave(&mut self, lane: LaneId) -> bool {
        match self.lanes.get_mut(&lane) {
            Some((_, s @ LaneState::Open)) => {
                *s = LaneState::Retiring;
                true
            }
            // The peer retired it while our route held it: now ours follows.
            Some((_, LaneState::RetireReceived)) => true,
            _ => false,
        }
    }

    /// Our Retire went out on the lane.
    pub fn on_retire_sent(&mut self, lane: LaneId) -> RetireStep {
        let Some((_, s)) = self.lanes.get_mut(&lane) else {
            return RetireStep::Wait;
        };
        match *s {
            LaneState::Open | LaneState::Retiring => {
                *s = LaneState::RetireSent;
                RetireStep::Wait
            }
            LaneState::RetireReceived => {
                *s = LaneState::Retired;
                RetireStep::Close
            }
            LaneState::RetireSent | LaneState::Retired | LaneState::Dead => RetireStep::Wait,
        }
    }

    /// The peer's Retire arrived on the lane; `in_route` says whether our current route
    /// holds it.
    pub fn on_retire_received(&mut self, lane: LaneId, in_route: bool) -> RetireStep {
        let Some((_, s)) = self.lanes.get_mut(&lane) else {
            // Already failed and forgotten: nothing more comes; release the transport.
            return RetireStep::Close;
        };
        match *s {
            LaneState::RetireSent => {
                *s = LaneState::Retired;
                RetireStep::Close
            }
            // Our Retire is about to go; its sender closes the lane.
            LaneState::Retiring => {
                *s = LaneState::RetireReceived;
                RetireStep::Wait
            }
            LaneState::Open if in_route => {
                *s = LaneState::RetireReceived;
                RetireStep::InUse
            }
            LaneState::Open => {
                *s = LaneState::RetireReceived;
                RetireStep::Answer
            }
            LaneState::RetireReceived | LaneState::Retired => RetireStep::Wait,
            LaneState::Dead => RetireStep::Close,
        }
    }

    // ---- Attach ---------------------------------------------------------------------------

    /// Server: the client attached `lane` as lane `index` of `count` of `generation`; the
    /// session's route is at `current`.
    pub fn on_attach(
        &mut self,
        current: u64,
        lane: L,
        generation: u64,
        index: u8,
        count: u8,
    ) -> AttachStep<L> {
        if generation <= current {
            return AttachStep::Reject(format!(
                "stale generation {generation}; the session is at {current}"
            ));
        }
        let slot = self
            .pending
            .entry(generation)
            .or_insert_with(|| vec![None; count as usize]);
        if slot.len() != count as usize {
            return AttachStep::Wait;
        }
        let Some(place) = slot.get_mut(index as usize) else {
            return AttachStep::Wait;
        };
        *place = Some(lane);
        if !slot.iter().all(Option::is_some) {
            return AttachStep::Wait;
        }
        let lanes = self
            .pending
            .remove(&generation)
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect();
        // Rounds older than this one can never complete usefully.
        self.pending.retain(|&g, _| g > generation);
        AttachStep::Install(lanes)
    }

    /// Client: starts an Attach round from a route at `current`; returns its generation.
    pub fn begin_attach(&mut self, current: u64) -> u64 {
        self.attach_rejected = None;
        current.max(self.attach_acked) + 1
    }

    /// Client: the server installed `generation`.
    pub fn on_attach_ack(&mut self, generation: u64) {
        self.attach_acked = self.attach_acked.max(generation);
    }

    /// The peer rejected an Attach (or the session).
    pub fn on_reject(&mut self, reason: String) {
        self.attach_rejected = Some(reason);
    }

    /// Client: how the round for `generation` ended, or `None` while it waits.
    pub fn attach_outcome(&self, generation: u64) -> Option<Result<(), String>> {
        if self.attach_acked >= generation {
            return Some(Ok(()));
        }
        self.attach_rejected.clone().map(Err)
    }

    // ---- Bye ------------------------------------------------------------------------------

    /// The peer said Bye: it sends nothing more.
    pub fn on_bye(&mut self) {
        self.peer_said_bye = true;
    }

    /// Whether the peer said Bye.
    pub fn peer_said_bye(&self) -> bool {
        self.peer_said_bye
    }

    /// Whether the peer said Bye and every lane is gone: nothing can be acknowledged any more.
    pub fn peer_gone(&self) -> bool {
        self.peer_said_bye && self.lanes.is_empty()
    }

    /// A lane's transport ended, or failed to receive, without a Retire.
    pub fn on_lane_ended(&mut self, lane: LaneId) -> LaneEnd {
        if self.peer_said_bye {
            self.fail(lane);
            LaneEnd::Gone
        } else {
            LaneEnd::Failed
        }
    }

    /// What closing has to do, or `None` when this side already closed.
    pub fn parting(&self) -> Option<Parting> {
        match (self.closing, self.peer_said_bye) {
            (true, _) => None,
            (false, false) => Some(Parting::SayBye),
            (false, true) => Some(Parting::PeerLeft),
        }
    }

    /// This side closed: no more sends.
    pub fn set_closing(&mut self) {
        self.closing = true;
    }

    /// Whether this side closed.
    pub fn is_closing(&self) -> bool {
        self.closing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster() -> Roster<&'static str> {
        Roster::new("first")
    }

    #[test]
    fn lanes_get_fresh_ids_and_only_open_ones_are_found() {
        let mut r = roster();
        assert_eq!(r.add(|id| if id == 1 { "b" } else { "?" }), "b");
        r.add(|_| "c");
        assert_eq!(r.len(), 3);
        assert_eq!(r.find_open(|h| *h != "first"), Some("b"));
        assert!(r.leave(1));
        assert!(!r.usable(1));
        assert_eq!(r.find_open(|h| *h != "first"), Some("c"));
        assert!(r.fail(2));
        assert!(!r.fail(2), "a failure is reported once");
        assert!(r.is_dead(2));
        r.remove(2);
        assert!(r.is_dead(2), "a removed lane counts as dead");
        assert_eq!(r.find_open(|h| *h != "first"), None);
        assert_eq!(r.handles().copied().collect::<Vec<_>>(), ["first", "b"]);
    }

    #[test]
    fn retire_initiated_here_closes_when_the_answer_comes() {
        let mut r = roster();
        let b = r.add(|_| "b");
        assert_eq!(b, "b");
        assert!(r.leave(1));
        assert_eq!(r.state(1), Some(LaneState::Retiring));
        assert!(!r.leave(1), "one Retire per lane");
        assert_eq!(r.on_retire_sent(1), RetireStep::Wait);
        assert_eq!(r.state(1), Some(LaneState::RetireSent));
        assert_eq!(r.on_retire_received(1, false), RetireStep::Close);
        assert_eq!(r.state(1), Some(LaneState::Retired));
        assert!(!r.usable(1));
    }

    #[test]
    fn retire_from_the_peer_is_answered_or_left_alone_in_use() {
        let mut r = roster();
        r.add(|_| "b");
        r.add(|_| "c");
        // Off our route: answer, then close once the answer is out.
        assert_eq!(r.on_retire_received(1, false), RetireStep::Answer);
        assert_eq!(r.on_retire_sent(1), RetireStep::Close);
        // Still on our route: stays, unusable; a later switch leaving it retires it.
        assert_eq!(r.on_retire_received(2, true), RetireStep::InUse);
        assert!(!r.usable(2));
        assert!(r.leave(2));
        assert_eq!(r.on_retire_sent(2), RetireStep::Close);
    }

    #[test]
    fn crossing_retires_close_exactly_once() {
        let mut r = roster();
        r.add(|_| "b");
        assert!(r.leave(1));
        // The peer's Retire overtakes the report that ours went out.
        assert_eq!(r.on_retire_received(1, false), RetireStep::Wait);
        assert_eq!(r.on_retire_sent(1), RetireStep::Close);
        assert_eq!(r.on_retire_received(1, false), RetireStep::Wait);
        // A Retire on a lane already failed and forgotten releases its transport.
        r.fail(1);
        r.remove(1);
        assert_eq!(r.on_retire_received(1, false), RetireStep::Close);
    }

    #[test]
    fn attach_installs_a_complete_generation_in_index_order() {
        let mut r = roster();
        assert_eq!(r.on_attach(0, "bulk", 1, 1, 2), AttachStep::Wait);
        assert_eq!(
            r.on_attach(0, "low", 1, 0, 2),
            AttachStep::Install(vec!["low", "bulk"])
        );
        // A late round that never completed is dropped with the newer one.
        assert_eq!(r.on_attach(1, "x", 3, 0, 2), AttachStep::Wait);
        assert_eq!(r.on_attach(1, "y", 2, 0, 2), AttachStep::Wait);
        assert_eq!(
            r.on_attach(1, "z", 3, 1, 2),
            AttachStep::Install(vec!["x", "z"])
        );
        assert_eq!(
            r.on_attach(3, "y2", 2, 1, 2),
            AttachStep::Reject("stale generation 2; the session is at 3".into())
        );
        assert!(r.pending.is_empty());
    }

    #[test]
    fn attach_frames_that_disagree_are_ignored_not_trusted() {
        let mut r = roster();
        assert_eq!(r.on_attach(0, "a", 1, 0, 2), AttachStep::Wait);
        assert_eq!(
            r.on_attach(0, "b", 1, 0, 1),
            AttachStep::Wait,
            "count differs"
        );
        assert_eq!(
            r.on_attach(0, "c", 1, 5, 2),
            AttachStep::Wait,
            "index out of range"
        );
        assert_eq!(
            r.on_attach(0, "d", 1, 1, 2),
            AttachStep::Install(vec!["a", "d"])
        );
    }

    #[test]
    fn client_attach_rounds_wait_for_ack_or_reject() {
        let mut r = roster();
        let g = r.begin_attach(0);
        assert_eq!(g, 1);
        assert_eq!(r.attach_outcome(g), None);
        r.on_attach_ack(g);
        assert_eq!(r.attach_outcome(g), Some(Ok(())));
        // The route stayed at 0 (say the swap was not seen yet): still a newer generation.
        let g = r.begin_attach(0);
        assert_eq!(g, 2);
        r.on_reject("stale".into());
        assert_eq!(r.attach_outcome(g), Some(Err("stale".into())));
        let g = r.begin_attach(2);
        assert_eq!(g, 3);
        assert_eq!(
            r.attach_outcome(g),
            None,
            "a new round forgets the old rejection"
        );
        r.on_reject("late".into());
        r.on_attach_ack(3);
        assert_eq!(
            r.attach_outcome(g),
            Some(Ok(())),
            "the ack wins over a rejection"
        );
    }

    #[test]
    fn bye_turns_ending_transports_into_departures() {
        let mut r = roster();
        r.add(|_| "b");
        assert_eq!(r.parting(), Some(Parting::SayBye));
        assert_eq!(r.on_lane_ended(1), LaneEnd::Failed);
        assert!(r.usable(1), "the caller decides what the failure does");
        r.on_bye();
        assert!(r.peer_said_bye());
        assert_eq!(r.parting(), Some(Parting::PeerLeft));
        assert_eq!(r.on_lane_ended(1), LaneEnd::Gone);
        assert!(r.is_dead(1));
        r.remove(1);
        assert!(!r.peer_gone(), "lane 0 is still there");
        r.remove(0);
        assert!(r.peer_gone());
        r.set_closing();
        assert!(r.is_closing());
        assert_eq!(r.parting(), None);
    }
}
