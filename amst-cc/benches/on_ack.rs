//! The cost of one ack: amst-cc's BBR and CUBIC, and quinn's own CUBIC, in the same run.
//!
//! `cargo bench -p amst-cc --all-features --bench on_ack`
//!
//! quinn's `Controller::on_ack` needs a `&RttEstimator`, which quinn does not let other
//! crates construct; the bench captures a real one from a short loopback connection.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amst_cc::bbr::{Bbr, BbrConfig};
use amst_cc::cubic::{Cubic, CubicConfig};
use amst_cc::{Ack, CongestionController, RateSample};
use criterion::{Criterion, criterion_group, criterion_main};
use quinn::congestion::{Controller, ControllerFactory, CubicConfig as QuinnCubicConfig};
use quinn_proto::RttEstimator;

const MSS: u64 = 1200;
const STEP: Duration = Duration::from_micros(10);

/// A controller factory whose controllers copy the first `RttEstimator` they see.
struct Spy(Arc<Mutex<Option<RttEstimator>>>);

struct SpyController {
    inner: Box<dyn Controller>,
    out: Arc<Mutex<Option<RttEstimator>>>,
}

impl ControllerFactory for Spy {
    fn build(self: Arc<Self>, now: Instant, mtu: u16) -> Box<dyn Controller> {
        Box::new(SpyController {
            inner: Arc::new(QuinnCubicConfig::default()).build(now, mtu),
            out: self.0.clone(),
        })
    }
}

impl Controller for SpyController {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        if let Ok(mut g) = self.out.lock() {
            g.get_or_insert(*rtt);
        }
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }
    fn on_congestion_event(&mut self, now: Instant, sent: Instant, pc: bool, lost: u64) {
        self.inner.on_congestion_event(now, sent, pc, lost);
    }
    fn on_mtu_update(&mut self, mtu: u16) {
        self.inner.on_mtu_update(mtu);
    }
    fn window(&self) -> u64 {
        self.inner.window()
    }
    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(SpyController {
            inner: self.inner.clone_box(),
            out: self.out.clone(),
        })
    }
    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self.inner.into_any()
    }
}

fn capture_rtt_estimator() -> RttEstimator {
    let out = Arc::new(Mutex::new(None));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let spy = Arc::new(Spy(out.clone()));
    rt.block_on(async move {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let cert = key.cert.der().clone();
        let private =
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
        let mut transport = quinn::TransportConfig::default();
        transport.congestion_controller_factory(spy);
        let transport = Arc::new(transport);
        let mut sc =
            quinn::ServerConfig::with_single_cert(vec![cert.clone()], private).expect("server");
        sc.transport_config(transport.clone());
        let server =
            quinn::Endpoint::server(sc, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        let addr = server.local_addr().expect("addr");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let mut cc = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).expect("client");
        cc.transport_config(transport);
        let mut client =
            quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        client.set_default_client_config(cc);
        let srv = tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("accept");
            let mut r = conn.accept_uni().await.expect("uni");
            let _ = r.read_to_end(1 << 20).await;
            conn.close(0u32.into(), b"");
        });
        let conn = client
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let mut s = conn.open_uni().await.expect("open");
        s.write_all(&[7u8; 64 * 1024]).await.expect("write");
        s.finish().expect("finish");
        let _ = srv.await;
        conn.close(0u32.into(), b"");
        client.wait_idle().await;
    });
    out.lock().expect("lock").take().expect("an ack was seen")
}

fn rate_sample(delivered: u64) -> RateSample {
    RateSample {
        delivered: 10 * MSS,
        interval: Duration::from_millis(10),
        is_app_limited: false,
        prior_delivered: delivered.saturating_sub(100 * MSS),
        lost: 0,
        tx_in_flight: 100 * MSS,
    }
}

fn bench(c: &mut Criterion) {
    let rtt_estimator = capture_rtt_estimator();
    let mut g = c.benchmark_group("on_ack");

    let t0 = Instant::now();
    let mut cubic = Cubic::new(CubicConfig::with_mss(MSS));
    let mut bbr = Bbr::new(BbrConfig::with_datagram_size(MSS), t0);
    for cc in [&mut cubic as &mut dyn CongestionController, &mut bbr] {
        cc.on_packet_sent(t0, 100 * MSS, 100 * MSS);
        cc.on_rtt_sample(
            t0 + Duration::from_millis(20),
            Duration::from_millis(20),
            Duration::ZERO,
        );
    }

    let mut now = t0 + Duration::from_millis(20);
    let mut delivered = 0u64;
    g.bench_function("amst_cc_bbr", |b| {
        b.iter(|| {
            now += STEP;
            delivered += MSS;
            bbr.on_ack(
                now,
                black_box(&Ack {
                    bytes_acked: MSS,
                    bytes_in_flight: 100 * MSS,
                    rate_sample: Some(rate_sample(delivered)),
                }),
            );
        })
    });

    let mut now = t0 + Duration::from_millis(20);
    g.bench_function("amst_cc_cubic", |b| {
        b.iter(|| {
            now += STEP;
            cubic.on_ack(
                now,
                black_box(&Ack {
                    bytes_acked: MSS,
                    bytes_in_flight: 100 * MSS,
                    rate_sample: None,
                }),
            );
        })
    });

    let mut quinn_cubic = Arc::new(QuinnCubicConfig::default()).build(t0, MSS as u16);
    let mut now = t0 + Duration::from_millis(20);
    g.bench_function("quinn_cubic", |b| {
        b.iter(|| {
            now += STEP;
            quinn_cubic.on_ack(
                now,
                now - Duration::from_millis(20),
                black_box(MSS),
                false,
                &rtt_estimator,
            );
        })
    });

    // amst-cc CUBIC through the quinn adapter: one packet's on_ack plus on_end_acks.
    let mut adapted = Arc::new(amst_cc::quinn::CubicFactory::default()).build(t0, MSS as u16);
    let mut now = t0;
    let mut pn = 0;
    g.bench_function("amst_cc_cubic_via_quinn_adapter", |b| {
        b.iter(|| {
            now += STEP;
            pn += 1;
            adapted.on_sent(now, MSS, pn);
            adapted.on_ack(now, now, black_box(MSS), false, &rtt_estimator);
            adapted.on_end_acks(now, 0, false, Some(pn));
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
