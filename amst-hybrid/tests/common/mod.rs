//! Shared set-up for the session tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use amst_core::{Mode, codec::Psk};
use amst_hybrid::{
    Amst, AmstConfig, AmstConfigBuilder, AmstListener, MemoryConnector, memory_network,
};
use bytes::{BufMut, Bytes, BytesMut};
use ring::digest;

pub fn psk() -> Psk {
    Psk::new(b"amst-hybrid test key").unwrap()
}

pub fn builder() -> AmstConfigBuilder {
    AmstConfig::builder(psk())
        .auto_mode(false)
        .initial_mode(Mode::Datacenter)
}

/// A connected in-memory client/server pair.
pub async fn memory_pair(config: AmstConfig) -> (Amst, Amst, MemoryConnector, AmstListener) {
    let (connector, acceptor) = memory_network(256);
    let listener = Amst::listen_with(Arc::new(acceptor), config.clone()).unwrap();
    let client = Amst::connect_with(Arc::new(connector.clone()), config)
        .await
        .unwrap();
    let server = listener.accept().await.unwrap();
    (client, server, connector, listener)
}

/// Message `i` of a test stream: its index, then deterministic filler of a size that varies.
pub fn message(i: u64, max: usize) -> Bytes {
    let len = 8 + (i.wrapping_mul(2654435761) as usize % max.max(1));
    let mut b = BytesMut::with_capacity(len);
    b.put_u64(i);
    for k in 0..len - 8 {
        b.put_u8((i as u8).wrapping_mul(31).wrapping_add(k as u8));
    }
    b.freeze()
}

/// Receives until `n` messages arrived; checks each index is the next one (exactly once, in
/// order) and returns the SHA-256 of the stream.
pub async fn receive_checked(rx: &Amst, n: u64) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for expected in 0..n {
        let m = rx
            .recv()
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("stream ended at {expected} of {n}"));
        let got = u64::from_be_bytes(m[..8].try_into().unwrap());
        assert_eq!(got, expected, "message out of order, lost or duplicated");
        ctx.update(&m);
    }
    ctx.finish()
}

pub fn digest_of(n: u64, max: usize) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for i in 0..n {
        ctx.update(&message(i, max));
    }
    ctx.finish()
}

/// Percentile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out")
}
