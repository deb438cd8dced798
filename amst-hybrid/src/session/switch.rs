//! Switching: the client dials or reuses lanes and attaches them under a new generation; the
//! server installs the route when every lane of it attached; both swap the route and resend
//! what is unacknowledged. A failed lane on the route is replaced the same way.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amst_core::Mode;
use amst_core::util::lock;
use tracing::{info, warn};

use super::{HybridSession, Lane, Role, Route};
use crate::ledger::LaneId;
use crate::roster::AttachStep;
use crate::wire::HybridFrame;
use crate::{Error, Result};

impl HybridSession {
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
            // The lane's pump may be parked on an idle lane: wake it now, so that it follows
            // acks (times the switch, releases the ledger) while the resend below is still
            // going out. Woken only after it, a 45 MiB resend onto a paced lane read as a
            // 110 ms switch whose first ack had come back in a few.
            l.kick.notify_one();
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
            let idx_end = lane.acked_at_after_next();
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
        let current = self.route.load().generation;
        let step = lock(&self.roster).on_attach(current, lane.clone(), generation, index, count);
        let lanes = match step {
            AttachStep::Reject(reason) => {
                let _ = self
                    .send_control(&lane, HybridFrame::Reject { reason })
                    .await;
                return;
            }
            AttachStep::Wait => return,
            AttachStep::Install(lanes) => lanes,
        };
        let _switching = self.switch_lock.lock().await;
        if generation <= self.route.load().generation {
            return;
        }
        let route = Route::new(
            generation,
            mode,
            &lanes,
            self.config.small_message_threshold,
        );
        self.install_route(route, None, || Some(HybridFrame::AttachAck { generation }))
            .await;
    }

    /// Client: moves the session to `mode`. Reuses open transports whose profile fits,
    /// dials the rest, attaches them under a new generation, waits for the server's ack, then
    /// swaps and resends. On failure the old route stays. `force` switches even when the
    /// mode is already current (to replace a failed transport).
    pub async fn switch_to(self: &Arc<Self>, mode: Mode, force: bool) -> Result<Duration> {
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
                .all(|(l, p)| l.profile.as_ref() == Some(p) && lock(&self.roster).usable(l.id));
        if same && !force {
            return Ok(Duration::ZERO);
        }
        let failed = |reason: String| Error::SwitchFailed { mode, reason };
        let mut lanes: Vec<Arc<Lane>> = Vec::new();
        let mut dialed: Vec<Arc<Lane>> = Vec::new();
        let dial_started = Instant::now();
        for p in &profiles {
            let existing = lock(&self.roster).find_open(|l| l.profile.as_ref() == Some(p));
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
        let dial_took = dial_started.elapsed();
        let attach_started = Instant::now();
        let generation = lock(&self.roster).begin_attach(current.generation);
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
            let waited =
                tokio::time::timeout(self.config.attach_timeout, self.attach_outcome(generation))
                    .await;
            match waited {
                Err(_) => Err(failed(format!(
                    "the server did not attach the new transport within {:?}",
                    self.config.attach_timeout
                ))),
                Ok(None) => Err(failed("session ended".into())),
                Ok(Some(Err(reason))) => Err(Error::Rejected(reason)),
                Ok(Some(Ok(()))) => Ok(()),
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
        let attach_took = attach_started.elapsed();
        let route = Route::new(
            generation,
            mode,
            &lanes,
            self.config.small_message_threshold,
        );
        let old = self.install_route(route, Some(started), || None).await;
        let now = self.route.load_full();
        for l in old.lanes() {
            if now.contains(l.id) || self.lane_dead(&l) {
                continue;
            }
            self.leave_lane(l);
        }
        info!(
            "switched {} -> {mode} (generation {generation}) in {:?}: {} lane(s) dialed in {dial_took:?}, attached in {attach_took:?}",
            current.mode,
            started.elapsed(),
            dialed.len(),
        );
        Ok(started.elapsed())
    }

    /// Client: waits for the server's AttachAck (`Ok`) or Reject (`Err`, its reason) of
    /// `generation`; `None` when the session shuts down first.
    async fn attach_outcome(&self, generation: u64) -> Option<std::result::Result<(), String>> {
        loop {
            let notified = self.attach_changed.notified();
            if let Some(outcome) = lock(&self.roster).attach_outcome(generation) {
                return Some(outcome);
            }
            if self.is_shut_down() {
                return None;
            }
            notified.await;
        }
    }

    /// Server: asks the client to switch, and waits until the new route is installed.
    pub async fn request_mode(&self, mode: Mode) -> Result<()> {
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

    /// A lane's transport failed. Off the route it is only forgotten; on the route the client
    /// reconnects in the same mode (a forced switch that resends), and the server waits up to
    /// `drain_timeout` for the client to reattach before the session fails.
    pub(super) fn lane_failed(self: &Arc<Self>, lane: &Arc<Lane>, reason: String) {
        if !lock(&self.roster).fail(lane.id) {
            return;
        }
        lane.kick.notify_one();
        let in_route = self.route.load().contains(lane.id);
        if self.is_shut_down() || lock(&self.roster).is_closing() {
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
}
