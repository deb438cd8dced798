//! The public face: [`RdmaTransport`], [`RdmaListener`] and [`devices`], the same with or
//! without the `rdma` feature, so that callers need no `cfg` of their own.

use std::net::SocketAddr;

use amst_core::{AckWatch, BoxFuture, Error, Result, Transport, TransportKind, TransportMetrics};
use bytes::Bytes;
use tokio::net::TcpListener;

use crate::config::RdmaConfig;

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        transport: TransportKind::Rdma,
        reason: reason.into(),
    }
}

/// Names of the RDMA devices on this host, or `Unavailable` ("no RDMA device: …") when there
/// are none, libibverbs is missing, or this build lacks the `rdma` feature.
pub fn devices() -> Result<Vec<String>> {
    #[cfg(feature = "rdma")]
    {
        crate::verbs::device_names().map_err(unavailable)
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err(unavailable(
            "no RDMA device: amst-rdma was built without the `rdma` cargo feature",
        ))
    }
}

#[cfg(not(feature = "rdma"))]
#[derive(Debug)]
enum Never {}

/// A reliable, ordered message transport over one RC queue pair.
#[derive(Debug)]
pub struct RdmaTransport {
    #[cfg(feature = "rdma")]
    inner: std::sync::Arc<crate::verbs::Session>,
    #[cfg(not(feature = "rdma"))]
    never: Never,
}

impl RdmaTransport {
    /// Connects to an [`RdmaListener`] at `addr` (its TCP bootstrap address).
    pub async fn connect(addr: SocketAddr, config: RdmaConfig) -> Result<Self> {
        config.validate()?;
        devices()?;
        #[cfg(feature = "rdma")]
        {
            let (mut stream, _, mut left) = crate::bootstrap::dial(addr, &config).await?;
            let inner = crate::verbs::Session::establish(&mut stream, &mut left, config).await?;
            inner.start(stream);
            Ok(RdmaTransport { inner })
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = addr;
            unreachable!("devices() fails without the rdma feature")
        }
    }
}

/// Accepts RDMA sessions: a TCP listener for the bootstrap.
#[derive(Debug)]
pub struct RdmaListener {
    tcp: TcpListener,
    config: RdmaConfig,
}

impl RdmaListener {
    /// Binds the bootstrap listener. Fails with `Unavailable` first when there is no device,
    /// so that a caller does not advertise RDMA it cannot serve.
    pub async fn bind(addr: SocketAddr, config: RdmaConfig) -> Result<Self> {
        config.validate()?;
        devices()?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding the RDMA bootstrap listener on {addr}"), e))?;
        Ok(RdmaListener { tcp, config })
    }

    /// The bootstrap address to give to [`RdmaTransport::connect`].
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.tcp
            .local_addr()
            .map_err(|e| Error::io("reading the listener address", e))
    }

    /// Accepts and sets up the next session.
    pub async fn accept(&self) -> Result<RdmaTransport> {
        let (mut stream, _) = self
            .tcp
            .accept()
            .await
            .map_err(|e| Error::io("accepting an RDMA bootstrap connection", e))?;
        let (_, left) = crate::bootstrap::accept(&mut stream, &self.config).await?;
        #[cfg(feature = "rdma")]
        {
            let mut left = left;
            let inner =
                crate::verbs::Session::establish(&mut stream, &mut left, self.config.clone())
                    .await?;
            inner.start(stream);
            Ok(RdmaTransport { inner })
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = left;
            unreachable!("bind() fails without the rdma feature")
        }
    }
}

#[cfg(feature = "rdma")]
impl RdmaTransport {
    /// Tears the queue pair down at once, without the graceful drain: the peer sees its
    /// operations fail. For failure tests and for abandoning a stuck transport.
    pub fn abort(&self) {
        self.inner.abort();
    }

    /// Test hook: destroys only the queue pair and keeps the bootstrap connection open, so
    /// the peer sees nothing but failing work requests (retry exceeded).
    #[doc(hidden)]
    pub fn destroy_qp_keep_bootstrap(&self) {
        self.inner.destroy_qp_keep_bootstrap();
    }
}

impl Transport for RdmaTransport {
    fn send(&self, message: Bytes) -> BoxFuture<'_, Result<()>> {
        #[cfg(feature = "rdma")]
        {
            Box::pin(self.inner.send(message))
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = message;
            match self.never {}
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        #[cfg(feature = "rdma")]
        {
            Box::pin(self.inner.flush())
        }
        #[cfg(not(feature = "rdma"))]
        match self.never {}
    }

    fn recv(&self) -> BoxFuture<'_, Result<Option<Bytes>>> {
        #[cfg(feature = "rdma")]
        {
            Box::pin(self.inner.recv())
        }
        #[cfg(not(feature = "rdma"))]
        match self.never {}
    }

    fn metrics(&self) -> TransportMetrics {
        #[cfg(feature = "rdma")]
        {
            self.inner.metrics()
        }
        #[cfg(not(feature = "rdma"))]
        match self.never {}
    }

    fn acked(&self) -> AckWatch {
        #[cfg(feature = "rdma")]
        {
            self.inner.acked()
        }
        #[cfg(not(feature = "rdma"))]
        match self.never {}
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        #[cfg(feature = "rdma")]
        {
            Box::pin(self.inner.close())
        }
        #[cfg(not(feature = "rdma"))]
        match self.never {}
    }
}
