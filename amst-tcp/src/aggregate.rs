//! The session's streams as one flow toward others (issue 19, "fair together, full alone").
//!
//! One amst-cc BBR model ([`Pacer`](crate::pacing::Pacer)) is fed the `TCP_INFO` of every
//! stream and sets two aggregate limits, which the streams share:
//!
//! - the pacing rate, split evenly over the live streams as each one's `SO_MAX_PACING_RATE`;
//! - the in-flight cap (the model's cwnd), enforced by the writers' [`InflightGate`]: they hand
//!   the kernels no more chunks while the bytes the kernels hold for the session (in flight
//!   plus not yet sent) are at the cap.
//!
//! Each stream still runs kernel BBR, which repairs its own losses and keeps its own window;
//! without the gate those N windows add up to N flows' worth of queue, which is what took 0.73
//! of the benchmark link against one other BBR flow. [`TcpConfig::aggressive`] turns the gate
//! off (the streams then compete as N paced flows). The arithmetic here is sans-IO; the one
//! driver function, [`refresh_gate`], reads the sockets.
//!
//! [`TcpConfig::aggressive`]: crate::TcpConfig::aggressive

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use amst_core::Congestion;

use crate::pacing::Pacer;
use crate::sockopt::TcpInfo;
use crate::tuner::Aggregate;

/// How often the writers' gate is refreshed from the kernels' counters while it binds: much
/// shorter than the paths it matters on (tens of ms and up), so that the kernels do not run
/// dry between refreshes.
pub(crate) const GATE_PERIOD: Duration = Duration::from_millis(5);

/// What each stream and the writers get from the aggregate model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Allocation {
    /// `SO_MAX_PACING_RATE` of each stream, bytes/s.
    pub per_stream_rate: u64,
    /// Bytes all the kernels together may hold for the session (in flight plus unsent).
    pub inflight_cap: u64,
}

/// Splits the model's aggregate `rate` (bytes/s) and `cwnd` (bytes) over `streams` live
/// streams, each stream's slice of the rate scaled by the [`RateTrim`]. The cap never falls
/// below one `chunk` per stream, so that every stream can make progress and a model that has
/// seen little cannot wedge the session.
pub(crate) fn allocate(
    rate: u64,
    trim: f64,
    cwnd: u64,
    streams: usize,
    chunk: usize,
) -> Allocation {
    let n = streams.max(1) as u64;
    Allocation {
        per_stream_rate: ((rate as f64 * trim) as u64 / n).max(1),
        inflight_cap: cwnd.max(n * chunk as u64),
    }
}

/// Largest trim: the streams' slices never add up to more than this times the model's rate.
pub(crate) const MAX_TRIM: f64 = 1.25;

/// Scales the streams' pacing slices so that together they send at the model's rate. Each
/// kernel paces a little under its cap: its own BBR spends an eighth of its cycle at 0.75x,
/// it counts headers in the paced bytes while the model counts payload, and a stream in
/// loss recovery falls behind. Measured alone on the benchmark link, slices of exactly
/// rate/N delivered 0.83-0.86 of the link with no queue at all.
///
/// The trim only ever fills an empty pipe. While the streams' RTT shows no queue (within
/// [`QUEUE_FREE`] of the path's minimum), pacing limited the period, and the kernels sent less
/// than the model's rate, it moves a quarter of the way toward rate/sent, up to
/// [`MAX_TRIM`]. Once the RTT shows a queue (above [`QUEUE_SEEN`]) it falls back toward 1 by
/// a tenth per sample, so that against other flows, which keep a queue, the session paces
/// at exactly the model's rate, as one BBR flow would.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RateTrim {
    trim: f64,
}

/// RTT over the path's minimum below which the path shows no queue.
pub(crate) const QUEUE_FREE: f64 = 1.05;
/// RTT over the path's minimum above which the path shows a queue.
pub(crate) const QUEUE_SEEN: f64 = 1.15;

impl Default for RateTrim {
    fn default() -> Self {
        RateTrim { trim: 1.0 }
    }
}

impl RateTrim {
    /// The factor now.
    pub(crate) fn get(&self) -> f64 {
        self.trim
    }

    /// One sample: the model's `rate`, the bytes/s the kernels actually sent (payload,
    /// retransmissions included), whether pacing limited the period (data was waiting and
    /// the gate was open), and the streams' RTT over the path's minimum.
    pub(crate) fn update(&mut self, rate: u64, sent_rate: f64, paced: bool, rtt_ratio: f64) -> f64 {
        if rtt_ratio > QUEUE_SEEN {
            self.trim = (self.trim * 0.9).max(1.0);
        } else if rtt_ratio <= QUEUE_FREE && paced && rate > 0 && sent_rate > 0.0 {
            let want = rate as f64 / sent_rate;
            self.trim = (self.trim * (1.0 + 0.25 * (want - 1.0))).clamp(1.0, MAX_TRIM);
        }
        self.trim
    }
}

/// The aggregate model as the monitor drives it, sans-IO: amst-cc's BBR ([`Pacer`]) plus the
/// [`RateTrim`] and the in-flight cap. One [`Model::on_sample`] per `TCP_INFO` period; the
/// monitor applies what it returns to the sockets and the writers' gate. The simulator test
/// in `pacing.rs` drives the same code over amst-cc's simulated bottleneck.
#[derive(Clone, Debug)]
pub(crate) struct Model {
    pacer: Pacer,
    trim: RateTrim,
    /// Whether the in-flight cap is enforced (not [`TcpConfig::aggressive`]).
    ///
    /// [`TcpConfig::aggressive`]: crate::TcpConfig::aggressive
    gated: bool,
    /// The cap last returned, bytes; 0 before the first.
    cap: u64,
    /// Whether the cap keeps the pacer's in-flight floor above the unsent bytes (always,
    /// outside the simulator test that shows what happens without it).
    floor: bool,
}

/// What one period's sample asks of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The model's own pacing rate, bytes/s.
    pub model_rate: u64,
    /// The aggregate pacing rate to split over the streams (the trimmed slices added up).
    pub rate: u64,
    /// The in-flight cap the writers' gate enforces, if gated.
    pub cap: Option<u64>,
}

/// One period's measurements, as the monitor reads them from `TCP_INFO`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Period {
    /// The kernels' counters summed over the period.
    pub sample: Aggregate,
    /// Bytes in flight now (sent, not delivered or lost), all streams.
    pub in_flight: u64,
    /// Bytes not yet sent, in the kernels' send queues, all streams.
    pub notsent: u64,
    /// The latest RTT: the smallest smoothed RTT of any stream.
    pub rtt: Option<Duration>,
}

impl Model {
    pub(crate) fn new(kernel: Congestion, gated: bool, now: Instant) -> Self {
        Model {
            pacer: Pacer::new(kernel, now),
            trim: RateTrim::default(),
            gated,
            cap: 0,
            floor: true,
        }
    }

    /// The same model without the in-flight floor, to show what it prevents.
    #[cfg(test)]
    pub(crate) fn without_floor(mut self) -> Self {
        self.floor = false;
        self
    }

    /// Feeds one period; `None` while the model has nothing to go on (no traffic yet).
    pub(crate) fn on_sample(&mut self, now: Instant, p: &Period) -> Option<Applied> {
        let s = &p.sample;
        let model_rate = self.pacer.on_sample(now, s, p.in_flight, p.rtt)?;
        if !self.gated {
            return Some(Applied {
                model_rate,
                rate: model_rate,
                cap: None,
            });
        }
        let outstanding = p.in_flight + p.notsent;
        let paced = !s.app_limited
            && self.pacer.cruising()
            && (self.cap == 0 || outstanding * 10 < self.cap * 9);
        let sent_rate = s.sent as f64 / s.interval.as_secs_f64().max(1e-3);
        let rtt_ratio = match (p.rtt, s.min_rtt) {
            (Some(r), Some(m)) if !m.is_zero() => r.as_secs_f64() / m.as_secs_f64(),
            _ => 1.0,
        };
        let trim = self.trim.update(model_rate, sent_rate, paced, rtt_ratio);
        let cap = self.pacer.inflight_cap().max(if self.floor {
            p.notsent + self.pacer.inflight_floor()
        } else {
            0
        });
        let a = allocate(model_rate, trim, cap, s.streams, s.chunk);
        self.cap = a.inflight_cap;
        Some(Applied {
            model_rate,
            rate: a.per_stream_rate * s.streams.max(1) as u64,
            cap: Some(a.inflight_cap),
        })
    }

    /// The model itself, for the log and metrics.
    pub(crate) fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// The trim now.
    pub(crate) fn trim(&self) -> f64 {
        self.trim.get()
    }
}

/// Bytes one stream's kernel holds for the session: segments in flight (sent, not acked or
/// SACKed, not marked lost, plus retransmissions out; Linux's `tcp_packets_in_flight`) times
/// the MSS, plus bytes written but not yet sent.
pub(crate) fn kernel_outstanding(info: &TcpInfo) -> u64 {
    let out = info
        .unacked
        .saturating_sub(info.sacked)
        .saturating_sub(info.lost)
        + info.retrans;
    out as u64 * info.mss as u64 + info.notsent_bytes as u64
}

/// Bytes in flight (without unsent bytes) over all streams, for the model.
pub(crate) fn in_flight(infos: &[(u32, TcpInfo)]) -> u64 {
    infos
        .iter()
        .map(|(_, i)| kernel_outstanding(i) - i.notsent_bytes as u64)
        .sum()
}

/// The writers' share of the aggregate in-flight cap: a byte budget the gate's driver resets
/// from the kernels' counters every [`GATE_PERIOD`] and each writer spends as it takes
/// chunks. A writer may overshoot by the one batch it takes when the budget is still
/// positive; the next refresh accounts for it.
#[derive(Debug)]
pub(crate) struct InflightGate {
    budget: AtomicI64,
    /// Whether the gate is in force at all (aggregate mode with pacing on, a model running,
    /// no probe train).
    active: AtomicBool,
}

impl Default for InflightGate {
    fn default() -> Self {
        InflightGate {
            budget: AtomicI64::new(i64::MAX),
            active: AtomicBool::new(false),
        }
    }
}

impl InflightGate {
    /// Whether a writer may take chunks now.
    pub(crate) fn open(&self) -> bool {
        !self.active.load(Ordering::Relaxed) || self.budget.load(Ordering::Relaxed) > 0
    }

    /// A writer took `bytes` of chunks.
    pub(crate) fn spend(&self, bytes: u64) {
        if bytes > 0 && self.active.load(Ordering::Relaxed) {
            self.budget
                .fetch_sub(bytes.min(i64::MAX as u64) as i64, Ordering::Relaxed);
        }
    }

    /// Resets the budget to `cap - outstanding`. Returns whether the gate went from shut to
    /// open, so that the driver wakes the writers that stopped at it.
    pub(crate) fn refill(&self, cap: u64, outstanding: u64) -> bool {
        let budget = cap as i64 - outstanding.min(i64::MAX as u64) as i64;
        let was = self.budget.swap(budget, Ordering::Relaxed);
        let was_active = self.active.swap(true, Ordering::Relaxed);
        (was <= 0 || !was_active) && budget > 0
    }

    /// Lifts the gate (no model yet, or a probe train running). Returns whether it was shut.
    pub(crate) fn lift(&self) -> bool {
        let shut = !self.open();
        self.active.store(false, Ordering::Relaxed);
        self.budget.store(i64::MAX, Ordering::Relaxed);
        shut
    }

    /// The budget left, bytes (negative: overshot), if the gate is in force.
    #[cfg(test)]
    fn budget(&self) -> Option<i64> {
        self.active
            .load(Ordering::Relaxed)
            .then(|| self.budget.load(Ordering::Relaxed))
    }
}

/// The gate's driver: reads every stream's `TCP_INFO`, resets the budget from the model's
/// cap, and wakes the writers if the gate opened. Called by the monitor every
/// [`GATE_PERIOD`].
pub(crate) fn refresh_gate(shared: &crate::session::Shared) {
    use std::os::fd::AsRawFd;
    let cap = shared.inflight_cap.load(Ordering::Relaxed);
    if cap == 0 || shared.probing.load(Ordering::Acquire) > 0 {
        if shared.gate.lift() {
            shared.tx_wake.notify_waiters();
        }
        return;
    }
    let socks: Vec<_> = crate::session::lock(&shared.streams)
        .iter()
        .map(|e| e.sock.clone())
        .collect();
    let outstanding: u64 = socks
        .iter()
        .filter_map(|s| crate::sockopt::tcp_info(s.as_raw_fd()).ok())
        .map(|i| kernel_outstanding(&i))
        .sum();
    if shared.gate.refill(cap, outstanding) {
        shared.tx_wake.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_split_evenly_and_the_cap_has_a_floor() {
        let a = allocate(25_000_000, 1.0, 5_000_000, 8, 128 << 10);
        assert_eq!(a.per_stream_rate, 3_125_000);
        assert_eq!(a.inflight_cap, 5_000_000);
        // The trim scales every slice alike.
        let a = allocate(25_000_000, 1.2, 5_000_000, 8, 128 << 10);
        assert_eq!(a.per_stream_rate, 3_750_000);
        // A tiny model window still lets every stream carry a chunk.
        let a = allocate(1_000, 1.0, 10_000, 4, 64 << 10);
        assert_eq!(a.inflight_cap, 4 * (64 << 10));
        assert_eq!(a.per_stream_rate, 250);
        // No streams yet: the whole rate, never zero.
        assert_eq!(allocate(0, 1.0, 0, 0, 1).per_stream_rate, 1);
    }

    #[test]
    fn the_trim_fills_an_empty_pipe_and_backs_off_from_a_queue() {
        // Kernels that send 0.95 of their caps on an empty path: the trim converges to about
        // 1/0.95.
        let mut t = RateTrim::default();
        let rate = 24_000_000u64;
        for _ in 0..60 {
            let sent = 0.95 * rate as f64 * t.get();
            t.update(rate, sent, true, 1.01);
        }
        assert!((t.get() - 1.0 / 0.95).abs() < 0.01, "{}", t.get());
        // Periods that pacing did not limit (gate shut, no data), or with a small queue,
        // leave it alone.
        let before = t.get();
        assert_eq!(t.update(rate, 1.0, false, 1.0), before);
        assert_eq!(t.update(rate, 1.0, true, 1.10), before);
        // A queue pulls it back to 1 and no further.
        for _ in 0..30 {
            t.update(rate, 1.0, true, 1.5);
        }
        assert_eq!(t.get(), 1.0);
        // Kernels that keep up never push it below 1; a stalled path never past the bound.
        t.update(rate, 2.0 * rate as f64, true, 1.0);
        assert_eq!(t.get(), 1.0);
        for _ in 0..60 {
            t.update(rate, rate as f64 / 10.0, true, 1.0);
        }
        assert_eq!(t.get(), MAX_TRIM);
    }

    #[test]
    fn outstanding_counts_what_the_kernel_would_send_or_has_in_the_network() {
        let i = TcpInfo {
            unacked: 100,
            sacked: 30,
            lost: 5,
            retrans: 2,
            mss: 1000,
            notsent_bytes: 7_000,
            ..Default::default()
        };
        // 100 - 30 - 5 + 2 = 67 segments in flight, plus 7000 unsent.
        assert_eq!(kernel_outstanding(&i), 67_000 + 7_000);
        assert_eq!(in_flight(&[(1, i), (2, i)]), 134_000);
        // Counters caught mid-update (sacked + lost > unacked) do not wrap.
        let odd = TcpInfo {
            unacked: 3,
            sacked: 5,
            lost: 1,
            mss: 1000,
            ..Default::default()
        };
        assert_eq!(kernel_outstanding(&odd), 0);
    }

    #[test]
    fn the_gate_shuts_at_the_cap_and_reopens_when_the_kernels_drain() {
        let g = InflightGate::default();
        // Not in force until the model gives a cap.
        assert!(g.open());
        g.spend(1 << 30);
        assert!(g.open());
        // In force: 1 MB cap, 600 kB outstanding, so 400 kB to spend.
        assert!(g.refill(1_000_000, 600_000));
        assert_eq!(g.budget(), Some(400_000));
        g.spend(300_000);
        assert!(g.open());
        g.spend(300_000); // one batch may overshoot
        assert!(!g.open());
        assert_eq!(g.budget(), Some(-200_000));
        // Still full at the next refresh: stays shut, nobody is woken.
        assert!(!g.refill(1_000_000, 1_000_000));
        assert!(!g.open());
        // The kernels drained: open again, and the driver is told to wake the writers.
        assert!(g.refill(1_000_000, 900_000));
        assert!(g.open());
        // Already open: no wake-up needed.
        assert!(!g.refill(1_000_000, 100_000));
        // Lifted (a probe train): open whatever is spent, and reports it was shut before.
        g.spend(10_000_000);
        assert!(g.lift());
        assert!(g.open());
        assert_eq!(g.budget(), None);
        assert!(!g.lift());
    }
}
