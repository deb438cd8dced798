//! The end-to-end benchmark harness behind `cargo xtask bench`.
//!
//! Every scenario interleaves its contenders (A B A B …), keeps every sample, and reports the
//! median and the spread; gates are ratios between contenders measured in the same run (or a
//! fraction of an emulated link's rate), never absolute times, because the machine is shared.
//!
//! ```
//! use amst_bench::stats::Summary;
//! let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
//! assert_eq!(s.median, 2.0);
//! ```

pub mod detect;
pub mod files;
pub mod gates;
pub mod iperf;
pub mod plot;
pub mod quic_loopback;
pub mod report;
pub mod stats;
