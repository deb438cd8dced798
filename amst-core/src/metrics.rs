//! Counters and path estimates that every transport reports.

use std::time::Duration;

use crate::TransportKind;

/// A snapshot of one transport's counters and its view of the path.
#[derive(Clone, Debug, PartialEq)]
pub struct TransportMetrics {
    /// Which transport this is.
    pub kind: TransportKind,
    /// Payload bytes handed to the network, retransmissions included.
    pub bytes_sent: u64,
    /// Payload bytes received, duplicates included.
    pub bytes_received: u64,
    /// Messages queued by the application.
    pub messages_sent: u64,
    /// Messages delivered to the application.
    pub messages_received: u64,
    /// The first `messages_acked` messages sent are known to have reached the peer whole.
    /// Acknowledgement is always of a prefix, which is what lossless switching relies on.
    pub messages_acked: u64,
    /// Chunks sent more than once (after a dead stream, a timeout or a loss).
    pub chunks_retransmitted: u64,
    /// Smoothed round-trip time, if measured.
    pub rtt: Option<Duration>,
    /// Minimum round-trip time seen, if measured.
    pub min_rtt: Option<Duration>,
    /// Most recent delivery-rate estimate in bytes per second, if measured.
    pub delivery_rate: Option<u64>,
    /// Streams (TCP connections, QUIC streams, queue pairs) currently carrying data.
    pub active_streams: usize,
    /// Payload bytes the network layer sent again (TCP: the kernel's `tcpi_bytes_retrans`
    /// summed over live streams; QUIC: bytes in packets declared lost), if known.
    pub retransmitted_bytes: Option<u64>,
    /// Packets the transport declared lost over its life, where it knows (QUIC's loss
    /// detection). The kernel keeps no such total for TCP; see `lost_outstanding`.
    pub lost_packets: Option<u64>,
    /// Packets the transport marks lost now and has not yet repaired, where it knows (TCP:
    /// the kernel's `tcpi_lost`, summed over the live streams). A level, not a count.
    pub lost_outstanding: Option<u64>,
    /// The congestion window of the amst-cc model, bytes, if one runs.
    pub cwnd: Option<u64>,
    /// The pacing rate the amst-cc model set, bytes per second, if pacing is on.
    pub pacing_rate: Option<u64>,
    /// The chunk size the sender cuts messages into now, bytes, if it chunks.
    pub chunk_size: Option<u64>,
    /// Bytes the peer still lets this side send beyond what it has acknowledged (the credit
    /// window), if the transport uses credit.
    pub credit_window: Option<u64>,
    /// Bytes received and held (reassembly or not yet taken by `recv`), if known.
    pub receive_held_bytes: Option<u64>,
}

impl TransportMetrics {
    /// All counters zero, no estimates.
    pub fn new(kind: TransportKind) -> Self {
        TransportMetrics {
            kind,
            bytes_sent: 0,
            bytes_received: 0,
            messages_sent: 0,
            messages_received: 0,
            messages_acked: 0,
            chunks_retransmitted: 0,
            rtt: None,
            min_rtt: None,
            delivery_rate: None,
            active_streams: 0,
            retransmitted_bytes: None,
            lost_packets: None,
            lost_outstanding: None,
            cwnd: None,
            pacing_rate: None,
            chunk_size: None,
            credit_window: None,
            receive_held_bytes: None,
        }
    }
}
