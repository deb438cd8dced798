//! `InMemoryTransport`: two ends of a tokio channel pair that implement [`Transport`], for
//! testing the layers above without a network. It is not a network transport: nothing is
//! chunked, lost or retransmitted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{Mutex, Notify, mpsc};

use crate::{
    AckCounter, AckWatch, BoxFuture, Error, Result, Transport, TransportKind, TransportMetrics,
};

/// Counters one direction shares between its sender and its receiver.
#[derive(Debug, Default)]
struct Direction {
    sent: AtomicU64,
    bytes: AtomicU64,
}

/// One end of an in-memory message channel pair.
#[derive(Debug)]
pub struct InMemoryTransport {
    tx: mpsc::Sender<Bytes>,
    rx: Mutex<mpsc::Receiver<Bytes>>,
    outgoing: Arc<Direction>,
    incoming: Arc<Direction>,
    /// Messages the peer has received from us (the ack), watched by `flush`.
    acked_by_peer: AckWatch,
    /// Messages we have received, published to the peer as its ack.
    we_received: AckCounter,
    closed: AtomicBool,
    /// Shared by both ends: whether the link is cut (see [`cut`](InMemoryTransport::cut)).
    cut: Arc<Cut>,
}

#[derive(Debug, Default)]
struct Cut {
    done: AtomicBool,
    wake: Notify,
}

impl Cut {
    fn check(&self) -> Result<()> {
        if self.done.load(Ordering::Acquire) {
            return Err(Error::PeerClosed {
                code: crate::codec::CloseCode::Normal,
                reason: "the in-memory link was cut".into(),
            });
        }
        Ok(())
    }

    /// Runs `f` until it ends or the link is cut, whichever is first.
    async fn unless_cut<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let woken = self.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        self.check()?;
        tokio::select! {
            r = f => { self.check()?; r }
            () = woken => self.check().and(Err(Error::Closed)),
        }
    }
}

impl InMemoryTransport {
    /// Two connected ends; each direction buffers up to `capacity` messages.
    pub fn pair(capacity: usize) -> (Self, Self) {
        let (a_tx, b_rx) = mpsc::channel(capacity.max(1));
        let (b_tx, a_rx) = mpsc::channel(capacity.max(1));
        let (a_recv_tx, b_recv_tx) = (AckCounter::new(), AckCounter::new());
        let (a_recv_rx, b_recv_rx) = (a_recv_tx.watch(), b_recv_tx.watch());
        let (a_to_b, b_to_a) = (
            Arc::new(Direction::default()),
            Arc::new(Direction::default()),
        );
        let cut = Arc::new(Cut::default());
        let a = InMemoryTransport {
            tx: a_tx,
            rx: Mutex::new(a_rx),
            outgoing: a_to_b.clone(),
            incoming: b_to_a.clone(),
            acked_by_peer: b_recv_rx,
            we_received: a_recv_tx,
            closed: AtomicBool::new(false),
            cut: cut.clone(),
        };
        let b = InMemoryTransport {
            tx: b_tx,
            rx: Mutex::new(b_rx),
            outgoing: b_to_a,
            incoming: a_to_b,
            acked_by_peer: a_recv_rx,
            we_received: b_recv_tx,
            closed: AtomicBool::new(false),
            cut,
        };
        (a, b)
    }

    /// Cuts the link, as a dead network would: from now on every send, receive and flush
    /// on either end fails, and nothing still queued is delivered or acknowledged.
    pub fn cut(&self) {
        self.cut.done.store(true, Ordering::Release);
        self.cut.wake.notify_waiters();
    }

    fn check_open(&self) -> Result<()> {
        self.cut.check()?;
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }
}

impl Transport for InMemoryTransport {
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let len = message.len() as u64;
            let sent = async {
                self.tx.send(message).await.map_err(|_| Error::PeerClosed {
                    code: crate::codec::CloseCode::Normal,
                    reason: "the other end was dropped".into(),
                })
            };
            self.cut.unless_cut(sent).await?;
            self.outgoing.sent.fetch_add(1, Ordering::AcqRel);
            self.outgoing.bytes.fetch_add(len, Ordering::AcqRel);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let target = self.outgoing.sent.load(Ordering::Acquire);
            let acked =
                async { Ok(target == 0 || self.acked_by_peer.beyond(target - 1).await >= target) };
            if self.cut.unless_cut(acked).await? {
                return Ok(());
            }
            Err(Error::PeerClosed {
                code: crate::codec::CloseCode::Normal,
                reason: "the other end was dropped before acknowledging".into(),
            })
        })
    }

    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>>> {
        Box::pin(async move {
            let mut rx = self
                .cut
                .unless_cut(async { Ok(self.rx.lock().await) })
                .await?;
            let msg = self.cut.unless_cut(async { Ok(rx.recv().await) }).await?;
            if msg.is_some() {
                // Under the receive lock, so concurrent receivers count every message.
                self.we_received.advance_to(self.we_received.get() + 1);
            }
            Ok(msg)
        })
    }

    fn metrics(&self) -> TransportMetrics {
        let mut m = TransportMetrics::new(TransportKind::InMemory);
        m.messages_sent = self.outgoing.sent.load(Ordering::Acquire);
        m.bytes_sent = self.outgoing.bytes.load(Ordering::Acquire);
        m.messages_acked = self.acked_by_peer.get();
        m.messages_received = self.we_received.get();
        m.bytes_received = self.incoming.bytes.load(Ordering::Acquire);
        m.active_streams = 1;
        m
    }

    fn acked(&self) -> AckWatch {
        self.acked_by_peer.clone()
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.closed.store(true, Ordering::Release);
            self.flush().await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_in_order_and_flush_waits_for_the_reader() {
        let (a, b) = InMemoryTransport::pair(16);
        for i in 0..10u8 {
            a.send(Bytes::from(vec![i; i as usize])).await.unwrap();
        }
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..10 {
                got.push(b.recv().await.unwrap().unwrap());
            }
            (got, b)
        });
        a.flush().await.unwrap();
        let (got, b) = reader.await.unwrap();
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.as_ref(), vec![i as u8; i].as_slice());
        }
        assert_eq!(a.metrics().messages_acked, 10);
        assert_eq!(b.metrics().bytes_received, 45);
        a.close().await.unwrap();
        assert!(matches!(a.send(Bytes::new()).await, Err(Error::Closed)));
    }

    #[tokio::test]
    async fn a_cut_link_fails_both_ends_and_wakes_a_waiting_receiver() {
        let (a, b) = InMemoryTransport::pair(16);
        let (a, b) = (Arc::new(a), Arc::new(b));
        a.send(Bytes::from_static(b"queued")).await.unwrap();
        assert_eq!(b.recv().await.unwrap().unwrap(), "queued");
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.recv().await }
        });
        a.send(Bytes::from_static(b"lost")).await.unwrap();
        tokio::task::yield_now().await;
        a.cut();
        // The receiver got "lost" before the cut, or the cut woke it.
        let first = waiting.await.unwrap();
        let cut = |r: &Result<Option<Bytes>>| matches!(r, Err(Error::PeerClosed { reason, .. }) if reason.contains("cut"));
        assert!(
            cut(&first) || first.as_ref().is_ok_and(|m| m.is_some()),
            "{first:?}"
        );
        assert!(cut(&b.recv().await));
        assert!(a.send(Bytes::new()).await.is_err());
        assert!(b.send(Bytes::new()).await.is_err());
        assert!(a.flush().await.is_err());
    }
}
