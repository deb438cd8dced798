//! The RDMA bootstrap's authentication, on loopback with real sockets. It needs no verbs: the
//! bootstrap runs (and must refuse) before any device, queue pair or ring is touched, which
//! is also why nothing a peer sends before its proof can make the server allocate more than a
//! Hello.

use std::time::{Duration, Instant};

use amst_core::codec::{ClientHandshake, Frame, FrameKind, Psk, capabilities, random_bytes};
use amst_core::{Error, ProtocolError};
use amst_rdma::RdmaConfig;
use amst_rdma::bootstrap::{accept, dial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(key: &[u8]) -> RdmaConfig {
    RdmaConfig::new(Psk::new(key).unwrap())
}

/// A server whose `accept` result is returned with how long it took.
async fn server(
    key: &'static [u8],
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<(Result<(), Error>, Duration)>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let start = Instant::now();
        let r = accept(&mut s, &config(key)).await.map(|_| ());
        (r, start.elapsed())
    });
    (addr, h)
}

#[tokio::test]
async fn a_wrong_psk_is_rejected_with_a_clear_error_on_both_sides() {
    let (addr, srv) = server(b"the server's key").await;
    let err = dial(addr, &config(b"a different key!")).await.unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::AuthFailed)),
        "{err:?}"
    );
    let text = err.to_string().to_lowercase();
    assert!(
        text.contains("auth"),
        "the error must say authentication failed: {err}"
    );
    let (r, _) = srv.await.unwrap();
    assert!(
        r.is_err(),
        "the server accepted a client with the wrong key"
    );
}

/// Right after a valid Hello, a Data frame announcing 512 MiB: the server refuses it from its
/// first byte (no wait for the body, no buffer for it) and says what it expected.
#[tokio::test]
async fn a_data_frame_before_the_proof_is_refused_at_once() {
    let (addr, srv) = server(b"the server's key").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (_hs, hello) = ClientHandshake::new(
        Psk::new(b"the server's key").unwrap(),
        random_bytes(),
        [0; 16],
        0,
        1,
        capabilities::RDMA,
    );
    s.write_all(&Frame::Hello(hello).to_bytes()).await.unwrap();
    let mut header = vec![FrameKind::Data as u8];
    header.extend_from_slice(&(512u32 << 20).to_be_bytes());
    s.write_all(&header).await.unwrap();
    // Keep the connection open: a server waiting for the body would run into its 10 s limit.
    let (r, took) = tokio::time::timeout(Duration::from_secs(30), srv)
        .await
        .expect("the server decided")
        .unwrap();
    let err = r.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol(ProtocolError::UnexpectedFrame {
                got: FrameKind::Data,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "refused after {took:?}: it waited for the body"
    );
    assert!(
        err.to_string().contains("Auth"),
        "names what it waited for: {err}"
    );
    // The server told the client why, then closed; it sent no endpoint.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    let mut buf = bytes::BytesMut::from(&rest[..]);
    let decoder = amst_core::codec::Decoder::default();
    let mut kinds = Vec::new();
    while let Ok(Some(f)) = decoder.decode(&mut buf) {
        kinds.push(f.kind());
    }
    assert_eq!(kinds, [FrameKind::HelloAck, FrameKind::Close], "{rest:?}");
    assert!(buf.is_empty(), "nothing but HelloAck and Close: {buf:?}");
}

/// A first frame that is not a Hello is refused from its first byte too.
#[tokio::test]
async fn anything_but_a_hello_first_is_refused_at_once() {
    let (addr, srv) = server(b"the server's key").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut header = vec![FrameKind::Data as u8];
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&header).await.unwrap();
    let (r, took) = tokio::time::timeout(Duration::from_secs(30), srv)
        .await
        .expect("the server decided")
        .unwrap();
    assert!(
        matches!(
            r,
            Err(Error::Protocol(ProtocolError::UnexpectedFrame { .. }))
        ),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
}
