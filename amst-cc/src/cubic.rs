//! CUBIC (RFC 9438) with HyStart++ (RFC 9406), built by composition in the manner of neqo's
//! `cc/`: [`LossBased`] is the classic loss-based controller (slow start, recovery epochs,
//! ssthresh, undo, pacing), and it is generic over a [`WindowGrowth`] that only decides how
//! the window grows in congestion avoidance and how far it falls. Slow start is its own part,
//! [`crate::slow_start::HyStart`].
//!
//! ```
//! use std::time::{Duration, Instant};
//! use amst_cc::{Ack, CongestionController, Loss};
//! use amst_cc::cubic::{Cubic, CubicConfig};
//!
//! let now = Instant::now();
//! let mut cc = Cubic::new(CubicConfig::default());
//! let before = cc.cwnd();
//! cc.on_packet_sent(now, 1200, 1200);
//! cc.on_loss(now + Duration::from_millis(50), &Loss {
//!     bytes_lost: 1200,
//!     bytes_in_flight: 0,
//!     largest_lost_sent_at: now,
//!     persistent_congestion: false,
//! });
//! // RFC 9438 §4.6: the window falls to β_cubic (0.7) × cwnd.
//! assert_eq!(cc.cwnd(), (before as f64 * 0.7) as u64);
//! ```

mod classic;
mod growth;

pub use classic::{LossBased, LossBasedConfig};
pub use growth::{CUBIC_BETA, CUBIC_C, CubicGrowth, RenoGrowth, WindowGrowth};

/// CUBIC: the classic loss-based controller with RFC 9438's window growth.
pub type Cubic = LossBased<CubicGrowth>;

/// NewReno (RFC 9002 §7): the same controller with AIMD growth, for comparison.
pub type NewReno = LossBased<RenoGrowth>;

/// CUBIC's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct CubicConfig {
    /// The parts shared with every loss-based controller (datagram size, initial window,
    /// HyStart++, pacing).
    pub base: LossBasedConfig,
    /// RFC 9438's `C` (0.4).
    pub c: f64,
    /// RFC 9438's `β_cubic` (0.7).
    pub beta: f64,
    /// RFC 9438 §4.7 fast convergence (on by default).
    pub fast_convergence: bool,
}

impl Default for CubicConfig {
    fn default() -> Self {
        Self {
            base: LossBasedConfig::default(),
            c: CUBIC_C,
            beta: CUBIC_BETA,
            fast_convergence: true,
        }
    }
}

impl CubicConfig {
    /// The defaults with a given datagram size (for example 1448 for TCP, 1200 for QUIC).
    pub fn with_mss(max_datagram_size: u64) -> Self {
        Self {
            base: LossBasedConfig::with_mss(max_datagram_size),
            ..Self::default()
        }
    }
}

impl Cubic {
    /// A CUBIC controller.
    pub fn new(config: CubicConfig) -> Self {
        LossBased::with_growth(
            config.base,
            CubicGrowth::new(config.c, config.beta, config.fast_convergence),
        )
    }
}

impl Default for Cubic {
    fn default() -> Self {
        Self::new(CubicConfig::default())
    }
}

impl NewReno {
    /// A NewReno controller.
    pub fn new(config: LossBasedConfig) -> Self {
        LossBased::with_growth(config, RenoGrowth)
    }
}
