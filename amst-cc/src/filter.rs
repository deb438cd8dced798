//! Windowed min and max filters, after Kathleen Nichols' algorithm (as in Linux
//! `lib/win_minmax.c`): keep the best, second-best and third-best samples of a window, so
//! that when the best one ages out the next best is already known, in O(1) time and memory.
//!
//! "Time" is generic: BBR's `max_bw` filter runs on round-trip or ProbeBW-cycle counts
//! (`u64`), and an RTT min filter runs on [`Instant`]s with a [`Duration`] window.
//!
//! ```
//! use amst_cc::filter::MaxFilter;
//!
//! // A max filter whose window is 10 rounds.
//! let mut f = MaxFilter::new(10u64);
//! f.update(0, 100.0);
//! f.update(3, 80.0);
//! assert_eq!(f.get(), Some(100.0));
//! // Round 11: the 100 from round 0 has aged out, the 80 from round 3 takes over.
//! f.update(11, 50.0);
//! assert_eq!(f.get(), Some(80.0));
//! ```

use std::time::{Duration, Instant};

/// A point on the filter's time axis: a round count, a cycle count or an [`Instant`].
pub trait FilterTime: Copy + PartialEq {
    /// The length of a window on this axis.
    type Span: Copy + PartialOrd;
    /// How far `self` is after `earlier`; zero if it is not after it.
    fn since(self, earlier: Self) -> Self::Span;
    /// `span` divided by `n`, for the quarter- and half-window refreshes.
    fn fraction(span: Self::Span, n: u32) -> Self::Span;
}

impl FilterTime for u64 {
    type Span = u64;
    fn since(self, earlier: Self) -> u64 {
        self.saturating_sub(earlier)
    }
    fn fraction(span: u64, n: u32) -> u64 {
        span / u64::from(n.max(1))
    }
}

impl FilterTime for Instant {
    type Span = Duration;
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
    fn fraction(span: Duration, n: u32) -> Duration {
        span / n.max(1)
    }
}

/// Which end of the order a filter keeps.
pub trait Extremum {
    /// True if `candidate` is at least as good as `incumbent` (ties favour the newer sample,
    /// so that it lives longer).
    fn at_least_as_good<V: PartialOrd>(candidate: &V, incumbent: &V) -> bool;
}

/// Keep the largest sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Max;
/// Keep the smallest sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Min;

impl Extremum for Max {
    fn at_least_as_good<V: PartialOrd>(candidate: &V, incumbent: &V) -> bool {
        candidate >= incumbent
    }
}

impl Extremum for Min {
    fn at_least_as_good<V: PartialOrd>(candidate: &V, incumbent: &V) -> bool {
        candidate <= incumbent
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample<V, T> {
    time: T,
    value: V,
}

/// A windowed extremum filter over samples `V` at times `T`. Use the [`MaxFilter`] and
/// [`MinFilter`] aliases.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowedFilter<V, T: FilterTime, E> {
    window: T::Span,
    /// Best, second-best and third-best samples, each newer than the one before.
    samples: Option<[Sample<V, T>; 3]>,
    _extremum: std::marker::PhantomData<E>,
}

/// A windowed max filter, e.g. BBR's `max_bw` over ProbeBW cycles.
pub type MaxFilter<V, T> = WindowedFilter<V, T, Max>;
/// A windowed min filter, e.g. a min RTT over 10 seconds.
pub type MinFilter<V, T> = WindowedFilter<V, T, Min>;

impl<V: Copy + PartialOrd, T: FilterTime, E: Extremum> WindowedFilter<V, T, E> {
    /// An empty filter whose samples expire once they are more than `window` old.
    pub fn new(window: T::Span) -> Self {
        Self {
            window,
            samples: None,
            _extremum: std::marker::PhantomData,
        }
    }

    /// The window length.
    pub fn window(&self) -> T::Span {
        self.window
    }

    /// Change the window length; samples already held are judged against it from the next
    /// update on.
    pub fn set_window(&mut self, window: T::Span) {
        self.window = window;
    }

    /// The best sample in the window, or `None` before the first sample.
    pub fn get(&self) -> Option<V> {
        self.samples.map(|s| s[0].value)
    }

    /// When the current best sample was taken.
    pub fn best_time(&self) -> Option<T> {
        self.samples.map(|s| s[0].time)
    }

    /// Forget everything and start over with `value` at `time`.
    pub fn reset(&mut self, time: T, value: V) {
        let s = Sample { time, value };
        self.samples = Some([s; 3]);
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.samples = None;
    }

    /// Drop samples that are more than a window old at `time`, without adding one (for a
    /// clock that advances while no samples arrive). An empty window leaves the filter empty.
    pub fn expire(&mut self, time: T) {
        let window = self.window;
        let Some(s) = self.samples.as_mut() else {
            return;
        };
        if time.since(s[2].time) > window {
            self.samples = None;
            return;
        }
        while time.since(s[0].time) > window {
            s[0] = s[1];
            s[1] = s[2];
        }
    }

    /// Add a sample taken at `time` (which must not go backwards) and return the best value
    /// in the window.
    pub fn update(&mut self, time: T, value: V) -> V {
        let new = Sample { time, value };
        let Some(s) = self.samples.as_mut() else {
            self.reset(time, value);
            return value;
        };
        // A new best, or a window in which even the newest kept sample has expired: the new
        // sample replaces all three.
        if E::at_least_as_good(&value, &s[0].value) || time.since(s[2].time) > self.window {
            self.reset(time, value);
            return value;
        }
        if E::at_least_as_good(&value, &s[1].value) {
            s[1] = new;
            s[2] = new;
        } else if E::at_least_as_good(&value, &s[2].value) {
            s[2] = new;
        }
        self.age(new)
    }

    /// Expire old samples, and keep the second and third choices spread over the window so
    /// that a fresh candidate is always ready when the best one expires.
    fn age(&mut self, new: Sample<V, T>) -> V {
        let window = self.window;
        let s = self
            .samples
            .as_mut()
            .expect("aged only after the first sample");
        let dt = new.time.since(s[0].time);
        if dt > window {
            s[0] = s[1];
            s[1] = s[2];
            s[2] = new;
            if new.time.since(s[0].time) > window {
                s[0] = s[1];
                s[1] = s[2];
                s[2] = new;
            }
        } else if s[1].time == s[0].time && dt > T::fraction(window, 4) {
            // A quarter of the window has passed without a second choice: take one.
            s[1] = new;
            s[2] = new;
        } else if s[2].time == s[1].time && dt > T::fraction(window, 2) {
            // Half the window has passed without a third choice: take one.
            s[2] = new;
        }
        s[0].value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A brute-force reference: the best value among samples no older than `window`.
    fn reference_max(samples: &[(u64, u32)], now: u64, window: u64) -> Option<u32> {
        samples
            .iter()
            .filter(|(t, _)| now - t <= window)
            .map(|&(_, v)| v)
            .max()
    }

    #[test]
    fn empty_filter_has_no_value() {
        let f: MaxFilter<u32, u64> = MaxFilter::new(10);
        assert_eq!(f.get(), None);
        assert_eq!(f.best_time(), None);
    }

    #[test]
    fn max_keeps_best_within_window() {
        let mut f = MaxFilter::new(10u64);
        assert_eq!(f.update(0, 5u32), 5);
        assert_eq!(f.update(1, 9), 9);
        assert_eq!(f.update(2, 3), 9);
        assert_eq!(
            f.update(11, 4),
            9,
            "sample from t=1 is exactly 10 old: still in window"
        );
        assert_eq!(f.update(12, 2), 4, "t=1 expired; t=11's 4 is next best");
    }

    #[test]
    fn min_keeps_smallest_within_window() {
        let mut f = MinFilter::new(10u64);
        f.update(0, 50u32);
        f.update(1, 40);
        f.update(5, 45);
        assert_eq!(f.get(), Some(40));
        // t=1 expires at t=12; the 45 from t=5 remains.
        assert_eq!(f.update(12, 60), 45);
        // Everything older than t=12-... expires; only recent samples remain.
        assert_eq!(f.update(30, 70), 70);
    }

    #[test]
    fn new_best_resets_all_choices() {
        let mut f = MaxFilter::new(4u64);
        f.update(0, 1u32);
        f.update(1, 2);
        f.update(2, 10);
        // Even though 10 was seen at t=2, after it ages out there is no stale 1 or 2 left.
        assert_eq!(f.update(7, 3), 3);
    }

    #[test]
    fn time_window_with_instants() {
        let t0 = Instant::now();
        let mut f: MinFilter<Duration, Instant> = MinFilter::new(Duration::from_secs(10));
        f.update(t0, Duration::from_millis(100));
        f.update(t0 + Duration::from_secs(3), Duration::from_millis(120));
        f.update(t0 + Duration::from_secs(6), Duration::from_millis(110));
        assert_eq!(f.get(), Some(Duration::from_millis(100)));
        let v = f.update(t0 + Duration::from_secs(11), Duration::from_millis(130));
        assert!(
            v == Duration::from_millis(110) || v == Duration::from_millis(120),
            "the 100 ms sample has expired, a later choice takes over: {v:?}"
        );
        assert_eq!(f.best_time().map(|t| t > t0), Some(true));
    }

    #[test]
    fn time_going_backwards_does_not_panic() {
        let mut f = MaxFilter::new(10u64);
        f.update(10, 1u32);
        assert_eq!(f.update(5, 0), 1);
    }

    /// The three-sample approximation never reports a value that is not in the window, and
    /// never reports more than the true windowed max.
    #[test]
    fn never_exceeds_true_windowed_max_and_is_in_window() {
        // A deterministic pseudo-random sequence (xorshift), no RNG crate needed.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let window = 8u64;
        let mut f = MaxFilter::new(window);
        let mut seen = Vec::new();
        let mut t = 0u64;
        for _ in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            t += x % 3;
            let v = (x >> 20) as u32 % 1000;
            seen.push((t, v));
            let got = f.update(t, v);
            let best = reference_max(&seen, t, window).unwrap();
            assert!(got <= best, "filter {got} > true max {best} at t={t}");
            let t_best = f.best_time().unwrap();
            assert!(t - t_best <= window, "best is {} old", t - t_best);
            assert!(seen.iter().any(|&(ts, vs)| ts == t_best && vs == got));
        }
    }

    #[test]
    fn expire_without_new_samples() {
        let mut f = MaxFilter::new(1u64);
        f.update(0, 10u32);
        f.update(1, 7);
        assert_eq!(f.get(), Some(10));
        f.expire(2);
        assert_eq!(f.get(), Some(7), "cycle 0 aged out, cycle 1 kept");
        f.expire(5);
        assert_eq!(f.get(), None);
    }

    #[test]
    fn set_window_takes_effect() {
        let mut f = MaxFilter::new(100u64);
        f.update(0, 10u32);
        f.set_window(2);
        assert_eq!(f.window(), 2);
        assert_eq!(f.update(5, 1), 1);
    }
}
