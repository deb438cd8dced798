//! Optional TLS 1.3 on every stream (tokio-rustls on ring).
//!
//! Authentication stays the PSK handshake: it runs inside TLS, and the client's Hello nonce
//! is a TLS exporter secret (RFC 5705) that the server checks against its own export. A man
//! in the middle who terminates TLS with its own certificate sees a different export and
//! cannot complete the PSK handshake, so even [`TlsVerify::PskBound`], which checks no
//! certificate, keeps the data confidential. TLS adds confidentiality and integrity; without
//! it a session is authenticated but readable on the wire.
//!
//! Certificates, fingerprints and the certificate check are amst-tls's, shared with
//! amst-quic; what is here is the stream side: tokio-rustls, the exporter binding and the
//! errors a client reports.

use std::fmt;
use std::sync::Arc;

use amst_core::{Error, Result};
use amst_tls::ServerCheck;
pub use amst_tls::{Fingerprint, Identity, roots_from_pem_file};
use rustls::pki_types::{CertificateDer, ServerName};

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
    let config = amst_tls::server_config(&id, "tls.identity")?;
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
    let (check, name) = match &tls.verify {
        TlsVerify::Roots { roots, server_name } => {
            (ServerCheck::Roots(roots.clone()), server_name.clone())
        }
        TlsVerify::Pinned(pins) => (ServerCheck::Pinned(pins.clone()), DEFAULT_NAME.into()),
        TlsVerify::PskBound => (ServerCheck::PskBound, DEFAULT_NAME.into()),
    };
    let config = amst_tls::client_config(&check, "tls.verify")?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
