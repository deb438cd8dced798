//! Auto mode on loopback: a transfer that starts in internet mode (the seed's initial mode)
//! over a path that is plainly a datacenter one reaches datacenter mode within the
//! detector's start-up periods, with the seed's 5 s check period.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amst_core::Mode;
use amst_hybrid::Amst;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_transfer_in_auto_mode_reaches_datacenter_quickly() {
    within(60, async {
        let config = builder()
            .auto_mode(true)
            .initial_mode(Mode::Internet)
            .check_period(Duration::from_secs(5))
            .build()
            .unwrap();
        let listener = Amst::listen("127.0.0.1:0".parse().unwrap(), config.clone())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let start = Instant::now();
        let client = Amst::connect(addr, config).await.unwrap();
        let server = listener.accept().await.unwrap();
        assert_eq!(client.metrics().mode, Mode::Internet);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, s2) = (client.clone(), stop.clone());
        let sender = tokio::spawn(async move {
            let mut i = 0u64;
            // Bounded: at most 4 GiB of 1 MiB messages, and stopped once the mode is known.
            while !s2.load(Ordering::Relaxed) && i < 4096 {
                if tx.send(message(i, 1 << 20)).await.is_err() {
                    break;
                }
                i += 1;
            }
            i
        });
        let reader = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok(Some(m)) = server.recv().await {
                assert_eq!(u64::from_be_bytes(m[..8].try_into().unwrap()), n);
                n += 1;
            }
            n
        });
        let mut took = None;
        while start.elapsed() < Duration::from_secs(10) {
            if client.metrics().mode == Mode::Datacenter {
                took = Some(start.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let sent = sender.await.unwrap();
        println!("auto mode on loopback: datacenter after {took:?} ({sent} messages sent)");
        let took = took.expect("datacenter mode within 10 s");
        // The goal, 1 s, is measured by `cargo xtask bench --scenario detect` (gate D3); this
        // bound only catches a detector that no longer switches, on however loaded a machine.
        assert!(took <= Duration::from_secs(3), "took {took:?}");
        client.close().await.unwrap();
        assert_eq!(reader.await.unwrap(), sent, "every message arrived once");
    })
    .await;
}
