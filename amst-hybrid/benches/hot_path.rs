//! The hot path when no switch happens: `Amst::send` over an in-memory transport (one
//! `ArcSwap` load, the lane's send lock, one ledger push, the transport send), next to the
//! bare `ArcSwap` load plus dispatch and the bare transport send, so the hybrid layer's own
//! cost can be read off as a difference.

use std::sync::Arc;

use amst_core::{InMemoryTransport, Mode, Transport, codec::Psk};
use amst_hybrid::{Amst, AmstConfig, memory_network};
use arc_swap::ArcSwap;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};

fn config() -> AmstConfig {
    AmstConfig::builder(Psk::new(b"bench bench bench").unwrap())
        .auto_mode(false)
        .initial_mode(Mode::Datacenter)
        .build()
        .unwrap()
}

fn hot_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let msg = Bytes::from_static(&[7u8; 64]);

    // The route load plus dispatch alone.
    struct Route {
        low: Arc<u64>,
        bulk: Arc<u64>,
        threshold: usize,
    }
    let route = ArcSwap::from_pointee(Route {
        low: Arc::new(1),
        bulk: Arc::new(2),
        threshold: 1 << 20,
    });
    c.bench_function("arcswap_load_and_dispatch", |b| {
        b.iter(|| {
            let r = route.load();
            let lane = if std::hint::black_box(64usize) < r.threshold {
                &r.low
            } else {
                &r.bulk
            };
            std::hint::black_box(**lane)
        })
    });

    // A bare in-memory transport send, drained by a reader task.
    let (a, b) = InMemoryTransport::pair(1 << 16);
    let b = Arc::new(b);
    let reader = b.clone();
    rt.spawn(async move { while let Ok(Some(_)) = reader.recv().await {} });
    c.bench_function("in_memory_transport_send_64B", |bench| {
        bench.to_async(&rt).iter(|| a.send(msg.clone()))
    });

    // The whole Amst::send.
    let (client, server) = rt.block_on(async {
        let (connector, acceptor) = memory_network(1 << 16);
        let listener = Amst::listen_with(Arc::new(acceptor), config()).unwrap();
        let client = Amst::connect_with(Arc::new(connector), config())
            .await
            .unwrap();
        let server = listener.accept().await.unwrap();
        std::mem::forget(listener);
        (client, server)
    });
    let srv = server.clone();
    rt.spawn(async move { while let Ok(Some(_)) = srv.recv().await {} });
    c.bench_function("amst_send_64B", |bench| {
        bench.to_async(&rt).iter(|| client.send(msg.clone()))
    });
    rt.block_on(async {
        client.flush().await.unwrap();
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
