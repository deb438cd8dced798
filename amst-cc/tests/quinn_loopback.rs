//! A real quinn connection over 127.0.0.1 with each amst-cc controller plugged in through
//! `TransportConfig::congestion_controller_factory`, moving 64 MiB and checking every byte.
#![cfg(feature = "quinn")]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::ControllerFactory;
use quinn::{ClientConfig, Endpoint, ServerConfig, TransportConfig};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

const TOTAL: usize = 64 * 1024 * 1024;
const CHUNK: usize = 256 * 1024;

/// Byte `i` of the stream: position-dependent so that reordering or duplication is caught.
fn pattern(offset: usize, buf: &mut [u8]) {
    for (j, b) in buf.iter_mut().enumerate() {
        let i = offset + j;
        *b = (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8 ^ (i >> 16) as u8;
    }
}

fn transport(factory: Arc<dyn ControllerFactory + Send + Sync>) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.congestion_controller_factory(factory);
    Arc::new(t)
}

async fn transfer(factory: Arc<dyn ControllerFactory + Send + Sync>) -> Duration {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert = key.cert.der().clone();
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
    let mut server_config =
        ServerConfig::with_single_cert(vec![cert.clone()], private).expect("server config");
    server_config.transport_config(transport(factory.clone()));
    let server = Endpoint::server(server_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("server");
    let server_addr = server.local_addr().expect("addr");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let mut client_config =
        ClientConfig::with_root_certificates(Arc::new(roots)).expect("client config");
    client_config.transport_config(transport(factory));
    let mut client = Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("client");
    client.set_default_client_config(client_config);

    let receiver = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("accept");
        let mut recv = conn.accept_uni().await.expect("stream");
        let mut got = 0usize;
        let mut buf = vec![0u8; CHUNK];
        let mut want = vec![0u8; CHUNK];
        while let Some(n) = recv.read(&mut buf).await.expect("read") {
            pattern(got, &mut want[..n]);
            assert!(buf[..n] == want[..n], "corrupt data at offset {got}");
            got += n;
        }
        conn.close(0u32.into(), b"done");
        server.wait_idle().await;
        got
    });

    let start = Instant::now();
    let conn = client
        .connect(server_addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let mut send = conn.open_uni().await.expect("open");
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    while sent < TOTAL {
        pattern(sent, &mut buf);
        send.write_all(&buf).await.expect("write");
        sent += CHUNK;
    }
    send.finish().expect("finish");
    let got = receiver.await.expect("receiver");
    let elapsed = start.elapsed();
    assert_eq!(got, TOTAL);
    let stats = conn.stats();
    eprintln!(
        "64 MiB in {elapsed:?} ({:.0} Mbit/s), cwnd {}, lost packets {}",
        TOTAL as f64 * 8.0 / elapsed.as_secs_f64() / 1e6,
        stats.path.cwnd,
        stats.path.lost_packets
    );
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    elapsed
}

async fn bounded(factory: Arc<dyn ControllerFactory + Send + Sync>) {
    tokio::time::timeout(Duration::from_secs(240), transfer(factory))
        .await
        .expect("64 MiB transfer timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cubic_moves_64_mib_over_loopback() {
    bounded(Arc::new(amst_cc::quinn::CubicFactory::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bbr_moves_64_mib_over_loopback() {
    bounded(Arc::new(amst_cc::quinn::BbrFactory::default())).await;
}
