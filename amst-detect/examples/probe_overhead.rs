//! Measures the detector's probe overhead, in bytes per period, with the default
//! configuration (5 s period, 1 % budget) on an idle amst-tcp session: over loopback, and,
//! when run as root, over amst-linkem links of 80 ms / 200 Mbit/s and 20 ms / 2 Gbit/s.
//!
//! `cargo run -p amst-detect --example probe_overhead -- [periods]` (default 6 periods).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_detect::{Detector, DetectorConfig};
use amst_linkem::{LinkEm, LinkParams, QueueLimit, check_privileges};
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};

fn tcp_config() -> TcpConfig {
    let mut c =
        TcpConfig::internet(Psk::new(b"amst-detect probe overhead").expect("psk")).with_streams(2);
    c.adaptive = false;
    c
}

async fn measure(name: &str, client: Arc<dyn Transport>, periods: usize) {
    let config = DetectorConfig::default();
    let period = config.period;
    let mut det = Detector::new(config, client).expect("config");
    println!("{name} (period {period:?}):");
    for i in 0..periods {
        let d = det.step().await;
        let s = det.stats();
        println!(
            "  period {i}: {:>9} probe bytes (budget {:>9}, train {:>9})  {d}",
            s.last_period_bytes, s.last_budget, s.last_burst
        );
        tokio::time::sleep(period).await;
    }
    let s = det.stats();
    println!(
        "  total {} bytes in {periods} periods: {:.0} bytes/period on average",
        s.bytes_total,
        s.bytes_total as f64 / periods as f64
    );
}

async fn serve(listener: TcpListener) {
    if let Ok(session) = listener.accept().await {
        while let Ok(Some(_)) = session.recv().await {}
    }
}

fn over_linkem(name: &str, rtt: Duration, rate_bps: u64, periods: usize) {
    let link = LinkEm::builder()
        .params(LinkParams {
            delay: rtt / 2,
            rate_bps,
            queue: QueueLimit::bytes(4 << 20),
            ..LinkParams::default()
        })
        .start()
        .expect("linkem");
    let addr = SocketAddr::from((link.right().addr(), 7401));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    link.right().spawn_tokio(async move {
        let listener = TcpListener::bind(addr, tcp_config()).await.expect("bind");
        ready_tx.send(()).expect("ready");
        serve(listener).await;
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server ready");
    let name = name.to_owned();
    link.left().block_on(async move {
        let client: Arc<dyn Transport> = Arc::new(
            TcpTransport::connect(addr, tcp_config())
                .await
                .expect("connect"),
        );
        measure(&name, client.clone(), periods).await;
        let _ = client.close().await;
    });
}

fn main() {
    let periods = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(6);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0".parse().expect("addr"), tcp_config())
            .await
            .expect("bind");
        let addr = listener.local_addr();
        let server = tokio::spawn(serve(listener));
        let client: Arc<dyn Transport> = Arc::new(
            TcpTransport::connect(addr, tcp_config())
                .await
                .expect("connect"),
        );
        measure("loopback", client.clone(), periods).await;
        let _ = client.close().await;
        let _ = server.await;
    });
    match check_privileges() {
        Ok(()) => {
            over_linkem(
                "linkem 80 ms, 200 Mbit/s",
                Duration::from_millis(80),
                200_000_000,
                periods,
            );
            over_linkem(
                "linkem 20 ms, 2 Gbit/s",
                Duration::from_millis(20),
                2_000_000_000,
                periods,
            );
        }
        Err(why) => println!("skipping the amst-linkem links: {why}"),
    }
}
