//! AMST's mode detector: is this path datacenter, internet or hybrid?
//!
//! Two halves:
//!
//! - [`Classifier`], pure and sans-IO: [`Observation`]s (RTT, bandwidth) and `now` in, a
//!   [`Decision`] out, with the seed's thresholds (datacenter: RTT < 10 ms and ≥ 1 Gbit/s;
//!   internet: RTT > 50 ms or < 1 Gbit/s; hybrid otherwise), a window or EWMA history,
//!   hysteresis, a confidence score with the 0.7 switch threshold, change-point detection
//!   and an operator's force.
//! - [`Detector`], async: samples a live [`Transport`](amst_core::Transport) once per
//!   period, passively while data flows and with a budgeted active probe (≤ 1 % of the
//!   measured rate) when idle; [`Detector::spawn`] runs it as a loop that publishes mode
//!   changes on a `tokio::sync::watch` channel.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use amst_core::Mode;
//! use amst_detect::{Classifier, ClassifierConfig, Observation, Reason};
//!
//! let mut c = Classifier::new(ClassifierConfig::default())?;
//! let t0 = Instant::now();
//! let ms = Duration::from_millis;
//! // 0.1 ms and 10 Gbit/s (bytes per second, like amst-core's metrics):
//! c.observe(t0, Observation::new(Duration::from_micros(100), 1_250_000_000));
//! c.observe(t0 + ms(5), Observation::new(Duration::from_micros(120), 1_200_000_000));
//! let d = c.decide(t0 + ms(5));
//! assert_eq!(d.mode, Mode::Datacenter);
//! assert_eq!(d.reason, Reason::Switched);
//! println!("{d}"); // datacenter (was hybrid; switched): rtt 0.110 ms < 10.0 ms; ...
//! # Ok::<(), amst_core::Error>(())
//! ```
//!
//! Missing bandwidth: an observation without a usable bandwidth (none measured, or only a
//! lower bound below 1 Gbit/s) is classified by RTT alone. "RTT > 50 ms → internet" is
//! then as certain as ever; datacenter and hybrid votes count only
//! [`rtt_only_weight`](ClassifierConfig::rtt_only_weight) (0.75), because a slow link can
//! have a short RTT, and they never trigger a change point. Active probe trains and the
//! byte counters of an application that may not fill the link give only lower bounds
//! ([`Bandwidth::at_least`]): they can prove a path fast, never slow. A slow path is proven
//! by RTT or by a delivery rate measured while the application kept the path busy.
//!
//! Probe overhead with the default configuration, measured on amst-tcp: at most 4 MiB plus
//! framing per 5 s period (the cap, reached on loopback), 30–35 kB per period at 80 ms /
//! 200 Mbit/s; the README has the table and the command.

mod classifier;
mod config;
mod detector;
mod rate;
mod sample;
mod source;
mod task;
mod units;

pub use classifier::{Classifier, Decision, Reason};
pub use config::{
    ClassifierConfig, DetectorConfig, GBIT_PER_SEC, History, MIN_PERIOD, ProbeConfig, Thresholds,
};
pub use detector::{Detector, ProbeStats};
pub use rate::{
    RateEstimate, RateProbe, RateProbeConfig, RateStep, Train, measure_rate, measure_rate_until,
};
pub use sample::{Bandwidth, Observation, SampleSource};
pub use source::{MaybePath, PathSource};
pub use task::{DetectorHandle, Report};
