//! Which kind of path AMST believes it is on, and which transport carries the data.

use std::fmt;
use std::str::FromStr;

/// The kind of path, as the detector classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Short, fast path: RDMA or many parallel TCP streams, CUBIC, large chunks.
    Datacenter,
    /// Long or slow path: a few paced TCP streams under BBR, or QUIC.
    Internet,
    /// Between the two: small messages on the low-latency path, bulk on the other.
    Hybrid,
}

/// The congestion control a transport is asked to run. Each transport maps it to its own
/// (the kernel's `TCP_CONGESTION` for amst-tcp, amst-cc's controllers for amst-quic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Congestion {
    /// BBR: model-based, tolerant of random loss (internet paths).
    Bbr,
    /// CUBIC: loss-based, the Linux default (datacenter paths).
    Cubic,
}

impl Congestion {
    /// The lower-case name, which is also the kernel's.
    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Mode {
    /// All modes, in a fixed order.
    pub const ALL: [Mode; 3] = [Mode::Datacenter, Mode::Internet, Mode::Hybrid];

    /// The lower-case name used in configuration, logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Datacenter => "datacenter",
            Mode::Internet => "internet",
            Mode::Hybrid => "hybrid",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| crate::Error::Config {
                field: "mode",
                reason: format!("is {s:?}; expected datacenter, internet or hybrid"),
            })
    }
}

/// Which transport implementation carries a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransportKind {
    /// amst-tcp: multi-stream kernel TCP.
    Tcp,
    /// amst-quic: QUIC on quinn.
    Quic,
    /// amst-rdma: RC queue pairs.
    Rdma,
    /// amst-core's in-memory channel pair, for tests.
    InMemory,
}

impl TransportKind {
    /// The lower-case name used in configuration, logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Quic => "quic",
            TransportKind::Rdma => "rdma",
            TransportKind::InMemory => "in-memory",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportKind {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            TransportKind::Tcp,
            TransportKind::Quic,
            TransportKind::Rdma,
            TransportKind::InMemory,
        ]
        .into_iter()
        .find(|k| k.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| crate::Error::Config {
            field: "transport",
            reason: format!("is {s:?}; expected tcp, quic or rdma"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_roundtrip_and_reject_unknown() {
        for m in Mode::ALL {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        assert_eq!("Internet".parse::<Mode>().unwrap(), Mode::Internet);
        let err = "lan".parse::<Mode>().unwrap_err().to_string();
        assert!(err.contains("mode") && err.contains("lan"), "{err}");
        assert_eq!(
            "quic".parse::<TransportKind>().unwrap(),
            TransportKind::Quic
        );
        assert!("carrier-pigeon".parse::<TransportKind>().is_err());
    }
}
