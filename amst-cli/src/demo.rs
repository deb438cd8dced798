//! `amst demo`: a server and a client in this process over 127.0.0.1, 1 GiB through one
//! session, one mode switch on the way, and the report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use amst_core::Mode;

use crate::backend::{self, Server, Settings};
use crate::cli::{DemoArgs, ModeArg, TransportArg, TransportArgs};
use crate::error::{CliResult, Failure, FailureKind};
use crate::run::Global;
use crate::send::{config_report, fail, measured, print_report, start_report};
use crate::source::Source;
use crate::transfer::{ReceiveOptions, SendOptions, receive_session};

/// Runs the demo.
pub async fn run(args: DemoArgs, g: &Global) -> CliResult<()> {
    if !(0.0..=1.0).contains(&args.switch_at) {
        return Err(Failure::usage(format!(
            "--switch-at is {}; give a fraction from 0 to 1",
            args.switch_at
        )));
    }
    let transport = TransportArgs {
        mode: ModeArg::Auto,
        transport: TransportArg::Tcp,
        streams: None,
        cc: None,
        chunk: None,
        aggressive: false,
        rdma_device: None,
        rdma_gid_index: None,
    };
    let settings = Settings {
        psk: crate::psk::random(),
        args: transport.clone(),
    };
    let server = Server::bind(
        "127.0.0.1:0".parse().expect("valid"),
        &settings,
        amst_core::MemoryBudget::process(),
    )
    .await?;
    let addr = server.local_addr();
    let receiver = tokio::spawn(async move {
        let acc = server.accept().await?;
        let bytes = AtomicU64::new(0);
        let opts = ReceiveOptions { output: None };
        Ok::<_, Failure>(receive_session(&*acc.link, &acc.peer, &opts, &bytes).await)
    });
    let open = Source::Generated(args.size.0).open()?;
    let mut report = start_report(
        "demo",
        &addr.to_string(),
        &open,
        config_report(&transport, None),
    );
    let link = match backend::connect(addr, &settings).await {
        Ok(l) => l,
        Err(f) => return Err(fail(g, report, f)),
    };
    let switch_at = (args.size.0 as f64 * args.switch_at) as u64;
    let switcher = link.clone();
    let quiet = g.json || g.quiet;
    let mut switch_task = None;
    let r = measured(
        g,
        &link,
        &addr.to_string(),
        open,
        &SendOptions::default(),
        &mut report,
        |bytes| {
            switch_task = Some(tokio::spawn(async move {
                force_switch_at(&*switcher, &bytes, switch_at, quiet).await
            }));
        },
    )
    .await;
    if let Some(t) = switch_task {
        // Never leave a switch half done before closing; after a failure, just stop it.
        if r.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        } else {
            t.abort();
        }
    }
    let _ = link.close().await;
    let served = tokio::time::timeout(Duration::from_secs(30), receiver).await;
    if let Err(f) = r {
        return Err(fail(g, report, f));
    }
    match served {
        Ok(Ok(Ok(s))) => {
            if let Some(e) = s.error {
                return Err(fail(g, report, e));
            }
        }
        Ok(Ok(Err(f))) => return Err(fail(g, report, f)),
        _ => {
            let f = Failure::new(FailureKind::Other, "the demo's server did not finish");
            return Err(fail(g, report, f));
        }
    }
    print_report(g, &report);
    Ok(())
}

/// Waits until `at` bytes have gone, then forces the other mode, so that the demo shows one
/// switch under traffic whatever the detector decides about loopback. If the detector has
/// switched by then, that is the switch to show: forcing another would undo a right decision
/// and finish a loopback demo in internet mode.
async fn force_switch_at(link: &dyn crate::link::Link, bytes: &AtomicU64, at: u64, quiet: bool) {
    while bytes.load(Ordering::Relaxed) < at {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = link.stats();
    if stats.mode_switches > 0 {
        return;
    }
    let to = match stats.mode {
        Mode::Datacenter => Mode::Internet,
        _ => Mode::Datacenter,
    };
    match link.force_mode(to).await {
        Ok(()) => tracing::info!(to = %to, "demo: forced a mode switch"),
        Err(why) => {
            if !quiet {
                crate::stdout::err_line(format_args!("amst demo: no mode switch: {why}"));
            }
        }
    }
}
