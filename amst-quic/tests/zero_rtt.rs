//! 0-RTT resumption over loopback with real quinn: a reconnect through the same connector
//! sends its Hello early and still carries data intact; a server that rejects early data gets
//! the full handshake on the same connection; a replayed first flight creates no session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_quic::{
    ConnectorStats, Identity, PeerVerification, QuicConfig, QuicConnector, QuicListener,
    QuicTransport,
};
use bytes::Bytes;
use ring::digest;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

fn psk() -> Psk {
    Psk::new(b"amst-quic 0-RTT test key, long enough").unwrap()
}

fn listener(id: &Identity, zero_rtt: bool) -> QuicListener {
    let cfg = QuicConfig::new(psk())
        .with_identity(id.clone())
        .with_zero_rtt(zero_rtt);
    QuicListener::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap()
}

/// Connects through `connector` while `listener` accepts; returns (client, server).
async fn connect(
    connector: &QuicConnector,
    listener: &QuicListener,
    addr: SocketAddr,
) -> (QuicTransport, QuicTransport) {
    let (c, s) = tokio::join!(connector.connect(addr, "localhost"), listener.accept());
    (c.unwrap(), s.unwrap())
}

/// Seeded pseudo-random bytes (xorshift).
fn payload(seed: u64, len: usize) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v.into()
}

async fn send_all(t: &QuicTransport, msgs: Vec<Bytes>) {
    for m in msgs {
        t.send(m).await.unwrap();
    }
    t.flush().await.unwrap();
}

async fn recv_all(t: &QuicTransport, expect: Vec<Bytes>) {
    for e in expect {
        let got = t.recv().await.unwrap().expect("a message");
        assert_eq!(
            digest::digest(&digest::SHA256, &got).as_ref(),
            digest::digest(&digest::SHA256, &e).as_ref()
        );
    }
}

/// Sends `count` messages of `len` bytes each way and checks every one by SHA-256.
async fn exchange(c: &QuicTransport, s: &QuicTransport, count: usize, len: usize) {
    let up: Vec<Bytes> = (0..count).map(|i| payload(i as u64 + 1, len)).collect();
    let down: Vec<Bytes> = (0..count).map(|i| payload(i as u64 + 1000, len)).collect();
    tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            send_all(c, up.clone()),
            recv_all(s, up),
            send_all(s, down.clone()),
            recv_all(c, down),
        )
    })
    .await
    .expect("the exchange finished in time");
}

async fn close(c: QuicTransport, s: QuicTransport) {
    c.close().await.unwrap();
    assert_eq!(s.recv().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_through_the_same_connector_resumes_in_0rtt_and_data_arrives_intact() {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let l = listener(&id, true);
    let addr = l.local_addr().unwrap();
    // The default verification (PSK-bound) is the one that most needs the ticket gate.
    let connector = QuicConnector::new(QuicConfig::new(psk())).unwrap();

    let (c, s) = connect(&connector, &l, addr).await;
    assert!(!c.resumed_with_0rtt() && !s.resumed_with_0rtt());
    exchange(&c, &s, 4, 64 << 10).await;
    close(c, s).await;

    for round in 1..=3 {
        let (c, s) = connect(&connector, &l, addr).await;
        assert!(
            c.resumed_with_0rtt(),
            "reconnect {round} did not resume in 0-RTT"
        );
        assert!(
            s.resumed_with_0rtt(),
            "the listener did not see an early Hello"
        );
        exchange(&c, &s, 8, 1 << 20).await;
        close(c, s).await;
    }
    assert_eq!(
        connector.stats(),
        ConnectorStats {
            connects: 4,
            zero_rtt_attempted: 3,
            zero_rtt_accepted: 3
        }
    );
    let ls = l.stats();
    assert_eq!((ls.sessions, ls.sessions_early), (4, 3), "{ls:?}");
    assert_eq!(ls.early_hellos_answered, 3, "{ls:?}");

    // Pinned verification resumes too (its tickets come from a checked certificate).
    let pinned = QuicConnector::new(
        QuicConfig::new(psk()).with_verification(PeerVerification::Pinned(vec![id.fingerprint()])),
    )
    .unwrap();
    let (c, s) = connect(&pinned, &l, addr).await;
    assert!(!c.resumed_with_0rtt());
    close(c, s).await;
    let (c, s) = connect(&pinned, &l, addr).await;
    assert!(c.resumed_with_0rtt());
    exchange(&c, &s, 2, 1000).await;
    close(c, s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_rejects_early_data_gets_a_full_handshake_on_the_same_connection() {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let first = listener(&id, true);
    let connector = QuicConnector::new(QuicConfig::new(psk())).unwrap();
    let (c, s) = connect(&connector, &first, first.local_addr().unwrap()).await;
    close(c, s).await;

    // Another server under the same name, with 0-RTT off and another session cache (a
    // restart): the connector holds a ticket for the name, tries 0-RTT, and is rejected.
    let other = Identity::self_signed(&["localhost"]).unwrap();
    let off = listener(&other, false);
    let addr = off.local_addr().unwrap();
    let (c, s) = connect(&connector, &off, addr).await;
    assert!(!c.resumed_with_0rtt() && !s.resumed_with_0rtt());
    let st = connector.stats();
    assert_eq!(
        (st.zero_rtt_attempted, st.zero_rtt_accepted),
        (1, 0),
        "{st:?}"
    );
    exchange(&c, &s, 4, 256 << 10).await;
    close(c, s).await;

    // Tickets from a server with 0-RTT off allow no early data: no attempt at all.
    let (c, s) = connect(&connector, &off, addr).await;
    assert!(!c.resumed_with_0rtt());
    assert_eq!(connector.stats().zero_rtt_attempted, 1);
    exchange(&c, &s, 1, 1000).await;
    close(c, s).await;
    assert_eq!(off.stats().early_hellos_answered, 0);

    // A client with 0-RTT off never sends early, even to a server that would accept it.
    let no_early = QuicConnector::new(QuicConfig::new(psk()).with_zero_rtt(false)).unwrap();
    let faddr = first.local_addr().unwrap();
    for _ in 0..2 {
        let (c, s) = connect(&no_early, &first, faddr).await;
        assert!(!c.resumed_with_0rtt());
        close(c, s).await;
    }
    assert_eq!(no_early.stats().zero_rtt_attempted, 0);
}

/// A UDP relay between one client and a server that also sends a copy of the client's first
/// flight (every datagram before the server's first answer) from a second socket, right
/// behind the original, and can replay that flight again later: what an attacker on the path
/// can do with 0-RTT data. (A copy that overtakes the original would instead steal the
/// connection attempt, as it can for any QUIC Initial; that is denial of service, not replay.)
struct Replayer {
    addr: SocketAddr,
    flight: Arc<Mutex<Vec<Vec<u8>>>>,
    replay_socket: Arc<UdpSocket>,
    server: SocketAddr,
}

impl Replayer {
    async fn start(server: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let replay_socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let flight = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        {
            let (front, back, replay, flight, answered, client) = (
                front.clone(),
                back.clone(),
                replay_socket.clone(),
                flight.clone(),
                answered.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().await = Some(from);
                    // Recorded before it is forwarded: the server's answer could otherwise
                    // complete the handshake before the flight holds anything.
                    let first_flight = !answered.load(Ordering::Acquire);
                    if first_flight {
                        flight.lock().await.push(buf[..n].to_vec());
                    }
                    let _ = back.send_to(&buf[..n], server).await;
                    if first_flight {
                        let _ = replay.send_to(&buf[..n], server).await;
                    }
                }
            });
        }
        {
            let (front, back, answered, client) = (
                front.clone(),
                back.clone(),
                answered.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    answered.store(true, Ordering::Release);
                    if let Some(c) = *client.lock().await {
                        let _ = front.send_to(&buf[..n], c).await;
                    }
                }
            });
        }
        {
            // The server's answers to the replayed copies go nowhere: the attacker has no keys.
            let replay = replay_socket.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while replay.recv(&mut buf).await.is_ok() {}
            });
        }
        back.connect(server).await.unwrap();
        Replayer {
            addr: front.local_addr().unwrap(),
            flight,
            replay_socket,
            server,
        }
    }

    async fn replay_again(&self) -> usize {
        let flight = self.flight.lock().await.clone();
        for d in &flight {
            self.replay_socket.send_to(d, self.server).await.unwrap();
        }
        flight.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_early_hello_creates_no_second_session() {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let cfg = QuicConfig::new(psk()).with_identity(id.clone());
    // Short, so that the replayed connections' handshakes give up within the test.
    let cfg = QuicConfig {
        handshake_timeout: Duration::from_secs(2),
        ..cfg
    };
    let l = QuicListener::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let server = l.local_addr().unwrap();
    let connector = QuicConnector::new(QuicConfig::new(psk())).unwrap();
    let (c, s) = connect(&connector, &l, server).await;
    close(c, s).await;

    // The reconnect's first flight (ClientHello with the ticket, and the early Hello) reaches
    // the server twice: the original, then a copy from another address.
    let relay = Replayer::start(server).await;
    let (c, s) = connect(&connector, &l, relay.addr).await;
    let first_flight = relay.flight.lock().await.len();
    assert!(first_flight >= 1);
    exchange(&c, &s, 4, 64 << 10).await;
    // And again, whole, while the genuine session is up.
    relay.replay_again().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.replay_again().await;

    // Whatever the replays started must end in failed handshakes, never in a session.
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), l.accept()).await {
            Ok(Ok(_)) => panic!("a replayed first flight produced a second session"),
            Ok(Err(e)) => eprintln!("replayed connection failed as it must: {e}"),
            Err(_) => {}
        }
    }
    let ls = l.stats();
    eprintln!(
        "first flight {first_flight} datagram(s); genuine reconnect resumed in 0-RTT: {}; {ls:?}",
        c.resumed_with_0rtt()
    );
    assert_eq!(ls.sessions, 2, "{ls:?}");
    assert!(c.resumed_with_0rtt());
    // Tickets are single-use, so no replay of a used ticket had its early Hello answered:
    // every answered early Hello belongs to a session.
    assert_eq!(ls.early_hellos_answered, ls.sessions_early, "{ls:?}");
    // The genuine session is unharmed.
    exchange(&c, &s, 2, 1 << 20).await;
    close(c, s).await;

    // Once the genuine connection is gone, a replay is a new connection attempt with a used
    // ticket: still no answer and no session.
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.replay_again().await;
    let r = tokio::time::timeout(Duration::from_secs(8), l.accept()).await;
    match r {
        Ok(Ok(_)) => panic!("a replay after close produced a session"),
        Ok(Err(e)) => eprintln!("replay after close failed as it must: {e}"),
        Err(_) => eprintln!("replay after close: no connection at all"),
    }
    let ls = l.stats();
    eprintln!("after the last replay: {ls:?}");
    assert_eq!(ls.sessions, 2, "{ls:?}");
    assert_eq!(ls.early_hellos_answered, ls.sessions_early, "{ls:?}");
}

/// Reconnect time, full handshake against 0-RTT, on loopback: prints the numbers only (the
/// loopback RTT is tens of microseconds, so the saved round trip is lost in the CPU cost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_time_on_loopback() {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let l = listener(&id, true);
    let addr = l.local_addr().unwrap();
    let cfg = QuicConfig::new(psk());
    let first_message = |c: QuicTransport, s: QuicTransport| async move {
        c.send(Bytes::from_static(b"first")).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(s.recv().await.unwrap().as_deref(), Some(&b"first"[..]));
        (c, s)
    };
    let connector = QuicConnector::new(cfg.clone()).unwrap();
    let (c, s) = connect(&connector, &l, addr).await;
    close(c, s).await;
    let (mut full, mut early) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let t0 = Instant::now();
        let fresh = QuicConnector::new(cfg.clone()).unwrap();
        let (c, s) = connect(&fresh, &l, addr).await;
        assert!(!c.resumed_with_0rtt());
        let (c, s) = first_message(c, s).await;
        full.push(t0.elapsed());
        close(c, s).await;

        let t0 = Instant::now();
        let (c, s) = connect(&connector, &l, addr).await;
        assert!(c.resumed_with_0rtt());
        let (c, s) = first_message(c, s).await;
        early.push(t0.elapsed());
        close(c, s).await;
    }
    full.sort();
    early.sort();
    eprintln!(
        "loopback reconnect to first message acked: full handshake median {:?} (min {:?}), \
         0-RTT median {:?} (min {:?})",
        full[5], full[0], early[5], early[0]
    );
}
