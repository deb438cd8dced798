//! What the classifier is fed: one observation of the path.

use std::time::Duration;

/// A bandwidth sample in bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bandwidth {
    /// Bytes per second.
    pub bytes_per_sec: u64,
    /// True when the number only bounds the path from below, e.g. bytes moved per second
    /// by an application that may not have been saturating the link. A lower bound at or
    /// above the fast-bandwidth threshold proves a fast path; below it, it proves nothing
    /// and the observation is treated as having no bandwidth (RTT-only).
    pub lower_bound: bool,
}

impl Bandwidth {
    /// A measured rate (a delivery-rate estimate or a probe's burst).
    pub fn measured(bytes_per_sec: u64) -> Self {
        Bandwidth {
            bytes_per_sec,
            lower_bound: false,
        }
    }

    /// A rate that the path is known to reach, not known to be its limit.
    pub fn at_least(bytes_per_sec: u64) -> Self {
        Bandwidth {
            bytes_per_sec,
            lower_bound: true,
        }
    }
}

/// Where an observation came from; carried into the [`Decision`](crate::Decision) so that
/// a log line says how the path was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SampleSource {
    /// The transport's own estimates while data flowed (TCP_INFO, ack clocking).
    Passive,
    /// An active probe on an idle link.
    Probe,
    /// Fed in by the caller (tests, simulations, another measurement system).
    #[default]
    External,
}

impl SampleSource {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SampleSource::Passive => "passive",
            SampleSource::Probe => "probe",
            SampleSource::External => "external",
        }
    }
}

/// One look at the path: an RTT and, if known, a bandwidth, taken at about the same time.
/// Either may be missing; an observation with neither is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Observation {
    /// Round-trip time.
    pub rtt: Option<Duration>,
    /// Bandwidth.
    pub bandwidth: Option<Bandwidth>,
    /// Where it came from.
    pub source: SampleSource,
}

impl Observation {
    /// An RTT and a measured bandwidth in bytes per second.
    pub fn new(rtt: Duration, bytes_per_sec: u64) -> Self {
        Observation {
            rtt: Some(rtt),
            bandwidth: Some(Bandwidth::measured(bytes_per_sec)),
            source: SampleSource::External,
        }
    }

    /// An RTT alone.
    pub fn rtt_only(rtt: Duration) -> Self {
        Observation {
            rtt: Some(rtt),
            bandwidth: None,
            source: SampleSource::External,
        }
    }

    /// The same observation, marked as coming from `source`.
    pub fn from_source(mut self, source: SampleSource) -> Self {
        self.source = source;
        self
    }

    /// True if it carries nothing to classify.
    pub fn is_empty(&self) -> bool {
        self.rtt.is_none() && self.bandwidth.is_none()
    }
}
