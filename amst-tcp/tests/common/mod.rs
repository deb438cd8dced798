//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::OnceLock;

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use bytes::Bytes;
use ring::digest::{Context, SHA256};

pub fn psk() -> Psk {
    Psk::new(b"amst-tcp test key, 32 bytes long").unwrap()
}

/// A datacenter-profile config with exactly `streams` streams and no adaptation, so that a
/// test measures what it names.
pub fn fixed(streams: usize) -> TcpConfig {
    let mut c = TcpConfig::datacenter(psk()).with_streams(streams);
    c.min_streams = 1;
    c.adaptive = false;
    c
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "amst_tcp=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A connected pair over loopback: (client, server).
pub async fn pair(client: TcpConfig, server: TcpConfig) -> (TcpTransport, TcpTransport) {
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), server)
        .await
        .unwrap();
    let addr = listener.local_addr();
    // Dropped after the accept: it goes on attaching this session's other and re-dialled
    // streams for as long as the session lives.
    let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
    let n = client.streams;
    let c = TcpTransport::connect(addr, client).await.unwrap();
    let s = accept.await.unwrap();
    all_streams(&c, n).await;
    all_streams(&s, n).await;
    (c, s)
}

/// Waits (up to 10 s) until `t` has `n` streams: `connect` may return before a slow stream
/// is up, and tests that count streams count them all.
pub async fn all_streams(t: &TcpTransport, n: usize) {
    for _ in 0..1000 {
        if t.stream_stats().len() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{} of {n} streams after 10 s", t.stream_stats().len());
}

/// 64 MiB of deterministic pseudo-random bytes (xorshift64*), made once per test binary.
pub fn pool() -> &'static Bytes {
    static POOL: OnceLock<Bytes> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut v = Vec::with_capacity(64 << 20);
        for _ in 0..(64 << 20) / 8 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        Bytes::from(v)
    })
}

/// Message `i` of `len` bytes: a zero-copy slice of the pool at an offset that varies with
/// `i`, so that every message differs from its neighbours.
pub fn message(i: u64, len: usize) -> Bytes {
    let pool = pool();
    let span = (pool.len() - len) as u64;
    let off = (i.wrapping_mul(0x9e37_79b9) % span.max(1)) as usize;
    pool.slice(off..off + len)
}

/// Sends `total` bytes as messages of `len` bytes; returns the SHA-256 of what was sent.
pub async fn send_all(t: &TcpTransport, total: u64, len: usize) -> Vec<u8> {
    let mut ctx = Context::new(&SHA256);
    let mut sent = 0u64;
    let mut i = 0;
    while sent < total {
        let n = len.min((total - sent) as usize);
        let m = message(i, n);
        ctx.update(&m);
        t.send(m).await.unwrap();
        sent += n as u64;
        i += 1;
    }
    ctx.finish().as_ref().to_vec()
}

/// Receives until the peer closes; returns (bytes, messages, SHA-256).
pub async fn recv_all(t: &TcpTransport) -> (u64, u64, Vec<u8>) {
    let mut ctx = Context::new(&SHA256);
    let (mut bytes, mut msgs) = (0u64, 0u64);
    while let Some(m) = t.recv().await.unwrap() {
        ctx.update(&m);
        bytes += m.len() as u64;
        msgs += 1;
    }
    (bytes, msgs, ctx.finish().as_ref().to_vec())
}
