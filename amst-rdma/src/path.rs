//! What an RDMA session can know about its path, sans-IO: the round-trip time from
//! acknowledgement timing. The driver feeds it (`now` is an argument) and `metrics` reads it;
//! the peer's byte credit comes from amst-core's send buffer.
//!
//! RC queue pairs retransmit and run congestion control inside the NIC (RoCE v2's DCQCN is
//! rate-based and has no window), and verbs report neither per queue pair. So an RDMA
//! session reports no congestion window, pacing rate, retransmitted bytes or lost packets;
//! it reports what the software sees: how long acknowledgements take and how much the peer's
//! credit lets it send.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use amst_core::{TransportKind, TransportMetrics};
//! use amst_rdma::path::PathEstimate;
//!
//! let t0 = Instant::now();
//! let mut path = PathEstimate::default();
//! path.on_message_posted(t0);
//! path.on_acked(1, t0 + Duration::from_micros(40));
//! let mut m = TransportMetrics::new(TransportKind::Rdma);
//! path.report(&mut m);
//! assert_eq!(m.rtt, Some(Duration::from_micros(40)));
//! assert_eq!(m.cwnd, None, "the NIC's congestion control is not visible");
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use amst_core::TransportMetrics;

/// Ack-timed RTT of one session.
#[derive(Clone, Debug, Default)]
pub struct PathEstimate {
    /// When each message not yet acknowledged had its last segment posted, oldest first.
    /// As long as the session's unacknowledged messages, which its send window bounds.
    posted: VecDeque<Instant>,
    /// Messages acknowledged so far: the number of the message at the front of `posted`.
    acked: u64,
    srtt: Option<Duration>,
    min_rtt: Option<Duration>,
}

impl PathEstimate {
    /// The last segment of the next message was posted at `now`.
    pub fn on_message_posted(&mut self, now: Instant) {
        self.posted.push_back(now);
    }

    /// The peer's cumulative acknowledgement reached `acked` messages at `now`. The sample is
    /// the newest message it covers, from its last segment's post to now: the network round
    /// trip plus the peer's completion handling (it acknowledges on delivery) and any wait in
    /// the local send queue. Counters that do not advance give no sample.
    pub fn on_acked(&mut self, acked: u64, now: Instant) {
        if acked <= self.acked {
            return;
        }
        let covered = (acked - self.acked).min(self.posted.len() as u64);
        self.acked = acked;
        let newest = (0..covered).filter_map(|_| self.posted.pop_front()).last();
        if let Some(at) = newest {
            self.sample(now.saturating_duration_since(at));
        }
    }

    /// RFC 6298's smoothing (gain 1/8), so the value reads like TCP's and QUIC's.
    fn sample(&mut self, rtt: Duration) {
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => (s * 7 + rtt) / 8,
        });
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    /// Smoothed ack-timed RTT, once a message was acknowledged.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Fills what the path estimate knows into `m`: RTT and minimum RTT. The rest stays as
    /// it was (`None` in a new [`TransportMetrics`]).
    pub fn report(&self, m: &mut TransportMetrics) {
        m.rtt = self.srtt;
        m.min_rtt = self.min_rtt;
    }
}

#[cfg(test)]
mod tests {
    use amst_core::TransportKind;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn report(p: &PathEstimate) -> TransportMetrics {
        let mut m = TransportMetrics::new(TransportKind::Rdma);
        p.report(&mut m);
        m
    }

    #[test]
    fn rtt_is_timed_from_the_newest_acknowledged_message_and_smoothed() {
        let t0 = Instant::now();
        let mut p = PathEstimate::default();
        assert_eq!(report(&p).rtt, None, "no acknowledgement, no RTT");
        for i in 0..3 {
            p.on_message_posted(t0 + ms(i));
        }
        // One acknowledgement covering messages 1 and 2: timed from message 2 (posted at 1 ms).
        p.on_acked(2, t0 + ms(9));
        let m = report(&p);
        assert_eq!(m.rtt, Some(ms(8)));
        assert_eq!(m.min_rtt, Some(ms(8)));
        // The same counter again is no sample.
        p.on_acked(2, t0 + ms(100));
        assert_eq!(report(&p).rtt, Some(ms(8)));
        // Message 3, posted at 2 ms, acknowledged at 18 ms: 16 ms, smoothed 7/8 · 8 + 1/8 · 16.
        p.on_acked(3, t0 + ms(18));
        let m = report(&p);
        assert_eq!(m.rtt, Some(ms(9)));
        assert_eq!(m.min_rtt, Some(ms(8)));
        assert!(p.posted.is_empty(), "acknowledged messages are forgotten");
    }

    #[test]
    fn an_acknowledgement_beyond_what_was_posted_is_clamped() {
        let t0 = Instant::now();
        let mut p = PathEstimate::default();
        p.on_message_posted(t0);
        p.on_acked(5, t0 + ms(3));
        assert_eq!(report(&p).rtt, Some(ms(3)));
        // Messages posted after that are timed against the new counter.
        p.on_message_posted(t0 + ms(10));
        p.on_acked(6, t0 + ms(12));
        assert_eq!(report(&p).min_rtt, Some(ms(2)));
    }
}
