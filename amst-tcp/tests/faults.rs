//! Faults and refusals: dead streams mid-transfer, wrong keys, unknown versions, garbage.

mod common;

use std::time::Duration;

use amst_core::codec::{Frame, Psk};
use amst_core::{Error, ProtocolError, Transport};
use amst_tcp::{TcpListener, TcpTransport};
use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_3_of_8_streams_mid_transfer_loses_nothing() {
    init_tracing();
    let (client, server) = pair(fixed(8), fixed(8)).await;
    let rx = tokio::spawn(async move { (recv_all(&server).await, server) });
    let total = 512u64 << 20;
    let client = std::sync::Arc::new(client);
    let sender = {
        let c = client.clone();
        tokio::spawn(async move { send_all(&c, total, 1 << 20).await })
    };
    // Mid-transfer: wait until a good part has gone out, then kill three streams.
    loop {
        let sent = client.metrics().bytes_sent;
        if sent > total / 4 {
            break;
        }
        assert!(!sender.is_finished(), "transfer ended before the fault");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(client.fault_shutdown_streams(3), 3);
    let sent = sender.await.unwrap();
    client.flush().await.unwrap();
    let m = client.metrics();
    assert!(
        m.chunks_retransmitted > 0,
        "chunks on the dead streams were not resent: {m:?}"
    );
    // The client re-dialled its lost streams.
    for _ in 0..200 {
        if client.stream_stats().len() == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client.stream_stats().len(), 8);
    let client = std::sync::Arc::into_inner(client).unwrap();
    client.close().await.unwrap();
    let ((bytes, msgs, got), server) = rx.await.unwrap();
    assert_eq!(bytes, total);
    assert_eq!(msgs, 512);
    assert_eq!(got, sent, "SHA-256 differs after the fault");
    assert_eq!(server.metrics().messages_received, 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_stream_on_the_receiving_side_is_also_survived() {
    init_tracing();
    let (client, server) = pair(fixed(4), fixed(4)).await;
    let total = 128u64 << 20;
    let server = std::sync::Arc::new(server);
    let rx = {
        let s = server.clone();
        tokio::spawn(async move { recv_all(&s).await })
    };
    let client = std::sync::Arc::new(client);
    let sender = {
        let c = client.clone();
        tokio::spawn(async move { send_all(&c, total, 256 << 10).await })
    };
    while server.metrics().bytes_received < total / 4 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The server cannot re-dial; the client notices and does.
    assert_eq!(server.fault_shutdown_streams(2), 2);
    let sent = sender.await.unwrap();
    client.flush().await.unwrap();
    let client = std::sync::Arc::into_inner(client).unwrap();
    client.close().await.unwrap();
    let (bytes, _, got) = rx.await.unwrap();
    assert_eq!(bytes, total);
    assert_eq!(got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_rejected_and_the_server_keeps_serving() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), fixed(2))
        .await
        .unwrap();
    let addr = listener.local_addr();
    let mut bad = fixed(2);
    bad.psk = Psk::new(b"not the right key at all").unwrap();
    let err = TcpTransport::connect(addr, bad).await.unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::AuthFailed)),
        "expected AuthFailed, got {err}"
    );
    // A client with the right key still gets in, and no session was created for the bad one.
    let accept = tokio::spawn(async move {
        let s = listener.accept().await.unwrap();
        (s.recv().await.unwrap(), s, listener)
    });
    let good = TcpTransport::connect(addr, fixed(2)).await.unwrap();
    good.send(Bytes::from_static(b"welcome")).await.unwrap();
    good.flush().await.unwrap();
    let (got, _session, _listener) = accept.await.unwrap();
    assert_eq!(got.as_deref(), Some(&b"welcome"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_fakes_its_proof_gets_no_session() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), fixed(1))
        .await
        .unwrap();
    let addr = listener.local_addr();
    // Speak the protocol by hand: a Hello, then an Auth with a made-up MAC.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_, hello) = amst_core::codec::ClientHandshake::new(psk(), [1; 32], [0; 16], 0, 1, 0);
    s.write_all(&Frame::Hello(hello).to_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(n > 0 && buf[0] == 0x02, "expected a HelloAck");
    s.write_all(&Frame::Auth(amst_core::codec::AuthProof { mac: [7; 32] }).to_bytes())
        .await
        .unwrap();
    // The server answers with Close(AuthFailed) and drops the stream.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let mut b = bytes::BytesMut::from(&rest[..]);
    match amst_core::codec::Decoder::default().decode(&mut b).unwrap() {
        Some(Frame::Close(c)) => {
            assert_eq!(c.code, amst_core::codec::CloseCode::AuthFailed);
            assert!(c.reason.contains("authentication"), "{}", c.reason);
        }
        other => panic!("expected Close(AuthFailed), got {other:?}"),
    }
    let pending = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(
        pending.is_err(),
        "a session was created without a valid proof"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_versions_are_refused_with_a_clear_reason() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), fixed(1))
        .await
        .unwrap();
    let mut future = fixed(1);
    future.versions = (7, 9);
    let err = TcpTransport::connect(listener.local_addr(), future)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            Error::PeerClosed {
                code: amst_core::codec::CloseCode::ProtocolError,
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("no common protocol version"), "{text}");
    assert!(text.contains("7..=9"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silence_are_dropped_without_a_session() {
    init_tracing();
    let mut cfg = fixed(1);
    cfg.handshake_timeout = Duration::from_millis(300);
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let addr = listener.local_addr();
    // Not AMST at all.
    let mut g = tokio::net::TcpStream::connect(addr).await.unwrap();
    g.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    // Silent (slowloris): the server must hang up after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "silent client was not dropped: {r:?}"
    );
    let r = tokio::time::timeout(Duration::from_secs(5), g.read_to_end(&mut Vec::new())).await;
    assert!(r.is_ok(), "garbage client was not dropped");
    // The server still serves.
    let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
    let c = TcpTransport::connect(addr, fixed(1)).await.unwrap();
    c.send(Bytes::from_static(b"ok")).await.unwrap();
    let s = accept.await.unwrap();
    assert_eq!(s.recv().await.unwrap().as_deref(), Some(&b"ok"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cannot_join_an_unknown_session() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), fixed(1))
        .await
        .unwrap();
    let addr = listener.local_addr();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_, hello) = amst_core::codec::ClientHandshake::new(psk(), [1; 32], [9; 16], 0, 1, 0);
    s.write_all(&Frame::Hello(hello).to_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let mut b = bytes::BytesMut::from(&rest[..]);
    match amst_core::codec::Decoder::default().decode(&mut b).unwrap() {
        Some(Frame::Close(c)) => assert!(c.reason.contains("no live session"), "{}", c.reason),
        other => panic!("expected Close, got {other:?}"),
    }
}

/// A stream whose connection is slow to come up (here: a proxy holds the third connection
/// for 1.5 s, as a lost SYN holds one for the kernel's one-second timer) does not hold up
/// `connect`: the session starts on the others, carries data, and the late stream attaches
/// when it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_does_not_hold_up_connect_and_attaches_later() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), fixed(4))
        .await
        .unwrap();
    let upstream = listener.local_addr();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0..8u32 {
            let Ok((mut client, _)) = proxy.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if n == 2 {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
    let began = std::time::Instant::now();
    let client = TcpTransport::connect(proxy_addr, fixed(4)).await.unwrap();
    let took = began.elapsed();
    assert!(
        took < Duration::from_millis(1200),
        "connect waited {took:?} for the slow stream"
    );
    assert_eq!(
        client.stream_stats().len(),
        3,
        "the slow stream is not up yet"
    );
    let server = accept.await.unwrap();
    client.send(Bytes::from_static(b"before")).await.unwrap();
    assert_eq!(
        server.recv().await.unwrap().as_deref(),
        Some(&b"before"[..])
    );
    all_streams(&client, 4).await;
    client.send(Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(server.recv().await.unwrap().as_deref(), Some(&b"after"[..]));
    client.close().await.unwrap();
}
