//! End-to-end over loopback: bulk integrity, ordering, concurrency, bounded memory, live
//! stream changes and probes.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use amst_core::Transport;
use bytes::Bytes;
use common::*;

async fn gib_through(streams: usize) {
    init_tracing();
    let (client, server) = pair(fixed(streams), fixed(streams)).await;
    assert_eq!(client.stream_stats().len(), streams);
    let rx = tokio::spawn(async move {
        let r = recv_all(&server).await;
        (r, server)
    });
    let total = 1u64 << 30;
    let sent = send_all(&client, total, 1 << 20).await;
    client.close().await.unwrap();
    let ((bytes, msgs, got), server) = rx.await.unwrap();
    assert_eq!(bytes, total);
    assert_eq!(msgs, 1024);
    assert_eq!(got, sent, "SHA-256 of received data differs");
    let m = client.metrics();
    assert_eq!(m.messages_acked, 1024);
    assert!(m.bytes_sent >= total);
    assert_eq!(server.metrics().messages_received, 1024);
    // Work stealing spread the load: every stream carried data.
    let per: Vec<u64> = server
        .stream_stats()
        .iter()
        .map(|s| s.bytes_received)
        .collect();
    assert!(per.is_empty() || per.iter().all(|&b| b > 0), "{per:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_through_8_streams_arrives_intact() {
    gib_through(8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_through_64_streams_arrives_intact() {
    gib_through(64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_small_messages_arrive_in_order() {
    init_tracing();
    let (client, server) = pair(fixed(8), fixed(8)).await;
    let rx = tokio::spawn(async move {
        let mut n = 0u32;
        while let Some(m) = server.recv().await.unwrap() {
            let i = u32::from_be_bytes(m[..4].try_into().unwrap());
            assert_eq!(i, n, "message out of order");
            assert_eq!(m.len(), 4 + (i as usize % 200));
            assert!(m[4..].iter().all(|&b| b == i as u8));
            n += 1;
        }
        n
    });
    for i in 0..10_000u32 {
        let mut v = i.to_be_bytes().to_vec();
        v.resize(4 + (i as usize % 200), i as u8);
        client.send(Bytes::from(v)).await.unwrap();
    }
    client.flush().await.unwrap();
    assert_eq!(client.metrics().messages_acked, 10_000);
    client.close().await.unwrap();
    assert_eq!(rx.await.unwrap(), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_each_keep_their_order() {
    init_tracing();
    let (client, server) = pair(fixed(8), fixed(8)).await;
    let client = Arc::new(client);
    const SENDERS: u8 = 8;
    const EACH: u32 = 500;
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let mut v = vec![s];
                v.extend_from_slice(&i.to_be_bytes());
                v.resize(5 + (i as usize * 37) % 70_000, s);
                c.send(Bytes::from(v)).await.unwrap();
            }
        }));
    }
    let rx = tokio::spawn(async move {
        let mut next: HashMap<u8, u32> = HashMap::new();
        let mut total = 0;
        while let Some(m) = server.recv().await.unwrap() {
            let s = m[0];
            let i = u32::from_be_bytes(m[1..5].try_into().unwrap());
            let want = next.entry(s).or_default();
            assert_eq!(i, *want, "sender {s} out of order");
            *want += 1;
            total += 1;
        }
        (total, next)
    });
    for t in tasks {
        t.await.unwrap();
    }
    client.close().await.unwrap();
    let (total, next) = rx.await.unwrap();
    assert_eq!(total, SENDERS as u32 * EACH);
    assert!(next.values().all(|&n| n == EACH));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_window_flows_in_bounded_memory() {
    init_tracing();
    let mut cfg = fixed(4);
    cfg.receive_window = 1 << 20;
    cfg.send_queue = 1 << 20;
    cfg.chunk_size = 64 << 10;
    let (client, server) = pair(cfg.clone(), cfg).await;
    // Under a quarter of the default 128 MiB budget, the largest message a receiver takes.
    let big = message(7, 24 << 20);
    let expect = big.clone();
    let rx = tokio::spawn(async move {
        let m = server.recv().await.unwrap().unwrap();
        // A second, small message: the window is not stuck after the big one.
        let m2 = server.recv().await.unwrap().unwrap();
        (m, m2, server.buffer_stats(), server)
    });
    client.send(big).await.unwrap();
    client.send(Bytes::from_static(b"after")).await.unwrap();
    client.flush().await.unwrap();
    let tx_stats = client.buffer_stats();
    let (m, m2, rx_stats, _server) = rx.await.unwrap();
    assert!(m == expect, "large message corrupted");
    assert_eq!(&m2[..], b"after");
    // The sender never had more than the window (plus one chunk) unacknowledged beyond the
    // message the application handed over; the receiver never held more than the head
    // message plus the window.
    assert!(
        tx_stats.send_peak <= (24 << 20) + (1 << 20) + (64 << 10),
        "{tx_stats:?}"
    );
    assert!(rx_stats.recv_peak <= (24 << 20) + (1 << 20), "{rx_stats:?}");
    assert_eq!(tx_stats.send_unacked, 0);
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_bounds_what_an_idle_receiver_buffers() {
    init_tracing();
    let mut cfg = fixed(4);
    cfg.receive_window = 2 << 20;
    cfg.send_queue = 1 << 20;
    cfg.chunk_size = 64 << 10;
    let (client, server) = pair(cfg.clone(), cfg).await;
    // The receiver takes nothing: the sender must stop at the window, and `send` must block
    // once its own queue is full.
    let c = Arc::new(client);
    let sender = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..64 {
                c.send(message(i, 256 << 10)).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sender.is_finished(), "send never blocked");
    let rx = server.buffer_stats();
    assert!(rx.recv_buffered <= (2 << 20) + (256 << 10), "{rx:?}");
    let tx = c.buffer_stats();
    assert!(tx.send_queued + tx.send_unacked <= (4 << 20), "{tx:?}");
    // Draining lets everything through.
    let drain = tokio::spawn(async move {
        for i in 0..64 {
            let m = server.recv().await.unwrap().unwrap();
            assert!(m == message(i, 256 << 10));
        }
        server
    });
    sender.await.unwrap();
    c.flush().await.unwrap();
    let _server = drain.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_can_be_added_and_removed_live() {
    init_tracing();
    let (client, server) = pair(fixed(4), fixed(4)).await;
    let rx = tokio::spawn(async move { (recv_all(&server).await, server) });
    let total = 96u64 << 20;
    let client = Arc::new(client);
    let sender = {
        let c = client.clone();
        tokio::spawn(async move { send_all(&c, total, 256 << 10).await })
    };
    client.add_stream().await.unwrap();
    client.add_stream().await.unwrap();
    assert_eq!(client.stream_stats().len(), 6);
    client.remove_stream().await.unwrap();
    client.remove_stream().await.unwrap();
    client.remove_stream().await.unwrap();
    let sent = sender.await.unwrap();
    client.flush().await.unwrap();
    // Removals are graceful: nothing was resent.
    assert_eq!(client.metrics().chunks_retransmitted, 0);
    for _ in 0..100 {
        if client.stream_stats().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.stream_stats().len(), 3);
    let client = Arc::into_inner(client).unwrap();
    client.close().await.unwrap();
    let ((bytes, _, got), _server) = rx.await.unwrap();
    assert_eq!(bytes, total);
    assert_eq!(got, sent);
}

/// A server that accepts one session and drops its listener still gets the whole session:
/// its remaining and added streams join; new sessions are refused with a clear error; the
/// port closes once the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_listener_serves_its_sessions_and_refuses_new_ones() {
    init_tracing();
    let listener = amst_tcp::TcpListener::bind("127.0.0.1:0".parse().unwrap(), fixed(8))
        .await
        .unwrap();
    let addr = listener.local_addr();
    let server = tokio::spawn(async move { listener.accept().await.unwrap() });
    let client = amst_tcp::TcpTransport::connect(addr, fixed(8))
        .await
        .unwrap();
    let server = server.await.unwrap();
    // Joins through the dropped listener: the eight initial streams and one added later.
    all_streams(&client, 8).await;
    client.add_stream().await.unwrap();
    assert_eq!(client.stream_stats().len(), 9);
    let rx = tokio::spawn(async move { (recv_all(&server).await, server) });
    let total = 64u64 << 20;
    let sent = send_all(&client, total, 1 << 20).await;

    let refused = amst_tcp::TcpTransport::connect(addr, fixed(1)).await;
    let err = match refused {
        Ok(c) => {
            // The refusal may come as the session's first Close rather than from connect.
            let r = c.send(Bytes::from_static(b"x")).await.and(c.flush().await);
            r.expect_err("a new session was served by a dropped listener")
        }
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("listener was dropped"),
        "expected a refusal naming the dropped listener, got {err}"
    );

    client.close().await.unwrap();
    let ((bytes, _, got), server) = rx.await.unwrap();
    assert_eq!(bytes, total);
    assert_eq!(got, sent);
    drop(server);
    // Bounded wait for the port to close: the listener task checks every 250 ms.
    let mut closed = false;
    for _ in 0..40 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "the port stayed open after the last session ended");
}

/// A session dropped without `close` tells its peer: the peer's `recv` ends cleanly, its
/// next send fails, and it does not re-dial streams into a session that no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_session_ends_it_cleanly_at_the_peer() {
    init_tracing();
    let (client, server) = pair(fixed(4), fixed(4)).await;
    for i in 0..10 {
        client.send(message(i, 100_000)).await.unwrap();
    }
    client.flush().await.unwrap();
    for _ in 0..10 {
        assert!(server.recv().await.unwrap().is_some());
    }
    drop(server);
    let end = tokio::time::timeout(Duration::from_secs(5), client.recv())
        .await
        .expect("the peer's drop never reached the client");
    assert_eq!(
        end.unwrap(),
        None,
        "a dropped peer with nothing pending ends cleanly"
    );
    assert!(client.send(Bytes::from_static(b"late")).await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.stream_stats().len(), 0, "streams were re-dialled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_measures_rtt_and_a_burst() {
    init_tracing();
    let (client, server) = pair(fixed(2), fixed(2)).await;
    let s = client.probe(0).await.unwrap();
    assert!(s.rtt < Duration::from_secs(1));
    assert_eq!(s.delivery_rate, None);
    let s = client.probe(1 << 20).await.unwrap();
    assert!(s.delivery_rate.unwrap() > 0);
    assert!(s.bytes_used >= 1 << 20);
    // Probes carry no messages.
    assert_eq!(server.metrics().messages_received, 0);
    client.close().await.unwrap();
    assert_eq!(server.recv().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_graceful_and_later_calls_fail_cleanly() {
    init_tracing();
    let (client, server) = pair(fixed(3), fixed(3)).await;
    client
        .send(Bytes::from_static(b"last words"))
        .await
        .unwrap();
    client.close().await.unwrap();
    assert_eq!(
        server.recv().await.unwrap().as_deref(),
        Some(&b"last words"[..])
    );
    assert_eq!(server.recv().await.unwrap(), None);
    assert!(matches!(
        client.send(Bytes::from_static(b"x")).await,
        Err(amst_core::Error::Closed)
    ));
    let err = server.send(Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, amst_core::Error::PeerClosed { .. }), "{err}");
    // Oversized messages are refused before anything is queued.
    let mut small = fixed(1);
    small.max_message = 1000;
    let (c2, _s2) = pair(small.clone(), small).await;
    let err = c2.send(Bytes::from(vec![0; 1001])).await.unwrap_err();
    assert!(matches!(
        err,
        amst_core::Error::MessageTooLarge {
            len: 1001,
            limit: 1000
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_carry_data_at_once() {
    init_tracing();
    // Each side buffers all 64 MiB unread until its own send is flushed: a budget with room
    // for that in all four receivers of this process.
    let budget = amst_core::MemoryBudget::new(512 << 20);
    let (client, server) = pair(
        fixed(4).with_memory_budget(budget.clone()),
        fixed(4).with_memory_budget(budget),
    )
    .await;
    let (client, server) = (Arc::new(client), Arc::new(server));
    let total = 64u64 << 20;
    let a = {
        let (c, s) = (client.clone(), server.clone());
        tokio::spawn(async move {
            let h = send_all(&c, total, 100_000).await;
            c.flush().await.unwrap();
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut got = 0;
            while got < total {
                let m = s.recv().await.unwrap().unwrap();
                got += m.len() as u64;
                ctx.update(&m);
            }
            (h, ctx.finish().as_ref().to_vec())
        })
    };
    let b = {
        let (c, s) = (client.clone(), server.clone());
        tokio::spawn(async move {
            let h = send_all(&s, total, 300_000).await;
            s.flush().await.unwrap();
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut got = 0;
            while got < total {
                let m = c.recv().await.unwrap().unwrap();
                got += m.len() as u64;
                ctx.update(&m);
            }
            (h, ctx.finish().as_ref().to_vec())
        })
    };
    let (sent_c, recv_s) = a.await.unwrap();
    let (sent_s, recv_c) = b.await.unwrap();
    assert_eq!(sent_c, recv_s);
    assert_eq!(sent_s, recv_c);
}

#[test]
fn the_transport_is_shareable_as_a_trait_object() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<amst_tcp::TcpTransport>();
    send_sync::<amst_tcp::TcpListener>();
    let _: Option<Arc<dyn Transport>> = None::<Arc<amst_tcp::TcpTransport>>.map(|t| t as _);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tuner_moves_streams_and_chunks_toward_the_path() {
    init_tracing();
    // Internet profile on loopback: the BDP is tiny, so the tuner walks the stream count down
    // toward the profile's floor of 4, and sizes chunks by the rate instead (at most
    // `MAX_CHUNKS_PER_SECOND`): smaller than the profile's below about 1 Gbit/s, larger above,
    // which a debug build on a busy machine may be either side of. Under CUBIC: under BBR it
    // never sheds streams (see `amst_tcp::tuner::decide`).
    let mut cfg = amst_tcp::TcpConfig::internet(psk());
    cfg.congestion = amst_tcp::Congestion::Cubic;
    cfg.adapt_period = Duration::from_millis(200);
    cfg.sample_period = Duration::from_millis(50);
    let (client, server) = pair(cfg.clone(), cfg).await;
    let rx = tokio::spawn(async move { (recv_all(&server).await, server) });
    let first_chunk = client.chunk_size();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut i = 0;
    while tokio::time::Instant::now() < deadline
        && (client.stream_stats().len() > 4 || client.chunk_size() == first_chunk)
    {
        client.send(message(i, 256 << 10)).await.unwrap();
        i += 1;
    }
    let streams = client.stream_stats().len();
    let chunk = client.chunk_size();
    client.close().await.unwrap();
    let ((bytes, msgs, _), _server) = rx.await.unwrap();
    assert_eq!(msgs, i);
    assert_eq!(bytes, i * (256 << 10));
    assert!((4..8).contains(&streams), "streams {streams}");
    assert_ne!(chunk, first_chunk, "the chunk size never adapted");
    assert!(chunk.is_power_of_two(), "chunk {chunk}");
    assert!((amst_tcp::MIN_CHUNK..=amst_tcp::MAX_CHUNK).contains(&chunk));
}
