//! The detector on a real amst-tcp session through amst-linkem's emulated links: kernel TCP,
//! amst-tcp's Ping/Pong probe, and the emulator's real delay and rate. Needs root (network
//! namespaces and TUN devices); skips with a message otherwise. The datacenter case also
//! runs over plain loopback, since the emulator cannot carry 10 Gbit/s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amst_core::codec::Psk;
use amst_core::{Mode, Transport};
use amst_detect::{
    Decision, Detector, DetectorConfig, GBIT_PER_SEC, RateProbeConfig, measure_rate,
};
use amst_linkem::{LinkEm, LinkParams, check_privileges};
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use tokio::time::Instant;

const PORT: u16 = 7400;

fn skip(test: &str) -> bool {
    match check_privileges() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            true
        }
    }
}

fn tcp_config() -> TcpConfig {
    let mut c = TcpConfig::internet(Psk::new(b"amst-detect linkem test").unwrap()).with_streams(2);
    c.adaptive = false;
    c
}

fn config(period: Duration) -> DetectorConfig {
    DetectorConfig {
        period,
        ..Default::default()
    }
}

/// Serves one session in `right` until the client closes, draining what it receives.
fn serve(link: &LinkEm) -> SocketAddr {
    serve_with(link, tcp_config())
}

/// [`serve`] with the server's own configuration.
fn serve_with(link: &LinkEm, server_config: TcpConfig) -> SocketAddr {
    let addr = SocketAddr::from((link.right().addr(), PORT));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    link.right().spawn_tokio(async move {
        let listener = TcpListener::bind(addr, server_config).await.unwrap();
        ready_tx.send(()).unwrap();
        let session = listener.accept().await.unwrap();
        while let Ok(Some(_)) = session.recv().await {}
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server bound");
    addr
}

/// Steps a detector until it has made `n` decisions, one per period.
async fn decide(det: &mut Detector, n: usize) -> Vec<Decision> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = det.step().await;
        println!("  {d}");
        out.push(d);
        tokio::time::sleep(det.config().period).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_linkem_classifies_datacenter() {
    // Plain loopback: the datacenter case the emulator cannot reach (~0.05 ms, many Gbit/s).
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), tcp_config())
        .await
        .unwrap();
    let addr = listener.local_addr();
    let server = tokio::spawn(async move {
        let s = listener.accept().await.unwrap();
        while let Ok(Some(_)) = s.recv().await {}
    });
    let client: Arc<dyn Transport> =
        Arc::new(TcpTransport::connect(addr, tcp_config()).await.unwrap());
    let mut det = Detector::new(config(Duration::from_millis(200)), client.clone()).unwrap();
    println!("loopback:");
    let ds = decide(&mut det, 6).await;
    let last = ds.last().unwrap();
    assert_eq!(last.mode, Mode::Datacenter, "{last}");
    assert!(last.rtt.unwrap() < Duration::from_millis(2), "{last}");
    // Trains give lower bounds; at least one of them proves the path fast.
    assert!(
        ds.iter()
            .any(|d| d.bandwidth.is_some_and(|b| b >= GBIT_PER_SEC)),
        "{last}"
    );
    client.close().await.unwrap();
    server.await.unwrap();
}

fn run_on_link(params: LinkParams, periods: usize, period: Duration) -> Vec<Decision> {
    let link = LinkEm::builder().params(params).start().unwrap();
    let addr = serve(&link);
    link.left().block_on(async move {
        let client: Arc<dyn Transport> =
            Arc::new(TcpTransport::connect(addr, tcp_config()).await.unwrap());
        let mut det = Detector::new(config(period), client.clone()).unwrap();
        let ds = decide(&mut det, periods).await;
        println!("  probe: {:?}", det.stats());
        client.close().await.unwrap();
        ds
    })
}

fn link(rtt: Duration, rate_bps: u64) -> LinkParams {
    LinkParams {
        delay: rtt / 2,
        rate_bps,
        queue: amst_linkem::QueueLimit::bytes(4 << 20),
        ..LinkParams::default()
    }
}

#[test]
fn linkem_fastest_setting_classifies_datacenter() {
    if skip("linkem_fastest_setting_classifies_datacenter") {
        return;
    }
    // 0.1 ms, unlimited rate: the emulator's fastest setting, 1.4–3.4 Gbit/s of TCP here.
    println!("linkem 0.1 ms, unlimited:");
    let ds = run_on_link(
        link(Duration::from_micros(100), 0),
        6,
        Duration::from_millis(200),
    );
    let last = ds.last().unwrap();
    assert!(last.rtt.unwrap() < Duration::from_millis(2), "{last}");
    assert_eq!(last.mode, Mode::Datacenter, "{last}");
}

#[test]
fn linkem_80ms_200mbit_classifies_internet() {
    if skip("linkem_80ms_200mbit_classifies_internet") {
        return;
    }
    println!("linkem 80 ms, 200 Mbit/s:");
    let ds = run_on_link(
        link(Duration::from_millis(80), 200_000_000),
        4,
        Duration::from_millis(500),
    );
    let last = ds.last().unwrap();
    assert_eq!(last.mode, Mode::Internet, "{last}");
    let rtt = last.rtt.unwrap();
    assert!(
        rtt >= Duration::from_millis(80) && rtt < Duration::from_millis(120),
        "{last}"
    );
}

#[test]
fn linkem_20ms_2gbit_classifies_as_documented() {
    if skip("linkem_20ms_2gbit_classifies_as_documented") {
        return;
    }
    println!("linkem 20 ms, 2 Gbit/s:");
    let ds = run_on_link(
        link(Duration::from_millis(20), 2_000_000_000),
        8,
        Duration::from_millis(500),
    );
    let last = ds.last().unwrap();
    let rtt = last.rtt.unwrap();
    assert!(
        rtt >= Duration::from_millis(20) && rtt < Duration::from_millis(40),
        "{last}"
    );
    // 20 ms is within 10–50 ms, so the mode turns on the rate: hybrid at ≥ 1 Gbit/s. The
    // emulator on this 2-core machine forwards about 0.8–1.3 Gbit/s of TCP at this setting
    // (not 2), and the rate measurement reports what it delivers, so both hybrid and
    // internet are right answers; datacenter is not, and the rate must be plausible (no
    // train may read faster than the link).
    assert_ne!(last.mode, Mode::Datacenter, "{last}");
    for d in &ds {
        if let Some(b) = d.bandwidth {
            assert!(b <= 2 * GBIT_PER_SEC * 11 / 10, "faster than the link: {d}");
        }
    }
}

#[test]
fn linkem_flip_to_internet_is_detected_within_two_periods() {
    if skip("linkem_flip_to_internet_is_detected_within_two_periods") {
        return;
    }
    let period = Duration::from_secs(1);
    let link = LinkEm::builder()
        .params(self::link(Duration::from_micros(100), 0))
        .start()
        .unwrap();
    let addr = serve(&link);
    let link = Arc::new(link);
    let control = link.clone();
    link.left().block_on(async move {
        let client: Arc<dyn Transport> =
            Arc::new(TcpTransport::connect(addr, tcp_config()).await.unwrap());
        let handle = Detector::new(config(period), client.clone())
            .unwrap()
            .spawn();
        // Settle on the fast link (the loop's start-up periods are 200 ms). Not a speed
        // assertion: on a loaded machine a sub-millisecond link's pings read 0.3-4 ms, each
        // move past ×1.5 re-runs the rate measurement (up to a period), and settling took
        // over 5 periods in 3 of 5 runs.
        tokio::time::timeout(
            period * 15,
            handle.subscribe().wait_for(|m| *m == Mode::Datacenter),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "datacenter on the fast link: {:?}",
                handle.reports().borrow()
            )
        })
        .unwrap();
        let before = handle.last_decision().unwrap();
        println!("before: {before}");
        assert_eq!(before.mode, Mode::Datacenter, "{before}");
        // Flip between two ticks, not on one.
        tokio::time::sleep(period * 3 / 10).await;
        let flipped = Instant::now();
        control
            .update(|p| {
                p.delay = Duration::from_millis(40);
                p.rate_bps = 200_000_000;
            })
            .unwrap();
        let mut modes = handle.subscribe();
        tokio::time::timeout(period * 5, modes.wait_for(|m| *m == Mode::Internet))
            .await
            .expect("internet detected")
            .unwrap();
        let took = flipped.elapsed();
        let after = handle.last_decision().unwrap();
        println!("after {took:?}: {after}");
        // Two ticks after the flip, plus the second probe's own round trips.
        assert!(
            took <= 2 * period + Duration::from_millis(500),
            "took {took:?}: {after}"
        );
        handle.shutdown().await;
        client.close().await.unwrap();
    });
}

#[test]
fn linkem_short_slow_link_is_internet_once_traffic_measures_it() {
    if skip("linkem_short_slow_link_is_internet_once_traffic_measures_it") {
        return;
    }
    // 20 ms at 200 Mbit/s: idle, probe trains prove nothing about the rate and the RTT says
    // hybrid; with a bulk transfer the transport's delivery rate proves < 1 Gbit/s.
    let link = LinkEm::builder()
        .params(link(Duration::from_millis(20), 200_000_000))
        .start()
        .unwrap();
    let addr = serve(&link);
    link.left().block_on(async move {
        let client: Arc<dyn Transport> =
            Arc::new(TcpTransport::connect(addr, tcp_config()).await.unwrap());
        let mut det = Detector::new(config(Duration::from_millis(500)), client.clone()).unwrap();
        println!("linkem 20 ms, 200 Mbit/s, idle:");
        let idle = decide(&mut det, 3).await;
        assert_eq!(idle.last().unwrap().mode, Mode::Hybrid, "{}", idle[2]);
        let sender = {
            let client = client.clone();
            tokio::spawn(async move {
                let chunk = bytes::Bytes::from(vec![0u8; 1 << 20]);
                for _ in 0..400 {
                    if client.send(chunk.clone()).await.is_err() {
                        break;
                    }
                }
            })
        };
        println!("linkem 20 ms, 200 Mbit/s, bulk transfer:");
        let busy = decide(&mut det, 6).await;
        sender.abort();
        let last = busy.last().unwrap();
        assert_eq!(last.mode, Mode::Internet, "{last}");
        assert!(
            busy.iter()
                .any(|d| d.source == Some(amst_detect::SampleSource::Passive)
                    && d.bandwidth.is_some_and(|b| b < GBIT_PER_SEC)),
            "a passive sample measured the slow rate: {last}"
        );
        drop(client);
    });
}

/// What plain `iperf3 -P 8 -C bbr` (the congestion control of amst-tcp's internet profile)
/// gets through `link` in 3 s, bits per second (receiver side).
fn iperf3_rate(link: &LinkEm, port: u16) -> Option<f64> {
    let server_addr = link.right().addr().to_string();
    let mut server = link
        .right()
        .command("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let out = link
        .left()
        .command("iperf3")
        .args([
            "-c",
            &server_addr,
            "-p",
            &port.to_string(),
            "-P",
            "8",
            "-C",
            "bbr",
            "-t",
            "3",
            "-f",
            "m",
        ])
        .output()
        .ok();
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out?.stdout).into_owned();
    // "[SUM]   0.00-3.04   sec  68.4 MBytes   189 Mbits/sec                  receiver"
    let line = text
        .lines()
        .find(|l| l.contains("receiver") && (l.contains("[SUM]") || !text.contains("[SUM]")))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Mbits/sec")?;
    Some(words.get(at.checked_sub(1)?)?.parse::<f64>().ok()? * 1e6)
}

/// The rate measurement on an idle amst-tcp session through the emulator at `rate_bps`,
/// 20 ms RTT: within 10 % of the set rate, or, when plain iperf3 cannot reach 93 % of it
/// through the emulator on this machine, between 0.9 × what iperf3 gets and 1.1 × the set
/// rate.
///
/// iperf3 runs right before and right after the measurement. Where the emulator cannot
/// carry the set rate, it is CPU-bound, and on a loaded 2-core machine what it carries
/// moved by ±13 % between runs a few seconds apart (703–913 Mbit/s at 1 Gbit/s in ten
/// runs), as much as the tolerance itself. So the floor is what iperf3 got in the same
/// few seconds: the measurement may be 10 % below the lower of the two runs, never
/// further, and 10 % above the set rate.
fn rate_accuracy(rate_bps: u64, port: u16) {
    let link = LinkEm::builder()
        .params(LinkParams {
            delay: Duration::from_millis(10),
            rate_bps,
            queue: amst_linkem::QueueLimit::bytes(4 << 20),
            ..LinkParams::default()
        })
        .start()
        .unwrap();
    let mut plain = tcp_config();
    plain.tls = None;
    let addr = serve_with(&link, plain);
    let iperf_before = iperf3_rate(&link, port + 1);
    let estimate = link.left().block_on(async move {
        // The internet profile's 8 streams, as amst-hybrid opens them, without TLS: on this
        // 2-core machine the emulator needs most of a core at 1 Gbit/s, and TLS's
        // encryption on both ends competes with it for the rest (the same probe read 0.72-0.9
        // of iperf3 with TLS, 0.95-1.05 without). That is the transport's CPU ceiling, not
        // the estimator's accuracy, which is what this test measures.
        let mut config = tcp_config().with_streams(8);
        config.tls = None;
        let client = TcpTransport::connect(addr, config).await.unwrap();
        let e = measure_rate(&client, &RateProbeConfig::default())
            .await
            .unwrap();
        client.close().await.unwrap();
        e
    });
    let iperf_after = iperf3_rate(&link, port + 2);
    let bw = estimate.bandwidth.expect("a rate");
    let measured = bw.bytes_per_sec as f64 * 8.0;
    let set = rate_bps as f64;
    // A link that carries its set rate gives iperf3 0.95-0.96 of it (TCP/IP headers):
    // 47.9 of 50, 190 of 200 Mbit/s. Below 0.93 the emulator, CPU-bound on this machine,
    // does not carry the set rate, and the floor is what iperf3 got through the same link
    // in the same run. The ceiling stays the set rate: no probe reads above the link.
    let high = set;
    let iperf_low = [iperf_before, iperf_after]
        .into_iter()
        .flatten()
        .fold(set, f64::min);
    let (low, against) = if iperf_low < 0.93 * set {
        (
            iperf_low,
            "the set rate, floored at what iperf3 -P 8 -C bbr got through the same link just before and after (the emulator cannot carry the set rate here)",
        )
    } else {
        (set, "the set rate")
    };
    let mbit = |r: Option<f64>| r.map_or("not run".into(), |i| format!("{:.1} Mbit/s", i / 1e6));
    println!(
        "linkem 20 ms, {} Mbit/s: measured {:.1} Mbit/s ({}; {} trains, {:.1} MB, {:?}); iperf3 -P 8 -C bbr before {}, after {}; compared with {against}: {:.3}..{:.3}",
        rate_bps / 1_000_000,
        measured / 1e6,
        if bw.lower_bound {
            "lower bound"
        } else {
            "converged"
        },
        estimate.trains,
        estimate.bytes as f64 / 1e6,
        estimate.took,
        mbit(iperf_before),
        mbit(iperf_after),
        measured / high,
        measured / low,
    );
    // Converged or cut by its budget (then the best train, a lower bound): either way it
    // must read the link's rate.
    assert!(
        measured >= 0.9 * low && measured <= 1.1 * high,
        "measured {:.1} Mbit/s against {against} {:.1}..{:.1} Mbit/s",
        measured / 1e6,
        low / 1e6,
        high / 1e6
    );
}

#[test]
fn linkem_rate_measurement_within_10_percent_at_50_mbit() {
    if skip("linkem_rate_measurement_within_10_percent_at_50_mbit") {
        return;
    }
    rate_accuracy(50_000_000, 7410);
}

#[test]
fn linkem_rate_measurement_within_10_percent_at_200_mbit() {
    if skip("linkem_rate_measurement_within_10_percent_at_200_mbit") {
        return;
    }
    rate_accuracy(200_000_000, 7420);
}

#[test]
// Ran serially (`cargo xtask ci`'s link pass) nine times in a row on 2026-12-06: 913-965
// Mbit/s measured, iperf3 891-936 Mbit/s through the same link. On 2026-12-05, with
// the machine busier, one run in six read 0.86 of iperf3's lower run; the CI profile's one
// retry covers that.
fn linkem_rate_measurement_within_10_percent_at_1_gbit() {
    if skip("linkem_rate_measurement_within_10_percent_at_1_gbit") {
        return;
    }
    rate_accuracy(1_000_000_000, 7430);
}
