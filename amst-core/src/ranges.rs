//! A set of disjoint half-open `u64` ranges, merged on insert.

use std::collections::BTreeMap;

use crate::codec::ByteRange;

/// Disjoint, non-adjacent ranges kept merged; `start -> end`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `[start, end)`; returns how many bytes were not already in the set.
    pub fn insert(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let (mut new_start, mut new_end) = (start, end);
        let mut covered = 0;
        // The range that starts at or before `start` may overlap or touch it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            covered += e.min(end).saturating_sub(start);
            new_start = s;
            new_end = new_end.max(e);
            self.ranges.remove(&s);
        }
        // Ranges starting inside (start, end] overlap or touch it.
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            covered += e.min(end).saturating_sub(s.max(start));
            new_end = new_end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(new_start, new_end);
        (end - start) - covered
    }

    /// Whether every byte of `[start, end)` is in the set.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        matches!(self.ranges.range(..=start).next_back(), Some((_, &e)) if e >= end)
    }

    /// Whether any byte of `[start, end)` is in the set.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start < end && matches!(self.ranges.range(..end).next_back(), Some((_, &e)) if e > start)
    }

    /// The end of the range that starts at `from` or covers it, or `from` if none does:
    /// everything in `[from, result)` is in the set.
    pub fn contiguous_end(&self, from: u64) -> u64 {
        match self.ranges.range(..=from).next_back() {
            Some((_, &e)) if e > from => e,
            _ => from,
        }
    }

    /// Removes everything below `below`.
    pub fn trim_below(&mut self, below: u64) {
        while let Some((&s, &e)) = self.ranges.first_key_value() {
            if s >= below {
                break;
            }
            self.ranges.remove(&s);
            if e > below {
                self.ranges.insert(below, e);
                break;
            }
        }
    }

    /// The ranges at or above `from`, ascending, at most `max`.
    pub fn ranges_from(&self, from: u64, max: usize) -> Vec<ByteRange> {
        self.ranges
            .range(from..)
            .take(max)
            .map(|(&start, &end)| ByteRange { start, end })
            .collect()
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn merges_and_counts_new_bytes() {
        let mut s = RangeSet::new();
        assert_eq!(s.insert(10, 20), 10);
        assert_eq!(s.insert(30, 40), 10);
        assert_eq!(s.insert(15, 35), 10);
        assert_eq!(s.len(), 1);
        assert!(s.contains(10, 40));
        assert!(!s.contains(9, 40));
        assert_eq!(s.insert(40, 41), 1);
        assert_eq!(s.contiguous_end(10), 41);
        assert_eq!(s.contiguous_end(5), 5);
        s.trim_below(12);
        assert_eq!(s.ranges_from(0, 10), vec![ByteRange { start: 12, end: 41 }]);
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u64..200, 1u64..40), 1..60)) {
            let mut s = RangeSet::new();
            let mut bits = vec![false; 256];
            for (start, len) in ops {
                let end = start + len;
                let fresh = (start..end).filter(|&i| !bits[i as usize]).count() as u64;
                prop_assert_eq!(s.insert(start, end), fresh);
                for i in start..end { bits[i as usize] = true; }
            }
            for i in 0..256u64 {
                prop_assert_eq!(s.contains(i, i + 1), bits[i as usize]);
            }
            for (start, len) in [(0u64, 256u64), (5, 7), (100, 1), (30, 60), (250, 6)] {
                let any = (start..start + len).any(|i| bits[i as usize]);
                prop_assert_eq!(s.overlaps(start, start + len), any, "{}+{}", start, len);
            }
        }
    }
}
