//! The authenticated handshake on a socket: TLS first when configured, then amst-core's
//! sans-IO PSK state machines over the stream, on both sides; and the client's re-dial of a
//! lost stream.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amst_core::codec::driver::{self, FrameIo};
use amst_core::codec::{
    ClientHandshake, CloseCode, Established, Frame, FrameKind, ServerHandshake, SessionId,
    capabilities, random_bytes,
};
use amst_core::{Error, ProtocolError, Result};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::TcpConfig;
use crate::conn::Conn;
use crate::session::{Fatal, Shared, hex, lock};
use crate::sockopt::{self, Applied};
use crate::tls::{ClientTls, ServerTls};

/// Capabilities this transport offers.
pub(crate) const CAPABILITIES: u64 = capabilities::HYBRID;

/// A stream that passed the handshake, with bytes read past it.
pub(crate) struct Authenticated {
    pub stream: Conn,
    pub established: Established,
    pub leftover: BytesMut,
    pub applied: Applied,
}

/// The first byte of a TLS ClientHello record (content type "handshake").
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The stream during the handshake, for amst-core's `driver::StreamIo`.
impl driver::ByteStream for Conn {
    async fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        self.flush().await
    }

    async fn recv_bytes(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        // Never more than `max`: the rest of the buffer stays for frames after the handshake.
        match (&mut *self).take(max as u64).read_buf(buf).await {
            // Over TLS, a peer that hangs up without close_notify (a client that found our
            // key proof wrong does) is the same event as a plain EOF, and says so alike.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            r => r,
        }
    }
}

fn handshake_io(stream: &mut Conn) -> driver::StreamIo<&mut Conn> {
    driver::StreamIo::new(stream, "handshake")
}

async fn write_frame(stream: &mut Conn, frame: &Frame) -> Result<()> {
    handshake_io(stream).send(frame).await
}

/// Dials one stream (or takes `tcp`, already connected) and authenticates it: a new session
/// when `session` is `None`. `tls` is the session's TLS client, if TLS is on.
pub(crate) async fn dial(
    addr: SocketAddr,
    tcp: Option<TcpStream>,
    config: &TcpConfig,
    tls: Option<&ClientTls>,
    session: Option<SessionId>,
    slot: u16,
) -> Result<Authenticated> {
    let limit = config.handshake_timeout;
    let both = async {
        let tcp = match tcp {
            Some(t) => t,
            None => connect_tcp(addr).await?,
        };
        let opened = open_inner(addr, tcp, config, tls).await?;
        authenticate_inner(opened, config, session, slot).await
    };
    tokio::time::timeout(limit, both)
        .await
        .map_err(|_| timed_out("connecting and authenticating a stream", limit))?
}

/// A stream connected (through TLS, when it is on) and not yet authenticated: a new
/// session's other streams get this far while its first stream authenticates.
pub(crate) struct Opened {
    stream: Conn,
    nonce: [u8; 32],
    applied: Applied,
}

/// Connects one stream and runs TLS on it when configured; [`authenticate`] finishes it.
pub(crate) async fn open(
    addr: SocketAddr,
    config: &TcpConfig,
    tls: Option<&ClientTls>,
) -> Result<Opened> {
    let limit = config.handshake_timeout;
    let opened = async { open_inner(addr, connect_tcp(addr).await?, config, tls).await };
    tokio::time::timeout(limit, opened)
        .await
        .map_err(|_| timed_out("connecting a stream", limit))?
}

/// The TCP connection alone, within the handshake timeout.
pub(crate) async fn connect_tcp_within(addr: SocketAddr, config: &TcpConfig) -> Result<TcpStream> {
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, connect_tcp(addr))
        .await
        .map_err(|_| timed_out("connecting a stream", limit))?
}

async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| Error::io(format!("connecting to {addr}"), e))
}

/// The amst handshake on an [`Opened`] stream, joining `session` (or starting one).
pub(crate) async fn authenticate(
    opened: Opened,
    config: &TcpConfig,
    session: Option<SessionId>,
    slot: u16,
) -> Result<Authenticated> {
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, authenticate_inner(opened, config, session, slot))
        .await
        .map_err(|_| timed_out("authenticating a stream", limit))?
}

fn timed_out(what: &'static str, after: Duration) -> Error {
    Error::Timeout { what, after }
}

async fn open_inner(
    addr: SocketAddr,
    stream: TcpStream,
    config: &TcpConfig,
    tls: Option<&ClientTls>,
) -> Result<Opened> {
    let applied = sockopt::tune(&stream, config);
    // With TLS, the nonce is the session's exporter secret: the server checks it, which
    // binds the PSK proof to this TLS session.
    let (stream, nonce) = match tls {
        None => (Conn::Plain(stream), random_bytes()),
        Some(t) => {
            let s = t
                .connector
                .connect(t.name.clone(), stream)
                .await
                .map_err(|e| crate::tls::dial_error(addr, e))?;
            let nonce = crate::tls::binding(s.get_ref().1)?;
            (Conn::Tls(Box::new(s.into())), nonce)
        }
    };
    Ok(Opened {
        stream,
        nonce,
        applied,
    })
}

async fn authenticate_inner(
    opened: Opened,
    config: &TcpConfig,
    session: Option<SessionId>,
    slot: u16,
) -> Result<Authenticated> {
    let Opened {
        mut stream,
        nonce,
        applied,
    } = opened;
    let (hs, hello) = ClientHandshake::with_versions(
        config.psk.clone(),
        nonce,
        session.unwrap_or([0; 16]),
        slot,
        config.max_streams as u16,
        CAPABILITIES,
        config.versions,
    );
    let mut io = handshake_io(&mut stream);
    let established = driver::client(&mut io, hs, hello).await?;
    let buf = io.buf;
    Ok(Authenticated {
        stream,
        established,
        leftover: buf,
        applied,
    })
}

/// What the server learnt from a stream's Hello.
pub(crate) enum Accepted {
    /// A new session.
    New(Authenticated),
    /// A stream joining a live session.
    Join(Arc<Shared>, Authenticated),
}

/// Runs the server side of the handshake on a freshly accepted stream: TLS first if `tls`
/// is set, then the PSK handshake. `find` looks a session up by id; `session_cap` is the
/// error that refuses a new session, if one may not start now. On failure the peer gets a
/// Close naming the reason.
pub(crate) async fn accept(
    stream: TcpStream,
    config: &TcpConfig,
    tls: Option<&ServerTls>,
    find: impl Fn(&SessionId) -> Option<Arc<Shared>>,
    session_cap: impl Fn() -> Option<Error>,
) -> Result<Accepted> {
    let limit = config.handshake_timeout;
    let applied = sockopt::tune(&stream, config);
    let result = tokio::time::timeout(limit, async move {
        let (mut conn, binding) = start_tls(stream, tls).await?;
        match accept_inner(&mut conn, config, binding, find, session_cap).await {
            Ok((session, established, leftover)) => Ok((conn, session, established, leftover)),
            Err(e) => {
                if !matches!(e, Error::Io { .. }) {
                    let _ = write_frame(&mut conn, &Frame::Close(driver::close_for(&e))).await;
                }
                Err(e)
            }
        }
    })
    .await;
    let (stream, session, established, leftover) = match result {
        Ok(r) => r?,
        Err(_) => {
            return Err(Error::Timeout {
                what: "waiting for the client's handshake",
                after: limit,
            });
        }
    };
    let auth = Authenticated {
        stream,
        established,
        leftover,
        applied,
    };
    Ok(match session {
        Some(s) => Accepted::Join(s, auth),
        None => Accepted::New(auth),
    })
}

/// Looks at the first byte the client sent: a TLS ClientHello when TLS is on, an AMST Hello
/// when it is off (or either, with `plaintext_too`). A mismatch is refused at once with an
/// error naming `tls`; a plaintext client is told so in plaintext, which it can read.
async fn start_tls(stream: TcpStream, tls: Option<&ServerTls>) -> Result<(Conn, Option<[u8; 32]>)> {
    let mut first = [0u8; 1];
    let n = stream
        .peek(&mut first)
        .await
        .map_err(|e| Error::io("reading a handshake frame", e))?;
    let speaks_tls = n == 1 && first[0] == TLS_HANDSHAKE_RECORD;
    match tls {
        Some(t) if speaks_tls => {
            let s = t
                .acceptor
                .accept(stream)
                .await
                .map_err(|e| Error::io("TLS handshake", e))?;
            let binding = crate::tls::binding(s.get_ref().1)?;
            Ok((Conn::Tls(Box::new(s.into())), Some(binding)))
        }
        Some(t) if t.plaintext_too => Ok((Conn::Plain(stream), None)),
        Some(_) if n == 1 => {
            let e = Error::Config {
                field: "tls",
                reason: "is on at this server, but the client spoke plaintext AMST: both sides \
                         must set `tls` alike"
                    .into(),
            };
            let mut conn = Conn::Plain(stream);
            let _ = write_frame(&mut conn, &Frame::Close(driver::close_for(&e))).await;
            Err(e)
        }
        None if speaks_tls => {
            let e = Error::Config {
                field: "tls",
                reason: "is off at this server, but the client started a TLS handshake: both \
                         sides must set `tls` alike"
                    .into(),
            };
            // The client cannot read a plaintext Close, but seeing plaintext is how it
            // learns that TLS is off here.
            let mut conn = Conn::Plain(stream);
            let _ = write_frame(&mut conn, &Frame::Close(driver::close_for(&e))).await;
            Err(e)
        }
        _ => Ok((Conn::Plain(stream), None)),
    }
}

async fn accept_inner(
    stream: &mut Conn,
    config: &TcpConfig,
    binding: Option<[u8; 32]>,
    find: impl Fn(&SessionId) -> Option<Arc<Shared>>,
    session_cap: impl Fn() -> Option<Error>,
) -> Result<(Option<Arc<Shared>>, Established, BytesMut)> {
    let mut io = handshake_io(stream);
    let hello = driver::server_hello(&mut io).await?;
    if binding.is_some_and(|b| hello.nonce != b) {
        // Relayed from another TLS session: someone in the middle.
        warn!("PSK handshake not bound to this TLS session");
        return Err(ProtocolError::AuthFailed.into());
    }
    let (session, id) = if hello.session_id == [0; 16] {
        if let Some(refusal) = session_cap() {
            return Err(refusal);
        }
        (None, random_bytes::<16>())
    } else {
        match find(&hello.session_id) {
            Some(s) => (Some(s), hello.session_id),
            None => {
                return Err(ProtocolError::Malformed {
                    kind: FrameKind::Hello,
                    field: "session_id",
                    reason: format!("names no live session ({})", hex(&hello.session_id)),
                }
                .into());
            }
        }
    };
    if hello.stream_index as usize >= config.max_streams {
        return Err(Error::Config {
            field: "max_streams",
            reason: format!(
                "stream index {} is beyond this server's limit of {} streams per session",
                hello.stream_index, config.max_streams
            ),
        });
    }
    let hs = ServerHandshake::with_versions(
        config.psk.clone(),
        random_bytes(),
        CAPABILITIES,
        config.versions,
    );
    let (ack, awaiting) = hs.on_hello(&hello, id)?;
    io.send(&Frame::HelloAck(ack)).await?;
    let established = driver::server_finish(&mut io, awaiting).await?;
    Ok((session, established, io.buf))
}

/// Re-dials a lost stream into its slot, with backoff, until it attaches or the session
/// gives up.
pub(crate) async fn redial(shared: Arc<Shared>, addr: SocketAddr, slot: u16) {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        {
            let p = lock(&shared.proto);
            if p.is_closing() || p.is_closed() || p.is_peer_closed() || p.fatal().is_some() {
                return;
            }
        }
        let target = shared
            .target_streams
            .load(std::sync::atomic::Ordering::Relaxed);
        if shared.stream_count() >= target {
            return;
        }
        match dial(
            addr,
            None,
            &shared.config,
            shared.client_tls.as_ref(),
            Some(shared.session_id),
            slot,
        )
        .await
        {
            Ok(a) => {
                match shared.attach(a.stream, slot, a.leftover, a.applied) {
                    Ok(path) => info!(session = %hex(&shared.session_id), slot, path,
                        after_ms = started.elapsed().as_millis() as u64, "stream re-dialled"),
                    Err(e) => warn!(slot, error = %e, "re-dialled stream not attached"),
                }
                return;
            }
            Err(e @ (Error::Protocol(_) | Error::PeerClosed { .. })) => {
                // The server no longer knows the session, or refuses us: nothing to retry.
                if shared.stream_count() == 0 {
                    shared.fail(match e {
                        Error::Protocol(p) => Fatal::Protocol(p),
                        Error::PeerClosed { code, reason } => Fatal::PeerClosed { code, reason },
                        _ => unreachable!(),
                    });
                } else {
                    warn!(slot, error = %e, "re-dial refused; going on with fewer streams");
                }
                return;
            }
            Err(Error::Io { source, .. })
                if source.kind() == io::ErrorKind::ConnectionRefused
                    && shared.stream_count() == 0 =>
            {
                // Nobody listens any more and no stream is left: the peer is gone.
                shared.fail(Fatal::PeerClosed {
                    code: CloseCode::Aborted,
                    reason: format!(
                        "every stream was lost and re-dialling {addr} was refused ({source})"
                    ),
                });
                return;
            }
            Err(e) => {
                if started.elapsed() >= shared.config.reconnect_timeout {
                    if shared.stream_count() == 0 {
                        shared.fail(Fatal::Timeout {
                            what: "re-dialling a lost stream",
                            after: shared.config.reconnect_timeout,
                        });
                    } else {
                        warn!(slot, error = %e, "giving up re-dialling; going on with fewer streams");
                    }
                    return;
                }
                warn!(slot, error = %e, retry_ms = backoff.as_millis() as u64, "re-dial failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
