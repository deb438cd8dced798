//! Auto mode through amst-linkem's emulated link (needs root for namespaces and TUN; skips
//! with a message otherwise): a transfer starts on a datacenter-like link, the link flips to
//! internet-like mid-transfer, the detector notices, and the session changes profile without
//! losing or repeating a message.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amst_core::Mode;
use amst_hybrid::Amst;
use amst_linkem::{LinkEm, LinkParams, QueueLimit, check_privileges};
use common::*;

const PORT: u16 = 7460;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "amst_hybrid=info,amst_detect=info".into()),
        )
        .with_test_writer()
        .try_init();
}

#[test]
fn auto_mode_follows_a_link_flip_without_loss() {
    if let Err(why) = check_privileges() {
        eprintln!("skipping auto_mode_follows_a_link_flip_without_loss: {why}");
        return;
    }
    init_tracing();
    let period = Duration::from_millis(500);
    let config = builder()
        .auto_mode(true)
        .initial_mode(Mode::Datacenter)
        .check_period(period)
        .build()
        .unwrap();
    let link = Arc::new(
        LinkEm::builder()
            .params(LinkParams {
                delay: Duration::from_micros(50),
                rate_bps: 0,
                queue: QueueLimit::bytes(8 << 20),
                ..LinkParams::default()
            })
            .start()
            .unwrap(),
    );
    let addr = SocketAddr::from((link.right().addr(), PORT));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server_config = config.clone();
    let server = link.right().spawn_tokio(async move {
        let listener = Amst::listen(addr, server_config).await.unwrap();
        ready_tx.send(()).unwrap();
        let session = listener.accept().await.unwrap();
        let mut n = 0u64;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        while let Some(m) = session.recv().await.unwrap() {
            assert_eq!(
                u64::from_be_bytes(m[..8].try_into().unwrap()),
                n,
                "lost or repeated"
            );
            ctx.update(&m);
            n += 1;
        }
        (n, ctx.finish())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server bound");
    let control = link.clone();
    let (sent, before, after, took) = link.left().block_on(async move {
        let client = Amst::connect(addr, config).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, s2) = (client.clone(), stop.clone());
        let sender = tokio::spawn(async move {
            let mut i = 0u64;
            while !s2.load(Ordering::Relaxed) {
                tx.send(message(i, 64 << 10)).await.unwrap();
                i += 1;
            }
            i
        });
        // Three periods on the fast link.
        tokio::time::sleep(period * 3).await;
        let before = client.metrics();
        println!(
            "before the flip: mode {} streams {} throughput {:.0} Mbit/s",
            before.mode,
            before.streams,
            before.throughput_bps * 8e-6
        );
        let flipped = Instant::now();
        control
            .update(|p| {
                p.delay = Duration::from_millis(40);
                p.rate_bps = 200_000_000;
            })
            .unwrap();
        let deadline = flipped + period * 12;
        while client.mode() != Mode::Internet && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = flipped.elapsed();
        // Keep sending on the new profile until a message sent after the swap is
        // acknowledged on the new transport (the switch's resends go first), at most 8 s.
        let carrying = Instant::now() + Duration::from_secs(8);
        while client.metrics().last_switch_duration.is_none() && Instant::now() < carrying {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(period).await;
        stop.store(true, Ordering::Relaxed);
        let sent = sender.await.unwrap();
        let after = client.metrics();
        println!(
            "after the flip: mode {} streams {} switches {} resent {} ({:.1} MB)",
            after.mode,
            after.streams,
            after.switches,
            after.last_switch_resent,
            after.bytes_resent as f64 / 1e6,
        );
        println!(
            "flip to swap: {took:?}; swap to the first message sent after it acknowledged on the new transport: {:?}; flip to that: {:?}",
            after.last_switch_duration,
            after.last_switch_duration.map(|d| took + d),
        );
        client.close().await.unwrap();
        (sent, before, after, took)
    });
    let (received, digest) = server.join().unwrap();
    assert_eq!(received, sent, "every message exactly once");
    assert_eq!(digest.as_ref(), digest_of(sent, 64 << 10).as_ref());
    assert_ne!(
        before.mode,
        Mode::Internet,
        "the fast link is not internet-like"
    );
    assert_eq!(
        after.mode,
        Mode::Internet,
        "auto mode did not follow the flip in {took:?}"
    );
    // The internet profile opens 8 streams; amst-tcp's tuner may then move within 4..=16.
    assert!(
        (4..=16).contains(&after.streams),
        "internet profile streams, got {}",
        after.streams
    );
    assert!(
        before.streams > 16,
        "datacenter profile before, got {}",
        before.streams
    );
    assert!(after.switches >= 1);
    // Measured 2.5-2.9 s from the flip to the swap (2026-12-05): the detector's two firm
    // samples (0.4-0.8 s), then dialing the 8-stream TLS internet lane through the
    // bottleneck that the old lane's 64 streams keep queued (1.5-1.9 s), then one Attach
    // round trip. The design's "well under 2 s" needs that dial out of the way (a lane
    // opened ahead of the flip); the bound here is what this path gives, with margin for a
    // loaded machine.
    assert!(took < Duration::from_secs(5), "flip to swap took {took:?}");
}
