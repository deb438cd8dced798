//! An adapter from amst-cc's controllers to quinn's `congestion::Controller` (feature
//! `quinn`), so that any quinn application can use amst-cc's CUBIC or BBR with one line of
//! `TransportConfig`:
//!
//! ```
//! use std::sync::Arc;
//! let mut config = quinn_proto::TransportConfig::default();
//! config.congestion_controller_factory(Arc::new(amst_cc::quinn::BbrFactory::default()));
//! // or: config.congestion_controller_factory(Arc::new(amst_cc::quinn::CubicFactory::default()));
//! ```
//!
//! `BbrFactory::default()` is the draft's BBR; AMST's random-loss tolerance is an opt-in:
//!
//! ```
//! use std::sync::Arc;
//! use amst_cc::BbrConfig;
//! use amst_cc::quinn::BbrFactory;
//! assert!(BbrFactory::default().config_for_mtu(1200).is_draft());
//! let tolerant = BbrFactory::with_config(BbrConfig::draft().with_random_loss_tolerance(true));
//! assert!(!tolerant.config_for_mtu(1200).is_draft());
//! let mut config = quinn_proto::TransportConfig::default();
//! config.congestion_controller_factory(Arc::new(tolerant));
//! ```
//!
//! # What the adapter adds
//!
//! quinn reports sends (`on_sent`), acks one packet at a time (`on_ack`, identified only by
//! its send time) followed by `on_end_acks`, and congestion events with the total lost bytes
//! and the newest lost packet's send time. The adapter keeps a per-packet record of what
//! [`crate::delivery_rate::DeliveryRateEstimator`] needs, matches acks to records by send time,
//! turns each batch of acks into one [`Ack`] with a [`crate::RateSample`], takes the RTT sample
//! from the newest acknowledged packet, and attributes lost bytes to the oldest outstanding
//! records sent no later than the newest lost packet (which is how RFC 9002's thresholds
//! choose them).
//!
//! # How BBR maps onto quinn's pacer
//!
//! quinn paces from the window, not from the controller: its token bucket refills at
//! `1.25 × window / smoothed_rtt`. The window is also quinn's only cap on bytes in flight.
//! The adapter therefore reports BBR's `cwnd` as the window, because that cap is what keeps
//! BBR's queue bounded (ProbeRTT's 0.5 × BDP, the `inflight_hi`/`inflight_lo` bounds), and
//! quinn then paces at `1.25 × cwnd / srtt`. With BBR's usual cwnd of about 2 × BDP that is
//! faster than BBR's own pacing rate, so the in-flight cap, not the pacer, is what limits
//! the rate — the same trade quinn's own BBR makes.
//!
//! One exception: when quinn reports the connection application-limited, BBR's cwnd can sit
//! below what its pacing rate would keep in flight over one RTT (for example after a quiet
//! period), and quinn's pacer would then release a burst of new data more slowly than BBR
//! asks. There the adapter reports `max(cwnd, pacing_rate × srtt)`, so that quinn's pacer runs
//! at least at BBR's rate; it never does so in ProbeRTT, whose whole point is a small
//! in-flight cap.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::RttEstimator;
use quinn_proto::congestion::{Controller, ControllerFactory, ControllerMetrics};

use crate::bbr::{Bbr, BbrConfig};
use crate::cubic::{Cubic, CubicConfig};
use crate::delivery_rate::{DeliveryRateEstimator, PacketSendState};
use crate::{Ack, CongestionController, Loss, Phase};

/// How the adapter turns the controller's state into quinn's single window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowMapping {
    /// The window is the controller's cwnd (CUBIC).
    Cwnd,
    /// cwnd, or `max(cwnd, pacing_rate × srtt)` while application-limited outside ProbeRTT
    /// (BBR; see the module docs).
    RateWhenAppLimited,
}

#[derive(Clone, Copy, Debug)]
struct Record {
    pss: PacketSendState,
    /// Bytes of this send not yet acked or declared lost.
    remaining: u64,
}

/// An amst-cc controller behind quinn's `Controller` trait.
#[derive(Clone, Debug)]
pub struct QuinnController<C> {
    cc: C,
    mapping: WindowMapping,
    initial_window: u64,
    est: DeliveryRateEstimator,
    records: VecDeque<Record>,
    bytes_in_flight: u64,
    batch_acked: u64,
    batch_newest_sent: Option<Instant>,
    app_limited: bool,
    srtt: Option<Duration>,
    min_rtt: Option<Duration>,
}

impl<C: CongestionController + Clone + Sync + 'static> QuinnController<C> {
    /// Wraps `cc`.
    pub fn new(cc: C, mapping: WindowMapping) -> Self {
        let initial_window = cc.cwnd();
        Self {
            cc,
            mapping,
            initial_window,
            est: DeliveryRateEstimator::new(),
            records: VecDeque::new(),
            bytes_in_flight: 0,
            batch_acked: 0,
            batch_newest_sent: None,
            app_limited: false,
            srtt: None,
            min_rtt: None,
        }
    }

    /// The wrapped controller.
    pub fn inner(&self) -> &C {
        &self.cc
    }

    fn prune(&mut self) {
        while self.records.front().is_some_and(|r| r.remaining == 0) {
            self.records.pop_front();
        }
        // Records that neither an ack nor a loss claimed (quinn's view and ours can differ on
        // packets that are not ack-eliciting) are dropped once far older than the newest ack.
        if let (Some(newest), Some(srtt)) = (self.batch_newest_sent, self.srtt) {
            let horizon = srtt * 4 + Duration::from_millis(100);
            while self
                .records
                .front()
                .is_some_and(|r| r.pss.send_time + horizon < newest)
            {
                self.records.pop_front();
            }
        }
    }
}

impl<C: CongestionController + Clone + Sync + 'static> Controller for QuinnController<C> {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.bytes_in_flight += bytes;
        let pss = self
            .est
            .on_packet_sent(now, last_packet_number, bytes, self.bytes_in_flight);
        self.cc.on_packet_sent(now, bytes, self.bytes_in_flight);
        self.records.push_back(Record {
            pss,
            remaining: bytes,
        });
        if self.app_limited && self.bytes_in_flight >= self.cc.cwnd() {
            self.app_limited = false;
        }
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.srtt = Some(rtt.get());
        self.min_rtt = Some(rtt.min());
        self.batch_acked += bytes;
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(bytes);
        if self.batch_newest_sent.is_none_or(|t| sent > t) {
            self.batch_newest_sent = Some(sent);
        }
        let start = self.records.partition_point(|r| r.pss.send_time < sent);
        let hit = self
            .records
            .iter_mut()
            .skip(start)
            .take_while(|r| r.pss.send_time == sent)
            .find(|r| r.remaining > 0);
        if let Some(r) = hit {
            let part = bytes.min(r.remaining);
            r.remaining -= part;
            let mut pss = r.pss;
            pss.size = part;
            self.est.on_packet_acked(now, &pss);
        }
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.bytes_in_flight = in_flight;
        if app_limited {
            self.app_limited = true;
            self.est.on_app_limited(in_flight);
            self.cc.on_app_limited(now, in_flight);
        }
        if let Some(sent) = self.batch_newest_sent {
            self.cc
                .on_rtt_sample(now, now.saturating_duration_since(sent), Duration::ZERO);
        }
        let rate_sample = self.est.generate_rate_sample(self.min_rtt);
        if self.batch_acked > 0 {
            self.cc.on_ack(
                now,
                &Ack {
                    bytes_acked: self.batch_acked,
                    bytes_in_flight: in_flight,
                    rate_sample,
                },
            );
        }
        self.prune();
        self.batch_acked = 0;
        self.batch_newest_sent = None;
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if lost_bytes == 0 {
            // quinn signals ECN-CE increases with zero lost bytes.
            self.cc.on_ecn(now, 1, self.bytes_in_flight);
            return;
        }
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(lost_bytes);
        let mut left = lost_bytes;
        for r in self.records.iter_mut() {
            if left == 0 || r.pss.send_time > sent {
                break;
            }
            if r.remaining == 0 {
                continue;
            }
            let part = left.min(r.remaining);
            r.remaining -= part;
            left -= part;
            let mut pss = r.pss;
            pss.size = part;
            self.est.on_packet_lost(&pss);
        }
        self.cc.on_loss(
            now,
            &Loss {
                bytes_lost: lost_bytes,
                bytes_in_flight: self.bytes_in_flight,
                largest_lost_sent_at: sent,
                persistent_congestion: is_persistent_congestion,
            },
        );
        self.prune();
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.cc.on_mtu_update(u64::from(new_mtu));
    }

    fn window(&self) -> u64 {
        let cwnd = self.cc.cwnd();
        match self.mapping {
            WindowMapping::Cwnd => cwnd,
            WindowMapping::RateWhenAppLimited => {
                if !self.app_limited || self.cc.metrics().phase == Phase::ProbeRtt {
                    return cwnd;
                }
                let Some(srtt) = self.srtt else {
                    return cwnd;
                };
                let rate_window = (self.cc.pacing_rate() * srtt.as_secs_f64()) as u64;
                cwnd.max(rate_window)
            }
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let m = self.cc.metrics();
        let mut out = ControllerMetrics::default();
        out.congestion_window = self.window();
        out.ssthresh = (m.ssthresh != u64::MAX).then_some(m.ssthresh);
        out.pacing_rate = Some((m.pacing_rate * 8.0) as u64);
        out
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds amst-cc [`Cubic`] controllers for quinn connections.
#[derive(Clone, Debug, Default)]
pub struct CubicFactory {
    /// The configuration; its datagram size is replaced by quinn's current MTU.
    pub config: CubicConfig,
}

impl ControllerFactory for CubicFactory {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let mut config = self.config.clone();
        config.base.max_datagram_size = u64::from(current_mtu);
        Box::new(QuinnController::new(
            Cubic::new(config),
            WindowMapping::Cwnd,
        ))
    }
}

/// Builds amst-cc [`Bbr`] controllers for quinn connections.
///
/// `BbrFactory::default()` builds the draft's BBR ([`BbrConfig::draft`]): extensions such as
/// [`BbrConfig::random_loss_tolerance`] are off unless a configuration turns them on, as in
/// `BbrFactory::with_config(BbrConfig::draft().with_random_loss_tolerance(true))`.
#[derive(Clone, Debug, Default)]
pub struct BbrFactory {
    /// The configuration; its datagram size follows quinn's current MTU. `None` is
    /// [`BbrConfig::with_datagram_size`] of that MTU (the draft's BBR, RFC 9002's initial
    /// window).
    pub config: Option<BbrConfig>,
}

impl BbrFactory {
    /// A factory for the draft's BBR, with no extension.
    pub fn draft() -> Self {
        Self {
            config: Some(BbrConfig::draft()),
        }
    }

    /// A factory for `config` (its datagram size follows quinn's MTU).
    pub fn with_config(config: BbrConfig) -> Self {
        Self {
            config: Some(config),
        }
    }

    /// The configuration a controller built for `mtu` gets.
    pub fn config_for_mtu(&self, mtu: u16) -> BbrConfig {
        let mtu = u64::from(mtu);
        match self.config {
            Some(c) => BbrConfig {
                max_datagram_size: mtu,
                ..c
            },
            None => BbrConfig::with_datagram_size(mtu),
        }
    }
}

impl ControllerFactory for BbrFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let config = self.config_for_mtu(current_mtu);
        Box::new(QuinnController::new(
            Bbr::new(config, now),
            WindowMapping::RateWhenAppLimited,
        ))
    }
}
