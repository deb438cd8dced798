//! The one async driver of the PSK handshake, for every transport and any runtime.
//!
//! The handshake's logic is the sans-IO [`ClientHandshake`] and
//! [`ServerHandshake`](super::ServerHandshake); this module runs their frame exchange over anything that implements [`FrameIo`] (a TCP or TLS
//! stream, a QUIC control stream, an RDMA bootstrap socket). A transport supplies the IO,
//! its timeouts and its policy between the steps: which session a Hello joins, whether its
//! nonce is bound to the TLS session, when a QUIC server may read the proof.

use std::future::Future;

use super::frame::{Close, CloseCode, Frame, FrameKind, Hello};
use super::handshake::{AwaitingProof, ClientHandshake, Established};
use super::wire::Decoder;
use crate::{Error, ProtocolError};

/// Frames in and out of one connection during the handshake.
pub trait FrameIo {
    /// Writes one whole frame (and flushes it).
    fn send(&mut self, frame: &Frame) -> impl Future<Output = Result<(), Error>> + Send;

    /// Reads the next frame, which must be of one of the `allowed` kinds; `state` names what
    /// the handshake is waiting for, for errors. Use [`decode_expected`] on a byte stream, so
    /// that a peer cannot make us buffer more than the largest allowed frame.
    fn recv(
        &mut self,
        allowed: &'static [FrameKind],
        state: &'static str,
    ) -> impl Future<Output = Result<Frame, Error>> + Send;
}

/// Decodes one frame from `buf` if it is whole, refusing from its first byte any frame whose
/// kind is not `allowed`: before the proof, nothing may make the reader wait for (or
/// buffer) more than a handshake frame.
pub fn decode_expected(
    decoder: &Decoder,
    buf: &mut bytes::BytesMut,
    allowed: &[FrameKind],
    state: &'static str,
) -> Result<Option<Frame>, ProtocolError> {
    if let Some(&b) = buf.first() {
        match FrameKind::from_u8(b) {
            Some(kind) if allowed.contains(&kind) => {}
            Some(kind) => return Err(ProtocolError::UnexpectedFrame { got: kind, state }),
            None => return Err(ProtocolError::UnknownFrameType(b)),
        }
    }
    decoder.decode(buf)
}

/// The error a side reports when the peer answers with a Close instead.
pub fn refused(close: Close) -> Error {
    match close.code {
        CloseCode::AuthFailed => Error::Protocol(ProtocolError::AuthFailed),
        code => Error::PeerClosed {
            code,
            reason: close.reason,
        },
    }
}

/// The Close a server sends when the handshake fails with `e`.
pub fn close_for(e: &Error) -> Close {
    let code = match e {
        Error::Protocol(ProtocolError::AuthFailed) => CloseCode::AuthFailed,
        Error::Config { field, .. } if field.starts_with("max_") => CloseCode::LimitExceeded,
        Error::Unavailable { .. } => CloseCode::Aborted,
        _ => CloseCode::ProtocolError,
    };
    Close::new(code, e.to_string())
}

fn unexpected(frame: Frame, state: &'static str) -> Error {
    match frame {
        Frame::Close(c) => refused(c),
        other => ProtocolError::UnexpectedFrame {
            got: other.kind(),
            state,
        }
        .into(),
    }
}

/// The whole client side: sends `hello`, then [`client_finish`].
pub async fn client(
    io: &mut impl FrameIo,
    hs: ClientHandshake,
    hello: Hello,
) -> Result<Established, Error> {
    io.send(&Frame::Hello(hello)).await?;
    client_finish(io, hs).await
}

/// The client side after its Hello went out: checks the server's HelloAck and sends the
/// proof. Data may follow the proof at once.
pub async fn client_finish(
    io: &mut impl FrameIo,
    hs: ClientHandshake,
) -> Result<Established, Error> {
    const STATE: &str = "waiting for HelloAck";
    let ack = match io
        .recv(&[FrameKind::HelloAck, FrameKind::Close], STATE)
        .await?
    {
        Frame::HelloAck(a) => a,
        other => return Err(unexpected(other, STATE)),
    };
    let (proof, established) = hs.on_hello_ack(&ack)?;
    io.send(&Frame::Auth(proof)).await?;
    Ok(established)
}

/// The server's first step: the client's Hello. The caller decides which session it joins
/// and answers it with [`ServerHandshake::on_hello`](super::ServerHandshake::on_hello).
pub async fn server_hello(io: &mut impl FrameIo) -> Result<Hello, Error> {
    const STATE: &str = "waiting for Hello";
    match io.recv(&[FrameKind::Hello], STATE).await? {
        Frame::Hello(h) => Ok(h),
        other => Err(unexpected(other, STATE)),
    }
}

/// The server's last step, after its HelloAck went out: the client's proof. Only once this
/// returns may the connection carry data.
pub async fn server_finish(
    io: &mut impl FrameIo,
    awaiting: AwaitingProof,
) -> Result<Established, Error> {
    const STATE: &str = "waiting for the client's Auth proof";
    match io.recv(&[FrameKind::Auth, FrameKind::Close], STATE).await? {
        Frame::Auth(proof) => Ok(awaiting.on_auth(&proof)?),
        other => Err(unexpected(other, STATE)),
    }
}
