//! The `amst` binary as a user runs it: real processes, real sockets on 127.0.0.1, real
//! files. Ports are picked by the OS (`127.0.0.1:0`) and read back from `amst serve`'s first
//! line, so tests never race for a port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ring::digest;

const KEY: &str = "correct horse battery staple 0123456789";

const AMST: &str = env!("CARGO_BIN_EXE_amst");

/// `amst` to run to completion, with a time limit.
fn amst() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::new(AMST);
    c.env_remove("AMST_PSK").env_remove("RUST_LOG");
    c
}

/// `amst` to spawn and watch.
fn amst_spawn() -> Command {
    let mut c = Command::new(AMST);
    c.env_remove("AMST_PSK").env_remove("RUST_LOG");
    c
}

/// Runs with a time limit and returns the output whatever the exit status.
trait Run {
    fn run(&mut self, secs: u64) -> std::process::Output;
}

impl Run for assert_cmd::Command {
    fn run(&mut self, secs: u64) -> std::process::Output {
        self.timeout(Duration::from_secs(secs))
            .output()
            .expect("amst runs")
    }
}

fn key_file(dir: &Path, key: &str) -> PathBuf {
    let p = dir.join("amst.key");
    std::fs::write(&p, format!("{key}\n")).unwrap();
    p
}

/// A running `amst serve`, killed on drop.
struct Serve {
    child: Child,
    addr: String,
    lines: mpsc::Receiver<String>,
}

impl Serve {
    fn start(args: &[&str]) -> Serve {
        let mut cmd = amst_spawn();
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("amst serve starts");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("serve> {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("amst serve prints its address");
        let addr = first
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        Serve { child, addr, lines }
    }

    /// Ctrl-C, then everything it printed, and its exit status.
    fn interrupt(mut self) -> (Vec<String>, std::process::ExitStatus) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "amst serve did not stop on Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            out.push(l);
        }
        (out, status)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_file(p: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    ctx.finish().as_ref().to_vec()
}

/// Pseudo-random content (xorshift), so that a misplaced block changes the checksum.
fn write_random_file(p: &Path, len: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = len;
    let mut block = vec![0u8; 1 << 16];
    while left > 0 {
        for w in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        let n = left.min(block.len());
        f.write_all(&block[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
}

fn stdout_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn demo_runs_and_prints_the_report() {
    let o = amst().args(["demo", "--size", "64M"]).run(120);
    let out = stdout_of(&o);
    assert!(o.status.success(), "{out}\n{}", stderr_of(&o));
    for field in [
        "bytes          67108864 (64.0 MiB)",
        "goodput",
        "mode",
        "transport",
        "streams",
        "retransmits",
        "mode switches",
        "rtt            min",
        "verified by the receiver",
    ] {
        assert!(out.contains(field), "missing {field:?} in:\n{out}");
    }
    // The demo forces one switch under traffic through the hybrid manager.
    assert!(out.contains("mode switches  1 ("), "one switch:\n{out}");
    assert!(out.contains("[amst-hybrid]"), "{out}");
}

#[test]
fn send_and_serve_move_a_100_mib_file_intact() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let src = dir.path().join("big.bin");
    write_random_file(&src, 100 << 20);
    let out_dir = dir.path().join("received");
    let serve = Serve::start(&[
        "--output",
        out_dir.to_str().unwrap(),
        "--psk-file",
        key.to_str().unwrap(),
    ]);
    let o = amst()
        .args(["send", &serve.addr])
        .arg(&src)
        .arg("--psk-file")
        .arg(&key)
        .run(120);
    let report = stdout_of(&o);
    assert!(o.status.success(), "{report}\n{}", stderr_of(&o));
    assert!(
        report.contains("bytes          104857600 (100.0 MiB)"),
        "{report}"
    );
    assert!(report.contains("stored as      big.bin"), "{report}");
    let received = out_dir.join("big.bin");
    assert_eq!(sha256_file(&received), sha256_file(&src));

    let (lines, status) = serve.interrupt();
    assert!(status.success(), "serve exits 0 after Ctrl-C: {status:?}");
    let all = lines.join("\n");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("1 stored") && l.contains("100.0 MiB") && l.contains("ok")),
        "one line per session:\n{all}"
    );
    assert!(
        all.contains("1 session(s) (0 failed), 1 transfer(s) ok, 0 failed, 100.0 MiB received"),
        "summary:\n{all}"
    );
}

#[test]
fn json_report_parses_and_has_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let serve = Serve::start(&["--discard", "--psk-file", key.to_str().unwrap()]);
    let o = amst()
        .args(["send", &serve.addr, "--size", "8M", "--json", "--psk-file"])
        .arg(&key)
        .run(120);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    assert_eq!(v["schema"], "amst-report/1");
    assert_eq!(v["start"]["command"], "send");
    assert_eq!(v["start"]["size"], 8 << 20);
    assert_eq!(v["start"]["kind"], "generated");
    assert_eq!(v["end"]["bytes"], 8 << 20);
    assert_eq!(v["end"]["verified"], true);
    assert!(v["end"]["bits_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["end"]["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(v["end"]["sha256"].as_str().unwrap().len(), 64);
    for k in [
        "mode",
        "transport",
        "streams",
        "retransmits",
        "mode_switches",
        "rtt_min_us",
        "rtt_avg_us",
    ] {
        assert!(v["end"].get(k).is_some(), "end.{k} missing");
    }
    let intervals = v["intervals"].as_array().unwrap();
    assert!(!intervals.is_empty());
    let sum: u64 = intervals.iter().map(|i| i["bytes"].as_u64().unwrap()).sum();
    assert_eq!(sum, 8 << 20, "intervals add up to the transfer");
    for i in intervals {
        assert!(
            i["streams"].as_u64().unwrap() > 0,
            "every interval names the streams that carried it, the last one too: {i}"
        );
    }
    assert!(v["error"].is_null());
}

/// `--aggressive` (the internet profile's streams compete as separate flows) is accepted and
/// said in both reports; without it, neither report claims it.
#[test]
fn aggressive_is_accepted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let serve = Serve::start(&["--discard", "--psk-file", key.to_str().unwrap()]);
    let send = |extra: &[&str]| {
        let o = amst()
            .args(["send", &serve.addr, "--size", "4M", "--mode", "internet"])
            .args(extra)
            .arg("--psk-file")
            .arg(&key)
            .run(120);
        assert!(o.status.success(), "{}", stderr_of(&o));
        stdout_of(&o)
    };
    let human = send(&["--aggressive"]);
    assert!(
        human.contains("fairness       aggressive (--aggressive)"),
        "{human}"
    );
    assert!(human.contains("verified by the receiver"), "{human}");
    let json = send(&["--aggressive", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("stdout is one JSON object");
    assert_eq!(v["start"]["config"]["aggressive"], true, "{v}");
    assert_eq!(v["end"]["verified"], true);
    // The default is one flow: no fairness row, and false in the JSON.
    let human = send(&[]);
    assert!(!human.contains("fairness"), "{human}");
    let v: serde_json::Value =
        serde_json::from_str(&send(&["--json"])).expect("stdout is one JSON object");
    assert_eq!(v["start"]["config"]["aggressive"], false, "{v}");
}

#[test]
fn quiet_send_prints_nothing_but_errors() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let serve = Serve::start(&["--discard", "--psk-file", key.to_str().unwrap()]);
    let o = amst()
        .args(["send", &serve.addr, "--size", "1M", "--quiet", "--psk-file"])
        .arg(&key)
        .run(120);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(stdout_of(&o), "", "no report with --quiet");
    // Log warnings (this test's key file is world-readable) may remain; progress may not.
    let err = stderr_of(&o);
    assert!(
        !err.contains("interval") && !err.contains("goodput"),
        "no progress with --quiet:\n{err}"
    );
    let o = amst()
        .args([
            "send",
            "127.0.0.1:1",
            "--size",
            "1M",
            "--quiet",
            "--psk-file",
        ])
        .arg(&key)
        .run(120);
    assert!(!o.status.success());
    assert!(!stderr_of(&o).is_empty(), "errors are still printed");
}

/// `amst send --json | head -1`: the reader leaves before the report is written. The
/// transfer is already complete, so that is not a failure, and never a panic.
#[test]
fn a_closed_stdout_does_not_fail_a_finished_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let serve = Serve::start(&["--discard", "--psk-file", key.to_str().unwrap()]);
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) writes two descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are ours and open; each is owned exactly once from here.
    let (read_end, write_end) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    drop(read_end);
    let o = amst_spawn()
        .args(["send", &serve.addr, "--size", "1M", "--json", "--psk-file"])
        .arg(&key)
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .expect("amst send runs");
    let err = stderr_of(&o);
    assert!(o.status.success(), "exit {:?}:\n{err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
}

/// `amst send PEER -` with its stdin held open and empty, so the transfer runs until
/// stopped, returned once its session is up (the line naming the peer is on stderr; warnings
/// may come first): the child, its stdin, and its stderr past that line.
fn streaming_send(addr: &str, key: &Path) -> (Child, ChildStdin, BufReader<ChildStderr>) {
    let mut child = amst_spawn()
        .args(["send", addr, "-", "--psk-file"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("amst send starts");
    let stdin = child.stdin.take().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    for _ in 0..20 {
        let mut line = String::new();
        let n = err.read_line(&mut line).unwrap();
        seen.push_str(&line);
        if n == 0 || line.contains("→") {
            break;
        }
    }
    assert!(seen.contains("→"), "{seen:?}");
    (child, stdin, err)
}

/// The exit status of `child` within `secs`; otherwise kills it and fails with `what`.
fn exit_within(child: &mut Child, secs: u64, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ctrl-C during `amst send` ends it with its own exit code and says whether the same
/// command resumes (a stream from stdin does not), instead of dying silently by the signal.
#[test]
fn an_interrupted_send_says_so_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let serve = Serve::start(&["--discard", "--psk-file", key.to_str().unwrap()]);
    let (mut child, stdin, mut err) = streaming_send(&serve.addr, &key);
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = exit_within(&mut child, 30, "amst send did not stop on Ctrl-C");
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(
        rest.contains("interrupted by Ctrl-C; a stream from stdin or --size cannot resume"),
        "{rest}"
    );

    // With --json there is no progress line to wait for; the report exists long before 2 s.
    let mut child = amst_spawn()
        .args(["send", &serve.addr, "-", "--json", "--psk-file"])
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("amst send starts");
    let stdin = child.stdin.take();
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(o.status.code(), Some(130), "{}", stderr_of(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    assert_eq!(v["error"]["kind"], "interrupted", "{v}");
    assert_eq!(v["error"]["exit_code"], 130, "{v}");
    assert!(v["end"].is_null(), "{v}");
    assert_eq!(v["start"]["command"], "send", "{v}");
}

/// Nobody reads `amst send`'s stderr any more, its input ends and its peer dies: it must
/// still exit, with the network's exit code. A log line to the closed stderr used to panic
/// inside a session task (tracing reported its own failed write with `eprintln!`), and the
/// process then waited forever.
#[test]
fn a_send_whose_stderr_is_closed_still_ends_when_its_peer_dies() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let serve = Serve::start(&["--discard", "--psk-file", key.to_str().unwrap()]);
    let (mut child, stdin, err) = streaming_send(&serve.addr, &key);
    drop(err);
    drop(serve);
    drop(stdin);
    let status = exit_within(&mut child, 30, "amst send did not exit after its peer died");
    assert_eq!(
        status.code(),
        Some(3),
        "network failure, not a panic: {status:?}"
    );
}

/// This host has no RDMA device (and the default build lacks the `rdma` feature), so the
/// datacenter lane falls back to TCP: the data must still arrive whole, and `amst` must say
/// that RDMA was not used instead of failing or keeping quiet.
#[test]
fn transport_rdma_without_a_device_falls_back_to_tcp_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let src = dir.path().join("rdma.bin");
    write_random_file(&src, 8 << 20);
    let out_dir = dir.path().join("received");
    let rdma = ["--transport", "rdma", "--mode", "datacenter"];
    let serve = Serve::start(&[
        "--output",
        out_dir.to_str().unwrap(),
        "--psk-file",
        key.to_str().unwrap(),
        "--transport",
        "rdma",
        "--mode",
        "datacenter",
    ]);
    let o = amst()
        .args(["send", &serve.addr])
        .arg(&src)
        .args(rdma)
        .arg("--psk-file")
        .arg(&key)
        .run(120);
    let (report, err) = (stdout_of(&o), stderr_of(&o));
    assert!(o.status.success(), "{report}\n{err}");
    assert!(report.contains("transport      tcp\n"), "{report}");
    assert!(report.contains("verified by the receiver"), "{report}");
    assert_eq!(sha256_file(&out_dir.join("rdma.bin")), sha256_file(&src));
    let warning: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warning.len(), 1, "one warning line:\n{err}");
    assert!(
        warning[0].contains("--transport rdma was asked")
            && warning[0].contains("runs on tcp")
            && (warning[0].contains("`rdma` cargo feature") || warning[0].contains("RDMA device")),
        "{err}"
    );

    let o = amst()
        .args(["send", &serve.addr, "--size", "4M", "--json"])
        .args(rdma)
        .arg("--psk-file")
        .arg(&key)
        .run(120);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    assert_eq!(v["start"]["config"]["transport"], "rdma");
    assert_eq!(v["end"]["transport"], "tcp");
    assert_eq!(v["end"]["verified"], true);
    let warnings = v["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{v}");
    assert!(warnings[0].as_str().unwrap().contains("runs on tcp"), "{v}");
    assert!(
        !stderr_of(&o).contains("warning"),
        "in --json mode the warning is in the report: {}",
        stderr_of(&o)
    );

    let (lines, status) = serve.interrupt();
    assert!(status.success(), "{status:?}");
    let all = lines.join("\n");
    assert!(all.contains("2 transfer(s) ok, 0 failed"), "{all}");
}

#[test]
fn rdma_options_need_transport_rdma() {
    let o = amst()
        .args([
            "send",
            "127.0.0.1:9",
            "--size",
            "1M",
            "--rdma-device",
            "rxe0",
        ])
        .env("AMST_PSK", KEY)
        .run(30);
    assert_eq!(o.status.code(), Some(2), "usage error: {}", stderr_of(&o));
    let err = stderr_of(&o);
    assert!(
        err.contains("--rdma-device needs --transport rdma"),
        "{err}"
    );
}

#[test]
fn a_chunk_out_of_range_is_refused_with_the_range() {
    for chunk in ["2M", "1K"] {
        let o = amst()
            .args(["send", "127.0.0.1:9", "--size", "1M", "--chunk", chunk])
            .env("AMST_PSK", KEY)
            .run(30);
        assert_eq!(o.status.code(), Some(2), "usage error: {}", stderr_of(&o));
        let err = stderr_of(&o);
        assert!(
            err.contains("--chunk") && err.contains("out of range") && err.contains("512"),
            "{err}"
        );
    }
}

#[test]
fn rate_is_refused_for_files_rather_than_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.bin");
    std::fs::write(&file, b"x").unwrap();
    let o = amst()
        .args(["send", "127.0.0.1:9", "--rate", "10M"])
        .arg(&file)
        .env("AMST_PSK", KEY)
        .run(30);
    assert_eq!(o.status.code(), Some(2), "usage error: {}", stderr_of(&o));
    let err = stderr_of(&o);
    assert!(err.contains("--rate limits stdin"), "{err}");
}

#[test]
fn a_wrong_key_is_an_authentication_failure() {
    let dir = tempfile::tempdir().unwrap();
    let good = key_file(dir.path(), KEY);
    let serve = Serve::start(&["--discard", "--psk-file", good.to_str().unwrap()]);
    let o = amst()
        .args(["send", &serve.addr, "--size", "1M"])
        .env("AMST_PSK", "a different key of some length")
        .run(60);
    assert_eq!(
        o.status.code(),
        Some(4),
        "exit code 4 for auth: {}",
        stderr_of(&o)
    );
    let err = stderr_of(&o);
    assert!(err.contains("authentication failed"), "{err}");
    assert!(err.contains("pre-shared key"), "{err}");
}

#[test]
fn a_missing_file_is_named_before_any_connection() {
    let o = amst()
        .args(["send", "127.0.0.1:9", "/nonexistent/dir/data.bin"])
        .env("AMST_PSK", KEY)
        .run(30);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(
        stderr_of(&o).trim_end(),
        "amst: cannot read /nonexistent/dir/data.bin: no such file"
    );
}

#[test]
fn bad_addresses_and_absent_peers_are_explained() {
    let o = amst()
        .args(["send", "no-port-here", "--size", "1M"])
        .env("AMST_PSK", KEY)
        .run(30);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr_of(&o).contains("bad address \"no-port-here\": expected HOST:PORT"),
        "{}",
        stderr_of(&o)
    );

    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = amst()
        .args(["send", &format!("127.0.0.1:{port}"), "--size", "1M"])
        .env("AMST_PSK", KEY)
        .run(60);
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    let err = stderr_of(&o);
    assert!(
        err.contains(&format!("connecting to 127.0.0.1:{port} failed")),
        "{err}"
    );
    assert!(err.contains("unreachable"), "{err}");

    let o = amst().args(["send", "127.0.0.1:9", "--size", "1M"]).run(30);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("no pre-shared key"),
        "{}",
        stderr_of(&o)
    );

    let o = amst()
        .args(["send", "127.0.0.1:9", "--size", "12X"])
        .run(30);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("invalid size \"12X\""),
        "{}",
        stderr_of(&o)
    );
}

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("the metrics endpoint accepts");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn counter(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

#[test]
fn prometheus_byte_counters_grow_during_a_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let serve = Serve::start(&[
        "--discard",
        "--psk-file",
        key.to_str().unwrap(),
        "--metrics-addr",
        &metrics,
    ]);
    // 96 MiB at 32 MiB/s: about 3 s of transfer to watch.
    let mut send = amst_spawn()
        .args([
            "send",
            &serve.addr,
            "--size",
            "96M",
            "--rate",
            "32M",
            "--quiet",
            "--psk-file",
        ])
        .arg(&key)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let v = counter(&scrape(&metrics), "amst_cli_received_bytes_total").unwrap_or(0);
        if seen.last() != Some(&v) {
            seen.push(v);
        }
        if v >= 96 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = send.wait().unwrap();
    assert!(status.success());
    let mid: Vec<_> = seen.iter().filter(|&&v| v > 0 && v < 96 << 20).collect();
    assert!(
        mid.len() >= 2,
        "at least two distinct mid-transfer values: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "increasing: {seen:?}");
    assert_eq!(*seen.last().unwrap(), 96 << 20);
    let text = scrape(&metrics);
    assert!(text.contains("amst_cli_sessions_total 1"), "{text}");
    assert!(
        text.contains("amst_cli_transfers_total{result=\"ok\"} 1"),
        "{text}"
    );
    // amst-hybrid's own counters reach the same recorder through the metrics facade.
    let lib = counter(&text, "amst_bytes_received_total{role=\"server\"}").unwrap_or(0);
    assert!(lib >= 96 << 20, "library byte counter {lib}:\n{text}");
}

#[test]
fn a_full_disk_on_the_receiver_is_a_clean_abort() {
    // A 4 MiB tmpfs in a private mount namespace: needs root and unshare(1).
    let root = unsafe { libc::geteuid() } == 0;
    let unshare = Command::new("unshare").arg("--version").output().is_ok();
    if !root || !unshare {
        eprintln!(
            "skipping: needs root and unshare(1) for a private tmpfs (root={root}, unshare={unshare})"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let src = dir.path().join("too-big.bin");
    write_random_file(&src, 256 << 20);
    let amst_bin = Path::new(AMST);
    let script = format!(
        "mount -t tmpfs -o size=4m amst-test {mnt} && exec {bin} serve --listen 127.0.0.1:0 --output {mnt} --psk-file {key}",
        mnt = mnt.display(),
        bin = amst_bin.display(),
        key = key.display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    let o = amst()
        .args(["send", "--json", &addr])
        .arg(&src)
        .arg("--psk-file")
        .arg(&key)
        .run(60);
    let _ = child.kill();
    let _ = child.wait();
    // The sender stops once the receiver reports the file failed, instead of sending the
    // rest of it into a full disk (all 256 MiB went before).
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    let sent = v["tree"]["data_bytes_sent"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tree.data_bytes_sent in {v}"));
    assert!(
        sent < 128 << 20,
        "{sent} bytes of 256 MiB sent into a 4 MiB disk"
    );
    assert_eq!(
        o.status.code(),
        Some(6),
        "disk exit code: {}",
        stderr_of(&o)
    );
    let err = stderr_of(&o);
    assert!(err.contains("the receiver's disk is full"), "{err}");
    assert!(err.contains("partial file was removed"), "{err}");
}

#[test]
fn explain_measures_the_path_and_names_a_mode_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let serve = Serve::start(&["--discard", "--psk-file", key.to_str().unwrap()]);
    let o = amst()
        .args([
            "explain",
            "--peer",
            &serve.addr,
            "--probe-bytes",
            "4M",
            "--json",
            "--psk-file",
        ])
        .arg(&key)
        .run(60);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["schema"], "amst-explain/1");
    assert_eq!(v["rtt_probes"], 10);
    assert!(v["rtt_median_us"].as_u64().unwrap() >= v["rtt_min_us"].as_u64().unwrap());
    // The rate trains grow until two agree, so they may stop well short of the budget, but
    // never past it.
    let used = v["probe_bytes_used"].as_u64().unwrap();
    assert!(used > 0 && used <= 4 << 20, "probe bytes used: {used}");
    assert!(v["bandwidth_trains"].as_u64().unwrap() >= 1, "{v}");
    // A short path's rate is measured over the transport datacenter mode would use.
    assert_eq!(v["bandwidth_probed_in"], "datacenter", "{v}");
    let mode = v["mode"].as_str().unwrap();
    assert!(
        ["datacenter", "internet", "hybrid"].contains(&mode),
        "{mode}"
    );
    // Loopback RTT is far below the 10 ms datacenter bound: never internet.
    assert_ne!(mode, "internet", "{v}");
    assert!(v["why"].as_str().unwrap().contains("rtt"), "{v}");
    assert!(v["streams"].as_u64().unwrap() >= 1);
    assert!(["bbr", "cubic"].contains(&v["cc"].as_str().unwrap()));

    let o = amst()
        .args([
            "explain",
            "--peer",
            &serve.addr,
            "--probe-bytes",
            "1M",
            "--psk-file",
        ])
        .arg(&key)
        .run(60);
    assert!(o.status.success());
    let text = stdout_of(&o);
    for row in [
        "#   rtt ",
        "#   mode ",
        "#   why ",
        "#   transport ",
        "#   streams ",
        "#   chunk size ",
        "#   cc ",
    ] {
        assert!(text.contains(row), "missing {row:?}:\n{text}");
    }
}

fn b3_file(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

/// Bytes landed at the receiver: finished files plus blocks journaled as verified.
fn arrived_bytes(dir: &Path) -> u64 {
    landed_bytes(dir) + journaled_bytes(dir)
}

/// Bytes in finished files.
fn landed_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = p.to_string_lossy();
        match e.file_type() {
            Ok(t) if t.is_dir() => total += landed_bytes(&p),
            Ok(t) if t.is_file() && !name.contains(".amst-") => {
                total += e.metadata().map(|m| m.len()).unwrap_or(0)
            }
            _ => {}
        }
    }
    total
}

/// Blocks journaled as verified at the receiver, over all partial files. A journal whose
/// partial file is gone belongs to a file that has just landed (the receiver removes the
/// journal right after the rename) and is already counted by [`landed_bytes`].
fn journaled_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            total += journaled_bytes(&p);
        } else if let Some(stem) = p.to_string_lossy().strip_suffix(".amst-journal") {
            if !Path::new(&format!("{stem}.amst-part")).exists() {
                continue;
            }
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            total += len.saturating_sub(40) / 48 * (1 << 20);
        }
    }
    total
}

/// `amst send PEER DIR`: the sender is SIGKILLed once half the tree is verified at the
/// receiver; the same command with --resume sends at most 55% of the tree, every file's
/// BLAKE3 matches, and `amst serve` stops cleanly on SIGTERM.
#[test]
fn a_directory_is_sent_killed_resumed_and_serve_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let src = dir.path().join("dataset");
    std::fs::create_dir_all(src.join("shards/deep")).unwrap();
    for i in 0..3 {
        write_random_file(&src.join(format!("shards/big{i}.bin")), 96 << 20);
    }
    for i in 0..100 {
        std::fs::write(
            src.join(format!("shards/deep/s{i:03}.txt")),
            format!("{i}").repeat(999),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("shards/big0.bin", src.join("latest")).unwrap();
    let total: u64 = 3 * (96 << 20);
    let out_dir = dir.path().join("received");
    // A small budget keeps what is in flight at the kill well under half the tree, so the
    // receiver cannot finish the whole tree from it after the sender is gone.
    let serve = Serve::start(&[
        "--output",
        out_dir.to_str().unwrap(),
        "--memory-budget",
        "32M",
        "--psk-file",
        key.to_str().unwrap(),
    ]);
    let mut first = amst_spawn()
        .args([
            "send",
            &serve.addr,
            "--quiet",
            "--streams",
            "4",
            "--psk-file",
        ])
        .arg(&key)
        .arg(&src)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Half the tree, and some file caught half-way with verified blocks in its journal, so
    // that the second try must resume blocks and not only skip whole files.
    while arrived_bytes(&out_dir) < total / 2 || journaled_bytes(&out_dir) == 0 {
        assert!(Instant::now() < deadline, "half the tree never arrived");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first send ended before half the tree"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // The receiver goes on writing what was in flight; whatever is journaled now must be
    // resumed, not sent again.
    let journaled_before_resume = journaled_bytes(&out_dir);

    let o = amst()
        .args([
            "send",
            &serve.addr,
            "--resume",
            "--json",
            "--streams",
            "4",
            "--psk-file",
        ])
        .arg(&key)
        .arg(&src)
        .run(180);
    assert!(o.status.success(), "{}\n{}", stdout_of(&o), stderr_of(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tree = &v["tree"];
    assert_eq!(tree["hash"], "blake3");
    let sent = tree["data_bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= total * 55 / 100,
        "second try sent {sent} of {total}"
    );
    let resumed = tree["blocks_resumed"].as_u64().unwrap();
    assert!(
        resumed > 0 || journaled_before_resume == 0,
        "{resumed} blocks resumed, {journaled_before_resume} bytes journaled before the resume"
    );
    assert!(sent < total, "the second try sent the whole tree again");
    assert_eq!(tree["failed"], 0);
    let got = out_dir.join("dataset");
    for i in 0..3 {
        let name = format!("shards/big{i}.bin");
        let b3 = b3_file(&got.join(&name));
        assert_eq!(b3, b3_file(&src.join(&name)), "{name}");
        let listed = tree["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == format!("dataset/{name}") && f["blake3"] == b3.as_str());
        assert!(listed || sent < total, "{name} in the report's files");
        if let Ok(out) = Command::new("b3sum").arg(got.join(&name)).output() {
            assert!(String::from_utf8_lossy(&out.stdout).starts_with(&b3));
        }
    }
    for i in 0..100 {
        let name = format!("shards/deep/s{i:03}.txt");
        assert_eq!(
            std::fs::read(got.join(&name)).unwrap(),
            std::fs::read(src.join(&name)).unwrap()
        );
    }
    assert_eq!(
        std::fs::read_link(got.join("latest")).unwrap(),
        Path::new("shards/big0.bin")
    );
    assert_eq!(journaled_bytes(&out_dir), 0, "no partial files are left");

    // SIGTERM stops the server like Ctrl-C: it prints its summary and exits 0.
    let mut serve = serve;
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(serve.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "amst serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let mut lines = Vec::new();
    while let Ok(l) = serve.lines.recv_timeout(Duration::from_secs(2)) {
        lines.push(l);
    }
    assert!(
        lines.iter().any(|l| l.contains("session(s)")),
        "summary after SIGTERM: {lines:?}"
    );
}

/// `amst serve` is SIGKILLed once half the tree is journaled as verified; a new `amst serve`
/// on the same output directory takes the same `amst send ... --resume`, which sends at most
/// 55% of the tree, and every file's BLAKE3 matches.
#[test]
fn a_receiver_killed_mid_tree_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), KEY);
    let src = dir.path().join("dataset");
    std::fs::create_dir_all(src.join("small")).unwrap();
    // 128 MiB files: the receiver journals every 64 MiB (or 500 ms), so what the test can see
    // arrive grows in steps of 64 MiB, and half the tree is seen well before the end. With
    // 64 MiB files nothing showed until whole files landed, and a fast first send finished
    // before the test saw half (2 runs in 6 on an idle machine).
    for i in 0..3 {
        write_random_file(&src.join(format!("big{i}.bin")), 128 << 20);
    }
    for i in 0..50 {
        std::fs::write(
            src.join(format!("small/s{i:02}.txt")),
            format!("{i}").repeat(777),
        )
        .unwrap();
    }
    let total: u64 = 3 * (128 << 20);
    let out_dir = dir.path().join("received");
    let out = out_dir.to_str().unwrap();
    let send = |addr: &str| {
        let mut c = amst_spawn();
        c.args(["send", addr, "--quiet", "--streams", "4", "--psk-file"])
            .arg(&key)
            .arg(&src);
        c
    };

    let mut serve = Serve::start(&["--output", out, "--psk-file", key.to_str().unwrap()]);
    let mut first = send(&serve.addr)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while journaled_bytes(&out_dir) + landed_bytes(&out_dir) < total / 2 {
        assert!(Instant::now() < deadline, "half the tree never arrived");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first send ended before half the tree"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    let verified_at_kill = arrived_bytes(&out_dir);
    // A dead receiver's journals are final: blocks must be resumed whenever some file was
    // caught half-way with blocks journaled (64 MiB files may also land whole in between).
    let journaled_at_kill = journaled_bytes(&out_dir);
    assert!(
        verified_at_kill < total,
        "the receiver was killed before the tree was complete"
    );
    // The sender finds its receiver gone and stops with an error, on its own.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = first.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the sender did not notice its receiver was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "the first send cannot have succeeded");

    let serve = Serve::start(&["--output", out, "--psk-file", key.to_str().unwrap()]);
    let o = send(&serve.addr)
        .args(["--resume", "--json"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", stdout_of(&o), stderr_of(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tree = &v["tree"];
    let sent = tree["data_bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= total * 55 / 100,
        "second try sent {sent} of {total} (verified at the kill: {verified_at_kill})"
    );
    let resumed = tree["blocks_resumed"].as_u64().unwrap();
    assert!(
        resumed > 0 || journaled_at_kill == 0,
        "{resumed} blocks resumed, {journaled_at_kill} bytes journaled at the kill"
    );
    assert_eq!(tree["failed"], 0);
    assert!(
        v["end"]["streams"].as_u64().unwrap() > 0,
        "the report names the streams"
    );
    let got = out_dir.join("dataset");
    for i in 0..3 {
        let name = format!("big{i}.bin");
        assert_eq!(
            b3_file(&got.join(&name)),
            b3_file(&src.join(&name)),
            "{name}"
        );
    }
    for i in 0..50 {
        let name = format!("small/s{i:02}.txt");
        assert_eq!(
            b3_file(&got.join(&name)),
            b3_file(&src.join(&name)),
            "{name}"
        );
    }
    assert_eq!(journaled_bytes(&out_dir), 0, "no partial files are left");
}
