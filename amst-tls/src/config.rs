//! rustls configurations on ring, TLS 1.3 only. Callers add what is theirs (ALPN, early
//! data, resumption) to the returned configuration.

use std::fmt;
use std::sync::Arc;

use amst_core::{Error, Result};
use rustls::crypto::CryptoProvider;

use crate::verify::Verifier;
use crate::{Identity, ServerCheck};

/// The one crypto provider of the workspace: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(field: &'static str, e: impl fmt::Display) -> Error {
    Error::Config {
        field,
        reason: e.to_string(),
    }
}

/// A TLS 1.3 server presenting `identity`, without client certificates. Errors name `field`,
/// the configuration field the identity came from.
pub fn server_config(identity: &Identity, field: &'static str) -> Result<rustls::ServerConfig> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_err(field, e))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| config_err(field, e))
}

/// A TLS 1.3 client that checks the server as `check` says. Errors name `field`, the
/// configuration field the check came from; an empty pin list is refused.
pub fn client_config(check: &ServerCheck, field: &'static str) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_err(field, e))?;
    let verifier = |pins| {
        Arc::new(Verifier {
            pins,
            algs: provider().signature_verification_algorithms,
        })
    };
    Ok(match check {
        ServerCheck::Roots(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for r in roots {
                store.add(r.clone()).map_err(|e| config_err(field, e))?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        ServerCheck::Pinned(pins) if pins.is_empty() => {
            return Err(config_err(field, "pins no fingerprint; pin at least one"));
        }
        ServerCheck::Pinned(pins) => builder
            .dangerous()
            .with_custom_certificate_verifier(verifier(Some(pins.clone())))
            .with_no_client_auth(),
        ServerCheck::PskBound => builder
            .dangerous()
            .with_custom_certificate_verifier(verifier(None))
            .with_no_client_auth(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_pins_are_refused_naming_the_callers_field() {
        let err = client_config(&ServerCheck::Pinned(vec![]), "tls.verify")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.verify") && err.contains("pin"), "{err}");
    }

    #[test]
    fn every_check_builds_and_a_self_signed_identity_serves() {
        let id = Identity::self_signed(&["amst"]).unwrap();
        server_config(&id, "identity").unwrap();
        for check in [
            ServerCheck::PskBound,
            ServerCheck::Pinned(vec![id.fingerprint()]),
            ServerCheck::Roots(vec![id.certificate_der().clone()]),
        ] {
            client_config(&check, "verify").unwrap();
        }
    }
}
