//! What a session reports: an [`AmstMetrics`] snapshot, and counters, gauges and a histogram
//! through the `metrics` facade (the application installs a recorder, e.g. Prometheus; the
//! library never does). Handles are registered once per session, so the hot path pays an
//! atomic add, not a registry lookup.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use amst_core::util::lock;
use amst_core::{Mode, TransportKind};
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::session::Role;

/// A snapshot of one session.
#[derive(Clone, Debug, PartialEq)]
pub struct AmstMetrics {
    /// The mode of the current route.
    pub mode: Mode,
    /// The transport of the current route's (low-latency) lane.
    pub transport: TransportKind,
    /// The transport of the bulk lane, when it differs (hybrid mode).
    pub bulk_transport: Option<TransportKind>,
    /// The route generation: how many switches this session has installed.
    pub generation: u64,
    /// Whether the session speaks the hybrid protocol (false: a plain peer, no switching).
    pub hybrid: bool,
    /// Recent acknowledged throughput, bytes per second.
    pub throughput_bps: f64,
    /// Streams carrying data on the current route's transports.
    pub streams: usize,
    /// Application messages sent.
    pub messages_sent: u64,
    /// Application payload bytes sent.
    pub bytes_sent: u64,
    /// Application payload bytes acknowledged by the peer.
    pub bytes_acked: u64,
    /// Messages and bytes not yet acknowledged.
    pub unacked_messages: u64,
    /// Bytes not yet acknowledged.
    pub unacked_bytes: u64,
    /// Application messages delivered by `recv`.
    pub messages_received: u64,
    /// Application payload bytes delivered by `recv`.
    pub bytes_received: u64,
    /// Duplicates the receiver dropped (resends after a switch).
    pub duplicates_dropped: u64,
    /// Chunks the transports of the current route sent again.
    pub chunks_retransmitted: u64,
    /// Smoothed RTT of the current route's transport, if measured.
    pub rtt: Option<Duration>,
    /// Minimum RTT of the current route's transport, if measured.
    pub min_rtt: Option<Duration>,
    /// Route switches installed.
    pub switches: u64,
    /// Messages resent at the last switch.
    pub last_switch_resent: u64,
    /// From the swap to the first message acknowledged on the new transport, last switch.
    pub last_switch_duration: Option<Duration>,
    /// Transports open (current route, warm, draining).
    pub open_transports: usize,
    /// Application payload bytes resent after switches (each switch resends what the old
    /// route had not seen acknowledged).
    pub bytes_resent: u64,
    /// Payload bytes the current route's transports sent again, if they know.
    pub retransmitted_bytes: Option<u64>,
    /// Packets the current route's transports declared lost, where they know (QUIC).
    pub lost_packets: Option<u64>,
    /// Packets the current route's transports mark lost now and have not yet repaired,
    /// where they know (TCP's `tcpi_lost`).
    pub lost_outstanding: Option<u64>,
    /// The congestion window of the current route's amst-cc model, bytes (summed over
    /// both lanes in hybrid mode).
    pub cwnd: Option<u64>,
    /// The pacing rate of the current route's model, bytes per second.
    pub pacing_rate: Option<u64>,
    /// The chunk size of the bulk lane, bytes.
    pub chunk_size: Option<u64>,
    /// The credit window the peer grants the current route, bytes.
    pub credit_window: Option<u64>,
    /// Bytes this side holds for received data that `recv` has not taken: the transports'
    /// reassembly plus the merger's reorder buffer. (The process-wide total held against the
    /// memory budget is [`MemoryBudget::held`](amst_core::MemoryBudget::held).)
    pub receive_held_bytes: u64,
    /// The detector's latest verdict, if auto mode runs and it has decided.
    pub detector: Option<DetectorVerdict>,
    /// True while the session is open and has not failed.
    pub healthy: bool,
}

/// What the mode detector concluded last.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectorVerdict {
    /// The mode the evidence favours.
    pub candidate: Mode,
    /// Its confidence, 0 to 1.
    pub confidence: f64,
}

/// Switch timings kept per session (the last 4096).
#[derive(Clone, Debug, Default)]
pub(crate) struct SwitchStats {
    pub switches: u64,
    pub last_resent: u64,
    /// From the swap to the first acknowledged message on the new transport.
    pub durations: Vec<Duration>,
    /// From the decision to switch to the same acknowledgement: dial and Attach included.
    pub from_decision: Vec<Duration>,
}

impl SwitchStats {
    pub fn record(&mut self, from_swap: Duration, from_decision: Duration) {
        if self.durations.len() >= 4096 {
            self.durations.remove(0);
            self.from_decision.remove(0);
        }
        self.durations.push(from_swap);
        self.from_decision.push(from_decision);
    }
}

/// The session's handles into the `metrics` facade.
#[derive(Debug)]
pub(crate) struct Instruments {
    messages_sent: Counter,
    bytes_sent: Counter,
    messages_received: Counter,
    bytes_received: Counter,
    switches: Counter,
    resent: Counter,
    resent_bytes: Counter,
    mode: Gauge,
    switch_seconds: Histogram,
    /// The detector's latest verdict (written by the auto-mode task).
    pub verdict: Mutex<Option<DetectorVerdict>>,
    pub n_bytes_resent: AtomicU64,
    /// Local copies for `AmstMetrics` (a facade counter cannot be read back).
    pub n_messages_sent: AtomicU64,
    pub n_bytes_sent: AtomicU64,
}

impl Instruments {
    pub fn new(role: Role) -> Self {
        let role = match role {
            Role::Client => "client",
            Role::Server => "server",
        };
        Instruments {
            messages_sent: counter!("amst_messages_sent_total", "role" => role),
            bytes_sent: counter!("amst_bytes_sent_total", "role" => role),
            messages_received: counter!("amst_messages_received_total", "role" => role),
            bytes_received: counter!("amst_bytes_received_total", "role" => role),
            switches: counter!("amst_mode_switches_total", "role" => role),
            resent: counter!("amst_messages_resent_total", "role" => role),
            resent_bytes: counter!("amst_resent_bytes_total", "role" => role),
            mode: gauge!("amst_mode", "role" => role),
            switch_seconds: histogram!("amst_switch_duration_seconds", "role" => role),
            n_messages_sent: AtomicU64::new(0),
            n_bytes_sent: AtomicU64::new(0),
            verdict: Mutex::new(None),
            n_bytes_resent: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn sent(&self, len: usize) {
        self.messages_sent.increment(1);
        self.bytes_sent.increment(len as u64);
        self.n_messages_sent.fetch_add(1, Ordering::Relaxed);
        self.n_bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
    }

    #[inline]
    pub fn received(&self, len: usize) {
        self.messages_received.increment(1);
        self.bytes_received.increment(len as u64);
    }

    pub fn switched(&self) {
        self.switches.increment(1);
    }

    pub fn resent(&self, messages: u64, bytes: u64) {
        self.resent.increment(messages);
        self.resent_bytes.increment(bytes);
        self.n_bytes_resent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn set_verdict(&self, v: DetectorVerdict) {
        *lock(&self.verdict) = Some(v);
    }

    pub fn verdict(&self) -> Option<DetectorVerdict> {
        *lock(&self.verdict)
    }

    /// 0 datacenter, 1 internet, 2 hybrid.
    pub fn mode(&self, mode: Mode) {
        self.mode.set(match mode {
            Mode::Datacenter => 0.0,
            Mode::Internet => 1.0,
            Mode::Hybrid => 2.0,
        });
    }

    pub fn switch_duration(&self, d: Duration) {
        self.switch_seconds.record(d.as_secs_f64());
    }
}
