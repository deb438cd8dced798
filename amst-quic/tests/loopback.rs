//! End-to-end tests of the QUIC transport over loopback.

use std::sync::Arc;
use std::time::Duration;

use amst_core::codec::{CloseCode, Psk};
use amst_core::{Error, ProtocolError, Transport};
use amst_quic::{
    CongestionControl, Identity, PeerVerification, QuicConfig, QuicListener, QuicTransport,
    StreamMapping,
};
use bytes::Bytes;
use ring::digest;

fn psk() -> Psk {
    Psk::new(b"amst-quic test key, 32 bytes long").unwrap()
}

/// A listener and a connected pair; `server`/`client` adjust the two configs.
async fn pair_with(
    server: impl FnOnce(QuicConfig) -> QuicConfig,
    client: impl FnOnce(QuicConfig, &Identity) -> QuicConfig,
) -> (QuicTransport, QuicTransport) {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let scfg = server(QuicConfig::new(psk()).with_identity(id.clone()));
    let ccfg = client(QuicConfig::new(psk()), &id);
    let listener = QuicListener::bind("127.0.0.1:0".parse().unwrap(), scfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move { listener.accept().await });
    let c = QuicTransport::connect(addr, "localhost", ccfg)
        .await
        .unwrap();
    let s = accept.await.unwrap().unwrap();
    (c, s)
}

async fn pair() -> (QuicTransport, QuicTransport) {
    pair_with(
        |s| s,
        |c, id| c.with_verification(PeerVerification::Pinned(vec![id.fingerprint()])),
    )
    .await
}

/// A deterministic pseudo-random byte stream (xorshift), so the test needs no RNG crate.
struct Bytesource(u64);

impl Bytesource {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, len: usize) -> Bytes {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        Bytes::from(v)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_256_mib_with_equal_sha256() {
    let (client, server) = pair().await;
    const TOTAL: usize = 256 << 20;
    let sender = tokio::spawn(async move {
        let mut src = Bytesource(0x9e37_79b9_7f4a_7c15);
        let mut hash = digest::Context::new(&digest::SHA256);
        let (mut sent, mut count) = (0usize, 0u64);
        while sent < TOTAL {
            // Sizes from 1 byte to about 2 MiB, so chunking, small and large messages mix.
            let len = ((src.next_u64() % (2 << 20)) as usize + 1).min(TOTAL - sent);
            let m = src.fill(len);
            hash.update(&m);
            client.send(m).await.unwrap();
            sent += len;
            count += 1;
        }
        client.flush().await.unwrap();
        assert_eq!(client.metrics().messages_acked, count);
        (client, hash.finish(), count)
    });
    let mut hash = digest::Context::new(&digest::SHA256);
    let (mut got, mut count) = (0usize, 0u64);
    while got < TOTAL {
        let m = tokio::time::timeout(Duration::from_secs(60), server.recv())
            .await
            .expect("no progress for 60 s")
            .unwrap()
            .expect("stream ended early");
        hash.update(&m);
        got += m.len();
        count += 1;
    }
    let (client, sent_hash, sent_count) = sender.await.unwrap();
    assert_eq!(got, TOTAL);
    assert_eq!(count, sent_count);
    assert_eq!(
        hash.finish().as_ref(),
        sent_hash.as_ref(),
        "SHA-256 differs"
    );
    let m = server.metrics();
    assert_eq!(m.messages_received, count);
    assert_eq!(
        m.bytes_received, TOTAL as u64,
        "no chunk should arrive twice"
    );
    client.close().await.unwrap();
    assert_eq!(
        server.recv().await.unwrap(),
        None,
        "a graceful close ends the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_small_messages_arrive_in_order() {
    let (client, server) = pair().await;
    let n = 10_000u32;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let mut m = i.to_be_bytes().to_vec();
            m.resize(4 + (i % 97) as usize, i as u8);
            client.send(Bytes::from(m)).await.unwrap();
        }
        client.flush().await.unwrap();
        client
    });
    for i in 0..n {
        let m = server.recv().await.unwrap().unwrap();
        assert_eq!(m.len(), 4 + (i % 97) as usize);
        assert_eq!(
            u32::from_be_bytes(m[..4].try_into().unwrap()),
            i,
            "out of order"
        );
        assert!(m[4..].iter().all(|&b| b == i as u8));
    }
    let client = sender.await.unwrap();
    assert_eq!(client.metrics().messages_acked, u64::from(n));
    assert_eq!(server.metrics().messages_received, u64::from(n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_streams_deliver_in_order() {
    let (client, server) = pair_with(
        |s| s,
        |c, _| c.with_mapping(StreamMapping::PerMessage { concurrency: 8 }),
    )
    .await;
    let n = 2_000u32;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            // Every 100th message spans several chunks and so several streams.
            let len = if i.is_multiple_of(100) { 700 << 10 } else { 64 };
            let mut m = vec![(i % 251) as u8; len];
            m[..4].copy_from_slice(&i.to_be_bytes());
            client.send(Bytes::from(m)).await.unwrap();
        }
        client.flush().await.unwrap();
        client
    });
    for i in 0..n {
        let m = server.recv().await.unwrap().unwrap();
        assert_eq!(
            u32::from_be_bytes(m[..4].try_into().unwrap()),
            i,
            "out of order"
        );
        assert!(
            m[4..].iter().all(|&b| b == (i % 251) as u8),
            "corrupt message {i}"
        );
    }
    let client = sender.await.unwrap();
    assert_eq!(client.metrics().messages_acked, u64::from(n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_each_stay_in_order_and_nothing_repeats() {
    let (client, server) = pair().await;
    let client = Arc::new(client);
    let (tasks, per_task) = (8u32, 500u32);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let c = client.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let mut m = Vec::with_capacity(64);
                m.extend_from_slice(&t.to_be_bytes());
                m.extend_from_slice(&i.to_be_bytes());
                m.resize(8 + ((t * 31 + i) % 300) as usize, 0xa5);
                c.send(Bytes::from(m)).await.unwrap();
            }
        }));
    }
    let mut next = vec![0u32; tasks as usize];
    for _ in 0..tasks * per_task {
        let m = server.recv().await.unwrap().unwrap();
        let t = u32::from_be_bytes(m[..4].try_into().unwrap()) as usize;
        let i = u32::from_be_bytes(m[4..8].try_into().unwrap());
        assert_eq!(i, next[t], "task {t}'s messages out of order or repeated");
        next[t] += 1;
    }
    for h in handles {
        h.await.unwrap();
    }
    assert!(next.iter().all(|&n| n == per_task));
    client.flush().await.unwrap();
    assert_eq!(client.metrics().messages_acked, u64::from(tasks * per_task));
    // Nothing more is pending: a further recv must wait, not return a stray message.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), server.recv())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_at_once() {
    let (a, b) = pair().await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let mut hs = Vec::new();
    for (tx, rx) in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
        hs.push(tokio::spawn(async move {
            for i in 0..200u32 {
                tx.send(Bytes::from(vec![i as u8; 10_000 + i as usize]))
                    .await
                    .unwrap();
            }
            tx.flush().await.unwrap();
        }));
        hs.push(tokio::spawn(async move {
            for i in 0..200u32 {
                let m = rx.recv().await.unwrap().unwrap();
                assert_eq!(m.len(), 10_000 + i as usize);
                assert!(m.iter().all(|&x| x == i as u8));
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    assert_eq!(a.metrics().messages_acked, 200);
    assert_eq!(b.metrics().messages_acked, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_bounds_what_an_idle_receiver_buffers_and_acks_are_truthful() {
    let window = 4u64 << 20;
    let (client, server) = pair_with(
        |mut s| {
            s.window = window;
            s
        },
        |mut c, _| {
            c.window = window;
            c
        },
    )
    .await;
    let client = Arc::new(client);
    // Three 1 MiB messages fit the window: acked although nobody has called recv.
    for _ in 0..3 {
        client.send(Bytes::from(vec![7u8; 1 << 20])).await.unwrap();
    }
    client.flush().await.unwrap();
    assert_eq!(client.metrics().messages_acked, 3);
    assert_eq!(server.metrics().messages_received, 0);
    // Twelve more cannot all be received by an idle reader.
    let c = client.clone();
    let sender = tokio::spawn(async move {
        for _ in 0..12 {
            c.send(Bytes::from(vec![9u8; 1 << 20])).await.unwrap();
        }
        c.flush().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = client.metrics().messages_acked;
    assert!(
        acked <= 3 + window / (1 << 20),
        "{acked} messages acked while the receiver holds at most a window"
    );
    assert!(acked < 15);
    for i in 0..15 {
        let m = server.recv().await.unwrap().unwrap();
        assert_eq!(m.len(), 1 << 20);
        assert_eq!(m[0], if i < 3 { 7 } else { 9 });
    }
    sender.await.unwrap();
    assert_eq!(client.metrics().messages_acked, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_measures_rtt_and_rate_over_datagrams_during_bulk_transfer() {
    let (client, server) = pair().await;
    let client = Arc::new(client);
    let c = client.clone();
    let bulk = tokio::spawn(async move {
        for _ in 0..64 {
            c.send(Bytes::from(vec![1u8; 1 << 20])).await.unwrap();
        }
    });
    let reader = tokio::spawn(async move {
        for _ in 0..64 {
            server.recv().await.unwrap().unwrap();
        }
        server
    });
    let s = client.probe(0).await.unwrap();
    assert!(
        s.rtt > Duration::ZERO && s.rtt < Duration::from_secs(1),
        "{s:?}"
    );
    assert_eq!(s.delivery_rate, None);
    let s = client.probe(256 << 10).await.unwrap();
    assert!(s.delivery_rate.is_some_and(|r| r > 0), "{s:?}");
    assert!(s.bytes_used >= 256 << 10, "{s:?}");
    bulk.await.unwrap();
    let _server = reader.await.unwrap();
    client.flush().await.unwrap();
    let m = client.metrics();
    assert!(m.rtt.is_some() && m.min_rtt.is_some());
    assert_eq!(m.messages_acked, 64);
}

#[tokio::test]
async fn every_congestion_controller_carries_data() {
    for cc in [
        CongestionControl::AmstBbr,
        CongestionControl::AmstCubic,
        CongestionControl::QuinnCubic,
        CongestionControl::QuinnBbr,
        CongestionControl::QuinnNewReno,
    ] {
        let (client, server) =
            pair_with(|s| s.with_congestion(cc), |c, _| c.with_congestion(cc)).await;
        for i in 0..8u8 {
            client.send(Bytes::from(vec![i; 300_000])).await.unwrap();
        }
        for i in 0..8u8 {
            let m = server.recv().await.unwrap().unwrap();
            assert!(m.len() == 300_000 && m[0] == i, "{cc}: wrong message");
        }
        client.flush().await.unwrap();
        assert_eq!(client.metrics().messages_acked, 8, "{cc}");
    }
}

async fn connect_err(client: impl FnOnce(QuicConfig, &Identity) -> QuicConfig) -> (Error, Error) {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let listener = QuicListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        QuicConfig::new(psk()).with_identity(id.clone()),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move { listener.accept().await });
    let mut cfg = client(QuicConfig::new(psk()), &id);
    cfg.handshake_timeout = Duration::from_secs(5);
    let c = QuicTransport::connect(addr, "localhost", cfg)
        .await
        .unwrap_err();
    let s = tokio::time::timeout(Duration::from_secs(10), accept)
        .await
        .expect("the listener should fail the attempt, not hang")
        .unwrap()
        .unwrap_err();
    (c, s)
}

#[tokio::test]
async fn an_unpinned_certificate_is_rejected_with_a_clear_error() {
    let other = Identity::self_signed(&["localhost"]).unwrap();
    let (c, s) = connect_err(|c, _| {
        c.with_verification(PeerVerification::Pinned(vec![other.fingerprint()]))
    })
    .await;
    let msg = c.to_string();
    eprintln!("client: {msg}\nserver: {s}");
    assert!(msg.contains("certificate"), "{msg}");
    assert!(msg.contains("handshake"), "{msg}");
}

#[tokio::test]
async fn a_wrong_alpn_is_rejected_with_a_clear_error() {
    let (c, s) = connect_err(|mut c, id| {
        c.alpn = b"amst/2".to_vec();
        c.with_verification(PeerVerification::Pinned(vec![id.fingerprint()]))
    })
    .await;
    let msg = c.to_string();
    eprintln!("client: {msg}\nserver: {s}");
    assert!(msg.contains("ALPN"), "{msg}");
    assert!(s.to_string().contains("handshake"), "{s}");
}

#[tokio::test]
async fn a_wrong_psk_is_rejected_on_both_sides() {
    let (c, s) = connect_err(|mut c, _| {
        c.psk = Psk::new(b"not the key the server holds").unwrap();
        c
    })
    .await;
    eprintln!("client: {c}\nserver: {s}");
    assert!(
        matches!(c, Error::Protocol(ProtocolError::AuthFailed)),
        "{c:?}"
    );
    assert!(
        matches!(
            s,
            Error::PeerClosed {
                code: CloseCode::AuthFailed,
                ..
            }
        ),
        "{s:?}"
    );
}

#[tokio::test]
async fn config_errors_name_the_field() {
    let mut c = QuicConfig::new(psk());
    c.max_chunk = 10;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("max_chunk"), "{e}");
    let mut c = QuicConfig::new(psk());
    c.initial_window = 1 << 30;
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("initial_window") && e.contains("16777216"),
        "{e}"
    );
    let e = QuicListener::bind("127.0.0.1:0".parse().unwrap(), QuicConfig::new(psk()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("identity"), "{e}");
    assert_eq!(
        QuicConfig::bdp_window(200_000_000, Duration::from_millis(100)),
        6 * 2_500_000
    );
}

#[tokio::test]
async fn usable_as_arc_dyn_transport_and_send_after_close_fails() {
    let (client, server) = pair().await;
    let client: Arc<dyn Transport> = Arc::new(client);
    client.send(Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(server.recv().await.unwrap().as_deref(), Some(&b"x"[..]));
    client.close().await.unwrap();
    assert!(matches!(
        client.send(Bytes::new()).await,
        Err(Error::Closed)
    ));
    assert_eq!(server.recv().await.unwrap(), None);
    let e = server.send(Bytes::from_static(b"y")).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::PeerClosed {
                code: CloseCode::Normal,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_the_listener() {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let pin = PeerVerification::Pinned(vec![id.fingerprint()]);
    let listener = Arc::new(
        QuicListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            QuicConfig::new(psk()).with_identity(id),
        )
        .unwrap(),
    );
    let addr = listener.local_addr().unwrap();
    // TLS completes, but the client never opens the control stream.
    let raw = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let qc =
        QuicTransport::quinn_client_config(&QuicConfig::new(psk()).with_verification(pin.clone()))
            .unwrap();
    let _silent = raw
        .connect_with(qc, addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let l = listener.clone();
    let accept = tokio::spawn(async move { l.accept().await });
    let start = std::time::Instant::now();
    let client = QuicTransport::connect(
        addr,
        "localhost",
        QuicConfig::new(psk()).with_verification(pin),
    )
    .await
    .unwrap();
    let server = accept.await.unwrap().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the good client waited {:?} behind the silent one (handshake timeout 10 s)",
        start.elapsed()
    );
    client.send(Bytes::from_static(b"through")).await.unwrap();
    assert_eq!(
        server.recv().await.unwrap().as_deref(),
        Some(&b"through"[..])
    );
}
