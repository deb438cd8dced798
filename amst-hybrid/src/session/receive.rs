//! Receiving: one reader per lane decodes hybrid frames, feeds data to the merger and the
//! rest to the roster or the switch, and `recv` hands merged messages to the application.

use std::sync::Arc;

use amst_core::util::lock;
use bytes::Bytes;
use tracing::{debug, warn};

use super::{HybridSession, Lane, Role};
use crate::roster::LaneEnd;
use crate::wire::HybridFrame;
use crate::{Error, Result};

/// Why a lane's reader stopped, when it stopped without an error.
enum Stopped {
    Shutdown,
    /// The transport ended.
    Ended,
    /// The peer sent Retire: nothing more comes on this lane.
    Retired,
}

impl HybridSession {
    /// The next message in sequence order, `None` after the peer's Bye and its last message.
    pub async fn recv(&self) -> Result<Option<Bytes>> {
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
            self.fatal()?;
            if self.is_shut_down() {
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

    /// Delivered (messages, bytes) and duplicates dropped.
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
                    || self.is_shut_down()
                {
                    break;
                }
                notified.await;
            }
        }
        Ok(())
    }

    /// The lane's reader: runs until shutdown, the transport's end, the peer's Retire, or an
    /// error, then settles the lane.
    pub(super) async fn read_lane(self: Arc<Self>, lane: Arc<Lane>) {
        let outcome = self.read_frames(&lane).await;
        match outcome {
            Ok(Stopped::Shutdown) => {}
            Ok(Stopped::Retired) => {
                debug!(lane = lane.id, "peer retired the lane");
                self.on_peer_retired(&lane).await;
            }
            Err(Error::Protocol(p)) => self.fail(format!("lane {}: {p}", lane.id)),
            Ok(Stopped::Ended) | Err(_) => {
                let why = match &outcome {
                    Err(e) => format!("receive failed: {e}"),
                    Ok(_) => "the transport ended".into(),
                };
                let end = lock(&self.roster).on_lane_ended(lane.id);
                match end {
                    LaneEnd::Gone => self.remove_lane(&lane),
                    LaneEnd::Failed => self.lane_failed(&lane, why),
                }
            }
        }
        self.readable.notify_waiters();
    }

    async fn read_frames(self: &Arc<Self>, lane: &Arc<Lane>) -> Result<Stopped> {
        loop {
            let msg = tokio::select! {
                r = lane.transport.recv() => r?,
                _ = self.until_shutdown() => return Ok(Stopped::Shutdown),
            };
            let Some(msg) = msg else {
                return Ok(Stopped::Ended);
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
                    lock(&self.roster).on_attach_ack(generation);
                    self.attach_changed.notify_waiters();
                }
                HybridFrame::Reject { reason } => {
                    warn!(lane = lane.id, "peer rejected: {reason}");
                    lock(&self.roster).on_reject(reason);
                    self.attach_changed.notify_waiters();
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
                HybridFrame::Retire => return Ok(Stopped::Retired),
                HybridFrame::Bye { messages } => {
                    lock(&self.merger).set_end(messages)?;
                    lock(&self.roster).on_bye();
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
}
