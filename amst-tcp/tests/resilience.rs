//! Fault injection against the real transport on 127.0.0.1: a peer process killed with
//! SIGKILL mid-transfer (the test binary re-runs itself as that peer, chosen by an
//! environment variable), every stream of a live session dropped at once, and a chunk
//! corrupted in flight by a frame-aware proxy.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amst_core::codec::{CloseCode, DataChunk, Decoder, Frame, Psk};
use amst_core::{Error, ProtocolError, Transport};
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use bytes::{Bytes, BytesMut};
use ring::digest::{Context, SHA256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Selects the child's role; unset in a normal test run.
const ROLE: &str = "AMST_RESILIENCE_ROLE";
/// The parent's listener, for the sending child.
const PEER: &str = "AMST_RESILIENCE_PEER";
/// A child never outlives this, even if its parent forgets it.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn psk() -> Psk {
    Psk::new(b"resilience tests, a 32-byte key!").unwrap()
}

fn config(streams: usize) -> TcpConfig {
    let mut c = TcpConfig::datacenter(psk()).with_streams(streams);
    c.min_streams = 1;
    c.adaptive = false;
    c.chunk_size = 128 << 10;
    c.receive_window = 8 << 20;
    c.send_queue = 8 << 20;
    c.reconnect_timeout = Duration::from_secs(3);
    c
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "amst_tcp=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Message `i`: `len` bytes that depend on `i`, cheap to make and to check.
fn message(i: u64, len: usize) -> Bytes {
    let seed = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
    let mut v = Vec::with_capacity(len);
    let mut x = seed | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

const MSG_LEN: usize = 256 << 10;

// ----- the child process -----

/// Not a test: the body of the child process the kill tests start. It does nothing unless
/// `AMST_RESILIENCE_ROLE` is set.
#[test]
#[ignore = "child-process role for the kill -9 tests, which start it themselves"]
fn child_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let work = async {
            match role.as_str() {
                "receiver" => {
                    let l = TcpListener::bind("127.0.0.1:0".parse().unwrap(), config(4))
                        .await
                        .unwrap();
                    println!("AMST_ADDR {}", l.local_addr());
                    let s = l.accept().await.unwrap();
                    while let Ok(Some(_)) = s.recv().await {}
                }
                "sender" => {
                    let addr: SocketAddr = std::env::var(PEER).unwrap().parse().unwrap();
                    let c = TcpTransport::connect(addr, config(4)).await.unwrap();
                    println!("AMST_CONNECTED");
                    for i in 0.. {
                        if c.send(message(i, MSG_LEN)).await.is_err() {
                            break;
                        }
                    }
                }
                other => panic!("unknown role {other}"),
            }
        };
        let _ = tokio::time::timeout(CHILD_LIFETIME, work).await;
    });
}

/// Kills the child on drop, so that a failing test leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this test binary as a child in `role`; returns it and its stdout lines.
fn spawn_child(
    role: &str,
    peer: Option<SocketAddr>,
) -> (
    ChildGuard,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_role",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, role)
    .env("RUST_LOG", "off")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(p) = peer {
        cmd.env(PEER, p.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap()).lines();
    (ChildGuard(child), out)
}

/// Waits (bounded) for a stdout line starting with `prefix`; returns the rest.
fn wait_line(
    lines: &mut std::io::Lines<BufReader<std::process::ChildStdout>>,
    prefix: &str,
) -> String {
    for line in lines.by_ref().take(100) {
        let line = line.unwrap();
        // libtest prints "test child_role ... " on the same line first.
        if let Some(at) = line.find(prefix) {
            return line[at + prefix.len()..].trim().to_string();
        }
    }
    panic!("the child never printed {prefix}");
}

fn sigkill(child: &mut ChildGuard) -> Instant {
    child.0.kill().unwrap();
    let t = Instant::now();
    child.0.wait().unwrap();
    t
}

/// A session-ending error that says the peer is gone, as opposed to a local misuse.
fn is_clear_peer_loss(e: &Error) -> bool {
    matches!(
        e,
        Error::PeerClosed { .. } | Error::Timeout { .. } | Error::Io { .. }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_receiving_process_gives_the_sender_a_clear_error_in_time() {
    init_tracing();
    let (mut child, mut lines) = spawn_child("receiver", None);
    let addr: SocketAddr = tokio::task::block_in_place(|| wait_line(&mut lines, "AMST_ADDR "))
        .parse()
        .unwrap();
    let cfg = config(4);
    let limit = cfg.reconnect_timeout;
    let client = Arc::new(TcpTransport::connect(addr, cfg).await.unwrap());
    let sender = {
        let c = client.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            for i in 0.. {
                if let Err(e) = c.send(message(i, MSG_LEN)).await {
                    return (e, Instant::now());
                }
                assert!(start.elapsed() < CHILD_LIFETIME, "sending never failed");
            }
            unreachable!()
        })
    };
    // Mid-transfer: 32 MiB acknowledged by the child.
    let start = Instant::now();
    while client.metrics().messages_acked < 128 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "transfer did not start"
        );
        assert!(!sender.is_finished(), "sending failed before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = sigkill(&mut child);
    let (err, at) = tokio::time::timeout(limit + Duration::from_secs(5), sender)
        .await
        .expect("the sender hung after its peer was killed")
        .unwrap();
    let after = at.saturating_duration_since(killed);
    assert!(is_clear_peer_loss(&err), "unclear error: {err:?}");
    assert!(
        after <= limit + Duration::from_secs(2),
        "the error came {after:?} after the kill; the limit is {limit:?}"
    );
    // Every later call reports it at once.
    let again = tokio::time::timeout(Duration::from_secs(1), client.flush())
        .await
        .expect("flush hung on a dead session")
        .unwrap_err();
    assert!(is_clear_peer_loss(&again), "{again:?}");
    eprintln!("sender saw after {after:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sending_process_gives_the_receiver_a_clear_error_in_time() {
    init_tracing();
    let cfg = config(4);
    let limit = cfg.reconnect_timeout;
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let (mut child, mut lines) = spawn_child("sender", Some(listener.local_addr()));
    tokio::task::block_in_place(|| wait_line(&mut lines, "AMST_CONNECTED"));
    let server = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    // Every message delivered is whole and right, before and after the kill.
    let mut i = 0u64;
    let mut killed = None;
    let err = loop {
        let r = tokio::time::timeout(limit + Duration::from_secs(5), server.recv())
            .await
            .expect("the receiver hung after its peer was killed");
        match r {
            Ok(Some(m)) => {
                assert!(m == message(i, MSG_LEN), "message {i} corrupted");
                i += 1;
                if i == 64 {
                    killed = Some(sigkill(&mut child));
                }
            }
            Ok(None) => panic!("a killed peer looked like a graceful close"),
            Err(e) => break e,
        }
    };
    let killed = killed.expect("the session failed before the kill");
    let after = killed.elapsed();
    assert!(
        matches!(err, Error::Timeout { after: a, .. } if a == limit),
        "expected the reconnect timeout, got {err:?}"
    );
    assert!(after <= limit + Duration::from_secs(2), "{after:?}");
    eprintln!("receiver got {i} whole messages, then after {after:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_receiving_process_gives_the_sender_an_error_in_time() {
    init_tracing();
    let (child, mut lines) = spawn_child("receiver", None);
    let addr: SocketAddr = tokio::task::block_in_place(|| wait_line(&mut lines, "AMST_ADDR "))
        .parse()
        .unwrap();
    let mut cfg = config(4);
    cfg.idle_timeout = Duration::from_secs(2);
    let limit = cfg.idle_timeout;
    let client = Arc::new(TcpTransport::connect(addr, cfg).await.unwrap());
    while client.metrics().messages_acked < 16 {
        client.send(message(0, MSG_LEN)).await.unwrap();
    }
    // The child stops; its kernel keeps acknowledging TCP until its buffers fill.
    // SAFETY: signalling our own child, by the pid we spawned.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGSTOP) };
    let frozen = Instant::now();
    let c = client.clone();
    let stuck = tokio::time::timeout(limit + Duration::from_secs(10), async move {
        let mut i = 1;
        loop {
            if let Err(e) = c.send(message(i, MSG_LEN)).await {
                return e;
            }
            i += 1;
        }
    })
    .await;
    let after = frozen.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGCONT) };
    drop(child);
    let err = stuck.expect("send blocked on a frozen peer with no error");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(
        after <= limit + Duration::from_secs(3),
        "{after:?} for a limit of {limit:?}"
    );
    eprintln!("frozen peer: sender failed after {after:?}: {err}");
}

// ----- all streams at once -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_stream_at_once_reconnects_and_completes() {
    init_tracing();
    let streams = 4;
    let (client, server) = common::pair(config(streams), config(streams)).await;
    let (client, server) = (Arc::new(client), Arc::new(server));
    let count = 512u64; // 128 MiB
    let rx = {
        let s = server.clone();
        tokio::spawn(async move {
            let mut ctx = Context::new(&SHA256);
            let mut n = 0u64;
            while let Some(m) = s.recv().await.unwrap() {
                ctx.update(&m);
                n += 1;
            }
            (n, ctx.finish().as_ref().to_vec())
        })
    };
    let tx = {
        let c = client.clone();
        tokio::spawn(async move {
            let mut ctx = Context::new(&SHA256);
            for i in 0..count {
                let m = message(i, MSG_LEN);
                ctx.update(&m);
                c.send(m).await.unwrap();
            }
            c.flush().await.unwrap();
            ctx.finish().as_ref().to_vec()
        })
    };
    // First every client-side stream, then (once all are back) every server-side one.
    let fault = |at: u64| {
        let s = server.clone();
        async move {
            let start = Instant::now();
            while s.metrics().messages_received < at {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "stuck before the fault"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    fault(count / 4).await;
    assert_eq!(client.fault_shutdown_streams(usize::MAX), streams);
    common::all_streams(&client, streams).await;
    fault(count / 2).await;
    common::all_streams(&server, streams).await;
    assert_eq!(server.fault_shutdown_streams(usize::MAX), streams);
    let sent = tokio::time::timeout(Duration::from_secs(60), tx)
        .await
        .expect("the transfer did not complete after the faults")
        .unwrap();
    common::all_streams(&client, streams).await;
    Arc::into_inner(client).unwrap().close().await.unwrap();
    let (n, got) = rx.await.unwrap();
    assert_eq!(n, count, "messages lost or duplicated");
    assert_eq!(got, sent, "SHA-256 differs after dropping every stream");
    assert_eq!(server.buffer_stats().recv_buffered, 0);
}

// ----- corruption -----

/// A one-connection proxy that passes the handshake through untouched, then decodes the
/// client's frames and flips one payload byte of Data frame number `corrupt` while keeping
/// its CRC, as a faulty NIC or middlebox would.
/// A proxy that flips one bit in the Data chunk of message `msg_id` at `msg_offset` (the
/// first chunk to start there), and forwards everything else as it came.
async fn corrupting_proxy(upstream: SocketAddr, msg_id: u64, msg_offset: u64) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let server = TcpStream::connect(upstream).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
            let _ = cw.shutdown().await;
        });
        let decoder = Decoder::default();
        let mut buf = BytesMut::with_capacity(1 << 20);
        let mut corrupted = false;
        loop {
            while let Ok(Some(f)) = decoder.decode(&mut buf) {
                let f = match f {
                    Frame::Data(c) => {
                        if !corrupted && c.msg_id == msg_id && c.msg_offset == msg_offset {
                            corrupted = true;
                            let mut p = c.payload.to_vec();
                            let at = p.len() / 2;
                            p[at] ^= 0x01;
                            Frame::Data(DataChunk {
                                payload: Bytes::from(p),
                                ..c
                            })
                        } else {
                            Frame::Data(c)
                        }
                    }
                    other => other,
                };
                if sw.write_all(&f.to_bytes()).await.is_err() {
                    return;
                }
            }
            buf.reserve(256 << 10);
            match cr.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = sw.shutdown().await;
                    return;
                }
                Ok(_) => {}
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_is_detected_and_never_delivered() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), config(1))
        .await
        .unwrap();
    // Messages of 4 chunks each; the 3rd chunk of message 2 is corrupted.
    let len = 4 * config(1).chunk_size;
    let proxy = corrupting_proxy(listener.local_addr(), 2, 2 * (len as u64 / 4)).await;
    let client = TcpTransport::connect(proxy, config(1)).await.unwrap();
    let server = listener.accept().await.unwrap();
    let tx = tokio::spawn(async move {
        for i in 0..8 {
            if let Err(e) = client.send(message(i, len)).await {
                return e;
            }
        }
        client.flush().await.unwrap_err()
    });
    let mut delivered = 0u64;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), server.recv())
            .await
            .expect("the receiver hung on a corrupt chunk")
        {
            Ok(Some(m)) => {
                assert!(
                    m == message(delivered, len),
                    "message {delivered} delivered corrupted"
                );
                delivered += 1;
            }
            Ok(None) => panic!("corruption ended the session as if it were a clean close"),
            Err(e) => break e,
        }
    };
    match err {
        Error::Protocol(ProtocolError::ChunkCorrupt {
            msg_id,
            msg_offset,
            expected,
            actual,
        }) => {
            assert_eq!((msg_id, msg_offset), (2, 2 * (len as u64 / 4)));
            assert_ne!(expected, actual);
        }
        other => panic!("expected ChunkCorrupt, got {other:?}"),
    }
    assert!(
        delivered <= 2,
        "messages after the corrupt one were delivered"
    );
    assert_eq!(server.metrics().messages_received, delivered);
    // The sender hears why.
    let sender_err = tokio::time::timeout(Duration::from_secs(10), tx)
        .await
        .expect("the sender hung")
        .unwrap();
    match sender_err {
        Error::PeerClosed {
            code: CloseCode::Corrupt,
            reason,
        } => assert!(reason.contains("corrupt chunk: message 2"), "{reason}"),
        other => panic!("expected PeerClosed(Corrupt), got {other:?}"),
    }
}
