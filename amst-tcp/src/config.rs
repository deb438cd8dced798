//! Configuration: the two profiles from the seed, and every knob they set.

use std::time::Duration;

use amst_core::codec::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Psk};
use amst_core::{Congestion, Error, MemoryBudget, Result};

use crate::tls::TcpTls;

/// Smallest chunk the adaptive tuner picks.
pub const MIN_CHUNK: usize = 16 << 10;
/// Largest chunk the adaptive tuner picks.
pub const MAX_CHUNK: usize = 512 << 10;

/// Which preset a configuration started from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// A long or lossy path: 4–16 paced streams under BBR.
    Internet,
    /// A short, fast path: 32–512 streams under CUBIC, large chunks.
    Datacenter,
}

/// Everything a [`TcpTransport`](crate::TcpTransport) or [`TcpListener`](crate::TcpListener)
/// needs. Start from [`TcpConfig::internet`] or [`TcpConfig::datacenter`] and override fields.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// The preset this configuration started from.
    pub profile: Profile,
    /// Streams the client opens at connect.
    pub streams: usize,
    /// The adaptive tuner never goes below this many streams.
    pub min_streams: usize,
    /// The adaptive tuner never goes above this many; the server refuses more per session.
    pub max_streams: usize,
    /// Kernel congestion control per stream; a kernel without it falls back with a warning.
    pub congestion: Congestion,
    /// Cap each stream's kernel pacing rate (`SO_MAX_PACING_RATE`) at the aggregate model's
    /// pacing rate divided by the stream count.
    pub pacing: bool,
    /// Let the streams compete as N flows: with pacing on, each stream is still capped at
    /// its share of the aggregate model's rate, but the model's in-flight cap is not enforced,
    /// so the N kernel windows add up (on the benchmark link this took 0.73-0.81 of it against
    /// one other BBR flow). Off (the default): the session's streams together act as one
    /// flow toward others.
    pub aggressive: bool,
    /// Initial chunk payload size in bytes.
    pub chunk_size: usize,
    /// Let the transport tune the stream count and chunk size from measurements (client side;
    /// the server follows the streams the client opens).
    pub adaptive: bool,
    /// The pre-shared key both sides prove they hold before any data is accepted.
    pub psk: Psk,
    /// Bytes the peer may send beyond what the application has taken (the credit window),
    /// at most: the window is also at most this session's share of `memory_budget`.
    pub receive_window: u64,
    /// The byte budget every received byte is held against, shared with every other session
    /// given the same budget: [`MemoryBudget::process`] unless set.
    pub memory_budget: MemoryBudget,
    /// Bytes `send` accepts into the queue before it waits for the writers to catch up.
    pub send_queue: u64,
    /// Largest message accepted, either way.
    pub max_message: u64,
    /// How long a connecting stream has to complete the handshake.
    pub handshake_timeout: Duration,
    /// Unacknowledged chunks older than this (or 8 RTTs, if longer) are sent again on other
    /// streams.
    pub stall_timeout: Duration,
    /// A session with no live stream for this long fails (the client keeps re-dialling until
    /// then).
    pub reconnect_timeout: Duration,
    /// With data outstanding, a session that hears nothing from the peer (no ack, no Pong to
    /// the Pings sent every third of this) for this long fails with `Error::Timeout`: a hung
    /// or frozen peer whose kernel still acknowledges TCP.
    pub idle_timeout: Duration,
    /// TCP keepalive idle time; `None` turns keepalive off.
    pub keepalive: Option<Duration>,
    /// `SO_SNDBUF` override; `None` leaves kernel autotuning on.
    pub send_buffer_size: Option<usize>,
    /// `SO_RCVBUF` override; `None` leaves kernel autotuning on.
    pub recv_buffer_size: Option<usize>,
    /// `TCP_NOTSENT_LOWAT`: unsent bytes the kernel may hold per stream. Small values keep
    /// the kernel queue short, so a slow stream takes fewer chunks.
    pub notsent_lowat: Option<u32>,
    /// How often `TCP_INFO` is sampled, stalls are checked and the model is updated.
    pub sample_period: Duration,
    /// How often the adaptive tuner may change the stream count or chunk size.
    pub adapt_period: Duration,
    /// Most concurrent sessions a listener serves.
    pub max_sessions: usize,
    /// Most connections a listener lets run their handshake at once; beyond it, new
    /// connections are closed at once (slowloris protection).
    pub max_pending_handshakes: usize,
    /// TLS 1.3 on every stream, or `None` for plain TCP. Both sides must agree. Plain TCP is
    /// authenticated (PSK) but readable on the wire.
    pub tls: Option<TcpTls>,
    /// Protocol versions offered or accepted; for compatibility tests.
    #[doc(hidden)]
    pub versions: (u16, u16),
}

impl TcpConfig {
    /// The internet profile: 8 streams (4–16), BBR, pacing on, 128 KiB chunks, TLS on
    /// ([`TcpTls::psk_bound`]).
    pub fn internet(psk: Psk) -> Self {
        TcpConfig {
            profile: Profile::Internet,
            streams: 8,
            min_streams: 4,
            max_streams: 16,
            congestion: Congestion::Bbr,
            pacing: true,
            aggressive: false,
            chunk_size: 128 << 10,
            adaptive: true,
            psk,
            receive_window: 64 << 20,
            memory_budget: MemoryBudget::process(),
            send_queue: 32 << 20,
            max_message: 1 << 30,
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(3),
            reconnect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10),
            keepalive: Some(Duration::from_secs(15)),
            send_buffer_size: None,
            recv_buffer_size: None,
            notsent_lowat: Some(256 << 10),
            sample_period: Duration::from_millis(100),
            adapt_period: Duration::from_secs(1),
            max_sessions: 1024,
            max_pending_handshakes: 256,
            tls: Some(TcpTls::psk_bound()),
            versions: (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
        }
    }

    /// The datacenter profile: 64 streams (32–512), CUBIC, no pacing, 512 KiB chunks, TLS
    /// off.
    pub fn datacenter(psk: Psk) -> Self {
        TcpConfig {
            profile: Profile::Datacenter,
            streams: 64,
            min_streams: 32,
            max_streams: 512,
            congestion: Congestion::Cubic,
            pacing: false,
            chunk_size: 512 << 10,
            receive_window: 256 << 20,
            send_queue: 64 << 20,
            stall_timeout: Duration::from_secs(1),
            reconnect_timeout: Duration::from_secs(10),
            notsent_lowat: Some(1 << 20),
            tls: None,
            ..TcpConfig::internet(psk)
        }
    }

    /// Turns TLS on with these settings, or off with `None`.
    pub fn with_tls(mut self, tls: Option<TcpTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Holds received bytes against `budget` instead of the process's.
    pub fn with_memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.memory_budget = budget;
        self
    }

    /// Sets the stream count at connect and widens the bounds to include it.
    pub fn with_streams(mut self, streams: usize) -> Self {
        self.streams = streams;
        self.min_streams = self.min_streams.min(streams);
        self.max_streams = self.max_streams.max(streams);
        self
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(Error::Config { field, reason });
        if self.min_streams == 0 || self.min_streams > self.max_streams {
            return bad(
                "min_streams",
                format!(
                    "is {} with max_streams {}; need 1 <= min <= max",
                    self.min_streams, self.max_streams
                ),
            );
        }
        if self.streams < self.min_streams || self.streams > self.max_streams {
            return bad(
                "streams",
                format!(
                    "is {}; must lie within min_streams {} and max_streams {}",
                    self.streams, self.min_streams, self.max_streams
                ),
            );
        }
        if self.max_streams > u16::MAX as usize {
            return bad(
                "max_streams",
                format!("is {}; at most 65535", self.max_streams),
            );
        }
        if !(1..=(4 << 20)).contains(&self.chunk_size) {
            return bad(
                "chunk_size",
                format!("is {}; must be 1..=4 MiB", self.chunk_size),
            );
        }
        if self.receive_window < self.chunk_size as u64 {
            return bad(
                "receive_window",
                format!(
                    "is {}; must hold at least one chunk ({})",
                    self.receive_window, self.chunk_size
                ),
            );
        }
        if self.send_queue == 0 {
            return bad("send_queue", "is 0".into());
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return bad(
                "idle_timeout",
                format!("is {:?}; at least 100 ms", self.idle_timeout),
            );
        }
        if self.sample_period.is_zero() {
            return bad("sample_period", "is 0".into());
        }
        if self.max_pending_handshakes == 0 {
            return bad("max_pending_handshakes", "is 0; at least 1".into());
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        Ok(())
    }
}
