//! Session behaviour over the in-memory network: switching under traffic, the flip storm,
//! hybrid two-lane routing, concurrency, warm transports, compatibility and negotiation.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use amst_core::{Mode, Transport};
use amst_hybrid::{Amst, Error, memory_network};
use bytes::Bytes;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundtrip_both_ways_and_close_ends_the_stream() {
    within(20, async {
        let (client, server, _, _l) = memory_pair(builder().build().unwrap()).await;
        assert!(client.is_hybrid() && server.is_hybrid());
        assert_eq!(client.session_id(), server.session_id());
        client.send(Bytes::from_static(b"ping")).await.unwrap();
        assert_eq!(server.recv().await.unwrap().as_deref(), Some(&b"ping"[..]));
        server.send(Bytes::from_static(b"pong")).await.unwrap();
        assert_eq!(client.recv().await.unwrap().as_deref(), Some(&b"pong"[..]));
        // Empty and large (two-frame) messages.
        client.send(Bytes::new()).await.unwrap();
        let big = Bytes::from(vec![9u8; 3 << 20]);
        client.send(big.clone()).await.unwrap();
        assert_eq!(server.recv().await.unwrap().unwrap().len(), 0);
        assert_eq!(server.recv().await.unwrap().unwrap(), big);
        client.flush().await.unwrap();
        let m = client.metrics();
        assert_eq!(m.messages_sent, 3);
        assert_eq!(m.bytes_acked, 4 + (3 << 20));
        assert_eq!(m.unacked_messages, 0);
        client.close().await.unwrap();
        assert_eq!(server.recv().await.unwrap(), None);
        assert!(matches!(
            client.send(Bytes::new()).await,
            Err(Error::Closed(_))
        ));
    })
    .await;
}

/// Continuous traffic of 10k messages in each direction while the client switches
/// datacenter → internet → datacenter → ... ; every message arrives exactly once, in order,
/// and the stream hashes equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_switches_under_traffic_lose_and_repeat_nothing() {
    within(60, async {
        const N: u64 = 10_000;
        let (client, server, connector, _l) = memory_pair(builder().build().unwrap()).await;
        let tx = client.clone();
        let up = tokio::spawn(async move {
            for i in 0..N {
                tx.send(message(i, 4096)).await.unwrap();
            }
        });
        let stx = server.clone();
        let down = tokio::spawn(async move {
            for i in 0..N {
                stx.send(message(i, 300)).await.unwrap();
            }
        });
        let srx = server.clone();
        let got_up = tokio::spawn(async move { receive_checked(&srx, N).await });
        let crx = client.clone();
        let got_down = tokio::spawn(async move { receive_checked(&crx, N).await });
        let mut switches = 0;
        for mode in [
            Mode::Internet,
            Mode::Datacenter,
            Mode::Internet,
            Mode::Datacenter,
        ] {
            tokio::time::sleep(Duration::from_millis(15)).await;
            client.force_mode(mode).await.unwrap();
            assert_eq!(client.mode(), mode);
            switches += 1;
        }
        up.await.unwrap();
        down.await.unwrap();
        assert_eq!(got_up.await.unwrap().as_ref(), digest_of(N, 4096).as_ref());
        assert_eq!(got_down.await.unwrap().as_ref(), digest_of(N, 300).as_ref());
        client.flush().await.unwrap();
        let m = client.metrics();
        assert_eq!(m.switches, switches);
        assert_eq!(m.generation, switches);
        assert_eq!(server.metrics().generation, switches);
        assert_eq!(m.mode, Mode::Datacenter);
        // One dial per switch: every old transport was drained and closed, none reused.
        let dialed: Vec<Mode> = connector.dialed().iter().map(|p| p.preset).collect();
        assert_eq!(
            dialed,
            [
                Mode::Datacenter,
                Mode::Internet,
                Mode::Datacenter,
                Mode::Internet,
                Mode::Datacenter
            ]
        );
        client.close().await.unwrap();
        assert_eq!(server.recv().await.unwrap(), None);
    })
    .await;
}

/// A forced switch every 100 ms for 10 s under traffic both ways: 0 lost, 0 duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flip_storm_every_100ms_for_10s() {
    within(90, async {
        let (client, server, _, _l) = memory_pair(builder().build().unwrap()).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, s2) = (client.clone(), stop.clone());
        let up = tokio::spawn(async move {
            let mut i = 0u64;
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                tx.send(message(i, 2048)).await.unwrap();
                i += 1;
                if i.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            i
        });
        let srx = server.clone();
        let reader = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(m) = srx.recv().await.unwrap() {
                assert_eq!(u64::from_be_bytes(m[..8].try_into().unwrap()), n);
                assert_eq!(m, message(n, 2048));
                n += 1;
            }
            n
        });
        let start = Instant::now();
        let modes = [Mode::Internet, Mode::Datacenter];
        let mut k = 0;
        while start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.force_mode(modes[k % 2]).await.unwrap();
            k += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = up.await.unwrap();
        client.close().await.unwrap();
        let received = reader.await.unwrap();
        assert_eq!(received, sent, "lost or duplicated messages");
        let mut d = client.switch_durations();
        d.sort();
        println!(
            "flip storm (in-memory): {k} switches, {sent} messages, switch p50 {:?} p99 {:?}",
            percentile(&d, 0.5),
            percentile(&d, 0.99)
        );
        assert!(k >= 50, "only {k} switches happened");
        assert_eq!(client.metrics().switches, k as u64);
    })
    .await;
}

/// Hybrid mode: small messages on the low-latency lane, large ones on the bulk lane, one
/// order across both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_mode_splits_by_size_and_keeps_order() {
    within(30, async {
        let config = builder().small_message_threshold(64 << 10).build().unwrap();
        let (client, server, connector, _l) = memory_pair(config).await;
        client.force_mode(Mode::Hybrid).await.unwrap();
        let m = client.metrics();
        assert_eq!(m.mode, Mode::Hybrid);
        assert!(m.bulk_transport.is_some(), "two lanes");
        // The datacenter lane was reused as the low-latency lane; only the bulk one was dialed.
        assert_eq!(connector.dialed().len(), 2);
        let low = client.active_transport();
        let low_before = low.metrics().messages_sent;
        let n = 400u64;
        let tx = client.clone();
        let up = tokio::spawn(async move {
            for i in 0..n {
                // Every 10th message is large.
                let msg = if i.is_multiple_of(10) {
                    let mut v = vec![0u8; 200 << 10];
                    v[..8].copy_from_slice(&i.to_be_bytes());
                    Bytes::from(v)
                } else {
                    Bytes::copy_from_slice(&i.to_be_bytes())
                };
                tx.send(msg).await.unwrap();
            }
        });
        for i in 0..n {
            let m = server.recv().await.unwrap().unwrap();
            assert_eq!(u64::from_be_bytes(m[..8].try_into().unwrap()), i);
            assert_eq!(m.len() > 8, i.is_multiple_of(10));
        }
        up.await.unwrap();
        let small_frames = low.metrics().messages_sent - low_before;
        assert_eq!(
            small_frames,
            n - n / 10,
            "only the small ones on the low-latency lane"
        );
        client.close().await.unwrap();
    })
    .await;
}

/// Many tasks send at once; each task's messages keep their order and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_with_a_switch() {
    within(30, async {
        let (client, server, _, _l) = memory_pair(builder().build().unwrap()).await;
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let c = client.clone();
                tokio::spawn(async move {
                    for i in 0..1000u64 {
                        let mut b = t.to_be_bytes().to_vec();
                        b.extend_from_slice(&i.to_be_bytes());
                        c.send(Bytes::from(b)).await.unwrap();
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(5)).await;
        client.force_mode(Mode::Internet).await.unwrap();
        let mut next = [0u64; 8];
        for _ in 0..8000 {
            let m = server.recv().await.unwrap().unwrap();
            let t = u64::from_be_bytes(m[..8].try_into().unwrap()) as usize;
            let i = u64::from_be_bytes(m[8..].try_into().unwrap());
            assert_eq!(i, next[t], "task {t} out of order");
            next[t] += 1;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(next, [1000; 8]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_close_cleanly() {
    within(20, async {
        let (client, server, _, _l) = memory_pair(builder().build().unwrap()).await;
        client
            .send(Bytes::from_static(b"last words"))
            .await
            .unwrap();
        server.send(Bytes::from_static(b"reply")).await.unwrap();
        assert_eq!(client.recv().await.unwrap().as_deref(), Some(&b"reply"[..]));
        client.close().await.unwrap();
        assert_eq!(
            server.recv().await.unwrap().as_deref(),
            Some(&b"last words"[..])
        );
        assert_eq!(server.recv().await.unwrap(), None);
        server.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_transports_are_reused_on_the_way_back() {
    within(20, async {
        let config = builder().keep_warm(true).build().unwrap();
        let (client, server, connector, _l) = memory_pair(config).await;
        for (i, mode) in [Mode::Internet, Mode::Datacenter, Mode::Internet]
            .into_iter()
            .enumerate()
        {
            client.force_mode(mode).await.unwrap();
            client.send(Bytes::from(vec![i as u8])).await.unwrap();
            assert_eq!(server.recv().await.unwrap().unwrap()[0], i as u8);
        }
        assert_eq!(
            connector.dialed().len(),
            2,
            "one transport per profile, reused"
        );
        assert_eq!(client.metrics().open_transports, 2);
        assert_eq!(client.metrics().switches, 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_can_ask_the_client_to_switch() {
    within(20, async {
        let (client, server, _, _l) = memory_pair(builder().build().unwrap()).await;
        server.force_mode(Mode::Internet).await.unwrap();
        assert_eq!(server.mode(), Mode::Internet);
        // The server installs first; the client swaps when its AttachAck arrives.
        for _ in 0..200 {
            if client.mode() == Mode::Internet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(client.mode(), Mode::Internet);
        server.send(Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(client.recv().await.unwrap().as_deref(), Some(&b"x"[..]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_monotonic_and_ends_at_total() {
    within(20, async {
        let (client, server, _, _l) = memory_pair(builder().build().unwrap()).await;
        let reader = tokio::spawn(async move {
            let n = server.recv().await.unwrap().unwrap().len();
            (n, server)
        });
        let mut seen = Vec::new();
        client
            .send_with_progress(Bytes::from(vec![1u8; 5 << 20]), |done, total| {
                seen.push((done, total))
            })
            .await
            .unwrap();
        assert_eq!(reader.await.unwrap().0, 5 << 20);
        assert_eq!(seen.first(), Some(&(0, 5 << 20)));
        assert_eq!(seen.last(), Some(&(5 << 20, 5 << 20)));
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));
    })
    .await;
}

/// A peer that speaks only the plain transport protocol (no HYBRID) talks to an `Amst` with
/// auto mode off: plain messages both ways, no hybrid header, switching refused clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_peer_without_hybrid_capability() {
    within(20, async {
        let (connector, acceptor) = memory_network(64);
        let connector = connector.with_hybrid(false, true);
        let listener = Amst::listen_with(Arc::new(acceptor), builder().build().unwrap()).unwrap();
        let plain = connector.connect_raw().unwrap();
        let server = listener.accept().await.unwrap();
        assert!(!server.is_hybrid());
        plain.send(Bytes::from_static(b"v1 hello")).await.unwrap();
        assert_eq!(
            server.recv().await.unwrap().as_deref(),
            Some(&b"v1 hello"[..])
        );
        server.send(Bytes::from_static(b"raw reply")).await.unwrap();
        // No hybrid header: the plain peer sees exactly the bytes sent.
        assert_eq!(
            plain.recv().await.unwrap().as_deref(),
            Some(&b"raw reply"[..])
        );
        let err = server
            .force_mode(Mode::Internet)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a hybrid peer"), "{err}");

        // And an Amst client facing a plain server falls back the same way.
        let (connector, acceptor) = memory_network(64);
        let connector = connector.with_hybrid(true, false);
        let client = Amst::connect_with(Arc::new(connector), builder().build().unwrap())
            .await
            .unwrap();
        let raw_server = acceptor_accept(acceptor).await;
        client.send(Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(
            raw_server.recv().await.unwrap().as_deref(),
            Some(&b"abc"[..])
        );
        assert!(!client.metrics().hybrid);
    })
    .await;
}

async fn acceptor_accept(a: amst_hybrid::MemoryAcceptor) -> Arc<dyn Transport> {
    use amst_hybrid::Acceptor;
    a.accept().await.unwrap().transport
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hybrid_versions_are_rejected_clearly() {
    within(20, async {
        let (connector, acceptor) = memory_network(64);
        let _listener = Amst::listen_with(Arc::new(acceptor), builder().build().unwrap()).unwrap();
        let mut config = builder().build().unwrap();
        config.hybrid_versions = (7, 9);
        let err = Amst::connect_with(Arc::new(connector.clone()), config)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Rejected(_)), "{err:?}");
        assert!(
            text.contains("no common hybrid protocol version")
                && text.contains("1..=1")
                && text.contains("7..=9"),
            "{text}"
        );
        // Overlapping ranges pick the highest common version and work.
        let mut config = builder().build().unwrap();
        config.hybrid_versions = (1, 5);
        let c = Amst::connect_with(Arc::new(connector), config)
            .await
            .unwrap();
        assert!(c.is_hybrid());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_to_an_unknown_session_is_rejected() {
    within(20, async {
        use amst_hybrid::wire::HybridFrame;
        let (connector, acceptor) = memory_network(64);
        let _listener = Amst::listen_with(Arc::new(acceptor), builder().build().unwrap()).unwrap();
        let t = connector.connect_raw().unwrap();
        t.send(
            HybridFrame::Attach {
                session_id: [0xab; 16],
                generation: 1,
                index: 0,
                count: 1,
                mode: Mode::Internet,
            }
            .encode(),
        )
        .await
        .unwrap();
        let reply = HybridFrame::decode(t.recv().await.unwrap().unwrap()).unwrap();
        match reply {
            HybridFrame::Reject { reason } => {
                assert!(
                    reason.contains("unknown or closed hybrid session"),
                    "{reason}"
                )
            }
            other => panic!("expected Reject, got {other:?}"),
        }
    })
    .await;
}

/// Large messages still unacknowledged at a switch are resent on the new route; when nothing
/// follows them there, they must still be released by its acknowledgements, and `close`
/// return. (A resent large message used to be counted as two transport messages, so the last
/// one waited for an acknowledgement that could never come, and `close` hung.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_resent_last_in_a_switch_are_released_and_close_returns() {
    resent_large_messages_are_released(Disturbance::ForcedSwitch).await;
}

/// The same when the lane dies: then the new lane alone can acknowledge them. This one fails
/// (hangs) with the old count; in the forced switch the old lane's acknowledgements came
/// first and hid it.
#[tokio::test]
async fn large_messages_resent_after_a_lane_dies_are_released_and_close_returns() {
    resent_large_messages_are_released(Disturbance::LaneCut).await;
}

enum Disturbance {
    ForcedSwitch,
    LaneCut,
}

async fn resent_large_messages_are_released(disturbance: Disturbance) {
    within(20, async {
        let config = builder().recv_buffer(64 << 10).build().unwrap();
        let (client, server, connector, _l) = memory_pair(config).await;
        // The server reads nothing yet, so these stay unacknowledged past its small buffer.
        let messages: Vec<Bytes> = (0..6u8).map(|i| Bytes::from(vec![i; 256 << 10])).collect();
        for m in &messages {
            client.send(m.clone()).await.unwrap();
        }
        assert!(
            client.metrics().unacked_messages > 0,
            "the test needs messages in flight at the switch"
        );
        match disturbance {
            Disturbance::ForcedSwitch => client.force_mode(Mode::Internet).await.unwrap(),
            Disturbance::LaneCut => connector.cut_all(),
        }
        for m in &messages {
            assert_eq!(server.recv().await.unwrap().unwrap(), *m);
        }
        client.flush().await.unwrap();
        assert_eq!(client.metrics().unacked_messages, 0);
        client.close().await.unwrap();
        assert_eq!(server.recv().await.unwrap(), None);
    })
    .await;
}
