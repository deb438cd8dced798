//! Per-stream statistics and buffer accounting, as snapshots for callers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::sockopt::TcpInfo;

/// A snapshot of one TCP stream of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStats {
    /// Unique within the session; a re-dialled stream gets a new one.
    pub path: u32,
    /// The stream's slot (its index in the Hello).
    pub slot: u16,
    /// Payload bytes written to this stream, retransmissions included.
    pub bytes_sent: u64,
    /// Payload bytes read from this stream, duplicates included.
    pub bytes_received: u64,
    /// Data chunks written.
    pub chunks_sent: u64,
    /// Data chunks read.
    pub chunks_received: u64,
    /// The congestion control the kernel applied.
    pub congestion: String,
    /// The latest `TCP_INFO` sample, if one was taken.
    pub tcp_info: Option<TcpInfo>,
}

/// Memory the session holds for its messages, with the peaks seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Bytes queued by `send` and not yet cut into chunks.
    pub send_queued: u64,
    /// Bytes sent and not yet acknowledged.
    pub send_unacked: u64,
    /// Peak of `send_queued + send_unacked`.
    pub send_peak: u64,
    /// Bytes received and not yet taken by `recv`.
    pub recv_buffered: u64,
    /// Peak of `recv_buffered`.
    pub recv_peak: u64,
    /// The credit window granted to the peer.
    pub receive_window: u64,
    /// Duplicate chunks the receiver dropped.
    pub duplicates: u64,
}

/// The live counters behind [`StreamStats`].
#[derive(Debug, Default)]
pub(crate) struct StreamCtl {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub chunks_received: AtomicU64,
    pub info: Mutex<Option<TcpInfo>>,
    /// The stream is ending gracefully (a lock-free copy of the protocol's path state, which
    /// decides what the writer sends).
    pub stop: AtomicBool,
    pub wake: Notify,
}

impl StreamCtl {
    pub(crate) fn mark_stopping(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}
