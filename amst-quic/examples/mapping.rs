//! Loopback throughput of the message-to-stream mappings, behind the README's choice:
//! `cargo run --release -p amst-quic --example mapping`.

use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_quic::{
    Identity, PeerVerification, QuicConfig, QuicListener, QuicTransport, StreamMapping,
};
use bytes::Bytes;

async fn run(mapping: StreamMapping, size: usize, total: usize) -> (f64, f64) {
    let psk = Psk::new(b"mapping benchmark key, long enough").unwrap();
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let pin = id.fingerprint();
    let listener = QuicListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        QuicConfig::new(psk.clone()).with_identity(id),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { listener.accept().await.unwrap() });
    let cfg = QuicConfig::new(psk)
        .with_mapping(mapping)
        .with_verification(PeerVerification::Pinned(vec![pin]));
    let client = QuicTransport::connect(addr, "localhost", cfg)
        .await
        .unwrap();
    let server = server.await.unwrap();
    let count = total / size;
    let reader = tokio::spawn(async move {
        for _ in 0..count {
            server.recv().await.unwrap().unwrap();
        }
        server
    });
    let msg = Bytes::from(vec![0xabu8; size]);
    let start = Instant::now();
    for _ in 0..count {
        client.send(msg.clone()).await.unwrap();
    }
    client.flush().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    let _server = reader.await.unwrap();
    client.close().await.unwrap();
    ((count * size * 8) as f64 / secs / 1e6, count as f64 / secs)
}

#[tokio::main]
async fn main() {
    let mappings = [
        ("striped x1", StreamMapping::Striped { streams: 1 }),
        ("striped x2", StreamMapping::Striped { streams: 2 }),
        ("striped x4", StreamMapping::Striped { streams: 4 }),
        (
            "per-message x8",
            StreamMapping::PerMessage { concurrency: 8 },
        ),
    ];
    println!(
        "{:<16} {:>10} {:>12} {:>12}",
        "mapping", "message", "Mbit/s", "msg/s"
    );
    for (size, total) in [
        (1usize << 10, 16usize << 20),
        (64 << 10, 256 << 20),
        (4 << 20, 512 << 20),
    ] {
        for (name, m) in mappings {
            // Best of three, to damp noise from other work on the machine.
            let mut best = (0.0f64, 0.0f64);
            for _ in 0..3 {
                let r = tokio::time::timeout(Duration::from_secs(120), run(m, size, total))
                    .await
                    .expect("run took over 120 s");
                if r.0 > best.0 {
                    best = r;
                }
            }
            println!(
                "{name:<16} {:>9}K {:>12.0} {:>12.0}",
                size >> 10,
                best.0,
                best.1
            );
        }
    }
}
