//! Sending: the hot path, control frames, flushing, and the per-lane ack pump that releases
//! acknowledged messages from the ledger and times switches.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amst_core::util::lock;
use bytes::Bytes;
use tracing::debug;

use super::{HybridSession, Lane};
use crate::ledger::Pushed;
use crate::wire::{self, HybridFrame};
use crate::{Error, Result};

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl HybridSession {
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
        loop {
            let lane = self.route.load().pick(msg.len()).clone();
            let guard = lane.tx.lock().await;
            let idx_end = lane.acked_at_after_next();
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
    pub(super) async fn transmit(self: &Arc<Self>, lane: &Arc<Lane>, seq: u64, msg: &Bytes) {
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
    pub(super) async fn send_control(&self, lane: &Lane, frame: HybridFrame) -> Result<()> {
        let _g = lane.tx.lock().await;
        self.send_control_locked(lane, frame).await
    }

    pub(super) async fn send_control_locked(&self, lane: &Lane, frame: HybridFrame) -> Result<()> {
        lane.transport.send(frame.encode()).await?;
        lane.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Resolves when every message sent so far is acknowledged.
    pub async fn flush(&self) -> Result<()> {
        loop {
            let notified = self.room.notified();
            if lock(&self.ledger).is_empty() {
                return Ok(());
            }
            self.fatal()?;
            if lock(&self.roster).peer_gone() {
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

    /// Unacknowledged (messages, bytes).
    pub fn unacked(&self) -> (u64, u64) {
        let l = lock(&self.ledger);
        (l.unacked_messages(), l.unacked_bytes())
    }

    pub fn acked_bytes(&self) -> u64 {
        lock(&self.ledger).acked_bytes()
    }

    /// The sequence number the next message gets: how many were sent.
    pub(super) fn messages_sent(&self) -> u64 {
        lock(&self.ledger).next_seq()
    }

    /// Recent acknowledged throughput, bytes per second.
    pub fn throughput(&self) -> f64 {
        let r = *lock(&self.rate);
        if r.0.elapsed() > Duration::from_secs(1) {
            // Nothing acknowledged lately: the rate since the last sample, decaying to 0.
            let acked = lock(&self.ledger).acked_bytes();
            return (acked - r.1) as f64 / r.0.elapsed().as_secs_f64();
        }
        r.2
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

    /// Follows the transport's acknowledged prefix (its `acked` subscription) while messages
    /// are outstanding, releases them from the ledger, and times the switch.
    pub(super) async fn pump_lane(self: Arc<Self>, lane: Arc<Lane>) {
        let acks = lane.transport.acked();
        let mut seen = 0;
        loop {
            if self.lane_dead(&lane) || self.is_shut_down() {
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
}
