//! Acknowledged progress as a subscription: a transport advances an [`AckCounter`] as the
//! peer acknowledges messages, and anyone holding an [`AckWatch`] can read the count or wait
//! for it to pass a value. Runtime-free (std wakers), so it works under any executor.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Shared {
    value: AtomicU64,
    /// Set when the counter is dropped: the count will not move again.
    ended: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Shared {
    fn wake_all(&self) {
        let wakers = std::mem::take(&mut *crate::util::lock(&self.wakers));
        for w in wakers {
            w.wake();
        }
    }
}

/// The transport's side: the count of messages, from the first, that the peer has
/// acknowledged. Dropping it wakes every waiter, which then sees the final count.
pub struct AckCounter {
    shared: Arc<Shared>,
}

impl AckCounter {
    /// A counter at 0.
    pub fn new() -> Self {
        AckCounter {
            shared: Arc::default(),
        }
    }

    /// Raises the count to `acked` (a smaller value is ignored) and wakes the waiters if it
    /// moved.
    pub fn advance_to(&self, acked: u64) {
        if self.shared.value.fetch_max(acked, Ordering::AcqRel) < acked {
            self.shared.wake_all();
        }
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.shared.value.load(Ordering::Acquire)
    }

    /// A new subscription.
    pub fn watch(&self) -> AckWatch {
        AckWatch {
            shared: self.shared.clone(),
        }
    }
}

impl Default for AckCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AckCounter {
    fn drop(&mut self) {
        self.shared.ended.store(true, Ordering::Release);
        self.shared.wake_all();
    }
}

impl fmt::Debug for AckCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AckCounter({})", self.get())
    }
}

/// A subscription to a transport's acknowledged message count.
#[derive(Clone)]
pub struct AckWatch {
    shared: Arc<Shared>,
}

impl AckWatch {
    /// Messages acknowledged so far, counted from the first sent.
    pub fn get(&self) -> u64 {
        self.shared.value.load(Ordering::Acquire)
    }

    /// Whether the transport is gone, so the count will not move again.
    pub fn ended(&self) -> bool {
        self.shared.ended.load(Ordering::Acquire)
    }

    /// Resolves with the count once it exceeds `seen`, or with the final count (perhaps not
    /// above `seen`) once the transport is gone.
    pub fn beyond(&self, seen: u64) -> Beyond<'_> {
        Beyond { watch: self, seen }
    }
}

impl fmt::Debug for AckWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AckWatch({})", self.get())
    }
}

/// The future of [`AckWatch::beyond`].
#[derive(Debug)]
pub struct Beyond<'a> {
    watch: &'a AckWatch,
    seen: u64,
}

impl Future for Beyond<'_> {
    type Output = u64;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        let s = &self.watch.shared;
        let ready = |s: &Shared| {
            let v = s.value.load(Ordering::Acquire);
            (v > self.seen || s.ended.load(Ordering::Acquire)).then_some(v)
        };
        if let Some(v) = ready(s) {
            return Poll::Ready(v);
        }
        {
            let mut wakers = crate::util::lock(&s.wakers);
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
        }
        // Checked again after registering, so an advance in between is not missed.
        match ready(s) {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn poll(f: &mut Beyond<'_>, flag: &Arc<Flag>) -> Poll<u64> {
        let waker = Waker::from(flag.clone());
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_waiter_is_woken_by_an_advance_past_what_it_saw_and_not_before() {
        let counter = AckCounter::new();
        let watch = counter.watch();
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let mut fut = watch.beyond(2);
        assert_eq!(poll(&mut fut, &flag), Poll::Pending);
        // Repeated polls do not pile up wakers.
        assert_eq!(poll(&mut fut, &flag), Poll::Pending);
        assert_eq!(crate::util::lock(&counter.shared.wakers).len(), 1);
        counter.advance_to(2);
        assert_eq!(poll(&mut fut, &flag), Poll::Pending);
        counter.advance_to(1); // stale: ignored
        assert_eq!(watch.get(), 2);
        counter.advance_to(5);
        assert!(flag.0.load(Ordering::SeqCst), "the advance woke the waiter");
        assert_eq!(poll(&mut fut, &flag), Poll::Ready(5));
    }

    #[test]
    fn dropping_the_counter_releases_waiters_with_the_final_count() {
        let counter = AckCounter::new();
        let watch = counter.watch();
        counter.advance_to(3);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let mut fut = watch.beyond(3);
        assert_eq!(poll(&mut fut, &flag), Poll::Pending);
        drop(counter);
        assert!(flag.0.load(Ordering::SeqCst));
        assert_eq!(poll(&mut fut, &flag), Poll::Ready(3));
        assert!(watch.ended());
    }
}
