//! The detection loop as a tokio task, and the handle that controls and stops it.

use amst_core::{Error, Mode, Result};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::classifier::Decision;
use crate::detector::{Detector, ProbeStats};

/// What the loop publishes after every period (and after every force / clear).
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The latest decision, with its reasons and numbers.
    pub decision: Decision,
    /// The probe's cost so far, and in the latest period.
    pub probe: ProbeStats,
}

enum Control {
    Force(Option<Mode>, oneshot::Sender<Decision>),
    Shutdown,
}

/// Controls a running detection loop. Dropping it stops the loop.
///
/// ```
/// use std::sync::Arc;
/// use amst_core::{InMemoryTransport, Mode, Transport};
/// use amst_detect::{Detector, DetectorConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> amst_core::Result<()> {
/// let (a, _b) = InMemoryTransport::pair(4);
/// let transport: Arc<dyn Transport> = Arc::new(a);
/// let handle = Detector::new(DetectorConfig::default(), transport)?.spawn();
/// let mut modes = handle.subscribe();
/// handle.force_mode(Mode::Internet).await?;
/// modes.changed().await.unwrap();
/// assert_eq!(*modes.borrow(), Mode::Internet);
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DetectorHandle {
    control: mpsc::UnboundedSender<Control>,
    modes: watch::Receiver<Mode>,
    reports: watch::Receiver<Option<Report>>,
    task: Option<JoinHandle<Detector>>,
}

impl Detector {
    /// Runs the detection loop on the current tokio runtime: one [`step`](Self::step) per
    /// period (the first at once), publishing the mode on
    /// [`DetectorHandle::subscribe`] only when it changes and every [`Report`] on
    /// [`DetectorHandle::reports`].
    pub fn spawn(self) -> DetectorHandle {
        let (control, rx) = mpsc::unbounded_channel();
        let (mode_tx, modes) = watch::channel(self.mode());
        let (report_tx, reports) = watch::channel(None);
        let task = tokio::spawn(run(self, rx, mode_tx, report_tx));
        DetectorHandle {
            control,
            modes,
            reports,
            task: Some(task),
        }
    }
}

async fn run(
    mut detector: Detector,
    mut control: mpsc::UnboundedReceiver<Control>,
    modes: watch::Sender<Mode>,
    reports: watch::Sender<Option<Report>>,
) -> Detector {
    let mut period = detector.current_period();
    let mut tick = tokio::time::interval(period);
    // After a slow probe, keep the period between samples rather than catching up.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Between periods, a look at the transport's counters (see `Detector::peek`).
    let every = detector
        .config()
        .startup_period
        .min(detector.config().period);
    let mut peek = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    peek.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let publish = |d: &Decision, stats: ProbeStats| {
        modes.send_if_modified(|m| {
            let changed = *m != d.mode;
            *m = d.mode;
            changed
        });
        reports.send_replace(Some(Report {
            decision: d.clone(),
            probe: stats,
        }));
    };
    loop {
        tokio::select! {
            biased;
            msg = control.recv() => match msg {
                Some(Control::Force(mode, reply)) => {
                    let d = match mode {
                        Some(m) => detector.force_mode(m),
                        None => detector.clear_force(),
                    };
                    publish(&d, detector.stats());
                    let _ = reply.send(d);
                }
                Some(Control::Shutdown) | None => break,
            },
            _ = tick.tick() => {
                let d = detector.step().await;
                publish(&d, detector.stats());
                if detector.current_period() != period {
                    // The start-up periods are over.
                    period = detector.current_period();
                    tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                }
            }
            _ = peek.tick() => {
                if detector.peek() {
                    // A firm sample is waiting: take it now, and the next period (its
                    // confirmation, a start-up period) from here.
                    let d = detector.step().await;
                    publish(&d, detector.stats());
                    period = detector.current_period();
                    tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                }
            }
        }
    }
    detector
}

impl DetectorHandle {
    /// The mode in effect.
    pub fn mode(&self) -> Mode {
        *self.modes.borrow()
    }

    /// A receiver that changes only when the mode does.
    pub fn subscribe(&self) -> watch::Receiver<Mode> {
        self.modes.clone()
    }

    /// A receiver of the latest [`Report`] (`None` before the first period ends).
    pub fn reports(&self) -> watch::Receiver<Option<Report>> {
        self.reports.clone()
    }

    /// The latest decision.
    pub fn last_decision(&self) -> Option<Decision> {
        self.reports.borrow().as_ref().map(|r| r.decision.clone())
    }

    /// Pins the mode (operators) and returns the decision, published before this returns.
    pub async fn force_mode(&self, mode: Mode) -> Result<Decision> {
        self.request(Some(mode)).await
    }

    /// Returns to automatic detection; the evidence gathered meanwhile applies at once.
    pub async fn clear_force(&self) -> Result<Decision> {
        self.request(None).await
    }

    async fn request(&self, mode: Option<Mode>) -> Result<Decision> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Force(mode, tx))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Stops the loop after the current period's work and returns the detector, with its
    /// history, for reuse or inspection (`None` if the task panicked).
    pub async fn shutdown(mut self) -> Option<Detector> {
        let _ = self.control.send(Control::Shutdown);
        let task = self.task.take()?;
        task.await.ok()
    }
}

impl Drop for DetectorHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
