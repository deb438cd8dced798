//! `/metrics` of `amst serve` and `amst send`, scraped before and during real transfers over
//! 127.0.0.1 (TCP in auto and internet mode, then QUIC): every documented session metric
//! family is there with HELP text, the ones a loopback transfer must change do change, under
//! the transport's label, and `promtool check metrics` accepts the exposition (skipped,
//! saying so, where promtool is not installed).
//!
//! RDMA runs only in the Soft-RoCE VMs (`cargo xtask rdma-vm`): what its metrics report comes
//! from amst-rdma's sans-IO path estimate, unit-tested there, and its VM bulk test checks them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "correct horse battery staple 0123456789";
const AMST: &str = env!("CARGO_BIN_EXE_amst");

/// Families that must move on a loopback transfer in auto mode (the detector measures the path
/// and decides within a second), with the end that shows them. Absent before the session
/// counts as 0. The pacing rate is checked on a second, internet-mode transfer: the amst-cc
/// pacing model runs on the internet profile, and auto mode leaves it within the first second.
const MOVING: &[(&str, End)] = &[
    ("amst_goodput_bytes_per_second", End::Both),
    ("amst_goodput_bytes_total", End::Both),
    ("amst_rtt_seconds", End::Sender),
    ("amst_min_rtt_seconds", End::Sender),
    ("amst_cwnd_bytes", End::Sender),
    ("amst_streams_active", End::Both),
    ("amst_chunk_size_bytes", End::Sender),
    ("amst_credit_window_bytes", End::Sender),
    ("amst_detector_verdict_sessions", End::Sender),
    ("amst_detector_confidence_ratio", End::Sender),
    ("amst_sessions", End::Both),
    ("amst_memory_budget_held_bytes", End::Both),
];

/// Families that must be present but need not move here: loopback loses nothing, so nothing
/// is retransmitted or lost; whether a switch finds unacknowledged data to resend, and
/// whether a receive is caught holding bytes, is timing; health stays 1 on a good transfer.
const PRESENT: &[&str] = &[
    "amst_retransmitted_bytes_total",
    "amst_retransmitted_chunks_total",
    "amst_lost_packets_total",
    "amst_lost_packets_outstanding",
    "amst_receive_held_bytes",
    "amst_health",
    "amst_memory_budget_limit_bytes",
];

/// Families a QUIC transfer in internet mode must move under `transport="quic"`: quinn's
/// path (RTT, the amst-cc window it runs) and the controller's pacing rate, AMST's chunk size
/// and the credit window.
const QUIC_MOVING: &[&str] = &[
    "amst_rtt_seconds",
    "amst_cwnd_bytes",
    "amst_pacing_rate_bytes_per_second",
    "amst_chunk_size_bytes",
    "amst_credit_window_bytes",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    Sender,
    Both,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

fn scrape(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Some(body.to_string())
}

/// Every sample line of `family` (its own name, not `family_suffix`), by labels.
fn samples(text: &str, family: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            let (labels, value) = rest.rsplit_once(' ')?;
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sum(text: &str, family: &str) -> f64 {
    samples(text, family).values().sum()
}

/// The sum of `family`'s samples labelled with `transport`, if any is.
fn on_transport(text: &str, family: &str, transport: &str) -> Option<f64> {
    let label = format!("transport=\"{transport}\"");
    let values: Vec<f64> = samples(text, family)
        .into_iter()
        .filter(|(labels, _)| labels.contains(&label))
        .map(|(_, v)| v)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Starts `amst serve --discard` with `args`, serving metrics on `metrics_addr`; returns it
/// and the address it listens on.
fn serve(key: &std::path::Path, metrics_addr: &str, args: &[&str]) -> (Killed, String) {
    let mut serve = Command::new(AMST);
    serve
        .env_remove("AMST_PSK")
        .env_remove("RUST_LOG")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--discard",
            "--psk-file",
        ])
        .arg(key)
        .args(["--metrics-addr", metrics_addr])
        .args(args)
        .stdout(Stdio::piped());
    let mut serve = Killed(serve.spawn().expect("amst serve starts"));
    let mut lines = BufReader::new(serve.0.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first line").unwrap();
    let addr = first
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    std::thread::spawn(move || lines.for_each(drop));
    (serve, addr)
}

#[test]
fn every_session_metric_is_served_moves_during_a_transfer_and_passes_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("amst.key");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    let (server_metrics, sender_metrics) = (free_port_addr(), free_port_addr());
    let (_serve, addr) = serve(&key, &server_metrics, &[]);

    let before = scrape(&server_metrics).expect("the server's /metrics answers");
    assert_eq!(sum(&before, "amst_sessions"), 0.0, "{before}");

    // 240 MiB at 20 MiB/s: 12 s, past the detector's first decisions.
    let (sender_scrapes, server_scrapes) = scrapes_during_send(
        &addr,
        &key,
        &sender_metrics,
        &server_metrics,
        &["--size", "240M"],
    );
    for (family, end) in MOVING {
        let mut ends = vec![("sender", &sender_scrapes)];
        if *end == End::Both {
            ends.push(("server", &server_scrapes));
        }
        for (name, scrapes) in ends {
            for s in scrapes.iter() {
                assert!(
                    s.contains(&format!("# HELP {family} ")),
                    "{name}: {family} has no HELP:\n{s}"
                );
                assert!(!samples(s, family).is_empty(), "{name}: no {family}:\n{s}");
            }
            // The sender's metrics start with its session; 0 is the value before it.
            let mut values: Vec<f64> = vec![0.0];
            values.extend(scrapes.iter().map(|s| sum(s, family)));
            assert!(
                values.windows(2).any(|w| w[0] != w[1]),
                "{name}: {family} never moved: {values:?}"
            );
        }
    }
    for family in PRESENT {
        for s in sender_scrapes.iter().chain(&server_scrapes) {
            assert!(
                s.contains(&format!("# HELP {family} ")),
                "no HELP for {family}:\n{s}"
            );
            assert!(!samples(s, family).is_empty(), "no {family}:\n{s}");
        }
    }
    for s in sender_scrapes.iter().chain(&server_scrapes) {
        assert_eq!(sum(s, "amst_health"), 1.0, "{s}");
    }
    // TCP knows the packets it has marked lost (tcpi_lost), not a total of losses.
    for s in &sender_scrapes {
        assert!(
            on_transport(s, "amst_lost_packets_outstanding", "tcp").is_some(),
            "no TCP amst_lost_packets_outstanding:\n{s}"
        );
    }
    let goodput: Vec<f64> = sender_scrapes
        .iter()
        .map(|s| sum(s, "amst_goodput_bytes_total"))
        .collect();
    assert!(goodput.windows(2).all(|w| w[0] <= w[1]), "{goodput:?}");

    let mid = sender_scrapes.len() / 2;
    check_with_promtool(&sender_scrapes[mid], "sender");
    check_with_promtool(&server_scrapes[mid], "server");

    // 80 MiB at 20 MiB/s in internet mode: the pacing model's rate shows and changes.
    let (paced, _) = scrapes_during_send(
        &addr,
        &key,
        &free_port_addr(),
        &server_metrics,
        &["--size", "80M", "--mode", "internet"],
    );
    let family = "amst_pacing_rate_bytes_per_second";
    let mut values = vec![0.0];
    for s in &paced {
        assert!(s.contains(&format!("# HELP {family} ")), "{s}");
        values.push(sum(s, family));
    }
    assert!(
        values.windows(2).any(|w| w[0] != w[1]),
        "sender: {family} never moved in internet mode: {values:?}"
    );

    // 60 MiB over QUIC in internet mode, to a server that listens for QUIC.
    let quic_metrics = free_port_addr();
    let (_quic_serve, quic_addr) = serve(&key, &quic_metrics, &["--transport", "quic"]);
    let (quic, _) = scrapes_during_send(
        &quic_addr,
        &key,
        &free_port_addr(),
        &quic_metrics,
        &["--size", "60M", "--mode", "internet", "--transport", "quic"],
    );
    for family in QUIC_MOVING {
        let mut values = vec![0.0];
        for s in &quic {
            assert!(s.contains(&format!("# HELP {family} ")), "{s}");
            values.push(on_transport(s, family, "quic").unwrap_or(0.0));
        }
        assert!(
            values.windows(2).any(|w| w[0] != w[1]),
            "sender: {family} never moved for QUIC: {values:?}"
        );
    }
    for s in &quic {
        assert!(
            on_transport(s, "amst_lost_packets_total", "quic").is_some(),
            "QUIC counts lost packets, yet none are shown:\n{s}"
        );
    }
    check_with_promtool(&quic[quic.len() / 2], "QUIC sender");
}

/// Runs one `amst send` of generated data at 20 MiB/s with `args` and returns the sender's and
/// the server's scrapes taken while both had the session up.
fn scrapes_during_send(
    addr: &str,
    key: &std::path::Path,
    sender_metrics: &str,
    server_metrics: &str,
    args: &[&str],
) -> (Vec<String>, Vec<String>) {
    let mut send = Command::new(AMST);
    send.env_remove("AMST_PSK")
        .env_remove("RUST_LOG")
        .args(["send", addr, "--rate", "20M", "--quiet"])
        .args(args)
        .args(["--metrics-addr", sender_metrics, "--psk-file"])
        .arg(key)
        .stdout(Stdio::null());
    let mut send = Killed(send.spawn().expect("amst send starts"));
    let mut sender_scrapes = Vec::new();
    let mut server_scrapes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = send.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "amst send did not finish in 120 s"
        );
        // Only scrapes taken while the session is up count as mid-transfer.
        if let (Some(a), Some(b)) = (scrape(sender_metrics), scrape(server_metrics))
            && sum(&a, "amst_sessions") >= 1.0
            && sum(&b, "amst_sessions") >= 1.0
        {
            sender_scrapes.push(a);
            server_scrapes.push(b);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(status.success(), "amst send failed: {status}");
    assert!(
        sender_scrapes.len() >= 4,
        "only {} mid-transfer scrapes",
        sender_scrapes.len()
    );
    (sender_scrapes, server_scrapes)
}

fn check_with_promtool(exposition: &str, end: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "skipping promtool check: promtool is not installed (Debian package `prometheus`)"
            );
            return;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics rejected the {end}'s exposition:\n{}{}\n---\n{exposition}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
