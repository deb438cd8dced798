//! Loopback goodput of amst-tcp (plain, and with TLS on every stream) against `iperf3 -P 8`
//! and `-P 1`, measured in the same run.
//!
//! `cargo bench -p amst-tcp --bench loopback` (env: `AMST_BENCH_SECS`, default 5;
//! `AMST_BENCH_STREAMS`, default 8; `AMST_BENCH_CHUNK`, default 256 KiB;
//! `AMST_BENCH_MSG`, default = chunk). Prints one JSON line per contender and the ratio.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_tcp::{TcpConfig, TcpListener, TcpTls, TcpTransport};
use bytes::Bytes;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs iperf3 with `streams` parallel streams; returns received bits per second.
fn iperf3(streams: u32, secs: u64) -> Option<f64> {
    let port = free_port().to_string();
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port,
            "-J",
            "-t",
            &secs.to_string(),
        ])
        .args(["-P", &streams.to_string()])
        .output();
    let _ = server.wait();
    let out = out.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64()
}

/// Runs amst-tcp for `secs`, with TLS if `tls`; returns received payload bits per second.
fn amst(streams: usize, chunk: usize, msg: usize, secs: u64, tls: bool) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let psk = Psk::new(b"bench key, long enough").unwrap();
        let mut cfg = TcpConfig::datacenter(psk).with_streams(streams);
        cfg.min_streams = 1;
        cfg.adaptive = false;
        cfg.chunk_size = chunk;
        cfg.tls = tls.then(TcpTls::psk_bound);
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), cfg.clone())
            .await
            .unwrap();
        let addr: SocketAddr = listener.local_addr();
        let recv = tokio::spawn(async move {
            let s = listener.accept().await.unwrap();
            let mut bytes = 0u64;
            let mut first: Option<Instant> = None;
            while let Some(m) = s.recv().await.unwrap() {
                first.get_or_insert_with(Instant::now);
                bytes += m.len() as u64;
            }
            (bytes, first.map(|f| f.elapsed()).unwrap_or_default())
        });
        let c = TcpTransport::connect(addr, cfg).await.unwrap();
        let pool = Bytes::from(vec![0xa5u8; 64 << 20]);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut off = 0;
        while Instant::now() < deadline {
            if off + msg > pool.len() {
                off = 0;
            }
            c.send(pool.slice(off..off + msg)).await.unwrap();
            off += msg;
        }
        c.close().await.unwrap();
        let (bytes, elapsed) = recv.await.unwrap();
        bytes as f64 * 8.0 / elapsed.as_secs_f64()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run briefly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs = if quick { 1 } else { env("AMST_BENCH_SECS", 4) };
    let rounds = if quick {
        1
    } else {
        env("AMST_BENCH_ROUNDS", 3)
    };
    let streams = env("AMST_BENCH_STREAMS", 8) as usize;
    let chunk = env("AMST_BENCH_CHUNK", 256 << 10) as usize;
    let msg = env("AMST_BENCH_MSG", chunk as u64) as usize;
    let with_iperf = env("AMST_BENCH_IPERF", 1) == 1;
    let with_tls = env("AMST_BENCH_TLS", 1) == 1;

    // Interleaved rounds, so that a machine shared with other work loads every contender
    // alike; medians per contender and of the per-round ratios.
    let (mut ours, mut p8s, mut p1s, mut ratios) = (vec![], vec![], vec![], vec![]);
    let (mut tlss, mut tls_ratios) = (vec![], vec![]);
    for round in 0..rounds {
        let a = amst(streams, chunk, msg, secs, false);
        println!(
            "{{\"round\":{round},\"contender\":\"amst-tcp\",\"streams\":{streams},\"chunk\":{chunk},\"msg\":{msg},\"gbit_s\":{:.2}}}",
            a / 1e9
        );
        ours.push(a);
        if with_tls {
            let t = amst(streams, chunk, msg, secs, true);
            println!(
                "{{\"round\":{round},\"contender\":\"amst-tcp+tls\",\"streams\":{streams},\"chunk\":{chunk},\"msg\":{msg},\"gbit_s\":{:.2}}}",
                t / 1e9
            );
            tlss.push(t);
            tls_ratios.push(t / a);
        }
        if !with_iperf {
            continue;
        }
        let Some(p8) = iperf3(streams as u32, secs) else {
            println!("iperf3 not available; no comparison (apt-get install -y iperf3)");
            return;
        };
        let p1 = iperf3(1, secs).unwrap_or(0.0);
        println!(
            "{{\"round\":{round},\"contender\":\"iperf3\",\"streams\":{streams},\"gbit_s\":{:.2}}}",
            p8 / 1e9
        );
        println!(
            "{{\"round\":{round},\"contender\":\"iperf3\",\"streams\":1,\"gbit_s\":{:.2}}}",
            p1 / 1e9
        );
        p8s.push(p8);
        p1s.push(p1.max(1.0));
        ratios.push(a / p8);
    }
    if !tlss.is_empty() {
        println!(
            "median: amst-tcp+tls {:.2} Gbit/s = {:.3} of plain amst-tcp (median of per-round ratios)",
            median(tlss) / 1e9,
            median(tls_ratios)
        );
    }
    if ratios.is_empty() {
        println!("amst-tcp median {:.2} Gbit/s", median(ours) / 1e9);
        return;
    }
    println!(
        "median: amst-tcp {:.2} Gbit/s, iperf3 -P {streams} {:.2} Gbit/s, iperf3 -P 1 {:.2} Gbit/s; \
         ratio vs -P {streams}: {:.3} (median of per-round ratios), vs -P 1: {:.3}",
        median(ours.clone()) / 1e9,
        median(p8s.clone()) / 1e9,
        median(p1s.clone()) / 1e9,
        median(ratios),
        median(ours) / median(p1s)
    );
}
