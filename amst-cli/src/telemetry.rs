//! Logs and metrics: the binary, never a library, installs the tracing subscriber and the
//! Prometheus recorder. The libraries only emit through the `tracing` and `metrics` facades.
//!
//! Besides the libraries' counters, `/metrics` shows every live session's path and
//! congestion state ([`track`]ed sessions' [`AmstMetrics`]), labelled by `role` and
//! `transport` and summed over the sessions that share those labels. They are read when
//! scraped, and at least once a second so that counters keep what a session did before it
//! ended. The names are in [`family`], with their help text in [`FAMILIES`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use amst_core::MemoryBudget;
use amst_core::util::lock;
use amst_hybrid::{Amst, AmstMetrics, Role};
use metrics::Unit;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::EnvFilter;

use crate::error::{CliResult, Failure, FailureKind};

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings only; the progress display
/// already shows mode switches). `RUST_LOG=info` adds the `mode changed` event and the
/// libraries' session events.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only where a terminal shows them, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        // A log line nobody can read is dropped. With the default, tracing reports the failed
        // write with `eprintln!` to the same closed stderr, which panics inside whichever task
        // logged: `amst send` with its stderr closed then never exited once the peer was gone.
        .log_internal_errors(false)
        .try_init();
}

/// The session metrics' names.
pub mod family {
    /// Gauge: application bytes delivered per second (acknowledged to a sender, received by
    /// a receiver), over the last second or more.
    pub const GOODPUT: &str = "amst_goodput_bytes_per_second";
    /// Counter: application bytes delivered (acknowledged to a sender, received by a receiver).
    pub const GOODPUT_TOTAL: &str = "amst_goodput_bytes_total";
    /// Gauge: smoothed RTT, mean over the sessions.
    pub const RTT: &str = "amst_rtt_seconds";
    /// Gauge: minimum RTT, least over the sessions.
    pub const MIN_RTT: &str = "amst_min_rtt_seconds";
    /// Gauge: the congestion window of the amst-cc model.
    pub const CWND: &str = "amst_cwnd_bytes";
    /// Gauge: the pacing rate the model set.
    pub const PACING_RATE: &str = "amst_pacing_rate_bytes_per_second";
    /// Gauge: streams carrying data.
    pub const STREAMS: &str = "amst_streams_active";
    /// Gauge: the chunk size in use (the largest over the sessions).
    pub const CHUNK_SIZE: &str = "amst_chunk_size_bytes";
    /// Counter: bytes the network layer sent again.
    pub const RETRANSMITTED_BYTES: &str = "amst_retransmitted_bytes_total";
    /// Counter: chunks AMST sent again (a dead stream, a stall).
    pub const RETRANSMITTED_CHUNKS: &str = "amst_retransmitted_chunks_total";
    /// Counter: packets declared lost, where the transport knows (QUIC).
    pub const LOST_PACKETS: &str = "amst_lost_packets_total";
    /// Gauge: packets marked lost and not yet repaired, where the transport knows (TCP).
    pub const LOST_OUTSTANDING: &str = "amst_lost_packets_outstanding";
    /// Gauge: the credit window the peers grant.
    pub const CREDIT_WINDOW: &str = "amst_credit_window_bytes";
    /// Gauge: received bytes held for reassembly and reordering, not yet taken.
    pub const RECEIVE_HELD: &str = "amst_receive_held_bytes";
    /// Gauge: bytes held against the process's memory budget (credit granted to peers and
    /// received bytes not yet dropped).
    pub const BUDGET_HELD: &str = "amst_memory_budget_held_bytes";
    /// Gauge: the memory budget's limit.
    pub const BUDGET_LIMIT: &str = "amst_memory_budget_limit_bytes";
    /// Gauge: sessions whose detector favours `mode`, by its latest verdict.
    pub const DETECTOR_VERDICT: &str = "amst_detector_verdict_sessions";
    /// Gauge: the confidence of the detector's latest verdict, mean over the sessions.
    pub const DETECTOR_CONFIDENCE: &str = "amst_detector_confidence_ratio";
    /// Gauge: live sessions.
    pub const SESSIONS: &str = "amst_sessions";
    /// Gauge: 1 when every live session is open and has not failed, else 0.
    pub const HEALTH: &str = "amst_health";
}

/// Every metric family this process can show: (name, unit, help). The libraries' own
/// counters are described here too, so that each family carries HELP text.
pub const FAMILIES: &[(&str, Option<Unit>, &str)] = &[
    (
        family::GOODPUT,
        None,
        "Application bytes delivered per second (bytes/s): acknowledged to a sender, received by a receiver",
    ),
    (
        family::GOODPUT_TOTAL,
        Some(Unit::Bytes),
        "Application bytes delivered: acknowledged to a sender, received by a receiver",
    ),
    (
        family::RTT,
        Some(Unit::Seconds),
        "Smoothed round-trip time (TCP: TCP_INFO; QUIC: quinn's path; RDMA: acknowledgement timing), mean over sessions",
    ),
    (
        family::MIN_RTT,
        Some(Unit::Seconds),
        "Minimum round-trip time seen, least over sessions",
    ),
    (
        family::CWND,
        Some(Unit::Bytes),
        "Congestion window of the amst-cc model (the kernel's when no model paces TCP; RDMA has none in sight), summed over sessions",
    ),
    (
        family::PACING_RATE,
        None,
        "Pacing rate the amst-cc model set (bytes/s; TCP and QUIC), summed over sessions",
    ),
    (
        family::STREAMS,
        Some(Unit::Count),
        "Streams (TCP connections, QUIC streams, queue pairs) carrying data",
    ),
    (
        family::CHUNK_SIZE,
        Some(Unit::Bytes),
        "Chunk size the sender cuts messages into (RDMA: the ring slot's payload), largest over sessions",
    ),
    (
        family::RETRANSMITTED_BYTES,
        Some(Unit::Bytes),
        "Bytes the network layer sent again (TCP: kernel bytes_retrans; QUIC: bytes in lost packets)",
    ),
    (
        family::RETRANSMITTED_CHUNKS,
        Some(Unit::Count),
        "Chunks AMST sent again after a dead stream or a stall",
    ),
    (
        family::LOST_PACKETS,
        Some(Unit::Count),
        "Packets declared lost, where the transport knows (QUIC loss detection; TCP keeps no total, see amst_lost_packets_outstanding)",
    ),
    (
        family::LOST_OUTSTANDING,
        Some(Unit::Count),
        "Packets marked lost and not yet repaired, where the transport knows (TCP: tcpi_lost summed over streams)",
    ),
    (
        family::CREDIT_WINDOW,
        Some(Unit::Bytes),
        "Credit the peer grants, summed over sessions (TCP, QUIC: bytes beyond what it acknowledged; RDMA: bytes its unused receive and ring-slot credits take)",
    ),
    (
        family::RECEIVE_HELD,
        Some(Unit::Bytes),
        "Received bytes held for reassembly and reordering, not yet taken by the application",
    ),
    (
        family::BUDGET_HELD,
        Some(Unit::Bytes),
        "Bytes held against the process's memory budget: credit granted to peers plus received bytes the application still holds (may pass the limit by each session's small guaranteed window)",
    ),
    (
        family::BUDGET_LIMIT,
        Some(Unit::Bytes),
        "The process's memory budget for everything held for peers (amst serve --memory-budget)",
    ),
    (
        family::DETECTOR_VERDICT,
        Some(Unit::Count),
        "Sessions whose mode detector favours this mode in its latest verdict",
    ),
    (
        family::DETECTOR_CONFIDENCE,
        None,
        "Confidence (a ratio, 0 to 1) of the mode detector's latest verdict, mean over sessions",
    ),
    (family::SESSIONS, Some(Unit::Count), "Live sessions"),
    (
        family::HEALTH,
        None,
        "1 when every live session is open and has not failed, else 0 (a boolean gauge)",
    ),
    (
        "amst_messages_sent_total",
        Some(Unit::Count),
        "Application messages sent",
    ),
    (
        "amst_bytes_sent_total",
        Some(Unit::Bytes),
        "Application payload bytes sent",
    ),
    (
        "amst_messages_received_total",
        Some(Unit::Count),
        "Application messages delivered by recv",
    ),
    (
        "amst_bytes_received_total",
        Some(Unit::Bytes),
        "Application payload bytes delivered by recv",
    ),
    (
        "amst_mode_switches_total",
        Some(Unit::Count),
        "Mode switches installed",
    ),
    (
        "amst_messages_resent_total",
        Some(Unit::Count),
        "Messages resent after mode switches (unacknowledged on the old route)",
    ),
    (
        "amst_resent_bytes_total",
        Some(Unit::Bytes),
        "Application bytes resent after mode switches (unacknowledged on the old route)",
    ),
    (
        "amst_mode",
        None,
        "Mode of the latest session to change: 0 datacenter, 1 internet, 2 hybrid",
    ),
    (
        "amst_switch_duration_seconds",
        Some(Unit::Seconds),
        "From a route swap to the first message acknowledged on the new transport",
    ),
];

/// Serves every metric of the process as Prometheus text at `http://addr/metrics`. Must run
/// inside the tokio runtime, which then hosts the HTTP listener.
pub fn install_prometheus(addr: SocketAddr) -> CliResult<()> {
    let unusable = |e: &dyn std::fmt::Display| {
        Failure::new(
            FailureKind::Usage,
            format!("cannot serve metrics on {addr}: {e}"),
        )
    };
    let listener = std::net::TcpListener::bind(addr).map_err(|e| unusable(&e))?;
    listener.set_nonblocking(true).map_err(|e| unusable(&e))?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| unusable(&e))?;
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| unusable(&e))?;
    describe();
    let registry = registry();
    tokio::spawn(upkeep(handle.clone(), registry.clone()));
    tokio::spawn(serve_http(listener, handle, registry));
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

fn describe() {
    use crate::transfer::metric::*;
    metrics::describe_counter!(
        SENT_BYTES,
        Unit::Bytes,
        "Data bytes amst send handed to AMST"
    );
    metrics::describe_counter!(
        RECEIVED_BYTES,
        Unit::Bytes,
        "Data bytes amst serve received"
    );
    metrics::describe_counter!(TRANSFERS, Unit::Count, "Transfers finished, by result");
    metrics::describe_counter!(SESSIONS, Unit::Count, "Sessions accepted by amst serve");
    for &(name, unit, help) in FAMILIES {
        // The facade keys descriptions by name; the kind only picks the macro.
        match unit {
            Some(u) => metrics::describe_gauge!(name, u, help),
            None => metrics::describe_gauge!(name, help),
        }
    }
}

/// Makes `/metrics` show `budget` as the process's memory budget, instead of the default
/// [`MemoryBudget::process`].
pub fn watch_budget(budget: &MemoryBudget) {
    *lock(&registry().budget) = Some(budget.clone());
}

/// Adds `amst` to the sessions `/metrics` shows, until it is dropped.
pub fn track(amst: &Arc<Amst>) {
    let registry = registry();
    let mut r = lock(&registry.sessions);
    r.retain(|s| s.amst.strong_count() > 0);
    r.push(Tracked {
        amst: Arc::downgrade(amst),
        role: match amst.role() {
            Role::Client => "client",
            Role::Server => "server",
        },
        last: Last::default(),
    });
}

/// The sessions being watched, and what the last refresh saw.
#[derive(Debug, Default)]
struct Registry {
    sessions: Mutex<Vec<Tracked>>,
    budget: Mutex<Option<MemoryBudget>>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct Tracked {
    amst: Weak<Amst>,
    role: &'static str,
    last: Last,
}

/// A session's counters at the previous refresh, so that counters grow by the difference.
#[derive(Debug, Default, Clone, Copy)]
struct Last {
    goodput: u64,
    retransmitted_bytes: u64,
    retransmitted_chunks: u64,
    lost_packets: u64,
}

/// Label sets shown before (so that one with no sessions left reads 0, not its last value),
/// and the goodput counters at the last rate computation.
#[derive(Debug, Default)]
struct State {
    seen: BTreeSet<Key>,
    rate_from: BTreeMap<Key, (Instant, u64)>,
    goodput_totals: BTreeMap<Key, u64>,
}

type Key = (&'static str, String);

fn registry() -> Arc<Registry> {
    static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Arc::default).clone()
}

/// One label set's sums over its sessions.
#[derive(Debug, Default)]
struct Sums {
    sessions: u64,
    rtt: (f64, u32),
    min_rtt: Option<f64>,
    cwnd: u64,
    pacing_rate: u64,
    streams: u64,
    chunk_size: u64,
    lost_outstanding: u64,
    credit_window: u64,
    receive_held: u64,
    verdicts: [u64; 3],
    confidence: (f64, u32),
}

/// Reads every live session and updates the session metrics.
fn refresh(registry: &Registry) {
    let mut sums: BTreeMap<Key, Sums> = BTreeMap::new();
    let mut delivered: BTreeMap<Key, u64> = BTreeMap::new();
    let mut healthy = true;
    {
        let mut sessions = lock(&registry.sessions);
        sessions.retain(|s| s.amst.strong_count() > 0);
        for t in sessions.iter_mut() {
            let Some(amst) = t.amst.upgrade() else {
                continue;
            };
            let m = amst.metrics();
            healthy &= m.healthy;
            let key = (t.role, m.transport.to_string());
            *delivered.entry(key.clone()).or_default() += add_counters(&key, &m, &mut t.last);
            let s = sums.entry(key).or_default();
            add_gauges(s, &m);
        }
    }
    let mut state = lock(&registry.state);
    for (key, bytes) in delivered {
        *state.goodput_totals.entry(key).or_default() += bytes;
    }
    let now = Instant::now();
    let keys: BTreeSet<Key> = state
        .seen
        .iter()
        .cloned()
        .chain(sums.keys().cloned())
        .collect();
    for key in keys {
        let s = sums.remove(&key).unwrap_or_default();
        let total = *state.goodput_totals.get(&key).unwrap_or(&0);
        let rate = match state.rate_from.get(&key) {
            Some(&(at, bytes)) if now.duration_since(at) >= Duration::from_millis(900) => {
                let r = total.saturating_sub(bytes) as f64 / now.duration_since(at).as_secs_f64();
                state.rate_from.insert(key.clone(), (now, total));
                Some(r)
            }
            Some(_) => None,
            None => {
                state.rate_from.insert(key.clone(), (now, total));
                Some(0.0)
            }
        };
        set_gauges(&key, &s, rate);
        state.seen.insert(key);
    }
    metrics::gauge!(family::HEALTH).set(if healthy { 1.0 } else { 0.0 });
    let budget = lock(&registry.budget)
        .clone()
        .unwrap_or_else(MemoryBudget::process);
    metrics::gauge!(family::BUDGET_HELD).set(budget.held() as f64);
    metrics::gauge!(family::BUDGET_LIMIT).set(budget.limit() as f64);
}

/// Grows the counters by what the session did since the last refresh; returns the goodput
/// bytes among it.
fn add_counters(key: &Key, m: &AmstMetrics, last: &mut Last) -> u64 {
    let labels = [("role", key.0.to_string()), ("transport", key.1.clone())];
    let now = Last {
        goodput: m.bytes_acked + m.bytes_received,
        retransmitted_bytes: m.retransmitted_bytes.unwrap_or(0),
        retransmitted_chunks: m.chunks_retransmitted,
        lost_packets: m.lost_packets.unwrap_or(0),
    };
    // A switch replaces the transports whose counters these are: a drop is a new start.
    let grow = |name: &'static str, new: u64, old: u64| {
        metrics::counter!(name, &labels).increment(new.saturating_sub(old));
    };
    grow(family::GOODPUT_TOTAL, now.goodput, last.goodput);
    grow(
        family::RETRANSMITTED_BYTES,
        now.retransmitted_bytes,
        last.retransmitted_bytes,
    );
    grow(
        family::RETRANSMITTED_CHUNKS,
        now.retransmitted_chunks,
        last.retransmitted_chunks,
    );
    grow(family::LOST_PACKETS, now.lost_packets, last.lost_packets);
    let delivered = now.goodput.saturating_sub(last.goodput);
    *last = now;
    delivered
}

fn add_gauges(s: &mut Sums, m: &AmstMetrics) {
    s.sessions += 1;
    if let Some(rtt) = m.rtt {
        s.rtt.0 += rtt.as_secs_f64();
        s.rtt.1 += 1;
    }
    if let Some(min) = m.min_rtt {
        let min = min.as_secs_f64();
        s.min_rtt = Some(s.min_rtt.map_or(min, |v| v.min(min)));
    }
    s.cwnd += m.cwnd.unwrap_or(0);
    s.pacing_rate += m.pacing_rate.unwrap_or(0);
    s.streams += m.streams as u64;
    s.chunk_size = s.chunk_size.max(m.chunk_size.unwrap_or(0));
    s.lost_outstanding += m.lost_outstanding.unwrap_or(0);
    s.credit_window += m.credit_window.unwrap_or(0);
    s.receive_held += m.receive_held_bytes;
    if let Some(v) = m.detector {
        let i = amst_core::Mode::ALL
            .iter()
            .position(|&mode| mode == v.candidate)
            .unwrap_or(0);
        s.verdicts[i] += 1;
        s.confidence.0 += v.confidence;
        s.confidence.1 += 1;
    }
}

fn set_gauges(key: &Key, s: &Sums, goodput: Option<f64>) {
    let labels = [("role", key.0.to_string()), ("transport", key.1.clone())];
    let set = |name: &'static str, v: f64| metrics::gauge!(name, &labels).set(v);
    if let Some(r) = goodput {
        set(family::GOODPUT, r);
    }
    let mean = |(sum, n): (f64, u32)| if n == 0 { 0.0 } else { sum / f64::from(n) };
    set(family::SESSIONS, s.sessions as f64);
    set(family::RTT, mean(s.rtt));
    set(family::MIN_RTT, s.min_rtt.unwrap_or(0.0));
    set(family::CWND, s.cwnd as f64);
    set(family::PACING_RATE, s.pacing_rate as f64);
    set(family::STREAMS, s.streams as f64);
    set(family::CHUNK_SIZE, s.chunk_size as f64);
    set(family::LOST_OUTSTANDING, s.lost_outstanding as f64);
    set(family::CREDIT_WINDOW, s.credit_window as f64);
    set(family::RECEIVE_HELD, s.receive_held as f64);
    set(family::DETECTOR_CONFIDENCE, mean(s.confidence));
    for (mode, n) in amst_core::Mode::ALL.iter().zip(s.verdicts) {
        let labels = [
            ("role", key.0.to_string()),
            ("transport", key.1.clone()),
            ("mode", mode.to_string()),
        ];
        metrics::gauge!(family::DETECTOR_VERDICT, &labels).set(n as f64);
    }
}

/// Keeps the counters current between scrapes and drains the histograms.
async fn upkeep(handle: PrometheusHandle, registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        refresh(&registry);
        n += 1;
        if n.is_multiple_of(5) {
            handle.run_upkeep();
        }
    }
}

/// The largest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8 << 10;

/// A minimal HTTP/1.1 server: `GET /metrics` answers the exposition, anything else 404.
async fn serve_http(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    registry: Arc<Registry>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let answer =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &handle, &registry));
            if let Ok(Err(e)) = answer.await {
                tracing::debug!("metrics request failed: {e}");
            }
        });
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    handle: &PrometheusHandle,
    registry: &Registry,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(p)) if p == b"/metrics" || p.starts_with(b"/metrics?") => {
            refresh(registry);
            ("200 OK", handle.render())
        }
        _ => ("404 Not Found", "only GET /metrics is served\n".to_string()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}
