//! `QuicConnector`: makes client connections and keeps their TLS session tickets, so that a
//! reconnect to the same server name resumes the session and sends its Hello in 0-RTT.
//!
//! A ticket is kept only once the AMST handshake on the connection that brought it has
//! succeeded. Until then the server is not known to be genuine (with
//! [`PeerVerification::PskBound`](crate::PeerVerification::PskBound) nothing but that
//! handshake authenticates it), and the early Hello is unbound precisely because a session
//! resumed from a kept ticket can only be with the server that issued it.

use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use amst_core::{Error, Result};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Endpoint, EndpointConfig, TokioRuntime};
use rustls::NamedGroup;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls12Resumption, Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;

use crate::config::QuicConfig;
use crate::handshake;
use crate::session::Shared;
use crate::tls;
use crate::transport::{QuicTransport, finish_handshake, handshake_error};

/// How a [`QuicConnector`]'s connections went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectorStats {
    /// Connections that completed the TLS and PSK handshakes.
    pub connects: u64,
    /// Connections that sent their Hello in 0-RTT (a ticket for the server name was held).
    pub zero_rtt_attempted: u64,
    /// Of those, the ones whose server accepted the early data (the rest fell back to the
    /// full handshake on the same connection).
    pub zero_rtt_accepted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connects: AtomicU64,
    attempted: AtomicU64,
    accepted: AtomicU64,
}

/// Connects to [`QuicListener`](crate::QuicListener)s with one configuration, remembering
/// session tickets across connections: the second and later connections to a server name
/// resume TLS and, with [`QuicConfig::zero_rtt`], send the AMST Hello in 0-RTT, which saves
/// one round trip before data flows. Keep one connector for reconnects to the same server;
/// [`QuicTransport::connect`] uses a fresh one each time and so never resumes.
///
/// Tickets are bound to this connector's configuration: a resumed session shows no
/// certificate, so a connector with other trust settings must not use them.
pub struct QuicConnector {
    config: Arc<QuicConfig>,
    tls: Arc<rustls::ClientConfig>,
    transport: Arc<quinn::TransportConfig>,
    tickets: Arc<ClientSessionMemoryCache>,
    counters: Counters,
}

impl fmt::Debug for QuicConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicConnector")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl QuicConnector {
    /// A connector with `config` (validated here) and an empty ticket cache.
    pub fn new(config: QuicConfig) -> Result<Self> {
        config.validate()?;
        let tls = tls::client_crypto(&config)?;
        let transport = handshake::transport_config(&config)?;
        Ok(QuicConnector {
            config: Arc::new(config),
            tls: Arc::new(tls),
            transport: Arc::new(transport),
            // Up to 64 server names; rustls keeps a few tickets per name.
            tickets: Arc::new(ClientSessionMemoryCache::new(64)),
            counters: Counters::default(),
        })
    }

    /// The configuration every connection uses.
    pub fn config(&self) -> &QuicConfig {
        &self.config
    }

    /// Counts of connections and of 0-RTT attempts and acceptances.
    pub fn stats(&self) -> ConnectorStats {
        ConnectorStats {
            connects: self.counters.connects.load(Ordering::Relaxed),
            zero_rtt_attempted: self.counters.attempted.load(Ordering::Relaxed),
            zero_rtt_accepted: self.counters.accepted.load(Ordering::Relaxed),
        }
    }

    /// Connects to `addr` from a fresh UDP socket on an ephemeral port. `server_name` is
    /// checked against the certificate with [`PeerVerification::Roots`](crate::PeerVerification::Roots),
    /// and names the tickets kept for resumption.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> Result<QuicTransport> {
        let any: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket =
            UdpSocket::bind(any).map_err(|e| Error::io(format!("binding UDP {any}"), e))?;
        self.connect_with_socket(socket, addr, server_name).await
    }

    /// Like [`connect`](Self::connect), from a socket the caller bound (for example inside
    /// a network namespace).
    pub async fn connect_with_socket(
        &self,
        socket: UdpSocket,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<QuicTransport> {
        let config = &self.config;
        crate::socket::size_buffers(&socket, config.socket_buffer);
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            None,
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(|e| Error::io("creating the QUIC endpoint", e))?;
        // Each connection gets its own gate in front of the shared cache, so a ticket from a
        // connection that fails authentication never reaches it.
        let gate = Arc::new(TicketGate::new(self.tickets.clone()));
        let mut tls = (*self.tls).clone();
        tls.resumption =
            Resumption::store(gate.clone()).tls12_resumption(Tls12Resumption::Disabled);
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| Error::Config {
            field: "verification",
            reason: e.to_string(),
        })?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(self.transport.clone());
        let connecting = endpoint
            .connect_with(client, addr, server_name)
            .map_err(|e| Error::Config {
                field: "server_name",
                reason: format!("cannot connect to {addr} as {server_name:?}: {e}"),
            })?;
        let what = || format!("QUIC handshake with {addr} failed");
        let early = if config.zero_rtt {
            connecting.into_0rtt()
        } else {
            Err(connecting)
        };
        let (conn, control_tx, control_rx, early) = match early {
            Ok((conn, accepted)) => {
                self.counters.attempted.fetch_add(1, Ordering::Relaxed);
                let r = handshake::client_early(&conn, accepted, config).await;
                let (tx, rx, early) = r.map_err(|e| tls_failure(&conn, e, what(), config))?;
                if early {
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                }
                (conn, tx, rx, early)
            }
            Err(connecting) => {
                let conn = finish_handshake(connecting, what, config).await?;
                let (tx, rx) = handshake::client(&conn, config).await?;
                (conn, tx, rx, false)
            }
        };
        gate.commit();
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%addr, cc = %config.congestion, early, "QUIC transport connected");
        Ok(QuicTransport::new(
            Shared::start(
                conn,
                Some(endpoint),
                self.config.clone(),
                control_tx,
                control_rx,
            ),
            early,
        ))
    }
}

/// A TLS failure on a connection used before its handshake completed surfaces as a closed
/// connection; say what the alert means, as a failed `Connecting` would.
pub(crate) fn tls_failure(
    conn: &quinn::Connection,
    e: Error,
    what: String,
    config: &QuicConfig,
) -> Error {
    use quinn::ConnectionError as C;
    match conn.close_reason() {
        Some(ce @ (C::TransportError(_) | C::ConnectionClosed(_))) => {
            handshake_error(what, &ce, config)
        }
        _ => e,
    }
}

/// A connection's view of the connector's ticket cache: lookups go to the cache, new tickets
/// wait until [`commit`](Self::commit) (the AMST handshake succeeded) and are dropped with
/// the gate otherwise.
struct TicketGate {
    cache: Arc<ClientSessionMemoryCache>,
    /// `Some` until committed.
    pending: Mutex<Option<Vec<(ServerName<'static>, Tls13ClientSessionValue)>>>,
}

impl fmt::Debug for TicketGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pending = self.lock().as_ref().map(Vec::len);
        f.debug_struct("TicketGate")
            .field("pending", &pending)
            .finish_non_exhaustive()
    }
}

impl TicketGate {
    fn new(cache: Arc<ClientSessionMemoryCache>) -> Self {
        TicketGate {
            cache,
            pending: Mutex::new(Some(Vec::new())),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<Vec<(ServerName<'static>, Tls13ClientSessionValue)>>>
    {
        amst_core::util::lock(&self.pending)
    }

    /// The server is authenticated: keep its tickets, the ones held back and any later ones.
    fn commit(&self) {
        if let Some(held) = self.lock().take() {
            for (name, value) in held {
                self.cache.insert_tls13_ticket(name, value);
            }
        }
    }
}

impl ClientSessionStore for TicketGate {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.cache.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.cache.kx_hint(server_name)
    }

    // TLS 1.2 is never negotiated (TLS 1.3 only), so there is nothing to keep.
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut pending = self.lock();
        match pending.as_mut() {
            // Bounded: a server sends a few tickets per connection; more are not needed.
            Some(held) if held.len() < 8 => held.push((server_name, value)),
            Some(_) => {}
            None => {
                drop(pending);
                self.cache.insert_tls13_ticket(server_name, value);
            }
        }
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.cache.take_tls13_ticket(server_name)
    }
}
