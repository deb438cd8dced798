//! Watching a transfer while it runs: a progress bar on a terminal, plain periodic lines
//! otherwise, and the samples the final report needs (intervals, RTT, mode switches).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amst_core::Mode;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::link::{Link, LinkStats};
use crate::size::{human_bits_per_sec, human_bytes};

/// How often the link is sampled.
const TICK: Duration = Duration::from_millis(100);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    /// An indicatif bar on stderr.
    Bar,
    /// One line per interval on stderr.
    Lines,
    /// Nothing (for `--json` and `--quiet`).
    Silent,
}

impl Display {
    /// A bar when stderr is a terminal, lines otherwise, nothing when asked for quiet.
    pub fn choose(quiet: bool) -> Display {
        if quiet {
            Display::Silent
        } else if std::io::stderr().is_terminal() {
            Display::Bar
        } else {
            Display::Lines
        }
    }
}

/// One reporting interval, as in iperf3's `intervals`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Interval {
    /// Seconds since the start, at the interval's start.
    pub start: f64,
    /// Seconds since the start, at the interval's end.
    pub end: f64,
    /// Data bytes moved in the interval.
    pub bytes: u64,
    /// Goodput in the interval, bits per second.
    pub bits_per_second: f64,
    /// Mode at the interval's end.
    pub mode: String,
    /// Transport at the interval's end.
    pub transport: String,
    /// Streams at the interval's end.
    pub streams: usize,
    /// Chunks retransmitted in the interval.
    pub retransmits: u64,
    /// Smoothed RTT at the interval's end, microseconds.
    pub rtt_us: Option<u64>,
}

/// A mode switch seen during the transfer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Switch {
    /// Seconds since the start.
    pub at_seconds: f64,
    /// Data bytes moved before it.
    pub at_bytes: u64,
    /// The old mode.
    pub from: String,
    /// The new mode.
    pub to: String,
    /// How long the switch took (swap to first acknowledgement), when the library says.
    pub duration_ms: Option<f64>,
}

/// What the observer saw, for the report.
#[derive(Clone, Debug)]
pub struct Observations {
    /// One per second (the last one shorter).
    pub intervals: Vec<Interval>,
    /// Mode switches in order.
    pub switches: Vec<Switch>,
    /// The mode at the start.
    pub first_mode: Mode,
    /// The last snapshot.
    pub last: LinkStats,
    /// Smallest RTT seen.
    pub rtt_min: Option<Duration>,
    /// Mean of the smoothed RTT sampled every 100 ms.
    pub rtt_avg: Option<Duration>,
}

/// A running observer; [`finish`](Self::finish) stops it and returns what it saw.
#[derive(Debug)]
pub struct Observer {
    stop: watch::Sender<bool>,
    task: JoinHandle<Observations>,
}

impl Observer {
    /// Starts watching `link`, whose data bytes so far are in `bytes`, toward `total`.
    pub fn start(
        link: Arc<dyn Link>,
        bytes: Arc<AtomicU64>,
        total: Option<u64>,
        display: Display,
        label: String,
    ) -> Observer {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(observe(link, bytes, total, display, label, rx));
        Observer { stop, task }
    }

    /// Stops watching, takes a last sample and clears the bar.
    pub async fn finish(self) -> Observations {
        let _ = self.stop.send(true);
        self.task.await.expect("the observer task does not panic")
    }
}

struct Rtt {
    min: Option<Duration>,
    sum: Duration,
    n: u32,
}

impl Rtt {
    fn sample(&mut self, s: &LinkStats) {
        for v in [s.min_rtt, s.rtt].into_iter().flatten() {
            self.min = Some(self.min.map_or(v, |m| m.min(v)));
        }
        if let Some(r) = s.rtt {
            self.sum += r;
            self.n += 1;
        }
    }
}

async fn observe(
    link: Arc<dyn Link>,
    bytes: Arc<AtomicU64>,
    total: Option<u64>,
    display: Display,
    label: String,
    mut stop: watch::Receiver<bool>,
) -> Observations {
    let start = Instant::now();
    let first = link.stats();
    let bar = (display == Display::Bar).then(|| make_bar(total, &label));
    if display == Display::Lines {
        crate::stdout::err_line(format_args!("{label}"));
        crate::stdout::err_line(format_args!(
            "{:>15}  {:>12}  {:>14}  {:>10}  {:>7}  {:>9}",
            "interval", "transfer", "goodput", "mode", "streams", "rtt"
        ));
    }
    let mut obs = Observations {
        intervals: Vec::new(),
        switches: Vec::new(),
        first_mode: first.mode,
        last: first.clone(),
        rtt_min: None,
        rtt_avg: None,
    };
    let mut rtt = Rtt {
        min: None,
        sum: Duration::ZERO,
        n: 0,
    };
    rtt.sample(&first);
    let mut iv_start = 0.0f64;
    let mut iv_bytes = 0u64;
    let mut iv_retx = first.retransmits;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let s = link.stats();
        let now = start.elapsed().as_secs_f64();
        let done = bytes.load(Ordering::Relaxed);
        rtt.sample(&s);
        if s.mode != obs.last.mode {
            tracing::info!(
                from = %obs.last.mode,
                to = %s.mode,
                at_bytes = done,
                switch_ms = s.last_switch.map(|d| d.as_secs_f64() * 1e3),
                "mode changed"
            );
            obs.switches.push(Switch {
                at_seconds: now,
                at_bytes: done,
                from: obs.last.mode.to_string(),
                to: s.mode.to_string(),
                duration_ms: s.last_switch.map(|d| d.as_secs_f64() * 1e3),
            });
            let line = format!(
                "mode switch {} → {} at {}{}",
                obs.last.mode,
                s.mode,
                human_bytes(done),
                s.last_switch
                    .map(|d| format!(" (took {:.1} ms)", d.as_secs_f64() * 1e3))
                    .unwrap_or_default()
            );
            match (&bar, display) {
                (Some(b), _) => b.println(line),
                (None, Display::Lines) => crate::stdout::err_line(format_args!("{line}")),
                _ => {}
            }
        }
        if let Some(b) = &bar {
            b.set_position(done);
            b.set_message(format!("{} {} ×{}", s.mode, s.transport, s.streams));
        }
        if now - iv_start >= 1.0 || (stopping && now > iv_start) {
            let moved = done - iv_bytes;
            let iv = Interval {
                start: iv_start,
                end: now,
                bytes: moved,
                bits_per_second: moved as f64 * 8.0 / (now - iv_start).max(1e-9),
                mode: s.mode.to_string(),
                transport: s.transport.to_string(),
                // The last sample is taken once the session has closed, when no stream is
                // left: the interval ran on the streams seen before.
                streams: if stopping && s.streams == 0 {
                    obs.last.streams
                } else {
                    s.streams
                },
                retransmits: s.retransmits.saturating_sub(iv_retx),
                rtt_us: s.rtt.map(|r| r.as_micros() as u64),
            };
            if display == Display::Lines {
                crate::stdout::err_line(format_args!(
                    "{:>6.2}-{:<6.2} s  {:>12}  {:>14}  {:>10}  {:>7}  {:>9}",
                    iv.start,
                    iv.end,
                    human_bytes(iv.bytes),
                    human_bits_per_sec(iv.bits_per_second / 8.0),
                    iv.mode,
                    iv.streams,
                    s.rtt
                        .map_or("-".into(), |r| format!("{:.2} ms", r.as_secs_f64() * 1e3))
                ));
            }
            obs.intervals.push(iv);
            iv_start = now;
            iv_bytes = done;
            iv_retx = s.retransmits;
        }
        obs.last = s;
        if stopping {
            break;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // A switch's duration is known only once the new route's first ack arrives, which may
    // be after the sample that saw the switch.
    if let (Some(w), Some(d)) = (obs.switches.last_mut(), obs.last.last_switch)
        && w.duration_ms.is_none()
    {
        w.duration_ms = Some(d.as_secs_f64() * 1e3);
    }
    obs.rtt_min = rtt.min;
    obs.rtt_avg = (rtt.n > 0).then(|| rtt.sum / rtt.n);
    obs
}

fn make_bar(total: Option<u64>, label: &str) -> ProgressBar {
    let bar = match total {
        Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if total.is_some() {
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}"
    } else {
        "{prefix} {spinner} {bytes} {binary_bytes_per_sec} {msg}"
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}
