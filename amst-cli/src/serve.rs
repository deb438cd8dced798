//! `amst serve`: accept sessions until Ctrl-C, one line per session, a summary at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use crate::backend::{self, Server, Settings};
use crate::cli::ServeArgs;
use crate::error::{CliResult, Failure, FailureKind};
use crate::run::Global;
use crate::size::{human_bits_per_sec, human_bytes};
use crate::transfer::{ReceiveOptions, Received, SessionReport, metric, receive_session};

/// The smallest `--memory-budget` accepted: a few sessions' guaranteed minimum windows, and a
/// quarter of it (the largest message a receiver holds) takes a 4 MiB message.
const MIN_MEMORY_BUDGET: u64 = 16 << 20;

/// How long sessions still running at Ctrl-C may take to finish.
const GRACE: Duration = Duration::from_secs(10);

/// One session, as `--json` prints it (one JSON object per line).
#[derive(Debug, Serialize)]
struct SessionLine<'a> {
    event: &'static str,
    session: u64,
    peer: &'a str,
    seconds: f64,
    transfers: Vec<TransferLine>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct TransferLine {
    name: String,
    kind: String,
    bytes: u64,
    seconds: f64,
    bits_per_second: f64,
    hash: &'static str,
    sha256: String,
    ok: bool,
    stored_as: Option<PathBuf>,
    error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    event: &'static str,
    sessions: u64,
    sessions_failed: u64,
    transfers_ok: u64,
    transfers_failed: u64,
    bytes: u64,
    seconds: f64,
}

/// Runs the server until Ctrl-C (or `--max-sessions`).
pub async fn run(args: ServeArgs, g: &Global) -> CliResult<()> {
    let psk = crate::psk::load(args.psk.psk_file.as_deref(), g.psk_env.as_deref())?;
    let output = match &args.output {
        Some(dir) => Some(prepare_output(dir)?),
        None => None,
    };
    let addr = backend::resolve(&args.listen).await?;
    let settings = Settings {
        psk,
        args: args.transport.clone(),
    };
    let budget = match args.memory_budget {
        Some(b) if b.0 < MIN_MEMORY_BUDGET => {
            return Err(Failure::usage(format!(
                "--memory-budget {} is too small: at least {} (a few sessions' guaranteed \
                 minimum windows; a quarter of it is the largest message a session may send)",
                human_bytes(b.0),
                human_bytes(MIN_MEMORY_BUDGET)
            )));
        }
        Some(b) => amst_core::MemoryBudget::new(b.0),
        None => amst_core::MemoryBudget::process(),
    };
    crate::telemetry::watch_budget(&budget);
    let server = Server::bind(addr, &settings, budget).await?;
    let opts = Arc::new(ReceiveOptions {
        output: output.clone(),
    });
    let where_to = output
        .as_deref()
        .map_or("discarding data after verifying it".to_string(), |d| {
            format!("storing files in {}", d.display())
        });
    say(
        g,
        &format!(
            "amst serve: listening on {} ({}, mode {}), {where_to}; Ctrl-C to stop",
            server.local_addr(),
            backend::ENGINE,
            args.transport.mode.as_str()
        ),
    );
    if g.json {
        crate::stdout::line(
            serde_json::json!({"event": "listening", "addr": server.local_addr().to_string()}),
        );
    }
    let started = Instant::now();
    let mut summary = Summary {
        event: "summary",
        ..Summary::default()
    };
    let mut sessions: JoinSet<(u64, String, Duration, SessionReport)> = JoinSet::new();
    let mut accepted = 0u64;
    let ctrl_c = stop_signal();
    tokio::pin!(ctrl_c);
    let limit = args.max_sessions.unwrap_or(u64::MAX);
    loop {
        if accepted >= limit && sessions.is_empty() {
            break;
        }
        tokio::select! {
            _ = &mut ctrl_c => {
                say(g, "amst serve: Ctrl-C or SIGTERM, not accepting new sessions");
                break;
            }
            acc = server.accept(), if accepted < limit => match acc {
                Ok(a) => {
                    accepted += 1;
                    metrics::counter!(metric::SESSIONS).increment(1);
                    tracing::info!(session = accepted, peer = %a.peer, "session accepted");
                    if let Some(w) = backend::rdma_fallback(&args.transport, &a.link.stats()) {
                        if g.json {
                            let line = serde_json::json!(
                                {"event": "warning", "session": accepted, "message": w}
                            );
                            crate::stdout::line(line);
                        } else {
                            crate::stdout::err_line(format_args!("amst serve: [{accepted:>3}] {}: {w}", a.peer));
                        }
                    }
                    let opts = opts.clone();
                    let id = accepted;
                    sessions.spawn(async move {
                        let t = Instant::now();
                        let r = serve_session(a.link, &a.peer, &opts).await;
                        (id, a.peer, t.elapsed(), r)
                    });
                }
                Err(f) => {
                    tracing::warn!("{f}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(done) = sessions.join_next() => {
                if let Ok((id, peer, t, r)) = done {
                    report_session(g, &mut summary, id, &peer, t, &r);
                }
            }
        }
    }
    drop(server);
    if !sessions.is_empty() {
        say(
            g,
            &format!(
                "amst serve: waiting up to {GRACE:?} for {} running session(s); Ctrl-C again to abort",
                sessions.len()
            ),
        );
        let deadline = tokio::time::sleep(GRACE);
        tokio::pin!(deadline);
        let again = stop_signal();
        tokio::pin!(again);
        while !sessions.is_empty() {
            tokio::select! {
                Some(done) = sessions.join_next() => {
                    if let Ok((id, peer, t, r)) = done {
                        report_session(g, &mut summary, id, &peer, t, &r);
                    }
                }
                _ = &mut deadline => break,
                _ = &mut again => break,
            }
        }
        let aborted = sessions.len() as u64;
        sessions.abort_all();
        summary.sessions += aborted;
        summary.sessions_failed += aborted;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    if g.json {
        crate::stdout::line(serde_json::to_string(&summary).expect("serialises"));
    } else {
        crate::stdout::line(format_args!(
            "amst serve: {} session(s) ({} failed), {} transfer(s) ok, {} failed, {} received in {:.1} s",
            summary.sessions,
            summary.sessions_failed,
            summary.transfers_ok,
            summary.transfers_failed,
            human_bytes(summary.bytes),
            summary.seconds
        ));
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (what `kill`, systemd and container runtimes send) and
/// names which. `amst serve` stops accepting and lets running sessions drain; partial tree
/// files stay resumable.
pub(crate) async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "Ctrl-C",
                _ = term.recv() => "SIGTERM",
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

/// Reads a session's first message to tell a tree (amst-files) from a single stream (stdin
/// or generated data), and hands the session to the right receiver.
async fn serve_session(
    link: Arc<dyn crate::link::Link>,
    peer: &str,
    opts: &ReceiveOptions,
) -> SessionReport {
    let first = match link.recv().await {
        Ok(Some(m)) => m,
        Ok(None) => return SessionReport::default(),
        Err(e) => {
            return SessionReport {
                transfers: Vec::new(),
                error: Some(Failure::from_link(&format!("receiving from {peer}"), &e)),
            };
        }
    };
    if amst_files::is_tree_message(&first) {
        let progress = Arc::new(amst_files::ReceiveProgress::default());
        return crate::tree::receive(link, first, opts.output.as_deref(), peer, progress).await;
    }
    let link = crate::tree::Prefetched::new(link, first);
    let bytes = AtomicU64::new(0);
    receive_session(&link, peer, opts, &bytes).await
}

fn say(g: &Global, line: &str) {
    if g.json {
        crate::stdout::err_line(format_args!("{line}"));
    } else {
        crate::stdout::line(line);
    }
}

fn prepare_output(dir: &Path) -> CliResult<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Failure::new(
            FailureKind::Disk,
            format!("cannot create the output directory {}: {e}", dir.display()),
        )
    })?;
    // Prove now that we can write there, rather than failing on the first transfer.
    let probe = dir.join(format!(
        ".amst-write-test-{}",
        crate::protocol::hex(&amst_core::codec::random_bytes::<6>())
    ));
    std::fs::write(&probe, b"").map_err(|e| {
        Failure::new(
            FailureKind::Disk,
            format!(
                "cannot write to the output directory {}: {e}",
                dir.display()
            ),
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    dir.canonicalize().map_err(|e| {
        Failure::new(
            FailureKind::Disk,
            format!("cannot resolve the output directory {}: {e}", dir.display()),
        )
    })
}

fn report_session(
    g: &Global,
    summary: &mut Summary,
    id: u64,
    peer: &str,
    elapsed: Duration,
    r: &SessionReport,
) {
    summary.sessions += 1;
    let failed_session = r.error.is_some() || r.transfers.iter().any(|t| t.result.is_err());
    if failed_session {
        summary.sessions_failed += 1;
    }
    for t in &r.transfers {
        if t.result.is_ok() {
            summary.transfers_ok += 1;
            summary.bytes += t.bytes;
        } else {
            summary.transfers_failed += 1;
        }
    }
    if g.json {
        let line = SessionLine {
            event: "session",
            session: id,
            peer,
            seconds: elapsed.as_secs_f64(),
            transfers: r.transfers.iter().map(transfer_line).collect(),
            error: r.error.as_ref().map(|f| f.message.clone()),
        };
        crate::stdout::line(serde_json::to_string(&line).expect("serialises"));
        return;
    }
    let mut parts: Vec<String> = r.transfers.iter().map(describe).collect();
    if let Some(e) = &r.error {
        parts.push(format!("session error: {e}"));
    }
    if parts.is_empty() {
        parts.push("no transfers".into());
    }
    crate::stdout::line(format_args!("[{id:>3}] {peer}: {}", parts.join("; ")));
}

fn transfer_line(t: &Received) -> TransferLine {
    let secs = t.elapsed.as_secs_f64().max(1e-9);
    TransferLine {
        name: t.name.clone(),
        kind: format!("{:?}", t.kind).to_lowercase(),
        bytes: t.bytes,
        seconds: secs,
        bits_per_second: t.bytes as f64 * 8.0 / secs,
        hash: t.hash,
        sha256: t.sha256.clone(),
        ok: t.result.is_ok(),
        stored_as: t.stored_as.clone(),
        error: t.result.as_ref().err().map(|f| f.message.clone()),
    }
}

fn describe(t: &Received) -> String {
    let secs = t.elapsed.as_secs_f64().max(1e-9);
    match &t.result {
        Ok(()) => {
            let dest = t
                .stored_as
                .as_ref()
                .map_or("discarded".to_string(), |p| format!("→ {}", p.display()));
            let check = if t.sha256.is_empty() {
                format!("{} per block and file", t.hash)
            } else {
                format!("{} {}…", t.hash, &t.sha256[..t.sha256.len().min(16)])
            };
            format!(
                "{:?} {} in {:.2} s ({}), {check} ok, {dest}",
                t.name,
                human_bytes(t.bytes),
                secs,
                human_bits_per_sec(t.bytes as f64 / secs),
            )
        }
        Err(f) => format!(
            "{:?} FAILED after {} in {:.2} s: {f}",
            t.name,
            human_bytes(t.bytes),
            secs
        ),
    }
}
