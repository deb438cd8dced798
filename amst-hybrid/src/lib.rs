//! AMST's hybrid manager: one [`Amst`] session over switchable transports.
//!
//! The active route (one transport, or two in hybrid mode) lives in an `ArcSwap`; a mode
//! change from the detector, or a forced one, dials or reuses transports, attaches them to
//! the session at the server, swaps the route and resends every message the old transport had
//! not seen acknowledged. Every message carries a hybrid sequence number, and the receiver
//! merges deliveries from old and new transports: exactly once, in order, bounded memory.
//!
//! The sans-IO halves are [`SendLedger`], [`ReceiveMerger`] and the [`roster`] (Attach,
//! Retire and Bye); [`wire`] is the frame codec.
//!
//! Features: `rdma` (the verbs datacenter lane; without it an RDMA lane falls back to TCP)
//! and `in-memory` (`memory_network`, used by the example below and by tests).
//!
//! ```
//! use std::sync::Arc;
//! use amst_core::{Mode, codec::Psk};
//! use amst_hybrid::{Amst, AmstConfig, memory_network};
//! use bytes::Bytes;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> amst_hybrid::Result<()> {
//! let config = AmstConfig::builder(Psk::new(b"correct horse battery")?)
//!     .auto_mode(false)
//!     .initial_mode(Mode::Datacenter)
//!     .build()?;
//! let (connector, acceptor) = memory_network(64);
//! let listener = Amst::listen_with(Arc::new(acceptor), config.clone())?;
//! let client = Amst::connect_with(Arc::new(connector), config).await?;
//! let server = listener.accept().await?;
//!
//! client.send(Bytes::from_static(b"before")).await?;
//! client.force_mode(Mode::Internet).await?; // a new transport; nothing lost or repeated
//! client.send(Bytes::from_static(b"after")).await?;
//! assert_eq!(server.recv().await?.as_deref(), Some(&b"before"[..]));
//! assert_eq!(server.recv().await?.as_deref(), Some(&b"after"[..]));
//! assert_eq!(client.metrics().switches, 1);
//! client.close().await?;
//! assert_eq!(server.recv().await?, None);
//! # Ok(())
//! # }
//! ```

mod amst;
mod auto;
mod config;
mod connect;
mod error;
pub mod ledger;
pub mod merger;
mod metrics;
mod quic;
mod rdma;
pub mod roster;
mod session;
mod tcp;
pub mod wire;

pub use amst::{Amst, AmstListener};
pub use amst_core::Congestion;
/// The RDMA devices on this host, or why there are none (amst-rdma's `devices`).
pub use amst_rdma::devices as rdma_devices;
pub use config::{AmstConfig, AmstConfigBuilder, DatacenterTransport, LaneProfile};
pub use connect::{Acceptor, Connected, Connector};
#[cfg(feature = "in-memory")]
pub use connect::{MemoryAcceptor, MemoryConnector, memory_network};
pub use error::{Error, Result};
pub use ledger::SendLedger;
pub use merger::ReceiveMerger;
pub use metrics::{AmstMetrics, DetectorVerdict};
pub use quic::{MultiAcceptor, QUIC_SERVER_NAME, QuicAcceptor, quic_config};
pub use rdma::{RDMA_PORT_OFFSET, RdmaAcceptor, rdma_bootstrap_addr, rdma_config};
pub use session::Role;
pub use tcp::{TcpAcceptor, TcpConnector, tcp_config};
