//! TLS on every stream: integrity, pinning, PEM identities, mismatches, faults, and proof
//! that the bytes on the wire are encrypted (a relay scans them for a marker).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amst_core::codec::CloseCode;
use amst_core::{Error, ProtocolError, Transport};
use amst_tcp::{Fingerprint, Identity, TcpConfig, TcpListener, TcpTls, TcpTransport};
use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `fixed(streams)` with TLS on, the server's certificate bound through the PSK handshake.
fn tls(streams: usize) -> TcpConfig {
    fixed(streams).with_tls(Some(TcpTls::psk_bound()))
}

async fn bind(cfg: TcpConfig) -> Arc<TcpListener> {
    Arc::new(
        TcpListener::bind("127.0.0.1:0".parse().unwrap(), cfg)
            .await
            .unwrap(),
    )
}

async fn connect_pair(
    listener: &Arc<TcpListener>,
    client: TcpConfig,
) -> amst_core::Result<(TcpTransport, TcpTransport)> {
    let l = listener.clone();
    let accept = tokio::spawn(async move { l.accept().await });
    let n = client.streams;
    let c = TcpTransport::connect(listener.local_addr(), client).await;
    match c {
        Ok(c) => {
            all_streams(&c, n).await;
            Ok((c, accept.await.unwrap()?))
        }
        Err(e) => {
            accept.abort();
            Err(e)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_over_8_tls_streams_pinned_by_fingerprint_arrive_intact() {
    init_tracing();
    let listener = bind(tls(8)).await;
    let pin = listener
        .fingerprint()
        .expect("TLS is on, so there is a certificate");
    let client = fixed(8).with_tls(Some(TcpTls::pinned(vec![pin])));
    let (c, s) = connect_pair(&listener, client).await.unwrap();
    assert_eq!(c.stream_stats().len(), 8);
    let rx = tokio::spawn(async move { recv_all(&s).await });
    let total = 64u64 << 20;
    let sent = send_all(&c, total, 1 << 20).await;
    c.close().await.unwrap();
    let (bytes, msgs, got) = rx.await.unwrap();
    assert_eq!((bytes, msgs), (total, 64));
    assert_eq!(got, sent, "SHA-256 differs over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internet_profile_has_tls_on_and_datacenter_off_by_default() {
    init_tracing();
    assert!(TcpConfig::internet(psk()).tls.is_some());
    assert!(TcpConfig::datacenter(psk()).tls.is_none());
    // Both sides on the internet defaults talk, with no certificate set up by hand.
    let cfg = TcpConfig::internet(psk()).with_streams(4);
    let listener = bind(cfg.clone()).await;
    assert!(listener.fingerprint().is_some());
    let (c, s) = connect_pair(&listener, cfg).await.unwrap();
    c.send(Bytes::from_static(b"over tls")).await.unwrap();
    assert_eq!(s.recv().await.unwrap().as_deref(), Some(&b"over tls"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_from_pem_files_is_served_and_pinned() {
    init_tracing();
    let ck = rcgen::generate_simple_self_signed(vec!["amst.test".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("amst-tcp-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let id = Identity::from_pem_files(&cert, &key).unwrap();
    let pin = Fingerprint::of(ck.cert.der());
    assert_eq!(id.fingerprint(), pin);
    let server = fixed(2).with_tls(Some(TcpTls::psk_bound().with_identity(id)));
    let listener = bind(server).await;
    assert_eq!(listener.fingerprint(), Some(pin));
    let client = fixed(2).with_tls(Some(TcpTls::pinned(vec![pin])));
    let (c, s) = connect_pair(&listener, client).await.unwrap();
    c.send(Bytes::from_static(b"pem")).await.unwrap();
    assert_eq!(s.recv().await.unwrap().as_deref(), Some(&b"pem"[..]));
    let missing = Identity::from_pem_files(dir.join("nope.pem"), &key)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.pem"), "{missing}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fingerprint_is_refused_with_a_clear_error() {
    init_tracing();
    let listener = bind(tls(2)).await;
    let wrong = Fingerprint([0x42; 32]);
    let client = fixed(2).with_tls(Some(TcpTls::pinned(vec![wrong])));
    let started = Instant::now();
    let err = connect_pair(&listener, client).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::Config {
                field: "tls.verify",
                ..
            }
        ) && msg.contains("not among the pinned")
            && msg.contains(&listener.fingerprint().unwrap().to_string()),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The server keeps serving.
    let ok = fixed(2).with_tls(Some(TcpTls::pinned(vec![listener.fingerprint().unwrap()])));
    connect_pair(&listener, ok).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_against_a_plain_server_fails_clearly_and_fast() {
    init_tracing();
    let listener = bind(fixed(2)).await;
    let started = Instant::now();
    let err = connect_pair(&listener, tls(2)).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Config { field: "tls", .. }) && msg.contains("plaintext"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    connect_pair(&listener, fixed(2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_against_a_tls_server_fails_clearly_and_fast() {
    init_tracing();
    let listener = bind(tls(2)).await;
    let started = Instant::now();
    let err = connect_pair(&listener, fixed(2)).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::PeerClosed {
                code: CloseCode::ProtocolError,
                ..
            }
        ) && msg.contains("`tls` is on at this server"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    connect_pair(&listener, tls(2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_3_of_8_tls_streams_mid_transfer_loses_nothing() {
    init_tracing();
    let listener = bind(tls(8)).await;
    let (client, server) = connect_pair(&listener, tls(8)).await.unwrap();
    let rx = tokio::spawn(async move { (recv_all(&server).await, server) });
    let total = 128u64 << 20;
    let client = Arc::new(client);
    let sender = {
        let c = client.clone();
        tokio::spawn(async move { send_all(&c, total, 1 << 20).await })
    };
    while client.metrics().bytes_sent <= total / 4 {
        assert!(!sender.is_finished(), "transfer ended before the fault");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(client.fault_shutdown_streams(3), 3);
    let sent = sender.await.unwrap();
    client.flush().await.unwrap();
    assert!(
        client.metrics().chunks_retransmitted > 0,
        "chunks on the dead streams were not resent"
    );
    for _ in 0..500 {
        if client.stream_stats().len() == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        client.stream_stats().len(),
        8,
        "lost TLS streams not re-dialled"
    );
    let client = Arc::into_inner(client).unwrap();
    client.close().await.unwrap();
    let ((bytes, msgs, got), _server) = rx.await.unwrap();
    assert_eq!((bytes, msgs), (total, 128));
    assert_eq!(got, sent, "SHA-256 differs after the fault over TLS");
}

/// A TCP relay to `upstream` that forwards every byte both ways and sets `seen` if the
/// client-to-server bytes ever contain `marker` (also across read boundaries).
async fn scanning_relay(
    upstream: SocketAddr,
    marker: &'static [u8],
    seen: Arc<AtomicBool>,
) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((down, _)) = l.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut dr, mut dw) = down.into_split();
                let (mut ur, mut uw) = up.into_split();
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ur, &mut dw).await;
                    let _ = dw.shutdown().await;
                });
                let mut buf = vec![0u8; 64 << 10];
                let mut tail: Vec<u8> = Vec::new();
                loop {
                    let n = match dr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    tail.extend_from_slice(&buf[..n]);
                    if tail.windows(marker.len()).any(|w| w == marker) {
                        seen.store(true, Ordering::Relaxed);
                    }
                    let keep = tail.len().saturating_sub(marker.len() - 1);
                    tail.drain(..keep);
                    if uw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = uw.shutdown().await;
                let _ = back.await;
            });
        }
    });
    addr
}

async fn marker_seen_on_the_wire(cfg: TcpConfig) -> bool {
    marker_seen_between(cfg.clone(), cfg).await
}

/// Whether a marker sent by a `client` session to a `server` listener crosses the wire in
/// the clear.
async fn marker_seen_between(server: TcpConfig, cfg: TcpConfig) -> bool {
    const MARKER: &[u8] = b"AMST-PLAINTEXT-MARKER-7f3a9c";
    let listener = bind(server).await;
    let seen = Arc::new(AtomicBool::new(false));
    let relay = scanning_relay(listener.local_addr(), MARKER, seen.clone()).await;
    let l = listener.clone();
    let accept = tokio::spawn(async move { l.accept().await.unwrap() });
    let c = TcpTransport::connect(relay, cfg).await.unwrap();
    let s = accept.await.unwrap();
    let mut msg = vec![b'.'; 100_000];
    msg[50_000..50_000 + MARKER.len()].copy_from_slice(MARKER);
    let msg = Bytes::from(msg);
    c.send(msg.clone()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), Some(msg));
    c.close().await.unwrap();
    seen.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_hides_the_payload_on_the_wire_and_plain_tcp_does_not() {
    init_tracing();
    assert!(
        marker_seen_on_the_wire(fixed(2)).await,
        "the relay must see the marker in plaintext, or it proves nothing"
    );
    assert!(
        !marker_seen_on_the_wire(tls(2)).await,
        "the marker crossed the wire in the clear with TLS on"
    );
}

/// A listener with `plaintext_too` serves TLS and plaintext clients on one port, each stream
/// as its client chose: the TLS client's payload stays hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_with_plaintext_too_serves_both_and_tls_stays_encrypted() {
    init_tracing();
    let both = || fixed(2).with_tls(Some(TcpTls::psk_bound().with_plaintext_too()));
    assert!(
        !marker_seen_between(both(), tls(2)).await,
        "a TLS client's marker crossed the wire in the clear"
    );
    assert!(
        marker_seen_between(both(), fixed(2)).await,
        "the plaintext client was not served in plaintext"
    );
}

/// A man in the middle: terminates the client's TLS with its own certificate and opens its
/// own TLS session to the server, relaying the decrypted bytes both ways.
async fn tls_interceptor(upstream: SocketAddr) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ck = rcgen::generate_simple_self_signed(vec!["amst".to_string()]).unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        )
        .unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((down, _)) = l.accept().await else {
                return;
            };
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let Ok(mut down) = acceptor.accept(down).await else {
                    return;
                };
                let Ok(up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let name = rustls::pki_types::ServerName::try_from("amst").unwrap();
                let Ok(mut up) = connector.connect(name, up).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    addr
}

/// The interceptor's own upstream check: anything goes (it is the attacker).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_man_in_the_middle_cannot_complete_the_psk_bound_handshake() {
    init_tracing();
    let listener = bind(tls(1)).await;
    let mitm = tls_interceptor(listener.local_addr()).await;
    // PskBound checks no certificate: the binding is what stops the relay.
    let started = Instant::now();
    let err = TcpTransport::connect(mitm, tls(1)).await.unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::AuthFailed)),
        "expected AuthFailed through the interceptor, got {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // Pinning refuses the interceptor's certificate before any PSK exchange.
    let pinned = fixed(1).with_tls(Some(TcpTls::pinned(vec![listener.fingerprint().unwrap()])));
    let err = TcpTransport::connect(mitm, pinned).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config {
                field: "tls.verify",
                ..
            }
        ),
        "{err}"
    );
    // Straight to the server, the same configuration works.
    connect_pair(&listener, tls(1)).await.unwrap();
}
