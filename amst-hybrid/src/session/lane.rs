//! Lanes (one transport in one session) and the route that picks among them. Where a lane
//! stands in the Retire handshake ([`LaneState`](crate::roster::LaneState)) is kept by the
//! session's roster, so that every transition happens under one lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use amst_core::{Mode, Transport, TransportKind};
use tokio::sync::Notify;

use crate::LaneProfile;
use crate::ledger::LaneId;

/// When a switch put a lane on the route: (swap instant, decision instant, transport
/// messages before the swap). The switch is timed until the first message after it is
/// acknowledged, from the swap and from the decision (which adds the dial and the Attach
/// round trip).
pub(crate) type SwitchMark = (Instant, Instant, u64);

/// One transport in one session.
pub(crate) struct Lane {
    pub id: LaneId,
    pub transport: Arc<dyn Transport>,
    pub kind: TransportKind,
    /// Known on the client, which dialed it.
    pub profile: Option<LaneProfile>,
    /// Held across every send on this transport, so that our count of transport messages
    /// matches the transport's own order (the ack prefix is counted in that order).
    pub tx: tokio::sync::Mutex<()>,
    /// Transport messages queued so far; written only under `tx`.
    pub sent: AtomicU64,
    /// Wakes the lane's ack pump: something was sent, or the lane failed.
    pub kick: Notify,
    pub switch_mark: Mutex<Option<SwitchMark>>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("profile", &self.profile.as_ref().map(|p| p.preset))
            .finish_non_exhaustive()
    }
}

impl Lane {
    /// The transport message count at which a message about to be transmitted on this lane
    /// is acknowledged: `transmit` sends every message as one transport message (a large
    /// one as header and payload in one `send_parts`). Send and resend both ask here, so
    /// their counts cannot part again: when the resend counted two for a large message (an
    /// encoding issue 18 removed), a resent message that nothing followed was never
    /// released, and `close` waited for it. Call it holding `tx`.
    pub fn acked_at_after_next(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + 1
    }

    /// A lane on `transport`, on which `already_sent` messages went out before.
    pub fn new(
        id: LaneId,
        transport: Arc<dyn Transport>,
        profile: Option<LaneProfile>,
        already_sent: u64,
    ) -> Self {
        Lane {
            id,
            kind: transport.metrics().kind,
            transport,
            profile,
            tx: tokio::sync::Mutex::new(()),
            sent: AtomicU64::new(already_sent),
            kick: Notify::new(),
            switch_mark: Mutex::new(None),
        }
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
    /// A route over `lanes` (one, or low-latency then bulk).
    pub fn new(generation: u64, mode: Mode, lanes: &[Arc<Lane>], threshold: usize) -> Self {
        Route {
            generation,
            mode,
            low: lanes[0].clone(),
            bulk: lanes.last().unwrap_or(&lanes[0]).clone(),
            threshold,
        }
    }

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

    pub fn contains(&self, lane: LaneId) -> bool {
        self.low.id == lane || self.bulk.id == lane
    }
}
