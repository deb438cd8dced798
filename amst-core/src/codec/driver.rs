//! The one async driver of the PSK handshake, for every transport and any runtime.
//!
//! The handshake's logic is the sans-IO [`ClientHandshake`] and
//! [`ServerHandshake`](super::ServerHandshake); this module runs their frame exchange over anything that implements [`FrameIo`] (a TCP or TLS
//! stream, a QUIC control stream, an RDMA bootstrap socket). A transport supplies the IO,
//! its timeouts and its policy between the steps: which session a Hello joins, whether its
//! nonce is bound to the TLS session, when a QUIC server may read the proof.

use std::future::Future;
use std::io;

use bytes::BytesMut;

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

/// A byte stream during the handshake (a TCP or TLS stream, an RDMA bootstrap socket): the
/// two operations [`StreamIo`] needs from it, so that the frame loop over a stream exists once.
pub trait ByteStream: Send {
    /// Writes all of `bytes` and flushes them.
    fn send_bytes(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Appends at most `max` bytes to `buf`; `Ok(0)` when the stream ended.
    fn recv_bytes(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send;
}

impl<S: ByteStream + ?Sized> ByteStream for &mut S {
    fn send_bytes(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send {
        (**self).send_bytes(bytes)
    }

    fn recv_bytes(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        (**self).recv_bytes(buf, max)
    }
}

/// [`FrameIo`] over a [`ByteStream`]. `buf` keeps the bytes read past the handshake (a
/// client may send data right behind its proof); hand them to whatever reads next.
#[derive(Debug)]
pub struct StreamIo<S> {
    /// The stream.
    pub stream: S,
    /// Bytes read and not yet decoded.
    pub buf: BytesMut,
    /// What the connection is, for errors ("handshake" reads "reading a handshake frame").
    label: &'static str,
}

/// How much one read may take: a Hello is small, and what follows the handshake stays in the
/// stream for its own reader.
const READ_STEP: usize = 256;

impl<S: ByteStream> StreamIo<S> {
    /// Frames over `stream`; `label` names the connection in errors.
    pub fn new(stream: S, label: &'static str) -> Self {
        StreamIo {
            stream,
            buf: BytesMut::new(),
            label,
        }
    }
}

impl<S: ByteStream> FrameIo for StreamIo<S> {
    async fn send(&mut self, frame: &Frame) -> Result<(), Error> {
        self.stream
            .send_bytes(&frame.to_bytes())
            .await
            .map_err(|e| Error::io(format!("writing a {} frame", self.label), e))
    }

    async fn recv(
        &mut self,
        allowed: &'static [FrameKind],
        state: &'static str,
    ) -> Result<Frame, Error> {
        let decoder = Decoder::default();
        loop {
            if let Some(f) = decode_expected(&decoder, &mut self.buf, allowed, state)? {
                return Ok(f);
            }
            self.buf.reserve(READ_STEP);
            let n = self
                .stream
                .recv_bytes(&mut self.buf, READ_STEP)
                .await
                .map_err(|e| Error::io(format!("reading a {} frame", self.label), e))?;
            if n == 0 {
                decoder.decode_eof(&mut self.buf)?;
                return Err(Error::io(
                    format!("reading a {} frame", self.label),
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the handshake",
                    ),
                ));
            }
        }
    }
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
    let frame = io
        .recv(&[FrameKind::Auth, FrameKind::Close], STATE)
        .await
        .map_err(|e| match e {
            // The client checks our HelloAck's MAC first and hangs up when it fails: from
            // here, a client with another key looks exactly like this.
            Error::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof => Error::io(
                "waiting for the client's key proof",
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client hung up after our HelloAck; a client whose pre-shared key \
                         differs from ours does this",
                ),
            ),
            other => other,
        })?;
    match frame {
        Frame::Auth(proof) => Ok(awaiting.on_auth(&proof)?),
        other => Err(unexpected(other, STATE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that hands out scripted bytes a few at a time and records what is written.
    struct Scripted {
        input: Vec<u8>,
        step: usize,
        written: Vec<u8>,
    }

    impl ByteStream for Scripted {
        async fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.written.extend_from_slice(bytes);
            Ok(())
        }

        async fn recv_bytes(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
            let n = self.step.min(max).min(self.input.len());
            buf.extend_from_slice(&self.input[..n]);
            self.input.drain(..n);
            Ok(n)
        }
    }

    fn close() -> Frame {
        Frame::Close(Close::new(CloseCode::Aborted, "bye"))
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_after_our_hello_ack_is_named_as_a_likely_key_mismatch() {
        use crate::codec::{ClientHandshake, Psk, ServerHandshake};
        let (_, hello) = ClientHandshake::new(
            Psk::new(b"the client's key").unwrap(),
            [1; 32],
            [0; 16],
            0,
            1,
            0,
        );
        let server = ServerHandshake::new(Psk::new(b"the server's key").unwrap(), [2; 32], 0);
        let (_, awaiting) = server.on_hello(&hello, [3; 16]).unwrap();
        let mut s = Scripted {
            input: Vec::new(),
            step: 4,
            written: Vec::new(),
        };
        let e = server_finish(&mut StreamIo::new(&mut s, "handshake"), awaiting)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("pre-shared key differs"), "{text}");
    }

    #[tokio::test]
    async fn stream_io_reassembles_frames_and_keeps_what_follows() {
        let mut input = close().to_bytes().to_vec();
        input.extend_from_slice(b"data after the handshake");
        let mut s = Scripted {
            input,
            step: 3,
            written: Vec::new(),
        };
        let mut io = StreamIo::new(&mut s, "test");
        let f = io.recv(&[FrameKind::Close], "testing").await.unwrap();
        assert_eq!(f, close());
        io.send(&close()).await.unwrap();
        // Reads stop at the frame's end give or take one step: the rest is either still in
        // the stream or kept in `buf`, never lost.
        let mut rest = io.buf.to_vec();
        rest.extend_from_slice(&s.input);
        assert_eq!(rest, b"data after the handshake");
        assert_eq!(s.written, close().to_bytes().to_vec());
    }

    #[tokio::test]
    async fn stream_io_refuses_unexpected_kinds_and_names_an_early_end() {
        let mut s = Scripted {
            input: close().to_bytes().to_vec(),
            step: 1,
            written: Vec::new(),
        };
        let e = StreamIo::new(&mut s, "test")
            .recv(&[FrameKind::Hello], "waiting for Hello")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Protocol(ProtocolError::UnexpectedFrame {
                    got: FrameKind::Close,
                    ..
                })
            ),
            "{e}"
        );
        assert_eq!(
            s.input.len(),
            close().to_bytes().len() - 1,
            "refused at the first byte"
        );

        let whole = close().to_bytes();
        let mut s = Scripted {
            input: whole[..whole.len() - 1].to_vec(),
            step: 4,
            written: Vec::new(),
        };
        let e = StreamIo::new(&mut s, "test")
            .recv(&[FrameKind::Close], "testing")
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ProtocolError::Truncated { .. })),
            "{e}"
        );

        let mut s = Scripted {
            input: Vec::new(),
            step: 4,
            written: Vec::new(),
        };
        let e = StreamIo::new(&mut s, "test")
            .recv(&[FrameKind::Close], "testing")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("reading a test frame"), "{e}");
    }
}
