//! The AMST PSK handshake on the control stream, bound to the TLS session, and the
//! quinn configuration (windows, congestion controller) both sides share.
//!
//! The client's Hello nonce is a TLS exporter secret (RFC 5705) of this connection, and the
//! server accepts the Hello only if it equals its own export. Both HMACs cover that nonce,
//! so a man in the middle (who has one TLS session with each side, hence two different
//! exports) cannot relay the handshake, even when the certificate was not checked.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use amst_core::codec::{
    ClientHandshake, CloseCode, Frame, FrameKind, Limits, ServerHandshake, capabilities,
    random_bytes,
};
use amst_core::{Error, ProtocolError, Result};
use quinn::congestion::ControllerFactory;
use quinn::{Connection, IdleTimeout, TransportConfig, VarInt};

use crate::config::{CongestionControl, QuicConfig};
use crate::session::{FrameReader, close_code, connection_error};

const BINDING_LABEL: &[u8] = b"EXPORTER-amst/3 psk binding";

fn binding(conn: &Connection) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, BINDING_LABEL, b"")
        .map_err(|_| Error::Config {
            field: "tls",
            reason: "the TLS session cannot export keying material".into(),
        })?;
    Ok(out)
}

/// Closes the connection with a code and a reason the peer will see, and returns `err`.
fn reject<T>(conn: &Connection, code: CloseCode, err: Error) -> Result<T> {
    conn.close(close_code(code), err.to_string().as_bytes());
    Err(err)
}

async fn next_frame(
    conn: &Connection,
    reader: &mut FrameReader,
    timeout: Duration,
    waiting_for: &'static str,
) -> Result<Frame> {
    match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => reject(
            conn,
            CloseCode::ProtocolError,
            Error::Timeout {
                what: waiting_for,
                after: timeout,
            },
        ),
        Ok(Err(e)) => Err(e.into_error()),
        Ok(Ok(None)) => Err(Error::io(
            waiting_for,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer ended the control stream",
            ),
        )),
        Ok(Ok(Some(Frame::Close(c)))) => Err(Error::PeerClosed {
            code: c.code,
            reason: c.reason,
        }),
        Ok(Ok(Some(f))) => Ok(f),
    }
}

fn unexpected(got: FrameKind, state: &'static str) -> Error {
    Error::Protocol(ProtocolError::UnexpectedFrame { got, state })
}

/// The connecting side: opens the control stream and proves the key.
pub(crate) async fn client(
    conn: &Connection,
    config: &QuicConfig,
) -> Result<(quinn::SendStream, FrameReader)> {
    let t = config.handshake_timeout;
    let (mut send, recv) = tokio::time::timeout(t, conn.open_bi())
        .await
        .map_err(|_| Error::Timeout {
            what: "opening the QUIC control stream",
            after: t,
        })?
        .map_err(|e| connection_error(&e))?;
    let mut reader = FrameReader::new(recv, Limits::default());
    let (hs, hello) = ClientHandshake::new(
        config.psk.clone(),
        binding(conn)?,
        [0; 16],
        0,
        1,
        capabilities::QUIC,
    );
    write(&mut send, &Frame::Hello(hello)).await?;
    let ack = match next_frame(conn, &mut reader, t, "waiting for the server's HelloAck").await? {
        Frame::HelloAck(a) => a,
        other => {
            let e = unexpected(other.kind(), "waiting for HelloAck");
            return reject(conn, CloseCode::ProtocolError, e);
        }
    };
    let (proof, _established) = match hs.on_hello_ack(&ack) {
        Ok(x) => x,
        Err(p) => {
            let code = if p == ProtocolError::AuthFailed {
                CloseCode::AuthFailed
            } else {
                CloseCode::ProtocolError
            };
            return reject(conn, code, Error::Protocol(p));
        }
    };
    write(&mut send, &Frame::Auth(proof)).await?;
    Ok((send, reader))
}

/// The accepting side: answers the Hello and checks the client's proof.
pub(crate) async fn server(
    conn: &Connection,
    config: &QuicConfig,
) -> Result<(quinn::SendStream, FrameReader)> {
    let t = config.handshake_timeout;
    let (mut send, recv) = match tokio::time::timeout(t, conn.accept_bi()).await {
        Err(_) => {
            return reject(
                conn,
                CloseCode::ProtocolError,
                Error::Timeout {
                    what: "waiting for the client's control stream",
                    after: t,
                },
            );
        }
        Ok(r) => r.map_err(|e| connection_error(&e))?,
    };
    let mut reader = FrameReader::new(recv, Limits::default());
    let hello = match next_frame(conn, &mut reader, t, "waiting for the client's Hello").await? {
        Frame::Hello(h) => h,
        other => {
            let e = unexpected(other.kind(), "waiting for Hello");
            return reject(conn, CloseCode::ProtocolError, e);
        }
    };
    if hello.nonce != binding(conn)? {
        tracing::warn!(peer = %conn.remote_address(), "PSK handshake not bound to this TLS session");
        return reject(
            conn,
            CloseCode::AuthFailed,
            ProtocolError::AuthFailed.into(),
        );
    }
    let hs = ServerHandshake::new(config.psk.clone(), random_bytes(), capabilities::QUIC);
    let (ack, awaiting) = match hs.on_hello(&hello, random_bytes()) {
        Ok(x) => x,
        Err(p) => return reject(conn, CloseCode::ProtocolError, p.into()),
    };
    write(&mut send, &Frame::HelloAck(ack)).await?;
    let proof = match next_frame(conn, &mut reader, t, "waiting for the client's proof").await? {
        Frame::Auth(p) => p,
        other => {
            let e = unexpected(other.kind(), "waiting for Auth");
            return reject(conn, CloseCode::ProtocolError, e);
        }
    };
    if let Err(p) = awaiting.on_auth(&proof) {
        tracing::warn!(peer = %conn.remote_address(), "QUIC client failed PSK authentication");
        return reject(conn, CloseCode::AuthFailed, p.into());
    }
    Ok((send, reader))
}

async fn write(send: &mut quinn::SendStream, frame: &Frame) -> Result<()> {
    send.write_all(&frame.to_bytes())
        .await
        .map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => connection_error(&c),
            other => Error::io(
                "writing the QUIC control stream",
                io::Error::new(io::ErrorKind::ConnectionAborted, other),
            ),
        })
}

fn controller(cc: CongestionControl) -> Arc<dyn ControllerFactory + Send + Sync> {
    use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
    match cc {
        CongestionControl::AmstBbr => Arc::new(amst_cc::quinn::BbrFactory::default()),
        CongestionControl::AmstCubic => Arc::new(amst_cc::quinn::CubicFactory::default()),
        CongestionControl::QuinnCubic => Arc::new(CubicConfig::default()),
        CongestionControl::QuinnBbr => Arc::new(BbrConfig::default()),
        CongestionControl::QuinnNewReno => Arc::new(NewRenoConfig::default()),
    }
}

/// quinn's transport parameters, sized from the configured window.
///
/// The stream and connection receive windows are twice the AMST credit window: AMST credit
/// counts payload bytes, QUIC flow control counts frame headers too, and the readers drain
/// streams eagerly, so QUIC flow control should never be what limits the rate. The send
/// window matches, so that quinn buffers enough to keep a whole window in flight.
pub(crate) fn transport_config(config: &QuicConfig) -> Result<TransportConfig> {
    let w = config.window.saturating_mul(2);
    let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
    let mut t = TransportConfig::default();
    t.stream_receive_window(varint(w))
        .receive_window(varint(w))
        .send_window(w)
        .max_concurrent_uni_streams(VarInt::from_u32(1024))
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .datagram_receive_buffer_size(Some(1 << 20))
        .datagram_send_buffer_size(1 << 20)
        .max_idle_timeout(Some(IdleTimeout::try_from(config.idle_timeout).map_err(
            |_| Error::Config {
                field: "idle_timeout",
                reason: format!("{:?} is too long for QUIC", config.idle_timeout),
            },
        )?))
        .keep_alive_interval(Some(config.idle_timeout / 3))
        .congestion_controller_factory(controller(config.congestion));
    Ok(t)
}
