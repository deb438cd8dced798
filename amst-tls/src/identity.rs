//! What a listener presents (a certificate chain and its key) and how a client names one
//! certificate (its SHA-256 fingerprint).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use amst_core::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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
        f.write_str(&amst_core::util::hex(&self.0))
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
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
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
    /// a client pins it by [`fingerprint`](Self::fingerprint) or relies on
    /// [`ServerCheck::PskBound`](crate::ServerCheck::PskBound).
    pub fn self_signed(names: &[&str]) -> Result<Self> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).map_err(|e| Error::Config {
            field: "identity",
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
                field: "identity",
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
                field: "identity",
                reason: format!("reading certificates from {}: {e}", cp.display()),
            })?;
        let key = PrivateKeyDer::from_pem_file(kp).map_err(|e| Error::Config {
            field: "identity",
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

/// Reads trust anchors for [`ServerCheck::Roots`](crate::ServerCheck::Roots) from a PEM file.
pub fn roots_from_pem_file(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>> {
    let p = path.as_ref();
    CertificateDer::pem_file_iter(p)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Config {
            field: "roots",
            reason: format!("reading trust anchors from {}: {e}", p.display()),
        })
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
    fn identity_roundtrips_through_pem_files() {
        let id = Identity::self_signed(&["localhost"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let cert_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64ish(id.certificate_der())
        );
        std::fs::write(&c, cert_pem).unwrap();
        let PrivateKeyDer::Pkcs8(key) = &id.key else {
            panic!("rcgen makes PKCS#8 keys")
        };
        let key_pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64ish(key.secret_pkcs8_der())
        );
        std::fs::write(&k, key_pem).unwrap();
        let back = Identity::from_pem_files(&c, &k).unwrap();
        assert_eq!(back.fingerprint(), id.fingerprint());
        let err = Identity::from_pem_files(dir.path().join("nope.pem"), &k)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }

    /// Plain base64 (the PEM body), to keep test dependencies small.
    fn base64ish(der: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in der.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
