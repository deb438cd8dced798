//! amst-rdma as the datacenter lane: the client dials it in place of TCP, the server accepts
//! it beside amst-tcp. amst-rdma builds everywhere; without its `rdma` feature (amst-hybrid's
//! feature `rdma`) or without a device, construction fails with "no RDMA device", and both
//! sides fall back to TCP with a logged warning (the active transport shows in
//! [`AmstMetrics::transport`](crate::AmstMetrics::transport)).
//!
//! The RDMA bootstrap is a TCP connection of its own, so it cannot share amst-tcp's port: it
//! listens on the next port number, [`RDMA_PORT_OFFSET`] above the session's address.

use std::net::SocketAddr;
use std::sync::Arc;

use amst_core::BoxFuture;
use amst_rdma::{RdmaConfig, RdmaListener, RdmaTransport};

use crate::wire;
use crate::{Acceptor, AmstConfig, Connected, DatacenterTransport, Result};

/// The RDMA bootstrap listens this many port numbers above the session's TCP port.
pub const RDMA_PORT_OFFSET: u16 = 1;

/// The bootstrap address that goes with a session address.
pub fn rdma_bootstrap_addr(addr: SocketAddr) -> Option<SocketAddr> {
    let port = addr.port().checked_add(RDMA_PORT_OFFSET)?;
    Some(SocketAddr::new(addr.ip(), port))
}

/// The amst-rdma configuration the session's settings map to.
pub fn rdma_config(config: &AmstConfig) -> RdmaConfig {
    let mut c = RdmaConfig::new(config.psk.clone());
    if let DatacenterTransport::Rdma { device, gid_index } = &config.datacenter_transport {
        c.device = device.clone();
        c.gid_index = *gid_index;
    }
    c.max_message = config.max_message + wire::DATA_HEADER_LEN as u64;
    c.send_window = c.send_window.min(config.send_window).max(1);
    c.memory_budget = config.memory_budget.clone();
    c
}

/// Dials the RDMA lane of the server at `addr` (its TCP address).
pub async fn connect_rdma(addr: SocketAddr, config: &AmstConfig) -> amst_core::Result<Connected> {
    let boot = rdma_bootstrap_addr(addr).ok_or_else(|| amst_core::Error::Config {
        field: "datacenter_transport",
        reason: format!(
            "RDMA needs port {} + {RDMA_PORT_OFFSET} for its bootstrap",
            addr.port()
        ),
    })?;
    let t = RdmaTransport::connect(boot, rdma_config(config)).await?;
    Ok(Connected {
        transport: Arc::new(t),
        hybrid: None,
    })
}

/// Accepts amst-rdma transports.
#[derive(Debug)]
pub struct RdmaAcceptor {
    listener: RdmaListener,
}

impl RdmaAcceptor {
    /// Binds the bootstrap listener at `addr`; fails with amst-core's `Unavailable` ("no
    /// RDMA device: …") on a host without one.
    pub async fn bind(addr: SocketAddr, config: &AmstConfig) -> Result<Self> {
        Ok(RdmaAcceptor {
            listener: RdmaListener::bind(addr, rdma_config(config)).await?,
        })
    }
}

impl Acceptor for RdmaAcceptor {
    fn accept(&self) -> BoxFuture<'_, Result<Connected>> {
        Box::pin(async move { crate::connect::accepted(self.listener.accept().await, "RDMA") })
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}
