//! Listener limits: the cap on handshakes in progress sheds slowloris connections at once.
//! Its own test binary, since it opens many sockets and other tests count descriptors.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use bytes::Bytes;
use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn config(streams: usize) -> TcpConfig {
    fixed(streams)
}

/// Reads until the server hangs up or `limit` passes; returns the bytes read and whether it
/// closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(start.elapsed()),
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Err(_) => break None,
        }
    };
    (raw, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_handshake_cap_sheds_slowloris_and_a_legit_client_gets_in_after_the_timeout() {
    init_tracing();
    const CAP: usize = 16;
    const EXTRA: usize = 8;
    let timeout = Duration::from_secs(2);
    let mut cfg = config(1);
    cfg.handshake_timeout = timeout;
    cfg.max_pending_handshakes = CAP;
    let listener = Arc::new(
        TcpListener::bind("127.0.0.1:0".parse().unwrap(), cfg)
            .await
            .unwrap(),
    );
    let addr = listener.local_addr();
    // Silent connections fill every handshake slot.
    let mut silent = Vec::new();
    for _ in 0..CAP {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut pending = 0;
    for _ in 0..200 {
        pending = listener.pending_handshakes();
        if pending == CAP {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(pending, CAP, "the silent connections were not all pending");
    // Beyond the cap, connections are closed at once, long before the handshake timeout.
    let started = Instant::now();
    let mut over = Vec::new();
    for _ in 0..EXTRA {
        over.push(TcpStream::connect(addr).await.unwrap());
    }
    for (i, s) in over.iter_mut().enumerate() {
        let (frames, closed) = read_until_closed(s, timeout * 4).await;
        assert!(frames.is_empty(), "over-cap connection {i} got bytes");
        assert!(closed.is_some(), "over-cap connection {i} was not closed");
    }
    assert!(
        started.elapsed() < timeout / 2,
        "over-cap connections were not shed at once: {:?}",
        started.elapsed()
    );
    assert!(listener.pending_handshakes() <= CAP);
    // A legit client: while the slots are held it is shed too, so it retries until the
    // timeout frees them, and then gets in.
    let deadline = Instant::now() + timeout * 6;
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    let c = loop {
        match TcpTransport::connect(addr, config(1)).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "never got in: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    c.send(Bytes::from_static(b"in")).await.unwrap();
    let s = accept.await.unwrap();
    assert_eq!(s.recv().await.unwrap().as_deref(), Some(&b"in"[..]));
    for (i, sock) in silent.iter_mut().enumerate() {
        let (_, closed) = read_until_closed(sock, timeout * 2).await;
        assert!(closed.is_some(), "silent connection {i} was not dropped");
    }
    let mut pending = usize::MAX;
    for _ in 0..200 {
        pending = listener.pending_handshakes();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(pending, 0, "handshake slots leaked");
}
