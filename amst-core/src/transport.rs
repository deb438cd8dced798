//! The `Transport` trait that TCP, QUIC, RDMA and the in-memory pair implement.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use std::time::Duration;

use crate::{AckWatch, Error, Result, TransportMetrics};

/// A boxed, `Send` future: what the trait's methods return, so that the trait stays usable as
/// `Arc<dyn Transport>` (amst-hybrid swaps the active one with arc-swap).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A reliable, ordered, message-oriented connection to one peer.
///
/// Messages from one sender arrive whole, exactly once and in send order. Every method takes
/// `&self`, so one transport can be shared by many tasks: concurrent `send`s are ordered by
/// the order in which they were queued.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Queues a message. The future resolves once the message is accepted into the send
    /// queue (which may wait for the peer's credit), not when it is delivered: use
    /// [`flush`](Transport::flush) for that.
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<()>>;

    /// Queues one message made of `header` followed by `payload`; the peer receives them as
    /// one message. A transport that can send both without joining them (amst-tcp, amst-quic)
    /// does, so a protocol above can put a small header on a large payload without copying
    /// it; the default joins them.
    fn send_parts(&self, header: Bytes, payload: Bytes) -> BoxFuture<'_, Result<()>> {
        let mut joined = Vec::with_capacity(header.len() + payload.len());
        joined.extend_from_slice(&header);
        joined.extend_from_slice(&payload);
        self.send(Bytes::from(joined))
    }

    /// A subscription to the count of messages, from the first sent, that the peer has
    /// acknowledged as received whole (the same count as
    /// [`TransportMetrics::messages_acked`]): wait on it instead of polling metrics.
    fn acked(&self) -> AckWatch;

    /// Resolves when the peer has acknowledged every message queued before the call.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;

    /// The next whole message, or `None` once the peer has closed gracefully and everything
    /// it sent has been received.
    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>>>;

    /// A snapshot of the counters and the path estimates.
    fn metrics(&self) -> TransportMetrics;

    /// Closes gracefully: waits until everything queued is acknowledged (the drain), tells
    /// the peer, and releases the connection. Later sends fail with [`crate::Error::Closed`].
    fn close(&self) -> BoxFuture<'_, Result<()>>;

    /// Measures the path actively: one round trip, and when `burst_bytes > 0`, the delivery
    /// rate of a short burst of that many padding bytes (a packet train) that the peer
    /// discards. The detector uses it only when the link is idle, within a byte budget.
    fn probe(&self, burst_bytes: u64) -> BoxFuture<'_, Result<PathSample>> {
        let _ = burst_bytes;
        let kind = self.metrics().kind;
        Box::pin(async move {
            Err(Error::Unavailable {
                transport: kind,
                reason: "this transport has no active probe".into(),
            })
        })
    }
}

/// One active measurement of the path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathSample {
    /// Round-trip time of the probe.
    pub rtt: Duration,
    /// Delivery rate of the burst in bytes per second, when one was sent.
    pub delivery_rate: Option<u64>,
    /// Bytes the probe put on the wire, both directions.
    pub bytes_used: u64,
}
