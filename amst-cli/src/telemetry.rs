//! Logs and metrics: the binary, never a library, installs the tracing subscriber and the
//! Prometheus recorder. The libraries only emit through the `tracing` and `metrics` facades.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
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
        .with_target(true)
        .try_init();
}

/// Serves every metric of the process as Prometheus text at `http://addr/metrics`. Must run
/// inside the tokio runtime, which then hosts the HTTP listener.
pub fn install_prometheus(addr: SocketAddr) -> CliResult<()> {
    // Bind first, for a clear error: the exporter would only log a busy port.
    match std::net::TcpListener::bind(addr) {
        Ok(l) => drop(l),
        Err(e) => {
            return Err(Failure::new(
                FailureKind::Usage,
                format!("cannot serve metrics on {addr}: {e}"),
            ));
        }
    }
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| {
            Failure::new(
                FailureKind::Usage,
                format!("cannot serve metrics on {addr}: {e}"),
            )
        })?;
    describe();
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

fn describe() {
    use crate::transfer::metric::*;
    metrics::describe_counter!(
        SENT_BYTES,
        metrics::Unit::Bytes,
        "Data bytes amst send handed to AMST"
    );
    metrics::describe_counter!(
        RECEIVED_BYTES,
        metrics::Unit::Bytes,
        "Data bytes amst serve received"
    );
    metrics::describe_counter!(TRANSFERS, "Transfers finished, by result");
    metrics::describe_counter!(SESSIONS, "Sessions accepted by amst serve");
}
