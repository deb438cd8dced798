//! One message's buffer, filled at any offsets in any order, never zeroed first.
//!
//! With many streams, chunks usually arrive out of order. Zero-filling the gap in front of
//! each early chunk wrote most bytes twice (`perf`: 2.4% of a loopback run, in `memset`).
//! Here chunks go straight into uninitialised capacity, and the buffer becomes readable only
//! once its own record of written ranges covers every byte.
//!
//! A chunk gets there in one of two ways. Copied from where its frame was read (`write`,
//! under the session's lock), or read by the kernel straight into its place through a
//! [`Lease`] on its range, taken under the lock and filled outside it, so that readers of
//! several streams fill one message at once. Copying out of the read buffer was 16% of a
//! loopback run's CPU (`perf`, 8 streams, 512 KiB chunks of 4 MiB messages). A leased range
//! belongs to its lease alone: nothing else writes it until the lease is filled and returned
//! or dropped. A copy of its chunk that arrives meanwhile moves the message to a new buffer
//! instead, and voids the leases on the old one (`write`).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use bytes::buf::UninitSlice;

use crate::ranges::RangeSet;

#[derive(Debug)]
pub(crate) struct Assembly {
    /// Length 0 until complete; capacity at least `total`.
    buf: Arc<Buffer>,
    total: usize,
    written: RangeSet,
    /// Set while `buf` is a reused buffer, whose pages are resident before they are written.
    lent: Option<crate::recycle::Lent>,
}

/// The allocation, shared with the leases that fill parts of it outside the session's lock.
#[derive(Debug)]
struct Buffer {
    /// Never touched while shared: `base` points into it. Taken back once it is not.
    vec: Vec<u8>,
    base: *mut u8,
    /// Ranges out on lease, `(start, end)`: one per stream reading into the message at most.
    leased: Mutex<Vec<(usize, usize)>>,
}

// SAFETY: `base` is written through only at ranges that one owner holds at a time: a lease
// (recorded in `leased`), or the assembly under `&mut self` at ranges no lease holds; and
// read only once every range is written and no lease is left (`finish`, by `try_unwrap`).
unsafe impl Send for Buffer {}
// SAFETY: as for `Send`: shared access writes disjoint ranges only.
unsafe impl Sync for Buffer {}

impl Buffer {
    fn leased(&self) -> std::sync::MutexGuard<'_, Vec<(usize, usize)>> {
        crate::util::lock(&self.leased)
    }

    fn is_leased(&self, at: usize, end: usize) -> bool {
        self.leased().iter().any(|&(s, e)| s < end && at < e)
    }
}

impl Assembly {
    pub(crate) fn new(total: usize) -> Self {
        let (mut vec, lent) = crate::recycle::take(total);
        let base = vec.as_mut_ptr();
        Assembly {
            buf: Arc::new(Buffer {
                vec,
                base,
                leased: Mutex::new(Vec::new()),
            }),
            total,
            written: RangeSet::new(),
            lent,
        }
    }

    /// Copies `data` to offset `at`. Bytes past the end are dropped; the caller has checked
    /// the chunk's extent against the message already.
    ///
    /// A range out on lease is being read into by a stream; a copy of the same chunk sent
    /// again on another stream means the sender found that stream stalled, and it may never
    /// deliver the rest (a peer whose writer stopped mid-frame). The copy wins: the message
    /// moves to a new buffer with what is written so far, and the leases out on the old one
    /// are void (their chunks count as never received, and come again).
    pub(crate) fn write(&mut self, at: usize, data: &[u8]) {
        let end = at.saturating_add(data.len()).min(self.total);
        if at >= end {
            return;
        }
        if self.buf.is_leased(at, end) {
            self.move_away_from_leases();
        }
        // SAFETY: `[at, end)` lies within the capacity (`end <= total`); no lease holds any
        // of it (checked above, and leases are only made through `&mut self`); `data` is
        // borrowed from elsewhere, so it cannot overlap our allocation's spare capacity.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf.base.add(at), end - at);
        }
        self.mark_written(at, end);
    }

    /// Continues in a buffer of its own, with the bytes written so far, leaving the old one
    /// (kept alive by its leases) to them.
    fn move_away_from_leases(&mut self) {
        let mut vec: Vec<u8> = Vec::with_capacity(self.total);
        let base = vec.as_mut_ptr();
        for r in self.written.ranges_from(0, usize::MAX) {
            let (s, e) = (r.start as usize, r.end as usize);
            // SAFETY: written ranges lie within both capacities, and no lease writes them
            // (leases are only given for unwritten ranges, and a range leased is not written
            // by `write` without moving away first); the two allocations are distinct.
            unsafe { std::ptr::copy_nonoverlapping(self.buf.base.add(s), base.add(s), e - s) };
        }
        self.buf = Arc::new(Buffer {
            vec,
            base,
            leased: Mutex::new(Vec::new()),
        });
        // A fresh buffer: its pages are counted as they are written.
        self.lent = None;
    }

    /// The range `[at, at + len)` to fill outside the session's lock; `None` if any of it is
    /// written or leased already, or it runs past the end.
    pub(crate) fn lease(&mut self, at: usize, len: usize) -> Option<Lease> {
        let end = at
            .checked_add(len)
            .filter(|&e| e <= self.total && len > 0)?;
        if self.written.overlaps(at as u64, end as u64) {
            return None;
        }
        let mut leased = self.buf.leased();
        if leased.iter().any(|&(s, e)| s < end && at < e) {
            return None;
        }
        leased.push((at, end));
        drop(leased);
        Some(Lease {
            buf: self.buf.clone(),
            at,
            len,
            filled: 0,
        })
    }

    /// Takes back a filled lease of this assembly and counts its range as written; false
    /// (and nothing counted) if it was voided by a copy of its chunk, or is not filled.
    pub(crate) fn fill(&mut self, lease: Lease) -> bool {
        if !Arc::ptr_eq(&lease.buf, &self.buf) || lease.filled != lease.len {
            return false;
        }
        let (at, end) = (lease.at, lease.at + lease.len);
        drop(lease);
        self.mark_written(at, end);
        true
    }

    fn mark_written(&mut self, at: usize, end: usize) {
        let new = self.written.insert(at as u64, end as u64);
        if let Some(lent) = &mut self.lent {
            lent.written(new as usize);
        }
    }

    /// Whether every byte has been written.
    pub(crate) fn is_complete(&self) -> bool {
        self.written.contiguous_end(0) >= self.total as u64
    }

    /// The message, once complete; otherwise the assembly back.
    pub(crate) fn finish(self) -> Result<Bytes, Self> {
        if !self.is_complete() {
            return Err(self);
        }
        let Assembly {
            buf,
            total,
            written,
            lent,
        } = self;
        // A lease cannot be left on a complete message (its range would not be written), so
        // this is the last reference; checked anyway.
        let buffer = match Arc::try_unwrap(buf) {
            Ok(b) => b,
            Err(buf) => {
                return Err(Assembly {
                    buf,
                    total,
                    written,
                    lent,
                });
            }
        };
        let mut vec = buffer.vec;
        // SAFETY: `written` covers `[0, total)`, and only `write` and `fill` add to it, after
        // exactly those bytes were written into the capacity, which is at least `total`.
        unsafe { vec.set_len(total) };
        Ok(crate::recycle::into_bytes(vec, lent))
    }
}

/// A range of a message's buffer, lent out to be filled outside the session's lock (for
/// instance by a socket read): a [`bytes::BufMut`] of exactly the range's length, whose
/// bytes nobody else writes or reads until it is returned to its assembly. Dropped unfilled,
/// it gives the range back unwritten.
#[derive(Debug)]
pub(crate) struct Lease {
    buf: Arc<Buffer>,
    at: usize,
    len: usize,
    filled: usize,
}

impl Lease {
    pub(crate) fn remaining(&self) -> usize {
        self.len - self.filled
    }

    /// The bytes filled so far.
    pub(crate) fn filled(&self) -> &[u8] {
        // SAFETY: `[at, at + filled)` is ours alone and has been written (`advance` only
        // counts what `unfilled` handed out and the caller reported as written).
        unsafe { std::slice::from_raw_parts(self.buf.base.add(self.at), self.filled) }
    }

    /// The part not yet filled.
    pub(crate) fn unfilled(&mut self) -> &mut UninitSlice {
        // SAFETY: `[at + filled, at + len)` lies within the capacity (checked when leased)
        // and is ours alone while the lease lives.
        unsafe {
            UninitSlice::from_raw_parts_mut(
                self.buf.base.add(self.at + self.filled),
                self.len - self.filled,
            )
        }
    }

    /// Counts `n` more bytes as filled.
    ///
    /// # Safety
    /// The first `n` bytes of [`unfilled`](Self::unfilled) must have been written.
    pub(crate) unsafe fn advance(&mut self, n: usize) {
        assert!(n <= self.remaining(), "advanced past the end of a lease");
        self.filled += n;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Whether filled or not, the range is no longer this lease's: `fill` counts it as
        // written, and otherwise it is free to be written again.
        let at = self.at;
        self.buf.leased().retain(|&(s, _)| s != at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_reused_buffer_counts_its_unwritten_part_until_filled() {
        // A size no other test in this binary uses, so that parallel tests cannot take it.
        let len = (5 << 20) + 333;
        let mut first = Assembly::new(len);
        first.write(0, &vec![1; len]);
        drop(first.finish().expect("complete"));
        let mut again = Assembly::new(len);
        let unwritten = |a: &Assembly| a.lent.as_ref().map(|l| l.unwritten());
        assert!(unwritten(&again).is_some_and(|n| n >= len), "not reused");
        again.write(1000, &vec![2; 4096]);
        again.write(1000, &vec![2; 4096]);
        let cap = unwritten(&again).unwrap() + 4096;
        again.write(0, &vec![3; 1000]);
        again.write(5096, &vec![4; len - 5096]);
        assert_eq!(
            unwritten(&again),
            Some(cap - len),
            "a byte written twice counts once"
        );
        let m = again.finish().expect("complete");
        assert_eq!(m.len(), len);
    }

    #[test]
    fn an_incomplete_assembly_is_not_readable() {
        let mut a = Assembly::new(10);
        a.write(0, b"hello");
        let mut a = a.finish().expect_err("half written");
        a.write(6, b"orld");
        let mut a = a.finish().expect_err("byte 5 is missing");
        a.write(5, b"w");
        assert_eq!(a.finish().unwrap().as_ref(), b"helloworld");
    }

    #[test]
    fn writes_past_the_end_are_cut() {
        let mut a = Assembly::new(4);
        a.write(2, b"cdef");
        a.write(9, b"zz");
        a.write(0, b"ab");
        assert_eq!(a.finish().unwrap().as_ref(), b"abcd");
    }

    proptest! {
        /// Any cut of a message, written in any order and with repeats, assembles to it.
        #[test]
        fn any_order_and_repeats_give_the_message(
            msg in proptest::collection::vec(any::<u8>(), 1..4096),
            cuts in proptest::collection::vec(0usize..4096, 0..16),
            order in proptest::collection::vec(any::<u64>(), 1..64),
        ) {
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % msg.len()).collect();
            bounds.extend([0, msg.len()]);
            bounds.sort_unstable();
            bounds.dedup();
            let pieces: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
            let mut a = Assembly::new(msg.len());
            // Some pieces several times, then every piece once, so that it completes.
            for k in order {
                let (s, e) = pieces[(k % pieces.len() as u64) as usize];
                a.write(s, &msg[s..e]);
            }
            for &(s, e) in pieces.iter().rev() {
                a.write(s, &msg[s..e]);
            }
            let got = a.finish().unwrap();
            prop_assert_eq!(got.as_ref(), &msg[..]);
        }
    }
}
