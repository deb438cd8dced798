//! The one seam between the CLI and the AMST libraries: a [`Link`] is a connected session,
//! whichever crate provides it. Everything else in the CLI (the file protocol, progress,
//! reports) talks to this trait only.

use std::sync::Arc;
use std::time::Duration;

use amst_core::{BoxFuture, Mode, Transport, TransportKind};
use bytes::Bytes;

/// Any library's error. An `amst_core::Error` inside is found again by
/// [`Failure::from_link`](crate::error::Failure::from_link) to explain the cause.
pub type LinkError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A `Result` with a [`LinkError`].
pub type Result<T, E = LinkError> = std::result::Result<T, E>;

fn boxed<T>(r: amst_core::Result<T>) -> Result<T> {
    r.map_err(|e| Box::new(e) as LinkError)
}

/// What the CLI shows about a session at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkStats {
    /// The mode the session runs in now.
    pub mode: Mode,
    /// The transport carrying data now.
    pub transport: TransportKind,
    /// Streams carrying data now.
    pub streams: usize,
    /// Payload bytes put on the network, retransmissions included.
    pub bytes_sent: u64,
    /// Payload bytes received, duplicates included.
    pub bytes_received: u64,
    /// Chunks sent more than once.
    pub retransmits: u64,
    /// Mode switches so far.
    pub mode_switches: u64,
    /// How long the last switch took, swap to first acknowledgement.
    pub last_switch: Option<Duration>,
    /// Smoothed round-trip time.
    pub rtt: Option<Duration>,
    /// Minimum round-trip time seen.
    pub min_rtt: Option<Duration>,
}

/// A connected session, as the CLI uses it.
pub trait Link: Send + Sync + std::fmt::Debug + 'static {
    /// Queues one message.
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<()>>;
    /// Waits until the peer has acknowledged everything queued.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
    /// The next message, or `None` once the peer has closed.
    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>>>;
    /// Drains and closes.
    fn close(&self) -> BoxFuture<'_, Result<()>>;
    /// A snapshot for progress and the report.
    fn stats(&self) -> LinkStats;
    /// Switches to `mode` now, or says why it cannot.
    fn force_mode(&self, mode: Mode) -> BoxFuture<'_, Result<(), String>> {
        let _ = mode;
        Box::pin(async { Err("this session has a single transport and cannot switch".into()) })
    }
}

/// A single transport used directly, without the hybrid manager: it never switches, so its
/// mode is whatever it was configured for.
#[derive(Debug, Clone)]
pub struct TransportLink {
    transport: Arc<dyn Transport>,
    mode: Mode,
}

impl TransportLink {
    /// Wraps a connected transport that runs in `mode`.
    pub fn new(transport: Arc<dyn Transport>, mode: Mode) -> Self {
        TransportLink { transport, mode }
    }
}

impl Link for TransportLink {
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { boxed(self.transport.send(message).await) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { boxed(self.transport.flush().await) })
    }

    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>>> {
        Box::pin(async move { boxed(self.transport.recv().await) })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { boxed(self.transport.close().await) })
    }

    fn stats(&self) -> LinkStats {
        let m = self.transport.metrics();
        LinkStats {
            mode: self.mode,
            transport: m.kind,
            streams: m.active_streams,
            bytes_sent: m.bytes_sent,
            bytes_received: m.bytes_received,
            retransmits: m.chunks_retransmitted,
            mode_switches: 0,
            last_switch: None,
            rtt: m.rtt,
            min_rtt: m.min_rtt,
        }
    }
}
