//! The server side: accept TCP connections, authenticate each, and either start a session or
//! attach the stream to the live session its Hello names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use amst_core::codec::SessionId;
use amst_core::{Error, Result};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::config::TcpConfig;
use crate::handshake::{self, Accepted};
use crate::session::{Role, Shared, hex, lock};
use crate::transport::TcpTransport;

type Sessions = Arc<Mutex<HashMap<SessionId, Weak<Shared>>>>;

/// Accepts AMST sessions. Each [`accept`](Self::accept) yields one authenticated session;
/// the extra streams of a live session are attached to it by session id and never show up
/// here.
#[derive(Debug)]
pub struct TcpListener {
    local: SocketAddr,
    incoming: tokio::sync::Mutex<mpsc::Receiver<TcpTransport>>,
    task: AbortHandle,
}

/// At most this many rejected-handshake warnings per second; the rest are counted.
const REJECT_LOGS_PER_SEC: u32 = 10;

#[derive(Debug)]
struct RejectLog {
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl RejectLog {
    fn log(&mut self, peer: SocketAddr, error: &Error) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                warn!(
                    suppressed = self.suppressed,
                    "rejected handshakes not logged in the last second"
                );
            }
            self.window = Instant::now();
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < REJECT_LOGS_PER_SEC {
            self.logged += 1;
            warn!(%peer, %error, "handshake rejected; stream dropped");
        } else {
            self.suppressed += 1;
        }
    }
}

impl TcpListener {
    /// Binds and starts accepting in the background.
    pub async fn bind(addr: SocketAddr, config: TcpConfig) -> Result<Self> {
        config.validate()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(listener, Arc::new(config), tx));
        info!(%local, "listening");
        Ok(TcpListener {
            local,
            incoming: tokio::sync::Mutex::new(rx),
            task: task.abort_handle(),
        })
    }

    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next authenticated session.
    pub async fn accept(&self) -> Result<TcpTransport> {
        self.incoming.lock().await.recv().await.ok_or(Error::Closed)
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        // Live sessions keep running; only the accepting stops.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    config: Arc<TcpConfig>,
    out: mpsc::Sender<TcpTransport>,
) {
    let sessions: Sessions = Arc::default();
    let rejects = Arc::new(Mutex::new(RejectLog {
        window: Instant::now(),
        logged: 0,
        suppressed: 0,
    }));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (config, sessions, out, rejects) = (
            config.clone(),
            sessions.clone(),
            out.clone(),
            rejects.clone(),
        );
        tokio::spawn(async move {
            let find = |id: &SessionId| lock(&sessions).get(id).and_then(Weak::upgrade);
            let cap = || {
                let mut map = lock(&sessions);
                map.retain(|_, w| w.strong_count() > 0);
                (map.len() >= config.max_sessions)
                    .then(|| format!("this server already serves {} sessions", map.len()))
            };
            let accepted = match handshake::accept(stream, &config, find, cap).await {
                Ok(a) => a,
                Err(e) => {
                    lock(&rejects).log(peer, &e);
                    return;
                }
            };
            match accepted {
                Accepted::Join(session, a) => {
                    let slot = a.established.stream_index;
                    if let Err(e) = session.attach(a.stream, slot, a.leftover, a.applied) {
                        warn!(%peer, session = %hex(&session.session_id), error = %e, "stream not attached");
                    }
                }
                Accepted::New(a) => {
                    let id = a.established.session_id;
                    {
                        let mut map = lock(&sessions);
                        map.retain(|_, w| w.strong_count() > 0);
                        if map.len() >= config.max_sessions {
                            let e = Error::Config {
                                field: "max_sessions",
                                reason: format!(
                                    "this server already serves {} sessions",
                                    map.len()
                                ),
                            };
                            drop(map);
                            lock(&rejects).log(peer, &e);
                            return;
                        }
                    }
                    let shared = Shared::new((*config).clone(), Role::Server, id);
                    if let Err(e) =
                        shared.attach(a.stream, a.established.stream_index, a.leftover, a.applied)
                    {
                        warn!(%peer, error = %e, "first stream not attached");
                        shared.teardown();
                        return;
                    }
                    lock(&sessions).insert(id, Arc::downgrade(&shared));
                    debug!(%peer, session = %hex(&id), "session accepted");
                    let transport = TcpTransport::from_shared(shared);
                    if out.send(transport).await.is_err() {
                        debug!("listener dropped; session discarded");
                    }
                }
            }
        });
    }
}
