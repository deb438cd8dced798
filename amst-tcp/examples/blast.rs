//! Loopback goodput and CPU cost of amst-tcp, in one process: what to run before and after a
//! change to the data path.
//!
//! ```text
//! cargo run --release -p amst-tcp --example blast -- [STREAMS] [MIB] [tls]
//! ```
//!
//! Prints the goodput and the CPU seconds (user + system, both sides) per GB moved.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_tcp::{TcpConfig, TcpListener, TcpTls, TcpTransport};
use bytes::Bytes;

const MESSAGE: usize = 4 << 20;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(u.ru_utime) + s(u.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let streams: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(8);
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let tls = args.iter().any(|a| a == "tls");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let psk = Psk::new(b"amst-tcp blast example key").expect("key");
        let mut config = TcpConfig::datacenter(psk).with_streams(streams);
        config.min_streams = 1;
        config.adaptive = false;
        if tls {
            config = config.with_tls(Some(TcpTls::psk_bound()));
        }
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), config.clone())
            .await
            .expect("bind");
        let addr = listener.local_addr();
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let server = tokio::spawn(async move {
            let s = listener.accept().await.expect("accept");
            while let Ok(Some(m)) = s.recv().await {
                counter.fetch_add(m.len() as u64, Ordering::Relaxed);
            }
        });
        let client = TcpTransport::connect(addr, config).await.expect("connect");
        let data = Bytes::from(vec![0x5a_u8; MESSAGE]);
        let total = mib << 20;
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let mut sent = 0;
        while sent < total {
            let n = (total - sent).min(MESSAGE as u64) as usize;
            client.send(data.slice(..n)).await.expect("send");
            sent += n as u64;
        }
        client.flush().await.expect("flush");
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        let gb = total as f64 / 1e9;
        println!(
            "{streams} streams{}: {:.2} Gbit/s, {:.3} CPU-s/GB, CPU use {:.0}% of one core, {} bytes received",
            if tls { " + TLS" } else { "" },
            gb * 8.0 / wall,
            cpu / gb,
            100.0 * cpu / wall,
            received.load(Ordering::Relaxed)
        );
    });
}
