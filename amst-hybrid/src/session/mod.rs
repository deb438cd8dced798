//! The async half of a session. A peer that speaks the hybrid protocol gets a
//! [`HybridSession`]: lanes (one per transport), the route in an `ArcSwap`, per-lane readers
//! and ack pumps, switches. A plain AMST peer gets a [`PlainSession`] on its one transport.
//!
//! The hybrid session is split by concern: [`lane`] (lanes and the route), `send` (the hot
//! path and the ack pump), `receive` (the lane readers and the merge), `switch` (Attach,
//! swap, resend, recovery) and `close` (Retire and Bye). Its decisions about Attach, Retire
//! and Bye are made by the sans-IO [`Roster`](crate::roster::Roster); ordering and
//! retention by the [`SendLedger`] and [`ReceiveMerger`].
//!
//! Lock order, to stay deadlock-free: a lane's `tx` (async, held across transport sends) is
//! taken before the ledger, merger or roster mutex (sync, never held across an await, and
//! never two at once); a switch takes the `tx` of every lane of the new route in lane-id
//! order.

mod close;
mod lane;
mod plain;
mod receive;
mod send;
mod switch;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use amst_core::codec::SessionId;
use amst_core::util::{hex, lock};
use amst_core::{Mode, Transport};
use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::ledger::SendLedger;
use crate::merger::ReceiveMerger;
use crate::metrics::{Instruments, SwitchStats};
use crate::roster::Roster;
use crate::{AmstConfig, Connector, Error, LaneProfile, Result};

pub(crate) use lane::{Lane, Route};
pub(crate) use plain::PlainSession;

/// The name auto mode knows the hybrid session by.
pub(crate) type Shared = HybridSession;

/// Which end of the session this is; only the client dials, so only it drives switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that connected.
    Client,
    /// The side that accepted.
    Server,
}

/// One session, of either kind.
#[derive(Clone, Debug)]
pub(crate) enum Session {
    /// The peer lacks HYBRID: one transport, no frames, no switching.
    Plain(Arc<PlainSession>),
    Hybrid(Arc<HybridSession>),
}

/// Everything one hybrid session shares between the application's handles and its tasks.
pub(crate) struct HybridSession {
    pub role: Role,
    pub config: AmstConfig,
    pub session_id: SessionId,
    pub route: ArcSwap<Route>,
    ledger: Mutex<SendLedger>,
    /// The ledger released messages, or a switch resent them: room in the send window.
    room: Notify,
    merger: Mutex<ReceiveMerger>,
    readable: Notify,
    /// The application took messages: readers may pull again.
    space: Notify,
    route_changed: Notify,
    /// The lanes and their Attach, Retire and Bye state.
    roster: Mutex<Roster<Arc<Lane>>>,
    /// The roster recorded an AttachAck or a Reject.
    attach_changed: Notify,
    switch_lock: tokio::sync::Mutex<()>,
    connector: Option<Arc<dyn Connector>>,
    pub instruments: Instruments,
    pub switch_stats: Mutex<SwitchStats>,
    fatal: Mutex<Option<String>>,
    shutdown: watch::Sender<bool>,
    /// Set by `force_mode`: the auto loop leaves the mode alone.
    pub pinned: AtomicBool,
    /// (sample instant, acked bytes then, smoothed rate).
    rate: Mutex<(Instant, u64, f64)>,
}

impl std::fmt::Debug for HybridSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridSession")
            .field("role", &self.role)
            .field("route", &*self.route.load())
            .finish_non_exhaustive()
    }
}

impl HybridSession {
    /// A session whose first route is `first` (generation 0), on which `already_sent`
    /// messages (the handshake) went out before.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        role: Role,
        config: AmstConfig,
        session_id: SessionId,
        first: Arc<dyn Transport>,
        profile: Option<LaneProfile>,
        mode: Mode,
        connector: Option<Arc<dyn Connector>>,
        already_sent: u64,
    ) -> Arc<Self> {
        let lane = Arc::new(Lane::new(0, first, profile, already_sent));
        let mut ledger = SendLedger::new(config.send_window);
        ledger.switch_route(&[0]);
        let route = Route::new(
            0,
            mode,
            std::slice::from_ref(&lane),
            config.small_message_threshold,
        );
        let shared = Arc::new(HybridSession {
            role,
            merger: Mutex::new(ReceiveMerger::new(
                config.max_reorder_bytes,
                config.max_reorder_messages,
            )),
            instruments: Instruments::new(role),
            config,
            session_id,
            route: ArcSwap::from_pointee(route),
            ledger: Mutex::new(ledger),
            room: Notify::new(),
            readable: Notify::new(),
            space: Notify::new(),
            route_changed: Notify::new(),
            roster: Mutex::new(Roster::new(lane.clone())),
            attach_changed: Notify::new(),
            switch_lock: tokio::sync::Mutex::new(()),
            connector,
            switch_stats: Mutex::new(SwitchStats::default()),
            fatal: Mutex::new(None),
            shutdown: watch::channel(false).0,
            pinned: AtomicBool::new(false),
            rate: Mutex::new((Instant::now(), 0, 0.0)),
        });
        shared.instruments.mode(mode);
        shared.spawn_lane_tasks(&lane);
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
        let lane = lock(&self.roster).add(|id| Arc::new(Lane::new(id, transport, profile, 0)));
        self.spawn_lane_tasks(&lane);
        lane
    }

    /// Transports open: current route, warm, draining.
    pub fn live_lanes(&self) -> usize {
        lock(&self.roster).len()
    }

    fn lane_dead(&self, lane: &Lane) -> bool {
        lock(&self.roster).is_dead(lane.id)
    }

    // ---- errors and shutdown -------------------------------------------------------------

    pub fn check_open(&self) -> Result<()> {
        if let Some(f) = lock(&self.fatal).as_ref() {
            return Err(Error::Closed(f.clone()));
        }
        if lock(&self.roster).is_closing() {
            return Err(Error::Closed("closed by this side".into()));
        }
        Ok(())
    }

    fn fatal(&self) -> Result<()> {
        match lock(&self.fatal).as_ref() {
            Some(f) => Err(Error::Closed(f.clone())),
            None => Ok(()),
        }
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
        self.attach_changed.notify_waiters();
    }

    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
        self.wake_all();
        for lane in lock(&self.roster).handles() {
            lane.kick.notify_one();
        }
    }

    fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn until_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

impl Session {
    /// Ends the session's tasks (the last handle is gone).
    pub fn shut_down(&self) {
        if let Session::Hybrid(h) = self {
            h.shut_down();
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Session::Plain(p) => p.role,
            Session::Hybrid(h) => h.role,
        }
    }

    pub fn mode(&self) -> Mode {
        match self {
            Session::Plain(p) => p.mode,
            Session::Hybrid(h) => h.route.load().mode,
        }
    }

    pub async fn flush(&self) -> Result<()> {
        match self {
            Session::Plain(p) => p.flush().await,
            Session::Hybrid(h) => h.flush().await,
        }
    }

    pub async fn recv(&self) -> Result<Option<bytes::Bytes>> {
        match self {
            Session::Plain(p) => p.recv().await,
            Session::Hybrid(h) => h.recv().await,
        }
    }

    pub async fn close(&self) -> Result<()> {
        match self {
            Session::Plain(p) => p.close().await,
            Session::Hybrid(h) => h.close().await,
        }
    }
}
