//! Why a tree transfer stopped.

use std::path::PathBuf;

/// Why a tree transfer stopped (a single file's failure is not one: it is reported in the
/// file's outcome and the transfer goes on).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path given to send cannot be read.
    #[error("cannot read {path}: {source}")]
    Input {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The paths given cannot be sent as asked.
    #[error("{0}")]
    Usage(String),
    /// The output directory cannot be used.
    #[error("output directory {path}: {source}")]
    Output {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The session failed.
    #[error("{doing}: {source}")]
    Channel {
        /// What we were doing.
        doing: &'static str,
        /// The channel's error.
        source: crate::channel::ChannelError,
    },
    /// The peer sent something this protocol does not allow.
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    /// The peer gave up, with its reason.
    #[error("the peer aborted: {0}")]
    Aborted(String),
    /// The peer closed the session before the transfer ended.
    #[error("the peer closed the session before the transfer ended")]
    Closed,
    /// A newer session took over this session's partial files after it went quiet (its
    /// sender was most likely killed); what it had verified stays resumable.
    #[error("a newer session for the same files took over after this one went quiet")]
    Superseded,
}

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn channel(doing: &'static str, source: crate::channel::ChannelError) -> Error {
        Error::Channel { doing, source }
    }
}

/// What a blocking task returned: its panic goes on unwinding here, and `None` means the
/// runtime is shutting down (it cancels blocking work not yet started), which a caller
/// treats as the end of the transfer, never as a bug.
pub(crate) fn joined<T>(r: std::result::Result<T, tokio::task::JoinError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}
