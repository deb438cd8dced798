//! Where the detector finds the transport to measure: fixed, or whatever the hybrid manager
//! has made active at the moment.

use std::sync::Arc;

use amst_core::Transport;

/// The transport currently carrying the session.
///
/// amst-hybrid keeps its active transport in an `ArcSwap` and swaps it on a mode change; a
/// closure that loads it is a `PathSource`:
///
/// ```
/// use std::sync::{Arc, RwLock};
/// use amst_core::{InMemoryTransport, Transport};
/// use amst_detect::PathSource;
///
/// let (a, _b) = InMemoryTransport::pair(4);
/// // Stands in for `ArcSwap<Arc<dyn Transport>>`; with arc-swap:
/// // `move || Arc::clone(&**active.load())`.
/// let active: Arc<RwLock<Arc<dyn Transport>>> = Arc::new(RwLock::new(Arc::new(a)));
/// let source = move || active.read().unwrap().clone();
/// assert!(source.current().is_some());
/// ```
pub trait PathSource: Send + Sync + 'static {
    /// The active transport, or `None` while there is none (the period is then skipped).
    fn current(&self) -> Option<Arc<dyn Transport>>;
}

impl<F> PathSource for F
where
    F: Fn() -> Arc<dyn Transport> + Send + Sync + 'static,
{
    fn current(&self) -> Option<Arc<dyn Transport>> {
        Some(self())
    }
}

/// A [`PathSource`] that may have no transport, from a closure returning `Option`.
#[derive(Debug, Clone)]
pub struct MaybePath<F>(pub F);

impl<F> PathSource for MaybePath<F>
where
    F: Fn() -> Option<Arc<dyn Transport>> + Send + Sync + 'static,
{
    fn current(&self) -> Option<Arc<dyn Transport>> {
        (self.0)()
    }
}

/// Identity of a transport object, to notice when the source swapped it.
pub(crate) fn transport_id(t: &Arc<dyn Transport>) -> usize {
    Arc::as_ptr(t) as *const () as usize
}
