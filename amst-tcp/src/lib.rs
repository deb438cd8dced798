//! AMST's multi-stream TCP transport.
//!
//! One session is N TCP connections tied together by the session id of an authenticated
//! Hello (PSK HMAC challenge-response, amst-core's handshake, on every stream before any
//! data). Writers pull chunks from one shared send buffer when their socket has room (work
//! stealing), so a slow stream never holds the others back; every chunk is kept until the peer
//! acknowledges it and goes out again on another stream if its stream dies or stalls.
//! Sockets are tuned and verified (congestion control, `TCP_NODELAY`, `TCP_NOTSENT_LOWAT`,
//! keepalive, pacing), `TCP_INFO` is sampled, and the stream count, chunk size and aggregate
//! pacing rate (amst-cc's BBR) adapt to what is measured. TLS 1.3 on every stream is
//! optional ([`TcpTls`], on in the internet profile); the PSK handshake runs inside it and is
//! bound to it.
//!
//! ```
//! use amst_core::Transport;
//! use amst_core::codec::Psk;
//! use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
//! use bytes::Bytes;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> amst_core::Result<()> {
//! let config = TcpConfig::internet(Psk::new(b"a shared secret")?).with_streams(4);
//! let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), config.clone()).await?;
//! let addr = listener.local_addr();
//! let server = tokio::spawn(async move {
//!     let session = listener.accept().await?;
//!     let msg = session.recv().await?;
//!     assert_eq!(session.recv().await?, None); // the client closed gracefully
//!     Ok::<_, amst_core::Error>(msg)
//! });
//! let client = TcpTransport::connect(addr, config).await?;
//! client.send(Bytes::from_static(b"hello")).await?;
//! client.close().await?;
//! assert_eq!(server.await.unwrap()?.as_deref(), Some(&b"hello"[..]));
//! # Ok(())
//! # }
//! ```

mod aggregate;
mod config;
mod conn;
mod handshake;
mod listener;
mod monitor;
mod pacing;
mod session;
#[cfg(test)]
mod sim_tests;
mod sockopt;
mod stats;
mod stream;
mod tls;
mod transport;
pub mod tuner;

pub use amst_core::Congestion;
pub use config::{MAX_CHUNK, MIN_CHUNK, Profile, TcpConfig};
pub use listener::TcpListener;
pub use sockopt::{Applied, TcpInfo};
pub use stats::{BufferStats, StreamStats};
pub use tls::{Fingerprint, Identity, TcpTls, TlsVerify, roots_from_pem_file};
pub use transport::TcpTransport;
