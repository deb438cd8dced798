//! A stream's byte pipe: plain TCP, or TLS over TCP.
//!
//! The plain halves share the `TcpStream` and use its `try_*` calls directly, exactly as
//! before TLS existed: one vectored `writev` per batch, reads straight into the frame buffer.
//! The TLS halves go through tokio-rustls (which must copy, to encrypt). One `match` per
//! syscall is all the plain path pays for the choice.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

/// An accepted or dialled stream, before it is split into a reader and a writer.
#[derive(Debug)]
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// The TCP socket underneath, for socket options and shutdown.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.get_ref().0,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    pub(crate) fn split(self) -> (ReadSide, WriteSide) {
        match self {
            Conn::Plain(s) => {
                let s = Arc::new(s);
                (ReadSide::Plain(s.clone()), WriteSide::Plain(s))
            }
            Conn::Tls(t) => {
                let (r, w) = tokio::io::split(*t);
                (ReadSide::Tls(r), WriteSide::Tls(w))
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The reading half of a stream.
pub(crate) enum ReadSide {
    Plain(Arc<TcpStream>),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

impl ReadSide {
    /// Reads what is available, at most `max` bytes, into `buf`'s spare capacity; `Ok(0)` is
    /// the end of the stream.
    pub(crate) async fn read_some(
        &mut self,
        buf: &mut impl bytes::BufMut,
        max: usize,
    ) -> io::Result<usize> {
        let buf = &mut bytes::BufMut::limit(buf, max);
        match self {
            ReadSide::Plain(s) => loop {
                match s.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.readable().await?,
                    r => return r,
                }
            },
            ReadSide::Tls(r) => match r.read_buf(buf).await {
                // A peer (or a test) that shuts the socket without close_notify: the frames
                // are self-delimiting, so the reader judges a truncation itself, as for TCP.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

/// The writing half of a stream.
pub(crate) enum WriteSide {
    Plain(Arc<TcpStream>),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl WriteSide {
    /// Writes every slice, in order, with as few syscalls as the socket allows.
    pub(crate) async fn write_all_vectored(
        &mut self,
        mut rest: &mut [IoSlice<'_>],
    ) -> io::Result<()> {
        match self {
            WriteSide::Plain(s) => {
                while !rest.is_empty() {
                    match s.try_write_vectored(rest) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => IoSlice::advance_slices(&mut rest, n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.writable().await?,
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            WriteSide::Tls(w) => {
                while !rest.is_empty() {
                    match w.write_vectored(rest).await? {
                        0 => return Err(io::ErrorKind::WriteZero.into()),
                        n => IoSlice::advance_slices(&mut rest, n),
                    }
                }
                // rustls may still hold records when the socket was full: push them out so
                // that "written" means "in the kernel", as for plain TCP.
                w.flush().await
            }
        }
    }

    /// Half-closes: the peer's reader sees the end of the stream.
    pub(crate) async fn shutdown_write(&mut self) {
        match self {
            WriteSide::Plain(s) => {
                let _ = socket2::SockRef::from(&**s).shutdown(std::net::Shutdown::Write);
            }
            // close_notify, then the TCP half-close.
            WriteSide::Tls(w) => {
                let _ = w.shutdown().await;
            }
        }
    }
}
