//! Optional TLS 1.3 on every stream (tokio-rustls on ring).
//!
//! Authentication stays the PSK handshake: it runs inside TLS, and the client's Hello nonce
//! is a TLS exporter secret (RFC 5705) that the server checks against its own export. A man
//! in the middle who terminates TLS with its own certificate sees a different export and
//! cannot complete the PSK handshake, so even [`TlsVerify::PskBound`], which checks no
//! certificate, keeps the data confidential. TLS adds confidentiality and integrity; without
//! it a session is authenticated but readable on the wire.
//!
//! The certificate types mirror amst-quic's `tls` module (same behaviour, same fingerprint
//! format); they belong in a shared crate once a second TLS user exists.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use amst_core::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The SHA-256 of a certificate's DER encoding, which pins exactly that certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

impl FromStr for Fingerprint {
    type Err = Error;

    /// 64 hex digits, optionally with `sha256:` in front and `:` between bytes.
    fn from_str(s: &str) -> Result<Self> {
        let hex: String = s
            .trim()
            .trim_start_matches("sha256:")
            .chars()
            .filter(|c| *c != ':')
            .collect();
        let bad = || Error::Config {
            field: "fingerprint",
            reason: format!("{s:?} is not 64 hex digits (a SHA-256)"),
        };
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// A certificate chain and its private key: what a listener presents.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh self-signed certificate (ECDSA P-256, made with rcgen) for these DNS names;
    /// pin it by [`fingerprint`](Self::fingerprint) or rely on [`TlsVerify::PskBound`].
    pub fn self_signed(names: &[&str]) -> Result<Self> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).map_err(|e| Error::Config {
            field: "tls.identity",
            reason: format!("generating a self-signed certificate failed: {e}"),
        })?;
        Ok(Identity {
            chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        })
    }

    /// A chain (leaf first) and key already in DER.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self> {
        if chain.is_empty() {
            return Err(Error::Config {
                field: "tls.identity",
                reason: "the certificate chain is empty".into(),
            });
        }
        Ok(Identity { chain, key })
    }

    /// The chain (leaf first) and the key from PEM files.
    pub fn from_pem_files(cert_chain: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        let (cp, kp) = (cert_chain.as_ref(), key.as_ref());
        let chain = CertificateDer::pem_file_iter(cp)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| Error::Config {
                field: "tls.identity",
                reason: format!("reading certificates from {}: {e}", cp.display()),
            })?;
        let key = PrivateKeyDer::from_pem_file(kp).map_err(|e| Error::Config {
            field: "tls.identity",
            reason: format!("reading a private key from {}: {e}", kp.display()),
        })?;
        Self::from_der(chain, key)
    }

    /// The leaf certificate in DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The leaf certificate's fingerprint, which a client pins.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.chain[0])
    }
}

/// Reads trust anchors for [`TlsVerify::Roots`] from a PEM file.
pub fn roots_from_pem_file(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>> {
    let p = path.as_ref();
    CertificateDer::pem_file_iter(p)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Config {
            field: "tls.verify",
            reason: format!("reading trust anchors from {}: {e}", p.display()),
        })
}

/// How a client checks the server's certificate. There is no mode that checks nothing:
/// every mode either checks the certificate or relies on the PSK handshake being bound to
/// this very TLS session.
#[derive(Clone, Debug, Default)]
pub enum TlsVerify {
    /// Any certificate is accepted as it is (its handshake signature is still checked); the
    /// server's authenticity comes from the PSK handshake bound to the TLS session, so a man
    /// in the middle without the key can neither authenticate nor read. The default.
    #[default]
    PskBound,
    /// Only a certificate whose SHA-256 fingerprint is one of these is accepted.
    Pinned(Vec<Fingerprint>),
    /// WebPKI validation against these trust anchors (DER), for `server_name`.
    Roots {
        /// Trust anchors, e.g. from [`roots_from_pem_file`].
        roots: Vec<CertificateDer<'static>>,
        /// The name the server's certificate must carry.
        server_name: String,
    },
}

/// TLS settings of a [`TcpConfig`](crate::TcpConfig). Both sides must agree on whether TLS
/// is on (unless the listener sets [`plaintext_too`](Self::plaintext_too)); a mismatch fails
/// the handshake with an error naming `tls`.
#[derive(Clone, Debug, Default)]
pub struct TcpTls {
    /// The certificate a listener presents. `None`: the listener makes a self-signed one at
    /// bind (see [`TcpListener::fingerprint`](crate::TcpListener::fingerprint)), which suits
    /// [`TlsVerify::PskBound`] clients.
    pub identity: Option<Identity>,
    /// How a connecting client checks the server (ignored by a listener).
    pub verify: TlsVerify,
    /// A listener that also takes plaintext clients, stream by stream (by the first byte each
    /// sends), for one port that serves TLS and plain-TCP clients, as amst-hybrid's internet
    /// and datacenter lanes do. The PSK handshake still authenticates every stream; whether a
    /// stream is encrypted is the client's choice, and a client that asks for TLS cannot be
    /// downgraded. Ignored by a client.
    pub plaintext_too: bool,
}

impl TcpTls {
    /// TLS with the server's certificate bound through the PSK handshake (the internet
    /// profile's default).
    pub fn psk_bound() -> Self {
        TcpTls::default()
    }

    /// TLS with the server's certificate pinned by fingerprint.
    pub fn pinned(pins: Vec<Fingerprint>) -> Self {
        TcpTls {
            verify: TlsVerify::Pinned(pins),
            ..TcpTls::default()
        }
    }

    /// Sets [`plaintext_too`](Self::plaintext_too): the listener serves plaintext clients too.
    pub fn with_plaintext_too(mut self) -> Self {
        self.plaintext_too = true;
        self
    }

    /// Sets the certificate a listener presents.
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match &self.verify {
            TlsVerify::Pinned(p) if p.is_empty() => Err(Error::Config {
                field: "tls.verify",
                reason: "pins no fingerprint; pin at least one".into(),
            }),
            TlsVerify::Roots { server_name, .. } => ServerName::try_from(server_name.as_str())
                .map(|_| ())
                .map_err(|e| Error::Config {
                    field: "tls.verify",
                    reason: format!("server_name {server_name:?} is not a valid name: {e}"),
                }),
            _ => Ok(()),
        }
    }
}

/// The name a client asks for when no certificate name is checked; also the name of the
/// self-signed certificates listeners make.
const DEFAULT_NAME: &str = "amst";

/// Exporter label binding the PSK handshake to the TLS session.
const BINDING_LABEL: &[u8] = b"EXPORTER-amst-tcp psk binding";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(field: &'static str, e: impl fmt::Display) -> Error {
    Error::Config {
        field,
        reason: e.to_string(),
    }
}

/// What a listener needs for TLS, built once at bind.
#[derive(Clone)]
pub(crate) struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub fingerprint: Fingerprint,
    pub plaintext_too: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerTls({:?})", self.fingerprint)
    }
}

pub(crate) fn server(tls: &TcpTls) -> Result<ServerTls> {
    tls.validate()?;
    let id = match &tls.identity {
        Some(id) => id.clone(),
        None => Identity::self_signed(&[DEFAULT_NAME])?,
    };
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("tls", e))?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| tls_err("tls.identity", e))?;
    Ok(ServerTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        fingerprint: id.fingerprint(),
        plaintext_too: tls.plaintext_too,
    })
}

/// What a client needs for TLS. Built once per session, so that the streams of a session
/// share rustls's resumption cache.
#[derive(Clone)]
pub(crate) struct ClientTls {
    pub connector: tokio_rustls::TlsConnector,
    pub name: ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientTls({:?})", self.name)
    }
}

pub(crate) fn client(tls: &TcpTls) -> Result<ClientTls> {
    tls.validate()?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("tls", e))?;
    let verifier = |pins| {
        Arc::new(Verifier {
            pins,
            algs: provider().signature_verification_algorithms,
        })
    };
    let (config, name) = match &tls.verify {
        TlsVerify::Roots { roots, server_name } => {
            let mut store = rustls::RootCertStore::empty();
            for r in roots {
                store.add(r.clone()).map_err(|e| tls_err("tls.verify", e))?;
            }
            let config = builder.with_root_certificates(store).with_no_client_auth();
            (config, server_name.clone())
        }
        TlsVerify::Pinned(pins) => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier(Some(pins.clone())))
                .with_no_client_auth(),
            DEFAULT_NAME.to_string(),
        ),
        TlsVerify::PskBound => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier(None))
                .with_no_client_auth(),
            DEFAULT_NAME.to_string(),
        ),
    };
    let name = ServerName::try_from(name).map_err(|e| tls_err("tls.verify", e))?;
    Ok(ClientTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        name,
    })
}

/// The 32 bytes both ends of a TLS session export; the client's Hello nonce.
pub(crate) fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], BINDING_LABEL, None)
        .map_err(|e| tls_err("tls", format!("cannot export keying material: {e}")))
}

/// The error a client reports when its TLS handshake fails, naming the likely cause.
pub(crate) fn dial_error(addr: std::net::SocketAddr, e: std::io::Error) -> Error {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidMessage(_)) => Error::Config {
            field: "tls",
            reason: format!(
                "is on here, but the server at {addr} answered in plaintext, so it has TLS off: \
                 both sides must set `tls` alike ({e})"
            ),
        },
        Some(rustls::Error::InvalidCertificate(c)) => {
            let why = match c {
                rustls::CertificateError::Other(o) => o.to_string(),
                c => format!("{c:?}"),
            };
            Error::Config {
                field: "tls.verify",
                reason: format!("the certificate of the server at {addr} was refused: {why}"),
            }
        }
        _ if e.kind() == std::io::ErrorKind::UnexpectedEof => Error::Config {
            field: "tls",
            reason: format!(
                "is on here, but the server at {addr} closed the connection during the TLS \
                 handshake (TLS off there, or not AMST): {e}"
            ),
        },
        _ => Error::io(format!("TLS handshake with {addr}"), e),
    }
}

/// Pins certificates by fingerprint, or (with no pins) defers the server's authenticity to
/// the PSK handshake that is bound to the TLS session. Either way the handshake signature is
/// checked, so the server holds the key of the certificate it showed.
#[derive(Debug)]
struct Verifier {
    pins: Option<Vec<Fingerprint>>,
    algs: WebPkiSupportedAlgorithms,
}

/// Why a pinned check failed, carried to the client's error.
#[derive(Debug)]
struct NotPinned {
    got: Fingerprint,
    pins: Vec<Fingerprint>,
}

impl fmt::Display for NotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "its fingerprint {:?} is not among the pinned {:?}",
            self.got, self.pins
        )
    }
}

impl std::error::Error for NotPinned {}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(pins) = &self.pins else {
            return Ok(ServerCertVerified::assertion());
        };
        let got = Fingerprint::of(end_entity);
        if pins.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotPinned {
                    got,
                    pins: pins.clone(),
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is enabled; a TLS 1.2 signature is never legitimate here.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_parses_its_own_display_and_rejects_garbage() {
        let fp = Fingerprint::of(b"certificate");
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("{fp:?}").parse::<Fingerprint>().unwrap(), fp);
        let err = "abc".parse::<Fingerprint>().unwrap_err().to_string();
        assert!(err.contains("fingerprint"), "{err}");
    }

    #[test]
    fn empty_pins_and_bad_names_are_config_errors() {
        let err = client(&TcpTls::pinned(vec![])).unwrap_err().to_string();
        assert!(err.contains("tls.verify") && err.contains("pin"), "{err}");
        let roots = TcpTls {
            verify: TlsVerify::Roots {
                roots: vec![],
                server_name: "not a name!".into(),
            },
            ..TcpTls::default()
        };
        let err = client(&roots).unwrap_err().to_string();
        assert!(err.contains("server_name"), "{err}");
    }
}
