//! A deterministic discrete-event simulator of one bottleneck shared by N flows, each driven
//! by its own [`CongestionController`].
//!
//! The model, packet by packet (every packet is one `mss`):
//! - **Senders** transmit new data (or retransmissions first) whenever `bytes_in_flight +
//!   mss <= cwnd` and the pacer allows: the pacer spaces packets at the controller's
//!   [`pacing_rate`](CongestionController::pacing_rate) and lets at most
//!   [`send_quantum`](CongestionController::send_quantum) bytes out back to back.
//! - **The bottleneck** is a FIFO served at `rate_bps` with a droptail buffer of
//!   `buffer_bytes` (the bytes waiting, not counting the packet being serialised). A packet
//!   entering it is dropped at random with probability `loss`, from a ChaCha8 RNG seeded
//!   with [`Scenario::seed`].
//! - **Propagation** is `rtt / 2` each way; acks are never lost or queued. Optional path
//!   features, each off by default: a token-bucket **policer** in front of the bottleneck
//!   ([`Link::with_policer`]), **ack aggregation** that releases acks in batches
//!   ([`Link::with_ack_aggregation`]), and **reordering** that holds some packets back
//!   ([`Link::with_reordering`]).
//! - **Receivers** ack every packet at once.
//! - **Loss detection** follows RFC 9002 §6.1 (packet threshold 3, time threshold
//!   9/8 × max(srtt, latest_rtt)) and a PTO (§6.2) that sends up to two probes when nothing
//!   is acked. Losses of packets later acked call `on_spurious_loss` once the whole loss
//!   episode has proved spurious; a loss after an undone episode opens a new one.
//! - **Samples**: each ack produces an RTT sample (`on_rtt_sample`, no ack delay) and a
//!   delivery-rate sample from [`crate::delivery_rate`], passed in [`Ack::rate_sample`].
//!
//! The simulator never reads a clock: [`Scenario::run`] takes an origin `Instant` and every
//! time handed to a controller is `origin + simulated time`. The same scenario and seed give
//! the same [`Report`], bit for bit.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use amst_cc::cubic::{Cubic, CubicConfig};
//! use amst_cc::sim::{Flow, Link, Scenario};
//!
//! let link = Link::new(20e6, Duration::from_millis(40)).with_buffer_bdp(1.0);
//! let report = Scenario::new(link)
//!     .seed(7)
//!     .duration(Duration::from_secs(5))
//!     .flow(Flow::new("cubic", Box::new(Cubic::new(CubicConfig::with_mss(1500)))))
//!     .run(Instant::now());
//! let f = &report.flows[0];
//! assert!(f.goodput_bps > 0.5 * 20e6, "goodput {}", f.goodput_bps);
//! ```

mod engine;
#[cfg(feature = "sim-plot")]
mod plot;
mod report;

use std::time::{Duration, Instant};

use crate::CongestionController;

pub use report::{FlowReport, FlowSample, LinkReport, PhaseChange, Report, Sample};

/// The bottleneck link.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    /// Serialisation rate in bits per second.
    pub rate_bps: f64,
    /// Propagation round-trip time (no queueing).
    pub rtt: Duration,
    /// Droptail buffer in bytes.
    pub buffer_bytes: u64,
    /// Probability that a packet is dropped at random on entering the bottleneck.
    pub loss: f64,
    /// A token-bucket policer in front of the bottleneck, if any.
    pub policer: Option<Policer>,
    /// If set, acks reach the sender only at multiples of this interval (from time zero), in
    /// batches, as on a link that aggregates acks (Wi-Fi, cellular).
    pub ack_aggregation: Option<Duration>,
    /// If set, packets leaving the bottleneck are held back at random, arriving out of order.
    pub reordering: Option<Reordering>,
}

/// A token-bucket policer: packets that find fewer than their size in tokens are dropped
/// (no buffering of its own).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policer {
    /// Token rate in bits per second.
    pub rate_bps: f64,
    /// Bucket depth in bytes (it starts full).
    pub burst_bytes: u64,
}

/// Random reordering after the bottleneck.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reordering {
    /// Probability that a packet is held back.
    pub probability: f64,
    /// How much later than its turn a held-back packet arrives.
    pub extra_delay: Duration,
}

impl Link {
    /// A link with the given rate and RTT, a one-BDP buffer and no random loss.
    pub fn new(rate_bps: f64, rtt: Duration) -> Self {
        let mut link = Self {
            rate_bps,
            rtt,
            buffer_bytes: 0,
            loss: 0.0,
            policer: None,
            ack_aggregation: None,
            reordering: None,
        };
        link.buffer_bytes = link.bdp_bytes();
        link
    }

    /// The bandwidth-delay product in bytes.
    pub fn bdp_bytes(&self) -> u64 {
        (self.rate_bps / 8.0 * self.rtt.as_secs_f64()) as u64
    }

    /// The same link with a buffer of `bdps` bandwidth-delay products.
    pub fn with_buffer_bdp(mut self, bdps: f64) -> Self {
        self.buffer_bytes = (self.bdp_bytes() as f64 * bdps) as u64;
        self
    }

    /// The same link with a buffer of `bytes`.
    pub fn with_buffer_bytes(mut self, bytes: u64) -> Self {
        self.buffer_bytes = bytes;
        self
    }

    /// The same link with random loss probability `p`.
    pub fn with_loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// The same link behind a token-bucket policer of `rate_bps` with a `burst_bytes` bucket.
    pub fn with_policer(mut self, rate_bps: f64, burst_bytes: u64) -> Self {
        self.policer = Some(Policer {
            rate_bps,
            burst_bytes,
        });
        self
    }

    /// The same link with acks released in batches every `interval`.
    pub fn with_ack_aggregation(mut self, interval: Duration) -> Self {
        self.ack_aggregation = Some(interval);
        self
    }

    /// The same link, holding each packet back by `extra_delay` with probability
    /// `probability` (drawn from the scenario's RNG).
    pub fn with_reordering(mut self, probability: f64, extra_delay: Duration) -> Self {
        self.reordering = Some(Reordering {
            probability,
            extra_delay,
        });
        self
    }
}

/// A change to the link at some simulated time; `None` fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkChange {
    /// New rate in bits per second.
    pub rate_bps: Option<f64>,
    /// New propagation RTT (applies to packets that start propagating afterwards; packets
    /// are never reordered).
    pub rtt: Option<Duration>,
    /// New buffer size in bytes (packets already queued stay).
    pub buffer_bytes: Option<u64>,
    /// New random loss probability.
    pub loss: Option<f64>,
}

/// One flow: a bulk (or finite) sender with its own controller.
#[derive(Debug)]
pub struct Flow {
    /// A label for reports and traces.
    pub name: String,
    /// The controller driving this flow.
    pub controller: Box<dyn CongestionController>,
    /// When the flow starts, from the beginning of the run.
    pub start: Duration,
    /// Bytes to transfer; `None` for a sender that always has data.
    pub bytes: Option<u64>,
}

impl Flow {
    /// A bulk flow that starts at time zero.
    pub fn new(name: impl Into<String>, controller: Box<dyn CongestionController>) -> Self {
        Self {
            name: name.into(),
            controller,
            start: Duration::ZERO,
            bytes: None,
        }
    }

    /// The same flow starting at `start`.
    pub fn starting_at(mut self, start: Duration) -> Self {
        self.start = start;
        self
    }

    /// The same flow with a finite amount of data.
    pub fn with_bytes(mut self, bytes: u64) -> Self {
        self.bytes = Some(bytes);
        self
    }
}

/// A complete simulation: a link, flows, link changes and run parameters.
#[derive(Debug)]
pub struct Scenario {
    /// The bottleneck at time zero.
    pub link: Link,
    /// Flows, in order; reports keep this order.
    pub flows: Vec<Flow>,
    /// Changes to the link at given times.
    pub link_changes: Vec<(Duration, LinkChange)>,
    /// RNG seed for random loss.
    pub seed: u64,
    /// Simulated time to run.
    pub duration: Duration,
    /// Packet size in bytes; every controller is told it with `on_mtu_update`.
    pub mss: u64,
    /// Spacing of [`Report::samples`].
    pub sample_interval: Duration,
}

impl Scenario {
    /// A scenario on `link` with no flows, seed 0, 10 s, 1500-byte packets and 100 ms samples.
    pub fn new(link: Link) -> Self {
        Self {
            link,
            flows: Vec::new(),
            link_changes: Vec::new(),
            seed: 0,
            duration: Duration::from_secs(10),
            mss: 1500,
            sample_interval: Duration::from_millis(100),
        }
    }

    /// Adds a flow.
    pub fn flow(mut self, flow: Flow) -> Self {
        self.flows.push(flow);
        self
    }

    /// Changes the link at `at`.
    pub fn change_link_at(mut self, at: Duration, change: LinkChange) -> Self {
        self.link_changes.push((at, change));
        self
    }

    /// Sets the RNG seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the simulated duration.
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// Sets the packet size.
    pub fn mss(mut self, mss: u64) -> Self {
        self.mss = mss;
        self
    }

    /// Sets the sampling interval of the time series.
    pub fn sample_interval(mut self, interval: Duration) -> Self {
        self.sample_interval = interval;
        self
    }

    /// Runs the scenario. `origin` is the `Instant` that simulated time zero maps to; only
    /// differences from it matter, so any value (such as `Instant::now()`) gives the same
    /// report.
    pub fn run(self, origin: Instant) -> Report {
        engine::Engine::new(self, origin).run()
    }
}
