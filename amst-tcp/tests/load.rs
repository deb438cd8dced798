//! Load: 64 concurrent sessions × 1000 messages of seeded random sizes (0 to 64 KiB) against
//! one listener in a separate server process (this test binary re-run in a "server" role),
//! so that the server's RSS can be read on its own from /proc. Every message must arrive
//! exactly once, whole and in order per session, and the server's RSS must stay within a
//! bound derived from the configured windows.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use bytes::Bytes;

const ROLE: &str = "AMST_LOAD_ROLE";
const SESSIONS: u64 = 64;
const MESSAGES: u64 = 1000;
const MAX_MSG: usize = 64 << 10;
const STREAMS: usize = 2;
const WINDOW: u64 = 1 << 20;
const SEND_QUEUE: u64 = 1 << 20;
/// The whole test, server included, ends within this.
const DEADLINE: Duration = Duration::from_secs(120);

fn config() -> TcpConfig {
    let mut c = TcpConfig::datacenter(Psk::new(b"load test key, thirty-two bytes!").unwrap())
        .with_streams(STREAMS);
    c.min_streams = 1;
    c.adaptive = false;
    c.chunk_size = 64 << 10;
    c.receive_window = WINDOW;
    c.send_queue = SEND_QUEUE;
    c.max_message = MAX_MSG as u64;
    c
}

/// 1 MiB of deterministic bytes, the same in both processes.
fn pool() -> &'static Bytes {
    static POOL: OnceLock<Bytes> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut v = Vec::with_capacity(1 << 20);
        while v.len() < 1 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        Bytes::from(v)
    })
}

/// splitmix64: the seeded source of sizes and offsets.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Message `i` of session `s`: a size from 0 to 64 KiB, skewed small so that the total stays
/// moderate (about 250 MB) while both ends of the range occur, and bytes that differ per
/// message (a slice of the pool at a seeded offset).
fn message(s: u64, i: u64) -> Bytes {
    let r = mix((s << 32) | i);
    let len = if i.is_multiple_of(97) {
        MAX_MSG
    } else if i.is_multiple_of(89) {
        0
    } else {
        (r % (1 << ((r >> 59) % 17))) as usize
    };
    let pool = pool();
    let off = (mix(r) % (pool.len() - len) as u64) as usize;
    pool.slice(off..off + len)
}

fn rss_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// Not a test: the server process of `sixty_four_sessions_...`, which starts it.
#[test]
#[ignore = "server-process role for the load test, which starts it itself"]
fn server_role() {
    if std::env::var(ROLE).is_err() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        pool();
        let l = TcpListener::bind("127.0.0.1:0".parse().unwrap(), config())
            .await
            .unwrap();
        println!("AMST_ADDR {}", l.local_addr());
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..SESSIONS {
            let Ok(Ok(t)) = tokio::time::timeout(DEADLINE, l.accept()).await else {
                println!("AMST_FAIL accept timed out");
                return;
            };
            tasks.spawn(async move {
                // Message 0 names the session; then exactly MESSAGES, in order, then close.
                let first = t.recv().await.map_err(|e| format!("first: {e}"))?;
                let s = first
                    .as_deref()
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or("no session header")?;
                let mut bytes = 0u64;
                for i in 0..MESSAGES {
                    let m = t
                        .recv()
                        .await
                        .map_err(|e| format!("session {s} message {i}: {e}"))?
                        .ok_or(format!("session {s} closed after {i} messages"))?;
                    if m != message(s, i) {
                        return Err(format!("session {s} message {i} wrong ({} bytes)", m.len()));
                    }
                    bytes += m.len() as u64;
                }
                match t.recv().await {
                    Ok(None) => {}
                    other => return Err(format!("session {s}: extra after the last: {other:?}")),
                }
                Ok::<_, String>((s, bytes, t.buffer_stats().recv_peak))
            });
        }
        let mut seen = vec![false; SESSIONS as usize];
        let (mut total, mut peak) = (0u64, 0u64);
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok((s, bytes, p)) => {
                    if std::mem::replace(&mut seen[s as usize], true) {
                        println!("AMST_FAIL session {s} twice");
                    }
                    total += bytes;
                    peak = peak.max(p);
                }
                Err(e) => println!("AMST_FAIL {e}"),
            }
        }
        let ok = seen.iter().filter(|&&b| b).count();
        println!("AMST_DONE sessions={ok} bytes={total} recv_peak={peak}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_sessions_of_a_thousand_messages_arrive_exactly_once_in_bounded_memory() {
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "server_role",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "server")
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr: SocketAddr = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), line_rx.recv())
            .await
            .expect("the server never reported its address")
            .expect("the server exited early");
        if let Some(at) = line.find("AMST_ADDR ") {
            break line[at + 10..].trim().parse().unwrap();
        }
    };
    // The server is up, the pool made, nothing connected: its baseline.
    let baseline = rss_of(pid);
    let peak_rss = Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let peak = peak_rss.clone();
        tokio::spawn(async move {
            for _ in 0..(DEADLINE.as_millis() / 20) {
                peak.fetch_max(rss_of(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    pool();
    let mut clients = tokio::task::JoinSet::new();
    for s in 0..SESSIONS {
        clients.spawn(async move {
            let c = TcpTransport::connect(addr, config()).await?;
            c.send(Bytes::copy_from_slice(&s.to_le_bytes())).await?;
            let mut bytes = 0u64;
            for i in 0..MESSAGES {
                let m = message(s, i);
                bytes += m.len() as u64;
                c.send(m).await?;
            }
            c.close().await?;
            Ok::<_, amst_core::Error>(bytes)
        });
    }
    let mut sent = 0u64;
    let all = async {
        while let Some(r) = clients.join_next().await {
            sent += r.unwrap().expect("a client failed");
        }
    };
    tokio::time::timeout(DEADLINE, all)
        .await
        .expect("the clients did not finish in time");
    let done = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), line_rx.recv())
            .await
            .expect("the server did not report")
            .expect("the server exited without reporting");
        assert!(!line.contains("AMST_FAIL"), "server: {line}");
        if let Some(at) = line.find("AMST_DONE ") {
            break line[at + 10..].to_string();
        }
    };
    sampler.abort();
    let peak = peak_rss.load(std::sync::atomic::Ordering::Relaxed);
    let _ = child.kill();
    let _ = child.wait();
    let field = |name: &str| -> u64 {
        done.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap()
    };
    assert_eq!(field("sessions"), SESSIONS, "{done}");
    assert_eq!(field("bytes"), sent, "{done}");
    // Per session the receiver holds at most the credit window plus the head message.
    let recv_peak = field("recv_peak");
    assert!(recv_peak <= WINDOW + MAX_MSG as u64, "{done}");
    // The whole server: per session the window, the head message, a send queue's worth of
    // slack, and a 64 KiB read buffer per stream; plus 64 MiB for the runtime and the
    // allocator's own retention. Generous, but far below what unbounded buffering of the
    // ~250 MB sent would need.
    let per_session = WINDOW + MAX_MSG as u64 + SEND_QUEUE + STREAMS as u64 * (64 << 10);
    let bound = SESSIONS * per_session + (64 << 20);
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "load: {} MB in {:?}; server RSS baseline {} MiB, peak +{} MiB (bound {} MiB); {done}",
        sent / 1_000_000,
        started.elapsed(),
        baseline >> 20,
        grown >> 20,
        bound >> 20
    );
    assert!(
        grown <= bound,
        "server RSS grew by {} MiB, bound {} MiB",
        grown >> 20,
        bound >> 20
    );
    assert!(
        sent > 100_000_000,
        "the load was lighter than intended: {sent} bytes"
    );
}
