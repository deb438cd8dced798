//! The authenticated handshake on a socket: amst-core's sans-IO state machines driven over a
//! `TcpStream`, on both sides, and the client's re-dial of a lost stream.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amst_core::codec::{
    ClientHandshake, Close, CloseCode, Decoder, Established, Frame, FrameKind, ServerHandshake,
    SessionId, capabilities, random_bytes,
};
use amst_core::{Error, ProtocolError, Result};
use bytes::BytesMut;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::TcpConfig;
use crate::session::{Fatal, Shared, hex, lock};
use crate::sockopt::{self, Applied};

/// Capabilities this transport offers.
pub(crate) const CAPABILITIES: u64 = capabilities::HYBRID;

/// A stream that passed the handshake, with bytes read past it.
pub(crate) struct Authenticated {
    pub stream: TcpStream,
    pub established: Established,
    pub leftover: BytesMut,
    pub applied: Applied,
}

async fn write_frame(stream: &TcpStream, frame: &Frame) -> Result<()> {
    let bytes = frame.to_bytes();
    let mut off = 0;
    while off < bytes.len() {
        stream
            .writable()
            .await
            .map_err(|e| Error::io("writing a handshake frame", e))?;
        match stream.try_write(&bytes[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::io("writing a handshake frame", e)),
        }
    }
    Ok(())
}

/// Reads one handshake frame. Only `allowed` kinds are accepted, judged from the first byte,
/// so that nothing before the proof can make us buffer more than a Hello.
async fn read_frame(
    stream: &TcpStream,
    buf: &mut BytesMut,
    decoder: &Decoder,
    allowed: &[FrameKind],
    state: &'static str,
) -> Result<Frame> {
    loop {
        if let Some(&b) = buf.first() {
            match FrameKind::from_u8(b) {
                Some(kind) if allowed.contains(&kind) => {}
                Some(kind) => {
                    return Err(ProtocolError::UnexpectedFrame { got: kind, state }.into());
                }
                None => return Err(ProtocolError::UnknownFrameType(b).into()),
            }
        }
        if let Some(f) = decoder.decode(buf)? {
            return Ok(f);
        }
        buf.reserve(256);
        stream
            .readable()
            .await
            .map_err(|e| Error::io("reading a handshake frame", e))?;
        match stream.try_read_buf(buf) {
            Ok(0) => {
                decoder.decode_eof(buf)?;
                return Err(Error::io(
                    "reading a handshake frame",
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the handshake",
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::io("reading a handshake frame", e)),
        }
    }
}

/// The error a client reports when the server answers its Hello with a Close.
fn rejected(close: Close) -> Error {
    match close.code {
        CloseCode::AuthFailed => Error::Protocol(ProtocolError::AuthFailed),
        code => Error::PeerClosed {
            code,
            reason: close.reason,
        },
    }
}

fn handshake_decoder() -> Decoder {
    Decoder::default()
}

/// Dials one stream and authenticates it: a new session when `session` is `None`.
pub(crate) async fn dial(
    addr: SocketAddr,
    config: &TcpConfig,
    session: Option<SessionId>,
    slot: u16,
) -> Result<Authenticated> {
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, dial_inner(addr, config, session, slot))
        .await
        .map_err(|_| Error::Timeout {
            what: "connecting and authenticating a stream",
            after: limit,
        })?
}

async fn dial_inner(
    addr: SocketAddr,
    config: &TcpConfig,
    session: Option<SessionId>,
    slot: u16,
) -> Result<Authenticated> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
    let applied = sockopt::tune(&stream, config);
    let (hs, hello) = ClientHandshake::with_versions(
        config.psk.clone(),
        random_bytes(),
        session.unwrap_or([0; 16]),
        slot,
        config.max_streams as u16,
        CAPABILITIES,
        config.versions,
    );
    write_frame(&stream, &Frame::Hello(hello)).await?;
    let decoder = handshake_decoder();
    let mut buf = BytesMut::with_capacity(256);
    let ack = match read_frame(
        &stream,
        &mut buf,
        &decoder,
        &[FrameKind::HelloAck, FrameKind::Close],
        "waiting for HelloAck",
    )
    .await?
    {
        Frame::HelloAck(a) => a,
        Frame::Close(c) => return Err(rejected(c)),
        other => {
            return Err(ProtocolError::UnexpectedFrame {
                got: other.kind(),
                state: "waiting for HelloAck",
            }
            .into());
        }
    };
    let (proof, established) = hs.on_hello_ack(&ack)?;
    write_frame(&stream, &Frame::Auth(proof)).await?;
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

/// Runs the server side of the handshake on a freshly accepted stream. `find` looks a
/// session up by id; `session_cap` says why no new session may start, if it may not. On failure the peer gets a Close naming the reason.
pub(crate) async fn accept(
    stream: TcpStream,
    config: &TcpConfig,
    find: impl Fn(&SessionId) -> Option<Arc<Shared>>,
    session_cap: impl Fn() -> Option<String>,
) -> Result<Accepted> {
    let limit = config.handshake_timeout;
    let result =
        tokio::time::timeout(limit, accept_inner(&stream, config, find, session_cap)).await;
    let (session, established, leftover) = match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let code = match &e {
                Error::Protocol(ProtocolError::AuthFailed) => CloseCode::AuthFailed,
                Error::Config { .. } => CloseCode::LimitExceeded,
                _ => CloseCode::ProtocolError,
            };
            if !matches!(e, Error::Io { .. }) {
                let _ = write_frame(&stream, &Frame::Close(Close::new(code, e.to_string()))).await;
            }
            return Err(e);
        }
        Err(_) => {
            return Err(Error::Timeout {
                what: "waiting for the client's handshake",
                after: limit,
            });
        }
    };
    let applied = sockopt::tune(&stream, config);
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

async fn accept_inner(
    stream: &TcpStream,
    config: &TcpConfig,
    find: impl Fn(&SessionId) -> Option<Arc<Shared>>,
    session_cap: impl Fn() -> Option<String>,
) -> Result<(Option<Arc<Shared>>, Established, BytesMut)> {
    let decoder = handshake_decoder();
    let mut buf = BytesMut::with_capacity(256);
    let hello = match read_frame(
        stream,
        &mut buf,
        &decoder,
        &[FrameKind::Hello],
        "waiting for Hello",
    )
    .await?
    {
        Frame::Hello(h) => h,
        other => {
            return Err(ProtocolError::UnexpectedFrame {
                got: other.kind(),
                state: "waiting for Hello",
            }
            .into());
        }
    };
    let (session, id) = if hello.session_id == [0; 16] {
        if let Some(reason) = session_cap() {
            return Err(Error::Config {
                field: "max_sessions",
                reason,
            });
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
    write_frame(stream, &Frame::HelloAck(ack)).await?;
    let proof = match read_frame(
        stream,
        &mut buf,
        &decoder,
        &[FrameKind::Auth],
        "waiting for the client's Auth proof",
    )
    .await?
    {
        Frame::Auth(p) => p,
        other => {
            return Err(ProtocolError::UnexpectedFrame {
                got: other.kind(),
                state: "waiting for the client's Auth proof",
            }
            .into());
        }
    };
    let established = awaiting.on_auth(&proof)?;
    Ok((session, established, buf))
}

/// Re-dials a lost stream into its slot, with backoff, until it attaches or the session
/// gives up.
pub(crate) async fn redial(shared: Arc<Shared>, addr: SocketAddr, slot: u16) {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        {
            let life = lock(&shared.life);
            if life.closing || life.closed || life.peer_closed || life.fatal.is_some() {
                return;
            }
        }
        let target = shared
            .target_streams
            .load(std::sync::atomic::Ordering::Relaxed);
        if shared.stream_count() >= target {
            return;
        }
        match dial(addr, &shared.config, Some(shared.session_id), slot).await {
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
