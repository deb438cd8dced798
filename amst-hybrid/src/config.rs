//! `AmstConfig`: the seed's defaults, a builder, and the per-mode transport profiles.

use std::time::Duration;

use amst_core::codec::Psk;
use amst_core::{Congestion, MemoryBudget, Mode, TransportKind};
use amst_tcp::{MAX_CHUNK, MIN_CHUNK};

use crate::{Error, Result};

/// The transport of the datacenter profile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum DatacenterTransport {
    /// amst-tcp's datacenter preset (the seed's choice).
    #[default]
    Tcp,
    /// amst-quic.
    Quic,
    /// amst-rdma on the named device (or the first with an active port) and GID index (or
    /// the first RoCE v2 one with an IPv4 address). Needs amst-hybrid's feature `rdma` and a
    /// device on both ends; otherwise the lane falls back to TCP with a logged warning.
    Rdma {
        /// Device name, e.g. `rxe0` or `mlx5_0`.
        device: Option<String>,
        /// GID index for RoCE v2.
        gid_index: Option<u32>,
    },
}

impl DatacenterTransport {
    /// The transport kind a lane with this choice asks for.
    pub fn kind(&self) -> TransportKind {
        match self {
            DatacenterTransport::Tcp => TransportKind::Tcp,
            DatacenterTransport::Quic => TransportKind::Quic,
            DatacenterTransport::Rdma { .. } => TransportKind::Rdma,
        }
    }
}

impl From<TransportKind> for DatacenterTransport {
    /// `Rdma` picks the device and GID automatically.
    fn from(kind: TransportKind) -> Self {
        match kind {
            TransportKind::Quic => DatacenterTransport::Quic,
            TransportKind::Rdma => DatacenterTransport::Rdma {
                device: None,
                gid_index: None,
            },
            _ => DatacenterTransport::Tcp,
        }
    }
}

/// How one lane (one transport connection) is set up: what a [`Connector`](crate::Connector)
/// needs to dial it. Two profiles are equal exactly when one connection can serve both.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LaneProfile {
    /// Which transport.
    pub transport: TransportKind,
    /// Which preset: [`Mode::Datacenter`] or [`Mode::Internet`].
    pub preset: Mode,
    /// Streams at connect.
    pub streams: usize,
    /// Lowest stream count the transport's tuner may pick.
    pub min_streams: usize,
    /// Highest stream count the transport's tuner may pick.
    pub max_streams: usize,
    /// Congestion control.
    pub congestion: Congestion,
    /// Pacing on or off.
    pub pacing: bool,
    /// The internet TCP profile's streams compete as separate flows: no shared in-flight cap
    /// from the aggregate model (amst-tcp's `TcpConfig::aggressive`). Always off for
    /// datacenter lanes.
    pub aggressive: bool,
    /// Initial chunk size in bytes.
    pub chunk_size: usize,
}

/// Everything an [`Amst`](crate::Amst) session needs. Start from [`AmstConfig::new`] (the
/// seed's defaults) or [`AmstConfig::builder`].
#[derive(Clone, Debug)]
pub struct AmstConfig {
    /// The pre-shared key every transport authenticates with.
    pub psk: Psk,
    /// Offer the datacenter transport (seed: on).
    pub enable_datacenter: bool,
    /// Offer the internet transport (seed: on).
    pub enable_internet: bool,
    /// Follow the detector's mode decisions (seed: on). Off: the session stays in
    /// `initial_mode` until [`Amst::force_mode`](crate::Amst::force_mode).
    pub auto_mode: bool,
    /// The mode a client connects in, before the detector's first decision.
    pub initial_mode: Mode,
    /// Streams of the datacenter TCP profile (seed: 64).
    pub datacenter_streams: usize,
    /// Streams of the internet TCP profile (seed: 8).
    pub internet_streams: usize,
    /// Lowest stream count any profile may use (seed: 4).
    pub min_streams: usize,
    /// Highest stream count any profile may use (seed: 512).
    pub max_streams: usize,
    /// Congestion control on internet paths (seed: BBR); datacenter paths use CUBIC.
    pub congestion: Congestion,
    /// Pacing on internet paths (seed: on).
    pub pacing: bool,
    /// Let the internet TCP profile's streams compete as separate flows (off): no shared
    /// in-flight cap from the aggregate BBR model, so beside other flows the session takes
    /// more than one flow's share. Opt-in only (`amst send --aggressive`).
    pub aggressive: bool,
    /// Initial chunk size of TCP lanes, 16 KiB to 512 KiB (seed: 256 KiB; their tuner moves
    /// it within that range). QUIC and RDMA lanes do not chunk.
    pub chunk_size: usize,
    /// The detector's period (seed: 5 s).
    pub check_period: Duration,
    /// The detector's switch confidence (seed: 0.7).
    pub switch_threshold: f64,
    /// In hybrid mode, messages below this go on the low-latency lane (seed: 1 MiB).
    pub small_message_threshold: usize,
    /// The transport of the datacenter profile (seed: TCP).
    pub datacenter_transport: DatacenterTransport,
    /// The transport of the internet profile (TCP; QUIC when that crate is in).
    pub internet_transport: TransportKind,
    /// Keep the transports of a previous mode open for a quick switch back, instead of
    /// draining and closing them.
    pub keep_warm: bool,
    /// Most bytes of sent messages not yet acknowledged; `send` waits beyond it.
    pub send_window: u64,
    /// Largest message.
    pub max_message: u64,
    /// Bytes received ahead of a gap before the peer is declared broken (each message
    /// counts [`REORDER_MESSAGE_COST`](crate::merger::REORDER_MESSAGE_COST) bytes more, so
    /// empty messages count too).
    pub max_reorder_bytes: u64,
    /// Messages received ahead of a gap before the peer is declared broken.
    pub max_reorder_messages: u64,
    /// The byte budget every received byte is held against, shared by every session given
    /// the same budget: the transports' credit comes from it, and messages held for
    /// reordering stay charged to it. [`MemoryBudget::process`] (128 MiB) unless set.
    pub memory_budget: MemoryBudget,
    /// Bytes of in-order messages waiting for `recv` before the readers stop pulling.
    pub recv_buffer: u64,
    /// How long a new transport may take to be attached by the server.
    pub attach_timeout: Duration,
    /// How long an old transport may take to drain before it is dropped; also how long
    /// `close` waits for the next acknowledgement before it gives up on what is left.
    pub drain_timeout: Duration,
    /// Hybrid protocol versions offered or accepted; for compatibility tests.
    #[doc(hidden)]
    pub hybrid_versions: (u16, u16),
}

impl AmstConfig {
    /// The seed's defaults with this key.
    pub fn new(psk: Psk) -> Self {
        AmstConfig {
            psk,
            enable_datacenter: true,
            enable_internet: true,
            auto_mode: true,
            initial_mode: Mode::Internet,
            datacenter_streams: 64,
            internet_streams: 8,
            min_streams: 4,
            max_streams: 512,
            congestion: Congestion::Bbr,
            pacing: true,
            aggressive: false,
            chunk_size: 256 << 10,
            check_period: Duration::from_secs(5),
            switch_threshold: 0.7,
            small_message_threshold: 1 << 20,
            datacenter_transport: DatacenterTransport::Tcp,
            internet_transport: TransportKind::Tcp,
            keep_warm: false,
            send_window: 64 << 20,
            max_message: 1 << 30,
            max_reorder_bytes: 128 << 20,
            max_reorder_messages: 1 << 16,
            memory_budget: MemoryBudget::process(),
            recv_buffer: 64 << 20,
            attach_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            hybrid_versions: (
                crate::wire::HYBRID_VERSION_MIN,
                crate::wire::HYBRID_VERSION_MAX,
            ),
        }
    }

    /// A builder starting from the seed's defaults.
    pub fn builder(psk: Psk) -> AmstConfigBuilder {
        AmstConfigBuilder(AmstConfig::new(psk))
    }

    /// Checks every field; the error names the field and what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| {
            Err(Error::Core(amst_core::Error::Config { field, reason }))
        };
        if !self.enable_datacenter && !self.enable_internet {
            return bad(
                "enable_datacenter",
                "and enable_internet are both off; enable at least one".into(),
            );
        }
        if self.min_streams == 0 || self.min_streams > self.max_streams {
            return bad(
                "min_streams",
                format!(
                    "is {}; it must be at least 1 and at most max_streams ({})",
                    self.min_streams, self.max_streams
                ),
            );
        }
        for (field, n) in [
            ("datacenter_streams", self.datacenter_streams),
            ("internet_streams", self.internet_streams),
        ] {
            if n < self.min_streams || n > self.max_streams {
                return bad(
                    field,
                    format!(
                        "is {n}; it must lie in min_streams..=max_streams ({}..={})",
                        self.min_streams, self.max_streams
                    ),
                );
            }
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) {
            // Refused rather than clamped: a chunk the lane would quietly cut to 512 KiB is
            // not the setting its user measured.
            return bad(
                "chunk_size",
                format!(
                    "is {}; TCP lanes cut messages into chunks of {MIN_CHUNK}..={MAX_CHUNK} bytes",
                    self.chunk_size
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.switch_threshold) {
            return bad(
                "switch_threshold",
                format!("is {}; it must lie in 0..=1", self.switch_threshold),
            );
        }
        if self.send_window == 0 || self.recv_buffer == 0 {
            return bad("send_window", "and recv_buffer must be positive".into());
        }
        if self.max_reorder_messages == 0 {
            return bad("max_reorder_messages", "is 0; at least 1".into());
        }
        if self.max_reorder_bytes < self.send_window {
            return bad(
                "max_reorder_bytes",
                format!(
                    "is {}; it must be at least send_window ({})",
                    self.max_reorder_bytes, self.send_window
                ),
            );
        }
        Ok(())
    }

    /// The profile a mode's lane uses, or `None` when that mode's transport is disabled.
    pub fn profile(&self, preset: Mode) -> Option<LaneProfile> {
        let clamp = |n: usize| n.clamp(self.min_streams, self.max_streams);
        match preset {
            Mode::Datacenter if self.enable_datacenter => Some(LaneProfile {
                transport: self.datacenter_transport.kind(),
                preset: Mode::Datacenter,
                streams: clamp(self.datacenter_streams),
                min_streams: self.min_streams,
                max_streams: self.max_streams,
                congestion: Congestion::Cubic,
                pacing: false,
                aggressive: false,
                chunk_size: self.chunk_size,
            }),
            Mode::Internet if self.enable_internet => Some(LaneProfile {
                transport: self.internet_transport,
                preset: Mode::Internet,
                streams: clamp(self.internet_streams),
                min_streams: self.min_streams,
                max_streams: self.max_streams.min(16).max(self.min_streams),
                congestion: self.congestion,
                pacing: self.pacing,
                aggressive: self.aggressive,
                chunk_size: self.chunk_size,
            }),
            _ => None,
        }
    }

    /// The lanes a mode runs on: one, or in hybrid mode the low-latency lane then the bulk
    /// lane. A disabled transport falls back to the other one with a logged reason.
    pub fn lanes_for(&self, mode: Mode) -> Result<Vec<LaneProfile>> {
        let dc = self.profile(Mode::Datacenter);
        let inet = self.profile(Mode::Internet);
        let pick = |want: Option<LaneProfile>, other: Option<LaneProfile>, what: &str| {
            want.or_else(|| {
                tracing::warn!(
                    "{mode} mode wants the {what} transport, which is disabled; using the other one"
                );
                other
            })
        };
        let lanes = match mode {
            Mode::Datacenter => vec![pick(dc, inet, "datacenter")],
            Mode::Internet => vec![pick(inet, dc, "internet")],
            Mode::Hybrid => match (dc, inet) {
                (Some(d), Some(i)) => vec![Some(d), Some(i)],
                (d, i) => {
                    tracing::warn!(
                        "hybrid mode needs both transports and one is disabled; using one lane"
                    );
                    vec![d.or(i)]
                }
            },
        };
        lanes
            .into_iter()
            .map(|l| {
                l.ok_or_else(|| {
                    Error::Core(amst_core::Error::Config {
                        field: "enable_datacenter",
                        reason: "and enable_internet are both off".into(),
                    })
                })
            })
            .collect()
    }
}

/// Builds an [`AmstConfig`]; every setter overrides one field of the seed's defaults.
#[derive(Clone, Debug)]
pub struct AmstConfigBuilder(AmstConfig);

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        impl AmstConfigBuilder {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: $ty) -> Self {
                    self.0.$name = value;
                    self
                }
            )*
        }
    };
}

setters! {
    /// See [`AmstConfig::enable_datacenter`].
    enable_datacenter: bool,
    /// See [`AmstConfig::enable_internet`].
    enable_internet: bool,
    /// See [`AmstConfig::auto_mode`].
    auto_mode: bool,
    /// See [`AmstConfig::initial_mode`].
    initial_mode: Mode,
    /// See [`AmstConfig::datacenter_streams`].
    datacenter_streams: usize,
    /// See [`AmstConfig::internet_streams`].
    internet_streams: usize,
    /// See [`AmstConfig::min_streams`].
    min_streams: usize,
    /// See [`AmstConfig::max_streams`].
    max_streams: usize,
    /// See [`AmstConfig::congestion`].
    congestion: Congestion,
    /// See [`AmstConfig::pacing`].
    pacing: bool,
    /// See [`AmstConfig::aggressive`].
    aggressive: bool,
    /// See [`AmstConfig::chunk_size`].
    chunk_size: usize,
    /// See [`AmstConfig::check_period`].
    check_period: Duration,
    /// See [`AmstConfig::switch_threshold`].
    switch_threshold: f64,
    /// See [`AmstConfig::small_message_threshold`].
    small_message_threshold: usize,
    /// See [`AmstConfig::internet_transport`].
    internet_transport: TransportKind,
    /// See [`AmstConfig::keep_warm`].
    keep_warm: bool,
    /// See [`AmstConfig::send_window`].
    send_window: u64,
    /// See [`AmstConfig::max_message`].
    max_message: u64,
    /// See [`AmstConfig::max_reorder_bytes`].
    max_reorder_bytes: u64,
    /// See [`AmstConfig::max_reorder_messages`].
    max_reorder_messages: u64,
    /// See [`AmstConfig::memory_budget`].
    memory_budget: MemoryBudget,
    /// See [`AmstConfig::recv_buffer`].
    recv_buffer: u64,
    /// See [`AmstConfig::attach_timeout`].
    attach_timeout: Duration,
    /// See [`AmstConfig::drain_timeout`].
    drain_timeout: Duration,
}

impl AmstConfigBuilder {
    /// See [`AmstConfig::datacenter_transport`]; a bare [`TransportKind`] converts.
    pub fn datacenter_transport(mut self, value: impl Into<DatacenterTransport>) -> Self {
        self.0.datacenter_transport = value.into();
        self
    }

    /// The configuration, validated.
    pub fn build(self) -> Result<AmstConfig> {
        self.0.validate()?;
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psk() -> Psk {
        Psk::new(b"0123456789abcdef").unwrap()
    }

    #[test]
    fn defaults_are_the_seeds() {
        let c = AmstConfig::new(psk());
        assert!(c.enable_datacenter && c.enable_internet && c.auto_mode && c.pacing);
        assert_eq!((c.datacenter_streams, c.internet_streams), (64, 8));
        assert_eq!((c.min_streams, c.max_streams), (4, 512));
        assert_eq!(c.congestion, Congestion::Bbr);
        assert_eq!(c.chunk_size, 256 << 10);
        assert_eq!(c.check_period, Duration::from_secs(5));
        assert_eq!(c.switch_threshold, 0.7);
        assert_eq!(c.small_message_threshold, 1 << 20);
        c.validate().unwrap();
        let hybrid = c.lanes_for(Mode::Hybrid).unwrap();
        assert_eq!(hybrid.len(), 2);
        assert_eq!(hybrid[0].preset, Mode::Datacenter);
        assert_eq!(hybrid[1].congestion, Congestion::Bbr);
    }

    #[test]
    fn builder_validates_and_names_the_field() {
        let err = AmstConfig::builder(psk())
            .internet_streams(2)
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("internet_streams") && err.contains("4..=512"),
            "{err}"
        );
        let err = AmstConfig::builder(psk())
            .enable_datacenter(false)
            .enable_internet(false)
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("enable_datacenter"), "{err}");
        for chunk in [0, (16 << 10) - 1, (512 << 10) + 1, 2 << 20] {
            let err = AmstConfig::builder(psk())
                .chunk_size(chunk)
                .build()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("chunk_size") && err.contains("16384..=524288"),
                "{err}"
            );
        }
        let c = AmstConfig::builder(psk())
            .enable_datacenter(false)
            .build()
            .unwrap();
        let lanes = c.lanes_for(Mode::Datacenter).unwrap();
        assert_eq!(lanes[0].preset, Mode::Internet, "falls back to internet");
        assert_eq!(c.lanes_for(Mode::Hybrid).unwrap().len(), 1);
    }
}
