//! The command line, as clap derive types.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::size::ByteSize;

/// Move bytes between two hosts as fast as the path allows: many TCP streams or RDMA in a
/// datacenter, a few paced streams under BBR over the internet, switching without loss.
#[derive(Debug, Parser)]
#[command(name = "amst", version, propagate_version = true)]
#[command(
    after_help = "The pre-shared key comes from --psk-file or the AMST_PSK environment \
variable, never from an argument. Logs: RUST_LOG=info (or debug, amst_hybrid=debug, ...)."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Serve Prometheus metrics over HTTP at this address (path /metrics), e.g. 127.0.0.1:9898.
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Print the report as one JSON object on stdout (like iperf3 -J); no progress display.
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress display and no report: only errors are printed (`--json` still prints
    /// its report, which is the output asked for).
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Receive files, directory trees and data until Ctrl-C or SIGTERM.
    Serve(ServeArgs),
    /// Send files and directories (recursively), stdin (-) or generated data (--size) to a
    /// server.
    Send(SendArgs),
    /// Run a server and a client in this process over 127.0.0.1 and send 1 GiB through the
    /// hybrid manager, with one mode switch on the way.
    Demo(DemoArgs),
    /// Probe a server's path and explain which mode and settings AMST would pick, and why.
    Explain(ExplainArgs),
}

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Start as the detector sees fit and follow its decisions.
    Auto,
    /// Many streams, CUBIC, large chunks; no automatic switching.
    Datacenter,
    /// A few paced streams under BBR; no automatic switching.
    Internet,
}

/// `--transport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// Multi-stream kernel TCP (amst-tcp).
    Tcp,
    /// QUIC (amst-quic).
    Quic,
    /// RDMA RC queue pairs (amst-rdma).
    Rdma,
}

/// `--existing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExistingArg {
    /// Skip identical files (same size and BLAKE3); leave different ones alone, reported.
    Skip,
    /// Skip identical files; replace different ones.
    Overwrite,
    /// Leave every existing file alone, reported as an error.
    Refuse,
}

/// `--cc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CcArg {
    /// BBR: model-based; the internet default.
    Bbr,
    /// CUBIC: loss-based; the datacenter default.
    Cubic,
}

impl ModeArg {
    /// The name as typed on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ModeArg::Auto => "auto",
            ModeArg::Datacenter => "datacenter",
            ModeArg::Internet => "internet",
        }
    }
}

impl TransportArg {
    /// The name as typed on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportArg::Tcp => "tcp",
            TransportArg::Quic => "quic",
            TransportArg::Rdma => "rdma",
        }
    }
}

impl CcArg {
    /// The name as typed on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            CcArg::Bbr => "bbr",
            CcArg::Cubic => "cubic",
        }
    }
}

/// Options that shape the transport, shared by every subcommand.
#[derive(Clone, Debug, Args)]
pub struct TransportArgs {
    /// Path mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,

    /// Transport for data.
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    pub transport: TransportArg,

    /// Parallel streams at the start (default: 64 in datacenter mode, 8 on the internet).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub streams: Option<u16>,

    /// Congestion control (default: bbr on the internet, cubic in the datacenter).
    #[arg(long, value_enum)]
    pub cc: Option<CcArg>,

    /// Initial chunk size of TCP streams, 16K to 512K (default: 256K; tuned while running).
    #[arg(long, value_name = "SIZE")]
    pub chunk: Option<ByteSize>,

    /// Internet profile (TCP): let the streams compete as separate flows instead of one. By
    /// default one BBR model caps the streams' pacing and bytes in flight together, so that
    /// beside other traffic the transfer takes about one flow's share; this turns that cap
    /// off and takes more of a shared path. Said so in the report.
    #[arg(long)]
    pub aggressive: bool,

    /// RDMA device for --transport rdma, e.g. mlx5_0 or rxe0 (default: the first with an
    /// active port).
    #[arg(long, value_name = "NAME")]
    pub rdma_device: Option<String>,

    /// RoCE v2 GID index for --transport rdma (default: the first RoCE v2 GID with an IPv4
    /// address).
    #[arg(long, value_name = "N")]
    pub rdma_gid_index: Option<u32>,
}

/// Where the key comes from.
#[derive(Clone, Debug, Args)]
pub struct PskArgs {
    /// File holding the pre-shared key (trailing whitespace ignored). Default: $AMST_PSK.
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
}

/// `amst serve`.
#[derive(Clone, Debug, Args)]
#[command(group = clap::ArgGroup::new("sink").required(true).args(["output", "discard"]))]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(short, long, default_value = "0.0.0.0:9000", value_name = "ADDR")]
    pub listen: String,

    /// Directory to store received files in (created if missing).
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Verify and throw away what arrives (for benchmarks).
    #[arg(long)]
    pub discard: bool,

    /// Exit after this many sessions (default: run until Ctrl-C).
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<u64>,

    /// Bytes all sessions together may hold of received data, e.g. 256M (default: 128 MiB).
    /// Each session's credit is its share of it.
    #[arg(long, value_name = "SIZE")]
    pub memory_budget: Option<ByteSize>,

    #[command(flatten)]
    pub psk: PskArgs,

    #[command(flatten)]
    pub transport: TransportArgs,
}

/// `amst send`.
#[derive(Clone, Debug, Args)]
pub struct SendArgs {
    /// The server, HOST:PORT.
    #[arg(value_name = "PEER")]
    pub peer: String,

    /// Files and directories to send (directories recursively; each lands under its own name
    /// in the server's --output); - for stdin.
    #[arg(
        value_name = "PATH",
        required_unless_present = "size",
        conflicts_with = "size",
        num_args = 1..
    )]
    pub paths: Vec<PathBuf>,

    /// Resume partial files left at the server by an interrupted send of the same files (the
    /// default: sending the same tree again resumes too; this spells it out).
    #[arg(long, conflicts_with = "no_resume")]
    pub resume: bool,

    /// Discard partial files at the server and send everything again.
    #[arg(long)]
    pub no_resume: bool,

    /// What the server does with a file that already exists: skip (identical files are
    /// skipped, different ones are left alone and reported; the safe default), overwrite
    /// (different ones are replaced), or refuse (any existing file is an error).
    #[arg(long, value_enum, default_value_t = ExistingArg::Skip, value_name = "POLICY")]
    pub existing: ExistingArg,

    /// Send this many bytes of generated data instead of a file, e.g. 1G, 512M, 100MiB.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<ByteSize>,

    /// Limit the application's send rate, in bytes per second, e.g. 50M (stdin and --size
    /// only; files and directories are refused with it, not silently unlimited).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub rate: Option<ByteSize>,

    /// Bytes per application message.
    #[arg(long, value_name = "SIZE", default_value = "1M", hide = true)]
    pub piece: ByteSize,

    #[command(flatten)]
    pub psk: PskArgs,

    #[command(flatten)]
    pub transport: TransportArgs,
}

/// `amst demo`.
#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// How much to send (default 1 GiB).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub size: ByteSize,

    /// Force the mode switch when this fraction of the data has been sent.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.4, hide = true)]
    pub switch_at: f64,
}

/// `amst explain`.
#[derive(Clone, Debug, Args)]
pub struct ExplainArgs {
    /// The server to probe, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub peer: String,

    /// Bytes the delivery-rate probes may use in all (they also stop after 3 s). Over
    /// loopback at 40 Gbit/s, trains still grew faster after 128 MiB; they agree within
    /// 82-210 MiB.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub probe_bytes: ByteSize,

    #[command(flatten)]
    pub psk: PskArgs,

    #[command(flatten)]
    pub transport: TransportArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_and_sources_parse() {
        let c = Cli::try_parse_from(["amst", "send", "127.0.0.1:1", "--size", "100MiB"]).unwrap();
        let Command::Send(s) = c.command else {
            panic!()
        };
        assert_eq!(s.size, Some(ByteSize(100 << 20)));
        assert_eq!(s.transport.mode, ModeArg::Auto);
        let e = Cli::try_parse_from(["amst", "send", "h:1", "--size", "12X"]).unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
        assert!(Cli::try_parse_from(["amst", "send", "h:1", "f", "--size", "1G"]).is_err());
        assert!(Cli::try_parse_from(["amst", "send", "h:1"]).is_err());
        assert!(
            Cli::try_parse_from(["amst", "serve"]).is_err(),
            "needs --output or --discard"
        );
        assert!(Cli::try_parse_from(["amst", "serve", "--discard", "-o", "x"]).is_err());
        let c = Cli::try_parse_from(["amst", "demo"]).unwrap();
        let Command::Demo(d) = c.command else {
            panic!()
        };
        assert_eq!(d.size, ByteSize(1 << 30));
        assert!(Cli::try_parse_from(["amst", "send", "h:1", "--psk", "x", "--size", "1"]).is_err());
        let c = Cli::try_parse_from([
            "amst",
            "serve",
            "--discard",
            "--transport",
            "rdma",
            "--rdma-device",
            "rxe0",
            "--rdma-gid-index",
            "3",
        ])
        .unwrap();
        let Command::Serve(s) = c.command else {
            panic!()
        };
        assert_eq!(s.transport.transport, TransportArg::Rdma);
        assert_eq!(s.transport.rdma_device.as_deref(), Some("rxe0"));
        assert_eq!(s.transport.rdma_gid_index, Some(3));
    }
}
