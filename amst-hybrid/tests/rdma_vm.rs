//! The hybrid manager over real RDMA, run by `cargo xtask rdma-vm` in two Soft-RoCE VMs (the
//! same binary on both, role and peer from `AMST_RDMA_ROLE` / `AMST_RDMA_PEER`). Without those
//! variables (a normal `cargo test`), every test says why and returns.

#![cfg(feature = "rdma")]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use amst_core::{Mode, TransportKind};
use amst_hybrid::{Amst, AmstConfig, DatacenterTransport};
use common::*;

fn vm() -> Option<(bool, IpAddr)> {
    let server = match std::env::var("AMST_RDMA_ROLE").ok()?.as_str() {
        "server" => true,
        "client" => false,
        _ => return None,
    };
    Some((server, std::env::var("AMST_RDMA_PEER").ok()?.parse().ok()?))
}

fn config() -> AmstConfig {
    builder()
        .datacenter_transport(DatacenterTransport::Rdma {
            device: std::env::var("AMST_RDMA_DEVICE").ok(),
            gid_index: None,
        })
        // TCG guests are slow: a new lane may take seconds to come up.
        .attach_timeout(Duration::from_secs(60))
        .drain_timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Messages each way while the client switches RDMA (datacenter) ↔ TCP (internet) four
/// times: every message arrives exactly once and in order (SHA-256 of each stream equal),
/// and the metrics name the transport each mode really runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdma_tcp_switches_under_traffic_lose_and_duplicate_nothing() {
    let Some((is_server, peer)) = vm() else {
        eprintln!("skip: not in the rdma-vm guests");
        return;
    };
    const PORT: u16 = 18_600;
    const N: u64 = 1_500;
    const UP_MAX: usize = 32 << 10;
    const DOWN_MAX: usize = 512;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("amst_hybrid=info,amst_rdma=info")
        .with_test_writer()
        .try_init();
    within(400, async {
        if is_server {
            let l = Amst::listen(SocketAddr::new([0, 0, 0, 0].into(), PORT), config())
                .await
                .unwrap();
            let server = l.accept().await.unwrap();
            assert_eq!(server.metrics().transport, TransportKind::Rdma);
            let tx = server.clone();
            let down = tokio::spawn(async move {
                for i in 0..N {
                    tx.send(message(i, DOWN_MAX)).await.unwrap();
                }
            });
            let got = receive_checked(&server, N).await;
            assert_eq!(got.as_ref(), digest_of(N, UP_MAX).as_ref(), "upstream SHA-256");
            down.await.unwrap();
            server.flush().await.unwrap();
            assert_eq!(server.recv().await.unwrap(), None, "graceful end");
            println!(
                "AMST-INFO hybrid server: {} duplicates dropped after resends",
                server.metrics().duplicates_dropped
            );
        } else {
            let deadline = Instant::now() + Duration::from_secs(120);
            // The server opens its RDMA bootstrap port before its TCP port. Dialling before
            // the TCP port is open can find the RDMA port still closed and the TCP one open a
            // moment later: a legitimate fallback, but not what this test is about.
            let addr = SocketAddr::new(peer, PORT);
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                assert!(Instant::now() < deadline, "the server at {addr} never opened");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let client = loop {
                match Amst::connect(SocketAddr::new(peer, PORT), config()).await {
                    Ok(c) => break c,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("waiting for the server: {e}");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Err(e) => panic!("connecting to {peer}:{PORT}: {e}"),
                }
            };
            assert!(client.is_hybrid());
            assert_eq!(
                client.metrics().transport,
                TransportKind::Rdma,
                "the datacenter lane must run on RDMA here, not a fallback"
            );
            let tx = client.clone();
            let up = tokio::spawn(async move {
                for i in 0..N {
                    tx.send(message(i, UP_MAX)).await.unwrap();
                }
            });
            let rx = client.clone();
            let got = tokio::spawn(async move { receive_checked(&rx, N).await });
            let start = Instant::now();
            for mode in [
                Mode::Internet,
                Mode::Datacenter,
                Mode::Internet,
                Mode::Datacenter,
            ] {
                tokio::time::sleep(Duration::from_millis(300)).await;
                client.force_mode(mode).await.unwrap();
                let want = match mode {
                    Mode::Datacenter => TransportKind::Rdma,
                    _ => TransportKind::Tcp,
                };
                assert_eq!(client.metrics().transport, want, "after switching to {mode}");
            }
            up.await.unwrap();
            assert_eq!(
                got.await.unwrap().as_ref(),
                digest_of(N, DOWN_MAX).as_ref(),
                "downstream SHA-256"
            );
            client.flush().await.unwrap();
            let m = client.metrics();
            assert_eq!(m.switches, 4);
            assert_eq!(m.transport, TransportKind::Rdma);
            println!(
                "AMST-INFO hybrid rdma<->tcp: 4 switches under traffic in {:.1?}, {} resent at the last, switch durations {:?}",
                start.elapsed(),
                m.last_switch_resent,
                client.switch_durations()
            );
            client.close().await.unwrap();
        }
    })
    .await;
}
