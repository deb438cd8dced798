//! The entry point behind `main`: parse, set up logs and metrics, dispatch, map failures to
//! exit codes.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::{CliResult, Failure, FailureKind};

/// What every subcommand may consult.
#[derive(Clone, Debug)]
pub struct Global {
    /// `--json`.
    pub json: bool,
    /// `--quiet`.
    pub quiet: bool,
    /// The value of `AMST_PSK`, read once.
    pub psk_env: Option<String>,
}

/// Runs `amst` with the process's arguments and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init_tracing();
    // Before any session allocates: a receiver's peak memory then follows its budget.
    amst_core::limit_allocator_retention();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("amst")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::stdout::err_line(format_args!("amst: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Sessions torn down by the failure may still have tasks parked; do not wait on them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            crate::stdout::err_line(format_args!("amst: {}", f.message));
            ExitCode::from(f.kind.exit_code())
        }
    }
}

async fn dispatch(cli: Cli) -> CliResult<()> {
    let g = Global {
        json: cli.json,
        quiet: cli.quiet,
        psk_env: std::env::var(crate::psk::PSK_ENV).ok(),
    };
    if let Some(addr) = cli.metrics_addr {
        crate::telemetry::install_prometheus(addr)?;
    }
    match cli.command {
        Command::Serve(a) => crate::serve::run(a, &g).await,
        Command::Send(a) => {
            let resumable = !a.paths.is_empty() && a.paths.iter().all(|p| p.as_os_str() != "-");
            tokio::select! {
                r = crate::send::run(a, &g) => r,
                by = crate::serve::stop_signal() => {
                    let f = interrupted(by, resumable);
                    if g.json
                        && let Some(mut report) = crate::report::take_in_progress()
                    {
                        report.error = Some(crate::report::ErrorReport::from(&f));
                        crate::stdout::line(report.json());
                    }
                    Err(f)
                }
            }
        }
        Command::Demo(a) => crate::demo::run(a, &g).await,
        Command::Explain(a) => crate::explain::run(a, &g).await,
    }
}

/// What `amst send` says when stopped: whether running it again picks up where it stopped.
fn interrupted(by: &str, resumable: bool) -> Failure {
    let next = if resumable {
        "the receiver keeps every verified block: the same command sends only the rest"
    } else {
        "a stream from stdin or --size cannot resume; send it again from the start"
    };
    Failure::new(
        FailureKind::Interrupted,
        format!("interrupted by {by}; {next}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_tree_says_the_same_command_resumes() {
        let f = interrupted("SIGTERM", true);
        assert_eq!(f.kind.exit_code(), 130);
        assert_eq!(
            f.message,
            "interrupted by SIGTERM; the receiver keeps every verified block: the same command \
             sends only the rest"
        );
        assert!(
            interrupted("Ctrl-C", false)
                .message
                .contains("cannot resume")
        );
    }
}
