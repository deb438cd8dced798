//! Opening sessions: the only module that knows which AMST library carries the data. It
//! turns the command-line options into amst-hybrid's [`AmstConfig`] and hands back
//! [`Link`]s over [`Amst`] sessions (amst-tcp underneath, amst-quic or amst-rdma when asked
//! for).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amst_core::codec::Psk;
use amst_core::{BoxFuture, Mode, TransportKind};
use amst_hybrid::{Amst, AmstConfig, AmstListener, Congestion, DatacenterTransport};
use bytes::Bytes;

use crate::cli::{CcArg, ModeArg, TransportArg, TransportArgs};
use crate::error::{CliResult, Failure, FailureKind};
use crate::link::{self, Link, LinkError, LinkStats};

/// The library name shown in reports.
pub const ENGINE: &str = "amst-hybrid";

/// What every session needs: the key and the transport options.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The pre-shared key.
    pub psk: Psk,
    /// The command-line transport options.
    pub args: TransportArgs,
}

/// Resolves `HOST:PORT`, with a sentence for each way it can be wrong.
pub async fn resolve(addr: &str) -> CliResult<SocketAddr> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad =
        |why: String| Failure::new(FailureKind::Network, format!("bad address {addr:?}: {why}"));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad(
            "expected HOST:PORT, e.g. 10.0.0.2:9000 or [::1]:9000".into()
        ));
    };
    if host.is_empty() {
        return Err(bad("the host is missing; expected HOST:PORT".into()));
    }
    if port.parse::<u16>().is_err() {
        return Err(bad(format!(
            "the port {port:?} is not a number from 0 to 65535"
        )));
    }
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| bad(format!("cannot resolve host {host:?} ({e})")))?;
    addrs
        .next()
        .ok_or_else(|| bad(format!("host {host:?} has no address")))
}

/// The amst-hybrid configuration the options ask for.
pub fn config(s: &Settings) -> CliResult<AmstConfig> {
    let a = &s.args;
    let mut c = AmstConfig::new(s.psk.clone());
    match a.mode {
        ModeArg::Auto => c.auto_mode = true,
        ModeArg::Datacenter => {
            c.auto_mode = false;
            c.initial_mode = Mode::Datacenter;
        }
        ModeArg::Internet => {
            c.auto_mode = false;
            c.initial_mode = Mode::Internet;
        }
    }
    if a.transport != TransportArg::Rdma {
        let given = [
            ("--rdma-device", a.rdma_device.is_some()),
            ("--rdma-gid-index", a.rdma_gid_index.is_some()),
        ];
        if let Some((opt, _)) = given.into_iter().find(|(_, set)| *set) {
            return Err(Failure::usage(format!(
                "{opt} needs --transport rdma (the transport is {})",
                a.transport.as_str()
            )));
        }
    }
    match a.transport {
        TransportArg::Tcp => {}
        TransportArg::Quic => c.internet_transport = TransportKind::Quic,
        TransportArg::Rdma => {
            c.datacenter_transport = DatacenterTransport::Rdma {
                device: a.rdma_device.clone(),
                gid_index: a.rdma_gid_index,
            }
        }
    }
    if let Some(n) = a.streams {
        let n = usize::from(n);
        match a.mode {
            ModeArg::Datacenter => c.datacenter_streams = n,
            ModeArg::Internet => c.internet_streams = n,
            ModeArg::Auto => {
                c.datacenter_streams = n;
                c.internet_streams = n;
            }
        }
        c.min_streams = c.min_streams.min(n);
        c.max_streams = c.max_streams.max(n);
    }
    if let Some(cc) = a.cc {
        c.congestion = match cc {
            CcArg::Bbr => Congestion::Bbr,
            CcArg::Cubic => Congestion::Cubic,
        };
    }
    if let Some(chunk) = a.chunk {
        let (min, max) = (amst_tcp::MIN_CHUNK as u64, amst_tcp::MAX_CHUNK as u64);
        if !(min..=max).contains(&chunk.0) {
            return Err(Failure::usage(format!(
                "--chunk {} is out of range: TCP streams carry chunks of {} to {}",
                crate::size::human_bytes(chunk.0),
                crate::size::human_bytes(min),
                crate::size::human_bytes(max)
            )));
        }
        c.chunk_size = usize::try_from(chunk.0).unwrap_or(usize::MAX);
    }
    c.aggressive = a.aggressive;
    c.validate()
        .map_err(|e| hybrid_failure("checking the options", &e))?;
    Ok(c)
}

/// When `--transport rdma` was asked but the session's datacenter lane runs on another
/// transport (amst-hybrid falls back to TCP): a one-line warning saying so, and why if known.
/// `stats` is the session's snapshot, as the report's `transport` shows it.
pub fn rdma_fallback(args: &TransportArgs, stats: &LinkStats) -> Option<String> {
    if args.transport != TransportArg::Rdma {
        return None;
    }
    let built_with_rdma = cfg!(feature = "rdma");
    let on = match stats.mode {
        // In hybrid mode the datacenter lane is the low-latency one, which `transport` names.
        Mode::Datacenter | Mode::Hybrid => stats.transport,
        // No datacenter lane is open yet; only a binary without RDMA is certain to fall back.
        Mode::Internet if !built_with_rdma => TransportKind::Tcp,
        Mode::Internet => return None,
    };
    if on == TransportKind::Rdma {
        return None;
    }
    let why = if !built_with_rdma {
        "this amst was built without the `rdma` cargo feature".to_string()
    } else {
        match amst_hybrid::rdma_devices() {
            Ok(names) if names.is_empty() => "this host has no RDMA device".to_string(),
            Ok(_) => "the RDMA connection failed (no RDMA at the peer?); \
                      amst-hybrid's warning in the log says why"
                .to_string(),
            Err(e) => e.to_string(),
        }
    };
    Some(format!(
        "warning: --transport rdma was asked, but the datacenter lane runs on {on}: {why}"
    ))
}

/// A sentence for an amst-hybrid error, finding the amst-core error inside when there is one.
pub fn hybrid_failure(doing: &str, e: &amst_hybrid::Error) -> Failure {
    match e {
        amst_hybrid::Error::Core(core) => Failure::from_amst(doing, core),
        amst_hybrid::Error::VersionMismatch { .. } => Failure::new(
            FailureKind::Network,
            format!("{doing} failed: the peer runs another amst version: {e}"),
        ),
        other => Failure::new(FailureKind::Network, format!("{doing} failed: {other}")),
    }
}

fn boxed<T>(r: amst_hybrid::Result<T>) -> link::Result<T> {
    r.map_err(|e| match e {
        amst_hybrid::Error::Core(core) => Box::new(core) as LinkError,
        other => Box::new(other) as LinkError,
    })
}

/// An [`Amst`] session as a [`Link`].
#[derive(Debug, Clone)]
pub struct HybridLink(pub Arc<Amst>);

impl Link for HybridLink {
    fn send(&self, message: Bytes) -> BoxFuture<'_, link::Result<()>> {
        Box::pin(async move { boxed(self.0.send(message).await) })
    }

    fn flush(&self) -> BoxFuture<'_, link::Result<()>> {
        Box::pin(async move { boxed(self.0.flush().await) })
    }

    fn recv(&self) -> BoxFuture<'_, link::Result<Option<Bytes>>> {
        Box::pin(async move { boxed(self.0.recv().await) })
    }

    fn close(&self) -> BoxFuture<'_, link::Result<()>> {
        Box::pin(async move { boxed(self.0.close().await) })
    }

    fn stats(&self) -> LinkStats {
        let m = self.0.metrics();
        LinkStats {
            mode: m.mode,
            transport: m.transport,
            streams: m.streams,
            bytes_sent: m.bytes_sent,
            bytes_received: m.bytes_received,
            retransmits: m.chunks_retransmitted,
            mode_switches: m.switches,
            last_switch: m.last_switch_duration,
            rtt: m.rtt,
            min_rtt: m.min_rtt,
        }
    }

    fn force_mode(&self, mode: Mode) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.force_mode(mode).await.map_err(|e| e.to_string()) })
    }
}

/// Connects to `peer` and authenticates.
pub async fn connect(peer: SocketAddr, s: &Settings) -> CliResult<Arc<dyn Link>> {
    let amst = Arc::new(connect_amst(peer, s).await?);
    crate::telemetry::track(&amst);
    Ok(Arc::new(HybridLink(amst)))
}

/// Like [`connect`], but in auto mode a peer at a loopback address starts in the datacenter
/// profile instead of the paced internet one: such a path never leaves this host, and the
/// detector (still on, still free to switch) would otherwise take its first second to find
/// that out, pacing the start of the transfer meanwhile.
pub async fn connect_local_aware(peer: SocketAddr, s: &Settings) -> CliResult<Arc<dyn Link>> {
    let mut config = config(s)?;
    if s.args.mode == ModeArg::Auto && peer.ip().is_loopback() {
        config.initial_mode = Mode::Datacenter;
    }
    let amst = Arc::new(connect_amst_with(peer, config).await?);
    crate::telemetry::track(&amst);
    Ok(Arc::new(HybridLink(amst)))
}

async fn connect_amst(peer: SocketAddr, s: &Settings) -> CliResult<Amst> {
    connect_amst_with(peer, config(s)?).await
}

async fn connect_amst_with(peer: SocketAddr, config: AmstConfig) -> CliResult<Amst> {
    let doing = format!("connecting to {peer}");
    // The transports retry internally; a dead address must still fail in bounded time.
    match tokio::time::timeout(Duration::from_secs(30), Amst::connect(peer, config)).await {
        Ok(r) => r.map_err(|e| hybrid_failure(&doing, &e)),
        Err(_) => Err(Failure::new(
            FailureKind::Network,
            format!("{doing} failed: no answer within 30 s (the peer is unreachable)"),
        )),
    }
}

/// Connects for probing: a session whose active transport can measure the path. The mode is
/// pinned, so the detector inside the session does not switch while `explain` measures.
pub async fn connect_probe(peer: SocketAddr, s: &Settings) -> CliResult<Arc<Amst>> {
    let mut s = s.clone();
    if s.args.mode == ModeArg::Auto {
        s.args.mode = ModeArg::Internet;
    }
    Ok(Arc::new(connect_amst(peer, &s).await?))
}

/// A bound server.
#[derive(Debug)]
pub struct Server {
    listener: AmstListener,
    local: SocketAddr,
}

/// One accepted session.
#[derive(Debug)]
pub struct Accepted {
    /// The session.
    pub link: Arc<dyn Link>,
    /// How to name the peer in logs.
    pub peer: String,
}

impl Server {
    /// Binds `addr`; every session holds what it receives against `budget`.
    pub async fn bind(
        addr: SocketAddr,
        s: &Settings,
        budget: amst_core::MemoryBudget,
    ) -> CliResult<Server> {
        let mut config = config(s)?;
        config.memory_budget = budget;
        let listener = Amst::listen(addr, config)
            .await
            .map_err(|e| hybrid_failure(&format!("listening on {addr}"), &e))?;
        let local = listener.local_addr().unwrap_or(addr);
        Ok(Server { listener, local })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next authenticated session.
    pub async fn accept(&self) -> CliResult<Accepted> {
        let amst = self
            .listener
            .accept()
            .await
            .map_err(|e| hybrid_failure("accepting a session", &e))?;
        let peer = format!("session {}", crate::protocol::hex(&amst.session_id()[..4]));
        let amst = Arc::new(amst);
        crate::telemetry::track(&amst);
        Ok(Accepted {
            link: Arc::new(HybridLink(amst)),
            peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn settings(args: &[&str]) -> Settings {
        let argv = ["amst", "serve", "--discard"].iter().chain(args);
        let Command::Serve(s) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("serve parses")
        };
        Settings {
            psk: Psk::new(b"0123456789abcdef").unwrap(),
            args: s.transport,
        }
    }

    #[test]
    fn transport_rdma_puts_the_datacenter_lane_on_rdma() {
        let c = config(&settings(&[
            "--transport",
            "rdma",
            "--rdma-device",
            "mlx5_1",
            "--rdma-gid-index",
            "3",
        ]))
        .unwrap();
        assert_eq!(
            c.datacenter_transport,
            DatacenterTransport::Rdma {
                device: Some("mlx5_1".into()),
                gid_index: Some(3),
            }
        );
        assert_eq!(c.internet_transport, TransportKind::Tcp);
        let c = config(&settings(&["--transport", "rdma"])).unwrap();
        assert_eq!(
            c.datacenter_transport,
            DatacenterTransport::Rdma {
                device: None,
                gid_index: None,
            }
        );
        let c = config(&settings(&[])).unwrap();
        assert_eq!(c.datacenter_transport, DatacenterTransport::Tcp);
    }

    #[test]
    fn aggressive_reaches_the_internet_tcp_lane_only() {
        use amst_hybrid::tcp_config;
        let psk = Psk::new(b"0123456789abcdef").unwrap();
        let lane = |c: &AmstConfig, m: Mode| {
            let p = c.profile(m).expect("lane enabled");
            tcp_config(&psk, &p, 1 << 20).aggressive
        };
        // Default: the internet lane's streams act as one flow.
        let c = config(&settings(&[])).unwrap();
        assert!(!c.aggressive && !lane(&c, Mode::Internet));
        // --aggressive turns the aggregate cap off on the internet lane, never on datacenter.
        let c = config(&settings(&["--aggressive"])).unwrap();
        assert!(c.aggressive);
        assert!(lane(&c, Mode::Internet));
        assert!(!lane(&c, Mode::Datacenter));
    }

    #[test]
    fn rdma_options_without_transport_rdma_are_usage_errors() {
        for (args, opt) in [
            (&["--rdma-device", "rxe0"][..], "--rdma-device"),
            (
                &["--transport", "quic", "--rdma-gid-index", "1"][..],
                "--rdma-gid-index",
            ),
        ] {
            let f = config(&settings(args)).unwrap_err();
            assert_eq!(f.kind, FailureKind::Usage, "{f}");
            assert!(f.message.starts_with(opt), "{f}");
            assert!(f.message.contains("--transport rdma"), "{f}");
        }
    }

    #[test]
    fn a_fallback_from_rdma_is_named_only_when_rdma_was_asked() {
        let stats = |mode, transport| LinkStats {
            mode,
            transport,
            streams: 1,
            bytes_sent: 0,
            bytes_received: 0,
            retransmits: 0,
            mode_switches: 0,
            last_switch: None,
            rtt: None,
            min_rtt: None,
        };
        let rdma = settings(&["--transport", "rdma"]).args;
        let tcp = settings(&[]).args;
        let fell_back = stats(Mode::Datacenter, TransportKind::Tcp);
        let w = rdma_fallback(&rdma, &fell_back).expect("a warning");
        assert!(w.contains("--transport rdma") && w.contains("tcp"), "{w}");
        assert_eq!(rdma_fallback(&tcp, &fell_back), None);
        assert_eq!(
            rdma_fallback(&rdma, &stats(Mode::Datacenter, TransportKind::Rdma)),
            None
        );
        let internet = rdma_fallback(&rdma, &stats(Mode::Internet, TransportKind::Tcp));
        assert_eq!(internet.is_some(), !cfg!(feature = "rdma"), "{internet:?}");
    }
}
