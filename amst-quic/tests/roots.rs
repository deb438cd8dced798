//! `PeerVerification::Roots`: the server presents a certificate signed by a CA (made here
//! with rcgen) and the client trusts the CA, not the certificate. A certificate from another
//! CA and a server name the certificate does not cover are refused with a clear error.

use std::net::SocketAddr;

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_quic::{
    Identity, PeerVerification, QuicConfig, QuicConnector, QuicListener, QuicTransport,
    roots_from_pem_file,
};
use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn psk() -> Psk {
    Psk::new(b"amst-quic roots test key, long enough").unwrap()
}

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf for `names`, signed by this CA, with the CA in the chain as servers send it.
    fn leaf(&self, names: &[&str]) -> Identity {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        Identity::from_der(
            vec![cert.der().clone(), self.der()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap()
    }
}

async fn try_connect(
    id: Identity,
    verification: PeerVerification,
    server_name: &str,
) -> (amst_core::Result<QuicTransport>, QuicListener) {
    let listener = QuicListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        QuicConfig::new(psk()).with_identity(id),
    )
    .unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let cfg = QuicConfig::new(psk()).with_verification(verification);
    let r = QuicTransport::connect(addr, server_name, cfg).await;
    (r, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_signed_by_a_trusted_ca_is_accepted() {
    let ca = Ca::new("AMST test CA");
    // The trust anchor comes from a PEM file, as `--ca-file` would give it.
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    std::fs::write(&pem, ca.issuer.pem()).unwrap();
    let roots = roots_from_pem_file(&pem).unwrap();
    assert_eq!(roots, vec![ca.der()]);

    let (r, listener) = try_connect(
        ca.leaf(&["amst.test", "localhost"]),
        PeerVerification::Roots(roots.clone()),
        "amst.test",
    )
    .await;
    let client = r.expect("a certificate from the trusted CA is accepted");
    let server = listener.accept().await.unwrap();
    client.send(Bytes::from_static(b"via roots")).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(
        server.recv().await.unwrap().as_deref(),
        Some(&b"via roots"[..])
    );
    client.close().await.unwrap();

    // Through a connector too, and a reconnect resumes from the verified session.
    let listener = QuicListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        QuicConfig::new(psk()).with_identity(ca.leaf(&["amst.test"])),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let connector = QuicConnector::new(
        QuicConfig::new(psk()).with_verification(PeerVerification::Roots(roots)),
    )
    .unwrap();
    for round in 0..2 {
        let (c, s) = tokio::join!(connector.connect(addr, "amst.test"), listener.accept());
        let (c, s) = (c.unwrap(), s.unwrap());
        assert_eq!(c.resumed_with_0rtt(), round == 1);
        c.send(Bytes::from_static(b"again")).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(s.recv().await.unwrap().as_deref(), Some(&b"again"[..]));
        c.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_with_a_clear_error() {
    let trusted = Ca::new("AMST trusted CA");
    let other = Ca::new("AMST other CA");
    let (r, listener) = try_connect(
        other.leaf(&["localhost"]),
        PeerVerification::Roots(vec![trusted.der()]),
        "localhost",
    )
    .await;
    let err = r
        .expect_err("another CA's certificate must be refused")
        .to_string();
    eprintln!("another CA: {err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(err.contains("does not chain to a trusted root"), "{err}");
    // The server sees a failed handshake, not a session.
    let server_side = listener.accept().await;
    assert!(server_side.is_err(), "the server must not get a session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_name_is_refused_with_a_clear_error() {
    let ca = Ca::new("AMST test CA");
    let (r, _listener) = try_connect(
        ca.leaf(&["amst.test"]),
        PeerVerification::Roots(vec![ca.der()]),
        "elsewhere.test",
    )
    .await;
    let err = r
        .expect_err("a name the certificate does not cover must be refused")
        .to_string();
    eprintln!("wrong name: {err}");
    assert!(
        err.contains("not valid for name \"elsewhere.test\""),
        "{err}"
    );
    assert!(err.contains("does not cover the server name"), "{err}");
}
