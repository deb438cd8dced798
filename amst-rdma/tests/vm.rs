//! Real RDMA tests, run by `cargo xtask rdma-vm` in two Soft-RoCE VMs: the same binary runs on
//! both, with `AMST_RDMA_ROLE` (server or client) and `AMST_RDMA_PEER` (the other VM's
//! address). Tests run one at a time in name order on both sides, each on its own port.
//! Without those variables (a normal `cargo test`), every test says why and returns.

#![cfg(feature = "rdma")]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amst_core::codec::Psk;
use amst_core::{Error, Transport};
use amst_rdma::{RdmaConfig, RdmaListener, RdmaTransport};
use bytes::Bytes;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Server,
    Client,
}

fn vm() -> Option<(Role, IpAddr)> {
    let role = match std::env::var("AMST_RDMA_ROLE").ok()?.as_str() {
        "server" => Role::Server,
        "client" => Role::Client,
        _ => return None,
    };
    let peer = std::env::var("AMST_RDMA_PEER").ok()?.parse().ok()?;
    Some((role, peer))
}

fn config() -> RdmaConfig {
    let mut c = RdmaConfig::new(Psk::new(b"amst-rdma vm test key").unwrap());
    c.device = std::env::var("AMST_RDMA_DEVICE").ok();
    c.handshake_timeout = Duration::from_secs(60);
    c
}

const LIMIT: Duration = Duration::from_secs(240);

/// Connects the two VMs on `port`: the server accepts, the client retries until the server
/// listens (both start the test at about the same time).
async fn pair(role: Role, peer: IpAddr, port: u16) -> RdmaTransport {
    match role {
        Role::Server => {
            let l = RdmaListener::bind(SocketAddr::new([0, 0, 0, 0].into(), port), config())
                .await
                .unwrap();
            tokio::time::timeout(LIMIT, l.accept())
                .await
                .expect("the client came in time")
                .unwrap()
        }
        Role::Client => {
            let deadline = Instant::now() + LIMIT;
            loop {
                match RdmaTransport::connect(SocketAddr::new(peer, port), config()).await {
                    Ok(t) => return t,
                    Err(Error::Io { .. }) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    Err(e) => panic!("connecting to {peer}:{port}: {e}"),
                }
            }
        }
    }
}

async fn recv(t: &RdmaTransport) -> Bytes {
    tokio::time::timeout(LIMIT, t.recv())
        .await
        .expect("a message in time")
        .unwrap()
        .expect("not closed yet")
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Bulk transfer with SHA-256 compared end to end; size from `AMST_RDMA_BULK_MIB` (default
/// 256). Prints the goodput for comparison with ib_send_bw.
#[tokio::test]
async fn t1_bulk_sha256_equal() {
    let Some((role, peer)) = vm() else {
        eprintln!("skip: not in the rdma-vm guests");
        return;
    };
    let mib: u64 = std::env::var("AMST_RDMA_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let port = 18_501 + std::env::var("AMST_RDMA_PORT_SHIFT").map_or(0, |v| v.parse().unwrap_or(0));
    let t = pair(role, peer, port).await;
    let total = mib << 20;
    match role {
        Role::Client => {
            let start = Instant::now();
            let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
            for i in 0..mib {
                let mut m = vec![0u8; 1 << 20];
                fill(&mut m, i);
                sha.update(&m);
                t.send(Bytes::from(m)).await.unwrap();
            }
            tokio::time::timeout(LIMIT, t.flush())
                .await
                .unwrap()
                .unwrap();
            let secs = start.elapsed().as_secs_f64();
            let theirs = recv(&t).await;
            assert_eq!(&theirs[..], sha.finish().as_ref(), "SHA-256 differs");
            println!(
                "AMST-INFO amst goodput {:.4} Gb/s ({mib} MiB in {secs:.1} s)",
                total as f64 * 8.0 / secs / 1e9
            );
            let m = t.metrics();
            assert_eq!(m.messages_acked, mib);
            // What the RDMA transport reports of its path: ack-timed RTT, the peer's credit
            // and the segment size; the NIC's congestion control stays out of sight.
            let rtt = m.rtt.expect("an ack-timed RTT after acknowledged messages");
            assert!(m.min_rtt.is_some_and(|min| min <= rtt), "{m:?}");
            assert!(m.credit_window.is_some_and(|w| w > 0), "{m:?}");
            assert_eq!(m.chunk_size, Some(config().chunk_payload() as u64));
            assert_eq!(m.cwnd, None);
            println!("AMST-INFO amst rdma srtt {rtt:?} after the bulk transfer");
            t.close().await.unwrap();
        }
        Role::Server => {
            let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
            let mut got = 0u64;
            while got < total {
                let m = recv(&t).await;
                got += m.len() as u64;
                sha.update(&m);
            }
            assert_eq!(got, total);
            t.send(Bytes::copy_from_slice(sha.finish().as_ref()))
                .await
                .unwrap();
            t.flush().await.unwrap();
            let end = tokio::time::timeout(LIMIT, t.recv()).await.unwrap();
            assert!(matches!(end, Ok(None)), "graceful close expected: {end:?}");
        }
    }
}

/// 10 000 small messages arrive whole and in order.
#[tokio::test]
async fn t2_small_messages_in_order() {
    let Some((role, peer)) = vm() else {
        eprintln!("skip: not in the rdma-vm guests");
        return;
    };
    let t = pair(role, peer, 18_502).await;
    const N: u32 = 10_000;
    match role {
        Role::Client => {
            for i in 0..N {
                let mut m = i.to_be_bytes().to_vec();
                m.resize(4 + (i % 61) as usize, i as u8);
                t.send(Bytes::from(m)).await.unwrap();
            }
            t.flush().await.unwrap();
            assert_eq!(&recv(&t).await[..], &N.to_be_bytes());
            t.close().await.unwrap();
        }
        Role::Server => {
            for i in 0..N {
                let m = recv(&t).await;
                assert_eq!(m.len(), 4 + (i % 61) as usize, "message {i} length");
                assert_eq!(&m[..4], &i.to_be_bytes(), "message {i} out of order");
                assert!(m[4..].iter().all(|b| *b == i as u8));
            }
            t.send(Bytes::copy_from_slice(&N.to_be_bytes()))
                .await
                .unwrap();
            t.flush().await.unwrap();
            let end = tokio::time::timeout(LIMIT, t.recv()).await.unwrap();
            assert!(matches!(end, Ok(None)), "{end:?}");
        }
    }
}

/// Four tasks share one transport; each task's messages stay in its own order.
#[tokio::test]
async fn t3_concurrent_senders() {
    let Some((role, peer)) = vm() else {
        eprintln!("skip: not in the rdma-vm guests");
        return;
    };
    let t = Arc::new(pair(role, peer, 18_503).await);
    const TASKS: u8 = 4;
    const PER: u32 = 1_000;
    match role {
        Role::Client => {
            let mut hs = Vec::new();
            for k in 0..TASKS {
                let t = Arc::clone(&t);
                hs.push(tokio::spawn(async move {
                    for i in 0..PER {
                        // Some messages large enough to go through the ring.
                        let len = if i.is_multiple_of(50) { 300_000 } else { 16 };
                        let mut m = vec![k; len];
                        m[1..5].copy_from_slice(&i.to_be_bytes());
                        t.send(Bytes::from(m)).await.unwrap();
                    }
                }));
            }
            for h in hs {
                h.await.unwrap();
            }
            t.flush().await.unwrap();
            assert_eq!(t.metrics().messages_acked, TASKS as u64 * PER as u64);
            t.close().await.unwrap();
        }
        Role::Server => {
            let mut next = [0u32; TASKS as usize];
            for _ in 0..TASKS as u32 * PER {
                let m = recv(&t).await;
                let k = m[0] as usize;
                let i = u32::from_be_bytes(m[1..5].try_into().unwrap());
                assert_eq!(i, next[k], "task {k} out of order");
                next[k] += 1;
            }
            assert_eq!(next, [PER; TASKS as usize]);
            let end = tokio::time::timeout(LIMIT, t.recv()).await.unwrap();
            assert!(matches!(end, Ok(None)), "{end:?}");
        }
    }
}

/// The peer destroys its queue pair mid-transfer: the sender gets an error, not a hang.
#[tokio::test]
async fn t4_peer_qp_destroyed_is_an_error() {
    let Some((role, peer)) = vm() else {
        eprintln!("skip: not in the rdma-vm guests");
        return;
    };
    let t = pair(role, peer, 18_504).await;
    match role {
        Role::Server => {
            for _ in 0..3 {
                recv(&t).await;
            }
            t.abort();
            drop(t);
            // Stay alive (the process, not the QP) while the client notices.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Role::Client => {
            let start = Instant::now();
            let err = loop {
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "no error two minutes after the peer's QP was destroyed"
                );
                let r = tokio::time::timeout(Duration::from_secs(120), async {
                    t.send(Bytes::from(vec![7u8; 1 << 20])).await?;
                    t.flush().await
                })
                .await
                .expect("send/flush hung after the peer's QP was destroyed");
                if let Err(e) = r {
                    break e;
                }
            };
            println!(
                "AMST-INFO peer QP destroyed -> error after {:.1?}: {err}",
                start.elapsed()
            );
            assert!(
                !matches!(err, Error::Closed),
                "a dead peer must be reported as such, not as a local close: {err}"
            );
        }
    }
}

/// The peer's QP disappears while its bootstrap connection stays up: only the RC layer can
/// tell (retry exceeded), and that must surface as an error, not a hang.
#[tokio::test]
async fn t5_peer_qp_gone_with_bootstrap_alive_is_an_error() {
    let Some((role, peer)) = vm() else {
        eprintln!("skip: not in the rdma-vm guests");
        return;
    };
    let t = pair(role, peer, 18_505).await;
    match role {
        Role::Server => {
            for _ in 0..3 {
                recv(&t).await;
            }
            // Hold the bootstrap connection open until the client says it found out (a plain
            // TCP connection on the next port), at most a minute.
            let done = tokio::net::TcpListener::bind(SocketAddr::new([0, 0, 0, 0].into(), 18_515))
                .await
                .unwrap();
            t.destroy_qp_keep_bootstrap();
            let _ = tokio::time::timeout(Duration::from_secs(60), done.accept()).await;
        }
        Role::Client => {
            let start = Instant::now();
            let err = loop {
                assert!(
                    start.elapsed() < Duration::from_secs(50),
                    "no error 50 s after the peer's QP was destroyed"
                );
                let r = tokio::time::timeout(Duration::from_secs(50), async {
                    t.send(Bytes::from(vec![7u8; 1 << 20])).await?;
                    t.flush().await
                })
                .await
                .expect("send/flush hung after the peer's QP was destroyed");
                if let Err(e) = r {
                    break e;
                }
            };
            println!(
                "AMST-INFO peer QP destroyed, bootstrap alive -> error after {:.1?}: {err}",
                start.elapsed()
            );
            let _ = tokio::net::TcpStream::connect(SocketAddr::new(peer, 18_515)).await;
            assert!(
                err.to_string().contains("work completion failed"),
                "the error must come from the failed work request: {err}"
            );
        }
    }
}
