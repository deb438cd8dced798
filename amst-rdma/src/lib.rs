//! AMST's datacenter transport: reliable-connected (RC) queue pairs on RDMA verbs, through
//! [sideway](https://docs.rs/sideway) (which loads libibverbs at run time), async on tokio.
//!
//! - [`bootstrap`]: a TCP connection authenticated with the pre-shared key (amst-core's
//!   handshake), then an exchange of queue pair endpoints (QP number, GID, PSN, ring address
//!   and key).
//! - [`conn`]: one queue pair's protocol, sans-IO: amst-core's session protocol
//!   (`amst_core::session`: acks, byte credit from the memory budget, pings, the parting
//!   Close, the fatal latch, reassembly) carried in segments, plus the queue pair's credit.
//! - [`wire`]: the segment header every SEND and ring slot carries, and the cutting of the
//!   session's frame stream into segments and back.
//! - [`credit`]: receive credits and ring-slot accounting, sans-IO.
//! - [`path`]: the RTT from acknowledgement timing, for `metrics`.
//! - `verbs` (feature `rdma`): the queue pair, registered pools, the completion channel in
//!   tokio's `AsyncFd`.
//!
//! Without the `rdma` feature, or without a device, construction returns
//! [`Error::Unavailable`](amst_core::Error::Unavailable), and callers fall back to TCP:
//!
//! ```
//! use amst_core::{Error, TransportKind, codec::Psk};
//! use amst_rdma::{RdmaConfig, RdmaTransport};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let config = RdmaConfig::new(Psk::new(b"a shared secret").unwrap());
//! match RdmaTransport::connect("127.0.0.1:1".parse().unwrap(), config).await {
//!     Ok(t) => drop(t),
//!     Err(Error::Unavailable { transport: TransportKind::Rdma, reason }) => {
//!         assert!(reason.starts_with("no RDMA device"));
//!     }
//!     Err(other) => println!("RDMA present but the peer is not: {other}"),
//! }
//! # });
//! ```

pub mod bootstrap;
mod config;
pub mod conn;
pub mod credit;
pub mod path;
mod transport;
#[cfg(feature = "rdma")]
mod verbs;
pub mod wire;

pub use config::RdmaConfig;
pub use transport::{RdmaListener, RdmaTransport, devices};
