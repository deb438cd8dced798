//! Auto mode: amst-detect's loop measures whatever transport the route holds at the moment
//! (an ArcSwap-backed `PathSource`) and publishes modes on a watch channel; every change
//! switches the session, unless an operator pinned the mode.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use amst_detect::{Detector, DetectorConfig, MaybePath, Report};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::metrics::DetectorVerdict;
use crate::session::Shared;

/// The detector settings a session's configuration implies.
pub(crate) fn detector_config(shared: &Shared) -> DetectorConfig {
    let mut dc = DetectorConfig {
        period: shared.config.check_period,
        ..Default::default()
    };
    dc.classifier.switch_confidence = shared.config.switch_threshold;
    dc.classifier.initial_mode = shared.route.load().mode;
    dc
}

/// Starts the detector on `shared`'s route and a task that follows its decisions.
pub(crate) fn spawn(shared: &Arc<Shared>) -> Option<JoinHandle<()>> {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let source_weak = weak.clone();
    let source = MaybePath(move || {
        source_weak
            .upgrade()
            .map(|s| s.route.load().bulk.transport.clone())
    });
    let detector = match Detector::with_source(detector_config(shared), source) {
        Ok(d) => d,
        Err(e) => {
            warn!("auto mode off: the detector rejected its configuration: {e}");
            return None;
        }
    };
    let handle = detector.spawn();
    let mut modes = handle.subscribe();
    follow_verdicts(weak.clone(), handle.reports());
    Some(tokio::spawn(async move {
        let handle = handle;
        while modes.changed().await.is_ok() {
            let mode = *modes.borrow_and_update();
            let Some(s) = weak.upgrade() else { break };
            if s.pinned.load(Ordering::Acquire) || s.route.load().mode == mode {
                continue;
            }
            let why = handle
                .last_decision()
                .map(|d| d.to_string())
                .unwrap_or_default();
            info!(%mode, "detector changed the mode: {why}");
            if let Err(e) = s.switch_to(mode, false).await {
                warn!("auto switch to {mode} failed: {e}");
            }
        }
    }))
}

/// Copies each detector report's verdict into the session's metrics; ends with the detector.
fn follow_verdicts(weak: Weak<Shared>, mut reports: watch::Receiver<Option<Report>>) {
    tokio::spawn(async move {
        while reports.changed().await.is_ok() {
            let Some(s) = weak.upgrade() else { break };
            if let Some(r) = reports.borrow_and_update().as_ref() {
                s.instruments.set_verdict(DetectorVerdict {
                    candidate: r.decision.candidate,
                    confidence: r.decision.confidence,
                });
            }
        }
    });
}
