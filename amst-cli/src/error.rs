//! Failures as sentences a person can act on, each with its own exit code.

use std::fmt;
use std::io;

use amst_core::codec::CloseCode;
use amst_core::{Error, ProtocolError};

/// What kind of thing went wrong; it picks the process exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Anything not listed below.
    Other,
    /// A bad argument or configuration value.
    Usage,
    /// A bad address, an unreachable peer, a connection lost.
    Network,
    /// The peers' pre-shared keys differ, or the key is unusable.
    Auth,
    /// The data did not arrive intact: a checksum mismatch or a short transfer.
    Integrity,
    /// The receiver could not store the data (disk full, permissions).
    Disk,
    /// A local input file could not be read.
    Input,
    /// Stopped by Ctrl-C or SIGTERM.
    Interrupted,
}

impl FailureKind {
    /// The process exit code, documented in the README.
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Other => 1,
            FailureKind::Usage => 2,
            FailureKind::Network => 3,
            FailureKind::Auth => 4,
            FailureKind::Integrity => 5,
            FailureKind::Disk => 6,
            FailureKind::Input => 7,
            // 128 + SIGINT, as shells report a command stopped by Ctrl-C.
            FailureKind::Interrupted => 130,
        }
    }

    /// A stable lower-case name, used in `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Other => "other",
            FailureKind::Usage => "usage",
            FailureKind::Network => "network",
            FailureKind::Auth => "auth",
            FailureKind::Integrity => "integrity",
            FailureKind::Disk => "disk",
            FailureKind::Input => "input",
            FailureKind::Interrupted => "interrupted",
        }
    }

    /// The kind named by [`as_str`](Self::as_str); unknown names (from a newer peer) are
    /// `Other`.
    pub fn parse(s: &str) -> FailureKind {
        use FailureKind::*;
        [Usage, Network, Auth, Integrity, Disk, Input, Interrupted]
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or(Other)
    }
}

/// A failure of a command: one sentence naming what went wrong and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure, for the exit code.
    pub kind: FailureKind,
    /// The sentence shown to the user.
    pub message: String,
}

impl Failure {
    /// A failure of the given kind.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// A bad argument or configuration value.
    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(FailureKind::Usage, message)
    }

    /// Like [`from_amst`](Self::from_amst) for an error from any library behind a
    /// [`Link`](crate::link::Link).
    pub fn from_link(doing: &str, err: &crate::link::LinkError) -> Self {
        if let Some(core) = err.downcast_ref::<Error>() {
            return Failure::from_amst(doing, core);
        }
        if let Some(f) = err.downcast_ref::<Failure>() {
            return Failure::new(f.kind, format!("{doing} failed: {}", f.message));
        }
        Failure::new(FailureKind::Network, format!("{doing} failed: {err}"))
    }

    /// Translates a library error into a sentence, saying what we were doing (`doing`, e.g.
    /// "connecting to 10.0.0.2:9000") and naming the likely cause.
    pub fn from_amst(doing: &str, err: &Error) -> Self {
        use FailureKind::*;
        let (kind, why) = match err {
            Error::Protocol(ProtocolError::AuthFailed) => (
                Auth,
                "authentication failed: the peer's pre-shared key differs from ours \
                 (use the same --psk-file or AMST_PSK on both sides)"
                    .to_string(),
            ),
            Error::Protocol(ProtocolError::VersionMismatch { .. }) => (
                Network,
                format!("the peer speaks another AMST version: {err}"),
            ),
            Error::Protocol(ProtocolError::BadMagic { .. }) => (
                Network,
                "the peer is not an AMST server (it answered with something else)".to_string(),
            ),
            Error::Protocol(ProtocolError::ChunkCorrupt { .. }) => {
                (Integrity, format!("data arrived corrupted: {err}"))
            }
            Error::Protocol(p) => (Network, format!("the peer broke the protocol: {p}")),
            Error::PeerClosed { code, reason } => {
                let kind = match code {
                    CloseCode::AuthFailed => Auth,
                    CloseCode::Corrupt => Integrity,
                    _ => Network,
                };
                if *code == CloseCode::AuthFailed {
                    (
                        Auth,
                        format!(
                            "authentication failed: the peer rejected our pre-shared key ({reason}); \
                             use the same --psk-file or AMST_PSK on both sides"
                        ),
                    )
                } else {
                    (
                        kind,
                        format!("the peer closed the session ({code:?}): {reason}"),
                    )
                }
            }
            Error::Io { context, source } => (Network, io_sentence(context, source)),
            Error::Timeout { what, after } => (
                Network,
                format!("no answer from the peer after {after:?} while {what}"),
            ),
            Error::Closed => (Network, "the connection is already closed".to_string()),
            Error::Config { .. } => (Usage, err.to_string()),
            Error::MessageTooLarge { .. } => (Usage, err.to_string()),
            Error::Unavailable { .. } => (Usage, err.to_string()),
            other => (Other, other.to_string()),
        };
        // The transports name what they did too ("connecting to 127.0.0.1:9: ..."): said once.
        let why = why
            .strip_prefix(doing)
            .and_then(|rest| rest.strip_prefix(": "))
            .unwrap_or(&why);
        Failure::new(kind, format!("{doing} failed: {why}"))
    }
}

fn io_sentence(context: &str, e: &io::Error) -> String {
    let hint = match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            " (the peer is unreachable: nothing listens there; is `amst serve` running?)"
        }
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            " (the peer dropped the connection; see its log)"
        }
        io::ErrorKind::AddrInUse => " (another process already uses this address)",
        io::ErrorKind::AddrNotAvailable => " (this host has no such local address)",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            " (the peer is unreachable: no route to it)"
        }
        io::ErrorKind::TimedOut => " (the peer did not answer in time)",
        io::ErrorKind::PermissionDenied => " (permission denied)",
        _ => "",
    };
    if context.is_empty() || context == "io" {
        format!("{e}{hint}")
    } else {
        format!("{context}: {e}{hint}")
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// `Result` with a [`Failure`].
pub type CliResult<T> = Result<T, Failure>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_become_sentences_with_the_cause() {
        let f = Failure::from_amst(
            "connecting to 127.0.0.1:9",
            &Error::io("connect", io::Error::from(io::ErrorKind::ConnectionRefused)),
        );
        assert_eq!(f.kind, FailureKind::Network);
        assert!(
            f.message.starts_with("connecting to 127.0.0.1:9 failed"),
            "{f}"
        );
        assert!(f.message.contains("unreachable"), "{f}");

        let f = Failure::from_amst(
            "connecting to 127.0.0.1:9",
            &Error::io(
                "connecting to 127.0.0.1:9",
                io::Error::from(io::ErrorKind::ConnectionRefused),
            ),
        );
        assert_eq!(
            f.message.matches("connecting to").count(),
            1,
            "said once: {f}"
        );

        let f = Failure::from_amst("handshake", &Error::Protocol(ProtocolError::AuthFailed));
        assert_eq!(f.kind, FailureKind::Auth);
        assert_eq!(f.kind.exit_code(), 4);
        assert!(f.message.contains("pre-shared key"), "{f}");

        let f = Failure::from_amst(
            "sending",
            &Error::PeerClosed {
                code: CloseCode::AuthFailed,
                reason: "bad proof".into(),
            },
        );
        assert_eq!(f.kind, FailureKind::Auth);
        assert!(f.message.contains("bad proof"), "{f}");
    }
}
