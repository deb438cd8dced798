//! The interface every controller implements, shaped by what a transport needs to tell it
//! and what it needs back.

use std::fmt;
use std::time::{Duration, Instant};

/// A delivery-rate sample, per draft-cheng-iccrg-delivery-rate-estimation: `delivered` bytes
/// were acknowledged over `interval`, and `is_app_limited` says whether the sender had
/// nothing to send for part of that interval (such samples may under-estimate the path).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateSample {
    /// Bytes newly delivered over the sample's interval (`rs.delivered`).
    pub delivered: u64,
    /// The longer of the send and ack intervals (`rs.interval`).
    pub interval: Duration,
    /// The packet that produced the sample was sent while application-limited.
    pub is_app_limited: bool,
    /// Total bytes delivered on the connection when the acked packet was sent
    /// (`rs.prior_delivered`); used to count round trips.
    pub prior_delivered: u64,
    /// Bytes lost over the sample's interval (`rs.lost`), for loss-rate checks.
    pub lost: u64,
    /// Bytes in flight when the acked packet was sent (`rs.tx_in_flight`).
    pub tx_in_flight: u64,
}

impl RateSample {
    /// Delivery rate in bytes per second, or `None` for an empty interval.
    pub fn delivery_rate(&self) -> Option<f64> {
        let secs = self.interval.as_secs_f64();
        (secs > 0.0).then(|| self.delivered as f64 / secs)
    }
}

/// One acknowledgement event, as a transport sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ack {
    /// Bytes newly acknowledged by this event.
    pub bytes_acked: u64,
    /// Bytes still in flight after this acknowledgement.
    pub bytes_in_flight: u64,
    /// The delivery-rate sample this ack produced, if the transport tracks one.
    pub rate_sample: Option<RateSample>,
}

/// One loss event: bytes newly declared lost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loss {
    /// Bytes newly declared lost.
    pub bytes_lost: u64,
    /// Bytes still in flight after removing the lost ones.
    pub bytes_in_flight: u64,
    /// When the most recent lost packet was sent; losses of packets sent before the current
    /// recovery epoch began do not start a new one.
    pub largest_lost_sent_at: Instant,
    /// A persistent-congestion signal (RFC 9002 §7.6): all packets over a long period lost.
    pub persistent_congestion: bool,
}

/// What a controller is doing, for logs, metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Exponential growth until the path's rate or a loss is found.
    SlowStart,
    /// Recovering from a loss: the window has been reduced once for this epoch.
    Recovery,
    /// CUBIC's window growth after slow start.
    CongestionAvoidance,
    /// BBR Startup.
    Startup,
    /// BBR Drain.
    Drain,
    /// BBR ProbeBW_DOWN.
    ProbeBwDown,
    /// BBR ProbeBW_CRUISE.
    ProbeBwCruise,
    /// BBR ProbeBW_REFILL.
    ProbeBwRefill,
    /// BBR ProbeBW_UP.
    ProbeBwUp,
    /// BBR ProbeRTT.
    ProbeRtt,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A snapshot of a controller's model of the path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ControllerMetrics {
    /// The current phase.
    pub phase: Phase,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Pacing rate in bytes per second.
    pub pacing_rate: f64,
    /// Estimated bottleneck bandwidth in bytes per second (BBR's `BBR.max_bw`); CUBIC reports
    /// cwnd / srtt.
    pub bottleneck_bw: f64,
    /// Minimum RTT seen in the filter window, if any.
    pub min_rtt: Option<Duration>,
    /// Smoothed RTT, if any.
    pub srtt: Option<Duration>,
    /// Slow-start threshold in bytes, or `u64::MAX` before the first exit.
    pub ssthresh: u64,
}

/// A congestion controller: a pure state machine. Every input carries `now`, and nothing in
/// here reads a clock, sleeps or touches a socket.
///
/// Byte counts are in payload bytes of whatever unit the transport paces (TCP segments, QUIC
/// packets, AMST chunks); `max_datagram_size` tells the controller how big one unit is.
pub trait CongestionController: Send + fmt::Debug {
    /// A packet of `bytes` was sent at `now`; `bytes_in_flight` includes it.
    fn on_packet_sent(&mut self, now: Instant, bytes: u64, bytes_in_flight: u64);
    /// Bytes were acknowledged.
    fn on_ack(&mut self, now: Instant, ack: &Ack);
    /// Bytes were declared lost.
    fn on_loss(&mut self, now: Instant, loss: &Loss);
    /// A new RTT sample; `ack_delay` is the peer's reported delay, already bounded.
    fn on_rtt_sample(&mut self, now: Instant, rtt: Duration, ack_delay: Duration);
    /// ECN-CE marks were newly reported for `bytes_marked` bytes.
    fn on_ecn(&mut self, now: Instant, bytes_marked: u64, bytes_in_flight: u64);
    /// The path's maximum datagram size changed.
    fn on_mtu_update(&mut self, max_datagram_size: u64);
    /// The last loss episode turned out to be spurious: restore the state saved before it.
    fn on_spurious_loss(&mut self, now: Instant);
    /// The sender has nothing more to send right now (used to mark samples app-limited).
    fn on_app_limited(&mut self, _now: Instant, _bytes_in_flight: u64) {}
    /// One packet was declared lost, with what the delivery-rate estimator kept for it
    /// ([`crate::delivery_rate::DeliveryRateEstimator::on_packet_lost`]). Transports that keep
    /// that state call this for each lost packet, before the [`on_loss`](Self::on_loss) that
    /// reports the whole event; BBR uses it for the draft's exact `HandleLostPacket(P)`.
    fn on_packet_lost(&mut self, _now: Instant, _lost: &crate::delivery_rate::LostPacketSample) {}

    /// The congestion window in bytes; always at least one datagram.
    fn cwnd(&self) -> u64;
    /// The pacing rate in bytes per second; always finite and positive.
    fn pacing_rate(&self) -> f64;
    /// How many bytes the sender may emit back to back per pacing slot.
    fn send_quantum(&self) -> u64;
    /// A snapshot of the controller's state.
    fn metrics(&self) -> ControllerMetrics;
    /// A boxed copy, for factories that hand a controller to each new connection.
    fn clone_box(&self) -> Box<dyn CongestionController>;
}
