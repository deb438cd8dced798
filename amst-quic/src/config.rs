//! What a QUIC transport is configured with: the key, the certificates, the congestion
//! controller, the windows and how messages map onto streams.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use amst_core::codec::Psk;
use amst_core::{Congestion, Error, MemoryBudget, Result};

use crate::tls::{Fingerprint, Identity};

/// The ALPN protocol id AMST speaks over QUIC.
pub const ALPN: &[u8] = b"amst/3";

/// Which congestion controller drives the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CongestionControl {
    /// amst-cc's BBRv3 in its draft configuration (`amst_cc::BbrConfig::draft()`, no AMST
    /// extension): the default, because on loss it backs off only toward the rate the path
    /// just delivered, where CUBIC cuts its window by a fixed factor.
    #[default]
    AmstBbr,
    /// amst-cc's BBRv3 with its one extension, the random-loss tolerance
    /// (`BbrConfig::draft().with_random_loss_tolerance(true)`): loss rounds without a queue
    /// teach it the path's background loss rate, and the draft's loss thresholds apply to
    /// loss above that. An opt-in; see the README for the measurement.
    AmstBbrLossTolerant,
    /// amst-cc's CUBIC with HyStart++.
    AmstCubic,
    /// quinn's own CUBIC (quinn's default), for comparison.
    QuinnCubic,
    /// quinn's own (experimental) BBR, for comparison.
    QuinnBbr,
    /// quinn's NewReno, for comparison.
    QuinnNewReno,
}

impl CongestionControl {
    /// The name used in logs and benchmarks.
    pub fn as_str(self) -> &'static str {
        match self {
            CongestionControl::AmstBbr => "amst-bbr",
            CongestionControl::AmstBbrLossTolerant => "amst-bbr-loss-tolerant",
            CongestionControl::AmstCubic => "amst-cubic",
            CongestionControl::QuinnCubic => "quinn-cubic",
            CongestionControl::QuinnBbr => "quinn-bbr",
            CongestionControl::QuinnNewReno => "quinn-newreno",
        }
    }
}

impl From<Congestion> for CongestionControl {
    /// amst-cc's implementation of the algorithm.
    fn from(c: Congestion) -> Self {
        match c {
            Congestion::Bbr => CongestionControl::AmstBbr,
            Congestion::Cubic => CongestionControl::AmstCubic,
        }
    }
}

impl fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the sender maps messages onto QUIC streams. The receiver accepts either: chunks carry
/// their message id and offset, and amst-core's reassembler puts them back in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamMapping {
    /// Chunks striped over `streams` long-lived unidirectional streams (the default; see the
    /// README for the loopback numbers behind the choice).
    Striped {
        /// How many streams carry data at once.
        streams: u16,
    },
    /// Each message on fresh unidirectional streams that end with it; at most `concurrency`
    /// streams are written at once.
    PerMessage {
        /// How many streams are written at once.
        concurrency: u16,
    },
}

impl StreamMapping {
    pub(crate) fn lanes(self) -> usize {
        match self {
            StreamMapping::Striped { streams } => streams.max(1) as usize,
            StreamMapping::PerMessage { concurrency } => concurrency.max(1) as usize,
        }
    }
}

impl Default for StreamMapping {
    fn default() -> Self {
        StreamMapping::Striped { streams: 4 }
    }
}

/// How the client checks the server's certificate. Verification is never skipped: every
/// mode either checks the certificate or binds the PSK handshake to this very TLS session.
#[derive(Clone, Debug, Default)]
pub enum PeerVerification {
    /// The server's certificate is accepted as it is, and its authenticity comes from the
    /// PSK handshake, which is bound to this TLS session by an exporter secret (RFC 5705):
    /// a man in the middle holding its own certificate but not the key cannot complete it.
    /// The default, since the PSK is always required.
    #[default]
    PskBound,
    /// Only a certificate whose SHA-256 fingerprint is one of these is accepted.
    Pinned(Vec<Fingerprint>),
    /// WebPKI validation against these trust anchors (DER), including the server name.
    Roots(Vec<rustls::pki_types::CertificateDer<'static>>),
}

/// Everything a [`QuicListener`](crate::QuicListener) or
/// [`QuicTransport::connect`](crate::QuicTransport::connect) needs.
#[derive(Clone)]
pub struct QuicConfig {
    /// The pre-shared key both peers prove they hold before any data is accepted.
    pub psk: Psk,
    /// The certificate and key a listener presents (ignored when connecting).
    pub identity: Option<Identity>,
    /// How a connecting client checks the server (ignored by a listener).
    pub verification: PeerVerification,
    /// The congestion controller, for data sent from this side.
    pub congestion: CongestionControl,
    /// How this side's messages map onto streams.
    pub mapping: StreamMapping,
    /// Bytes the peer may have in flight towards us: AMST's credit window, and QUIC's stream
    /// and connection receive windows. Size it from the path with [`QuicConfig::for_path`].
    pub window: u64,
    /// The byte budget received messages are held against (AMST's credit is at most this
    /// connection's share of it), shared with every session given the same budget:
    /// [`MemoryBudget::process`] unless set. quinn's own receive buffers (up to `window`)
    /// are not counted.
    pub memory_budget: MemoryBudget,
    /// Largest message accepted or sent.
    pub max_message: u64,
    /// Largest chunk of a message written as one frame.
    pub max_chunk: u32,
    /// The ALPN id offered and required; both sides must agree.
    pub alpn: Vec<u8>,
    /// Longest wait for the TLS and PSK handshakes.
    pub handshake_timeout: Duration,
    /// The connection fails after this long without hearing from the peer.
    pub idle_timeout: Duration,
    /// 0-RTT resumption. A listener accepts early data and a
    /// [`QuicConnector`](crate::QuicConnector) that holds a session ticket from an earlier
    /// connection to the same server name sends its AMST Hello (nothing else) in 0-RTT,
    /// saving one round trip; see the README for why only the Hello. Off: tickets still
    /// resume TLS, but nothing is sent early and a listener refuses early data.
    pub zero_rtt: bool,
    /// UDP send and receive buffer sizes requested for the endpoint's socket (raised, never
    /// lowered; the kernel caps them at `net.core.wmem_max` / `rmem_max`).
    pub socket_buffer: usize,
    /// amst-cc BBR's initial congestion window in bytes (quinn's own controllers and
    /// amst-cc CUBIC keep theirs). The draft leaves it to the transport; the default,
    /// [`BBR_INITIAL_WINDOW`], is what quinn's own BBR starts with. BBR paces it out over the
    /// first round trip rather than sending it at once.
    pub initial_window: u64,
}

/// amst-quic's default initial window for amst-cc BBR: 200 datagrams of 1200 bytes, as
/// quinn's BBR. With RFC 9002's 10 datagrams, Startup needs about four more round trips to
/// fill the benchmark's 200 Mbit/s, 100 ms link: in the first 2 s a run delivered 109 Mbit
/// against 226 with this window, and quinn's BBR, which the bench races, had that head start
/// (see the README).
pub const BBR_INITIAL_WINDOW: u64 = 200 * 1200;

impl fmt::Debug for QuicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicConfig")
            .field(
                "identity",
                &self.identity.as_ref().map(Identity::fingerprint),
            )
            .field("verification", &self.verification)
            .field("congestion", &self.congestion)
            .field("mapping", &self.mapping)
            .field("window", &self.window)
            .field("max_message", &self.max_message)
            .field("max_chunk", &self.max_chunk)
            .field("alpn", &String::from_utf8_lossy(&self.alpn))
            .field("zero_rtt", &self.zero_rtt)
            .field("initial_window", &self.initial_window)
            .field("socket_buffer", &self.socket_buffer)
            .finish_non_exhaustive()
    }
}

impl QuicConfig {
    /// Defaults: amst-cc BBR, four striped streams, 256 KiB chunks, 1 GiB messages, a 32 MiB
    /// window (about 2.5 × the BDP of 1 Gbit/s × 100 ms), PSK-bound verification, 0-RTT on,
    /// 8 MiB UDP socket buffers.
    pub fn new(psk: Psk) -> Self {
        QuicConfig {
            psk,
            identity: None,
            verification: PeerVerification::default(),
            congestion: CongestionControl::default(),
            mapping: StreamMapping::default(),
            window: 32 << 20,
            memory_budget: MemoryBudget::process(),
            max_message: 1 << 30,
            max_chunk: 256 << 10,
            alpn: ALPN.to_vec(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            zero_rtt: true,
            socket_buffer: 8 << 20,
            initial_window: BBR_INITIAL_WINDOW,
        }
    }

    /// Sizes the window from a path's bandwidth-delay product: 6 × BDP, at least 4 MiB.
    /// The credit counts from the receiver's cumulative ack, which trails every lost packet
    /// by a round trip, and BBR's Startup inflates the RTT with its own queue: at 3 × BDP the
    /// sender ran out of credit in Startup on a 1% loss path, quinn then called it
    /// application-limited, and BBR's full-pipe check skipped those rounds (Startup ran 4-6 s
    /// into a full queue). See the README for the measurements.
    pub fn for_path(mut self, rate_bps: u64, rtt: Duration) -> Self {
        self.window = Self::bdp_window(rate_bps, rtt);
        self
    }

    /// 6 × `rate_bps` × `rtt` in bytes, at least 4 MiB, at most 1 GiB.
    pub fn bdp_window(rate_bps: u64, rtt: Duration) -> u64 {
        let bdp = (rate_bps as f64 / 8.0 * rtt.as_secs_f64()) as u64;
        bdp.saturating_mul(6).clamp(4 << 20, 1 << 30)
    }

    /// Sets the identity a listener presents.
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Sets how a client checks the server.
    pub fn with_verification(mut self, verification: PeerVerification) -> Self {
        self.verification = verification;
        self
    }

    /// Sets the congestion controller.
    pub fn with_congestion(mut self, congestion: CongestionControl) -> Self {
        self.congestion = congestion;
        self
    }

    /// Sets how messages map onto streams.
    pub fn with_mapping(mut self, mapping: StreamMapping) -> Self {
        self.mapping = mapping;
        self
    }

    /// Sets how long the peer may stay silent before the connection fails (keep-alives go
    /// at a third of it).
    pub fn with_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// Turns 0-RTT resumption on (the default) or off.
    pub fn with_zero_rtt(mut self, zero_rtt: bool) -> Self {
        self.zero_rtt = zero_rtt;
        self
    }

    /// Checks every value; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::Config { field, reason });
        if self.window < u64::from(self.max_chunk) {
            return bad(
                "window",
                format!(
                    "is {} bytes, below max_chunk ({})",
                    self.window, self.max_chunk
                ),
            );
        }
        if self.window > (1 << 40) {
            return bad("window", format!("is {} bytes; at most 1 TiB", self.window));
        }
        if !(1024..=(4 << 20)).contains(&self.max_chunk) {
            return bad(
                "max_chunk",
                format!("is {}; use 1 KiB ..= 4 MiB", self.max_chunk),
            );
        }
        if self.max_message == 0 || self.max_message > (1 << 40) {
            return bad(
                "max_message",
                format!("is {}; use 1 ..= 1 TiB", self.max_message),
            );
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return bad(
                "idle_timeout",
                format!("is {:?}; at least 100 ms", self.idle_timeout),
            );
        }
        if self.socket_buffer > (1 << 30) {
            return bad(
                "socket_buffer",
                format!("is {} bytes; at most 1 GiB", self.socket_buffer),
            );
        }
        if !(MIN_INITIAL_WINDOW..=MAX_INITIAL_WINDOW).contains(&self.initial_window) {
            return bad(
                "initial_window",
                format!(
                    "is {} bytes; use {MIN_INITIAL_WINDOW} ..= {MAX_INITIAL_WINDOW}",
                    self.initial_window
                ),
            );
        }
        if self.alpn.is_empty() || self.alpn.len() > 255 {
            return bad("alpn", "must be 1 to 255 bytes".into());
        }
        if self.mapping.lanes() > 256 {
            return bad(
                "mapping",
                format!("uses {} streams; at most 256", self.mapping.lanes()),
            );
        }
        if let PeerVerification::Pinned(p) = &self.verification
            && p.is_empty()
        {
            return bad(
                "verification",
                "pins no fingerprint; pin at least one".into(),
            );
        }
        Ok(())
    }
}

/// Two datagrams: less and BBR could not keep a packet in flight while one is acked.
const MIN_INITIAL_WINDOW: u64 = 2 * 1200;
/// A first round trip's worth that would fill a 10 Gbit/s, 10 ms path: more is a burst
/// nobody has measured.
const MAX_INITIAL_WINDOW: u64 = 16 << 20;

pub(crate) type SharedConfig = Arc<QuicConfig>;
