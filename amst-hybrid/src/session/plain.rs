//! A plain session: the peer speaks plain AMST (no HYBRID), so messages go as they are on
//! its one transport, with no sequence numbers, no ledger and no switching.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use amst_core::util::lock;
use amst_core::{Mode, Transport};
use bytes::Bytes;

use super::Role;
use crate::metrics::Instruments;
use crate::{AmstConfig, Error, Result};

/// A session with a plain AMST peer on one transport.
#[derive(Debug)]
pub(crate) struct PlainSession {
    pub role: Role,
    pub config: AmstConfig,
    pub transport: Arc<dyn Transport>,
    /// The mode the transport was set up for; it never changes.
    pub mode: Mode,
    pub instruments: Instruments,
    /// The first message, read while telling plain from hybrid; `recv` returns it first.
    first: Mutex<Option<Bytes>>,
    closing: AtomicBool,
}

impl PlainSession {
    pub fn new(
        role: Role,
        config: AmstConfig,
        transport: Arc<dyn Transport>,
        mode: Mode,
        first: Option<Bytes>,
    ) -> Arc<Self> {
        let instruments = Instruments::new(role);
        instruments.mode(mode);
        Arc::new(PlainSession {
            role,
            config,
            transport,
            mode,
            instruments,
            first: Mutex::new(first),
            closing: AtomicBool::new(false),
        })
    }

    pub fn check_open(&self) -> Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Closed("closed by this side".into()));
        }
        Ok(())
    }

    pub async fn send(&self, msg: Bytes) -> Result<()> {
        self.check_open()?;
        if msg.len() as u64 > self.config.max_message {
            return Err(Error::Core(amst_core::Error::MessageTooLarge {
                len: msg.len() as u64,
                limit: self.config.max_message,
            }));
        }
        let len = msg.len();
        self.transport.send(msg).await?;
        self.instruments.sent(len);
        Ok(())
    }

    pub async fn flush(&self) -> Result<()> {
        Ok(self.transport.flush().await?)
    }

    pub async fn recv(&self) -> Result<Option<Bytes>> {
        if let Some(m) = lock(&self.first).take() {
            self.instruments.received(m.len());
            return Ok(Some(m));
        }
        let m = self.transport.recv().await?;
        if let Some(m) = &m {
            self.instruments.received(m.len());
        }
        Ok(m)
    }

    /// Closes the transport, which drains what it holds (up to `drain_timeout`).
    pub async fn close(&self) -> Result<()> {
        if self.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _ = tokio::time::timeout(self.config.drain_timeout, self.transport.close()).await;
        Ok(())
    }
}
