//! amst-quic through amst-linkem's emulated WAN (needs root for network namespaces and TUN;
//! skips with the reason otherwise).
//!
//! On 200 Mbit/s, 100 ms RTT and 1% random loss each way, amst-cc's BBR must carry at least
//! 0.6 of the link rate (the margin is for a slow machine, though the link is the limit here),
//! and at least twice what quinn's default CUBIC carries, measured in the same run over the
//! same link.
//! Set `AMST_QUIC_ALL_CC=1` to also measure amst-cc CUBIC and quinn's BBR (reported only).
//!
//! On 100 ms RTT without loss, a reconnect that resumes in 0-RTT gets its first message
//! acknowledged sooner than one with a full handshake (one round trip is saved).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_linkem::LinkEm;
use amst_quic::{
    CongestionControl, Identity, PeerVerification, QuicConfig, QuicConnector, QuicListener,
    QuicTransport,
};
use bytes::Bytes;

const RATE_BPS: u64 = 200_000_000;
const RTT: Duration = Duration::from_millis(100);
const RUN: Duration = Duration::from_secs(12);
const MESSAGE: usize = 1 << 20;

fn config(cc: CongestionControl) -> QuicConfig {
    QuicConfig::new(Psk::new(b"linkem test key of enough length").unwrap())
        .for_path(RATE_BPS, RTT)
        .with_congestion(cc)
        .with_idle_timeout(Duration::from_secs(4))
}

/// Sends 1 MiB messages for `RUN` and returns the goodput in bit/s: the messages the
/// receiver acknowledged whole within the run, over the run's length.
fn goodput(link: &LinkEm, cc: CongestionControl, port: u16) -> f64 {
    let t0 = Instant::now();
    let id = Identity::self_signed(&["amst-linkem-right"]).unwrap();
    let pin = id.fingerprint();
    let server_addr = SocketAddr::from((link.right().addr(), port));
    let scfg = config(cc).with_identity(id);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = link.right().spawn_tokio(async move {
        let socket = UdpSocket::bind(server_addr).unwrap();
        let listener = QuicListener::from_socket(socket, scfg).unwrap();
        ready_tx.send(()).unwrap();
        let t = listener.accept().await.unwrap();
        let mut bytes = 0u64;
        // Ends when the client drops the connection after its run.
        while let Ok(Some(m)) = t.recv().await {
            bytes += m.len() as u64;
        }
        bytes
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let ccfg = config(cc).with_verification(PeerVerification::Pinned(vec![pin]));
    let (acked, elapsed, stats) = link.left().block_on(async move {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let t = QuicTransport::connect_with_socket(socket, server_addr, "amst-linkem-right", ccfg)
            .await
            .unwrap();
        eprintln!("{cc}: connected after {:?}", t0.elapsed());
        let payload = Bytes::from(vec![0x5au8; MESSAGE]);
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + RUN;
        // `send` blocks on credit, so this keeps exactly a window queued until the deadline.
        // A controller that stalls past the idle timeout loses its connection (quinn's CUBIC
        // did once on this link): what it had delivered by then is its goodput.
        let _ = tokio::time::timeout_at(deadline, async {
            while let Ok(()) = t.send(payload.clone()).await {}
            eprintln!("{cc}: the connection failed after {:?}", t0.elapsed());
        })
        .await;
        let acked = t.metrics().messages_acked;
        let out = (acked, start.elapsed().max(RUN), t.quic_stats());
        // What was not delivered in time is not counted; let the CONNECTION_CLOSE go out
        // so that the server's loop ends now rather than at the idle timeout.
        t.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
        out
    });
    eprintln!("{cc}: client done after {:?}", t0.elapsed());
    let received = server.join().unwrap();
    eprintln!("{cc}: server done after {:?}", t0.elapsed());
    assert!(
        received >= acked * MESSAGE as u64,
        "acked more than the receiver got"
    );
    let bps = (acked * MESSAGE as u64 * 8) as f64 / elapsed.as_secs_f64();
    eprintln!(
        "{cc:>12}: {:7.2} Mbit/s goodput = {:5.1}% of {} Mbit/s ({acked} MiB in {:.1} s; \
         {} packets sent, {} lost, {} congestion events)",
        bps / 1e6,
        100.0 * bps / RATE_BPS as f64,
        RATE_BPS / 1_000_000,
        elapsed.as_secs_f64(),
        stats.path.sent_packets,
        stats.path.lost_packets,
        stats.path.congestion_events,
    );
    bps
}

/// The least fraction of the link rate amst-cc's BBR must carry over a whole run.
const MIN_FRACTION_OF_LINK: f64 = 0.6;

#[test]
fn amst_bbr_carries_most_of_a_lossy_long_path_and_twice_quinn_cubic() {
    if let Err(why) = amst_linkem::check_privileges() {
        eprintln!("skipping: {why}");
        return;
    }
    let bdp = RATE_BPS / 8 * RTT.as_millis() as u64 / 1000;
    let link = LinkEm::builder()
        .rate_bps(RATE_BPS)
        .rtt(RTT)
        .loss(0.01)
        .queue_bytes(bdp)
        .seed(7)
        .start()
        .unwrap();
    let bbr = goodput(&link, CongestionControl::AmstBbr, 4433);
    let cubic = goodput(&link, CongestionControl::QuinnCubic, 4434);
    if std::env::var_os("AMST_QUIC_ALL_CC").is_some() {
        goodput(&link, CongestionControl::AmstCubic, 4435);
        goodput(&link, CongestionControl::QuinnBbr, 4436);
    }
    eprintln!("amst-cc BBR / quinn CUBIC = {:.1}x", bbr / cubic);
    assert!(bbr > 0.0, "amst-cc BBR delivered nothing");
    assert!(
        bbr >= MIN_FRACTION_OF_LINK * RATE_BPS as f64,
        "amst-cc BBR carried {:.1} Mbit/s, {:.2} of the {} Mbit/s link; it must carry at \
         least {MIN_FRACTION_OF_LINK}",
        bbr / 1e6,
        bbr / RATE_BPS as f64,
        RATE_BPS / 1_000_000
    );
    assert!(
        bbr >= 2.0 * cubic,
        "amst-cc BBR {:.1} Mbit/s is not 2x quinn CUBIC {:.1} Mbit/s",
        bbr / 1e6,
        cubic / 1e6
    );
}

#[test]
fn a_0rtt_reconnect_saves_a_round_trip_on_a_long_path() {
    if let Err(why) = amst_linkem::check_privileges() {
        eprintln!("skipping: {why}");
        return;
    }
    const ROUNDS: usize = 5;
    let link = LinkEm::builder()
        .rate_bps(RATE_BPS)
        .rtt(RTT)
        .queue_bytes(RATE_BPS / 8 * RTT.as_millis() as u64 / 1000)
        .seed(11)
        .start()
        .unwrap();
    let id = Identity::self_signed(&["amst-linkem-right"]).unwrap();
    let server_addr = SocketAddr::from((link.right().addr(), 4440));
    let scfg = config(CongestionControl::AmstBbr).with_identity(id);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // One warm-up connection, then a full and a 0-RTT reconnect per round.
    let connections = 1 + 2 * ROUNDS;
    let server = link.right().spawn_tokio(async move {
        let socket = UdpSocket::bind(server_addr).unwrap();
        let listener = QuicListener::from_socket(socket, scfg).unwrap();
        ready_tx.send(()).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let t = listener.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                while let Ok(Some(_)) = t.recv().await {}
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        listener.stats()
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let ccfg = config(CongestionControl::AmstBbr);
    let (full, early) = link.left().block_on(async move {
        // Connect, send one small message and wait for its acknowledgement.
        async fn first_message(connector: &QuicConnector, addr: SocketAddr) -> (Duration, bool) {
            let t0 = Instant::now();
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            let t = connector
                .connect_with_socket(socket, addr, "amst-linkem-right")
                .await
                .unwrap();
            t.send(Bytes::from_static(b"first")).await.unwrap();
            t.flush().await.unwrap();
            let took = t0.elapsed();
            let early = t.resumed_with_0rtt();
            t.close().await.unwrap();
            (took, early)
        }
        let connector = QuicConnector::new(ccfg.clone()).unwrap();
        let (warm, was_early) = first_message(&connector, server_addr).await;
        assert!(!was_early);
        eprintln!("first connection: first message acked after {warm:?}");
        let (mut full, mut early) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let fresh = QuicConnector::new(ccfg.clone()).unwrap();
            let (d, e) = first_message(&fresh, server_addr).await;
            assert!(!e);
            full.push(d);
            let (d, e) = first_message(&connector, server_addr).await;
            assert!(
                e,
                "the reconnect through the same connector did not use 0-RTT"
            );
            early.push(d);
        }
        (full, early)
    });
    let stats = server.join().unwrap();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (fm, em) = (median(full.clone()), median(early.clone()));
    eprintln!(
        "{} ms RTT, connect to first message acked: full handshake median {fm:?} {full:?}; \
         0-RTT median {em:?} {early:?}; saved {:?} ({:.2} RTT); listener {stats:?}",
        RTT.as_millis(),
        fm.saturating_sub(em),
        fm.saturating_sub(em).as_secs_f64() / RTT.as_secs_f64(),
    );
    assert_eq!(stats.sessions_early, ROUNDS as u64, "{stats:?}");
    // The expected gap is a whole RTT (100 ms); the medians of one run are far apart.
    assert!(
        em < fm,
        "0-RTT median {em:?} is not below the full handshake's {fm:?}"
    );
}
