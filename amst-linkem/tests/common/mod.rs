//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::Duration;

/// Returns why the test cannot run here (no root/netns/TUN, or a missing tool), if so.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    if let Err(why) = amst_linkem::check_privileges() {
        return Some(why);
    }
    for tool in tools {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// Skips (returns from) the calling test with a printed reason when it cannot run.
#[macro_export]
macro_rules! require {
    ($($tool:expr),* $(,)?) => {
        if let Some(why) = common::skip_reason(&[$($tool),*]) {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// Per-packet RTTs printed by `ping` ("time=20.4 ms"), in milliseconds.
pub fn ping_rtts(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// Runs `ping` from `ns` to `dst`; returns the RTTs in ms.
pub fn ping(
    ns: &amst_linkem::Namespace,
    dst: std::net::Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Vec<f64> {
    let out = ns
        .command("ping")
        .args([
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            &format!("{:.3}", interval.as_secs_f64()),
        ])
        .args(["-W", "2", &dst.to_string()])
        .output()
        .expect("running ping");
    let text = String::from_utf8_lossy(&out.stdout);
    ping_rtts(&text)
}

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Puts the calling thread at real-time priority, like the forwarder, so that a busy CI
/// machine does not add its scheduling delays to what a probe measures. Best effort.
pub fn realtime_thread() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: affects only the calling thread; failure leaves the normal priority.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
}

/// The median: one ping delayed by a CPU-bound neighbour (ping stamps its send time in
/// user space) moves it less than the mean.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}
