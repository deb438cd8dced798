//! The hybrid layer's errors: everything amst-core reports, plus what can go wrong between two
//! hybrid managers (versions, attachment, switching).

use amst_core::Mode;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in an [`Amst`](crate::Amst) session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A transport or configuration error from amst-core or a transport crate.
    #[error(transparent)]
    Core(#[from] amst_core::Error),
    /// The peer sent a hybrid frame the protocol does not allow.
    #[error("hybrid protocol error: {0}")]
    Protocol(String),
    /// The two hybrid managers share no hybrid protocol version.
    #[error(
        "no common hybrid protocol version: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}"
    )]
    VersionMismatch {
        /// Our oldest hybrid version.
        ours_min: u16,
        /// Our newest hybrid version.
        ours_max: u16,
        /// The peer's oldest hybrid version.
        theirs_min: u16,
        /// The peer's newest hybrid version.
        theirs_max: u16,
    },
    /// The peer refused what we asked, with its reason.
    #[error("the peer rejected the request: {0}")]
    Rejected(String),
    /// A mode switch did not happen; the session goes on with the old transport.
    #[error("switch to {mode} mode failed: {reason}")]
    SwitchFailed {
        /// The mode we tried to reach.
        mode: Mode,
        /// Why it failed.
        reason: String,
    },
    /// The operation needs the hybrid protocol, and the peer speaks plain amst only.
    #[error("{0} needs a hybrid peer; this session runs the plain protocol (peer lacks HYBRID)")]
    NotHybrid(&'static str),
    /// The session has ended (closed by us, by the peer, or after a fatal error).
    #[error("session closed: {0}")]
    Closed(String),
}

impl Error {
    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        Error::Protocol(reason.into())
    }
}
