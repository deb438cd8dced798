//! The AMST PSK handshake on the control stream, bound to the TLS session, and the
//! quinn configuration (windows, congestion controller) both sides share.
//!
//! The client's Hello nonce is a TLS exporter secret (RFC 5705) of this connection, and the
//! server accepts the Hello only if it equals its own export. Both HMACs cover that nonce,
//! so a man in the middle (who has one TLS session with each side, hence two different
//! exports) cannot relay the handshake, even when the certificate was not checked.
//!
//! On a resumed session the Hello may go in 0-RTT, before any exporter exists. Its nonce is
//! then random and it carries [`EARLY_HELLO`]. That is safe because the client holds tickets
//! only from connections whose handshake already authenticated the server (the connector keeps
//! a ticket only after the AMST handshake on its connection succeeded), so a session resumed
//! from one has no man in the middle to relay through. The proof and all data still wait for
//! the completed handshake.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use amst_core::codec::driver::{self, FrameIo};
use amst_core::codec::{
    ClientHandshake, CloseCode, Frame, FrameKind, Limits, ServerHandshake, capabilities,
    random_bytes,
};
use amst_core::{Error, ProtocolError, Result};
use quinn::congestion::ControllerFactory;
use quinn::{Connection, IdleTimeout, TransportConfig, VarInt};

use crate::config::{CongestionControl, QuicConfig};
use crate::session::{FrameReader, close_code, connection_error};
use crate::stream_order::{CONTROL_OUT_OF_ORDER, Waiting};

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

/// The control stream during the handshake, for amst-core's driver. Every failure to read
/// the expected frame closes the connection with a code and a reason the peer sees.
struct ControlIo<'a> {
    conn: &'a Connection,
    send: &'a mut quinn::SendStream,
    reader: &'a mut FrameReader,
    timeout: Duration,
}

impl FrameIo for ControlIo<'_> {
    async fn send(&mut self, frame: &Frame) -> Result<()> {
        write(self.send, frame).await
    }

    async fn recv(&mut self, allowed: &'static [FrameKind], state: &'static str) -> Result<Frame> {
        let frame = match tokio::time::timeout(self.timeout, self.reader.next()).await {
            Err(_) => {
                let e = Error::Timeout {
                    what: state,
                    after: self.timeout,
                };
                return reject(self.conn, CloseCode::ProtocolError, e);
            }
            Ok(Err(e)) => return Err(e.into_error()),
            Ok(Ok(None)) => {
                return Err(Error::io(
                    state,
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer ended the control stream",
                    ),
                ));
            }
            Ok(Ok(Some(f))) => f,
        };
        match frame {
            Frame::Close(c) => Err(driver::refused(c)),
            f if allowed.contains(&f.kind()) => Ok(f),
            other => {
                let e = Error::Protocol(ProtocolError::UnexpectedFrame {
                    got: other.kind(),
                    state,
                });
                reject(self.conn, CloseCode::ProtocolError, e)
            }
        }
    }
}

/// Closes the connection for a handshake that failed on a protocol error the driver found.
fn reject_failed<T>(conn: &Connection, e: Error) -> Result<T> {
    match e {
        Error::Protocol(ProtocolError::AuthFailed) => reject(conn, CloseCode::AuthFailed, e),
        Error::Protocol(_) => reject(conn, CloseCode::ProtocolError, e),
        other => Err(other),
    }
}

/// A capability bit of amst-quic's own: the client sent this Hello in 0-RTT, on a TLS session
/// resumed from a ticket it kept only after an authenticated connection, so its nonce is
/// random rather than the (not yet available) exporter. Both MACs cover the capabilities, so a
/// man in the middle cannot set or clear it without failing the handshake. Bit 32 is outside
/// amst-core's range of shared capabilities.
pub(crate) const EARLY_HELLO: u64 = 1 << 32;

async fn open_control(conn: &Connection, t: Duration) -> Result<(quinn::SendStream, FrameReader)> {
    let (send, recv) = tokio::time::timeout(t, conn.open_bi())
        .await
        .map_err(|_| Error::Timeout {
            what: "opening the QUIC control stream",
            after: t,
        })?
        .map_err(|e| connection_error(&e))?;
    let reader = FrameReader::new(recv, Limits::default(), Waiting::new(CONTROL_OUT_OF_ORDER));
    Ok((send, reader))
}

/// Checks the server's HelloAck and sends the client's proof.
async fn finish_client(
    conn: &Connection,
    config: &QuicConfig,
    hs: ClientHandshake,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
) -> Result<()> {
    let mut io = ControlIo {
        conn,
        send,
        reader,
        timeout: config.handshake_timeout,
    };
    match driver::client_finish(&mut io, hs).await {
        Ok(_) => Ok(()),
        Err(e) => reject_failed(conn, e),
    }
}

/// The connecting side on a full handshake: opens the control stream and proves the key, with
/// the Hello bound to this TLS session by its exporter.
pub(crate) async fn client(
    conn: &Connection,
    config: &QuicConfig,
) -> Result<(quinn::SendStream, FrameReader)> {
    let (mut send, mut reader) = open_control(conn, config.handshake_timeout).await?;
    let (hs, hello) = ClientHandshake::new(
        config.psk.clone(),
        binding(conn)?,
        [0; 16],
        0,
        1,
        capabilities::QUIC,
    );
    write(&mut send, &Frame::Hello(hello)).await?;
    finish_client(conn, config, hs, &mut send, &mut reader).await?;
    Ok((send, reader))
}

/// The connecting side on a resumed session that may carry 0-RTT data: the Hello (and nothing
/// else) goes early; the HelloAck comes back in the server's first flight, so the proof leaves
/// one round trip sooner than on a full handshake. The proof and all data wait until the
/// handshake completes, so they are never 0-RTT data. If the server rejected the early data,
/// runs the full, exporter-bound handshake instead. Returns whether the early Hello was used.
pub(crate) async fn client_early(
    conn: &Connection,
    accepted: quinn::ZeroRttAccepted,
    config: &QuicConfig,
) -> Result<(quinn::SendStream, FrameReader, bool)> {
    let t = config.handshake_timeout;
    let (mut send, mut reader) = open_control(conn, t).await?;
    let (hs, hello) = ClientHandshake::new(
        config.psk.clone(),
        random_bytes(),
        [0; 16],
        0,
        1,
        capabilities::QUIC | EARLY_HELLO,
    );
    // A write error here means 0-RTT was rejected already; `accepted` says so below.
    let sent = write(&mut send, &Frame::Hello(hello)).await;
    let accepted = tokio::time::timeout(t, accepted)
        .await
        .map_err(|_| Error::Timeout {
            what: "the QUIC handshake",
            after: t,
        })?;
    if let Some(e) = conn.close_reason() {
        return Err(connection_error(&e));
    }
    if !accepted {
        tracing::debug!(peer = %conn.remote_address(), "0-RTT rejected; full PSK handshake");
        drop((send, reader));
        let (send, reader) = client(conn, config).await?;
        return Ok((send, reader, false));
    }
    sent?;
    finish_client(conn, config, hs, &mut send, &mut reader).await?;
    Ok((send, reader, true))
}

/// What the accepting side learned from a completed handshake.
pub(crate) struct Accepted {
    pub(crate) control_tx: quinn::SendStream,
    pub(crate) control_rx: FrameReader,
    /// The client's Hello came early (0-RTT) and was answered before the TLS handshake ended.
    pub(crate) early: bool,
}

/// The accepting side: answers the Hello and checks the client's proof.
///
/// `complete` resolves when the TLS handshake is complete or the connection failed.
/// Before that, the only thing done is answering an early Hello: a HelloAck is idempotent
/// and creates nothing, so a replayed 0-RTT Hello gains an attacker one HelloAck it cannot
/// decrypt. The proof is checked, and the session created, only on a completed handshake,
/// so the proof was not 0-RTT data and cannot be a replay.
pub(crate) async fn server(
    conn: &Connection,
    config: &QuicConfig,
    complete: impl std::future::Future,
    early_answered: impl Fn(),
) -> Result<Accepted> {
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
    let mut reader = FrameReader::new(recv, Limits::default(), Waiting::new(CONTROL_OUT_OF_ORDER));
    let mut io = ControlIo {
        conn,
        send: &mut send,
        reader: &mut reader,
        timeout: t,
    };
    let hello = driver::server_hello(&mut io).await?;
    let early = hello.capabilities & EARLY_HELLO != 0;
    if early && !config.zero_rtt {
        let e = Error::Protocol(ProtocolError::Malformed {
            kind: FrameKind::Hello,
            field: "capabilities",
            reason: "asks for an early (0-RTT) handshake, which this listener has turned off"
                .into(),
        });
        return reject(conn, CloseCode::ProtocolError, e);
    }
    let wait_complete = async {
        match tokio::time::timeout(t, complete).await {
            Err(_) => reject(
                conn,
                CloseCode::ProtocolError,
                Error::Timeout {
                    what: "the QUIC handshake",
                    after: t,
                },
            ),
            // quinn resolves it with whether early data was accepted, or false if the
            // connection failed: only the close reason tells the two apart.
            Ok(_) => match conn.close_reason() {
                Some(e) => Err(connection_error(&e)),
                None => Ok(()),
            },
        }
    };
    let hs = ServerHandshake::new(config.psk.clone(), random_bytes(), capabilities::QUIC);
    let (ack, awaiting) = match hs.on_hello(&hello, random_bytes()) {
        Ok(x) => x,
        Err(p) => return reject(conn, CloseCode::ProtocolError, p.into()),
    };
    if early {
        // 0.5-RTT: the HelloAck rides with the server's handshake flight.
        io.send(&Frame::HelloAck(ack)).await?;
        early_answered();
        wait_complete.await?;
    } else {
        // The exporter exists only once the handshake is complete.
        wait_complete.await?;
        if hello.nonce != binding(conn)? {
            tracing::warn!(peer = %conn.remote_address(), "PSK handshake not bound to this TLS session");
            return reject(
                conn,
                CloseCode::AuthFailed,
                ProtocolError::AuthFailed.into(),
            );
        }
        io.send(&Frame::HelloAck(ack)).await?;
    }
    if let Err(e) = driver::server_finish(&mut io, awaiting).await {
        if matches!(e, Error::Protocol(ProtocolError::AuthFailed)) {
            tracing::warn!(peer = %conn.remote_address(), "QUIC client failed PSK authentication");
        }
        return reject_failed(conn, e);
    }
    Ok(Accepted {
        control_tx: send,
        control_rx: reader,
        early,
    })
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

fn controller(
    cc: CongestionControl,
    initial_window: u64,
) -> Arc<dyn ControllerFactory + Send + Sync> {
    use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
    let bbr = amst_cc::BbrConfig {
        initial_cwnd: initial_window,
        ..amst_cc::BbrConfig::draft()
    };
    match cc {
        CongestionControl::AmstBbr => Arc::new(amst_cc::quinn::BbrFactory::with_config(bbr)),
        CongestionControl::AmstBbrLossTolerant => Arc::new(
            amst_cc::quinn::BbrFactory::with_config(bbr.with_random_loss_tolerance(true)),
        ),
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
        .congestion_controller_factory(controller(config.congestion, config.initial_window));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn amst_cc_bbr_starts_with_the_configured_window_and_cubic_with_its_own() {
        let now = Instant::now();
        for cc in [
            CongestionControl::AmstBbr,
            CongestionControl::AmstBbrLossTolerant,
        ] {
            let c = controller(cc, 100_000).build(now, 1200);
            assert_eq!(c.initial_window(), 100_000, "{cc}");
            assert_eq!(c.window(), 100_000, "{cc}");
        }
        let cubic = controller(CongestionControl::AmstCubic, 100_000).build(now, 1200);
        assert_eq!(cubic.initial_window(), 12_000, "RFC 9002's ten datagrams");
    }
}
