//! The memory budget holds against an authenticated but hostile peer. The receiver is a
//! separate process (this test binary re-run in a "server" role) so that its peak resident
//! memory, `VmHWM` in /proc/<pid>/status, is its own; the library's counters are not
//! consulted. The peer plays the protocol by hand with raw sockets and amst-core's codec, and
//! never reads what the receiver sends (acks, credit, Pongs).
//!
//! Each attack runs for as much as the receiver allows, and the receiver's peak must stay
//! within its budget plus a fixed allowance for the process itself:
//! - messages out of order (message 0 never comes), up to the whole credit window and then
//!   one past it, which must end the session with an error naming the credit;
//! - a flood of empty messages, out of order, up to the message credit and one past it;
//! - Pings with the largest padding, far more than the budget, while never reading the Pongs;
//! - one message announced at 1 GiB, which must be refused at once as over the largest
//!   message the budget holds (a quarter of it), naming both;
//! - 64 sessions at once, each sending out-of-order data until refused;
//! - twelve sessions each sending one large message (a quarter of the budget, the largest
//!   it takes) in order, as far as their credit goes: a head message is held whole, but only
//!   one receiver at a time may go past the budget for it, and by a quarter of it at most,
//!   so the bound there is the budget and one such message.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amst_core::codec::{
    ClientHandshake, DataChunk, Decoder, Frame, Limits, Ping, Psk, random_bytes,
};
use amst_core::{MemoryBudget, Transport};
use amst_tcp::{TcpConfig, TcpListener};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ROLE: &str = "AMST_MEMORY_BUDGET_ROLE";
/// The receiver's budget: small against the datacenter profile's 256 MiB window, so that a
/// receiver that ignored it would stand out.
const BUDGET: u64 = 64 << 20;
/// What the process may use besides the budget: runtime, stacks, allocator slack.
const PROCESS_ALLOWANCE: u64 = 48 << 20;
/// Every attack, and the whole test, ends within this.
const DEADLINE: Duration = Duration::from_secs(120);

fn psk() -> Psk {
    Psk::new(b"memory budget tests, 32 bytes!!!").unwrap()
}

/// The datacenter profile, whose window (256 MiB) is far over the budget.
fn config() -> TcpConfig {
    let mut c = TcpConfig::datacenter(psk())
        .with_streams(1)
        .with_memory_budget(MemoryBudget::new(BUDGET));
    c.min_streams = 1;
    c.adaptive = false;
    c
}

/// Not a test: the receiver process, which the tests below start themselves. It takes every
/// message it can and drops it at once, like a sink that keeps up.
#[test]
#[ignore = "server-process role for the memory budget tests, which start it themselves"]
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
        let l = TcpListener::bind("127.0.0.1:0".parse().unwrap(), config())
            .await
            .unwrap();
        println!("AMST_ADDR {}", l.local_addr());
        loop {
            let Ok(Ok(t)) = tokio::time::timeout(DEADLINE, l.accept()).await else {
                return;
            };
            tokio::spawn(async move {
                while let Ok(Some(_)) = t.recv().await {}
                // Dropping the transport aborts it at once: give its parting Close time to
                // reach the peer first.
                tokio::time::sleep(Duration::from_secs(3)).await;
            });
        }
    });
}

/// The receiver process, killed when dropped.
struct Receiver {
    child: Child,
    addr: SocketAddr,
}

impl Receiver {
    fn start() -> Receiver {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["server_role", "--exact", "--ignored", "--nocapture"])
            .env(ROLE, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the receiver printed its address")
                .unwrap();
            if let Some(a) = line.strip_prefix("AMST_ADDR ") {
                break a.parse().unwrap();
            }
        };
        Receiver { child, addr }
    }

    /// A `VmHWM` or `VmRSS` figure of the receiver, in bytes.
    fn status(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb << 10)
    }

    /// Fails the test if the receiver's peak grew past the budget and the allowance.
    fn check_peak(&self, baseline: u64, attack: &str) {
        let peak = self.status("VmHWM:");
        assert!(peak > 0, "{attack}: the receiver process is gone");
        let grown = peak.saturating_sub(baseline);
        println!(
            "{attack}: receiver VmHWM {} MiB, {} MiB over its idle peak (budget {} MiB)",
            peak >> 20,
            grown >> 20,
            BUDGET >> 20
        );
        assert!(
            grown <= BUDGET + PROCESS_ALLOWANCE,
            "{attack}: the receiver's peak grew by {} MiB, over its budget of {} MiB plus {} MiB",
            grown >> 20,
            BUDGET >> 20,
            PROCESS_ALLOWANCE >> 20
        );
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plays a client by hand through Hello, HelloAck and Auth, as a new session of one stream.
async fn authenticated(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (hs, hello) = ClientHandshake::new(psk(), random_bytes(), [0; 16], 0, 1, 0);
    s.write_all(&Frame::Hello(hello).to_bytes()).await.unwrap();
    let mut buf = BytesMut::with_capacity(512);
    let frame = loop {
        if let Some(f) = Decoder::default().decode(&mut buf).unwrap() {
            break f;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
            .await
            .expect("the receiver answers the Hello")
            .unwrap();
        assert!(n > 0, "the receiver hung up on the Hello");
    };
    let Frame::HelloAck(ack) = frame else {
        panic!("expected HelloAck, got {frame:?}");
    };
    let (proof, _) = hs
        .on_hello_ack(&ack)
        .expect("the receiver's proof verifies");
    s.write_all(&Frame::Auth(proof).to_bytes()).await.unwrap();
    s
}

/// Writes frames until the receiver stops taking them; returns how many went out.
async fn write_frames(s: &mut TcpStream, frames: impl Iterator<Item = Frame>) -> u64 {
    let mut sent = 0;
    let deadline = Instant::now() + DEADLINE;
    for f in frames {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.write_all(&f.to_bytes())).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    sent
}

/// Reads what the receiver sent (we ignored it until now) until it closes; returns the
/// reason of its Close, if one came.
async fn close_reason(s: &mut TcpStream) -> Option<String> {
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw)).await;
    let mut b = BytesMut::from(&raw[..]);
    let mut reason = None;
    while let Ok(Some(f)) = Decoder::default().decode(&mut b) {
        if let Frame::Close(c) = f {
            reason = Some(c.reason);
        }
    }
    reason
}

/// Single-chunk messages 1, 2, ... of `len` bytes each (message 0 never comes), up to
/// session offset `until`, then one more.
fn out_of_order(len: u64, until: u64) -> impl Iterator<Item = Frame> {
    let payload = Bytes::from(vec![0xa5; len as usize]);
    (1..=until / len)
        .map(move |id| Frame::Data(DataChunk::new(id * len, id, 0, len, payload.clone())))
}

/// A few attacks against one receiver process, one after the other, each a session of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_cannot_grow_the_receiver_past_its_budget() {
    let rx = Receiver::start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rx.status("VmHWM:");

    // Out-of-order messages up to the credit window and past it. A peer that never reads
    // learns no more than the first grant (the guaranteed minimum) and is refused early.
    let mut s = authenticated(rx.addr).await;
    let sent = write_frames(&mut s, out_of_order(1 << 20, BUDGET + (1 << 20))).await;
    let reason = close_reason(&mut s).await.unwrap_or_default();
    println!("out of order: {sent} MiB-messages went out; the receiver said {reason:?}");
    assert!(
        reason.contains("credit exceeded") && reason.contains("granted"),
        "the receiver must refuse data past its credit and name the limit: {reason:?}"
    );
    rx.check_peak(baseline, "out-of-order messages up to the credit");

    // Empty messages, out of order so that none can be delivered, up to the message credit
    // (one per KiB of the window) and past it.
    let mut s = authenticated(rx.addr).await;
    let ids = BUDGET / 1024;
    let flood = (1..ids)
        .rev()
        .chain([ids])
        .map(|id| Frame::Data(DataChunk::new(0, id, 0, 0, Bytes::new())));
    let sent = write_frames(&mut s, flood).await;
    let reason = close_reason(&mut s).await.unwrap_or_default();
    println!("empty messages: {sent} went out; the receiver said {reason:?}");
    assert!(
        reason.contains("message credit exceeded") && reason.contains("ids below"),
        "the receiver must refuse messages past its message credit and name it: {reason:?}"
    );
    rx.check_peak(baseline, "empty messages up to the message credit");

    // Pings with the most padding, 8 × the budget of them, never reading a Pong.
    let mut s = authenticated(rx.addr).await;
    let padding = Limits::default().max_ping_padding;
    let count = 8 * BUDGET / padding as u64;
    let pings = (0..count).map(|id| {
        Frame::Ping(Ping {
            id,
            timestamp_ns: 0,
            padding,
        })
    });
    let sent = write_frames(&mut s, pings).await;
    println!(
        "pings: {sent} of {count} with {padding} bytes of padding went out, none of the Pongs read"
    );
    assert_eq!(sent, count, "padded pings are within the protocol");
    rx.check_peak(baseline, "padded pings, Pongs never read");
    drop(s);

    // One message announced larger than the budget lets a receiver hold whole (a quarter of
    // it): the overdraft would have let it grow past the budget by the whole message (the
    // transport's own cap is 1 GiB). It is refused at its first chunk, with both limits.
    let mut s = authenticated(rx.addr).await;
    let len = 1 << 30;
    let first = Frame::Data(DataChunk::new(
        0,
        0,
        0,
        len,
        Bytes::from(vec![0x3c; 64 << 10]),
    ));
    write_frames(&mut s, std::iter::once(first)).await;
    let reason = close_reason(&mut s).await.unwrap_or_default();
    println!("a {} MiB message: the receiver said {reason:?}", len >> 20);
    assert!(
        reason.contains(&len.to_string())
            && reason.contains(&(BUDGET / 4).to_string())
            && reason.contains("largest message"),
        "the receiver must refuse a message over a quarter of its budget and name it: {reason:?}"
    );
    rx.check_peak(baseline, "one message far over the budget");
}

/// 64 sessions at once, each sending out-of-order data until refused: together they cannot
/// make the receiver hold more than one budget (plus each session's guaranteed minimum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_hostile_sessions_share_one_budget() {
    let rx = Receiver::start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rx.status("VmHWM:");
    let mut sessions = Vec::new();
    for _ in 0..64 {
        sessions.push(authenticated(rx.addr).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for s in sessions {
        tasks.spawn(async move {
            // These peers read what the receiver sends as it comes, so that its Close is
            // not lost when the connection is torn down under their writes.
            let (mut r, mut w) = s.into_split();
            let reading = tokio::spawn(async move {
                let mut raw = Vec::new();
                let _ = tokio::time::timeout(DEADLINE, r.read_to_end(&mut raw)).await;
                raw
            });
            let mut sent = 0u64;
            for f in out_of_order(256 << 10, BUDGET + (1 << 20)) {
                if w.write_all(&f.to_bytes()).await.is_err() {
                    break;
                }
                sent += 1;
            }
            drop(w);
            let raw = reading.await.unwrap();
            let mut b = BytesMut::from(&raw[..]);
            let mut reason = String::new();
            while let Ok(Some(f)) = Decoder::default().decode(&mut b) {
                if let Frame::Close(c) = f {
                    reason = c.reason;
                }
            }
            (sent, reason)
        });
    }
    let (mut total, mut refused) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (sent, reason) = r.unwrap();
        // Under load a session's parting Close can be cut off by its teardown; those that
        // arrive must name the credit.
        assert!(
            reason.is_empty() || reason.contains("credit exceeded"),
            "a session ended for another reason: {reason:?}"
        );
        refused += u64::from(!reason.is_empty());
        total += sent;
    }
    assert!(refused > 0, "no session was told why it ended");
    println!(
        "64 sessions: {} MiB of out-of-order messages went out in all",
        total / 4
    );
    // Each session may hold its guaranteed minimum (256 KiB) and a read buffer beyond the
    // budget; the goal is the budget plus 64 MiB.
    rx.check_peak(baseline, "64 sessions of out-of-order messages");
}

/// Twelve sessions each send one 16 MiB message in order, as far as their credit goes, and
/// stop short of its last chunk. A message is delivered whole, so a receiver must hold its
/// head message; but only one receiver at a time may go past the budget to do so (the
/// overdraft). Together they hold the budget and one message, not twelve messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_messages_held_in_order_take_the_budget_and_one_message_at_most() {
    const SESSIONS: usize = 12;
    const MESSAGE: u64 = 16 << 20;
    const CHUNK: u64 = 64 << 10;
    let rx = Receiver::start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rx.status("VmHWM:");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SESSIONS {
        let s = authenticated(rx.addr).await;
        tasks.spawn(async move {
            let (mut r, mut w) = s.into_split();
            let payload = Bytes::from(vec![0x5a; CHUNK as usize]);
            let (mut buf, mut limit, mut sent) = (BytesMut::new(), 0u64, 0u64);
            loop {
                while sent + CHUNK <= limit && sent + CHUNK < MESSAGE {
                    let chunk = DataChunk::new(sent, 0, sent, MESSAGE, payload.clone());
                    if w.write_all(&Frame::Data(chunk).to_bytes()).await.is_err() {
                        return (sent, r, w);
                    }
                    sent += CHUNK;
                }
                // No more credit within a second: the receiver holds this session there.
                match tokio::time::timeout(Duration::from_secs(1), r.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return (sent, r, w),
                }
                while let Ok(Some(f)) = Decoder::default().decode(&mut buf) {
                    if let Frame::Credit(c) = f {
                        limit = limit.max(c.limit);
                    }
                }
            }
        });
    }
    // Every session stays open until all have stopped, so that what they hold adds up.
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        held.push(r.unwrap());
    }
    let sent: Vec<u64> = held.iter().map(|(s, _, _)| s >> 10).collect();
    println!("KiB of its message each session could send: {sent:?}");
    assert!(
        sent.iter().any(|&s| s + (CHUNK >> 10) == MESSAGE >> 10),
        "one session must get its head message all but whole (the overdraft): {sent:?}"
    );
    let grown = rx.status("VmHWM:").saturating_sub(baseline);
    println!(
        "head messages: receiver VmHWM grew {} MiB (budget {} MiB, message {} MiB)",
        grown >> 20,
        BUDGET >> 20,
        MESSAGE >> 20
    );
    assert!(
        grown <= BUDGET + MESSAGE + PROCESS_ALLOWANCE,
        "the receiver's peak grew by {} MiB, over its budget of {} MiB, one message of {} MiB \
         and {} MiB",
        grown >> 20,
        BUDGET >> 20,
        MESSAGE >> 20,
        PROCESS_ALLOWANCE >> 20
    );
    drop(held);
}
