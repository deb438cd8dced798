//! Congestion control as pure state machines: BBRv3 (draft-ietf-ccwg-bbr) and CUBIC
//! (RFC 9438) with HyStart++ (RFC 9406), the delivery-rate estimator and windowed filters
//! they are built from, a deterministic link simulator (feature `sim`) and an adapter to
//! quinn (feature `quinn`).
//!
//! No IO, no async runtime, no wall clock: every input carries `now`.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use amst_cc::{Ack, CongestionController};
//! use amst_cc::cubic::{Cubic, CubicConfig};
//!
//! let t0 = Instant::now();
//! let mut cc: Box<dyn CongestionController> = Box::new(Cubic::new(CubicConfig::with_mss(1200)));
//! let cwnd0 = cc.cwnd();
//! cc.on_packet_sent(t0, 1200, 1200);
//! let t1 = t0 + Duration::from_millis(20);
//! cc.on_rtt_sample(t1, Duration::from_millis(20), Duration::ZERO);
//! cc.on_ack(t1, &Ack { bytes_acked: 1200, bytes_in_flight: 0, rate_sample: None });
//! // Slow start: one datagram acknowledged, one datagram of growth.
//! assert_eq!(cc.cwnd(), cwnd0 + 1200);
//! assert!(cc.pacing_rate() > 0.0);
//! ```

mod controller;

pub mod bbr;
pub mod cubic;
pub mod delivery_rate;
pub mod filter;
#[cfg(feature = "quinn")]
pub mod quinn;
#[cfg(feature = "sim")]
pub mod sim;
pub mod slow_start;

pub use bbr::{Bbr, BbrConfig};
pub use controller::{Ack, CongestionController, ControllerMetrics, Loss, Phase, RateSample};
pub use cubic::{Cubic, CubicConfig};
