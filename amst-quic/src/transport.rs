//! `QuicTransport` (connect, and the `Transport` impl) and `QuicListener` (bind, accept).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use amst_core::{AckWatch, BoxFuture, Error, PathSample, Result, Transport, TransportMetrics};
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, EndpointConfig, TokioRuntime};
use tokio::sync::mpsc;

use crate::config::{QuicConfig, SharedConfig};
use crate::connector::{QuicConnector, tls_failure};
use crate::handshake;
use crate::session::Shared;
use crate::tls::{self, Fingerprint};

/// An authenticated QUIC connection carrying AMST messages in both directions.
///
/// `Send + Sync`, usable as `Arc<dyn Transport>`. Dropping it without [`Transport::close`]
/// aborts the connection.
#[derive(Debug)]
pub struct QuicTransport {
    shared: Arc<Shared>,
    early: bool,
}

/// Waits for the TLS handshake of a connection that did not go through 0-RTT, within the
/// configured handshake timeout.
pub(crate) async fn finish_handshake(
    connecting: quinn::Connecting,
    what: impl FnOnce() -> String,
    config: &QuicConfig,
) -> Result<quinn::Connection> {
    let t = config.handshake_timeout;
    tokio::time::timeout(t, connecting)
        .await
        .map_err(|_| Error::Timeout {
            what: "the QUIC handshake",
            after: t,
        })?
        .map_err(|e| handshake_error(what(), &e, config))
}

pub(crate) fn handshake_error(what: String, e: &ConnectionError, config: &QuicConfig) -> Error {
    // quinn names TLS alerts only by number; say what the two common ones mean.
    let text = e.to_string();
    let hint = if text.contains("error 120") || text.contains("no_application_protocol") {
        format!(
            " (TLS alert 120, no_application_protocol: the peer does not speak ALPN {:?})",
            String::from_utf8_lossy(&config.alpn)
        )
    } else if text.contains("not valid for name") {
        " (the server's certificate was rejected: it does not cover the server name given to connect)"
            .into()
    } else if text.contains("UnknownIssuer") {
        " (the server's certificate was rejected: it does not chain to a trusted root)".into()
    } else if text.contains("invalid peer certificate") || text.contains("error 42") {
        " (the server's certificate was rejected: it is not the pinned one or does not chain to a trusted root)"
            .into()
    } else {
        String::new()
    };
    Error::io(
        what,
        io::Error::new(io::ErrorKind::ConnectionRefused, format!("{text}{hint}")),
    )
}

fn endpoint_error(e: io::Error) -> Error {
    Error::io("creating the QUIC endpoint", e)
}

impl QuicTransport {
    pub(crate) fn new(shared: Arc<Shared>, early: bool) -> Self {
        QuicTransport { shared, early }
    }

    /// Connects to a [`QuicListener`] at `addr`, from a fresh UDP socket on an ephemeral
    /// port. `server_name` is checked against the certificate with
    /// [`PeerVerification::Roots`](crate::PeerVerification::Roots) and ignored otherwise.
    /// Each call starts without session tickets, so it never resumes: keep a
    /// [`QuicConnector`] for reconnects in 0-RTT.
    pub async fn connect(addr: SocketAddr, server_name: &str, config: QuicConfig) -> Result<Self> {
        QuicConnector::new(config)?.connect(addr, server_name).await
    }

    /// Like [`connect`](Self::connect), from a socket the caller bound (for example inside
    /// a network namespace).
    pub async fn connect_with_socket(
        socket: UdpSocket,
        addr: SocketAddr,
        server_name: &str,
        config: QuicConfig,
    ) -> Result<Self> {
        QuicConnector::new(config)?
            .connect_with_socket(socket, addr, server_name)
            .await
    }

    /// Whether this connection's AMST Hello went in 0-RTT on a resumed TLS session and was
    /// accepted (on the listener's side: arrived that way), which saved one round trip.
    /// False for a full handshake, including a 0-RTT attempt the server rejected.
    pub fn resumed_with_0rtt(&self) -> bool {
        self.early
    }

    /// The quinn client configuration `connect` uses: TLS 1.3 on ring with the ALPN and
    /// verification of `config`, and its windows and congestion controller. A connection made
    /// with it alone is not yet an AMST transport (the PSK handshake is missing).
    pub fn quinn_client_config(config: &QuicConfig) -> Result<quinn::ClientConfig> {
        let crypto =
            QuicClientConfig::try_from(tls::client_crypto(config)?).map_err(|e| Error::Config {
                field: "verification",
                reason: e.to_string(),
            })?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(handshake::transport_config(config)?));
        Ok(client)
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.shared.conn.remote_address()
    }

    /// Ends the connection at once, without draining: the peer sees
    /// [`Error::PeerClosed`] with [`CloseCode::Aborted`](amst_core::codec::CloseCode::Aborted).
    /// Messages not yet acknowledged are lost to this transport (`messages_acked` says which
    /// were delivered), which is what a switch away from a dead path needs.
    pub fn abort(&self) {
        self.shared.abort();
    }

    /// quinn's connection statistics (packets, losses, congestion events, path RTT).
    pub fn quic_stats(&self) -> quinn::ConnectionStats {
        self.shared.conn.stats()
    }

    /// The state of amst-cc's controller on this connection (phase, cwnd, pacing rate,
    /// bandwidth estimate), or `None` under one of quinn's own controllers. It copies the
    /// controller, so call it for inspection, not per packet.
    pub fn congestion_metrics(&self) -> Option<amst_cc::ControllerMetrics> {
        use amst_cc::CongestionController;
        use amst_cc::quinn::QuinnController;
        let any = self.shared.conn.congestion_state().into_any();
        let any = match any.downcast::<QuinnController<amst_cc::Bbr>>() {
            Ok(bbr) => return Some(bbr.inner().metrics()),
            Err(other) => other,
        };
        any.downcast::<QuinnController<amst_cc::Cubic>>()
            .ok()
            .map(|cubic| cubic.inner().metrics())
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.shared.abort();
    }
}

impl Transport for QuicTransport {
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.shared.send(Bytes::new(), message))
    }

    fn send_parts(&self, header: Bytes, payload: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.shared.send(header, payload))
    }

    fn acked(&self) -> AckWatch {
        self.shared.acked_messages.watch()
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.shared.flush())
    }

    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>>> {
        Box::pin(self.shared.recv())
    }

    fn metrics(&self) -> TransportMetrics {
        self.shared.metrics()
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.shared.close())
    }

    /// One Ping/Pong round trip in QUIC DATAGRAM frames, which quinn sends ahead of stream
    /// data, so the RTT is not measured behind bulk data. With `burst_bytes > 0`, a train of
    /// full-size padded Pings follows, and the spacing of their Pongs gives the rate.
    fn probe(&self, burst_bytes: u64) -> BoxFuture<'_, Result<PathSample>> {
        Box::pin(self.shared.probe(burst_bytes))
    }
}

/// Accepts AMST QUIC connections on one UDP socket.
#[derive(Debug)]
pub struct QuicListener {
    endpoint: Endpoint,
    config: SharedConfig,
    counters: Arc<ListenerCounters>,
    ready: tokio::sync::Mutex<mpsc::Receiver<Result<QuicTransport>>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// What a [`QuicListener`] has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections that completed the TLS and PSK handshakes.
    pub sessions: u64,
    /// Of those, the ones whose Hello came in 0-RTT.
    pub sessions_early: u64,
    /// Early (0-RTT) Hellos answered with a HelloAck before the TLS handshake completed,
    /// including ones whose connection then never completed (for example a replay).
    pub early_hellos_answered: u64,
    /// Connections that failed the TLS or PSK handshake, or timed out in it.
    pub handshakes_failed: u64,
}

#[derive(Debug, Default)]
struct ListenerCounters {
    sessions: AtomicU64,
    sessions_early: AtomicU64,
    early_hellos: AtomicU64,
    failed: AtomicU64,
}

/// Accepts connections and runs their handshakes concurrently, so that a slow or silent
/// client holds up only itself (for at most `handshake_timeout`), not the listener.
async fn accept_loop(
    endpoint: Endpoint,
    config: SharedConfig,
    counters: Arc<ListenerCounters>,
    ready: mpsc::Sender<Result<QuicTransport>>,
) {
    // Bounds the handshakes in progress, so a flood of connections cannot pile up tasks.
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (config, ready, counters) = (config.clone(), ready.clone(), counters.clone());
        tokio::spawn(async move {
            let r = handshake_incoming(incoming, config, &counters).await;
            match &r {
                Ok(t) => {
                    counters.sessions.fetch_add(1, Ordering::Relaxed);
                    if t.early {
                        counters.sessions_early.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
            let _ = ready.send(r).await;
        });
    }
}

async fn handshake_incoming(
    incoming: quinn::Incoming,
    config: SharedConfig,
    counters: &ListenerCounters,
) -> Result<QuicTransport> {
    let remote = incoming.remote_address();
    let what = || format!("QUIC handshake from {remote} failed");
    let connecting = incoming
        .accept()
        .map_err(|e| handshake_error(what(), &e, &config))?;
    let answered = || {
        counters.early_hellos.fetch_add(1, Ordering::Relaxed);
    };
    // With 0-RTT on, the connection is usable at once (0.5-RTT) so that an early Hello can be
    // answered in the server's first flight; `handshake::server` does nothing else before the
    // handshake completes. On the server side `into_0rtt` always succeeds.
    let early = if config.zero_rtt {
        connecting.into_0rtt()
    } else {
        Err(connecting)
    };
    let (conn, accepted) = match early {
        Ok((conn, complete)) => {
            let r = handshake::server(&conn, &config, complete, answered).await;
            let r = r.map_err(|e| tls_failure(&conn, e, what(), &config));
            (conn, r?)
        }
        Err(connecting) => {
            let conn = finish_handshake(connecting, what, &config).await?;
            let r = handshake::server(&conn, &config, std::future::ready(true), answered).await;
            (conn, r?)
        }
    };
    tracing::debug!(%remote, early = accepted.early, "QUIC transport accepted");
    Ok(QuicTransport::new(
        Shared::start(conn, None, config, accepted.control_tx, accepted.control_rx),
        accepted.early,
    ))
}

impl QuicListener {
    /// Listens on `addr`. The config needs an [`identity`](QuicConfig::identity). Call from
    /// within a tokio runtime: the handshakes run on it.
    pub fn bind(addr: SocketAddr, config: QuicConfig) -> Result<Self> {
        let socket =
            UdpSocket::bind(addr).map_err(|e| Error::io(format!("binding UDP {addr}"), e))?;
        Self::from_socket(socket, config)
    }

    /// Listens on a socket the caller bound (for example inside a network namespace).
    pub fn from_socket(socket: UdpSocket, config: QuicConfig) -> Result<Self> {
        config.validate()?;
        crate::socket::size_buffers(&socket, config.socket_buffer);
        let crypto = QuicServerConfig::try_from(tls::server_crypto(&config)?).map_err(|e| {
            Error::Config {
                field: "identity",
                reason: e.to_string(),
            }
        })?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(handshake::transport_config(&config)?));
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(endpoint_error)?;
        let config = Arc::new(config);
        let counters = Arc::new(ListenerCounters::default());
        let (tx, rx) = mpsc::channel(16);
        let acceptor = tokio::spawn(accept_loop(
            endpoint.clone(),
            config.clone(),
            counters.clone(),
            tx,
        ));
        Ok(QuicListener {
            endpoint,
            config,
            counters,
            ready: tokio::sync::Mutex::new(rx),
            acceptor,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::io("reading the listener's address", e))
    }

    /// Counts of sessions, early Hellos and failed handshakes.
    pub fn stats(&self) -> ListenerStats {
        let c = &self.counters;
        ListenerStats {
            sessions: c.sessions.load(Ordering::Relaxed),
            sessions_early: c.sessions_early.load(Ordering::Relaxed),
            early_hellos_answered: c.early_hellos.load(Ordering::Relaxed),
            handshakes_failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// The fingerprint of the certificate it presents, for a client to pin.
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        self.config.identity.as_ref().map(|i| i.fingerprint())
    }

    /// The next connection that completes the TLS and PSK handshakes. A connection that fails
    /// them is an error naming why; the listener stays usable, so call `accept` again.
    /// Handshakes run concurrently in the background, at most 64 at once.
    pub async fn accept(&self) -> Result<QuicTransport> {
        self.ready
            .lock()
            .await
            .recv()
            .await
            .unwrap_or(Err(Error::Closed))
    }

    /// Stops accepting and closes every connection it accepted.
    pub fn close(&self) {
        self.endpoint.close(
            crate::session::close_code(amst_core::codec::CloseCode::Normal),
            b"listener closed",
        );
    }
}
