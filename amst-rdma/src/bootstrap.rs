//! The TCP bootstrap: the PSK handshake (amst-core's state machines, as amst-tcp uses them),
//! then the exchange of queue pair endpoints, then a ready barrier. The connection stays open
//! for the session's life, so that a peer that vanishes is noticed even on an idle queue pair.

use std::io;
use std::net::SocketAddr;

use amst_core::codec::driver::{self, FrameIo};
use amst_core::codec::{
    ClientHandshake, Established, Frame, ServerHandshake, capabilities, random_bytes,
};
use amst_core::{Error, ProtocolError, Result};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::RdmaConfig;

/// Everything the peer needs to reach our queue pair and write into our ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// The GID (RoCE: an IPv6 or IPv4-mapped address).
    pub gid: [u8; 16],
    /// The port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The port's active MTU as the verbs enum (1 = 256 … 5 = 4096).
    pub mtu: u8,
    /// Virtual address of the receive ring.
    pub ring_addr: u64,
    /// Remote key of the receive ring.
    pub ring_rkey: u32,
    /// Slots in the ring.
    pub ring_slots: u32,
    /// Bytes per slot.
    pub slot_size: u32,
    /// Receives kept posted.
    pub recv_depth: u32,
    /// Bytes per receive buffer.
    pub recv_buf_size: u32,
}

const ENDPOINT_MAGIC: u32 = 0x414d_5244; // "AMRD"
/// Encoded size of an [`Endpoint`].
pub const ENDPOINT_LEN: usize = 64;

impl Endpoint {
    /// The fixed-size encoding.
    pub fn encode(&self) -> [u8; ENDPOINT_LEN] {
        let mut b = [0u8; ENDPOINT_LEN];
        b[0..4].copy_from_slice(&ENDPOINT_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.qpn.to_be_bytes());
        b[8..12].copy_from_slice(&self.psn.to_be_bytes());
        b[12..28].copy_from_slice(&self.gid);
        b[28..30].copy_from_slice(&self.lid.to_be_bytes());
        b[30] = self.mtu;
        b[32..40].copy_from_slice(&self.ring_addr.to_be_bytes());
        b[40..44].copy_from_slice(&self.ring_rkey.to_be_bytes());
        b[44..48].copy_from_slice(&self.ring_slots.to_be_bytes());
        b[48..52].copy_from_slice(&self.slot_size.to_be_bytes());
        b[52..56].copy_from_slice(&self.recv_depth.to_be_bytes());
        b[56..60].copy_from_slice(&self.recv_buf_size.to_be_bytes());
        b
    }

    /// Parses and checks an endpoint against our own limits: the peer's receive buffers must
    /// hold our small segments, and its slots our ring segments.
    pub fn decode(b: &[u8; ENDPOINT_LEN], ours: &RdmaConfig) -> Result<Self, ProtocolError> {
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let bad = |field: &'static str, reason: String| {
            ProtocolError::Inconsistent(format!("RDMA endpoint: `{field}` {reason}"))
        };
        if u32_at(0) != ENDPOINT_MAGIC {
            return Err(ProtocolError::BadMagic {
                found: u32_at(0),
                expected: ENDPOINT_MAGIC,
            });
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[12..28]);
        let e = Endpoint {
            qpn: u32_at(4),
            psn: u32_at(8),
            gid,
            lid: u16::from_be_bytes([b[28], b[29]]),
            mtu: b[30],
            ring_addr: u64::from_be_bytes(b[32..40].try_into().expect("8 bytes")),
            ring_rkey: u32_at(40),
            ring_slots: u32_at(44),
            slot_size: u32_at(48),
            recv_depth: u32_at(52),
            recv_buf_size: u32_at(56),
        };
        if e.qpn == 0 || e.qpn >= 1 << 24 {
            return Err(bad(
                "qpn",
                format!("is {:#x}; it must be 24 bits and not 0", e.qpn),
            ));
        }
        if e.psn >= 1 << 24 {
            return Err(bad(
                "psn",
                format!("is {:#x}; it must fit in 24 bits", e.psn),
            ));
        }
        if !(1..=5).contains(&e.mtu) {
            return Err(bad("mtu", format!("is {}; expected 1..=5", e.mtu)));
        }
        if e.slot_size != ours.slot_size || e.recv_buf_size != ours.recv_buf_size() as u32 {
            return Err(bad(
                "slot_size",
                format!(
                    "{}/{} differs from ours {}/{}: both sides must use the same slot and receive sizes",
                    e.slot_size,
                    e.recv_buf_size,
                    ours.slot_size,
                    ours.recv_buf_size()
                ),
            ));
        }
        if e.ring_slots < 2 || e.recv_depth < 4 {
            return Err(bad(
                "ring_slots",
                format!(
                    "{} slots / {} receives is too few",
                    e.ring_slots, e.recv_depth
                ),
            ));
        }
        Ok(e)
    }
}

/// The bootstrap connection during the handshake, for amst-core's `driver::StreamIo`.
struct Bootstrap<'a>(&'a mut TcpStream);

impl driver::ByteStream for Bootstrap<'_> {
    async fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes).await
    }

    async fn recv_bytes(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        (&mut *self.0).take(max as u64).read_buf(buf).await
    }
}

/// Frames on the bootstrap connection; `buf` keeps bytes read past the handshake (the client
/// may send its endpoint right behind its proof).
fn bootstrap_io(stream: &mut TcpStream) -> driver::StreamIo<Bootstrap<'_>> {
    driver::StreamIo::new(Bootstrap(stream), "bootstrap")
}

async fn write_frame(stream: &mut TcpStream, frame: &Frame) -> Result<()> {
    bootstrap_io(stream).send(frame).await
}

/// Dials `addr` and authenticates as the client.
/// Returns the stream, the session, and any bytes read past the handshake (hand them to
/// [`exchange`]).
pub async fn dial(
    addr: SocketAddr,
    config: &RdmaConfig,
) -> Result<(TcpStream, Established, BytesMut)> {
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::io(format!("connecting to {addr} for the RDMA bootstrap"), e))?;
        let _ = stream.set_nodelay(true);
        let (hs, hello) = ClientHandshake::new(
            config.psk.clone(),
            random_bytes(),
            [0; 16],
            0,
            1,
            capabilities::RDMA,
        );
        let mut io = bootstrap_io(&mut stream);
        let est = driver::client(&mut io, hs, hello).await?;
        let buf = io.buf;
        Ok((stream, est, buf))
    })
    .await
    .map_err(|_| Error::Timeout {
        what: "the RDMA bootstrap handshake",
        after: limit,
    })?
}

/// Authenticates an accepted bootstrap connection as the server. On failure the peer gets a
/// Close that names the reason. Returns the session and any bytes read past the handshake
/// (the client may send its endpoint right behind its proof).
pub async fn accept(
    stream: &mut TcpStream,
    config: &RdmaConfig,
) -> Result<(Established, BytesMut)> {
    let limit = config.handshake_timeout;
    let _ = stream.set_nodelay(true);
    let r = tokio::time::timeout(limit, async {
        let mut io = bootstrap_io(&mut *stream);
        let hello = driver::server_hello(&mut io).await?;
        let hs = ServerHandshake::new(config.psk.clone(), random_bytes(), capabilities::RDMA);
        let (ack, awaiting) = hs.on_hello(&hello, random_bytes())?;
        io.send(&Frame::HelloAck(ack)).await?;
        let est = driver::server_finish(&mut io, awaiting).await?;
        let buf = io.buf;
        Ok((est, buf))
    })
    .await;
    match r {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(e)) => {
            if !matches!(e, Error::Io { .. }) {
                let _ = write_frame(stream, &Frame::Close(driver::close_for(&e))).await;
            }
            Err(e)
        }
        Err(_) => Err(Error::Timeout {
            what: "the RDMA bootstrap handshake",
            after: limit,
        }),
    }
}

/// Sends ours, reads and checks theirs. `leftover` holds bytes already read past the
/// handshake.
pub async fn exchange(
    stream: &mut TcpStream,
    leftover: &mut BytesMut,
    ours: &Endpoint,
    config: &RdmaConfig,
) -> Result<Endpoint> {
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, async {
        stream
            .write_all(&ours.encode())
            .await
            .map_err(|e| Error::io("sending the RDMA endpoint", e))?;
        while leftover.len() < ENDPOINT_LEN {
            let n = stream
                .read_buf(leftover)
                .await
                .map_err(|e| Error::io("reading the peer's RDMA endpoint", e))?;
            if n == 0 {
                return Err(Error::io(
                    "reading the peer's RDMA endpoint",
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the bootstrap connection",
                    ),
                ));
            }
        }
        let b: [u8; ENDPOINT_LEN] = leftover.split_to(ENDPOINT_LEN)[..]
            .try_into()
            .expect("exact length");
        Ok(Endpoint::decode(&b, config)?)
    })
    .await
    .map_err(|_| Error::Timeout {
        what: "exchanging RDMA endpoints",
        after: limit,
    })?
}

/// The ready barrier: each side sends one byte once its queue pair can receive, and waits for
/// the peer's, so no SEND reaches a queue pair that is not ready (which would be an error).
/// `leftover` holds bytes already read past the endpoint.
pub async fn barrier(
    stream: &mut TcpStream,
    leftover: &mut BytesMut,
    config: &RdmaConfig,
) -> Result<()> {
    const READY: u8 = 0xA5;
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, async {
        stream
            .write_all(&[READY])
            .await
            .map_err(|e| Error::io("sending the ready byte", e))?;
        let mut b = [0u8; 1];
        if leftover.len() > 1 {
            return Err(ProtocolError::Inconsistent(
                "bytes after the ready byte on the RDMA bootstrap connection".into(),
            )
            .into());
        }
        if leftover.len() == 1 {
            b[0] = leftover[0];
            leftover.clear();
        } else {
            stream
                .read_exact(&mut b)
                .await
                .map_err(|e| Error::io("reading the peer's ready byte", e))?;
        }
        if b[0] != READY {
            return Err(ProtocolError::Inconsistent(format!(
                "ready byte {:#04x}, expected {READY:#04x}",
                b[0]
            ))
            .into());
        }
        Ok(())
    })
    .await
    .map_err(|_| Error::Timeout {
        what: "waiting for the peer's queue pair to be ready",
        after: limit,
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use amst_core::codec::Psk;
    use tokio::net::TcpListener;

    fn config(key: &[u8]) -> RdmaConfig {
        RdmaConfig::new(Psk::new(key).unwrap())
    }

    fn endpoint(c: &RdmaConfig, qpn: u32) -> Endpoint {
        Endpoint {
            qpn,
            psn: 0x12_3456,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1],
            lid: 0,
            mtu: 3,
            ring_addr: 0x7f00_0000_1000,
            ring_rkey: 0xdead_beef,
            ring_slots: c.ring_slots,
            slot_size: c.slot_size,
            recv_depth: c.recv_depth,
            recv_buf_size: c.recv_buf_size() as u32,
        }
    }

    #[test]
    fn endpoint_round_trips_and_is_checked() {
        let c = config(b"0123456789abcdef");
        let e = endpoint(&c, 0x11);
        assert_eq!(Endpoint::decode(&e.encode(), &c).unwrap(), e);
        let mut b = e.encode();
        b[0] ^= 1;
        assert!(matches!(
            Endpoint::decode(&b, &c),
            Err(ProtocolError::BadMagic { .. })
        ));
        let mut bad = e;
        bad.qpn = 1 << 24;
        assert!(Endpoint::decode(&bad.encode(), &c).is_err());
        let mut bad = e;
        bad.slot_size += 1;
        assert!(Endpoint::decode(&bad.encode(), &c).is_err());
        let mut bad = e;
        bad.mtu = 9;
        assert!(Endpoint::decode(&bad.encode(), &c).is_err());
    }

    #[tokio::test]
    async fn bootstrap_authenticates_and_exchanges_endpoints_over_loopback() {
        let c = config(b"0123456789abcdef");
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sc = c.clone();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let (_, mut left) = accept(&mut s, &sc).await.unwrap();
            let theirs = exchange(&mut s, &mut left, &endpoint(&sc, 0x22), &sc)
                .await
                .unwrap();
            barrier(&mut s, &mut left, &sc).await.unwrap();
            theirs
        });
        let (mut s, est, mut left) = dial(addr, &c).await.unwrap();
        assert_eq!(est.capabilities, capabilities::RDMA);
        let theirs = exchange(&mut s, &mut left, &endpoint(&c, 0x11), &c)
            .await
            .unwrap();
        barrier(&mut s, &mut left, &c).await.unwrap();
        assert_eq!(theirs.qpn, 0x22);
        assert_eq!(server.await.unwrap().qpn, 0x11);
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_on_both_sides() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            accept(&mut s, &config(b"server-key-0123")).await
        });
        let client = dial(addr, &config(b"client-key-0123")).await;
        assert!(
            matches!(client, Err(Error::Protocol(ProtocolError::AuthFailed))),
            "{client:?}"
        );
        let server = server.await.unwrap();
        assert!(server.is_err(), "server accepted a wrong key");
    }
}
