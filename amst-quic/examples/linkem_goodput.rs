//! One amst-quic transfer through amst-linkem (200 Mbit/s, 100 ms RTT, 1% loss, 1 BDP
//! queue), printing the sender's path every second: a tool for looking at what limits the
//! rate. Needs root (network namespaces); says why and exits otherwise.
//!
//! `cargo run --release -p amst-quic --example linkem_goodput -- [CC] [SECONDS] [WINDOW_BDPS]`
//! with CC one of amst-bbr (default), amst-bbr-tolerant, quinn-bbr, quinn-cubic.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_linkem::LinkEm;
use amst_quic::{
    CongestionControl, Identity, PeerVerification, QuicConfig, QuicListener, QuicTransport,
};
use bytes::Bytes;

const RATE_BPS: u64 = 200_000_000;
const RTT: Duration = Duration::from_millis(100);

fn main() {
    if let Err(why) = amst_linkem::check_privileges() {
        eprintln!("needs root for amst-linkem: {why}");
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cc = match args.first().map(String::as_str).unwrap_or("amst-bbr") {
        "amst-bbr" => CongestionControl::AmstBbr,
        "amst-bbr-tolerant" => CongestionControl::AmstBbrLossTolerant,
        "quinn-bbr" => CongestionControl::QuinnBbr,
        "quinn-cubic" => CongestionControl::QuinnCubic,
        other => {
            eprintln!("unknown controller {other:?}");
            return;
        }
    };
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let bdps: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let bdp = RATE_BPS / 8 * RTT.as_millis() as u64 / 1000;
    let link = LinkEm::builder()
        .rate_bps(RATE_BPS)
        .rtt(RTT)
        .loss(0.01)
        .queue_bytes(bdp)
        .start()
        .expect("link");
    let mut base = QuicConfig::new(Psk::new(b"linkem example key of enough length").unwrap())
        .with_congestion(cc);
    base.window = (bdp as f64 * bdps) as u64;
    let id = Identity::self_signed(&["right"]).unwrap();
    let pin = id.fingerprint();
    let server_addr = SocketAddr::from((link.right().addr(), 4500));
    let scfg = base.clone().with_identity(id);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = link.right().spawn_tokio(async move {
        let listener =
            QuicListener::from_socket(UdpSocket::bind(server_addr).unwrap(), scfg).unwrap();
        ready_tx.send(()).unwrap();
        let t = listener.accept().await.unwrap();
        let mut bytes = 0u64;
        while let Ok(Some(m)) = t.recv().await {
            bytes += m.len() as u64;
        }
        bytes
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let ccfg = base.with_verification(PeerVerification::Pinned(vec![pin]));
    link.left().block_on(async move {
        let t = QuicTransport::connect_with_socket(UdpSocket::bind("0.0.0.0:0").unwrap(), server_addr, "right", ccfg)
            .await
            .unwrap();
        let payload = Bytes::from(vec![0x5au8; 1 << 20]);
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let t = std::sync::Arc::new(t);
        let sender = {
            let t = t.clone();
            tokio::spawn(async move {
                loop {
                    if t.send(payload.clone()).await.is_err() {
                        break;
                    }
                }
            })
        };
        let mut last = 0u64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while tokio::time::Instant::now() < deadline {
            tick.tick().await;
            let m = t.metrics();
            let s = t.quic_stats();
            let acked = m.messages_acked;
            if let Some(c) = t.congestion_metrics() {
                eprintln!(
                    "       {:?} bw {:.1} Mbit/s pacing {:.1} Mbit/s cwnd {} min_rtt {:?}",
                    c.phase,
                    c.bottleneck_bw * 8e-6,
                    c.pacing_rate * 8e-6,
                    c.cwnd,
                    c.min_rtt
                );
            }
            eprintln!(
                "{:5.1}s {:6.1} Mbit/s  cwnd {:>9} rtt {:>4} ms lost {:>6} sent {:>7} credit {:?} held-by-peer? acked msgs {}",
                start.elapsed().as_secs_f64(),
                (acked - last) as f64 * 8.0 * 1.048576,
                s.path.cwnd,
                s.path.rtt.as_millis(),
                s.path.lost_packets,
                s.path.sent_packets,
                m.credit_window,
                acked
            );
            last = acked;
        }
        let acked = t.metrics().messages_acked;
        let secs = start.elapsed().as_secs_f64();
        println!("{cc}: {:.1} Mbit/s goodput ({} MiB in {secs:.1} s), window {:.1} BDP", acked as f64 * 8.388608 / secs, acked, bdps);
        sender.abort();
        t.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let _ = server.join();
}
