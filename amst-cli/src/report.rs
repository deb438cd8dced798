//! The final report of `amst send` and `amst demo`: a human table on stdout, or with
//! `--json` one JSON object in the spirit of `iperf3 -J`. The schema is documented in the
//! README and versioned by [`SCHEMA`]; fields are only ever added.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::Failure;
use crate::progress::{Interval, Observations, Switch};
use crate::size::{human_bits_per_sec, human_bytes};

/// The schema name and version in every JSON report.
pub const SCHEMA: &str = "amst-report/1";

/// A whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// What was asked.
    pub start: Start,
    /// One entry per second.
    pub intervals: Vec<Interval>,
    /// The summary, when the transfer finished.
    pub end: Option<End>,
    /// Why it failed, when it did.
    pub error: Option<ErrorReport>,
    /// What the session could not do as asked, e.g. `--transport rdma` running on TCP. In the
    /// human output these go to stderr as they happen instead.
    pub warnings: Vec<String>,
    /// For files and directories (`amst send PEER PATH...`): the tree's outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tree: Option<TreeEnd>,
}

/// How a tree transfer ended.
#[derive(Clone, Debug, Serialize, Default)]
pub struct TreeEnd {
    /// The hash of files and blocks: always `blake3` (`b3sum` checks a file by hand).
    pub hash: &'static str,
    /// Entries in the tree (files, directories, links).
    pub entries: u64,
    /// Entries stored.
    pub stored: u64,
    /// Files skipped because the receiver had them, identical.
    pub identical: u64,
    /// Entries that failed.
    pub failed: u64,
    /// Bytes in all files of the tree.
    pub tree_bytes: u64,
    /// File bytes sent: less than `tree_bytes` by what resume, holes and identical files saved.
    pub data_bytes_sent: u64,
    /// Blocks resumed from an earlier try.
    pub blocks_resumed: u64,
    /// Each failed entry and why.
    pub failures: Vec<TreeFailure>,
    /// Each stored file and its BLAKE3, hex.
    pub files: Vec<TreeFile>,
}

/// One failed entry.
#[derive(Clone, Debug, Serialize)]
pub struct TreeFailure {
    /// Its path below the output directory.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// One stored file.
#[derive(Clone, Debug, Serialize)]
pub struct TreeFile {
    /// Its path below the output directory.
    pub path: String,
    /// BLAKE3, hex, as `b3sum` prints it.
    pub blake3: String,
}

/// What was asked, before any byte moved.
#[derive(Clone, Debug, Serialize)]
pub struct Start {
    /// Seconds since the Unix epoch.
    pub timestamp: u64,
    /// `amst` version.
    pub version: &'static str,
    /// `send` or `demo`.
    pub command: String,
    /// The peer address.
    pub peer: String,
    /// What was sent.
    pub name: String,
    /// Size announced, when known.
    pub size: Option<u64>,
    /// `file` or `generated`.
    pub kind: String,
    /// The options that shape the transfer.
    pub config: ConfigReport,
}

/// The transport options asked for on the command line.
#[derive(Clone, Debug, Serialize, Default)]
pub struct ConfigReport {
    /// `auto`, `datacenter`, `internet` or `hybrid`.
    pub mode: String,
    /// `tcp`, `quic` or `rdma`.
    pub transport: String,
    /// Streams asked for, if set.
    pub streams: Option<usize>,
    /// `bbr` or `cubic`, if set.
    pub cc: Option<String>,
    /// Chunk size asked for, if set.
    pub chunk: Option<u64>,
    /// The application rate limit, bytes/s, if set.
    pub rate: Option<u64>,
    /// `--aggressive`: the internet profile's TCP streams compete as separate flows (no
    /// shared in-flight cap), taking more than one flow's share of a shared path.
    pub aggressive: bool,
    /// Which library carried the session: `amst-hybrid` or `amst-tcp`.
    pub engine: String,
}

/// The summary of a finished transfer.
#[derive(Clone, Debug, Serialize)]
pub struct End {
    /// Data bytes moved.
    pub bytes: u64,
    /// Seconds from the first byte to the receiver's verdict.
    pub seconds: f64,
    /// Goodput: data bits per second.
    pub bits_per_second: f64,
    /// The mode at the start.
    pub mode_start: String,
    /// The mode at the end.
    pub mode: String,
    /// The transport at the end.
    pub transport: String,
    /// Streams at the end.
    pub streams: usize,
    /// Chunks retransmitted.
    pub retransmits: u64,
    /// Mode switches.
    pub mode_switches: u64,
    /// Each switch.
    pub switches: Vec<Switch>,
    /// Smallest RTT seen, microseconds.
    pub rtt_min_us: Option<u64>,
    /// Mean smoothed RTT, microseconds.
    pub rtt_avg_us: Option<u64>,
    /// SHA-256 of the data, hex.
    pub sha256: String,
    /// The receiver computed the same SHA-256.
    pub verified: bool,
    /// The file name the receiver stored, if it stored one.
    pub stored_as: Option<String>,
}

/// A failure, in the report.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorReport {
    /// `network`, `auth`, `integrity`, `disk`, `input`, `usage`, `interrupted` or `other`.
    pub kind: &'static str,
    /// The sentence also printed on stderr.
    pub message: String,
    /// The process exit code.
    pub exit_code: u8,
}

impl From<&Failure> for ErrorReport {
    fn from(f: &Failure) -> Self {
        ErrorReport {
            kind: f.kind.as_str(),
            message: f.message.clone(),
            exit_code: f.kind.exit_code(),
        }
    }
}

/// The report of the command running now, as it stood when the transfer began: what
/// `amst send --json` prints, with the error, if a signal stops it before it ends.
static IN_PROGRESS: std::sync::Mutex<Option<Report>> = std::sync::Mutex::new(None);

/// Keeps `report` to print should the command be interrupted.
pub fn set_in_progress(report: &Report) {
    if let Ok(mut slot) = IN_PROGRESS.lock() {
        *slot = Some(report.clone());
    }
}

/// The report kept by [`set_in_progress`], if any.
pub fn take_in_progress() -> Option<Report> {
    IN_PROGRESS.lock().ok().and_then(|mut slot| slot.take())
}

/// Seconds since the epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl End {
    /// The summary from the observer's samples and the transfer's result.
    pub fn new(
        obs: &Observations,
        bytes: u64,
        elapsed: Duration,
        sha256: String,
        stored_as: Option<String>,
    ) -> End {
        let secs = elapsed.as_secs_f64().max(1e-9);
        End {
            bytes,
            seconds: secs,
            bits_per_second: bytes as f64 * 8.0 / secs,
            mode_start: obs.first_mode.to_string(),
            mode: obs.last.mode.to_string(),
            transport: obs.last.transport.to_string(),
            streams: obs.last.streams,
            retransmits: obs.last.retransmits,
            mode_switches: obs.last.mode_switches.max(obs.switches.len() as u64),
            switches: obs.switches.clone(),
            rtt_min_us: obs.rtt_min.map(|d| d.as_micros() as u64),
            rtt_avg_us: obs.rtt_avg.map(|d| d.as_micros() as u64),
            sha256,
            verified: true,
            stored_as,
        }
    }
}

/// The report's `fairness` row with `--aggressive` (without it the session is one flow
/// toward others, the default, and no row is printed).
const AGGRESSIVE: &str = "aggressive (--aggressive): the internet profile's TCP streams compete as separate flows, with no shared in-flight cap, and take more than one flow's share of a shared path";

fn ms(us: Option<u64>) -> String {
    us.map_or("not measured".into(), |us| {
        format!("{:.3} ms", us as f64 / 1e3)
    })
}

impl Report {
    /// The report as the human table.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let s = &self.start;
        let size = s
            .size
            .map(|n| format!(" ({})", human_bytes(n)))
            .unwrap_or_default();
        out.push_str(&format!(
            "amst {}: {}{size} to {} [{}]\n",
            s.command, s.name, s.peer, s.config.engine
        ));
        if let Some(e) = &self.end {
            let mode = if e.mode_start == e.mode {
                e.mode.clone()
            } else {
                format!("{} → {}", e.mode_start, e.mode)
            };
            let switches = if e.switches.is_empty() {
                format!("{}", e.mode_switches)
            } else {
                let each: Vec<String> = e
                    .switches
                    .iter()
                    .map(|w| {
                        let took = w
                            .duration_ms
                            .map(|d| format!(", took {d:.1} ms"))
                            .unwrap_or_default();
                        format!("{} → {} at {}{took}", w.from, w.to, human_bytes(w.at_bytes))
                    })
                    .collect();
                format!("{} ({})", e.mode_switches, each.join("; "))
            };
            let rows = [
                ("bytes", format!("{} ({})", e.bytes, human_bytes(e.bytes))),
                ("time", format!("{:.3} s", e.seconds)),
                (
                    "goodput",
                    format!(
                        "{} ({}/s)",
                        human_bits_per_sec(e.bits_per_second / 8.0),
                        human_bytes((e.bits_per_second / 8.0) as u64)
                    ),
                ),
                ("mode", format!("{mode} (asked: {})", s.config.mode)),
                ("transport", e.transport.clone()),
                ("streams", e.streams.to_string()),
                ("retransmits", format!("{} chunks", e.retransmits)),
                ("mode switches", switches),
                (
                    "rtt",
                    format!("min {}, avg {}", ms(e.rtt_min_us), ms(e.rtt_avg_us)),
                ),
                (
                    "sha256",
                    format!(
                        "{} ({})",
                        e.sha256,
                        if e.verified {
                            "verified by the receiver"
                        } else {
                            "NOT verified"
                        }
                    ),
                ),
            ];
            for (k, v) in rows {
                if k == "sha256" && self.tree.is_some() {
                    continue;
                }
                out.push_str(&format!("  {k:<14} {v}\n"));
                if k == "transport" && s.config.aggressive {
                    out.push_str(&format!("  {:<14} {AGGRESSIVE}\n", "fairness"));
                }
            }
            if let Some(t) = &self.tree {
                out.push_str(&format!(
                    "  {:<14} {}: {} stored, {} identical (skipped), {} failed\n",
                    "tree",
                    entries(t.entries),
                    t.stored,
                    t.identical,
                    t.failed
                ));
                out.push_str(&format!(
                    "  {:<14} {} of {} on the wire ({} blocks resumed)\n",
                    "file data",
                    human_bytes(t.data_bytes_sent),
                    human_bytes(t.tree_bytes),
                    t.blocks_resumed
                ));
                out.push_str(&format!(
                    "  {:<14} blake3 per block and per file, verified by the receiver\n",
                    "integrity"
                ));
                if t.files.len() == 1 {
                    out.push_str(&format!("  {:<14} {}\n", "blake3", t.files[0].blake3));
                }
                for f in t.failures.iter().take(20) {
                    out.push_str(&format!("  {:<14} {}: {}\n", "FAILED", f.path, f.reason));
                }
                if t.failures.len() > 20 {
                    out.push_str(&format!(
                        "  {:<14} ... and {} more\n",
                        "",
                        t.failures.len() - 20
                    ));
                }
            }
            if let Some(name) = &e.stored_as {
                out.push_str(&format!("  {:<14} {name}\n", "stored as"));
            }
        }
        if let Some(err) = &self.error {
            out.push_str(&format!("  {:<14} {}\n", "error", err.message));
        }
        out
    }

    /// The report as pretty JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report always serialises")
    }
}

/// "1 entry", "204 entries".
pub fn entries(n: u64) -> String {
    if n == 1 {
        "1 entry".into()
    } else {
        format!("{n} entries")
    }
}
