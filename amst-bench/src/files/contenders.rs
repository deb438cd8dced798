//! The contenders of the `files` scenario, each driven as its user would: `amst send` to
//! `amst serve --output`, rsync to an rsync daemon, `tar | nc` into `nc -l | tar -x`, and,
//! for the ceilings, amst-tcp's blast loop (the transport: memory to memory, in this process)
//! and `cp -a` (the file system: a local copy, on loopback workloads).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_linkem::LinkEm;
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use bytes::Bytes;

use super::procs::{Proc, free_port, read_json, wait_all, wait_listening};

/// The key `amst send` and `amst serve` share, through `AMST_PSK` as a user would set it.
pub(super) const PSK: &str = "amst files benchmark key, loopback and test namespaces only";
/// How long a server may take to start listening.
const LISTEN_WITHIN: Duration = Duration::from_secs(10);

/// Where a transfer runs: over loopback, or across the emulated link (sender in its left
/// namespace, receiver in its right).
#[derive(Clone, Copy, Debug)]
pub enum Place<'a> {
    /// Both ends on 127.0.0.1.
    Loopback,
    /// Sender on the left of the link, receiver on the right.
    Link(&'a LinkEm),
}

impl Place<'_> {
    /// The receiver's address.
    pub fn server_ip(&self) -> IpAddr {
        match self {
            Place::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Place::Link(l) => IpAddr::V4(l.right().addr()),
        }
    }

    fn sender(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Place::Loopback => Command::new(program),
            Place::Link(l) => l.left().command(program),
        }
    }

    fn receiver(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Place::Loopback => Command::new(program),
            Place::Link(l) => l.right().command(program),
        }
    }
}

/// The parent directory and the name of `src`: every contender sends the entry by its name,
/// so that each lands at `dst/<name>`.
fn split(src: &Path) -> Result<(&Path, &std::ffi::OsStr), String> {
    match (src.parent(), src.file_name()) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => Err(format!("{} has no parent directory", src.display())),
    }
}

/// What one `amst send` run took, and what its `--json` report said.
#[derive(Debug)]
pub struct AmstRun {
    /// From starting `amst send` until it and `amst serve --max-sessions 1` had both exited.
    pub elapsed: Duration,
    /// The most streams the report's intervals show.
    pub streams: Option<usize>,
    /// File data bytes on the wire (`tree.data_bytes_sent`).
    pub data_bytes_sent: Option<u64>,
}

/// `amst serve --output dst --max-sessions 1`, then `amst send PEER src --json`, timed until
/// both have exited: the server exits once the one session is stored.
pub fn amst_once(
    amst: &Path,
    place: Place<'_>,
    src: &Path,
    dst: &Path,
    work: &Path,
    within: Duration,
) -> Result<AmstRun, String> {
    let port = free_port()?;
    let peer = SocketAddr::new(place.server_ip(), port).to_string();
    let mut serve = place.receiver(amst);
    serve
        .args([
            "serve",
            "--listen",
            &peer,
            "--max-sessions",
            "1",
            "-q",
            "--output",
        ])
        .arg(dst)
        .env("AMST_PSK", PSK);
    let mut server = Proc::start("amst serve", serve, work, None, None)?;
    wait_listening(&mut server, port, LISTEN_WITHIN)?;
    let report = work.join("amst-send.json");
    let out = std::fs::File::create(&report).map_err(|e| format!("{}: {e}", report.display()))?;
    let mut send = place.sender(amst);
    send.args(["send", "--json", &peer])
        .arg(src)
        .env("AMST_PSK", PSK);
    let start = Instant::now();
    let sender = Proc::start("amst send", send, work, None, Some(Stdio::from(out)))?;
    let mut procs = [sender, server];
    wait_all(&mut procs, start + within)?;
    let elapsed = start.elapsed();
    let json = read_json(&report).unwrap_or_default();
    let streams = json["intervals"].as_array().and_then(|iv| {
        iv.iter()
            .filter_map(|i| i["streams"].as_u64())
            .max()
            .map(|s| s as usize)
    });
    Ok(AmstRun {
        elapsed,
        streams,
        data_bytes_sent: json["tree"]["data_bytes_sent"].as_u64(),
    })
}

/// An rsync daemon serving module `dst` (read-write) from one directory, for one workload.
#[derive(Debug)]
pub struct RsyncDaemon {
    proc: Proc,
    url: String,
}

impl RsyncDaemon {
    /// Starts `rsync --daemon --no-detach` on the receiver's side, writing as the owner of
    /// `dst` (a root daemon would otherwise write as nobody).
    pub fn start(place: Place<'_>, dst: &Path, work: &Path) -> Result<RsyncDaemon, String> {
        let owner = std::fs::metadata(dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        let config = work.join("rsyncd.conf");
        let text = format!(
            "use chroot = no\nlog file = {}\n[dst]\npath = {}\nread only = no\nuid = {}\ngid = {}\n",
            work.join("rsyncd.log").display(),
            dst.display(),
            owner.uid(),
            owner.gid()
        );
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        let port = free_port()?;
        let ip = place.server_ip();
        let mut cmd = place.receiver("rsync");
        cmd.args(["--daemon", "--no-detach", "--config"])
            .arg(&config)
            .args(["--address", &ip.to_string(), "--port", &port.to_string()]);
        let mut proc = Proc::start("rsync daemon", cmd, work, None, None)?;
        wait_listening(&mut proc, port, LISTEN_WITHIN)?;
        Ok(RsyncDaemon {
            proc,
            url: format!("rsync://{}/dst/", SocketAddr::new(ip, port)),
        })
    }

    /// `rsync FLAGS src rsync://…/dst/`, timed until the client exits (after the daemon
    /// confirmed the last file).
    pub fn send(
        &mut self,
        place: Place<'_>,
        flags: &[&str],
        src: &Path,
        work: &Path,
        within: Duration,
    ) -> Result<Duration, String> {
        if let Ok(Some(status)) = self.proc.child.try_wait() {
            return Err(format!(
                "the rsync daemon exited ({status}): {}",
                self.proc.log_tail()
            ));
        }
        let mut cmd = place.sender("rsync");
        cmd.args(flags).arg(src).arg(&self.url);
        let start = Instant::now();
        let mut procs = [Proc::start("rsync", cmd, work, None, None)?];
        wait_all(&mut procs, start + within)?;
        Ok(start.elapsed())
    }
}

/// `nc -l | tar -x -C dst` on the receiver, then `tar -c src | nc -N`, timed until all four
/// have exited (the receiving tar last, once it wrote everything). netcat-openbsd's `nc`
/// (`nc.openbsd`): `-N` shuts the socket down at the end of input, so the receiver sees EOF.
pub fn tar_nc_once(
    place: Place<'_>,
    tar_flags: &[&str],
    src: &Path,
    dst: &Path,
    work: &Path,
    within: Duration,
) -> Result<Duration, String> {
    let (parent, name) = split(src)?;
    let port = free_port()?.to_string();
    let ip = place.server_ip().to_string();
    let mut listen = place.receiver("nc.openbsd");
    listen.args(["-l", &ip, &port]);
    let mut nc_in = Proc::start("nc -l", listen, work, None, Some(Stdio::piped()))?;
    let piped = nc_in.child.stdout.take().ok_or("nc -l has no stdout")?;
    let mut untar = place.receiver("tar");
    untar.args(["-x", "-f", "-", "-C"]).arg(dst);
    let tar_x = Proc::start("tar -x", untar, work, Some(Stdio::from(piped)), None)?;
    wait_listening(&mut nc_in, port.parse().unwrap_or(0), LISTEN_WITHIN)?;
    let mut tar = place.sender("tar");
    tar.args(tar_flags)
        .args(["-c", "-f", "-", "-C"])
        .arg(parent)
        .arg(name);
    let start = Instant::now();
    let mut tar_c = Proc::start("tar -c", tar, work, None, Some(Stdio::piped()))?;
    let piped = tar_c.child.stdout.take().ok_or("tar -c has no stdout")?;
    let mut connect = place.sender("nc.openbsd");
    connect.args(["-N", &ip, &port]);
    let nc_out = Proc::start("nc -N", connect, work, Some(Stdio::from(piped)), None)?;
    let mut procs = [tar_c, nc_out, nc_in, tar_x];
    wait_all(&mut procs, start + within)?;
    Ok(start.elapsed())
}

/// `cp -a src dst/` on this host: no network, no checksum; the pace the file system itself
/// allows in this round (on a VM whose host backs guest memory lazily, a 4 GiB copy between
/// two tmpfs files has taken 3.5 s in one minute and 21 s in the next).
pub fn cp_once(src: &Path, dst: &Path, work: &Path, within: Duration) -> Result<Duration, String> {
    let mut cmd = Command::new("cp");
    cmd.arg("-a").arg(src).arg(dst);
    let start = Instant::now();
    let mut procs = [Proc::start("cp -a", cmd, work, None, None)?];
    wait_all(&mut procs, start + within)?;
    Ok(start.elapsed())
}

/// amst-tcp's blast example in this process: `bytes` from memory to memory over loopback on
/// `streams` streams (datacenter profile, no tuning), timed from the first send to the
/// flush, as the example times it. The transport's ceiling for a file path.
pub fn blast_once(streams: usize, bytes: u64) -> Result<Duration, String> {
    const MESSAGE: usize = 4 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let psk = Psk::new(PSK.as_bytes()).map_err(|e| e.to_string())?;
        let mut config = TcpConfig::datacenter(psk).with_streams(streams);
        config.min_streams = 1;
        config.adaptive = false;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0).into(), config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr();
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let server = tokio::spawn(async move {
            let s = listener.accept().await.map_err(|e| e.to_string())?;
            while let Ok(Some(m)) = s.recv().await {
                counter.fetch_add(m.len() as u64, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        });
        let client = TcpTransport::connect(addr, config)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let data = Bytes::from(vec![0x5a_u8; MESSAGE]);
        let start = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let n = (bytes - sent).min(MESSAGE as u64) as usize;
            client
                .send(data.slice(..n))
                .await
                .map_err(|e| e.to_string())?;
            sent += n as u64;
        }
        client.flush().await.map_err(|e| e.to_string())?;
        let elapsed = start.elapsed();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        let got = received.load(Ordering::Relaxed);
        if got != bytes {
            return Err(format!("the receiver counted {got} of {bytes} bytes"));
        }
        Ok(elapsed)
    })
}
