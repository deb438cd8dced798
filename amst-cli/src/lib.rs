//! The `amst` command: `serve`, `send`, `demo` and `explain`, with progress bars, iperf3-style
//! JSON reports and Prometheus metrics.
//!
//! The library behind the binary is organised around one seam, [`link::Link`]: a connected
//! session from whichever AMST crate carries it ([`backend`]). Above it sit files and
//! directory trees through amst-files ([`tree`]), the single-stream protocol for stdin and
//! generated data ([`protocol`], [`source`], [`sink`], [`transfer`]), the display
//! ([`progress`], [`report`]) and the subcommands.
//!
//! ```
//! use amst_cli::size::ByteSize;
//!
//! let size: ByteSize = "1.5G".parse()?;
//! assert_eq!(size.0, 3 << 29);
//! assert_eq!(size.to_string(), "1.5 GiB");
//! # Ok::<(), amst_cli::size::SizeError>(())
//! ```

pub mod backend;
pub mod cli;
pub mod demo;
pub mod error;
pub mod explain;
pub mod link;
pub mod progress;
pub mod protocol;
pub mod psk;
pub mod report;
pub mod run;
pub mod send;
pub mod serve;
pub mod sink;
pub mod size;
pub mod source;
pub mod stdout;
pub mod telemetry;
pub mod transfer;
pub mod tree;

pub use error::{Failure, FailureKind};
pub use link::{Link, LinkStats};
