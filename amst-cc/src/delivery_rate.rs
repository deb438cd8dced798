//! A delivery-rate estimator per draft-cheng-iccrg-delivery-rate-estimation (as carried into
//! draft-ietf-ccwg-bbr §"Delivery Rate Samples"), sans-IO: the transport keeps one
//! [`PacketSendState`] per packet in flight, and feeds sends, acks and losses in; on each ack
//! the estimator hands back a [`RateSample`] for the congestion controller.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use amst_cc::delivery_rate::DeliveryRateEstimator;
//!
//! let t0 = Instant::now();
//! let mut est = DeliveryRateEstimator::new();
//! // Send two 1000-byte packets back to back.
//! let p1 = est.on_packet_sent(t0, 1, 1000, 1000);
//! let p2 = est.on_packet_sent(t0, 2, 1000, 2000);
//! // One ack, 100 ms later, covers both.
//! let t1 = t0 + Duration::from_millis(100);
//! est.on_packet_acked(t1, &p1);
//! est.on_packet_acked(t1, &p2);
//! let rs = est.generate_rate_sample(Some(Duration::from_millis(100))).unwrap();
//! assert_eq!(rs.delivered, 2000);
//! assert_eq!(rs.interval, Duration::from_millis(100));
//! assert_eq!(rs.delivery_rate(), Some(20_000.0));
//! ```
//!
//! The caller's duties, which the draft leaves to the transport:
//! - call [`DeliveryRateEstimator::on_packet_acked`] at most once per packet (the draft's
//!   `P.delivered_time = 0` marker is the caller dropping its `PacketSendState`);
//! - call [`DeliveryRateEstimator::generate_rate_sample`] once per ack, after all packets
//!   that ack covers;
//! - call [`DeliveryRateEstimator::on_app_limited`] when the draft's
//!   `CheckIfApplicationLimited()` holds (no unsent data, nothing queued below the transport,
//!   in flight below cwnd, no unrepaired losses).

use std::time::{Duration, Instant};

use crate::RateSample;

/// What the estimator snapshots about a packet when it is sent (the draft's per-packet `P`
/// state). The transport stores it beside the packet until it is acked or declared lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketSendState {
    /// `P.packet_id`: a monotonically increasing identifier (QUIC packet number, TCP end
    /// sequence, or any counter).
    pub packet_id: u64,
    /// `P.data_length` in bytes.
    pub size: u64,
    /// `P.send_time`.
    pub send_time: Instant,
    /// `P.delivered`: `C.delivered` when the packet was sent.
    pub delivered: u64,
    /// `P.delivered_time`: `C.delivered_time` when the packet was sent.
    pub delivered_time: Instant,
    /// `P.first_send_time`: `C.first_send_time` when the packet was sent.
    pub first_send_time: Instant,
    /// `P.is_app_limited`: whether `C.app_limited` was non-zero when the packet was sent.
    pub is_app_limited: bool,
    /// `P.tx_in_flight`: bytes in flight just after sending this packet (it included).
    pub tx_in_flight: u64,
    /// `P.lost`: `C.lost` when the packet was sent.
    pub lost: u64,
}

/// What a controller needs to know about one lost packet (draft-ietf-ccwg-bbr
/// `BBRHandleLostPacket`: `RS.tx_in_flight = P.tx_in_flight`, `RS.lost = C.lost - P.lost`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostPacketSample {
    /// Size of the lost packet in bytes.
    pub size: u64,
    /// Bytes in flight when the lost packet was sent (it included).
    pub tx_in_flight: u64,
    /// Bytes declared lost since the packet was sent, this packet included.
    pub lost: u64,
    /// The lost packet was sent while application-limited.
    pub is_app_limited: bool,
}

/// The newest acked packet's snapshot, gathered over one ack (the draft's `RS` fields before
/// `GenerateRateSample()`).
#[derive(Clone, Copy, Debug)]
struct PendingSample {
    prior_delivered: u64,
    is_app_limited: bool,
    send_elapsed: Duration,
    ack_elapsed: Duration,
    last_packet_id: u64,
    last_send_time: Instant,
    tx_in_flight: u64,
    prior_lost: u64,
}

/// The per-connection (`C`) state of the delivery-rate estimator.
#[derive(Clone, Debug, Default)]
pub struct DeliveryRateEstimator {
    /// `C.delivered`: total bytes delivered.
    delivered: u64,
    /// `C.lost`: total bytes declared lost.
    lost: u64,
    /// `C.delivered_time`.
    delivered_time: Option<Instant>,
    /// `C.first_send_time`.
    first_send_time: Option<Instant>,
    /// `C.app_limited`: the `delivered` mark at which the app-limited bubble is gone, or 0.
    app_limited: u64,
    /// The sample being built for the current ack.
    pending: Option<PendingSample>,
}

impl DeliveryRateEstimator {
    /// A fresh estimator for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// `C.delivered`: total bytes delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// `C.lost`: total bytes declared lost so far.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Whether the connection is currently marked application-limited (`C.app_limited != 0`).
    pub fn is_app_limited(&self) -> bool {
        self.app_limited != 0
    }

    /// A packet of `size` bytes was sent at `now`; `bytes_in_flight` includes it. Store the
    /// returned state with the packet.
    pub fn on_packet_sent(
        &mut self,
        now: Instant,
        packet_id: u64,
        size: u64,
        bytes_in_flight: u64,
    ) -> PacketSendState {
        // "if (C.inflight == 0) C.first_send_time = C.delivered_time = P.send_time"
        // (the draft's C.inflight here is the value before this packet).
        let idle = bytes_in_flight.saturating_sub(size) == 0;
        if idle || self.first_send_time.is_none() || self.delivered_time.is_none() {
            self.first_send_time = Some(now);
            self.delivered_time = Some(now);
        }
        PacketSendState {
            packet_id,
            size,
            send_time: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time.unwrap_or(now),
            first_send_time: self.first_send_time.unwrap_or(now),
            is_app_limited: self.app_limited != 0,
            tx_in_flight: bytes_in_flight.max(size),
            lost: self.lost,
        }
    }

    /// The packet `p` was acknowledged at `now` (the draft's `UpdateRateSample(P)`). Call once
    /// per newly acknowledged packet, then [`Self::generate_rate_sample`] once per ack.
    pub fn on_packet_acked(&mut self, now: Instant, p: &PacketSendState) {
        self.delivered = self.delivered.saturating_add(p.size);
        self.delivered_time = Some(now);
        // "Update info using the newest packet": newest by send time, then by id.
        let newest = match (&self.pending, self.first_send_time) {
            (None, _) => true,
            (Some(rs), first_send) => {
                let first = first_send.unwrap_or(p.send_time);
                p.send_time > first || (p.send_time == first && p.packet_id > rs.last_packet_id)
            }
        };
        if newest {
            self.pending = Some(PendingSample {
                prior_delivered: p.delivered,
                is_app_limited: p.is_app_limited,
                send_elapsed: p.send_time.saturating_duration_since(p.first_send_time),
                ack_elapsed: now.saturating_duration_since(p.delivered_time),
                last_packet_id: p.packet_id,
                last_send_time: p.send_time,
                tx_in_flight: p.tx_in_flight,
                prior_lost: p.lost,
            });
            self.first_send_time = Some(p.send_time);
        }
    }

    /// The packet `p` was declared lost. Returns what a controller needs to judge whether
    /// in-flight data was too high when it was sent.
    pub fn on_packet_lost(&mut self, p: &PacketSendState) -> LostPacketSample {
        self.lost = self.lost.saturating_add(p.size);
        LostPacketSample {
            size: p.size,
            tx_in_flight: p.tx_in_flight,
            lost: self.lost - p.lost.min(self.lost),
            is_app_limited: p.is_app_limited,
        }
    }

    /// The sender ran out of data (the draft's `MarkConnectionAppLimited()`):
    /// `C.app_limited = max(C.delivered + C.inflight, 1)`. Samples from packets sent until
    /// that much has been delivered are marked application-limited.
    pub fn on_app_limited(&mut self, bytes_in_flight: u64) {
        self.app_limited = self.delivered.saturating_add(bytes_in_flight).max(1);
    }

    /// Finish the sample for the current ack (the draft's `GenerateRateSample()`), given the
    /// connection's minimum RTT so far.
    ///
    /// Returns `None` if the ack delivered nothing new. Otherwise a sample; when its interval
    /// is shorter than `min_rtt` (an unreliable rate, for example from ack compression) the
    /// sample's `interval` is zero so that [`RateSample::delivery_rate`] is `None`, while
    /// `prior_delivered`, `lost` and `tx_in_flight` stay valid for round counting and loss
    /// checks.
    pub fn generate_rate_sample(&mut self, min_rtt: Option<Duration>) -> Option<RateSample> {
        // "Clear app-limited field if bubble is ACKed and gone."
        if self.app_limited != 0 && self.delivered > self.app_limited {
            self.app_limited = 0;
        }
        let rs = self.pending.take()?;
        // "Use the longer of the send_elapsed and ack_elapsed"
        let mut interval = rs.send_elapsed.max(rs.ack_elapsed);
        // "if (RS.interval < C.min_rtt) return /* no reliable rate sample */"
        if min_rtt.is_some_and(|m| interval < m) {
            interval = Duration::ZERO;
        }
        Some(RateSample {
            delivered: self.delivered - rs.prior_delivered.min(self.delivered),
            interval,
            is_app_limited: rs.is_app_limited,
            prior_delivered: rs.prior_delivered,
            lost: self.lost - rs.prior_lost.min(self.lost),
            tx_in_flight: rs.tx_in_flight,
        })
    }

    /// Send time of the newest packet acked so far in the current ack, if any.
    pub fn pending_newest_send_time(&self) -> Option<Instant> {
        self.pending.map(|p| p.last_send_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ack_with_nothing_new_yields_no_sample() {
        let mut est = DeliveryRateEstimator::new();
        assert_eq!(est.generate_rate_sample(None), None);
    }

    /// A steady stream paced at 1 packet per ms over a 50 ms RTT measures 1 packet per ms.
    #[test]
    fn paced_stream_measures_its_rate() {
        let t0 = Instant::now();
        let mut est = DeliveryRateEstimator::new();
        let mut in_flight = std::collections::VecDeque::new();
        let mut bif = 0;
        let mut last = None;
        for i in 0..500u64 {
            let now = t0 + MS * i as u32;
            // Acks for packets sent 50 ms ago arrive first.
            while let Some(p) = in_flight.front().copied() {
                let p: PacketSendState = p;
                if p.send_time + 50 * MS > now {
                    break;
                }
                in_flight.pop_front();
                bif -= p.size;
                est.on_packet_acked(now, &p);
                last = est.generate_rate_sample(Some(50 * MS));
            }
            bif += 1000;
            in_flight.push_back(est.on_packet_sent(now, i, 1000, bif));
        }
        let rs = last.unwrap();
        let rate = rs.delivery_rate().unwrap();
        assert!((rate - 1_000_000.0).abs() < 30_000.0, "rate {rate}");
        assert!(!rs.is_app_limited);
        assert_eq!(rs.lost, 0);
        // In flight at send time: 50 ms × 1 packet/ms plus this one.
        assert!(
            (50_000..=51_000).contains(&rs.tx_in_flight),
            "{}",
            rs.tx_in_flight
        );
    }

    /// When acks are compressed the ack interval is short, but the send interval keeps the
    /// rate from being over-estimated.
    #[test]
    fn compressed_acks_use_the_longer_send_interval() {
        let t0 = Instant::now();
        let mut est = DeliveryRateEstimator::new();
        let p0 = est.on_packet_sent(t0, 0, 1000, 1000);
        let p1 = est.on_packet_sent(t0, 1, 1000, 2000);
        est.on_packet_acked(t0 + 20 * MS, &p0);
        est.generate_rate_sample(None).unwrap();
        // p1 is still in flight, so these samples start at p0's send and ack.
        let mut pkts = vec![p1];
        for i in 0..9u64 {
            let t = t0 + MS * (20 + 10 * i as u32);
            pkts.push(est.on_packet_sent(t, 2 + i, 1000, 1000 * (i + 2)));
        }
        // All of them acked together, 1 ms after the last one was sent.
        for p in &pkts {
            est.on_packet_acked(t0 + 101 * MS, p);
        }
        let rs = est.generate_rate_sample(None).unwrap();
        // send_elapsed = 100 ms (newest sent at 100 ms, first at 0) > ack_elapsed = 81 ms.
        assert_eq!(rs.interval, 100 * MS);
        assert_eq!(rs.delivered, 10_000);
        assert_eq!(rs.prior_delivered, 1000);
        assert_eq!(rs.delivery_rate(), Some(100_000.0));
    }

    #[test]
    fn short_interval_is_marked_unreliable_but_keeps_other_fields() {
        let t0 = Instant::now();
        let mut est = DeliveryRateEstimator::new();
        let p = est.on_packet_sent(t0, 1, 1000, 1000);
        est.on_packet_acked(t0 + 5 * MS, &p);
        let rs = est.generate_rate_sample(Some(10 * MS)).unwrap();
        assert_eq!(rs.interval, Duration::ZERO);
        assert_eq!(rs.delivery_rate(), None);
        assert_eq!(rs.delivered, 1000);
        assert_eq!(rs.prior_delivered, 0);
    }

    #[test]
    fn app_limited_marks_samples_until_bubble_is_delivered() {
        let t0 = Instant::now();
        let mut est = DeliveryRateEstimator::new();
        let p1 = est.on_packet_sent(t0, 1, 1000, 1000);
        est.on_app_limited(1000);
        assert!(est.is_app_limited());
        // Sent while app-limited.
        let p2 = est.on_packet_sent(t0 + MS, 2, 1000, 2000);
        assert!(p2.is_app_limited);
        est.on_packet_acked(t0 + 20 * MS, &p1);
        let rs1 = est.generate_rate_sample(None).unwrap();
        assert!(!rs1.is_app_limited);
        // delivered (1000) is not > app_limited mark (2000): still app-limited.
        assert!(est.is_app_limited());
        est.on_packet_acked(t0 + 21 * MS, &p2);
        let rs2 = est.generate_rate_sample(None).unwrap();
        assert!(rs2.is_app_limited);
        // 2000 delivered is not > 2000 either; one more packet clears it.
        let p3 = est.on_packet_sent(t0 + 22 * MS, 3, 1000, 1000);
        est.on_packet_acked(t0 + 42 * MS, &p3);
        est.generate_rate_sample(None).unwrap();
        assert!(!est.is_app_limited());
    }

    #[test]
    fn losses_are_attributed_to_samples_of_packets_sent_before_them() {
        let t0 = Instant::now();
        let mut est = DeliveryRateEstimator::new();
        let p1 = est.on_packet_sent(t0, 1, 1000, 1000);
        let p2 = est.on_packet_sent(t0, 2, 1000, 2000);
        let p3 = est.on_packet_sent(t0, 3, 1000, 3000);
        let lost = est.on_packet_lost(&p1);
        assert_eq!(
            lost,
            LostPacketSample {
                size: 1000,
                tx_in_flight: 1000,
                lost: 1000,
                is_app_limited: false
            }
        );
        let lost2 = est.on_packet_lost(&p2);
        assert_eq!(lost2.lost, 2000, "both losses happened after p2 was sent");
        assert_eq!(lost2.tx_in_flight, 2000);
        est.on_packet_acked(t0 + 30 * MS, &p3);
        let rs = est.generate_rate_sample(None).unwrap();
        assert_eq!(rs.lost, 2000);
        assert_eq!(rs.tx_in_flight, 3000);
        assert_eq!(est.lost(), 2000);
        // A packet sent after the losses carries no loss in its sample.
        let p4 = est.on_packet_sent(t0 + 31 * MS, 4, 1000, 1000);
        est.on_packet_acked(t0 + 61 * MS, &p4);
        assert_eq!(est.generate_rate_sample(None).unwrap().lost, 0);
    }

    #[test]
    fn idle_restart_resets_the_interval_start() {
        let t0 = Instant::now();
        let mut est = DeliveryRateEstimator::new();
        let p1 = est.on_packet_sent(t0, 1, 1000, 1000);
        est.on_packet_acked(t0 + 10 * MS, &p1);
        est.generate_rate_sample(None);
        // Idle for 1 s, then send again: the interval must not include the idle time.
        let t1 = t0 + Duration::from_secs(1);
        let p2 = est.on_packet_sent(t1, 2, 1000, 1000);
        est.on_packet_acked(t1 + 10 * MS, &p2);
        let rs = est.generate_rate_sample(None).unwrap();
        assert_eq!(rs.interval, 10 * MS);
        assert_eq!(rs.delivery_rate(), Some(100_000.0));
    }

    #[test]
    fn older_packet_acked_later_does_not_replace_newest() {
        let t0 = Instant::now();
        let mut est = DeliveryRateEstimator::new();
        let p1 = est.on_packet_sent(t0, 1, 1000, 1000);
        let p2 = est.on_packet_sent(t0 + MS, 2, 1000, 2000);
        // One ack reports p2 first, then p1 (reordered ranges).
        est.on_packet_acked(t0 + 20 * MS, &p2);
        est.on_packet_acked(t0 + 20 * MS, &p1);
        assert_eq!(est.pending_newest_send_time(), Some(t0 + MS));
        let rs = est.generate_rate_sample(None).unwrap();
        assert_eq!(rs.tx_in_flight, 2000);
    }
}
