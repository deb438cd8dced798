//! Closing: lanes leave through the Retire handshake, and the session through Bye. What each
//! step means is the roster's call; this file does the sending, draining and closing.

use std::sync::Arc;
use std::time::Duration;

use amst_core::Transport;
use amst_core::util::lock;
use tracing::{debug, warn};

use super::{HybridSession, Lane};
use crate::roster::{Parting, RetireStep};
use crate::wire::HybridFrame;
use crate::{Error, Result};

impl HybridSession {
    /// Waits until everything sent is acknowledged, says Bye, and closes every transport.
    pub async fn close(self: &Arc<Self>) -> Result<()> {
        let Some(parting) = lock(&self.roster).parting() else {
            return Ok(());
        };
        let result = match parting {
            Parting::SayBye => {
                async {
                    self.flush_while_acks_come().await?;
                    let messages = self.messages_sent();
                    let lane = self.route.load().low.clone();
                    self.send_control(&lane, HybridFrame::Bye { messages })
                        .await
                }
                .await
            }
            Parting::PeerLeft => {
                // The peer said goodbye first: it reads nothing more, so only give the ack
                // pumps a moment and check that it had acknowledged everything we sent.
                let _ = tokio::time::timeout(Duration::from_millis(200), self.flush()).await;
                match self.unacked() {
                    (0, _) => Ok(()),
                    (n, _) => Err(Error::Closed(format!(
                        "the peer closed with {n} of our messages unacknowledged"
                    ))),
                }
            }
        };
        let transports: Vec<Arc<dyn Transport>> = {
            let mut roster = lock(&self.roster);
            roster.set_closing();
            roster.handles().map(|l| l.transport.clone()).collect()
        };
        let drain = self.config.drain_timeout;
        let closing = async move {
            for t in transports {
                let _ = tokio::time::timeout(drain, t.close()).await;
            }
        };
        if parting == Parting::PeerLeft {
            // Nothing of ours is left to drain; release in the background.
            tokio::spawn(closing);
        } else {
            closing.await;
        }
        self.shut_down();
        result
    }

    /// [`Self::flush`], for as long as acknowledgements keep coming: a message that is
    /// never acknowledged on a live transport (seen once after a switch, in the detect
    /// benchmark) would otherwise hold `close` forever. After `drain_timeout` without any
    /// progress, closing fails and says how much was left unacknowledged.
    async fn flush_while_acks_come(&self) -> Result<()> {
        let quiet = self.config.drain_timeout;
        loop {
            let before = self.unacked();
            match tokio::time::timeout(quiet, self.flush()).await {
                Ok(r) => return r,
                Err(_) if self.unacked() != before => {}
                Err(_) => {
                    let (n, bytes) = self.unacked();
                    return Err(Error::Closed(format!(
                        "{n} of our messages ({bytes} bytes) were still unacknowledged after \
                         {} s without an acknowledgement; closing without them",
                        quiet.as_secs()
                    )));
                }
            }
        }
    }

    /// Client: a switch left `lane` behind. Unless it is kept warm, it retires: no more data
    /// on it; the server answers with its own Retire, and both close.
    pub(super) fn leave_lane(self: &Arc<Self>, lane: Arc<Lane>) {
        if self.config.keep_warm {
            debug!(lane = lane.id, "keeping the old transport warm");
            return;
        }
        if !lock(&self.roster).leave(lane.id) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move { me.retire_lane(lane).await });
    }

    async fn retire_lane(self: Arc<Self>, lane: Arc<Lane>) {
        if self.send_control(&lane, HybridFrame::Retire).await.is_err() {
            lock(&self.roster).fail(lane.id);
            self.remove_lane(&lane);
            return;
        }
        let step = lock(&self.roster).on_retire_sent(lane.id);
        if step == RetireStep::Close {
            self.close_lane(&lane).await;
        }
    }

    /// The peer sent Retire on `lane`: nothing more comes from it there.
    pub(super) async fn on_peer_retired(&self, lane: &Arc<Lane>) {
        let in_route = self.route.load().contains(lane.id);
        let step = lock(&self.roster).on_retire_received(lane.id, in_route);
        match step {
            RetireStep::Wait => {}
            RetireStep::Close => self.close_lane(lane).await,
            RetireStep::InUse => warn!(lane = lane.id, "the peer retired a lane still in use"),
            RetireStep::Answer => {
                // After our own Retire we send nothing more here either.
                let _ = self.send_control(lane, HybridFrame::Retire).await;
                let step = lock(&self.roster).on_retire_sent(lane.id);
                if step == RetireStep::Close {
                    self.close_lane(lane).await;
                }
            }
        }
    }

    /// Forgets a lane that is dead (closed or failed): its unacknowledged messages stay in
    /// the ledger, and whoever waits on the route or the window looks again.
    pub(super) fn remove_lane(&self, lane: &Lane) {
        lock(&self.roster).remove(lane.id);
        lock(&self.ledger).remove_lane(lane.id);
        lane.kick.notify_one();
        self.route_changed.notify_waiters();
        self.room.notify_waiters();
    }

    /// Drains and closes a lane's transport, then forgets the lane.
    pub(super) async fn close_lane(&self, lane: &Arc<Lane>) {
        let r = tokio::time::timeout(self.config.drain_timeout, lane.transport.close()).await;
        if !matches!(r, Ok(Ok(()))) {
            debug!(lane = lane.id, "old transport did not drain cleanly: {r:?}");
        }
        lock(&self.roster).fail(lane.id);
        self.remove_lane(lane);
    }
}
