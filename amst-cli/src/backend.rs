//! Opening sessions: the only module that knows which AMST library carries the data. It
//! turns the command-line options into that library's configuration and hands back
//! [`Link`]s.

use std::net::SocketAddr;
use std::sync::Arc;

use amst_core::codec::Psk;
use amst_core::{Mode, Transport, TransportKind};
use amst_tcp::{Congestion, TcpConfig, TcpListener, TcpTransport};

use crate::cli::{CcArg, ModeArg, TransportArg, TransportArgs};
use crate::error::{CliResult, Failure, FailureKind};
use crate::link::{Link, TransportLink};

/// The library name shown in reports.
pub const ENGINE: &str = "amst-tcp";

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

fn mode_of(args: &TransportArgs) -> Mode {
    match args.mode {
        ModeArg::Datacenter => Mode::Datacenter,
        // Without the detector, auto starts where the seed starts: internet, the safe choice.
        ModeArg::Internet | ModeArg::Auto => Mode::Internet,
    }
}

fn check_transport(args: &TransportArgs) -> CliResult<()> {
    let (kind, why) = match args.transport {
        TransportArg::Tcp => return Ok(()),
        TransportArg::Quic => (
            TransportKind::Quic,
            "this build of amst has no QUIC transport",
        ),
        TransportArg::Rdma => (
            TransportKind::Rdma,
            "this build of amst has no RDMA transport",
        ),
    };
    Err(Failure::usage(format!(
        "--transport {kind} is unavailable: {why}; use --transport tcp"
    )))
}

fn tcp_config(s: &Settings) -> CliResult<TcpConfig> {
    check_transport(&s.args)?;
    let mut c = match mode_of(&s.args) {
        Mode::Datacenter => TcpConfig::datacenter(s.psk.clone()),
        _ => TcpConfig::internet(s.psk.clone()),
    };
    if let Some(n) = s.args.streams {
        c = c.with_streams(n as usize);
    }
    if let Some(cc) = s.args.cc {
        c.congestion = match cc {
            CcArg::Bbr => Congestion::Bbr,
            CcArg::Cubic => Congestion::Cubic,
        };
    }
    if let Some(chunk) = s.args.chunk {
        c.chunk_size = usize::try_from(chunk.0).unwrap_or(usize::MAX);
    }
    c.validate()
        .map_err(|e| Failure::from_amst("checking the options", &e))?;
    Ok(c)
}

/// Connects to `peer` and authenticates.
pub async fn connect(peer: SocketAddr, s: &Settings) -> CliResult<Arc<dyn Link>> {
    let config = tcp_config(s)?;
    let t = TcpTransport::connect(peer, config)
        .await
        .map_err(|e| Failure::from_amst(&format!("connecting to {peer}"), &e))?;
    Ok(Arc::new(TransportLink::new(Arc::new(t), mode_of(&s.args))))
}

/// Connects for probing: the raw transport, which can measure the path.
pub async fn connect_probe(peer: SocketAddr, s: &Settings) -> CliResult<Arc<dyn Transport>> {
    let config = tcp_config(s)?;
    let t = TcpTransport::connect(peer, config)
        .await
        .map_err(|e| Failure::from_amst(&format!("connecting to {peer}"), &e))?;
    Ok(Arc::new(t))
}

/// A bound server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    mode: Mode,
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
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr, s: &Settings) -> CliResult<Server> {
        let config = tcp_config(s)?;
        let listener = TcpListener::bind(addr, config)
            .await
            .map_err(|e| Failure::from_amst(&format!("listening on {addr}"), &e))?;
        Ok(Server {
            listener,
            mode: mode_of(&s.args),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// The next authenticated session.
    pub async fn accept(&self) -> CliResult<Accepted> {
        let t = self
            .listener
            .accept()
            .await
            .map_err(|e| Failure::from_amst("accepting a session", &e))?;
        let peer = format!("session {}", crate::protocol::hex(&t.session_id()[..4]));
        Ok(Accepted {
            link: Arc::new(TransportLink::new(Arc::new(t), self.mode)),
            peer,
        })
    }
}
