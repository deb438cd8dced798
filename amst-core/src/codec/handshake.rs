//! Mutual authentication with a pre-shared key: both sides prove they hold the key with
//! HMAC-SHA256 over both nonces and the session parameters, so a recorded handshake cannot be
//! replayed and a stream cannot join another session without the key.
//!
//! ```text
//! client                                   server
//!   Hello{versions, session, nonce_c}  ->
//!                                      <-  HelloAck{version, versions, session, nonce_s, mac_s}
//!   Auth{mac_c}                        ->  (data accepted only after this verifies)
//! ```
//!
//! Both MACs cover the version range each side offered as well as the version chosen, so a
//! man in the middle who narrows the client's range (to force an older version) or the
//! server's makes the handshake fail authentication instead of silently downgrading it.

use std::fmt;

use ring::hmac;

use super::frame::*;
use crate::{Error, ProtocolError};

/// The oldest wire protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// The newest wire protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 1;

const SERVER_LABEL: &[u8] = b"amst/3 server proof";
const CLIENT_LABEL: &[u8] = b"amst/3 client proof";

/// A pre-shared key. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct Psk {
    key: hmac::Key,
}

impl Psk {
    /// The shortest key accepted, in bytes.
    pub const MIN_LEN: usize = 8;

    /// A key from raw bytes; at least [`Psk::MIN_LEN`] of them.
    pub fn new(secret: &[u8]) -> Result<Self, Error> {
        if secret.len() < Self::MIN_LEN {
            return Err(Error::Config {
                field: "psk",
                reason: format!(
                    "is {} bytes; use at least {} (32 random bytes recommended)",
                    secret.len(),
                    Self::MIN_LEN
                ),
            });
        }
        Ok(Psk {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    fn tag(&self, label: &[u8], t: &Transcript) -> Mac {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(label);
        t.feed(&mut ctx);
        let mut mac = [0u8; 32];
        mac.copy_from_slice(ctx.sign().as_ref());
        mac
    }

    fn verify(&self, label: &[u8], t: &Transcript, mac: &Mac) -> Result<(), ProtocolError> {
        let mut msg = Vec::with_capacity(label.len() + 128);
        msg.extend_from_slice(label);
        t.append(&mut msg);
        hmac::verify(&self.key, &msg, mac).map_err(|_| ProtocolError::AuthFailed)
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// A fresh random nonce or session id from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the OS random number generator failed");
    out
}

/// What both sides agreed on, once the handshake verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Established {
    /// The protocol version in use.
    pub version: u16,
    /// The session this stream belongs to.
    pub session_id: SessionId,
    /// This stream's index.
    pub stream_index: u16,
    /// How many streams the client intends to open.
    pub stream_count: u16,
    /// Capabilities both sides have.
    pub capabilities: u64,
}

/// The fields both MACs cover.
struct Transcript {
    client_nonce: Nonce,
    server_nonce: Nonce,
    session_id: SessionId,
    version: u16,
    client_versions: (u16, u16),
    server_versions: (u16, u16),
    stream_index: u16,
    stream_count: u16,
    client_caps: u64,
    server_caps: u64,
}

impl Transcript {
    fn feed(&self, ctx: &mut hmac::Context) {
        let mut buf = Vec::with_capacity(128);
        self.append(&mut buf);
        ctx.update(&buf);
    }

    fn append(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.client_nonce);
        out.extend_from_slice(&self.server_nonce);
        out.extend_from_slice(&self.session_id);
        out.extend_from_slice(&self.version.to_be_bytes());
        for v in [
            self.client_versions.0,
            self.client_versions.1,
            self.server_versions.0,
            self.server_versions.1,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.stream_index.to_be_bytes());
        out.extend_from_slice(&self.stream_count.to_be_bytes());
        out.extend_from_slice(&self.client_caps.to_be_bytes());
        out.extend_from_slice(&self.server_caps.to_be_bytes());
    }
}

/// The highest version both ranges contain.
pub fn negotiate_version(ours: (u16, u16), theirs: (u16, u16)) -> Result<u16, ProtocolError> {
    let high = ours.1.min(theirs.1);
    let low = ours.0.max(theirs.0);
    if high >= low && theirs.0 <= theirs.1 {
        Ok(high)
    } else {
        Err(ProtocolError::VersionMismatch {
            ours_min: ours.0,
            ours_max: ours.1,
            theirs_min: theirs.0,
            theirs_max: theirs.1,
        })
    }
}

/// The connecting side of the handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    psk: Psk,
    hello: Hello,
    versions: (u16, u16),
}

impl ClientHandshake {
    /// Starts a handshake; send the returned Hello. `session_id` is all zeroes to ask for a
    /// new session, or the id from the first stream's HelloAck to join it.
    pub fn new(
        psk: Psk,
        nonce: Nonce,
        session_id: SessionId,
        stream_index: u16,
        stream_count: u16,
        capabilities: u64,
    ) -> (Self, Hello) {
        Self::with_versions(
            psk,
            nonce,
            session_id,
            stream_index,
            stream_count,
            capabilities,
            (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
        )
    }

    /// Like [`new`](Self::new), offering a specific version range (for compatibility tests
    /// and for pinning an old version).
    pub fn with_versions(
        psk: Psk,
        nonce: Nonce,
        session_id: SessionId,
        stream_index: u16,
        stream_count: u16,
        capabilities: u64,
        versions: (u16, u16),
    ) -> (Self, Hello) {
        let hello = Hello {
            version_min: versions.0,
            version_max: versions.1,
            session_id,
            stream_index,
            stream_count,
            capabilities,
            nonce,
        };
        (
            ClientHandshake {
                psk,
                hello: hello.clone(),
                versions,
            },
            hello,
        )
    }

    /// Checks the server's answer. On success, send the returned proof; data may follow it
    /// at once.
    pub fn on_hello_ack(self, ack: &HelloAck) -> Result<(AuthProof, Established), ProtocolError> {
        if ack.version < self.versions.0 || ack.version > self.versions.1 {
            return Err(ProtocolError::VersionMismatch {
                ours_min: self.versions.0,
                ours_max: self.versions.1,
                theirs_min: ack.version,
                theirs_max: ack.version,
            });
        }
        let joining = self.hello.session_id != [0; 16];
        if joining && ack.session_id != self.hello.session_id {
            return Err(ProtocolError::Malformed {
                kind: FrameKind::HelloAck,
                field: "session_id",
                reason: "differs from the session this stream asked to join".into(),
            });
        }
        let t = Transcript {
            client_nonce: self.hello.nonce,
            server_nonce: ack.nonce,
            session_id: ack.session_id,
            version: ack.version,
            client_versions: self.versions,
            server_versions: (ack.version_min, ack.version_max),
            stream_index: self.hello.stream_index,
            stream_count: self.hello.stream_count,
            client_caps: self.hello.capabilities,
            server_caps: ack.capabilities,
        };
        self.psk.verify(SERVER_LABEL, &t, &ack.mac)?;
        // The MAC proves both ranges are as each side sent them, so the highest common
        // version is known here; a keyed server that chose another is broken or hostile.
        let highest = negotiate_version(self.versions, (ack.version_min, ack.version_max))?;
        if ack.version != highest {
            return Err(ProtocolError::Malformed {
                kind: FrameKind::HelloAck,
                field: "version",
                reason: format!(
                    "is {}, but the highest version both sides offered is {highest}: a downgrade",
                    ack.version
                ),
            });
        }
        let proof = AuthProof {
            mac: self.psk.tag(CLIENT_LABEL, &t),
        };
        Ok((
            proof,
            Established {
                version: ack.version,
                session_id: ack.session_id,
                stream_index: self.hello.stream_index,
                stream_count: self.hello.stream_count,
                capabilities: self.hello.capabilities & ack.capabilities,
            },
        ))
    }
}

/// The accepting side of the handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    psk: Psk,
    nonce: Nonce,
    capabilities: u64,
    versions: (u16, u16),
}

/// The server's state between its HelloAck and the client's proof.
#[derive(Debug)]
pub struct AwaitingProof {
    psk: Psk,
    transcript_established: Established,
    client_nonce: Nonce,
    server_nonce: Nonce,
    client_versions: (u16, u16),
    server_versions: (u16, u16),
    client_caps: u64,
    server_caps: u64,
}

impl ServerHandshake {
    /// A server handshake with a fresh `nonce`.
    pub fn new(psk: Psk, nonce: Nonce, capabilities: u64) -> Self {
        Self::with_versions(
            psk,
            nonce,
            capabilities,
            (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
        )
    }

    /// Like [`new`](Self::new), accepting a specific version range.
    pub fn with_versions(psk: Psk, nonce: Nonce, capabilities: u64, versions: (u16, u16)) -> Self {
        ServerHandshake {
            psk,
            nonce,
            capabilities,
            versions,
        }
    }

    /// Answers a Hello. `session_id` is the session this stream will belong to: a fresh
    /// random id when the Hello asked for a new one, else the one it named (the caller checks
    /// that it exists). Send the returned HelloAck, then wait for the proof.
    pub fn on_hello(
        self,
        hello: &Hello,
        session_id: SessionId,
    ) -> Result<(HelloAck, AwaitingProof), ProtocolError> {
        let version = negotiate_version(self.versions, (hello.version_min, hello.version_max))?;
        if hello.stream_count == 0 || hello.stream_index >= hello.stream_count {
            return Err(ProtocolError::Malformed {
                kind: FrameKind::Hello,
                field: "stream_index",
                reason: format!(
                    "is {} with stream_count {}; the index must be below the count",
                    hello.stream_index, hello.stream_count
                ),
            });
        }
        let t = Transcript {
            client_nonce: hello.nonce,
            server_nonce: self.nonce,
            session_id,
            version,
            client_versions: (hello.version_min, hello.version_max),
            server_versions: self.versions,
            stream_index: hello.stream_index,
            stream_count: hello.stream_count,
            client_caps: hello.capabilities,
            server_caps: self.capabilities,
        };
        let ack = HelloAck {
            version,
            version_min: self.versions.0,
            version_max: self.versions.1,
            session_id,
            capabilities: self.capabilities,
            nonce: self.nonce,
            mac: self.psk.tag(SERVER_LABEL, &t),
        };
        let awaiting = AwaitingProof {
            psk: self.psk,
            transcript_established: Established {
                version,
                session_id,
                stream_index: hello.stream_index,
                stream_count: hello.stream_count,
                capabilities: hello.capabilities & self.capabilities,
            },
            client_nonce: hello.nonce,
            server_nonce: self.nonce,
            client_versions: (hello.version_min, hello.version_max),
            server_versions: self.versions,
            client_caps: hello.capabilities,
            server_caps: self.capabilities,
        };
        Ok((ack, awaiting))
    }
}

impl AwaitingProof {
    /// Verifies the client's proof; only then may the stream carry data.
    pub fn on_auth(self, proof: &AuthProof) -> Result<Established, ProtocolError> {
        let e = self.transcript_established;
        let t = Transcript {
            client_nonce: self.client_nonce,
            server_nonce: self.server_nonce,
            session_id: e.session_id,
            version: e.version,
            client_versions: self.client_versions,
            server_versions: self.server_versions,
            stream_index: e.stream_index,
            stream_count: e.stream_count,
            client_caps: self.client_caps,
            server_caps: self.server_caps,
        };
        self.psk.verify(CLIENT_LABEL, &t, &proof.mac)?;
        Ok(e)
    }
}
