//! The link model without IO: given a packet's arrival time and size, decide whether it is
//! lost, dropped by the full queue, or when it comes out of the far end. The forwarder
//! feeds it real packets; unit tests feed it numbers.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::params::LinkParams;

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Random (i.i.d. or burst) loss.
    Lost,
    /// The droptail queue was full.
    QueueFull,
    /// Deliver at this time (nanoseconds on the model's clock).
    Deliver(u64),
}

/// One direction of the link. Time is nanoseconds since an arbitrary origin.
#[derive(Debug)]
pub(crate) struct LinkModel {
    params: LinkParams,
    rng: ChaCha8Rng,
    ge_bad: bool,
    /// When the serialiser finishes the last accepted packet. The link is work-conserving,
    /// so the queue's backlog in bytes is `(link_free - now) * rate`.
    link_free: u64,
    /// Serialisation finish times of queued packets, oldest first, for the packet limit.
    departures: VecDeque<u64>,
    /// Due time of the last accepted packet, so that jitter never reorders unless asked.
    last_due: u64,
}

impl LinkModel {
    pub(crate) fn new(params: LinkParams, seed: u64) -> Self {
        LinkModel {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            ge_bad: false,
            link_free: 0,
            departures: VecDeque::new(),
            last_due: 0,
        }
    }

    pub(crate) fn params(&self) -> &LinkParams {
        &self.params
    }

    /// New parameters apply to packets arriving from now on; packets already accepted keep
    /// their due times, so a shorter delay takes effect behind the packets still in flight.
    pub(crate) fn set_params(&mut self, params: LinkParams) {
        self.params = params;
    }

    fn lost(&mut self) -> bool {
        if let Some(ge) = self.params.gilbert_elliott {
            let flip = if self.ge_bad {
                ge.p_bad_to_good
            } else {
                ge.p_good_to_bad
            };
            if self.rng.random::<f64>() < flip {
                self.ge_bad = !self.ge_bad;
            }
            let p = if self.ge_bad {
                ge.loss_in_bad
            } else {
                ge.loss_in_good
            };
            if p > 0.0 && self.rng.random::<f64>() < p {
                return true;
            }
        }
        self.params.loss > 0.0 && self.rng.random::<f64>() < self.params.loss
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`.
    pub(crate) fn on_packet(&mut self, now: u64, len: usize) -> Verdict {
        if self.lost() {
            return Verdict::Lost;
        }
        let p = &self.params;
        let departure = if p.rate_bps == 0 {
            self.departures.clear();
            self.link_free = now;
            now
        } else {
            while self.departures.front().is_some_and(|&d| d <= now) {
                self.departures.pop_front();
            }
            let start = self.link_free.max(now);
            let backlog_bytes = ((start - now) as u128 * p.rate_bps as u128 / 8_000_000_000) as u64;
            let over_bytes = p
                .queue
                .bytes
                .is_some_and(|b| backlog_bytes + len as u64 > b);
            let over_pkts = p
                .queue
                .packets
                .is_some_and(|n| self.departures.len() >= n as usize);
            if over_bytes || over_pkts {
                return Verdict::QueueFull;
            }
            let tx_ns = (len as u128 * 8_000_000_000).div_ceil(p.rate_bps as u128) as u64;
            self.link_free = start + tx_ns;
            self.departures.push_back(self.link_free);
            self.link_free
        };
        let mut due = departure + p.delay.as_nanos() as u64;
        if !p.jitter.is_zero() {
            let j = p.jitter.as_nanos() as i64;
            let offset = self.rng.random_range(-j..=j);
            due = due.saturating_add_signed(offset).max(departure);
        }
        if !p.reorder {
            due = due.max(self.last_due);
        }
        self.last_due = self.last_due.max(due);
        Verdict::Deliver(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{GilbertElliott, QueueLimit};
    use std::time::Duration;

    fn params(rate: u64, delay_ms: u64) -> LinkParams {
        LinkParams {
            rate_bps: rate,
            delay: Duration::from_millis(delay_ms),
            ..LinkParams::default()
        }
    }

    #[test]
    fn rate_serialises_back_to_back_packets() {
        // 8 Mbit/s: a 1000-byte packet takes exactly 1 ms.
        let mut m = LinkModel::new(params(8_000_000, 10), 1);
        assert_eq!(m.on_packet(0, 1000), Verdict::Deliver(11_000_000));
        assert_eq!(m.on_packet(0, 1000), Verdict::Deliver(12_000_000));
        // An idle link does not bank credit.
        assert_eq!(m.on_packet(50_000_000, 1000), Verdict::Deliver(61_000_000));
    }

    #[test]
    fn droptail_by_bytes_and_packets() {
        let mut p = params(8_000_000, 0);
        p.queue = QueueLimit::bytes(3000);
        let mut m = LinkModel::new(p, 1);
        let verdicts: Vec<_> = (0..5).map(|_| m.on_packet(0, 1000)).collect();
        // Backlog before each: 0, 1000, 2000 accepted; 3000 + 1000 > 3000 dropped.
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| **v == Verdict::QueueFull)
                .count(),
            2
        );
        // After 2 ms, two packets have left; room for two more.
        assert!(matches!(m.on_packet(2_000_000, 1000), Verdict::Deliver(_)));
        assert!(matches!(m.on_packet(2_000_000, 1000), Verdict::Deliver(_)));
        assert_eq!(m.on_packet(2_000_000, 1000), Verdict::QueueFull);

        let mut p = params(8_000_000, 0);
        p.queue = QueueLimit::packets(2);
        let mut m = LinkModel::new(p, 1);
        let accepted = (0..10)
            .filter(|_| matches!(m.on_packet(0, 100), Verdict::Deliver(_)))
            .count();
        assert_eq!(accepted, 2);
    }

    #[test]
    fn iid_loss_matches_probability() {
        let mut p = params(0, 0);
        p.loss = 0.01;
        let mut m = LinkModel::new(p, 7);
        let lost = (0..200_000)
            .filter(|_| m.on_packet(0, 100) == Verdict::Lost)
            .count();
        let rate = lost as f64 / 200_000.0;
        assert!((rate - 0.01).abs() < 0.001, "loss rate {rate}");
    }

    #[test]
    fn gilbert_elliott_loss_is_bursty() {
        let mut p = params(0, 0);
        p.gilbert_elliott = Some(GilbertElliott {
            p_good_to_bad: 0.01,
            p_bad_to_good: 0.2,
            loss_in_good: 0.0,
            loss_in_bad: 1.0,
        });
        let mut m = LinkModel::new(p, 3);
        let outcomes: Vec<bool> = (0..100_000)
            .map(|_| m.on_packet(0, 100) == Verdict::Lost)
            .collect();
        let lost = outcomes.iter().filter(|l| **l).count() as f64;
        // Stationary bad-state share: p / (p + r) = 0.01 / 0.21.
        let expected = 100_000.0 * 0.01 / 0.21;
        assert!(
            (lost - expected).abs() < expected * 0.15,
            "lost {lost}, expected {expected}"
        );
        // Mean burst length 1 / r = 5, far above i.i.d.'s ~1.05.
        let bursts = outcomes.windows(2).filter(|w| !w[0] && w[1]).count() as f64;
        assert!(lost / bursts > 3.0, "mean burst {}", lost / bursts);
    }

    #[test]
    fn jitter_stays_in_bounds_and_never_reorders_by_default() {
        let mut p = params(0, 20);
        p.jitter = Duration::from_millis(5);
        let mut m = LinkModel::new(p.clone(), 9);
        let mut last = 0;
        for i in 0..10_000u64 {
            let now = i * 100_000;
            let Verdict::Deliver(due) = m.on_packet(now, 100) else {
                panic!("no loss set")
            };
            assert!(due >= last, "reordered");
            assert!(due >= now + 15_000_000 && due <= now + 25_000_000);
            last = due;
        }
        p.reorder = true;
        let mut m = LinkModel::new(p, 9);
        let dues: Vec<u64> = (0..10_000u64)
            .map(|i| match m.on_packet(i * 100_000, 100) {
                Verdict::Deliver(d) => d,
                v => panic!("{v:?}"),
            })
            .collect();
        assert!(
            dues.windows(2).any(|w| w[1] < w[0]),
            "reorder allowed but none happened"
        );
    }

    #[test]
    fn shorter_delay_waits_behind_packets_in_flight() {
        let mut m = LinkModel::new(params(0, 50), 1);
        assert_eq!(m.on_packet(0, 100), Verdict::Deliver(50_000_000));
        m.set_params(params(0, 10));
        assert_eq!(m.on_packet(1_000_000, 100), Verdict::Deliver(50_000_000));
        assert_eq!(m.on_packet(60_000_000, 100), Verdict::Deliver(70_000_000));
    }
}
