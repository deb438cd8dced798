//! Runs iperf3 as the reference contender and reads its JSON output.

use std::io;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What one iperf3 client run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct IperfResult {
    /// Receiver-side goodput in bits per second.
    pub received_bps: f64,
    /// Bytes the receiver got.
    pub received_bytes: u64,
    /// Retransmitted segments the sender's kernel reported.
    pub retransmits: u64,
    /// Per-interval goodput `(seconds since start, bits per second)`.
    pub intervals: Vec<(f64, f64)>,
}

/// Whether iperf3 is installed.
pub fn available() -> bool {
    Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts `iperf3 -s -1` (one test, then exit) on `bind:port` through `cmd`, which may be a
/// plain `Command::new("iperf3")` or one that runs inside a network namespace.
pub fn server(mut cmd: Command, bind: &str, port: u16) -> io::Result<Child> {
    cmd.args(["-s", "-1", "-B", bind, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Runs an iperf3 client through `cmd` against `host:port` for `duration` (or `bytes` when
/// given), with `extra` arguments such as `["-P", "8"]` or `["-C", "bbr"]`.
pub fn client(
    mut cmd: Command,
    host: &str,
    port: u16,
    duration: Duration,
    bytes: Option<u64>,
    extra: &[&str],
) -> io::Result<IperfResult> {
    cmd.args(["-c", host, "-p", &port.to_string(), "-J", "-i", "0.5"]);
    match bytes {
        Some(n) => cmd.args(["-n", &n.to_string()]),
        None => cmd.args(["-t", &format!("{:.1}", duration.as_secs_f64())]),
    };
    cmd.args(extra);
    let out = cmd.stderr(Stdio::piped()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse(&text).map_err(|e| {
        io::Error::other(format!(
            "iperf3 client failed ({}): {e}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })
}

/// Parses `iperf3 -J` output.
pub fn parse(json: &str) -> Result<IperfResult, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(err.to_string());
    }
    let end = &v["end"];
    let recv = &end["sum_received"];
    let received_bps = recv["bits_per_second"]
        .as_f64()
        .ok_or("no end.sum_received.bits_per_second")?;
    let received_bytes = recv["bytes"].as_u64().unwrap_or(0);
    let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let intervals = v["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    let s = &i["sum"];
                    Some((s["end"].as_f64()?, s["bits_per_second"].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(IperfResult {
        received_bps,
        received_bytes,
        retransmits,
        intervals,
    })
}

/// One iperf3 test on this host: a one-shot server on a free port and a client moving
/// `bytes` (or running its default time), with `extra` arguments.
pub fn once(host: &str, bytes: Option<u64>, extra: &[&str]) -> Result<IperfResult, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))?;
    let server =
        server(Command::new("iperf3"), host, port).map_err(|e| format!("iperf3 -s: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let r = client(
        Command::new("iperf3"),
        host,
        port,
        Duration::ZERO,
        bytes,
        extra,
    );
    reap(server);
    r.map_err(|e| e.to_string())
}

/// Waits up to 5 s for a one-shot iperf3 server to exit after its test, then kills it: a
/// client that never connected must not leave the harness waiting.
pub fn reap(mut server: Child) {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok(Some(_)) = server.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf3_json_and_its_errors() {
        let json = r#"{"intervals":[{"sum":{"end":0.5,"bits_per_second":1e9}},
            {"sum":{"end":1.0,"bits_per_second":2e9}}],
            "end":{"sum_sent":{"retransmits":7},"sum_received":{"bits_per_second":1.5e9,"bytes":187500000}}}"#;
        let r = parse(json).unwrap();
        assert_eq!(r.received_bps, 1.5e9);
        assert_eq!(r.retransmits, 7);
        assert_eq!(r.intervals, vec![(0.5, 1e9), (1.0, 2e9)]);
        assert!(
            parse(r#"{"error":"unable to connect"}"#)
                .unwrap_err()
                .contains("unable")
        );
        assert!(parse("garbage").is_err());
    }
}
