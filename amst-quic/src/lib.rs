//! AMST's QUIC transport: [`QuicTransport`] implements amst-core's
//! [`Transport`](amst_core::Transport) on quinn (rustls on ring, TLS 1.3, ALPN `amst/3`),
//! with amst-cc's BBR (the default) or CUBIC as quinn's congestion controller.
//!
//! - **Authentication:** TLS 1.3 with the server pinned by certificate fingerprint, checked
//!   against trust anchors, or (the default) bound to the AMST PSK handshake that runs on
//!   the control stream before any data is accepted, with the same key policy as TCP.
//! - **Messages:** a driver of amst-core's sans-IO [`Session`](amst_core::session::Session)
//!   (send buffer, reassembly, acks, credit, pings): chunks (amst-core Data frames with
//!   CRC32C) striped over a few unidirectional streams, control frames on the control stream;
//!   application-level acks make `messages_acked` mean "received whole". Credit and QUIC's windows come from
//!   [`QuicConfig::window`], sized from the path's BDP by [`QuicConfig::for_path`].
//! - **Probes:** Ping/Pong in QUIC DATAGRAM frames, not stuck behind bulk data.
//! - **Reconnects:** a [`QuicConnector`] keeps session tickets, so a reconnect resumes and
//!   sends its Hello (only that: it is replay-safe) in 0-RTT, one round trip sooner.
//!
//! ```
//! use amst_core::Transport;
//! use amst_core::codec::Psk;
//! use amst_quic::{Identity, PeerVerification, QuicConfig, QuicListener, QuicTransport};
//! use bytes::Bytes;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let psk = Psk::new(b"a shared secret of some length")?;
//! let identity = Identity::self_signed(&["localhost"])?;
//! let pin = identity.fingerprint();
//! let listener = QuicListener::bind("127.0.0.1:0".parse()?, QuicConfig::new(psk.clone()).with_identity(identity))?;
//! let addr = listener.local_addr()?;
//! let server = tokio::spawn(async move { listener.accept().await });
//! let client_config = QuicConfig::new(psk).with_verification(PeerVerification::Pinned(vec![pin]));
//! let client = QuicTransport::connect(addr, "localhost", client_config).await?;
//! let server = server.await??;
//! client.send(Bytes::from_static(b"hello over QUIC")).await?;
//! client.flush().await?;
//! assert_eq!(client.metrics().messages_acked, 1);
//! assert_eq!(server.recv().await?.as_deref(), Some(&b"hello over QUIC"[..]));
//! client.close().await?;
//! assert_eq!(server.recv().await?, None);
//! # Ok(())
//! # }
//! ```

mod config;
mod connector;
mod handshake;
mod session;
mod socket;
mod stream_order;
mod streams;
mod tls;
mod transport;

pub use config::{
    ALPN, BBR_INITIAL_WINDOW, CongestionControl, PeerVerification, QuicConfig, StreamMapping,
};
pub use connector::{ConnectorStats, QuicConnector};
pub use tls::{Fingerprint, Identity, roots_from_pem_file};
pub use transport::{ListenerStats, QuicListener, QuicTransport};
