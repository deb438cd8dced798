//! rustls configurations for QUIC: amst-tls's TLS 1.3 on ring, plus ALPN and 0-RTT.

use amst_core::{Error, Result};
use amst_tls::ServerCheck;
pub use amst_tls::{Fingerprint, Identity, roots_from_pem_file};

use crate::config::{PeerVerification, QuicConfig};

pub(crate) fn server_crypto(config: &QuicConfig) -> Result<rustls::ServerConfig> {
    let id = config.identity.as_ref().ok_or_else(|| Error::Config {
        field: "identity",
        reason:
            "a listener needs a certificate: use Identity::self_signed or Identity::from_pem_files"
                .into(),
    })?;
    let mut tls = amst_tls::server_config(id, "identity")?;
    tls.alpn_protocols = vec![config.alpn.clone()];
    // QUIC allows only 0 or u32::MAX here. Tickets stay single-use (rustls's default
    // in-memory session cache, no stateless ticketer), so a replayed first flight cannot
    // have its early data accepted a second time.
    tls.max_early_data_size = if config.zero_rtt { u32::MAX } else { 0 };
    tls.send_tls13_tickets = 2;
    Ok(tls)
}

pub(crate) fn client_crypto(config: &QuicConfig) -> Result<rustls::ClientConfig> {
    let check = match &config.verification {
        PeerVerification::Roots(roots) => ServerCheck::Roots(roots.clone()),
        PeerVerification::Pinned(pins) => ServerCheck::Pinned(pins.clone()),
        PeerVerification::PskBound => ServerCheck::PskBound,
    };
    let mut tls = amst_tls::client_config(&check, "verification")?;
    tls.alpn_protocols = vec![config.alpn.clone()];
    tls.enable_early_data = config.zero_rtt;
    Ok(tls)
}
