//! The async half of a hybrid session: lanes (one per transport), the route in an `ArcSwap`,
//! the per-lane reader and ack pump, and the switch.
//!
//! Lock order, to stay deadlock-free: a lane's `tx` (async, held across transport sends) is
//! taken before the ledger or merger mutex (sync, never held across an await); a switch takes
//! the `tx` of every lane of the new route in lane-id order.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amst_core::codec::SessionId;
use amst_core::{Mode, Transport, TransportKind};
use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::ledger::{LaneId, Pushed, SendLedger};
use crate::merger::ReceiveMerger;
use crate::metrics::{Instruments, SwitchStats};
use crate::wire::{self, HybridFrame};
use crate::{AmstConfig, Connector, Error, LaneProfile, Result};

pub(crate) use amst_core::util::{hex, lock};

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Which end of the session this is; only the client dials, so only it drives switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that connected.
    Client,
    /// The side that accepted.
    Server,
}

/// One transport in one session.
pub(crate) struct Lane {
    pub id: LaneId,
    pub transport: Arc<dyn Transport>,
    pub kind: TransportKind,
    /// Known on the client, which dialed it.
    pub profile: Option<LaneProfile>,
    /// Held across every send on this transport, so that our count of transport messages
    /// matches the transport's own order (the ack prefix is counted in that order).
    tx: tokio::sync::Mutex<()>,
    /// Transport messages queued so far; written only under `tx`.
    sent: AtomicU64,
    kick: Notify,
    /// Set the moment a switch leaves this lane behind (before its Retire goes out), so
    /// that no later switch picks it up again.
    retiring: AtomicBool,
    retire_sent: AtomicBool,
    retire_received: AtomicBool,
    dead: AtomicBool,
    /// (swap instant, decision instant, transport messages before the swap): the switch is
    /// timed until the first message after it is acknowledged, from the swap and from the
    /// decision (which adds the dial and the Attach round trip).
    switch_mark: Mutex<Option<(Instant, Instant, u64)>>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("profile", &self.profile.as_ref().map(|p| p.preset))
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish()
    }
}

impl Lane {
    fn usable(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
            && !self.retiring.load(Ordering::Acquire)
            && !self.retire_sent.load(Ordering::Acquire)
            && !self.retire_received.load(Ordering::Acquire)
    }
}

/// The lanes messages go out on, swapped whole at a switch.
#[derive(Debug)]
pub(crate) struct Route {
    pub generation: u64,
    pub mode: Mode,
    /// Small messages (and everything on a one-lane route).
    pub low: Arc<Lane>,
    /// Large messages; the same lane as `low` on a one-lane route.
    pub bulk: Arc<Lane>,
    pub threshold: usize,
}

impl Route {
    #[inline]
    pub fn pick(&self, len: usize) -> &Arc<Lane> {
        if len < self.threshold {
            &self.low
        } else {
            &self.bulk
        }
    }

    pub fn lanes(&self) -> Vec<Arc<Lane>> {
        if Arc::ptr_eq(&self.low, &self.bulk) {
            vec![self.low.clone()]
        } else {
            vec![self.low.clone(), self.bulk.clone()]
        }
    }

    fn contains(&self, lane: LaneId) -> bool {
        self.low.id == lane || self.bulk.id == lane
    }
}

#[derive(Clone, Debug, Default)]
struct AttachState {
    acked: u64,
    rejected: Option<String>,
}

/// Everything one session shares between the application's handles and its tasks.
pub(crate) struct Shared {
    pub role: Role,
    pub config: AmstConfig,
    pub session_id: SessionId,
    /// False for a plain session (the peer lacks HYBRID): no frames, no switching.
    pub hybrid: bool,
    pub route: ArcSwap<Route>,
    ledger: Mutex<SendLedger>,
    room: Notify,
    merger: Mutex<ReceiveMerger>,
    readable: Notify,
    space: Notify,
    route_changed: Notify,
    lanes: Mutex<HashMap<LaneId, Arc<Lane>>>,
    next_lane: AtomicU64,
    attach: watch::Sender<AttachState>,
    pending_attach: Mutex<BTreeMap<u64, Vec<Option<Arc<Lane>>>>>,
    switch_lock: tokio::sync::Mutex<()>,
    connector: Option<Arc<dyn Connector>>,
    pub instruments: Instruments,
    pub switch_stats: Mutex<SwitchStats>,
    fatal: Mutex<Option<String>>,
    shutdown: watch::Sender<bool>,
    closing: AtomicBool,
    peer_said_bye: AtomicBool,
    /// Set by `force_mode`: the auto loop leaves the mode alone.
    pub pinned: AtomicBool,
    rate: Mutex<(Instant, u64, f64)>,
    /// A plain session's first message, read while telling plain from hybrid.
    plain_first: Mutex<Option<Bytes>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("hybrid", &self.hybrid)
            .field("route", &*self.route.load())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A session whose first route is `first` (generation 0), on which `already_sent`
    /// messages (the handshake) went out before.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        role: Role,
        config: AmstConfig,
        session_id: SessionId,
        hybrid: bool,
        first: Arc<dyn Transport>,
        profile: Option<LaneProfile>,
        mode: Mode,
        connector: Option<Arc<dyn Connector>>,
        already_sent: u64,
    ) -> Arc<Self> {
        let lane = Arc::new(Lane {
            id: 0,
            kind: first.metrics().kind,
            transport: first,
            profile,
            tx: tokio::sync::Mutex::new(()),
            sent: AtomicU64::new(already_sent),
            kick: Notify::new(),
            retiring: AtomicBool::new(false),
            retire_sent: AtomicBool::new(false),
            retire_received: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            switch_mark: Mutex::new(None),
        });
        let mut ledger = SendLedger::new(config.send_window);
        ledger.switch_route(&[0]);
        let route = Route {
            generation: 0,
            mode,
            low: lane.clone(),
            bulk: lane.clone(),
            threshold: config.small_message_threshold,
        };
        let shared = Arc::new(Shared {
            role,
            merger: Mutex::new(ReceiveMerger::new(
                config.max_reorder_bytes,
                config.max_reorder_messages,
            )),
            instruments: Instruments::new(role),
            config,
            session_id,
            hybrid,
            route: ArcSwap::from_pointee(route),
            ledger: Mutex::new(ledger),
            room: Notify::new(),
            readable: Notify::new(),
            space: Notify::new(),
            route_changed: Notify::new(),
            lanes: Mutex::new(HashMap::from([(0, lane.clone())])),
            next_lane: AtomicU64::new(1),
            attach: watch::channel(AttachState::default()).0,
            pending_attach: Mutex::new(BTreeMap::new()),
            switch_lock: tokio::sync::Mutex::new(()),
            connector,
            switch_stats: Mutex::new(SwitchStats::default()),
            fatal: Mutex::new(None),
            shutdown: watch::channel(false).0,
            closing: AtomicBool::new(false),
            peer_said_bye: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
            rate: Mutex::new((Instant::now(), 0, 0.0)),
            plain_first: Mutex::new(None),
        });
        shared.instruments.mode(mode);
        if hybrid {
            shared.spawn_lane_tasks(&lane);
        }
        shared
    }

    fn spawn_lane_tasks(self: &Arc<Self>, lane: &Arc<Lane>) {
        tokio::spawn(self.clone().read_lane(lane.clone()));
        tokio::spawn(self.clone().pump_lane(lane.clone()));
    }

    /// Adds a lane for a new transport and starts its reader and ack pump.
    pub fn add_lane(
        self: &Arc<Self>,
        transport: Arc<dyn Transport>,
        profile: Option<LaneProfile>,
    ) -> Arc<Lane> {
        let lane = Arc::new(Lane {
            id: self.next_lane.fetch_add(1, Ordering::Relaxed),
            kind: transport.metrics().kind,
            transport,
            profile,
            tx: tokio::sync::Mutex::new(()),
            sent: AtomicU64::new(0),
            kick: Notify::new(),
            retiring: AtomicBool::new(false),
            retire_sent: AtomicBool::new(false),
            retire_received: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            switch_mark: Mutex::new(None),
        });
        lock(&self.lanes).insert(lane.id, lane.clone());
        self.spawn_lane_tasks(&lane);
        lane
    }

    // ---- errors and shutdown -------------------------------------------------------------

    pub fn check_open(&self) -> Result<()> {
        if let Some(f) = lock(&self.fatal).as_ref() {
            return Err(Error::Closed(f.clone()));
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Closed("closed by this side".into()));
        }
        Ok(())
    }

    fn fail(&self, reason: String) {
        let mut f = lock(&self.fatal);
        if f.is_none() {
            warn!(session = %hex(&self.session_id), "session failed: {reason}");
            *f = Some(reason);
        }
        drop(f);
        self.wake_all();
    }

    fn wake_all(&self) {
        self.room.notify_waiters();
        self.readable.notify_waiters();
        self.space.notify_waiters();
        self.route_changed.notify_waiters();
    }

    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
        self.wake_all();
        for lane in lock(&self.lanes).values() {
            lane.kick.notify_one();
        }
    }

    async fn until_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    // ---- sending ----------------------------------------------------------------------------

    /// Queues one message; returns its hybrid sequence number. The hot path: one route load,
    /// the lane's send lock, one ledger push, the transport send.
    pub async fn send(self: &Arc<Self>, msg: Bytes) -> Result<u64> {
        self.check_open()?;
        if msg.len() as u64 > self.config.max_message {
            return Err(Error::Core(amst_core::Error::MessageTooLarge {
                len: msg.len() as u64,
                limit: self.config.max_message,
            }));
        }
        if !self.hybrid {
            let lane = self.route.load().low.clone();
            lane.transport.send(msg.clone()).await?;
            self.instruments.sent(msg.len());
            return Ok(lane.sent.fetch_add(1, Ordering::Relaxed));
        }
        loop {
            let lane = self.route.load().pick(msg.len()).clone();
            let guard = lane.tx.lock().await;
            let idx_end = lane.sent.load(Ordering::Relaxed) + 1;
            let seq = loop {
                let notified = self.room.notified();
                match lock(&self.ledger).push(lane.id, &msg, idx_end) {
                    Pushed::Seq(s) => break Some(s),
                    Pushed::Stale => break None,
                    Pushed::Full => {}
                }
                self.check_open()?;
                notified.await;
            };
            let Some(seq) = seq else {
                drop(guard);
                self.wait_for_route_change(&lane).await?;
                continue;
            };
            self.transmit(&lane, seq, &msg).await;
            drop(guard);
            lane.kick.notify_one();
            self.instruments.sent(msg.len());
            return Ok(seq);
        }
    }

    /// Waits until the route no longer holds `lane` (after a race with a switch this returns
    /// at once; after a failure it waits for the recovery switch).
    async fn wait_for_route_change(&self, lane: &Lane) -> Result<()> {
        let deadline = Instant::now() + self.config.drain_timeout;
        loop {
            let notified = self.route_changed.notified();
            if !self.route.load().contains(lane.id) {
                return Ok(());
            }
            self.check_open()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let reason = format!(
                    "no transport to send on: lane {} failed and no replacement came within {:?}",
                    lane.id, self.config.drain_timeout
                );
                self.fail(reason.clone());
                return Err(Error::Closed(reason));
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Puts message `seq` on `lane`; the caller holds `lane.tx` and has recorded it in the
    /// ledger. A transport error kills the lane; the message stays in the ledger and goes out
    /// again after the recovery switch.
    async fn transmit(self: &Arc<Self>, lane: &Arc<Lane>, seq: u64, msg: &Bytes) {
        let r = match wire::encode_data(seq, msg) {
            (inline, None) => lane.transport.send(inline).await,
            (header, Some(payload)) => lane.transport.send_parts(header, payload).await,
        };
        match r {
            Ok(()) => {
                lane.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.lane_failed(lane, format!("send failed: {e}")),
        }
    }

    /// Sends a control frame on `lane`, taking its send lock.
    async fn send_control(&self, lane: &Lane, frame: HybridFrame) -> Result<()> {
        let _g = lane.tx.lock().await;
        self.send_control_locked(lane, frame).await
    }

    async fn send_control_locked(&self, lane: &Lane, frame: HybridFrame) -> Result<()> {
        lane.transport.send(frame.encode()).await?;
        lane.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Resolves when every message sent so far is acknowledged.
    pub async fn flush(&self) -> Result<()> {
        if !self.hybrid {
            let lane = self.route.load().low.clone();
            return Ok(lane.transport.flush().await?);
        }
        loop {
            let notified = self.room.notified();
            if lock(&self.ledger).is_empty() {
                return Ok(());
            }
            if let Some(f) = lock(&self.fatal).as_ref() {
                return Err(Error::Closed(f.clone()));
            }
            if self.peer_said_bye.load(Ordering::Acquire) && self.live_lanes() == 0 {
                let (n, _) = self.unacked();
                return Err(Error::Closed(format!(
                    "the peer closed with {n} of our messages unacknowledged"
                )));
            }
            notified.await;
        }
    }

    /// Whether message `seq` has been acknowledged.
    pub fn is_acked(&self, seq: u64) -> bool {
        !lock(&self.ledger).is_unacked(seq)
    }

    pub fn unacked(&self) -> (u64, u64) {
        let l = lock(&self.ledger);
        (l.unacked_messages(), l.unacked_bytes())
    }

    pub fn acked_bytes(&self) -> u64 {
        lock(&self.ledger).acked_bytes()
    }

    pub fn throughput(&self) -> f64 {
        let r = *lock(&self.rate);
        if r.0.elapsed() > Duration::from_secs(1) {
            // Nothing acknowledged lately: the rate since the last sample, decaying to 0.
            let acked = lock(&self.ledger).acked_bytes();
            return (acked - r.1) as f64 / r.0.elapsed().as_secs_f64();
        }
        r.2
    }

    // ---- receiving ---------------------------------------------------------------------------

    pub async fn recv(&self) -> Result<Option<Bytes>> {
        if !self.hybrid {
            if let Some(m) = lock(&self.plain_first).take() {
                self.instruments.received(m.len());
                return Ok(Some(m));
            }
            let lane = self.route.load().low.clone();
            let m = lane.transport.recv().await?;
            if let Some(m) = &m {
                self.instruments.received(m.len());
            }
            return Ok(m);
        }
        loop {
            let notified = self.readable.notified();
            {
                let mut m = lock(&self.merger);
                if let Some(msg) = m.pop() {
                    if m.ready_bytes() < self.config.recv_buffer {
                        self.space.notify_waiters();
                    }
                    drop(m);
                    self.instruments.received(msg.len());
                    return Ok(Some(msg));
                }
                if m.is_finished() {
                    return Ok(None);
                }
            }
            if let Some(f) = lock(&self.fatal).as_ref() {
                return Err(Error::Closed(f.clone()));
            }
            if *self.shutdown.borrow() {
                return Err(Error::Closed("closed by this side".into()));
            }
            notified.await;
        }
    }

    /// Bytes the merger holds: ahead of a gap, or ready and not yet taken.
    pub fn merger_held_bytes(&self) -> u64 {
        let m = lock(&self.merger);
        m.ready_bytes() + m.pending_bytes()
    }

    pub fn merger_stats(&self) -> (u64, u64, u64) {
        let m = lock(&self.merger);
        let (n, b) = m.delivered();
        (n, b, m.duplicates())
    }

    async fn deliver(&self, seq: u64, payload: Bytes) -> Result<()> {
        let over = {
            let mut m = lock(&self.merger);
            m.insert(seq, payload)?;
            m.ready_bytes() > self.config.recv_buffer
        };
        self.readable.notify_waiters();
        if over {
            // Stop pulling from this transport until the application catches up, so that
            // the transport's credit pushes back on the sender.
            loop {
                let notified = self.space.notified();
                if lock(&self.merger).ready_bytes() <= self.config.recv_buffer
                    || *self.shutdown.borrow()
                {
                    break;
                }
                notified.await;
            }
        }
        Ok(())
    }

    // ---- per-lane tasks --------------------------------------------------------------------

    async fn read_lane(self: Arc<Self>, lane: Arc<Lane>) {
        let outcome: Result<&'static str> = async {
            loop {
                let msg = tokio::select! {
                    r = lane.transport.recv() => r?,
                    _ = self.until_shutdown() => return Ok("shutdown"),
                };
                let Some(msg) = msg else {
                    return Ok("ended");
                };
                match HybridFrame::decode(msg)? {
                    HybridFrame::Data { seq, payload } => {
                        if payload.len() as u64 > self.config.max_message {
                            return Err(Error::protocol(format!(
                                "message {seq} of {} bytes exceeds the limit of {}",
                                payload.len(),
                                self.config.max_message
                            )));
                        }
                        self.deliver(seq, payload).await?
                    }
                    HybridFrame::AttachAck { generation } if self.role == Role::Client => {
                        self.attach
                            .send_modify(|a| a.acked = a.acked.max(generation));
                    }
                    HybridFrame::Reject { reason } => {
                        warn!(lane = lane.id, "peer rejected: {reason}");
                        self.attach.send_modify(|a| a.rejected = Some(reason));
                    }
                    HybridFrame::Attach {
                        session_id,
                        generation,
                        index,
                        count,
                        mode,
                    } if self.role == Role::Server => {
                        if session_id != self.session_id {
                            return Err(Error::protocol(
                                "Attach names another session on an attached transport",
                            ));
                        }
                        let me = self.clone();
                        let l = lane.clone();
                        tokio::spawn(async move {
                            me.on_attach(l, generation, index, count, mode).await;
                        });
                    }
                    HybridFrame::Retire => {
                        lane.retire_received.store(true, Ordering::Release);
                        return Ok("retired");
                    }
                    HybridFrame::Bye { messages } => {
                        lock(&self.merger).set_end(messages)?;
                        self.peer_said_bye.store(true, Ordering::Release);
                        self.readable.notify_waiters();
                    }
                    HybridFrame::ModeRequest { mode } if self.role == Role::Client => {
                        let me = self.clone();
                        tokio::spawn(async move {
                            if let Err(e) = me.switch_to(mode, false).await {
                                warn!("switch to {mode} asked by the server failed: {e}");
                            }
                        });
                    }
                    other => {
                        return Err(Error::protocol(format!(
                            "unexpected {other:?} on an attached transport of a {:?}",
                            self.role
                        )));
                    }
                }
            }
        }
        .await;
        match outcome {
            Ok("shutdown") => {}
            Ok("retired") => {
                debug!(lane = lane.id, "peer retired the lane");
                if lane.retire_sent.load(Ordering::Acquire) {
                    self.close_lane(&lane).await;
                } else if self.route.load().contains(lane.id) {
                    warn!(lane = lane.id, "the peer retired a lane still in use");
                } else {
                    // Answer with our own Retire: after it we send nothing more here.
                    let _ = self.send_control(&lane, HybridFrame::Retire).await;
                    lane.retire_sent.store(true, Ordering::Release);
                    self.close_lane(&lane).await;
                }
            }
            Ok(_) => {
                if !self.peer_said_bye.load(Ordering::Acquire) {
                    self.lane_failed(&lane, "the transport ended".into());
                } else {
                    lane.dead.store(true, Ordering::Release);
                    self.remove_lane(&lane);
                }
            }
            Err(Error::Protocol(p)) => self.fail(format!("lane {}: {p}", lane.id)),
            Err(e) => {
                if self.peer_said_bye.load(Ordering::Acquire) {
                    lane.dead.store(true, Ordering::Release);
                    self.remove_lane(&lane);
                } else {
                    self.lane_failed(&lane, format!("receive failed: {e}"));
                }
            }
        }
        self.readable.notify_waiters();
    }

    /// Follows the transport's acknowledged prefix (its `acked` subscription) while messages
    /// are outstanding, releases them from the ledger, and times the switch.
    async fn pump_lane(self: Arc<Self>, lane: Arc<Lane>) {
        let acks = lane.transport.acked();
        let mut seen = 0;
        loop {
            if lane.dead.load(Ordering::Acquire) || *self.shutdown.borrow() {
                return;
            }
            let mark = *lock(&lane.switch_mark);
            let waiting = lock(&self.ledger).lane_outstanding(lane.id) || mark.is_some();
            if !waiting || acks.ended() {
                // Nothing to wait for (or the transport is gone, which its reader reports):
                // a send or the lane's failure kicks.
                tokio::select! {
                    _ = lane.kick.notified() => {}
                    _ = self.until_shutdown() => return,
                }
                continue;
            }
            // With a switch to time, give up on it after `drain_timeout` without traffic.
            let expiry = mark.map(|(t0, _, _)| t0 + self.config.drain_timeout);
            tokio::select! {
                _ = acks.beyond(seen) => {}
                _ = lane.kick.notified() => {}
                _ = self.until_shutdown() => return,
                _ = sleep_until_or_never(expiry) => {}
            }
            let acked = acks.get();
            let mark = *lock(&lane.switch_mark);
            if acked > seen {
                seen = acked;
                let released = lock(&self.ledger).on_lane_acked(lane.id, acked);
                if released.messages > 0 {
                    self.room.notify_waiters();
                    self.update_rate();
                }
            }
            if let Some((t0, _, _)) = mark
                && t0.elapsed() > self.config.drain_timeout
            {
                // No traffic after the switch: nothing to time.
                *lock(&lane.switch_mark) = None;
            }
            if let Some((t0, decided, before)) = mark
                && acked > before
                && lane.sent.load(Ordering::Relaxed) > before
            {
                *lock(&lane.switch_mark) = None;
                let took = t0.elapsed();
                lock(&self.switch_stats).record(took, decided.elapsed());
                self.instruments.switch_duration(took);
                debug!(
                    lane = lane.id,
                    "first message after the switch acked in {took:?}"
                );
            }
        }
    }

    fn update_rate(&self) {
        let acked = lock(&self.ledger).acked_bytes();
        let mut r = lock(&self.rate);
        let dt = r.0.elapsed();
        if dt >= Duration::from_millis(200) {
            let inst = (acked - r.1) as f64 / dt.as_secs_f64();
            r.2 = if r.2 == 0.0 {
                inst
            } else {
                0.5 * r.2 + 0.5 * inst
            };
            *r = (Instant::now(), acked, r.2);
        }
    }

    fn lane_failed(self: &Arc<Self>, lane: &Arc<Lane>, reason: String) {
        if lane.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        lane.kick.notify_one();
        let in_route = self.route.load().contains(lane.id);
        if *self.shutdown.borrow() || self.closing.load(Ordering::Acquire) {
            self.remove_lane(lane);
            return;
        }
        warn!(lane = lane.id, in_route, "transport failed: {reason}");
        self.remove_lane(lane);
        if !in_route {
            return;
        }
        match self.role {
            Role::Client => {
                let me = self.clone();
                let mode = self.route.load().mode;
                tokio::spawn(async move {
                    if let Err(e) = me.switch_to(mode, true).await {
                        me.fail(format!(
                            "transport failed ({reason}) and reconnecting failed: {e}"
                        ));
                    }
                });
            }
            Role::Server => {
                let me = self.clone();
                let generation = self.route.load().generation;
                tokio::spawn(async move {
                    tokio::time::sleep(me.config.drain_timeout).await;
                    if me.route.load().generation == generation {
                        me.fail(format!(
                            "transport failed ({reason}) and the client did not reattach"
                        ));
                    }
                });
            }
        }
    }

    fn remove_lane(&self, lane: &Lane) {
        lock(&self.lanes).remove(&lane.id);
        lock(&self.ledger).remove_lane(lane.id);
        lane.kick.notify_one();
        self.route_changed.notify_waiters();
        self.room.notify_waiters();
    }

    async fn close_lane(self: &Arc<Self>, lane: &Arc<Lane>) {
        let r = tokio::time::timeout(self.config.drain_timeout, lane.transport.close()).await;
        if !matches!(r, Ok(Ok(()))) {
            debug!(lane = lane.id, "old transport did not drain cleanly: {r:?}");
        }
        lane.dead.store(true, Ordering::Release);
        self.remove_lane(lane);
    }

    // ---- switching ----------------------------------------------------------------------------

    /// Makes `route` current: takes the send lock of each of its lanes, sends `preamble` on
    /// each, swaps, and resends every unacknowledged message on the new lanes before any new
    /// message goes out. Returns the previous route.
    async fn install_route(
        self: &Arc<Self>,
        route: Route,
        decided: Option<Instant>,
        preamble: impl Fn() -> Option<HybridFrame>,
    ) -> Arc<Route> {
        let lanes = route.lanes();
        let mut order: Vec<&Arc<Lane>> = lanes.iter().collect();
        order.sort_by_key(|l| l.id);
        let mut guards = Vec::with_capacity(order.len());
        for l in &order {
            guards.push(l.tx.lock().await);
        }
        let ids: Vec<LaneId> = order.iter().map(|l| l.id).collect();
        let t0 = Instant::now();
        let route = Arc::new(route);
        let old = self.route.swap(route.clone());
        let resend = lock(&self.ledger).switch_route(&ids);
        for l in &order {
            let decided = decided.unwrap_or(t0);
            *lock(&l.switch_mark) = Some((t0, decided, l.sent.load(Ordering::Relaxed)));
        }
        // After the swap, so that a peer reacting to it (a client retiring the old lane on
        // AttachAck) finds this side already on the new route.
        for l in &order {
            if let Some(f) = preamble()
                && let Err(e) = self.send_control_locked(l, f).await
            {
                warn!(lane = l.id, "could not send on the new lane: {e}");
            }
        }
        self.instruments.mode(route.mode);
        let resent_bytes = resend.iter().map(|(_, m)| m.len() as u64).sum();
        self.instruments.resent(resend.len() as u64, resent_bytes);
        for (seq, msg) in &resend {
            let lane = route.pick(msg.len());
            let frames = 1 + (msg.len() > wire::INLINE_MAX) as u64;
            let idx_end = lane.sent.load(Ordering::Relaxed) + frames;
            lock(&self.ledger).record_resend(lane.id, *seq, idx_end);
            self.transmit(lane, *seq, msg).await;
        }
        drop(guards);
        for l in &order {
            l.kick.notify_one();
        }
        {
            let mut s = lock(&self.switch_stats);
            s.switches += 1;
            s.last_resent = resend.len() as u64;
        }
        self.instruments.switched();
        self.route_changed.notify_waiters();
        self.room.notify_waiters();
        info!(
            role = ?self.role,
            generation = route.generation,
            mode = %route.mode,
            resent = resend.len(),
            "route installed"
        );
        old
    }

    /// Server: a client attached `lane` as lane `index` of `count` of generation `gen`.
    pub async fn on_attach(
        self: Arc<Self>,
        lane: Arc<Lane>,
        generation: u64,
        index: u8,
        count: u8,
        mode: Mode,
    ) {
        if generation <= self.route.load().generation {
            let _ = self
                .send_control(
                    &lane,
                    HybridFrame::Reject {
                        reason: format!(
                            "stale generation {generation}; the session is at {}",
                            self.route.load().generation
                        ),
                    },
                )
                .await;
            return;
        }
        let complete = {
            let mut p = lock(&self.pending_attach);
            let slot = p
                .entry(generation)
                .or_insert_with(|| vec![None; count as usize]);
            if slot.len() != count as usize {
                None
            } else {
                slot[index as usize] = Some(lane);
                if slot.iter().all(Option::is_some) {
                    let lanes: Vec<Arc<Lane>> = p
                        .remove(&generation)
                        .unwrap_or_default()
                        .into_iter()
                        .flatten()
                        .collect();
                    p.retain(|&g, _| g > generation);
                    Some(lanes)
                } else {
                    None
                }
            }
        };
        let Some(lanes) = complete else { return };
        let _switching = self.switch_lock.lock().await;
        if generation <= self.route.load().generation {
            return;
        }
        let route = Route {
            generation,
            mode,
            low: lanes[0].clone(),
            bulk: lanes.last().unwrap_or(&lanes[0]).clone(),
            threshold: self.config.small_message_threshold,
        };
        self.install_route(route, None, || Some(HybridFrame::AttachAck { generation }))
            .await;
    }

    /// Client: moves the session to `mode`. Reuses open transports whose profile fits,
    /// dials the rest, attaches them under a new generation, waits for the server's ack, then
    /// swaps and resends. On failure the old route stays. `force` switches even when the
    /// mode is already current (to replace a failed transport).
    pub async fn switch_to(self: &Arc<Self>, mode: Mode, force: bool) -> Result<Duration> {
        if !self.hybrid {
            return Err(Error::NotHybrid("switching modes"));
        }
        if self.role != Role::Client {
            return Err(Error::SwitchFailed {
                mode,
                reason: "only the connecting side switches; use force_mode, which asks it".into(),
            });
        }
        self.check_open()?;
        // The decision: waiting for a switch in progress is part of what this one costs.
        let started = Instant::now();
        let _switching = self.switch_lock.lock().await;
        let profiles = self.config.lanes_for(mode)?;
        let current = self.route.load_full();
        let same = current.mode == mode
            && current.lanes().len() == profiles.len()
            && current
                .lanes()
                .iter()
                .zip(&profiles)
                .all(|(l, p)| l.profile.as_ref() == Some(p) && l.usable());
        if same && !force {
            return Ok(Duration::ZERO);
        }
        let failed = |reason: String| Error::SwitchFailed { mode, reason };
        let mut lanes: Vec<Arc<Lane>> = Vec::new();
        let mut dialed: Vec<Arc<Lane>> = Vec::new();
        for p in &profiles {
            let existing = lock(&self.lanes)
                .values()
                .filter(|l| l.usable() && l.profile.as_ref() == Some(p))
                .min_by_key(|l| l.id)
                .cloned();
            let lane = match existing {
                Some(l) if !lanes.iter().any(|x| x.id == l.id) => l,
                _ => {
                    let connector = self
                        .connector
                        .as_ref()
                        .ok_or_else(|| failed("no connector".into()))?;
                    let c = connector
                        .connect(p)
                        .await
                        .map_err(|e| failed(format!("connecting a {} lane: {e}", p.preset)))?;
                    if c.hybrid == Some(false) {
                        return Err(failed("the new transport did not negotiate HYBRID".into()));
                    }
                    let l = self.add_lane(c.transport, Some(p.clone()));
                    dialed.push(l.clone());
                    l
                }
            };
            lanes.push(lane);
        }
        let generation = current.generation.max(self.attach.borrow().acked) + 1;
        self.attach.send_modify(|a| a.rejected = None);
        let count = lanes.len() as u8;
        let result: Result<()> = async {
            for (i, l) in lanes.iter().enumerate() {
                self.send_control(
                    l,
                    HybridFrame::Attach {
                        session_id: self.session_id,
                        generation,
                        index: i as u8,
                        count,
                        mode,
                    },
                )
                .await?;
            }
            let mut rx = self.attach.subscribe();
            let waited = tokio::time::timeout(
                self.config.attach_timeout,
                rx.wait_for(|a| a.acked >= generation || a.rejected.is_some()),
            )
            .await;
            match waited {
                Err(_) => Err(failed(format!(
                    "the server did not attach the new transport within {:?}",
                    self.config.attach_timeout
                ))),
                Ok(Err(_)) => Err(failed("session ended".into())),
                Ok(Ok(a)) => match &a.rejected {
                    Some(r) if a.acked < generation => Err(Error::Rejected(r.clone())),
                    _ => Ok(()),
                },
            }
        }
        .await;
        if let Err(e) = result {
            for l in dialed {
                let me = self.clone();
                tokio::spawn(async move { me.close_lane(&l).await });
            }
            warn!("switch to {mode} failed, staying in {}: {e}", current.mode);
            return Err(e);
        }
        let route = Route {
            generation,
            mode,
            low: lanes[0].clone(),
            bulk: lanes.last().unwrap_or(&lanes[0]).clone(),
            threshold: self.config.small_message_threshold,
        };
        let old = self.install_route(route, Some(started), || None).await;
        let now = self.route.load_full();
        for l in old.lanes() {
            if now.contains(l.id) || l.dead.load(Ordering::Acquire) {
                continue;
            }
            if self.config.keep_warm {
                debug!(lane = l.id, "keeping the old transport warm");
                continue;
            }
            l.retiring.store(true, Ordering::Release);
            let me = self.clone();
            tokio::spawn(async move { me.retire_lane(l).await });
        }
        info!(
            "switched {} -> {mode} (generation {generation}) in {:?}",
            current.mode,
            started.elapsed()
        );
        Ok(started.elapsed())
    }

    /// Client: no more data on `lane`; the server answers with its own Retire, and both close.
    async fn retire_lane(self: Arc<Self>, lane: Arc<Lane>) {
        if self.send_control(&lane, HybridFrame::Retire).await.is_err() {
            lane.dead.store(true, Ordering::Release);
            self.remove_lane(&lane);
            return;
        }
        lane.retire_sent.store(true, Ordering::Release);
        if lane.retire_received.load(Ordering::Acquire) {
            self.close_lane(&lane).await;
        }
    }

    /// Server: asks the client to switch, and waits until the new route is installed.
    pub async fn request_mode(&self, mode: Mode) -> Result<()> {
        if !self.hybrid {
            return Err(Error::NotHybrid("switching modes"));
        }
        let lane = self.route.load().low.clone();
        let before = self.route.load().generation;
        self.send_control(&lane, HybridFrame::ModeRequest { mode })
            .await?;
        let deadline = Instant::now() + self.config.attach_timeout * 2;
        loop {
            let notified = self.route_changed.notified();
            let r = self.route.load();
            if r.generation > before && r.mode == mode {
                return Ok(());
            }
            self.check_open()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::SwitchFailed {
                    mode,
                    reason: "the client did not switch in time".into(),
                });
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    // ---- closing ----------------------------------------------------------------------------

    pub async fn close(self: &Arc<Self>) -> Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Ok(());
        }
        let peer_gone = self.peer_said_bye.load(Ordering::Acquire);
        let result = async {
            if self.hybrid && !peer_gone {
                self.flush().await?;
                let messages = lock(&self.ledger).next_seq();
                let lane = self.route.load().low.clone();
                self.send_control(&lane, HybridFrame::Bye { messages })
                    .await?;
            } else if self.hybrid {
                // The peer said goodbye first: it reads nothing more, so only give the ack
                // pumps a moment and check that it had acknowledged everything we sent.
                let _ = tokio::time::timeout(Duration::from_millis(200), self.flush()).await;
                let (n, _) = self.unacked();
                if n > 0 {
                    return Err(Error::Closed(format!(
                        "the peer closed with {n} of our messages unacknowledged"
                    )));
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        self.closing.store(true, Ordering::Release);
        let mut lanes: Vec<Arc<dyn Transport>> = lock(&self.lanes)
            .values()
            .map(|l| l.transport.clone())
            .collect();
        if !self.hybrid {
            lanes = vec![self.route.load().low.transport.clone()];
        }
        let drain = self.config.drain_timeout;
        let closing = async move {
            for t in lanes {
                let _ = tokio::time::timeout(drain, t.close()).await;
            }
        };
        if peer_gone {
            // Nothing of ours is left to drain; release in the background.
            tokio::spawn(closing);
        } else {
            closing.await;
        }
        self.shut_down();
        result
    }

    /// Plain sessions: `msg` was read before the session existed; `recv` returns it first.
    pub fn stash_first(&self, msg: Bytes) {
        *lock(&self.plain_first) = Some(msg);
    }

    pub fn live_lanes(&self) -> usize {
        lock(&self.lanes).len()
    }
}
