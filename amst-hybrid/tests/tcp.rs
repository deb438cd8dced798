//! Switching over real amst-tcp transports on loopback: datacenter profile (64 streams,
//! CUBIC) ↔ internet profile (8 streams, BBR, paced), under continuous traffic.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amst_core::{Mode, Transport, TransportKind};
use amst_hybrid::{Amst, AmstConfig, AmstListener, DatacenterTransport};
use amst_tcp::{TcpConfig, TcpTransport};
use bytes::Bytes;
use common::*;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn tcp_pair(config: AmstConfig) -> (Amst, Amst, AmstListener) {
    let listener = Amst::listen(loopback(), config.clone()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = Amst::connect(addr, config).await.unwrap();
    let server = listener.accept().await.unwrap();
    (client, server, listener)
}

/// 10k messages each way while the client switches datacenter → internet → datacenter a
/// few times; exactly once, in order, SHA-256 equal. Prints the switch durations (swap to
/// first message acknowledged on the new transport).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_datacenter_internet_and_back_under_traffic() {
    within(120, async {
        const N: u64 = 10_000;
        let (client, server, _l) = tcp_pair(builder().build().unwrap()).await;
        assert!(client.is_hybrid());
        assert_eq!(client.metrics().transport, TransportKind::Tcp);
        assert_eq!(client.metrics().streams, 64);
        let tx = client.clone();
        let up = tokio::spawn(async move {
            for i in 0..N {
                tx.send(message(i, 8192)).await.unwrap();
            }
        });
        let stx = server.clone();
        let down = tokio::spawn(async move {
            for i in 0..N {
                stx.send(message(i, 512)).await.unwrap();
            }
        });
        let srx = server.clone();
        let got_up = tokio::spawn(async move { receive_checked(&srx, N).await });
        let crx = client.clone();
        let got_down = tokio::spawn(async move { receive_checked(&crx, N).await });
        let mut switches = 0u64;
        for mode in [
            Mode::Internet,
            Mode::Datacenter,
            Mode::Internet,
            Mode::Datacenter,
            Mode::Internet,
            Mode::Datacenter,
        ] {
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.force_mode(mode).await.unwrap();
            switches += 1;
            let m = client.metrics();
            assert_eq!(m.mode, mode);
            assert_eq!(m.streams, if mode == Mode::Internet { 8 } else { 64 });
        }
        up.await.unwrap();
        down.await.unwrap();
        assert_eq!(got_up.await.unwrap().as_ref(), digest_of(N, 8192).as_ref());
        assert_eq!(got_down.await.unwrap().as_ref(), digest_of(N, 512).as_ref());
        client.flush().await.unwrap();
        let m = client.metrics();
        assert_eq!(m.switches, switches);
        assert_eq!(server.metrics().generation, switches);
        let mut d = client.switch_durations();
        d.sort();
        println!(
            "tcp switches under traffic: {} timed of {switches}; p50 {:?} p99 {:?} max {:?}; resent at last switch {}; duplicates dropped by server {}",
            d.len(),
            percentile(&d, 0.5),
            percentile(&d, 0.99),
            d.last().copied().unwrap_or_default(),
            m.last_switch_resent,
            server.metrics().duplicates_dropped,
        );
        client.close().await.unwrap();
        assert_eq!(server.recv().await.unwrap(), None);
    })
    .await;
}

/// 40 forced switches, 100 ms apart, under traffic over TCP: 0 lost, 0 duplicated. Bounded by
/// count, not time, so a slow machine takes longer instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_flip_storm_40_switches_100ms_apart() {
    within(120, async {
        let (client, server, _l) = tcp_pair(builder().build().unwrap()).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, s2) = (client.clone(), stop.clone());
        let up = tokio::spawn(async move {
            let mut i = 0u64;
            while !s2.load(Ordering::Relaxed) {
                tx.send(message(i, 4096)).await.unwrap();
                i += 1;
            }
            i
        });
        let srx = server.clone();
        let reader = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(m) = srx.recv().await.unwrap() {
                assert_eq!(u64::from_be_bytes(m[..8].try_into().unwrap()), n, "lost or duplicated");
                assert_eq!(m, message(n, 4096));
                n += 1;
            }
            n
        });
        let start = Instant::now();
        let modes = [Mode::Internet, Mode::Datacenter];
        let mut k = 0usize;
        while k < 40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.force_mode(modes[k % 2]).await.unwrap();
            k += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let sent = up.await.unwrap();
        client.close().await.unwrap();
        let received = reader.await.unwrap();
        assert_eq!(received, sent);
        let mut d = client.switch_durations();
        d.sort();
        println!(
            "tcp flip storm: {k} switches in {:?}, {sent} messages, 0 lost, 0 duplicated; switch p50 {:?} p99 {:?} max {:?} ({} timed)",
            start.elapsed(),
            percentile(&d, 0.5),
            percentile(&d, 0.99),
            d.last().copied().unwrap_or_default(),
            d.len()
        );
        assert_eq!(client.metrics().switches, k as u64);
    })
    .await;
}

/// A plain amst-tcp client (no hybrid layer) talks to an `Amst` server: plain messages both
/// ways; the server recognises it by its first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_amst_tcp_client_talks_to_an_amst_server() {
    within(30, async {
        let listener = Amst::listen(loopback(), builder().build().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        // The hybrid listener takes TLS and plaintext streams alike; this client is plain.
        let plain = TcpTransport::connect(
            addr,
            TcpConfig::internet(psk()).with_streams(4).with_tls(None),
        )
        .await
        .unwrap();
        plain.send(Bytes::from_static(b"v1 says hi")).await.unwrap();
        let server = listener.accept().await.unwrap();
        assert!(!server.is_hybrid());
        assert_eq!(
            server.recv().await.unwrap().as_deref(),
            Some(&b"v1 says hi"[..])
        );
        server.send(Bytes::from_static(b"no header")).await.unwrap();
        assert_eq!(
            plain.recv().await.unwrap().as_deref(),
            Some(&b"no header"[..])
        );
        assert!(server.force_mode(Mode::Internet).await.is_err());
    })
    .await;
}

/// TCP datacenter lane ↔ QUIC internet lane (amst-quic, amst-cc BBR) under 10k messages each
/// way: exactly once, in order, SHA-256 equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_datacenter_quic_internet_and_back_under_traffic() {
    within(120, async {
        const N: u64 = 10_000;
        let config = builder()
            .internet_transport(TransportKind::Quic)
            .build()
            .unwrap();
        let (client, server, _l) = tcp_pair(config).await;
        assert_eq!(client.metrics().transport, TransportKind::Tcp);
        let tx = client.clone();
        let up = tokio::spawn(async move {
            for i in 0..N {
                tx.send(message(i, 8192)).await.unwrap();
            }
        });
        let stx = server.clone();
        let down = tokio::spawn(async move {
            for i in 0..N {
                stx.send(message(i, 512)).await.unwrap();
            }
        });
        let srx = server.clone();
        let got_up = tokio::spawn(async move { receive_checked(&srx, N).await });
        let crx = client.clone();
        let got_down = tokio::spawn(async move { receive_checked(&crx, N).await });
        for mode in [
            Mode::Internet,
            Mode::Datacenter,
            Mode::Internet,
            Mode::Datacenter,
        ] {
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.force_mode(mode).await.unwrap();
            let want = if mode == Mode::Internet {
                TransportKind::Quic
            } else {
                TransportKind::Tcp
            };
            assert_eq!(client.metrics().transport, want);
            assert_eq!(server.metrics().transport, want);
        }
        up.await.unwrap();
        down.await.unwrap();
        assert_eq!(got_up.await.unwrap().as_ref(), digest_of(N, 8192).as_ref());
        assert_eq!(got_down.await.unwrap().as_ref(), digest_of(N, 512).as_ref());
        let mut d = client.switch_durations();
        d.sort();
        println!(
            "tcp<->quic switches under traffic: {} timed; p50 {:?} p99 {:?}",
            d.len(),
            percentile(&d, 0.5),
            percentile(&d, 0.99)
        );
        client.close().await.unwrap();
        assert_eq!(server.recv().await.unwrap(), None);
    })
    .await;
}

/// An RDMA datacenter transport on a host without an RDMA device (or a build without the
/// `rdma` feature): the listener leaves RDMA out, the client's lane falls back to TCP with a
/// logged warning, the metrics say TCP, and traffic completes. Where a device
/// exists this is covered by the rdma-vm tests instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdma_datacenter_transport_falls_back_to_tcp_without_a_device() {
    if amst_rdma::devices().is_ok() {
        eprintln!("skip: this host has an RDMA device; the fallback is not exercised");
        return;
    }
    within(60, async {
        const N: u64 = 2_000;
        let config = builder()
            .datacenter_transport(DatacenterTransport::Rdma {
                device: None,
                gid_index: None,
            })
            .build()
            .unwrap();
        assert_eq!(
            config.profile(Mode::Datacenter).unwrap().transport,
            TransportKind::Rdma
        );
        let (client, server, _l) = tcp_pair(config).await;
        assert!(client.is_hybrid());
        assert_eq!(client.metrics().transport, TransportKind::Tcp);
        let tx = client.clone();
        let up = tokio::spawn(async move {
            for i in 0..N {
                tx.send(message(i, 16 << 10)).await.unwrap();
            }
        });
        let srx = server.clone();
        let got = tokio::spawn(async move { receive_checked(&srx, N).await });
        up.await.unwrap();
        assert_eq!(got.await.unwrap().as_ref(), digest_of(N, 16 << 10).as_ref());
        let m = client.metrics();
        assert_eq!(
            (m.mode, m.transport),
            (Mode::Datacenter, TransportKind::Tcp)
        );
        assert_eq!(server.metrics().transport, TransportKind::Tcp);
        client.close().await.unwrap();
        assert_eq!(server.recv().await.unwrap(), None);
    })
    .await;
}

/// A wrong key is refused by the transport handshake, before any hybrid frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_psk_is_refused() {
    within(30, async {
        let listener = Amst::listen(loopback(), builder().build().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let bad = AmstConfig::builder(amst_core::codec::Psk::new(b"not the right key").unwrap())
            .auto_mode(false)
            .build()
            .unwrap();
        let err = Amst::connect(addr, bad).await.unwrap_err().to_string();
        assert!(err.to_lowercase().contains("auth"), "{err}");
    })
    .await;
}

/// A TCP relay to `upstream` that raises `seen` when `marker` crosses it client → server.
async fn scanning_relay(
    upstream: SocketAddr,
    marker: &'static [u8],
) -> (SocketAddr, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seen = Arc::new(AtomicBool::new(false));
    let l = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let flag = seen.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let seen = flag.clone();
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut dr, mut dw) = down.into_split();
                let (mut ur, mut uw) = up.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ur, &mut dw).await;
                    let _ = dw.shutdown().await;
                });
                let mut buf = vec![0u8; 64 << 10];
                // The bytes kept from the last read, so a marker split across reads is found.
                let mut tail: Vec<u8> = Vec::new();
                while let Ok(n @ 1..) = dr.read(&mut buf).await {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.windows(marker.len()).any(|w| w == marker) {
                        seen.store(true, Ordering::Relaxed);
                    }
                    tail.drain(..tail.len().saturating_sub(marker.len() - 1));
                    if uw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = uw.shutdown().await;
            });
        }
    });
    (addr, seen)
}

/// Internet lanes run amst-tcp with TLS, datacenter lanes without, through the one hybrid
/// listener: a marker crosses the wire in the clear in datacenter mode only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internet_lanes_are_encrypted_and_datacenter_lanes_are_not() {
    const MARKER: &[u8] = b"AMST-HYBRID-PLAINTEXT-MARKER-41c9";
    within(60, async {
        let config = builder().build().unwrap();
        let listener = Amst::listen(loopback(), config.clone()).await.unwrap();
        let (relay, seen) = scanning_relay(listener.local_addr().unwrap(), MARKER).await;
        let client = Amst::connect(relay, config).await.unwrap();
        let server = listener.accept().await.unwrap();
        let mut msg = vec![b'.'; 100_000];
        msg[60_000..60_000 + MARKER.len()].copy_from_slice(MARKER);
        let msg = Bytes::from(msg);

        for (mode, clear) in [
            (Mode::Datacenter, true),
            (Mode::Internet, false),
            (Mode::Datacenter, true),
        ] {
            if client.metrics().mode != mode {
                client.force_mode(mode).await.unwrap();
            }
            seen.store(false, Ordering::Relaxed);
            client.send(msg.clone()).await.unwrap();
            assert_eq!(server.recv().await.unwrap(), Some(msg.clone()));
            client.flush().await.unwrap();
            assert_eq!(
                seen.load(Ordering::Relaxed),
                clear,
                "{mode} mode: marker in the clear on the wire should be {clear}"
            );
        }
        client.close().await.unwrap();
    })
    .await;
}
