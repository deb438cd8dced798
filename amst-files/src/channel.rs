//! The message channel the drivers run over: [`Amst`] in practice, or anything else that
//! delivers whole messages in order (the CLI's own session wrapper, a test double).

use std::future::Future;
use std::pin::Pin;

use amst_hybrid::Amst;
use bytes::Bytes;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// Any channel's error.
pub type ChannelError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whole messages, delivered once and in order, both ways. Clones of one channel may send
/// concurrently.
pub trait Channel: Send + Sync + 'static {
    /// Queues one message; resolves once it is accepted.
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<(), ChannelError>>;
    /// The next message, or `None` once the peer has closed.
    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>, ChannelError>>;
    /// Resolves once the peer has acknowledged everything queued.
    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelError>>;
    /// Waits until everything sent is acknowledged, then ends the session; the peer's
    /// `recv` returns `None`.
    fn close(&self) -> BoxFuture<'_, Result<(), ChannelError>>;
}

impl Channel for Amst {
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<(), ChannelError>> {
        Box::pin(async move { Amst::send(self, message).await.map_err(Into::into) })
    }

    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>, ChannelError>> {
        Box::pin(async move { Amst::recv(self).await.map_err(Into::into) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelError>> {
        Box::pin(async move { Amst::flush(self).await.map_err(Into::into) })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), ChannelError>> {
        Box::pin(async move { Amst::close(self).await.map_err(Into::into) })
    }
}
