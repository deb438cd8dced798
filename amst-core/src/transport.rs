//! The `Transport` trait that TCP, QUIC, RDMA and the in-memory pair implement.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::{Result, TransportMetrics};

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
}
