//! `amst send`, and the measured transfer that `amst demo` shares with it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::backend::{self, Settings};
use crate::cli::{SendArgs, TransportArgs};
use crate::error::{CliResult, Failure};
use crate::link::Link;
use crate::progress::{Display, Observer};
use crate::protocol::{Kind, hex};
use crate::report::{ConfigReport, End, ErrorReport, Report, SCHEMA, Start, now_unix};
use crate::run::Global;
use crate::source::{OpenSource, Source};
use crate::transfer::{SendOptions, send_transfer};

/// Runs `amst send`.
pub async fn run(args: SendArgs, g: &Global) -> CliResult<()> {
    // The cheapest checks first: a missing file is reported before any network activity.
    let source = match (args.paths.as_slice(), args.size) {
        ([p], _) if p.as_os_str() == "-" => Source::Stdin,
        ([], Some(n)) => Source::Generated(n.0),
        ([], None) => {
            return Err(Failure::usage(
                "give PATHs to send, - for stdin, or --size N",
            ));
        }
        (paths, _) => {
            if paths.iter().any(|p| p.as_os_str() == "-") {
                return Err(Failure::usage(
                    "- (stdin) cannot be sent together with paths",
                ));
            }
            return crate::tree::send(&args, paths, g).await;
        }
    };
    let open = source.open()?;
    let psk = crate::psk::load(args.psk.psk_file.as_deref(), g.psk_env.as_deref())?;
    let peer = backend::resolve(&args.peer).await?;
    let settings = Settings {
        psk,
        args: args.transport.clone(),
    };
    let opts = SendOptions {
        piece: usize::try_from(args.piece.0.clamp(1, 64 << 20)).unwrap_or(1 << 20),
        rate: args.rate.map(|r| r.0),
        ..SendOptions::default()
    };
    let config = config_report(&args.transport, opts.rate);
    let mut report = start_report("send", &peer.to_string(), &open, config);
    crate::report::set_in_progress(&report);
    let link = match backend::connect(peer, &settings).await {
        Ok(l) => l,
        Err(f) => return Err(fail(g, report, f)),
    };
    if let Some(w) = backend::rdma_fallback(&args.transport, &link.stats()) {
        if g.json {
            report.warnings.push(w);
        } else {
            crate::stdout::err_line(format_args!("amst: {w}"));
        }
    }
    let r = measured(
        g,
        &link,
        &peer.to_string(),
        open,
        &opts,
        &mut report,
        |_| {},
    )
    .await;
    let _ = link.close().await;
    match r {
        Ok(()) => {
            print_report(g, &report);
            Ok(())
        }
        Err(f) => Err(fail(g, report, f)),
    }
}

/// The transport options as the report shows them.
pub fn config_report(t: &TransportArgs, rate: Option<u64>) -> ConfigReport {
    ConfigReport {
        mode: t.mode.as_str().into(),
        transport: t.transport.as_str().into(),
        streams: t.streams.map(usize::from),
        cc: t.cc.map(|c| c.as_str().into()),
        chunk: t.chunk.map(|c| c.0),
        rate,
        aggressive: t.aggressive,
        engine: backend::ENGINE.into(),
    }
}

/// A report with its start filled in.
pub fn start_report(command: &str, peer: &str, open: &OpenSource, config: ConfigReport) -> Report {
    Report {
        schema: SCHEMA,
        start: Start {
            timestamp: now_unix(),
            version: env!("CARGO_PKG_VERSION"),
            command: command.into(),
            peer: peer.into(),
            name: open.header.name.clone(),
            size: open.header.size,
            kind: match open.header.kind {
                Kind::File => "file".into(),
                Kind::Generated => "generated".into(),
            },
            config,
        },
        intervals: Vec::new(),
        end: None,
        error: None,
        warnings: Vec::new(),
        tree: None,
    }
}

/// Sends `open` over `link` under the observer and fills `report`. `on_start` runs once the
/// observer is up (the demo uses it to schedule its mode switch).
pub async fn measured(
    g: &Global,
    link: &Arc<dyn Link>,
    peer: &str,
    open: OpenSource,
    opts: &SendOptions,
    report: &mut Report,
    on_start: impl FnOnce(Arc<AtomicU64>),
) -> CliResult<()> {
    let bytes = Arc::new(AtomicU64::new(0));
    let display = Display::choose(g.quiet || g.json);
    let label = format!("{} → {peer}", open.header.name);
    let observer = Observer::start(
        link.clone(),
        bytes.clone(),
        open.header.size,
        display,
        label,
    );
    on_start(bytes.clone());
    let r = send_transfer(link, peer, open, opts, &bytes).await;
    let obs = observer.finish().await;
    report.intervals = obs.intervals.clone();
    let out = r?;
    report.end = Some(End::new(
        &obs,
        out.bytes,
        out.elapsed,
        hex(&out.sha256),
        out.receipt.stored_as.clone(),
    ));
    Ok(())
}

/// Prints a finished report.
pub fn print_report(g: &Global, report: &Report) {
    if g.json {
        crate::stdout::line(report.json());
    } else if !g.quiet {
        crate::stdout::text(report.human());
    }
}

/// Prints the report of a failed transfer (`--json` only: it carries the error) and hands
/// the failure on for the exit code.
pub fn fail(g: &Global, mut report: Report, f: Failure) -> Failure {
    if g.json {
        report.error = Some(ErrorReport::from(&f));
        crate::stdout::line(report.json());
    }
    f
}
