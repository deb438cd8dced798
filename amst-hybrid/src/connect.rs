//! How the hybrid manager gets transports: a client-side [`Connector`] dials one per lane
//! profile, a server-side [`Acceptor`] yields each authenticated incoming one. Real transports
//! (amst-tcp, later amst-quic and amst-rdma) and the in-memory test network implement them.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use amst_core::{BoxFuture, Transport};

use crate::{LaneProfile, Result};

/// A freshly authenticated transport and what the handshake negotiated.
#[derive(Clone)]
pub struct Connected {
    /// The transport.
    pub transport: Arc<dyn Transport>,
    /// Whether both ends advertised `capabilities::HYBRID`: only then do messages carry
    /// hybrid frames. A plain peer gets plain messages and no switching. `None` when the
    /// transport cannot tell: the server then recognises a hybrid client by its first
    /// message (an Open with its magic, or an Attach) and treats anything else as plain.
    pub hybrid: Option<bool>,
}

impl fmt::Debug for Connected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connected")
            .field("transport", &self.transport.metrics().kind)
            .field("hybrid", &self.hybrid)
            .finish()
    }
}

/// Dials a transport for a lane profile (client side).
pub trait Connector: Send + Sync + fmt::Debug + 'static {
    /// Connects and authenticates one transport set up as `profile` says.
    fn connect<'a>(&'a self, profile: &'a LaneProfile) -> BoxFuture<'a, Result<Connected>>;
}

/// Yields authenticated incoming transports (server side).
pub trait Acceptor: Send + Sync + fmt::Debug + 'static {
    /// The next incoming transport.
    fn accept(&self) -> BoxFuture<'_, Result<Connected>>;

    /// The address the acceptor listens on, if it has one.
    fn local_addr(&self) -> Option<SocketAddr> {
        None
    }
}

#[cfg(feature = "in-memory")]
pub use memory::{MemoryAcceptor, MemoryConnector, memory_network};

#[cfg(feature = "in-memory")]
mod memory {
    use std::sync::Mutex;

    use amst_core::InMemoryTransport;
    use tokio::sync::mpsc;

    use super::*;
    use crate::Error;

    /// The client side of an in-memory network: every `connect` makes a fresh
    /// [`InMemoryTransport`] pair and hands the other end to the [`MemoryAcceptor`].
    #[derive(Debug, Clone)]
    pub struct MemoryConnector {
        tx: mpsc::UnboundedSender<Connected>,
        capacity: usize,
        client_hybrid: bool,
        server_hybrid: bool,
        dialed: Arc<Mutex<Vec<LaneProfile>>>,
        /// The client end of every transport made, for [`cut_all`](Self::cut_all).
        made: Arc<Mutex<Vec<Arc<InMemoryTransport>>>>,
    }

    /// The server side of an in-memory network.
    #[derive(Debug)]
    pub struct MemoryAcceptor {
        rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Connected>>,
    }

    /// A connected in-memory network whose transports buffer `capacity` messages per
    /// direction; both ends advertise HYBRID.
    pub fn memory_network(capacity: usize) -> (MemoryConnector, MemoryAcceptor) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            MemoryConnector {
                tx,
                capacity,
                client_hybrid: true,
                server_hybrid: true,
                dialed: Arc::default(),
                made: Arc::default(),
            },
            MemoryAcceptor {
                rx: tokio::sync::Mutex::new(rx),
            },
        )
    }

    impl MemoryConnector {
        /// Sets whether each end advertises HYBRID (a plain peer does not).
        pub fn with_hybrid(mut self, client: bool, server: bool) -> Self {
            self.client_hybrid = client;
            self.server_hybrid = server;
            self
        }

        /// Every profile dialed so far, in order.
        pub fn dialed(&self) -> Vec<LaneProfile> {
            amst_core::util::lock(&self.dialed).clone()
        }

        /// Cuts every transport made so far, as a network outage would
        /// ([`InMemoryTransport::cut`]); later connects work.
        pub fn cut_all(&self) {
            for t in amst_core::util::lock(&self.made).drain(..) {
                t.cut();
            }
        }

        /// Connects without a profile, as a plain transport user would; returns the client end.
        pub fn connect_raw(&self) -> Result<Arc<dyn Transport>> {
            let (a, b) = InMemoryTransport::pair(self.capacity);
            let a = Arc::new(a);
            amst_core::util::lock(&self.made).push(a.clone());
            self.tx
                .send(Connected {
                    transport: Arc::new(b),
                    hybrid: Some(self.client_hybrid && self.server_hybrid),
                })
                .map_err(|_| Error::Closed("the in-memory acceptor is gone".into()))?;
            Ok(a)
        }
    }

    impl Connector for MemoryConnector {
        fn connect<'a>(&'a self, profile: &'a LaneProfile) -> BoxFuture<'a, Result<Connected>> {
            Box::pin(async move {
                amst_core::util::lock(&self.dialed).push(profile.clone());
                let transport = self.connect_raw()?;
                Ok(Connected {
                    transport,
                    hybrid: Some(self.client_hybrid && self.server_hybrid),
                })
            })
        }
    }

    impl Acceptor for MemoryAcceptor {
        fn accept(&self) -> BoxFuture<'_, Result<Connected>> {
            Box::pin(async move {
                self.rx
                    .lock()
                    .await
                    .recv()
                    .await
                    .ok_or_else(|| Error::Closed("every in-memory connector is gone".into()))
            })
        }
    }
}

/// What an acceptor yields for one `accept` of a transport listener: a transport whose
/// negotiation result is unknown, or the listener's end as [`Error::Closed`](crate::Error::Closed)
/// naming `listener`.
pub(crate) fn accepted<T: Transport + 'static>(
    accept: amst_core::Result<T>,
    listener: &str,
) -> Result<Connected> {
    match accept {
        Ok(t) => Ok(Connected {
            transport: Arc::new(t),
            hybrid: None,
        }),
        Err(amst_core::Error::Closed) => Err(crate::Error::Closed(format!(
            "the {listener} listener stopped"
        ))),
        Err(e) => Err(e.into()),
    }
}
