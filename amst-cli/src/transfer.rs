//! Both ends of a transfer over a [`Link`]: [`send_transfer`] for `amst send` and
//! [`receive_session`] for `amst serve`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::error::{CliResult, Failure, FailureKind};
use crate::link::Link;
use crate::protocol::{FILE_PROTOCOL_VERSION, Header, Kind, Message, Receipt, Trailer, hex};
use crate::sink::{Finished, Sink};
use crate::source::{OpenSource, Piece};

/// Counter names, shared with the README's metrics table.
pub mod metric {
    /// Data bytes the sender handed to AMST.
    pub const SENT_BYTES: &str = "amst_cli_sent_bytes_total";
    /// Data bytes the receiver got from AMST.
    pub const RECEIVED_BYTES: &str = "amst_cli_received_bytes_total";
    /// Transfers finished, by `result` (`ok` or the failure kind).
    pub const TRANSFERS: &str = "amst_cli_transfers_total";
    /// Sessions accepted by `amst serve`.
    pub const SESSIONS: &str = "amst_cli_sessions_total";
}

/// How `amst send` paces and waits.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Bytes per Data message.
    pub piece: usize,
    /// Limit on the application send rate, bytes per second.
    pub rate: Option<u64>,
    /// How long to wait for the receiver's verdict after the last byte is acknowledged.
    pub receipt_timeout: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            piece: crate::source::DEFAULT_PIECE,
            rate: None,
            receipt_timeout: Duration::from_secs(120),
        }
    }
}

/// What a finished `send` knows.
#[derive(Clone, Debug)]
pub struct SendOutcome {
    /// Data bytes sent.
    pub bytes: u64,
    /// Their SHA-256, which the receiver confirmed.
    pub sha256: [u8; 32],
    /// The receiver's verdict.
    pub receipt: Receipt,
    /// From the Header to the Receipt.
    pub elapsed: Duration,
}

type Control = JoinHandle<CliResult<Receipt>>;

/// Sends one transfer and waits for the receiver to confirm the checksum. `progress` counts
/// data bytes accepted by AMST, for the progress display.
pub async fn send_transfer(
    link: &Arc<dyn Link>,
    peer: &str,
    source: OpenSource,
    opts: &SendOptions,
    progress: &AtomicU64,
) -> CliResult<SendOutcome> {
    let start = Instant::now();
    let mut control: Control = tokio::spawn({
        let link = link.clone();
        let peer = peer.to_string();
        async move { next_receipt(&*link, &peer).await }
    });
    let doing = format!("sending to {peer}");
    let header = Message::Header(source.header.clone()).encode();
    send_or_explain(link, header, &mut control, &doing).await?;
    let mut pieces = source.stream(opts.piece);
    let mut sent = 0u64;
    let (bytes, sha256) = loop {
        let Some(piece) = pieces.recv().await else {
            return Err(Failure::new(
                FailureKind::Other,
                "the reader thread stopped",
            ));
        };
        match piece {
            Piece::Data(msg, n) => {
                if let Some(rate) = opts.rate.filter(|&r| r > 0) {
                    let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                send_or_explain(link, msg, &mut control, &doing).await?;
                sent += n as u64;
                progress.fetch_add(n as u64, Ordering::Relaxed);
                metrics::counter!(metric::SENT_BYTES).increment(n as u64);
            }
            Piece::Done(bytes, sha) => break (bytes, sha),
            Piece::Failed(f) => {
                let _ = link.send(Message::Abort(f.message.clone()).encode()).await;
                let _ = link.flush().await;
                control.abort();
                return Err(f);
            }
        }
    };
    let trailer = Message::Trailer(Trailer { bytes, sha256 }).encode();
    // From here on the verdict may arrive at any moment, even before our own send or flush
    // returns: whichever comes first, a verdict ends the wait.
    let early = tokio::select! {
        biased;
        r = &mut control => Some(joined(r)?),
        r = link.send(trailer) => match r {
            Ok(()) => None,
            Err(e) => return Err(explain(Failure::from_link(&doing, &e), &mut control).await),
        },
    };
    let early = match early {
        Some(r) => Some(r),
        None => tokio::select! {
            biased;
            r = &mut control => Some(joined(r)?),
            r = link.flush() => match r {
                Ok(()) => None,
                Err(e) => return Err(explain(Failure::from_link(&doing, &e), &mut control).await),
            },
        },
    };
    let receipt = match early {
        Some(r) => r,
        None => match tokio::time::timeout(opts.receipt_timeout, &mut control).await {
            Ok(r) => joined(r)?,
            Err(_) => {
                control.abort();
                return Err(Failure::new(
                    FailureKind::Network,
                    format!(
                        "{peer} acknowledged every byte but sent no verdict within {:?}",
                        opts.receipt_timeout
                    ),
                ));
            }
        },
    };
    check_receipt(&receipt, bytes, &sha256)?;
    Ok(SendOutcome {
        bytes,
        sha256,
        receipt,
        elapsed: start.elapsed(),
    })
}

/// Sends, unless the receiver has already given its verdict (a full disk): then that
/// verdict is the error, since it says more than the broken connection that follows it.
async fn send_or_explain(
    link: &Arc<dyn Link>,
    msg: Bytes,
    control: &mut Control,
    doing: &str,
) -> CliResult<()> {
    tokio::select! {
        biased;
        r = &mut *control => Err(early_receipt(r)),
        r = link.send(msg) => match r {
            Ok(()) => Ok(()),
            Err(e) => Err(explain(Failure::from_link(doing, &e), control).await),
        },
    }
}

/// A send failed; if the receiver said why just before, use its reason.
async fn explain(fallback: Failure, control: &mut Control) -> Failure {
    match tokio::time::timeout(Duration::from_secs(2), &mut *control).await {
        Ok(Ok(Ok(r))) if !r.ok => receipt_failure(&r),
        Ok(Ok(Err(f))) if f.kind != FailureKind::Network => f,
        _ => fallback,
    }
}

fn early_receipt(r: Result<CliResult<Receipt>, tokio::task::JoinError>) -> Failure {
    match joined(r) {
        Ok(r) if !r.ok => receipt_failure(&r),
        Ok(_) => Failure::new(
            FailureKind::Network,
            "the receiver confirmed a transfer before it ended (protocol violation)",
        ),
        Err(f) => f,
    }
}

fn joined(r: Result<CliResult<Receipt>, tokio::task::JoinError>) -> CliResult<Receipt> {
    r.unwrap_or_else(|e| {
        Err(Failure::new(
            FailureKind::Other,
            format!("internal error: {e}"),
        ))
    })
}

fn receipt_failure(r: &Receipt) -> Failure {
    let kind = r
        .error_kind
        .as_deref()
        .map_or(FailureKind::Other, FailureKind::parse);
    Failure::new(
        kind,
        format!(
            "the receiver rejected the transfer: {}",
            r.error.as_deref().unwrap_or("no reason given")
        ),
    )
}

fn check_receipt(r: &Receipt, bytes: u64, sha256: &[u8; 32]) -> CliResult<()> {
    if !r.ok {
        return Err(receipt_failure(r));
    }
    if r.bytes != bytes || r.sha256 != hex(sha256) {
        return Err(Failure::new(
            FailureKind::Integrity,
            format!(
                "checksum mismatch: sent {bytes} bytes with SHA-256 {}, the receiver got {} \
                 bytes with SHA-256 {}",
                hex(sha256),
                r.bytes,
                r.sha256
            ),
        ));
    }
    Ok(())
}

async fn next_receipt(link: &dyn Link, peer: &str) -> CliResult<Receipt> {
    let msg = match link.recv().await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(Failure::new(
                FailureKind::Network,
                format!("{peer} closed the session before confirming the transfer"),
            ));
        }
        Err(e) => return Err(Failure::from_link(&format!("receiving from {peer}"), &e)),
    };
    match Message::decode(msg) {
        Ok(Message::Receipt(r)) => Ok(r),
        Ok(Message::Abort(reason)) => Err(Failure::new(
            FailureKind::Other,
            format!("the receiver aborted: {reason}"),
        )),
        Ok(other) => Err(Failure::new(
            FailureKind::Network,
            format!("{peer} sent an unexpected {} message", name_of(&other)),
        )),
        Err(e) => Err(Failure::new(
            FailureKind::Network,
            format!("{peer} does not speak the amst file protocol: {e}"),
        )),
    }
}

fn name_of(m: &Message) -> &'static str {
    match m {
        Message::Header(_) => "Header",
        Message::Data(_) => "Data",
        Message::Trailer(_) => "Trailer",
        Message::Receipt(_) => "Receipt",
        Message::Abort(_) => "Abort",
    }
}

/// Where received transfers go.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// The output directory; `None` discards everything after verifying it.
    pub output: Option<PathBuf>,
}

/// One transfer as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    /// The name the sender gave.
    pub name: String,
    /// File or generated.
    pub kind: Kind,
    /// Where it was stored, if it was.
    pub stored_as: Option<PathBuf>,
    /// Data bytes received.
    pub bytes: u64,
    /// The hash that checked what was received: `sha256` for a stream, `blake3` for a tree.
    pub hash: &'static str,
    /// SHA-256 of a stream, hex; empty for a tree, whose BLAKE3 is per block and per file.
    pub sha256: String,
    /// From Header to Trailer.
    pub elapsed: Duration,
    /// `Err` when it failed.
    pub result: Result<(), Failure>,
}

/// What one session of `amst serve` did.
#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    /// Every transfer the session started.
    pub transfers: Vec<Received>,
    /// Why the session itself broke, if it did.
    pub error: Option<Failure>,
}

struct Active {
    header: Header,
    sink: Sink,
    started: Instant,
    bytes: u64,
    failed: bool,
}

/// Receives transfers until the peer closes. `progress` counts data bytes received.
pub async fn receive_session(
    link: &dyn Link,
    peer: &str,
    opts: &ReceiveOptions,
    progress: &AtomicU64,
) -> SessionReport {
    let mut report = SessionReport::default();
    let mut active: Option<Active> = None;
    let doing = format!("receiving from {peer}");
    loop {
        let msg = match link.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                report.error = Some(Failure::from_link(&doing, &e));
                break;
            }
        };
        let msg = match Message::decode(msg) {
            Ok(m) => m,
            Err(e) => {
                report.error = Some(Failure::new(
                    FailureKind::Network,
                    format!("{peer} does not speak the amst file protocol: {e}"),
                ));
                break;
            }
        };
        match (active.as_mut(), msg) {
            (None, Message::Header(header)) => {
                let dir = match header.kind {
                    Kind::File => opts.output.as_deref(),
                    Kind::Generated => None,
                };
                let started = Instant::now();
                let (sink, failure) = if header.version != FILE_PROTOCOL_VERSION {
                    let f = Failure::new(
                        FailureKind::Network,
                        format!(
                            "file protocol version {} is not supported (this receiver speaks {})",
                            header.version, FILE_PROTOCOL_VERSION
                        ),
                    );
                    (Sink::create(None, &header.name).ok(), Some(f))
                } else {
                    match Sink::create(dir, &header.name) {
                        Ok(s) => (Some(s), None),
                        Err(f) => (Sink::create(None, &header.name).ok(), Some(f)),
                    }
                };
                let Some(sink) = sink else {
                    report.error = Some(Failure::new(FailureKind::Other, "cannot start a writer"));
                    break;
                };
                let mut a = Active {
                    header,
                    sink,
                    started,
                    bytes: 0,
                    failed: false,
                };
                if let Some(f) = failure {
                    reject(link, &mut a, f, &mut report).await;
                }
                active = Some(a);
            }
            (Some(a), Message::Data(data)) => {
                let n = data.len() as u64;
                progress.fetch_add(n, Ordering::Relaxed);
                metrics::counter!(metric::RECEIVED_BYTES).increment(n);
                if a.failed {
                    continue;
                }
                a.bytes += n;
                if let Err(f) = a.sink.push(data).await {
                    reject(link, a, f, &mut report).await;
                }
            }
            (Some(a), Message::Trailer(t)) => {
                if !a.failed {
                    let r = finish(link, a, t, peer).await;
                    report.transfers.push(r);
                }
                active = None;
            }
            (Some(a), Message::Abort(reason)) => {
                if !a.failed {
                    a.sink.discard();
                    let f =
                        Failure::new(FailureKind::Other, format!("the sender aborted: {reason}"));
                    metrics::counter!(metric::TRANSFERS, "result" => f.kind.as_str()).increment(1);
                    report
                        .transfers
                        .push(received(a, None, String::new(), Err(f)));
                }
                active = None;
            }
            (state, other) => {
                report.error = Some(Failure::new(
                    FailureKind::Network,
                    format!(
                        "{peer} sent a {} message {} (protocol violation)",
                        name_of(&other),
                        if state.is_some() {
                            "in the middle of a transfer"
                        } else {
                            "outside a transfer"
                        }
                    ),
                ));
                break;
            }
        }
    }
    if let Some(mut a) = active.take()
        && !a.failed
    {
        a.sink.discard();
        let why = report.error.clone().unwrap_or_else(|| {
            Failure::new(
                FailureKind::Integrity,
                format!("{peer} closed the session in the middle of the transfer"),
            )
        });
        report
            .transfers
            .push(received(&a, None, String::new(), Err(why)));
    }
    let _ = link.close().await;
    report
}

/// Gives up on the current transfer and tells the sender why, right away.
async fn reject(link: &dyn Link, a: &mut Active, f: Failure, report: &mut SessionReport) {
    a.failed = true;
    a.sink.discard();
    let receipt = Receipt {
        ok: false,
        bytes: a.bytes,
        sha256: String::new(),
        stored_as: None,
        error: Some(f.message.clone()),
        error_kind: Some(f.kind.as_str().into()),
    };
    let _ = link.send(Message::Receipt(receipt).encode()).await;
    metrics::counter!(metric::TRANSFERS, "result" => f.kind.as_str()).increment(1);
    report
        .transfers
        .push(received(a, None, String::new(), Err(f)));
}

async fn finish(link: &dyn Link, a: &mut Active, t: Trailer, peer: &str) -> Received {
    let (result, sha, path) = match verify_and_store(a, &t, peer).await {
        Ok((fin, path)) => (Ok(()), hex(&fin.sha256), path),
        Err(f) => (Err(f), String::new(), None),
    };
    let receipt = Receipt {
        ok: result.is_ok(),
        bytes: a.bytes,
        sha256: sha.clone(),
        stored_as: path
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned()),
        error: result.as_ref().err().map(|f| f.message.clone()),
        error_kind: result.as_ref().err().map(|f| f.kind.as_str().to_string()),
    };
    let _ = link.send(Message::Receipt(receipt).encode()).await;
    let _ = link.flush().await;
    let label = result.as_ref().map_or_else(|f| f.kind.as_str(), |()| "ok");
    metrics::counter!(metric::TRANSFERS, "result" => label).increment(1);
    received(a, path, sha, result)
}

async fn verify_and_store(
    a: &mut Active,
    t: &Trailer,
    peer: &str,
) -> CliResult<(Finished, Option<PathBuf>)> {
    let fin = a.sink.finish().await?;
    a.bytes = fin.bytes;
    if fin.bytes != t.bytes || fin.sha256 != t.sha256 {
        a.sink.discard();
        return Err(Failure::new(
            FailureKind::Integrity,
            format!(
                "checksum mismatch: {peer} sent {} bytes with SHA-256 {}, we received {} bytes \
                 with SHA-256 {}; the file was not kept",
                t.bytes,
                hex(&t.sha256),
                fin.bytes,
                hex(&fin.sha256)
            ),
        ));
    }
    if let Some(size) = a.header.size
        && size != fin.bytes
    {
        a.sink.discard();
        return Err(Failure::new(
            FailureKind::Integrity,
            format!(
                "{peer} announced {size} bytes but sent {}; the file was not kept",
                fin.bytes
            ),
        ));
    }
    let path = a.sink.commit()?;
    Ok((fin, path))
}

fn received(
    a: &Active,
    stored_as: Option<PathBuf>,
    sha256: String,
    result: Result<(), Failure>,
) -> Received {
    Received {
        name: a.header.name.clone(),
        kind: a.header.kind,
        stored_as,
        bytes: a.bytes,
        hash: "sha256",
        sha256,
        elapsed: a.started.elapsed(),
        result,
    }
}
