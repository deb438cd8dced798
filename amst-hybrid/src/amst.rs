//! `Amst`, the object applications use, and `AmstListener`, which yields server sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use amst_core::codec::{SessionId, random_bytes};
use amst_core::{Mode, Transport, TransportMetrics};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use amst_core::util::{hex, lock};

use crate::metrics::{AmstMetrics, SwitchStats};
use crate::session::{HybridSession, PlainSession, Role, Session};
use crate::wire::{self, HybridFrame};
use crate::{Acceptor, AmstConfig, Connected, Connector, Error, Result};

/// One hybrid session with one peer: send and receive messages, whichever transports carry
/// them, across mode switches.
///
/// Cloning is cheap and shares the session, so many tasks can send concurrently; messages
/// from one `Amst` are delivered in the order their `send` calls queued them. The session ends
/// when [`close`](Amst::close) is called or the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Amst {
    inner: Arc<Owner>,
}

#[derive(Debug)]
struct Owner {
    session: Session,
    auto: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.session.shut_down();
        if let Some(t) = lock(&self.auto).take() {
            t.abort();
        }
    }
}

impl Amst {
    fn from_session(session: Session) -> Self {
        Amst {
            inner: Arc::new(Owner {
                session,
                auto: Mutex::new(None),
            }),
        }
    }

    /// Connects to an `Amst` server (or a plain AMST peer) through `connector`, in
    /// `config.initial_mode`, and starts following the detector when `config.auto_mode`.
    pub async fn connect_with(connector: Arc<dyn Connector>, config: AmstConfig) -> Result<Amst> {
        config.validate()?;
        let profiles = config.lanes_for(config.initial_mode)?;
        let first = profiles[0].clone();
        let Connected { transport, hybrid } = connector.connect(&first).await?;
        if hybrid == Some(false) {
            warn!(
                "the peer does not speak the hybrid protocol: plain session on one {} transport, no mode switching",
                first.preset
            );
            let plain = PlainSession::new(Role::Client, config, transport, first.preset, None);
            return Ok(Amst::from_session(Session::Plain(plain)));
        }
        let (vmin, vmax) = config.hybrid_versions;
        transport
            .send(
                HybridFrame::Open {
                    version_min: vmin,
                    version_max: vmax,
                }
                .encode(),
            )
            .await?;
        let reply = tokio::time::timeout(config.attach_timeout, transport.recv())
            .await
            .map_err(|_| {
                Error::Core(amst_core::Error::Timeout {
                    what: "waiting for the server's hybrid OpenAck (a plain AMST server never sends one)",
                    after: config.attach_timeout,
                })
            })??
            .ok_or_else(|| Error::Closed("the server closed before answering Open".into()))?;
        let session_id = match HybridFrame::decode(reply)? {
            HybridFrame::OpenAck {
                version,
                session_id,
            } => {
                if version < vmin || version > vmax {
                    return Err(Error::VersionMismatch {
                        ours_min: vmin,
                        ours_max: vmax,
                        theirs_min: version,
                        theirs_max: version,
                    });
                }
                session_id
            }
            HybridFrame::Reject { reason } => {
                let _ = transport.close().await;
                return Err(Error::Rejected(reason));
            }
            other => {
                return Err(Error::protocol(format!(
                    "expected OpenAck from the server, got {other:?}"
                )));
            }
        };
        let start_mode = if profiles.len() == 1 {
            config.initial_mode
        } else {
            first.preset
        };
        let auto = config.auto_mode;
        let shared = HybridSession::new(
            Role::Client,
            config,
            session_id,
            transport,
            Some(first),
            start_mode,
            Some(connector),
            1,
        );
        info!(session = %hex(&session_id), mode = %start_mode, "hybrid session open");
        let amst = Amst::from_session(Session::Hybrid(shared.clone()));
        if profiles.len() > 1 {
            shared.switch_to(amst_core::Mode::Hybrid, false).await?;
        }
        if auto {
            amst.start_auto_mode();
        }
        Ok(amst)
    }

    /// Serves `Amst` sessions on transports from `acceptor`.
    pub fn listen_with(acceptor: Arc<dyn Acceptor>, config: AmstConfig) -> Result<AmstListener> {
        config.validate()?;
        let local_addr = acceptor.local_addr();
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(acceptor, config, tx));
        Ok(AmstListener {
            rx: tokio::sync::Mutex::new(rx),
            local_addr,
            task,
        })
    }

    fn start_auto_mode(&self) {
        if let Session::Hybrid(h) = &self.inner.session {
            *lock(&self.inner.auto) = crate::auto::spawn(h);
        }
    }

    /// Connects to an `Amst` server over amst-tcp.
    pub async fn connect(addr: SocketAddr, config: AmstConfig) -> Result<Amst> {
        let connector = crate::TcpConnector::new(addr, &config);
        Amst::connect_with(Arc::new(connector), config).await
    }

    /// Listens for `Amst` clients over amst-tcp on `addr`, and over amst-quic on the same
    /// port number (UDP) when `config.internet_transport` or `datacenter_transport` is QUIC.
    /// A QUIC listener that cannot start is logged and left out.
    ///
    /// With an RDMA datacenter transport it also listens for amst-rdma's bootstrap on the next
    /// port number ([`RDMA_PORT_OFFSET`](crate::RDMA_PORT_OFFSET)); on a host without an RDMA
    /// device that is logged and left out, and clients fall back to TCP.
    pub async fn listen(addr: SocketAddr, config: AmstConfig) -> Result<AmstListener> {
        let wants_rdma = config.datacenter_transport.kind() == amst_core::TransportKind::Rdma;
        // With a fixed port, RDMA listens before TCP does: a client that finds the TCP port
        // open must find the RDMA bootstrap open too, or its lane falls back to TCP.
        let mut rdma = None;
        if wants_rdma && addr.port() != 0 {
            rdma = Some(bind_rdma(addr, &config).await);
        }
        let tcp = crate::TcpAcceptor::bind(addr, &config).await?;
        let bound = tcp.local_addr().unwrap_or(addr);
        if wants_rdma && rdma.is_none() {
            rdma = Some(bind_rdma(bound, &config).await);
        }
        let mut acceptors: Vec<Arc<dyn Acceptor>> = vec![Arc::new(tcp)];
        if let Some(Some(r)) = rdma {
            acceptors.push(r);
        }
        let wants_quic = [
            config.internet_transport,
            config.datacenter_transport.kind(),
        ]
        .contains(&amst_core::TransportKind::Quic);
        if wants_quic {
            match crate::QuicAcceptor::bind(bound, &config) {
                Ok(quic) => acceptors.push(Arc::new(quic)),
                Err(e) => warn!("QUIC listener unavailable on UDP {bound}: {e}; serving TCP only"),
            }
        }
        if acceptors.len() == 1 {
            let only = acceptors.pop().expect("one acceptor");
            return Amst::listen_with(only, config);
        }
        Amst::listen_with(Arc::new(crate::MultiAcceptor::new(acceptors)), config)
    }

    fn session(&self) -> &Session {
        &self.inner.session
    }

    /// Queues a message. Resolves once it is accepted (it may wait for the send window);
    /// delivery is whole, exactly once and in order, across mode switches.
    pub async fn send(&self, message: Bytes) -> Result<()> {
        match self.session() {
            Session::Plain(p) => p.send(message).await,
            Session::Hybrid(h) => h.send(message).await.map(|_| ()),
        }
    }

    /// Sends a message and waits until the peer acknowledged it, calling
    /// `progress(transferred, total)` along the way: `transferred` is the bytes the carrying
    /// transport has put on the wire since the send began (an estimate when other messages
    /// share it), capped below `total` until the acknowledgement, then exactly `total`.
    pub async fn send_with_progress<F>(&self, message: Bytes, mut progress: F) -> Result<()>
    where
        F: FnMut(u64, u64) + Send,
    {
        let total = message.len() as u64;
        let s = match self.session() {
            Session::Plain(p) => {
                progress(0, total);
                p.send(message).await?;
                p.flush().await?;
                progress(total, total);
                return Ok(());
            }
            Session::Hybrid(h) => h,
        };
        let wire_now = |s: &HybridSession| {
            let r = s.route.load();
            let t = r.pick(total as usize).transport.clone();
            let ptr = Arc::as_ptr(&t) as *const () as usize;
            (ptr, t.metrics().bytes_sent)
        };
        let (mut which, mut base) = wire_now(s);
        progress(0, total);
        let seq = s.send(message).await?;
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            if s.is_acked(seq) {
                progress(total, total);
                return Ok(());
            }
            s.check_open()?;
            let (now_which, sent) = wire_now(s);
            if now_which != which {
                // A switch: count from here on the new transport.
                which = now_which;
                base = sent.saturating_sub(last);
            }
            let est = sent.saturating_sub(base).min(total.saturating_sub(1));
            if est > last {
                last = est;
                progress(est, total);
            }
            tick.tick().await;
        }
    }

    /// Resolves when every message sent so far has been acknowledged by the peer.
    pub async fn flush(&self) -> Result<()> {
        self.session().flush().await
    }

    /// The next message, or `None` once the peer has closed and everything it sent has been
    /// delivered.
    pub async fn recv(&self) -> Result<Option<Bytes>> {
        self.session().recv().await
    }

    /// The mode of the current route.
    pub fn mode(&self) -> Mode {
        self.session().mode()
    }

    /// The hybrid session, or the error a plain one gives for `what`.
    fn hybrid(&self, what: &'static str) -> Result<&Arc<HybridSession>> {
        match self.session() {
            Session::Plain(_) => Err(Error::NotHybrid(what)),
            Session::Hybrid(h) => Ok(h),
        }
    }

    /// Switches to `mode` now and holds it there (the auto loop stops deciding until
    /// [`release_mode`](Amst::release_mode)). On a server this asks the client, which owns
    /// the connections, and waits until it has switched.
    pub async fn force_mode(&self, mode: Mode) -> Result<()> {
        let s = self.hybrid("switching modes")?;
        s.pinned.store(true, std::sync::atomic::Ordering::Release);
        match s.role {
            Role::Client => s.switch_to(mode, false).await.map(|_| ()),
            Role::Server => s.request_mode(mode).await,
        }
    }

    /// Switches to `mode` even if it is current, through fresh transports (a failover test,
    /// or to pick up new settings).
    pub async fn reconnect(&self, mode: Mode) -> Result<()> {
        let s = self.hybrid("switching modes")?;
        s.switch_to(mode, true).await.map(|_| ())
    }

    /// Lets the detector decide the mode again.
    pub fn release_mode(&self) {
        if let Session::Hybrid(h) = self.session() {
            h.pinned.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether both ends speak the hybrid protocol (false: a plain peer, no switching).
    pub fn is_hybrid(&self) -> bool {
        matches!(self.session(), Session::Hybrid(_))
    }

    /// The hybrid session id (all zeroes for a plain session).
    pub fn session_id(&self) -> SessionId {
        match self.session() {
            Session::Plain(_) => [0; 16],
            Session::Hybrid(h) => h.session_id,
        }
    }

    /// Whether this end connected or accepted.
    pub fn role(&self) -> Role {
        self.session().role()
    }

    fn switch_stats(&self) -> SwitchStats {
        match self.session() {
            Session::Plain(_) => SwitchStats::default(),
            Session::Hybrid(h) => lock(&h.switch_stats).clone(),
        }
    }

    /// Every measured switch duration (swap to first acknowledged message on the new
    /// transport), oldest first, up to the last 4096.
    pub fn switch_durations(&self) -> Vec<Duration> {
        self.switch_stats().durations
    }

    /// Every measured switch, timed from the decision to switch (the call to
    /// [`force_mode`](Amst::force_mode) or the detector's verdict, on the client) to the
    /// first acknowledged message on the new transport: dialing it and the Attach round trip
    /// included. Same order and length as [`switch_durations`](Amst::switch_durations); on a
    /// server, whose decision is the client's Attach arriving, the two are alike.
    pub fn switch_durations_from_decision(&self) -> Vec<Duration> {
        self.switch_stats().from_decision
    }

    /// The current route's transport (the low-latency one in hybrid mode), e.g. for a
    /// detector or for transport-specific statistics.
    pub fn active_transport(&self) -> Arc<dyn Transport> {
        match self.session() {
            Session::Plain(p) => p.transport.clone(),
            Session::Hybrid(h) => h.route.load().low.transport.clone(),
        }
    }

    /// A snapshot of the session's counters.
    pub fn metrics(&self) -> AmstMetrics {
        match self.session() {
            Session::Plain(p) => plain_metrics(p),
            Session::Hybrid(h) => hybrid_metrics(h),
        }
    }

    /// Waits until everything sent is acknowledged, says goodbye, and closes every
    /// transport. The peer's `recv` returns `None` after the last message.
    pub async fn close(&self) -> Result<()> {
        if let Some(t) = lock(&self.inner.auto).take() {
            t.abort();
        }
        self.session().close().await
    }
}

/// A plain session's counters: its one transport's, and nothing of switching.
fn plain_metrics(p: &PlainSession) -> AmstMetrics {
    use std::sync::atomic::Ordering::Relaxed;
    let t = p.transport.metrics();
    AmstMetrics {
        mode: p.mode,
        transport: t.kind,
        bulk_transport: None,
        generation: 0,
        hybrid: false,
        throughput_bps: 0.0,
        streams: t.active_streams,
        messages_sent: p.instruments.n_messages_sent.load(Relaxed),
        bytes_sent: p.instruments.n_bytes_sent.load(Relaxed),
        bytes_acked: 0,
        unacked_messages: 0,
        unacked_bytes: 0,
        messages_received: t.messages_received,
        bytes_received: t.bytes_received,
        duplicates_dropped: 0,
        chunks_retransmitted: t.chunks_retransmitted,
        rtt: t.rtt,
        min_rtt: t.min_rtt,
        switches: 0,
        last_switch_resent: 0,
        last_switch_duration: None,
        open_transports: 1,
        bytes_resent: 0,
        retransmitted_bytes: t.retransmitted_bytes,
        lost_packets: t.lost_packets,
        lost_outstanding: t.lost_outstanding,
        cwnd: t.cwnd,
        pacing_rate: t.pacing_rate,
        chunk_size: t.chunk_size,
        credit_window: t.credit_window,
        receive_held_bytes: t.receive_held_bytes.unwrap_or(0),
        detector: p.instruments.verdict(),
        healthy: p.check_open().is_ok(),
    }
}

/// A hybrid session's counters: the route's transports' (both lanes summed where that
/// means something) and the session's own.
fn hybrid_metrics(s: &HybridSession) -> AmstMetrics {
    let r = s.route.load_full();
    let low = r.low.transport.metrics();
    let bulk = (!Arc::ptr_eq(&r.low, &r.bulk)).then(|| r.bulk.transport.metrics());
    let (unacked_messages, unacked_bytes) = s.unacked();
    let (messages_received, bytes_received, duplicates_dropped) = s.merger_stats();
    let sw = lock(&s.switch_stats).clone();
    let bulk_of = |f: fn(&TransportMetrics) -> Option<u64>| bulk.as_ref().and_then(f);
    use std::sync::atomic::Ordering::Relaxed;
    AmstMetrics {
        mode: r.mode,
        transport: low.kind,
        bulk_transport: bulk.as_ref().map(|b| b.kind),
        generation: r.generation,
        hybrid: true,
        throughput_bps: s.throughput(),
        streams: low.active_streams + bulk.as_ref().map_or(0, |b| b.active_streams),
        messages_sent: s.instruments.n_messages_sent.load(Relaxed),
        bytes_sent: s.instruments.n_bytes_sent.load(Relaxed),
        bytes_acked: s.acked_bytes(),
        unacked_messages,
        unacked_bytes,
        messages_received,
        bytes_received,
        duplicates_dropped,
        chunks_retransmitted: low.chunks_retransmitted
            + bulk.as_ref().map_or(0, |b| b.chunks_retransmitted),
        rtt: low.rtt,
        min_rtt: low.min_rtt,
        switches: sw.switches,
        last_switch_resent: sw.last_resent,
        last_switch_duration: sw.durations.last().copied(),
        open_transports: s.live_lanes(),
        bytes_resent: s.instruments.n_bytes_resent.load(Relaxed),
        retransmitted_bytes: sum_known(low.retransmitted_bytes, bulk_of(|b| b.retransmitted_bytes)),
        lost_packets: sum_known(low.lost_packets, bulk_of(|b| b.lost_packets)),
        lost_outstanding: sum_known(low.lost_outstanding, bulk_of(|b| b.lost_outstanding)),
        cwnd: sum_known(low.cwnd, bulk_of(|b| b.cwnd)),
        pacing_rate: sum_known(low.pacing_rate, bulk_of(|b| b.pacing_rate)),
        chunk_size: bulk_of(|b| b.chunk_size).or(low.chunk_size),
        credit_window: sum_known(low.credit_window, bulk_of(|b| b.credit_window)),
        receive_held_bytes: s.merger_held_bytes()
            + low.receive_held_bytes.unwrap_or(0)
            + bulk_of(|b| b.receive_held_bytes).unwrap_or(0),
        detector: s.instruments.verdict(),
        healthy: s.check_open().is_ok(),
    }
}

/// Accepts `Amst` sessions. Transports that attach to an existing session (a client switching
/// modes) are routed to it in the background; `accept` yields only new sessions. Keep the
/// listener alive while its sessions may switch: dropping it stops the attaching too.
#[derive(Debug)]
pub struct AmstListener {
    rx: tokio::sync::Mutex<mpsc::Receiver<Result<Amst>>>,
    local_addr: Option<SocketAddr>,
    task: JoinHandle<()>,
}

impl AmstListener {
    /// The next new session.
    pub async fn accept(&self) -> Result<Amst> {
        self.rx
            .lock()
            .await
            .recv()
            .await
            .unwrap_or_else(|| Err(Error::Closed("the listener stopped".into())))
    }

    /// The address the listener is bound to, if it has one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Drop for AmstListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The RDMA acceptor beside a TCP address, or `None` (logged) when there is no device.
async fn bind_rdma(addr: SocketAddr, config: &AmstConfig) -> Option<Arc<dyn Acceptor>> {
    let Some(boot) = crate::rdma_bootstrap_addr(addr) else {
        warn!("no port above {addr} for the RDMA bootstrap; serving TCP only");
        return None;
    };
    match crate::RdmaAcceptor::bind(boot, config).await {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            warn!("RDMA listener unavailable on {boot}: {e}; datacenter lanes fall back to TCP");
            None
        }
    }
}

type Registry = Arc<Mutex<HashMap<SessionId, Weak<HybridSession>>>>;

async fn accept_loop(
    acceptor: Arc<dyn Acceptor>,
    config: AmstConfig,
    tx: mpsc::Sender<Result<Amst>>,
) {
    let sessions: Registry = Arc::default();
    loop {
        match acceptor.accept().await {
            Ok(c) => {
                tokio::spawn(incoming(c, config.clone(), sessions.clone(), tx.clone()));
            }
            Err(Error::Closed(reason)) => {
                info!("listener stopped: {reason}");
                return;
            }
            Err(e) => warn!("incoming transport refused: {e}"),
        }
        if tx.is_closed() {
            return;
        }
    }
}

async fn incoming(
    c: Connected,
    config: AmstConfig,
    sessions: Registry,
    tx: mpsc::Sender<Result<Amst>>,
) {
    let Connected { transport, hybrid } = c;
    let plain = |first: Option<Bytes>| {
        info!("plain (non-hybrid) peer: session without mode switching");
        let plain = PlainSession::new(
            Role::Server,
            config.clone(),
            transport.clone(),
            config.initial_mode,
            first,
        );
        Amst::from_session(Session::Plain(plain))
    };
    if hybrid == Some(false) {
        let _ = tx.send(Ok(plain(None))).await;
        return;
    }
    let first = match (
        hybrid,
        tokio::time::timeout(config.attach_timeout, transport.recv()).await,
    ) {
        (_, Ok(Ok(Some(m)))) => m,
        // A silent peer on a transport that cannot tell: a plain client waiting for us.
        (None, Err(_)) => {
            let _ = tx.send(Ok(plain(None))).await;
            return;
        }
        (_, other) => {
            warn!("a new transport sent no hybrid Open or Attach: {other:?}");
            let _ = transport.close().await;
            return;
        }
    };
    let decoded = HybridFrame::decode(first.clone());
    if hybrid.is_none()
        && !matches!(
            decoded,
            Ok(HybridFrame::Open { .. }) | Ok(HybridFrame::Attach { .. })
        )
    {
        let _ = tx.send(Ok(plain(Some(first)))).await;
        return;
    }
    let reject = |reason: String| {
        let transport = transport.clone();
        async move {
            warn!("rejecting a transport: {reason}");
            let _ = transport
                .send(HybridFrame::Reject { reason }.encode())
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(2), transport.close()).await;
        }
    };
    match decoded {
        Ok(HybridFrame::Open {
            version_min,
            version_max,
        }) => {
            let version = match wire::negotiate(config.hybrid_versions, (version_min, version_max))
            {
                Ok(v) => v,
                Err(e) => return reject(e.to_string()).await,
            };
            let session_id: SessionId = random_bytes();
            if let Err(e) = transport
                .send(
                    HybridFrame::OpenAck {
                        version,
                        session_id,
                    }
                    .encode(),
                )
                .await
            {
                warn!("answering Open failed: {e}");
                return;
            }
            let mode = config.initial_mode;
            let shared = HybridSession::new(
                Role::Server,
                config,
                session_id,
                transport,
                None,
                mode,
                None,
                1,
            );
            {
                let mut reg = lock(&sessions);
                reg.retain(|_, w| w.strong_count() > 0);
                reg.insert(session_id, Arc::downgrade(&shared));
            }
            info!(session = %hex(&session_id), version, "hybrid session accepted");
            let _ = tx
                .send(Ok(Amst::from_session(Session::Hybrid(shared))))
                .await;
        }
        Ok(HybridFrame::Attach {
            session_id,
            generation,
            index,
            count,
            mode,
        }) => {
            let session = lock(&sessions).get(&session_id).and_then(Weak::upgrade);
            match session {
                Some(s) if s.check_open().is_ok() => {
                    let lane = s.add_lane(transport, None);
                    s.on_attach(lane, generation, index, count, mode).await;
                }
                _ => {
                    reject(format!(
                        "unknown or closed hybrid session {}",
                        hex(&session_id)
                    ))
                    .await
                }
            }
        }
        Ok(other) => reject(format!("expected Open or Attach first, got {other:?}")).await,
        Err(e) => reject(format!("bad first message: {e}")).await,
    }
}

/// The sum of what is known; `None` only when neither is.
fn sum_known(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
}
