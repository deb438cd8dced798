//! amst-quic behind the [`Acceptor`] trait, and an acceptor that merges several (TCP and
//! QUIC on the same port number), so that one `AmstListener` serves lanes of both kinds.

use std::net::SocketAddr;
use std::sync::Arc;

use amst_core::BoxFuture;
use amst_quic::{Identity, QuicConfig, QuicConnector, QuicListener};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::wire;
use crate::{Acceptor, AmstConfig, Connected, Error, LaneProfile, Result};

/// The server name clients ask for; verification is PSK-bound (amst-quic's default), so the
/// self-signed certificate's name is not what authenticates the server.
pub const QUIC_SERVER_NAME: &str = "amst";

/// The amst-quic configuration a lane profile maps to (client side).
pub fn quic_config(config: &AmstConfig, profile: &LaneProfile) -> QuicConfig {
    let mut q = QuicConfig::new(config.psk.clone()).with_congestion(profile.congestion.into());
    q.max_message = config.max_message + wire::DATA_HEADER_LEN as u64;
    q.memory_budget = config.memory_budget.clone();
    q
}

/// Dials one QUIC transport to `addr` through `connector`, which resumes with 0-RTT when it
/// holds a ticket from an earlier lane to the same server.
pub async fn connect_quic(
    addr: SocketAddr,
    connector: &QuicConnector,
) -> amst_core::Result<Connected> {
    let t = connector.connect(addr, QUIC_SERVER_NAME).await?;
    Ok(Connected {
        transport: Arc::new(t),
        hybrid: None,
    })
}

/// Accepts amst-quic transports.
#[derive(Debug)]
pub struct QuicAcceptor {
    listener: QuicListener,
}

impl QuicAcceptor {
    /// Binds UDP `addr` with a fresh self-signed certificate (clients verify the server
    /// through the PSK handshake bound to the TLS session).
    pub fn bind(addr: SocketAddr, config: &AmstConfig) -> Result<Self> {
        let identity = Identity::self_signed(&[QUIC_SERVER_NAME])?;
        let mut q = QuicConfig::new(config.psk.clone()).with_identity(identity);
        q.max_message = config.max_message + wire::DATA_HEADER_LEN as u64;
        q.memory_budget = config.memory_budget.clone();
        Ok(QuicAcceptor {
            listener: QuicListener::bind(addr, q)?,
        })
    }
}

impl Acceptor for QuicAcceptor {
    fn accept(&self) -> BoxFuture<'_, Result<Connected>> {
        Box::pin(async move { crate::connect::accepted(self.listener.accept().await, "QUIC") })
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}

/// Several acceptors as one: whichever yields a transport first.
#[derive(Debug)]
pub struct MultiAcceptor {
    rx: tokio::sync::Mutex<mpsc::Receiver<Result<Connected>>>,
    local: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl MultiAcceptor {
    /// Merges `acceptors`; `local_addr` reports the first one's.
    pub fn new(acceptors: Vec<Arc<dyn Acceptor>>) -> Self {
        let local = acceptors.first().and_then(|a| a.local_addr());
        let (tx, rx) = mpsc::channel(16);
        let tasks = acceptors
            .into_iter()
            .map(|a| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    loop {
                        let r = a.accept().await;
                        let stop = matches!(r, Err(Error::Closed(_)));
                        if let Err(e) = &r
                            && !stop
                        {
                            warn!("incoming transport refused: {e}");
                            continue;
                        }
                        if stop || tx.send(r).await.is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        MultiAcceptor {
            rx: tokio::sync::Mutex::new(rx),
            local,
            tasks,
        }
    }
}

impl Drop for MultiAcceptor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Acceptor for MultiAcceptor {
    fn accept(&self) -> BoxFuture<'_, Result<Connected>> {
        Box::pin(async move {
            self.rx
                .lock()
                .await
                .recv()
                .await
                .unwrap_or_else(|| Err(Error::Closed("every listener stopped".into())))
        })
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }
}
