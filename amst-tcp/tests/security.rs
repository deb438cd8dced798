//! Security tests against the real transport on 127.0.0.1: misbehaving peers are played with
//! raw sockets and amst-core's codec, good clients with `TcpTransport`.
//!
//! What is checked: a wrong key is refused while a good client keeps transferring; nothing
//! before the proof makes the server hold more than a Hello; half-open connections time out
//! and give their descriptors back; the caps on streams, sessions and message size answer
//! with an error that names the limit; a stream cannot join a session without the key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amst_core::codec::{
    AuthProof, ClientHandshake, Close, CloseCode, DataChunk, Decoder, Established, Frame, Psk,
    random_bytes,
};
use amst_core::{Error, ProtocolError, Transport};
use amst_tcp::{TcpConfig, TcpListener, TcpTransport};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn psk() -> Psk {
    Psk::new(b"security tests: 32 bytes of key!").unwrap()
}

fn wrong_psk() -> Psk {
    Psk::new(b"security tests: not the real key").unwrap()
}

/// One or a few fixed streams, small windows, no adaptation: a test measures what it names.
fn config(streams: usize) -> TcpConfig {
    let mut c = TcpConfig::datacenter(psk()).with_streams(streams);
    c.min_streams = 1;
    c.adaptive = false;
    c.chunk_size = 64 << 10;
    c.receive_window = 4 << 20;
    c.send_queue = 4 << 20;
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

async fn bind(cfg: TcpConfig) -> (Arc<TcpListener>, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let addr = l.local_addr();
    (Arc::new(l), addr)
}

/// Reads frames until the server hangs up (or `limit` passes); returns them and how long it
/// took. `None` for the time means the connection was still open at the limit.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<Frame>, Option<Duration>) {
    let start = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(start.elapsed()),
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Err(_) => break None,
        }
    };
    let mut b = BytesMut::from(&raw[..]);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = Decoder::default().decode(&mut b) {
        frames.push(f);
    }
    (frames, closed)
}

fn close_of(frames: &[Frame]) -> Option<&Close> {
    frames.iter().find_map(|f| match f {
        Frame::Close(c) => Some(c),
        _ => None,
    })
}

/// Plays a client by hand: Hello, HelloAck, Auth. Returns the socket, what was agreed and
/// any bytes read past the HelloAck.
async fn raw_handshake(
    addr: SocketAddr,
    key: Psk,
    session: [u8; 16],
    index: u16,
    count: u16,
) -> Result<(TcpStream, Established, BytesMut), Frame> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (hs, hello) = ClientHandshake::new(key, random_bytes(), session, index, count, 0);
    s.write_all(&Frame::Hello(hello).to_bytes()).await.unwrap();
    let mut buf = BytesMut::with_capacity(512);
    let frame = loop {
        if let Some(f) = Decoder::default().decode(&mut buf).unwrap() {
            break f;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .expect("the server did not answer the Hello")
            .unwrap();
        assert!(n > 0, "the server hung up without answering the Hello");
    };
    let Frame::HelloAck(ack) = frame else {
        return Err(frame);
    };
    let (proof, est) = hs
        .on_hello_ack(&ack)
        .expect("the server's proof must verify");
    s.write_all(&Frame::Auth(proof).to_bytes()).await.unwrap();
    Ok((s, est, buf))
}

/// This process's open descriptors.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn is_auth_failed(e: &Error) -> bool {
    matches!(e, Error::Protocol(ProtocolError::AuthFailed))
        || matches!(
            e,
            Error::PeerClosed {
                code: CloseCode::AuthFailed,
                ..
            }
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_are_dropped_while_a_good_client_keeps_transferring() {
    init_tracing();
    let (listener, addr) = bind(config(2)).await;
    let server = {
        let l = listener.clone();
        tokio::spawn(async move {
            let s = l.accept().await.unwrap();
            let mut n = 0u64;
            let mut sum = 0u64;
            while let Some(m) = s.recv().await.unwrap() {
                assert_eq!(m.len(), 32 << 10);
                assert!(
                    m.iter().all(|&b| b == (n % 251) as u8),
                    "message {n} mangled"
                );
                sum += m.len() as u64;
                n += 1;
            }
            (n, sum)
        })
    };
    let good = Arc::new(TcpTransport::connect(addr, config(2)).await.unwrap());
    let sender = {
        let good = good.clone();
        tokio::spawn(async move {
            for i in 0..400u64 {
                good.send(Bytes::from(vec![(i % 251) as u8; 32 << 10]))
                    .await
                    .unwrap();
                if i.is_multiple_of(50) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            good.flush().await.unwrap();
        })
    };
    // Meanwhile, a stream of impostors: each is refused with a clear AuthFailed.
    let mut bad = config(1);
    bad.psk = wrong_psk();
    for _ in 0..20 {
        let err = TcpTransport::connect(addr, bad.clone()).await.unwrap_err();
        assert!(is_auth_failed(&err), "expected AuthFailed, got {err}");
    }
    sender.await.unwrap();
    Arc::into_inner(good).unwrap().close().await.unwrap();
    let (n, sum) = server.await.unwrap();
    assert_eq!((n, sum), (400, 400 * (32 << 10)));
    // No impostor got a session.
    let extra = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(extra.is_err(), "a wrong-key client got a session");
}

/// A frame header that announces a 4 MiB Data body before any Hello. The server must not
/// wait for (or buffer) that body: only a Hello is acceptable here.
fn huge_data_header() -> [u8; 5] {
    let body = (4u32 << 20) + 40;
    let b = body.to_be_bytes();
    [0x10, b[0], b[1], b[2], b[3]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_frame_announced_before_auth_is_dropped_within_the_handshake_timeout() {
    init_tracing();
    let mut cfg = config(1);
    cfg.handshake_timeout = Duration::from_millis(800);
    let (listener, addr) = bind(cfg).await;
    // A Hello that claims a body of 4 GiB fails from its header alone.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x01, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let (frames, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let t = closed.expect("an oversized Hello was not dropped");
    assert!(t < Duration::from_millis(800), "took {t:?}");
    let c = close_of(&frames).expect("no Close naming the problem");
    assert_eq!(c.code, CloseCode::ProtocolError);
    assert!(c.reason.contains("exceeds the limit"), "{}", c.reason);

    // A Data header announcing 4 MiB: dropped no later than the handshake timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&huge_data_header()).await.unwrap();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let t = closed.expect("a pre-auth client announcing 4 MiB was never dropped");
    assert!(
        t < Duration::from_millis(800) + Duration::from_secs(1),
        "took {t:?}"
    );

    // A good client is served throughout.
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    let c = TcpTransport::connect(addr, config(1)).await.unwrap();
    c.send(Bytes::from_static(b"still here")).await.unwrap();
    let srv = accept.await.unwrap();
    assert_eq!(
        srv.recv().await.unwrap().as_deref(),
        Some(&b"still here"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_frame_announced_before_auth_is_refused_from_its_header() {
    init_tracing();
    let mut cfg = config(1);
    cfg.handshake_timeout = Duration::from_secs(5);
    let (_listener, addr) = bind(cfg).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&huge_data_header()).await.unwrap();
    let (frames, closed) = read_until_closed(&mut s, Duration::from_secs(8)).await;
    let t = closed.expect("never dropped");
    assert!(
        t < Duration::from_secs(1),
        "the server waited {t:?} for a pre-auth body it should have refused from its header"
    );
    let c = close_of(&frames).expect("no Close naming the problem");
    assert!(c.reason.contains("Data"), "{}", c.reason);
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_auth_bodies_do_not_grow_server_memory() {
    init_tracing();
    let mut cfg = config(1);
    cfg.handshake_timeout = Duration::from_secs(10);
    let (_listener, addr) = bind(cfg).await;
    // One shared body, so that the clients themselves allocate nothing per connection.
    let body = Bytes::from(vec![0x5a; 4 << 20]);
    let before = rss();
    let mut socks = Vec::new();
    for _ in 0..32 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&huge_data_header()).await.unwrap();
        socks.push(s);
    }
    let pushers: Vec<_> = socks
        .into_iter()
        .map(|mut s| {
            let body = body.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(3), s.write_all(&body[40..])).await;
                s
            })
        })
        .collect();
    let mut socks = Vec::new();
    for p in pushers {
        socks.push(p.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "32 unauthenticated clients grew RSS by {} MiB",
        grown >> 20
    );
    drop(socks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_and_partial_hello_connections_time_out_and_free_their_descriptors() {
    init_tracing();
    let timeout = Duration::from_millis(700);
    let mut cfg = config(1);
    cfg.handshake_timeout = timeout;
    let (listener, addr) = bind(cfg).await;
    let base = open_fds();
    let hello = {
        let (_, h) = ClientHandshake::new(psk(), [1; 32], [0; 16], 0, 1, 0);
        Frame::Hello(h).to_bytes()
    };
    let mut conns = Vec::new();
    for i in 0..30 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        match i % 3 {
            0 => {}                                                     // silent
            1 => s.write_all(&hello[..10]).await.unwrap(),              // a partial Hello
            _ => s.write_all(&hello[..hello.len() - 1]).await.unwrap(), // one byte short
        }
        conns.push(s);
    }
    // The server has accepted them all: our 30 ends and its 30.
    let mut during = 0;
    for _ in 0..100 {
        during = open_fds();
        if during >= base + 60 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        during >= base + 60,
        "server did not accept: {during} fds, base {base}"
    );
    let start = Instant::now();
    for (i, s) in conns.iter_mut().enumerate() {
        let (_, closed) = read_until_closed(s, timeout + Duration::from_secs(3)).await;
        assert!(closed.is_some(), "half-open connection {i} was not dropped");
    }
    let t = start.elapsed();
    assert!(t < timeout + Duration::from_secs(2), "took {t:?}");
    // The server side released its descriptors; only ours remain.
    let mut after = usize::MAX;
    for _ in 0..100 {
        after = open_fds();
        if after <= base + 30 + 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        after <= base + 30 + 4,
        "server still holds descriptors: {after} open, base {base} + our 30"
    );
    drop(conns);
    // And it still serves.
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    let c = TcpTransport::connect(addr, config(1)).await.unwrap();
    c.send(Bytes::from_static(b"ok")).await.unwrap();
    let s = accept.await.unwrap();
    assert_eq!(s.recv().await.unwrap().as_deref(), Some(&b"ok"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_cap_refuses_extra_streams_with_an_error_naming_the_limit() {
    init_tracing();
    let mut server_cfg = config(2);
    server_cfg.max_streams = 2;
    let (listener, addr) = bind(server_cfg).await;
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    // The client would allow 8; the server allows 2.
    let mut client_cfg = config(2);
    client_cfg.max_streams = 8;
    let client = TcpTransport::connect(addr, client_cfg).await.unwrap();
    let server = accept.await.unwrap();
    // Both initial streams must be attached first, or the extra one may take a free slot and
    // the late initial stream be the one refused (the cap holds either way).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client.metrics().active_streams < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = client.add_stream().await.unwrap_err();
    match &err {
        Error::PeerClosed {
            code: CloseCode::LimitExceeded,
            reason,
        } => assert!(
            reason.contains("max_streams") && reason.contains("limit of 2"),
            "{reason}"
        ),
        other => panic!("expected LimitExceeded naming max_streams, got {other}"),
    }
    // A raw stream claiming index 5 of the session is refused the same way.
    match raw_handshake(addr, psk(), client.session_id(), 5, 8).await {
        Err(Frame::Close(c)) => {
            assert_eq!(c.code, CloseCode::LimitExceeded);
            assert!(c.reason.contains("limit of 2 streams"), "{}", c.reason);
        }
        Err(other) => panic!("expected Close, got {other:?}"),
        Ok(_) => panic!("a stream beyond the cap was admitted"),
    }
    // The session is unharmed.
    assert_eq!(client.stream_stats().len(), 2);
    client.send(Bytes::from_static(b"fine")).await.unwrap();
    assert_eq!(server.recv().await.unwrap().as_deref(), Some(&b"fine"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_frees_a_slot_when_a_session_ends() {
    init_tracing();
    let mut cfg = config(1);
    cfg.max_sessions = 2;
    let (listener, addr) = bind(cfg).await;
    let mut sessions = Vec::new();
    for i in 0..2u8 {
        let c = TcpTransport::connect(addr, config(1)).await.unwrap();
        let s = listener.accept().await.unwrap();
        c.send(Bytes::from(vec![i])).await.unwrap();
        assert_eq!(s.recv().await.unwrap().as_deref(), Some(&[i][..]));
        sessions.push((c, s));
    }
    // End one session on both sides: its slot is free again.
    let (c, s) = sessions.remove(0);
    c.close().await.unwrap();
    assert_eq!(s.recv().await.unwrap(), None);
    drop(s);
    let c = TcpTransport::connect(addr, config(1)).await.unwrap();
    let s = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("a freed session slot was not reused")
        .unwrap();
    c.send(Bytes::from_static(b"third")).await.unwrap();
    assert_eq!(s.recv().await.unwrap().as_deref(), Some(&b"third"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_refuses_a_new_session_with_an_error_naming_the_limit() {
    init_tracing();
    let mut cfg = config(1);
    cfg.max_sessions = 2;
    let (listener, addr) = bind(cfg).await;
    let mut keep = Vec::new();
    for _ in 0..2 {
        let c = TcpTransport::connect(addr, config(1)).await.unwrap();
        keep.push((c, listener.accept().await.unwrap()));
    }
    let third = async {
        let c = TcpTransport::connect(addr, config(1)).await?;
        c.send(Bytes::from_static(b"x")).await?;
        c.flush().await?;
        Ok::<_, Error>(())
    };
    let err = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third session neither failed nor completed")
        .expect_err("a session beyond max_sessions was served");
    assert!(
        matches!(
            err,
            Error::PeerClosed {
                code: CloseCode::LimitExceeded,
                ..
            }
        ) && err.to_string().contains("max_sessions"),
        "expected LimitExceeded naming max_sessions, got {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_cap_is_a_clear_error_on_both_sides() {
    init_tracing();
    let limit = 1u64 << 20;
    // Sender side: refused before anything is queued.
    let mut small = config(1);
    small.max_message = limit;
    let (listener, addr) = bind(small.clone()).await;
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    let c = TcpTransport::connect(addr, small).await.unwrap();
    let err = c
        .send(Bytes::from(vec![0; limit as usize + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::MessageTooLarge { len, limit: l } if len == limit + 1 && l == limit),
        "{err}"
    );
    // Exactly at the limit is fine.
    c.send(Bytes::from(vec![7; limit as usize])).await.unwrap();
    let s = accept.await.unwrap();
    assert_eq!(
        s.recv().await.unwrap().map(|m| m.len()),
        Some(limit as usize)
    );

    // Receiver side: a peer with a larger limit sends more than we accept. We fail the
    // session with an error naming the message and the limit, and tell the peer why.
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    let mut big = config(1);
    big.max_message = 8 << 20;
    let c = TcpTransport::connect(addr, big).await.unwrap();
    let s = accept.await.unwrap();
    c.send(Bytes::from_static(b"small first")).await.unwrap();
    c.send(Bytes::from(vec![1; 2 << 20])).await.unwrap();
    assert_eq!(
        s.recv().await.unwrap().as_deref(),
        Some(&b"small first"[..])
    );
    let err = tokio::time::timeout(Duration::from_secs(5), s.recv())
        .await
        .expect("the receiver hung on an oversized message")
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol(ProtocolError::MessageTooLarge { msg_id: 1, len, limit: l })
                if len == 2 << 20 && l == limit
        ),
        "{err}"
    );
    let err = tokio::time::timeout(Duration::from_secs(5), c.flush())
        .await
        .expect("the sender hung after the receiver refused")
        .unwrap_err();
    match &err {
        Error::PeerClosed {
            code: CloseCode::LimitExceeded,
            reason,
        } => assert!(reason.contains("exceeds the limit of 1048576"), "{reason}"),
        other => panic!("expected PeerClosed(LimitExceeded), got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cannot_join_a_live_session_without_the_key() {
    init_tracing();
    let (listener, addr) = bind(config(2)).await;
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    let client = TcpTransport::connect(addr, config(2)).await.unwrap();
    let server = accept.await.unwrap();
    // `connect` may return before a slow second stream is up; the test counts both.
    for _ in 0..1000 {
        if server.stream_stats().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let id = client.session_id();
    assert_ne!(id, [0; 16]);
    // The attacker saw the session id on the wire but has the wrong key. It gets the
    // server's HelloAck, cannot check it, and sends a made-up proof.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (_, hello) = ClientHandshake::new(wrong_psk(), random_bytes(), id, 1, 2, 0);
    s.write_all(&Frame::Hello(hello).to_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    let ack = loop {
        if let Some(f) = Decoder::default().decode(&mut buf).unwrap() {
            break f;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0);
    };
    assert!(matches!(ack, Frame::HelloAck(_)), "{ack:?}");
    s.write_all(&Frame::Auth(AuthProof { mac: [0xa5; 32] }).to_bytes())
        .await
        .unwrap();
    // Then data, hoping it lands in the session.
    let chunk = DataChunk::new(0, 0, 0, 6, Bytes::from_static(b"forged"));
    let _ = s.write_all(&Frame::Data(chunk).to_bytes()).await;
    let (frames, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the impostor stream was not dropped");
    let c = close_of(&frames).expect("no Close");
    assert_eq!(c.code, CloseCode::AuthFailed);
    // A wrong-key client going through the whole handshake fails on the server's proof.
    let r = raw_handshake_expect_bad_server_proof(addr, id).await;
    assert!(
        r,
        "the client accepted a server proof made with another key"
    );
    // The session still has its two streams and got none of the forged bytes.
    assert_eq!(server.stream_stats().len(), 2);
    client.send(Bytes::from_static(b"real")).await.unwrap();
    assert_eq!(server.recv().await.unwrap().as_deref(), Some(&b"real"[..]));
    assert_eq!(server.metrics().messages_received, 1);
}

/// A client holding the wrong key cannot verify the server's HelloAck either.
async fn raw_handshake_expect_bad_server_proof(addr: SocketAddr, id: [u8; 16]) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (hs, hello) = ClientHandshake::new(wrong_psk(), random_bytes(), id, 1, 2, 0);
    s.write_all(&Frame::Hello(hello).to_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Some(Frame::HelloAck(ack)) = Decoder::default().decode(&mut buf).unwrap() {
            return matches!(hs.on_hello_ack(&ack), Err(ProtocolError::AuthFailed));
        }
        if s.read_buf(&mut buf).await.unwrap() == 0 {
            return false;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_stream_that_sends_garbage_ends_only_its_own_session() {
    init_tracing();
    let (listener, addr) = bind(config(1)).await;
    // Session A: a good client.
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    let good = TcpTransport::connect(addr, config(1)).await.unwrap();
    let good_srv = accept.await.unwrap();
    // Session B: a raw client with the key that then breaks the protocol.
    let accept = {
        let l = listener.clone();
        tokio::spawn(async move { l.accept().await.unwrap() })
    };
    let (mut s, est, _) = raw_handshake(addr, psk(), [0; 16], 0, 1).await.unwrap();
    assert_ne!(est.session_id, good.session_id());
    let bad_srv = accept.await.unwrap();
    // A whole message, then garbage, in one write: the message still arrives, whether the
    // server reads the two apart or together (together, it used to be dropped with the
    // read's other frames).
    let mut bytes = Frame::Data(DataChunk::new(0, 0, 0, 5, Bytes::from_static(b"whole")))
        .to_bytes()
        .to_vec();
    bytes.extend_from_slice(&[0xee, 0, 0, 0, 0]);
    s.write_all(&bytes).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), bad_srv.recv())
        .await
        .unwrap();
    assert_eq!(first.unwrap().as_deref(), Some(&b"whole"[..]));
    let err = tokio::time::timeout(Duration::from_secs(5), bad_srv.recv())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::UnknownFrameType(0xee))),
        "{err}"
    );
    let (frames, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed.is_some());
    assert_eq!(
        close_of(&frames).map(|c| c.code),
        Some(CloseCode::ProtocolError)
    );
    // Session A is untouched.
    good.send(Bytes::from_static(b"unaffected")).await.unwrap();
    assert_eq!(
        good_srv.recv().await.unwrap().as_deref(),
        Some(&b"unaffected"[..])
    );
}

/// A man in the middle on the real transport lowers the newest version in the client's Hello
/// (to force the oldest version both speak): the client refuses the server's proof with an
/// error saying the handshake may have been altered, instead of running downgraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_range_narrowed_in_transit_fails_authentication() {
    init_tracing();
    let mut both = config(1);
    both.versions = (1, 2);
    let (listener, server_addr) = bind(both.clone()).await;
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let mitm = tokio::spawn(async move {
        let (mut client, _) = proxy.accept().await.unwrap();
        let mut server = TcpStream::connect(server_addr).await.unwrap();
        // Frame type, body length, magic, then version_min and version_max.
        let mut hello = [0u8; 5 + 68];
        client.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello[11..13], &2u16.to_be_bytes(), "offered version_max");
        hello[11..13].copy_from_slice(&1u16.to_be_bytes());
        server.write_all(&hello).await.unwrap();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::copy_bidirectional(&mut client, &mut server),
        )
        .await;
    });
    let err = TcpTransport::connect(proxy_addr, both).await.unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::AuthFailed)),
        "expected AuthFailed, got {err}"
    );
    assert!(err.to_string().contains("altered in transit"), "{err}");
    mitm.await.unwrap();
    let session = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(session.is_err(), "a downgraded handshake opened a session");
}
