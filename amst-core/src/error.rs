//! One error type for every layer, with variants that name what went wrong.

use std::io;
use std::time::Duration;

use crate::codec::FrameKind;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The peer sent something the protocol does not allow. Each variant names the field and the
/// limit, so that a log line alone tells what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The first bytes of a Hello are not AMST's magic.
    #[error("bad magic {found:#010x}: the peer does not speak AMST (expected {expected:#010x})")]
    BadMagic {
        /// What arrived.
        found: u32,
        /// What AMST sends.
        expected: u32,
    },
    /// The two sides share no protocol version.
    #[error(
        "no common protocol version: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}"
    )]
    VersionMismatch {
        /// Our oldest version.
        ours_min: u16,
        /// Our newest version.
        ours_max: u16,
        /// The peer's oldest version.
        theirs_min: u16,
        /// The peer's newest version.
        theirs_max: u16,
    },
    /// The peer's HMAC did not verify: wrong pre-shared key, or a forged handshake (one
    /// altered in transit, such as a narrowed version range to force a downgrade).
    #[error(
        "authentication failed: the peer's HMAC does not match our pre-shared key and the \
         handshake as we saw it (a wrong key, or a handshake altered in transit, such as a \
         version range narrowed to force a downgrade)"
    )]
    AuthFailed,
    /// A frame type byte that this version does not define.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// A frame announced a body longer than the configured limit for its kind.
    #[error("{kind} frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The frame's kind.
        kind: FrameKind,
        /// The announced body length.
        len: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The input ended inside a frame.
    #[error("truncated {kind} frame: needed {needed} bytes, have {have}")]
    Truncated {
        /// The frame's kind.
        kind: FrameKind,
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// A field holds a value that is out of range or inconsistent with another.
    #[error("malformed {kind} frame: field `{field}` {reason}")]
    Malformed {
        /// The frame's kind.
        kind: FrameKind,
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A chunk's payload does not match its CRC32C.
    #[error(
        "corrupt chunk: message {msg_id} offset {msg_offset}: CRC32C {actual:#010x}, expected {expected:#010x}"
    )]
    ChunkCorrupt {
        /// The chunk's message.
        msg_id: u64,
        /// The chunk's offset in its message.
        msg_offset: u64,
        /// The CRC the frame carried.
        expected: u32,
        /// The CRC of the payload as received.
        actual: u32,
    },
    /// A message longer than the configured limit.
    #[error("message {msg_id} of {len} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The message.
        msg_id: u64,
        /// Its announced length.
        len: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A message longer than the receiver's memory budget lets it hold whole: a quarter of
    /// the budget (see [`MemoryBudget::largest_message`](crate::MemoryBudget::largest_message)).
    #[error(
        "message {msg_id} of {len} bytes exceeds {limit} bytes, the largest message a receiver with a memory budget of {budget} bytes holds (a quarter of it; raise the receiver's budget to at least 4 times the message)"
    )]
    MessageOverBudget {
        /// The message.
        msg_id: u64,
        /// Its announced length.
        len: u64,
        /// The largest message the budget allows.
        limit: u64,
        /// The receiver's memory budget.
        budget: u64,
    },
    /// The peer sent beyond the credit we granted.
    #[error(
        "credit exceeded: data up to session offset {end} but only {granted} granted (the credit window, from the memory budget)"
    )]
    CreditExceeded {
        /// End of the offending chunk in the session byte sequence.
        end: u64,
        /// The limit we granted.
        granted: u64,
    },
    /// The peer sent a message beyond the message credit we granted.
    #[error(
        "message credit exceeded: message id {msg_id} but only ids below {granted} granted (one per KiB of the credit window, from the memory budget)"
    )]
    MessageCreditExceeded {
        /// The offending message.
        msg_id: u64,
        /// Message ids below this were granted.
        granted: u64,
    },
    /// A chunk disagrees with what earlier chunks said about the same bytes.
    #[error("inconsistent chunk: {0}")]
    Inconsistent(String),
    /// More of one stream arrived ahead of a gap than the receiver holds for it (a transport
    /// that puts a stream's bytes back in order itself, such as amst-quic).
    #[error("a stream's data waiting behind a gap exceeds the limit of {limit} {what}")]
    OutOfOrderExcess {
        /// What is counted: "bytes" or "pieces".
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// A frame that is valid but not allowed in the current state.
    #[error("unexpected {got} frame while {state}")]
    UnexpectedFrame {
        /// What arrived.
        got: FrameKind,
        /// What the receiver was doing.
        state: &'static str,
    },
}

/// Everything that can go wrong in AMST.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer broke the protocol; the session is over.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// An operating-system error, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// This side closed the transport; no more sends or receives.
    #[error("transport closed")]
    Closed,
    /// The peer closed the session with a reason.
    #[error("peer closed the session: {code:?}: {reason}")]
    PeerClosed {
        /// The reason code the peer sent.
        code: crate::codec::CloseCode,
        /// The peer's explanation.
        reason: String,
    },
    /// An operation did not finish in time.
    #[error("timed out after {after:?} while {what}")]
    Timeout {
        /// What we were waiting for.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: `{field}` {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A message is larger than the configured limit.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The message length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The transport cannot run here (no device, feature off, peer lacks it).
    #[error("{transport} transport unavailable: {reason}")]
    Unavailable {
        /// Which transport.
        transport: crate::TransportKind,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Wraps an IO error with what we were doing when it happened.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Self {
        Error::io("io", source)
    }
}
