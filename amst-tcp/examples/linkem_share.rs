//! Fairness and fill on an emulated internet path (root only; amst-linkem): 200 Mbit/s,
//! 100 ms RTT, 1 % random loss, a 1 BDP queue. Runs the internet profile alone, and beside
//! one concurrent iperf3 flow, and prints each side's goodput after a warm-up and amst's
//! mean smoothed RTT.
//!
//! ```text
//! cargo run --release -p amst-tcp --example linkem_share -- [alone|bbr|cubic|p8-cubic|iperf-alone] [seconds] [--aggressive]
//! ```
//!
//! `bbr` and `cubic` run amst against one `iperf3 -C bbr` / `-C cubic` flow; `p8-cubic` is the
//! reference `iperf3 -P 8` against one `iperf3 -C cubic` flow; `iperf-alone` is one
//! `iperf3 -C bbr` flow alone.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_linkem::LinkEm;
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use bytes::Bytes;

const RATE_BPS: u64 = 200_000_000;
const RTT: Duration = Duration::from_millis(100);
const WARMUP: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let aggressive = args.iter().any(|a| a == "--aggressive");
    let mut pos = args.iter().filter(|a| !a.starts_with("--"));
    let mode = pos.next().map_or("alone", |s| s.as_str()).to_string();
    let secs: u64 = pos
        .next()
        .map_or(Ok(20), |s| s.parse())
        .expect("seconds: a whole number")
        .clamp(8, 120);
    let run = Duration::from_secs(secs);
    if let Err(why) = amst_linkem::check_privileges() {
        eprintln!("skipping: {why}");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "amst_tcp=warn".into()),
        )
        .try_init();
    let bdp = RATE_BPS / 8 * RTT.as_millis() as u64 / 1000;
    let link = LinkEm::builder()
        .rate_bps(RATE_BPS)
        .rtt(RTT)
        .loss(0.01)
        .queue_bytes(bdp)
        .start()
        .expect("start the emulated link");
    let competitor: Option<&[&str]> = match mode.as_str() {
        "alone" => None,
        "bbr" | "iperf-alone" => Some(&["-C", "bbr"]),
        "cubic" | "p8-cubic" => Some(&["-C", "cubic"]),
        other => panic!("unknown mode {other}"),
    };
    let start = Instant::now();
    let other = competitor.map(|extra| iperf(&link, 5201, run, extra));
    let (mine, rtt, summary) = match mode.as_str() {
        "p8-cubic" => {
            let p8 = iperf(&link, 5202, run, &["-P", "8", "-C", "cubic"]);
            (finish(p8, run), None, "iperf3 -P 8 -C cubic".to_string())
        }
        "iperf-alone" => (0.0, None, String::new()),
        _ => amst(&link, start, run, aggressive),
    };
    let theirs = other.map(|c| finish(c, run));
    let link_rate = RATE_BPS as f64;
    match theirs {
        Some(t) if mode != "iperf-alone" => println!(
            "{mode}: mine {:.1} Mbit/s, theirs {:.1} Mbit/s, share {:.2}, sum {:.2} of the link; mean srtt {:?}; {summary}",
            mine / 1e6,
            t / 1e6,
            mine / (mine + t).max(1.0),
            (mine + t) / link_rate,
            rtt
        ),
        Some(t) => println!(
            "{mode}: {:.1} Mbit/s, {:.2} of the link",
            t / 1e6,
            t / link_rate
        ),
        None => println!(
            "{mode}: {:.1} Mbit/s, {:.2} of the link; mean srtt {:?} ({:.2}x base); {summary}",
            mine / 1e6,
            mine / link_rate,
            rtt,
            rtt.unwrap_or_default().as_secs_f64() / RTT.as_secs_f64()
        ),
    }
    eprintln!("{:?}", link.counters());
}

/// An iperf3 server in the right namespace and a client in the left, started now.
fn iperf(link: &LinkEm, port: u16, run: Duration, extra: &[&str]) -> (Child, Child) {
    let host = link.right().addr().to_string();
    let server = link
        .right()
        .command("iperf3")
        .args(["-s", "-1", "-B", &host, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let mut cmd: Command = link.left().command("iperf3");
    cmd.args(["-c", &host, "-p", &port.to_string(), "-J", "-i", "1"])
        .args(["-t", &run.as_secs().to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    (server, cmd.spawn().expect("iperf3 client"))
}

/// Receiver goodput of an iperf3 run after the warm-up, from its per-second intervals.
fn finish((mut server, client): (Child, Child), run: Duration) -> f64 {
    let out = client.wait_with_output().expect("iperf3 client output");
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let mut bits = 0.0;
    let mut secs = 0.0;
    for i in v["intervals"].as_array().into_iter().flatten() {
        let s = &i["sum"];
        let (Some(t0), Some(t1), Some(b)) =
            (s["start"].as_f64(), s["end"].as_f64(), s["bytes"].as_f64())
        else {
            continue;
        };
        if t0 >= WARMUP.as_secs_f64() - 0.01 && t1 <= run.as_secs_f64() + 0.5 {
            bits += b * 8.0;
            secs += t1 - t0;
        }
    }
    bits / secs.max(1e-3)
}

fn amst(
    link: &LinkEm,
    start: Instant,
    run: Duration,
    aggressive: bool,
) -> (f64, Option<Duration>, String) {
    let server_addr = SocketAddr::new(link.right().addr().into(), 5301);
    let mut cfg = TcpConfig::internet(Psk::new(b"amst-tcp linkem share example key").unwrap());
    cfg.aggressive = aggressive;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let done = Arc::new(AtomicBool::new(false));
    let scfg = cfg.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rx = link.right().spawn_tokio(async move {
        let listener = TcpListener::bind(server_addr, scfg).await.unwrap();
        ready_tx.send(()).unwrap();
        let s = listener.accept().await.unwrap();
        while let Ok(Some(msg)) = s.recv().await {
            counter.fetch_add(msg.len() as u64, Ordering::Relaxed);
        }
    });
    ready_rx.recv().unwrap();
    let stop = done.clone();
    let tx = link.left().spawn_tokio(async move {
        let c = Arc::new(TcpTransport::connect(server_addr, cfg).await.unwrap());
        let probe = c.clone();
        let rtts = tokio::spawn(async move {
            let mut sum = Duration::ZERO;
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if start.elapsed() >= WARMUP
                    && let Some(r) = probe.metrics().rtt
                {
                    sum += r;
                    n += 1;
                }
            }
            (n > 0).then(|| sum / n)
        });
        let payload = Bytes::from(vec![0x5au8; 1 << 20]);
        while start.elapsed() < run {
            if tokio::time::timeout(Duration::from_secs(5), c.send(payload.clone()))
                .await
                .is_err()
            {
                break;
            }
        }
        let m = c.metrics();
        let summary = format!(
            "streams {}, chunk {}, pacing {:?} B/s, retransmitted chunks {}",
            m.active_streams,
            c.chunk_size(),
            c.pacing_rate(),
            m.chunks_retransmitted,
        );
        let rtt = rtts.await.ok().flatten();
        (summary, rtt)
    });
    std::thread::sleep((start + WARMUP).saturating_duration_since(Instant::now()));
    let b0 = received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep((start + run).saturating_duration_since(Instant::now()));
    let b1 = received.load(Ordering::Relaxed);
    let rate = (b1 - b0) as f64 * 8.0 / t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let (summary, rtt) = tx.join().unwrap();
    drop(rx);
    (rate, rtt, summary)
}
