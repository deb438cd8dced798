//! The TLS 1.3 pieces amst-tcp and amst-quic share, on rustls with ring only: certificate
//! [`Identity`], the [`Fingerprint`] a client pins, and the rustls configurations with AMST's
//! certificate check, [`ServerCheck`].
//!
//! Every field name in an error is the caller's: each builder takes the name of the
//! configuration field its input came from, so an error names the field the user set.
//!
//! ```
//! use amst_tls::{Identity, ServerCheck};
//!
//! let id = Identity::self_signed(&["amst"])?;
//! let server = amst_tls::server_config(&id, "identity")?;
//! let pins = ServerCheck::Pinned(vec![id.fingerprint()]);
//! let client = amst_tls::client_config(&pins, "verify")?;
//! # let _ = (server, client);
//! # Ok::<(), amst_core::Error>(())
//! ```

mod config;
mod identity;
mod verify;

pub use config::{client_config, provider, server_config};
pub use identity::{Fingerprint, Identity, roots_from_pem_file};
pub use verify::{NotPinned, ServerCheck};
