//! amst-cc's controllers (BBR, CUBIC, NewReno) fed arbitrary event sequences: sends, acks with
//! and without delivery-rate samples, losses (whole events and single packets), RTT samples,
//! ECN marks, MTU changes, spurious-loss undo, app-limited marks and the passage of time.
//! Whatever the order and whatever the numbers, no controller may panic, and after every
//! event the window stays positive and the pacing rate finite and positive.
#![no_main]

use std::time::{Duration, Instant};

use amst_cc::cubic::{LossBasedConfig, NewReno};
use amst_cc::delivery_rate::LostPacketSample;
use amst_cc::{Ack, Bbr, BbrConfig, CongestionController, Cubic, CubicConfig, Loss, RateSample};
use libfuzzer_sys::fuzz_target;

/// Reads fuzz input as a little language; running out of bytes yields zeroes. `hostile`
/// allows any `u64` byte count; otherwise counts stay below 2^40, as a real transport's do.
struct Input<'a>(&'a [u8], bool);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A byte count: a selector byte picks the scale, so that small realistic values, huge
    /// ones and the edges are all reachable.
    fn bytes(&mut self) -> u64 {
        let v = self.any_bytes();
        if self.1 { v } else { v % (1 << 40) }
    }

    fn any_bytes(&mut self) -> u64 {
        match self.byte() % 6 {
            0 => 0,
            1 => u64::from(self.byte()) * 100,
            2 => u64::from(u16::from_le_bytes([self.byte(), self.byte()])) * 10,
            3 => u64::from(u32::from_le_bytes([
                self.byte(),
                self.byte(),
                self.byte(),
                self.byte(),
            ])),
            4 => u64::from_le_bytes(std::array::from_fn(|_| self.byte())),
            _ => u64::MAX - u64::from(self.byte()),
        }
    }

    /// A duration up to about 16 s, with microsecond resolution.
    fn micros(&mut self) -> Duration {
        let v = u32::from_le_bytes([self.byte(), self.byte(), self.byte(), 0]);
        Duration::from_micros(u64::from(v))
    }
}

/// Checks what every transport relies on; returns the reason for a failure.
fn check(cc: &dyn CongestionController) {
    let cwnd = cc.cwnd();
    assert!(cwnd > 0, "cwnd is 0: {cc:?}");
    let p = cc.pacing_rate();
    assert!(p.is_finite() && p > 0.0, "pacing rate {p}: {cc:?}");
    assert!(cc.send_quantum() > 0, "send quantum 0: {cc:?}");
    let m = cc.metrics();
    assert_eq!(m.cwnd, cwnd, "metrics disagree with cwnd()");
    assert!(
        m.pacing_rate.is_finite() && m.pacing_rate > 0.0,
        "metrics pacing rate {}",
        m.pacing_rate
    );
    assert!(
        m.bottleneck_bw.is_finite() && m.bottleneck_bw >= 0.0,
        "bottleneck bw {}",
        m.bottleneck_bw
    );
}

/// Most events per input, so that one input cannot run for long.
const MAX_EVENTS: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data, true);
    let t0 = Instant::now();
    let mss = match input.byte() % 4 {
        0 => 1200,
        1 => 1448,
        2 => 9000,
        _ => u64::from(input.byte()) + 1,
    };
    let mut cc: Box<dyn CongestionController> = match input.byte() % 4 {
        0 => Box::new(Bbr::new(BbrConfig::with_datagram_size(mss), t0)),
        1 => {
            let mut c = BbrConfig::with_datagram_size(mss);
            c.random_loss_tolerance = false;
            c.has_selective_acks = false;
            c.offload_quanta = 3;
            c.seed = u64::from(input.byte());
            Box::new(Bbr::new(c, t0))
        }
        2 => Box::new(Cubic::new(CubicConfig::with_mss(mss))),
        _ => Box::new(NewReno::new(LossBasedConfig::with_mss(mss))),
    };
    check(&*cc);
    let mut now = t0;
    for _ in 0..MAX_EVENTS {
        if input.is_empty() {
            break;
        }
        match input.byte() % 11 {
            0 => {
                let (b, f) = (input.bytes(), input.bytes());
                cc.on_packet_sent(now, b, f);
            }
            1 => {
                let ack = Ack {
                    bytes_acked: input.bytes(),
                    bytes_in_flight: input.bytes(),
                    rate_sample: None,
                };
                cc.on_ack(now, &ack);
            }
            2 => {
                let ack = Ack {
                    bytes_acked: input.bytes(),
                    bytes_in_flight: input.bytes(),
                    rate_sample: Some(RateSample {
                        delivered: input.bytes(),
                        interval: input.micros(),
                        is_app_limited: input.byte() & 1 == 1,
                        prior_delivered: input.bytes(),
                        lost: input.bytes(),
                        tx_in_flight: input.bytes(),
                    }),
                };
                cc.on_ack(now, &ack);
            }
            3 => {
                // The lost packet was sent at some point between the start and now.
                let back = input.micros().min(now - t0);
                let loss = Loss {
                    bytes_lost: input.bytes(),
                    bytes_in_flight: input.bytes(),
                    largest_lost_sent_at: now - back,
                    persistent_congestion: input.byte() & 1 == 1,
                };
                cc.on_loss(now, &loss);
            }
            4 => {
                let lost = LostPacketSample {
                    size: input.bytes(),
                    tx_in_flight: input.bytes(),
                    lost: input.bytes(),
                    is_app_limited: input.byte() & 1 == 1,
                };
                cc.on_packet_lost(now, &lost);
            }
            5 => {
                let (rtt, delay) = (input.micros(), input.micros());
                cc.on_rtt_sample(now, rtt, delay);
            }
            6 => {
                let (m, f) = (input.bytes(), input.bytes());
                cc.on_ecn(now, m, f);
            }
            7 => cc.on_mtu_update(input.bytes()),
            8 => cc.on_spurious_loss(now),
            9 => {
                let f = input.bytes();
                cc.on_app_limited(now, f);
            }
            _ => now += input.micros(),
        }
        check(&*cc);
    }
    // A clone carries on from the same state (quinn's factories rely on it).
    let copy = cc.clone_box();
    assert_eq!(copy.cwnd(), cc.cwnd());
});
