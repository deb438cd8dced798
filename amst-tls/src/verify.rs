//! How a client checks the server's certificate.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::Fingerprint;

/// How a client checks the server's certificate. There is no mode that checks nothing:
/// every mode either checks the certificate or relies on the PSK handshake being bound to
/// this very TLS session (by an exporter secret in the Hello nonce).
#[derive(Clone, Debug, Default)]
pub enum ServerCheck {
    /// Any certificate is accepted as it is (its handshake signature is still checked); the
    /// server's authenticity comes from the PSK handshake bound to the TLS session, so a man
    /// in the middle without the key can neither authenticate nor read.
    #[default]
    PskBound,
    /// Only a certificate whose SHA-256 fingerprint is one of these is accepted.
    Pinned(Vec<Fingerprint>),
    /// WebPKI validation against these trust anchors (DER), for the name the client dials.
    Roots(Vec<CertificateDer<'static>>),
}

/// Why a pinned check failed; a TLS client's error carries it as
/// `CertificateError::Other`, so the caller can name both fingerprints.
#[derive(Debug)]
pub struct NotPinned {
    /// The fingerprint the server showed.
    pub got: Fingerprint,
    /// The fingerprints the client accepts.
    pub pins: Vec<Fingerprint>,
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

/// Pins certificates by fingerprint, or (with no pins) defers the server's authenticity to
/// the PSK handshake that is bound to the TLS session. Either way the handshake signature is
/// checked, so the server holds the key of the certificate it showed.
#[derive(Debug)]
pub(crate) struct Verifier {
    pub(crate) pins: Option<Vec<Fingerprint>>,
    pub(crate) algs: WebPkiSupportedAlgorithms,
}

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
