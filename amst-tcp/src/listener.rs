//! The server side: accept TCP connections, authenticate each, and either start a session or
//! attach the stream to the live session its Hello names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use amst_core::codec::SessionId;
use amst_core::{Error, Result};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::TcpConfig;
use crate::handshake::{self, Accepted};
use crate::session::{Role, Shared, hex, lock};
use crate::tls::{Fingerprint, ServerTls};
use crate::transport::TcpTransport;

type Sessions = Arc<Mutex<HashMap<SessionId, Weak<Shared>>>>;

/// Accepts AMST sessions. Each [`accept`](Self::accept) yields one authenticated session;
/// the extra streams of a live session are attached to it by session id and never show up
/// here.
///
/// Dropping the listener refuses new sessions at once, but the port stays open for the
/// sessions it already accepted: their remaining streams, added streams and re-dials still
/// join through it. The port closes when the last of those sessions ends, as a QUIC endpoint
/// lives on while its connections do.
#[derive(Debug)]
pub struct TcpListener {
    local: SocketAddr,
    pending: Arc<AtomicUsize>,
    fingerprint: Option<Fingerprint>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<TcpTransport>>,
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
        let tls = config.tls.as_ref().map(crate::tls::server).transpose()?;
        let fingerprint = tls.as_ref().map(|t| t.fingerprint);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        let (tx, rx) = mpsc::channel(64);
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept_loop(
            listener,
            Arc::new(config),
            tls,
            pending.clone(),
            tx,
        ));
        info!(%local, tls = ?fingerprint, "listening");
        Ok(TcpListener {
            local,
            pending,
            fingerprint,
            incoming: tokio::sync::Mutex::new(rx),
        })
    }

    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The SHA-256 fingerprint of the certificate this listener presents, if TLS is on; a
    /// client pins it with [`TcpTls::pinned`](crate::TcpTls::pinned).
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        self.fingerprint
    }

    /// Connections whose handshake is in progress now (at most
    /// [`max_pending_handshakes`](TcpConfig::max_pending_handshakes)).
    pub fn pending_handshakes(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The next authenticated session.
    pub async fn accept(&self) -> Result<TcpTransport> {
        self.incoming.lock().await.recv().await.ok_or(Error::Closed)
    }
}

/// A session counts against `max_sessions` until it is torn down, not until the last of its
/// aborted tasks happens to drop its reference.
fn live(w: &Weak<Shared>) -> bool {
    w.upgrade().is_some_and(|s| !lock(&s.proto).is_closed())
}

/// Counts a connection as pending for as long as it lives, even if its task is aborted.
struct PendingGuard(Arc<AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the listener is dropped and none of the sessions it accepted is alive.
async fn orphaned(out: &mpsc::Sender<TcpTransport>, sessions: &Sessions) {
    out.closed().await;
    loop {
        let any_live = {
            let mut map = lock(sessions);
            map.retain(|_, w| live(w));
            !map.is_empty()
        };
        if !any_live {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    config: Arc<TcpConfig>,
    tls: Option<ServerTls>,
    pending: Arc<AtomicUsize>,
    out: mpsc::Sender<TcpTransport>,
) {
    let sessions: Sessions = Arc::default();
    let rejects = Arc::new(Mutex::new(RejectLog {
        window: Instant::now(),
        logged: 0,
        suppressed: 0,
    }));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = orphaned(&out, &sessions) => {
                info!(local = ?listener.local_addr().ok(), "listener dropped and its last session ended; port closed");
                return;
            }
        };
        let (stream, peer) = match accepted {
            Ok(v) => v,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Only the accept loop increments, so checking then adding cannot overshoot.
        if pending.load(Ordering::Relaxed) >= config.max_pending_handshakes {
            drop(stream);
            let e = Error::Config {
                field: "max_pending_handshakes",
                reason: format!(
                    "{} handshakes are already in progress; connection closed at once",
                    config.max_pending_handshakes
                ),
            };
            lock(&rejects).log(peer, &e);
            continue;
        }
        pending.fetch_add(1, Ordering::Relaxed);
        let guard = PendingGuard(pending.clone());
        let (config, sessions, out, rejects, tls) = (
            config.clone(),
            sessions.clone(),
            out.clone(),
            rejects.clone(),
            tls.clone(),
        );
        tokio::spawn(async move {
            let find = |id: &SessionId| lock(&sessions).get(id).and_then(Weak::upgrade);
            let cap = || {
                if out.is_closed() {
                    return Some(Error::Unavailable {
                        transport: amst_core::TransportKind::Tcp,
                        reason: "this server's listener was dropped; it takes no new sessions"
                            .into(),
                    });
                }
                let mut map = lock(&sessions);
                map.retain(|_, w| live(w));
                (map.len() >= config.max_sessions).then(|| Error::Config {
                    field: "max_sessions",
                    reason: format!("this server already serves {} sessions", map.len()),
                })
            };
            let accepted = handshake::accept(stream, &config, tls.as_ref(), find, cap).await;
            drop(guard);
            let accepted = match accepted {
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
                        map.retain(|_, w| live(w));
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
                    let shared = Shared::new((*config).clone(), None, Role::Server, id);
                    // Findable before the first frame goes out: the client dials its other
                    // streams once it hears from us.
                    lock(&sessions).insert(id, Arc::downgrade(&shared));
                    if let Err(e) =
                        shared.attach(a.stream, a.established.stream_index, a.leftover, a.applied)
                    {
                        warn!(%peer, error = %e, "first stream not attached");
                        lock(&sessions).remove(&id);
                        shared.teardown();
                        return;
                    }
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
