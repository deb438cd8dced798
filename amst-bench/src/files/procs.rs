//! Child processes with deadlines: the contenders of the `files` scenario are programs (amst,
//! rsync, tar, nc), started here, waited for together, and killed (by their own handles)
//! when one fails or the deadline passes.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started program, with the file its stderr goes to.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages: `amst serve`, `rsync`, …
    pub name: String,
    /// The process.
    pub child: Child,
    /// Where its stderr (and, unless captured, stdout) goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin from `/dev/null` unless set, and stderr (and stdout unless
    /// `stdout` is given) to `log_dir/<tag>.log`.
    pub fn start(
        name: &str,
        mut cmd: Command,
        log_dir: &Path,
        stdin: Option<Stdio>,
        stdout: Option<Stdio>,
    ) -> Result<Proc, String> {
        let tag: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let log = log_dir.join(format!("{tag}.log"));
        let err = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let out = match stdout {
            Some(s) => s,
            None => Stdio::from(err.try_clone().map_err(|e| e.to_string())?),
        };
        cmd.stdin(stdin.unwrap_or_else(Stdio::null))
            .stdout(out)
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .map_err(|e| format!("could not start {name}: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// The last lines of its log, for an error message.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Ends it if it still runs.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last three non-empty lines of a log file, joined.
pub fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}

/// Waits until every process has exited successfully. A process that fails, or the
/// deadline, ends the others (a receiver waits forever for a sender that died) and returns
/// the reason with the failing process's output.
pub fn wait_all(procs: &mut [Proc], deadline: Instant) -> Result<(), String> {
    let mut done = vec![false; procs.len()];
    loop {
        for (i, p) in procs.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match p.child.try_wait() {
                Ok(Some(status)) if status.success() => done[i] = true,
                Ok(Some(status)) => {
                    let why = format!("{} failed ({status}): {}", p.name, p.log_tail());
                    procs.iter_mut().for_each(Proc::kill);
                    return Err(why);
                }
                Ok(None) => {}
                Err(e) => {
                    let why = format!("waiting for {}: {e}", p.name);
                    procs.iter_mut().for_each(Proc::kill);
                    return Err(why);
                }
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let late: Vec<&str> = procs
                .iter()
                .zip(&done)
                .filter(|(_, d)| !**d)
                .map(|(p, _)| p.name.as_str())
                .collect();
            let why = format!("{} still running at the deadline", late.join(", "));
            procs.iter_mut().for_each(Proc::kill);
            return Err(why);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until a TCP socket listens on `port` in `p`'s network namespace, read from
/// `/proc/PID/net/tcp{,6}` (connecting to test it would use up `nc -l`'s one connection).
pub fn wait_listening(p: &mut Proc, port: u16, within: Duration) -> Result<(), String> {
    let until = Instant::now() + within;
    let want = format!(":{port:04X}");
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            return Err(format!(
                "{} exited ({status}) before listening: {}",
                p.name,
                p.log_tail()
            ));
        }
        for table in ["tcp", "tcp6"] {
            let path = format!("/proc/{}/net/{table}", p.child.id());
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let listening = text.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
            });
            if listening {
                return Ok(());
            }
        }
        if Instant::now() >= until {
            return Err(format!(
                "{} did not listen on port {port} within {} s: {}",
                p.name,
                within.as_secs(),
                p.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `amst serve ARGS` on a free loopback port with `psk` in `AMST_PSK`, once it listens; with
/// the address to give `amst send`.
pub fn amst_serve(
    amst: &Path,
    args: &[&std::ffi::OsStr],
    psk: &str,
    work: &Path,
) -> Result<(Proc, String), String> {
    let port = free_port()?;
    let peer = format!("127.0.0.1:{port}");
    let mut serve = Command::new(amst);
    serve
        .args(["serve", "--listen", &peer])
        .args(args)
        .env("AMST_PSK", psk);
    let mut server = Proc::start("amst serve", serve, work, None, None)?;
    wait_listening(&mut server, port, Duration::from_secs(10))?;
    Ok((server, peer))
}

/// Runs `cmd` (a `--json` command) to completion within `within`, its stdout to `report`,
/// and returns what it printed as JSON.
pub fn run_json(
    name: &str,
    cmd: Command,
    work: &Path,
    report: &Path,
    within: Duration,
) -> Result<serde_json::Value, String> {
    let out = File::create(report).map_err(|e| format!("{}: {e}", report.display()))?;
    let p = Proc::start(name, cmd, work, Some(Stdio::null()), Some(Stdio::from(out)))?;
    wait_all(&mut [p], Instant::now() + within)?;
    read_json(report).ok_or_else(|| format!("{name}: {} is not JSON", report.display()))
}

/// A JSON file's contents, if it holds JSON.
pub fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// A port no socket on this host uses right now.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Whether `program --version` (or `-h`) runs and its output mentions `expect`.
pub fn tool_present(program: &str, arg: &str, expect: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.contains(expect)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_process_ends_the_others_and_is_named_with_its_output() {
        let dir = std::env::temp_dir().join(format!("amst-bench-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut failing = Command::new("sh");
        failing.args(["-c", "echo no such module >&2; exit 3"]);
        let mut procs = vec![
            Proc::start("sleeper", sleeper, &dir, None, None).unwrap(),
            Proc::start("rsync", failing, &dir, None, None).unwrap(),
        ];
        let began = Instant::now();
        let err = wait_all(&mut procs, Instant::now() + Duration::from_secs(20)).unwrap_err();
        assert!(
            err.starts_with("rsync failed") && err.contains("no such module"),
            "{err}"
        );
        assert!(began.elapsed() < Duration::from_secs(10));
        assert!(
            procs[0].child.try_wait().unwrap().is_some(),
            "sleeper ended"
        );

        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut procs = vec![Proc::start("tar", sleeper, &dir, None, None).unwrap()];
        let err = wait_all(&mut procs, Instant::now() + Duration::from_millis(100)).unwrap_err();
        assert_eq!(err, "tar still running at the deadline");

        let mut ok = Command::new("true");
        ok.arg("x");
        let mut procs = vec![Proc::start("true", ok, &dir, None, None).unwrap()];
        wait_all(&mut procs, Instant::now() + Duration::from_secs(10)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sees_a_listener_in_its_own_namespace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("amst-bench-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut p = Proc::start("sleeper", sleeper, &dir, None, None).unwrap();
        wait_listening(&mut p, port, Duration::from_secs(5)).unwrap();
        drop(listener);
        let err = wait_listening(&mut p, port, Duration::from_millis(50)).unwrap_err();
        assert!(err.contains("did not listen"), "{err}");
        p.kill();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
