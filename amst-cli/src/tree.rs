//! Files and directories: `amst send PEER PATH...` and what `amst serve --output` does with
//! them, through amst-files (trees, small-file batches, sparse files, resume, BLAKE3).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use amst_core::{BoxFuture, Mode};
use amst_files::protocol::Outcome;
use amst_files::{
    Channel, ChannelError, ExistingPolicy, ReceiveOptions, ReceiveProgress, SendOptions,
    SendProgress, Tree,
};
use bytes::Bytes;

use crate::backend::{self, Settings};
use crate::cli::{ExistingArg, SendArgs};
use crate::error::{CliResult, Failure, FailureKind};
use crate::link::{self, Link, LinkStats};
use crate::progress::{Display, Observer};
use crate::protocol::Kind;
use crate::report::{End, Report, SCHEMA, Start, TreeEnd, TreeFailure, TreeFile, now_unix};
use crate::run::Global;
use crate::send::{config_report, fail, print_report};
use crate::transfer::{Received, SessionReport};

/// A [`Link`] as amst-files' [`Channel`].
#[derive(Debug, Clone)]
pub struct LinkChannel(pub Arc<dyn Link>);

impl Channel for LinkChannel {
    fn send(&self, message: Bytes) -> amst_files::BoxFuture<'_, Result<(), ChannelError>> {
        self.0.send(message)
    }

    fn recv(&self) -> amst_files::BoxFuture<'_, Result<Option<Bytes>, ChannelError>> {
        self.0.recv()
    }

    fn flush(&self) -> amst_files::BoxFuture<'_, Result<(), ChannelError>> {
        self.0.flush()
    }

    fn close(&self) -> amst_files::BoxFuture<'_, Result<(), ChannelError>> {
        self.0.close()
    }
}

/// A [`Link`] whose first message the server already read, to tell a tree from a single
/// stream; `recv` hands it out again first.
#[derive(Debug)]
pub struct Prefetched {
    inner: Arc<dyn Link>,
    first: Mutex<Option<Bytes>>,
}

impl Prefetched {
    /// Puts `first` back in front of `inner`'s messages.
    pub fn new(inner: Arc<dyn Link>, first: Bytes) -> Self {
        Prefetched {
            inner,
            first: Mutex::new(Some(first)),
        }
    }
}

impl Link for Prefetched {
    fn send(&self, message: Bytes) -> BoxFuture<'_, link::Result<()>> {
        self.inner.send(message)
    }

    fn flush(&self) -> BoxFuture<'_, link::Result<()>> {
        self.inner.flush()
    }

    fn recv(&self) -> BoxFuture<'_, link::Result<Option<Bytes>>> {
        if let Some(first) = self.first.lock().expect("not poisoned").take() {
            return Box::pin(async move { Ok(Some(first)) });
        }
        self.inner.recv()
    }

    fn close(&self) -> BoxFuture<'_, link::Result<()>> {
        self.inner.close()
    }

    fn stats(&self) -> LinkStats {
        self.inner.stats()
    }

    fn force_mode(&self, mode: Mode) -> BoxFuture<'_, Result<(), String>> {
        self.inner.force_mode(mode)
    }
}

fn policy(a: ExistingArg) -> ExistingPolicy {
    match a {
        ExistingArg::Skip => ExistingPolicy::Skip,
        ExistingArg::Overwrite => ExistingPolicy::Overwrite,
        ExistingArg::Refuse => ExistingPolicy::Refuse,
    }
}

fn files_failure(e: amst_files::Error) -> Failure {
    match e {
        amst_files::Error::Input { path, source } => {
            let why = match source.kind() {
                std::io::ErrorKind::NotFound => "no such file".to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                _ => source.to_string(),
            };
            Failure::new(
                FailureKind::Input,
                format!("cannot read {}: {why}", path.display()),
            )
        }
        amst_files::Error::Usage(m) => Failure::usage(m),
        amst_files::Error::Output { .. } => Failure::new(FailureKind::Disk, e.to_string()),
        amst_files::Error::Channel { doing, source } => Failure::from_link(doing, &source),
        other => Failure::new(FailureKind::Network, other.to_string()),
    }
}

/// `amst send PEER PATH...` for files and directories.
pub async fn send(args: &SendArgs, paths: &[PathBuf], g: &Global) -> CliResult<()> {
    if args.rate.is_some() {
        return Err(Failure::usage(
            "--rate limits stdin (-) or generated data (--size); sending files and \
             directories is not rate-limited yet",
        ));
    }
    // A missing path is reported before any network activity.
    for path in paths {
        std::fs::symlink_metadata(path).map_err(|source| {
            files_failure(amst_files::Error::Input {
                path: path.clone(),
                source,
            })
        })?;
    }
    let psk = crate::psk::load(args.psk.psk_file.as_deref(), g.psk_env.as_deref())?;
    let peer = backend::resolve(&args.peer).await?;
    let settings = Settings {
        psk,
        args: args.transport.clone(),
    };
    // The walk and the connection overlap: 10,000 small files took 33 ms to walk, an eighth
    // of the whole transfer when it came first.
    let walking = tokio::task::spawn_blocking({
        let paths = paths.to_vec();
        move || Tree::scan(&paths)
    });
    let (walked, connected) = tokio::join!(walking, backend::connect_local_aware(peer, &settings));
    let tree = walked
        .map_err(|e| Failure::new(FailureKind::Input, format!("walking the paths: {e}")))?
        .map_err(files_failure)?;
    let name = match paths {
        [one] => one.display().to_string(),
        many => format!("{} paths", many.len()),
    };
    let mut report = Report {
        schema: SCHEMA,
        start: Start {
            timestamp: now_unix(),
            version: env!("CARGO_PKG_VERSION"),
            command: "send".into(),
            peer: peer.to_string(),
            name: name.clone(),
            size: Some(tree.bytes),
            kind: "tree".into(),
            config: config_report(&args.transport, None),
        },
        intervals: Vec::new(),
        end: None,
        error: None,
        warnings: tree
            .skipped
            .iter()
            .map(|p| format!("{} is not a file, directory or link; left out", p.display()))
            .collect(),
        tree: None,
    };
    crate::report::set_in_progress(&report);
    if !g.json {
        for w in &report.warnings {
            crate::stdout::err_line(format_args!("amst: {w}"));
        }
    }
    let link = match connected {
        Ok(l) => l,
        Err(f) => return Err(fail(g, report, f)),
    };
    // The session ends before the last sample, which then shows no streams: the report
    // names the most seen while it ran.
    let streams_at_start = link.stats().streams;
    if let Some(w) = backend::rdma_fallback(&args.transport, &link.stats()) {
        if g.json {
            report.warnings.push(w);
        } else {
            crate::stdout::err_line(format_args!("amst: {w}"));
        }
    }
    let opts = SendOptions {
        policy: policy(args.existing),
        resume: !args.no_resume,
        ..SendOptions::default()
    };
    let progress = Arc::new(SendProgress::default());
    let display = Display::choose(g.quiet || g.json);
    let observer = Observer::start(
        link.clone(),
        progress.bytes.clone(),
        Some(tree.bytes),
        display,
        format!("{name} → {peer}"),
    );
    let ch: Arc<dyn Channel> = Arc::new(LinkChannel(link.clone()));
    let r = amst_files::send_tree(ch, tree, &opts, progress.clone()).await;
    let obs = observer.finish().await;
    report.intervals = obs.intervals.clone();
    let _ = link.close().await;
    let r = match r {
        Ok(r) => r,
        Err(e) => return Err(fail(g, report, files_failure(e))),
    };
    let mut t = TreeEnd {
        hash: "blake3",
        entries: r.entries.len() as u64,
        stored: r.finished.stored,
        identical: r.finished.identical,
        failed: r.finished.failed,
        tree_bytes: r.tree_bytes,
        data_bytes_sent: r.data_bytes_sent,
        blocks_resumed: r.blocks_resumed,
        ..TreeEnd::default()
    };
    for e in &r.entries {
        match &e.outcome {
            Outcome::Stored { hash } if *hash != [0; 32] => {
                t.files.push(TreeFile {
                    path: e.path.clone(),
                    blake3: amst_files::hash::hex(hash),
                });
            }
            Outcome::Failed { reason } => t.failures.push(TreeFailure {
                path: e.path.clone(),
                reason: reason.clone(),
            }),
            _ => {}
        }
    }
    let failed = t.failed;
    // A single file reads like before: which name it was stored as.
    let stored_as = match t.files.as_slice() {
        [one] if r.entries.len() == 1 => Some(one.path.clone()),
        _ => None,
    };
    let mut end = End::new(&obs, r.data_bytes_sent, r.elapsed, String::new(), stored_as);
    end.streams = obs
        .intervals
        .iter()
        .map(|i| i.streams)
        .chain([streams_at_start, end.streams])
        .max()
        .unwrap_or(0);
    report.end = Some(end);
    report.tree = Some(t);
    if failed > 0 {
        let first = report
            .tree
            .as_ref()
            .and_then(|t| t.failures.first())
            .map(|f| format!("{}: {}", f.path, f.reason))
            .unwrap_or_default();
        let kind = if first.contains(amst_files::receive::DISK_FULL) {
            FailureKind::Disk
        } else {
            FailureKind::Other
        };
        let f = Failure::new(
            kind,
            format!(
                "{failed} of {} entries were not stored (first: {first})",
                r.entries.len()
            ),
        );
        if !g.json {
            print_report(g, &report);
        }
        return Err(fail(g, report, f));
    }
    print_report(g, &report);
    Ok(())
}

/// How long a superseded session may take to say goodbye before it is dropped.
const SUPERSEDED_CLOSE: std::time::Duration = std::time::Duration::from_millis(500);

/// Receives a tree whose first message is `first`, for `amst serve`.
pub async fn receive(
    link: Arc<dyn Link>,
    first: Bytes,
    output: Option<&Path>,
    peer: &str,
    progress: Arc<ReceiveProgress>,
) -> SessionReport {
    let started = Instant::now();
    let ch: Arc<dyn Channel> = Arc::new(LinkChannel(link.clone()));
    let Some(output) = output else {
        let why = "this server runs with --discard and stores no files; start it with --output DIR";
        let _ = ch
            .send(amst_files::protocol::Message::Abort(why.into()).encode())
            .await;
        let _ = link.flush().await;
        return SessionReport {
            transfers: Vec::new(),
            error: Some(Failure::usage(format!("{peer} sent a tree: {why}"))),
        };
    };
    let opts = ReceiveOptions::new(output);
    let r = amst_files::receive_tree(ch, first, &opts, progress.clone()).await;
    let bytes = progress.bytes.load(Ordering::Relaxed);
    if matches!(r, Err(amst_files::Error::Superseded)) {
        // Its sender is gone (a newer session took over): a goodbye would wait for a peer
        // that cannot answer until the transport's reconnect timeout.
        let _ = tokio::time::timeout(SUPERSEDED_CLOSE, link.close()).await;
    } else {
        let _ = link.close().await;
    }
    match r {
        Ok(r) => {
            let failures: Vec<String> = r
                .entries
                .iter()
                .filter_map(|(p, o)| match o {
                    Outcome::Failed { reason } => Some(format!("{p}: {reason}")),
                    _ => None,
                })
                .collect();
            let result = if failures.is_empty() {
                Ok(())
            } else {
                Err(Failure::new(
                    FailureKind::Other,
                    format!("{} entries failed (first: {})", failures.len(), failures[0]),
                ))
            };
            SessionReport {
                transfers: vec![Received {
                    name: format!(
                        "tree: {}, {} stored, {} identical, {} failed",
                        crate::report::entries(r.entries.len() as u64),
                        r.finished.stored,
                        r.finished.identical,
                        r.finished.failed
                    ),
                    kind: Kind::File,
                    stored_as: Some(output.to_path_buf()),
                    bytes,
                    hash: "blake3",
                    sha256: String::new(),
                    elapsed: started.elapsed(),
                    result,
                }],
                error: None,
            }
        }
        Err(e) => SessionReport {
            transfers: Vec::new(),
            error: Some(Failure::new(
                FailureKind::Network,
                format!(
                    "tree transfer stopped after {bytes} bytes: {e}; partial files stay \
                     resumable"
                ),
            )),
        },
    }
}
