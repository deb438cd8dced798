//! Through amst-linkem (root only): on 200 Mbit/s, 100 ms RTT and 1 % random loss, the
//! internet profile carries at least three quarters of the link rate (the README's claim is
//! 0.9; the margin is for a slow machine, though here the link, not the CPU, is the limit),
//! and far more than one plain CUBIC stream measured in the same run. Skips with a message
//! without the privileges for namespaces and TUN.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_linkem::LinkEm;
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use bytes::Bytes;
use common::*;

const RATE_BPS: u64 = 200_000_000;
/// How long each contender sends, and the warm-up excluded from its measurement.
const RUN: Duration = Duration::from_secs(12);
const WARMUP: Duration = Duration::from_secs(3);

/// Received bytes over time, shared with the receiving thread.
#[derive(Default)]
struct Meter {
    bytes: AtomicU64,
}

/// Goodput in bit/s between WARMUP and RUN, read from the meter at those instants.
fn measure(meter: &Meter, start: Instant) -> f64 {
    std::thread::sleep((start + WARMUP).saturating_duration_since(Instant::now()));
    let b0 = meter.bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep((start + RUN).saturating_duration_since(Instant::now()));
    let b1 = meter.bytes.load(Ordering::Relaxed);
    (b1 - b0) as f64 * 8.0 / t0.elapsed().as_secs_f64()
}

fn plain_cubic(link: &LinkEm) -> f64 {
    let server_addr = SocketAddr::new(link.right().addr().into(), 5201);
    let listener = link
        .right()
        .run(|| std::net::TcpListener::bind(server_addr))
        .unwrap();
    let meter = Arc::new(Meter::default());
    let m = meter.clone();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            m.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let start = Instant::now();
    let tx = link.left().spawn(move || {
        let s = std::net::TcpStream::connect(server_addr).unwrap();
        socket2::SockRef::from(&s)
            .set_tcp_congestion(b"cubic")
            .unwrap();
        let mut s = s;
        let buf = vec![0x5au8; 1 << 16];
        while start.elapsed() < RUN {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let rate = measure(&meter, start);
    tx.join().unwrap();
    rx.join().unwrap();
    rate
}

fn amst_internet(link: &LinkEm) -> (f64, String) {
    let server_addr = SocketAddr::new(link.right().addr().into(), 5301);
    let mut cfg = TcpConfig::internet(psk());
    cfg.stall_timeout = Duration::from_secs(5);
    let meter = Arc::new(Meter::default());
    let m = meter.clone();
    let scfg = cfg.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rx = link.right().spawn_tokio(async move {
        let listener = TcpListener::bind(server_addr, scfg).await.unwrap();
        ready_tx.send(()).unwrap();
        let s = listener.accept().await.unwrap();
        while let Ok(Some(msg)) = s.recv().await {
            m.bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
        }
    });
    ready_rx.recv().unwrap();
    let start = Instant::now();
    let tx = link.left().spawn_tokio(async move {
        let c = TcpTransport::connect(server_addr, cfg).await.unwrap();
        let payload = Bytes::from(vec![0x5au8; 1 << 20]);
        while start.elapsed() < RUN {
            c.send(payload.clone()).await.unwrap();
        }
        let m = c.metrics();
        let streams = c.stream_stats();
        let cc: Vec<_> = streams.iter().map(|s| s.congestion.clone()).collect();
        let summary = format!(
            "streams {} ({cc:?}), chunk {}, pacing {:?} B/s, retransmitted chunks {}, rtt {:?}",
            m.active_streams,
            c.chunk_size(),
            c.pacing_rate(),
            m.chunks_retransmitted,
            m.rtt
        );
        drop(c);
        summary
    });
    let rate = measure(&meter, start);
    let summary = tx.join().unwrap();
    drop(rx);
    (rate, summary)
}

/// The least fraction of the link rate the internet profile must carry after its warm-up.
const MIN_FRACTION_OF_LINK: f64 = 0.75;

#[test]
fn internet_profile_carries_three_quarters_of_a_lossy_long_path() {
    if let Err(why) = amst_linkem::check_privileges() {
        eprintln!("skipping: {why}");
        return;
    }
    init_tracing();
    let link = LinkEm::builder()
        .rate_bps(RATE_BPS)
        .rtt(Duration::from_millis(100))
        .loss(0.01)
        .queue_bytes(3_000_000)
        .seed(7)
        .start()
        .unwrap();
    let cubic = plain_cubic(&link);
    let (amst, summary) = amst_internet(&link);
    let ratio = amst / cubic.max(1.0);
    eprintln!(
        "link 200 Mbit/s, 100 ms, 1% loss: amst-tcp internet {:.1} Mbit/s ({:.0}% of the link), \
         one CUBIC stream {:.1} Mbit/s; ratio {ratio:.1}; {summary}",
        amst / 1e6,
        100.0 * amst / RATE_BPS as f64,
        cubic / 1e6
    );
    eprintln!("{:?}", link.counters());
    assert!(
        amst >= MIN_FRACTION_OF_LINK * RATE_BPS as f64,
        "amst-tcp's internet profile carried {:.1} Mbit/s, {:.2} of the {} Mbit/s link; it \
         must carry at least {MIN_FRACTION_OF_LINK} ({summary})",
        amst / 1e6,
        amst / RATE_BPS as f64,
        RATE_BPS / 1_000_000
    );
    assert!(
        ratio >= 4.0,
        "amst-tcp {amst:.0} bit/s is not far above one CUBIC stream's {cubic:.0} bit/s"
    );
}
