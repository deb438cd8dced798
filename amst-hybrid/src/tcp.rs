//! amst-tcp behind the [`Connector`] and [`Acceptor`] traits: one multi-stream TCP transport
//! per lane, set up from the lane's profile.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use amst_core::codec::Psk;
use amst_core::util::lock;
use amst_core::{BoxFuture, Mode, TransportKind};
use amst_quic::QuicConnector;
use amst_tcp::{MAX_CHUNK, MIN_CHUNK, TcpConfig, TcpListener, TcpTransport};
use tracing::warn;

use crate::wire;
use crate::{Acceptor, AmstConfig, Congestion, Connected, Connector, LaneProfile, Result};

/// Dials amst-tcp transports to one server address.
///
/// Lanes whose profile asks for QUIC are dialed with amst-quic to the same port number over
/// UDP (an `Amst::listen` server binds both); lanes asking for RDMA are dialed with amst-rdma
/// to the next port number ([`RDMA_PORT_OFFSET`](crate::RDMA_PORT_OFFSET)). If that fails (no
/// RDMA device, no RDMA at the server), the lane falls back to TCP with a logged reason.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    addr: SocketAddr,
    psk: Psk,
    max_message: u64,
    config: AmstConfig,
    /// One QUIC connector per congestion controller, kept across switches so that a lane
    /// coming back to QUIC resumes its TLS session with 0-RTT instead of a full handshake.
    quic: Arc<Mutex<HashMap<Congestion, Arc<QuicConnector>>>>,
}

impl TcpConnector {
    /// A connector to `addr` with the session's key and limits.
    pub fn new(addr: SocketAddr, config: &AmstConfig) -> Self {
        TcpConnector {
            addr,
            psk: config.psk.clone(),
            max_message: config.max_message,
            config: config.clone(),
            quic: Arc::default(),
        }
    }

    /// The QUIC connector for `profile`, made on first use.
    fn quic_connector(&self, profile: &LaneProfile) -> amst_core::Result<Arc<QuicConnector>> {
        let mut connectors = lock(&self.quic);
        if let Some(c) = connectors.get(&profile.congestion) {
            return Ok(c.clone());
        }
        let c = Arc::new(QuicConnector::new(crate::quic::quic_config(
            &self.config,
            profile,
        ))?);
        connectors.insert(profile.congestion, c.clone());
        Ok(c)
    }

    /// Connections made and 0-RTT resumptions, summed over this connector's QUIC lanes.
    pub fn quic_stats(&self) -> amst_quic::ConnectorStats {
        let connectors = lock(&self.quic);
        let mut sum = amst_quic::ConnectorStats::default();
        for s in connectors.values().map(|c| c.stats()) {
            sum.connects += s.connects;
            sum.zero_rtt_attempted += s.zero_rtt_attempted;
            sum.zero_rtt_accepted += s.zero_rtt_accepted;
        }
        sum
    }

    /// The amst-tcp configuration for a lane profile.
    pub fn tcp_config(&self, profile: &LaneProfile) -> TcpConfig {
        tcp_config(&self.psk, profile, self.max_message)
            .with_memory_budget(self.config.memory_budget.clone())
    }
}

/// The amst-tcp configuration a lane profile maps to.
pub fn tcp_config(psk: &Psk, profile: &LaneProfile, max_message: u64) -> TcpConfig {
    let mut c = match profile.preset {
        Mode::Datacenter => TcpConfig::datacenter(psk.clone()),
        _ => TcpConfig::internet(psk.clone()),
    };
    c.streams = profile.streams;
    c.min_streams = profile.min_streams.min(profile.streams);
    c.max_streams = profile.max_streams.max(profile.streams);
    c.congestion = profile.congestion;
    c.pacing = profile.pacing;
    c.aggressive = profile.aggressive;
    c.chunk_size = profile.chunk_size.clamp(MIN_CHUNK, MAX_CHUNK);
    c.max_message = max_message + wire::DATA_HEADER_LEN as u64;
    // TLS as in amst-tcp's presets: on for internet lanes, off for datacenter ones. One
    // listener (`TcpAcceptor`) takes both, stream by stream.
    c
}

impl Connector for TcpConnector {
    fn connect<'a>(&'a self, profile: &'a LaneProfile) -> BoxFuture<'a, Result<Connected>> {
        Box::pin(async move {
            match profile.transport {
                TransportKind::Tcp => {}
                TransportKind::Quic => {
                    let dialed = match self.quic_connector(profile) {
                        Ok(connector) => crate::quic::connect_quic(self.addr, &connector).await,
                        Err(e) => Err(e),
                    };
                    match dialed {
                        Ok(c) => return Ok(c),
                        Err(e) => warn!(
                            "QUIC transport unavailable ({e}); falling back to TCP for the {} lane",
                            profile.preset
                        ),
                    }
                }
                TransportKind::Rdma => {
                    match crate::rdma::connect_rdma(self.addr, &self.config).await {
                        Ok(c) => return Ok(c),
                        Err(e) => warn!(
                            "RDMA transport unavailable ({e}); falling back to TCP for the {} lane",
                            profile.preset
                        ),
                    }
                }
                other => warn!(
                    "{other} transport unavailable (amst-hybrid has no {other} connector); falling back to TCP for the {} lane",
                    profile.preset
                ),
            }
            let t = TcpTransport::connect(self.addr, self.tcp_config(profile)).await?;
            Ok(Connected {
                transport: Arc::new(t),
                // amst-tcp negotiates HYBRID but does not report the result; the server
                // recognises a plain peer by its first message instead.
                hybrid: None,
            })
        })
    }
}

/// Accepts amst-tcp transports for an `AmstListener`.
#[derive(Debug)]
pub struct TcpAcceptor {
    listener: TcpListener,
}

impl TcpAcceptor {
    /// Binds `addr`. The server follows whatever streams each client opens, so it is set up
    /// for the largest profile (datacenter, up to `config.max_streams` streams). It speaks
    /// TLS to the clients that start it (internet lanes) and plain TCP to the others.
    pub async fn bind(addr: SocketAddr, config: &AmstConfig) -> Result<Self> {
        let mut c = TcpConfig::datacenter(config.psk.clone());
        c.max_streams = config.max_streams.max(c.max_streams);
        c.max_message = config.max_message + wire::DATA_HEADER_LEN as u64;
        c.tls = Some(amst_tcp::TcpTls::psk_bound().with_plaintext_too());
        c.memory_budget = config.memory_budget.clone();
        Ok(TcpAcceptor {
            listener: TcpListener::bind(addr, c).await?,
        })
    }

    /// Wraps a listener bound elsewhere (e.g. with custom amst-tcp settings).
    pub fn from_listener(listener: TcpListener) -> Self {
        TcpAcceptor { listener }
    }
}

impl Acceptor for TcpAcceptor {
    fn accept(&self) -> BoxFuture<'_, Result<Connected>> {
        Box::pin(async move { crate::connect::accepted(self.listener.accept().await, "TCP") })
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        Some(self.listener.local_addr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic::QuicAcceptor;

    #[tokio::test]
    async fn a_lane_coming_back_to_quic_resumes_with_0rtt() {
        let config = AmstConfig::builder(Psk::new(b"a key for the 0-RTT lane test").unwrap())
            .internet_transport(TransportKind::Quic)
            .build()
            .unwrap();
        let acceptor = QuicAcceptor::bind("127.0.0.1:0".parse().unwrap(), &config).unwrap();
        let addr = acceptor.local_addr().unwrap();
        let connector = TcpConnector::new(addr, &config);
        let profile = config.profile(Mode::Internet).unwrap();
        for _ in 0..2 {
            let (client, server) = tokio::join!(connector.connect(&profile), acceptor.accept());
            let (client, server) = (client.unwrap(), server.unwrap());
            assert_eq!(client.transport.metrics().kind, TransportKind::Quic);
            client.transport.close().await.unwrap();
            drop(server);
        }
        let stats = connector.quic_stats();
        assert_eq!(stats.connects, 2, "{stats:?}");
        assert_eq!(stats.zero_rtt_attempted, 1, "{stats:?}");
        assert_eq!(stats.zero_rtt_accepted, 1, "{stats:?}");
    }
}
