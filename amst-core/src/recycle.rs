//! A process-wide cache of large message buffers.
//!
//! Each message that arrives in several chunks is assembled in a buffer of its own and handed
//! to the application as `Bytes`. A fresh buffer of a few MiB comes from `mmap` and
//! page-faults under the first copy into it: with 8 streams over loopback that was 15% of all
//! CPU (perf). When the application drops such a message, its buffer comes back here, and the
//! next message of a similar size reuses the mapped pages.
//!
//! Those pages stay resident while the budget counts only the bytes a message has received:
//! a cached buffer, and the part of a reused one that its new message has not filled yet, are
//! memory the budget does not see. The cache bounds that sum for the whole process, whatever
//! the number of sessions: at most the process budget's spare room, but never less than an
//! eighth of the budget, and never more than 64 MiB; buffers kept while there was room are
//! given back as receivers fill the budget again. The eighth matters under a bulk flow, where
//! the receivers hold the whole budget: a cache bounded by the room alone had nothing to give
//! (`amst serve --output`, one 4 GiB file: 3,197 munmaps for 4,096 messages, page faults under
//! the copy 14% of all CPU; with the eighth, a tenth of the page faults and 30% more
//! goodput). Counting the cache against the budget instead, so that receivers back off for
//! it, was tried and held more: 64 sessions peaked 200 MiB over the budget, against 58 here.
//!
//! A reused buffer holds an earlier message's bytes. [`Assembly`](crate::assembly) never
//! exposes a byte it has not written, so none of them can leak into a new message.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Smaller buffers come from the allocator's own free lists without faulting.
const MIN_POOLED: usize = 256 << 10;
/// Larger ones are rare, and one would take much of the cache.
const MAX_POOLED: usize = 64 << 20;
/// Most bytes cached and lent-but-unwritten together, whatever the budget.
const MAX_UNCOUNTED_BYTES: usize = 64 << 20;
/// The share of the budget those bytes may take when the receivers hold the rest.
const KEPT_DIVISOR: u64 = 8;
/// Most buffers the cache keeps; also bounds the search for a fit.
const MAX_CACHED_BUFFERS: usize = 32;

struct Cache {
    free: Vec<Vec<u8>>,
    /// Capacity of the buffers in `free`.
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    free: Vec::new(),
    bytes: 0,
});

/// Resident bytes of reused buffers that their messages have not written.
static LENT: AtomicUsize = AtomicUsize::new(0);

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // A panic while holding it cannot leave it inconsistent beyond a wrong byte count.
    crate::util::lock(&CACHE)
}

/// How many resident bytes the cache may leave uncounted now.
fn allowance() -> usize {
    let budget = crate::MemoryBudget::process();
    let room = budget.limit().saturating_sub(budget.held());
    let bound = room.max(budget.limit() / KEPT_DIVISOR);
    MAX_UNCOUNTED_BYTES.min(usize::try_from(bound).unwrap_or(usize::MAX))
}

/// The unwritten part of a reused buffer, counted in [`LENT`] until its message fills it or
/// is dropped.
#[derive(Debug)]
pub(crate) struct Lent(usize);

impl Lent {
    #[cfg(test)]
    pub(crate) fn unwritten(&self) -> usize {
        self.0
    }

    /// `n` more bytes of the buffer hold the new message, which the receiver charges itself.
    pub(crate) fn written(&mut self, n: usize) {
        let n = n.min(self.0);
        self.0 -= n;
        LENT.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        LENT.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// An empty buffer with room for `len` bytes: a cached one when one fits without wasting
/// more than an eighth of `len`, else a new one. Lending a cached buffer adds nothing to
/// what the cache leaves uncounted.
pub(crate) fn take(len: usize) -> (Vec<u8>, Option<Lent>) {
    if !(MIN_POOLED..=MAX_POOLED).contains(&len) {
        return (Vec::with_capacity(len), None);
    }
    let allowance = allowance();
    let mut c = cache();
    // Buffers kept while the budget had room: give them back once receivers need it.
    let mut evicted = Vec::new();
    while !c.free.is_empty() && c.bytes + LENT.load(Ordering::Relaxed) > allowance {
        // The least recently returned: the coldest in the CPU's caches.
        let v = c.free.remove(0);
        c.bytes -= v.capacity();
        evicted.push(v);
    }
    let best = c
        .free
        .iter()
        .enumerate()
        // Of equal fits, the most recently returned: the likeliest to be in the CPU's caches.
        .rev()
        .filter(|(_, v)| v.capacity() >= len && v.capacity() - len <= len / 8)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i);
    let taken = best.map(|i| {
        let v = c.free.swap_remove(i);
        c.bytes -= v.capacity();
        LENT.fetch_add(v.capacity(), Ordering::Relaxed);
        let lent = Lent(v.capacity());
        (v, Some(lent))
    });
    drop(c);
    drop(evicted);
    taken.unwrap_or_else(|| (Vec::with_capacity(len), None))
}

/// Hands a filled buffer out as `Bytes`; a large one returns to the cache when the last
/// `Bytes` sharing it is dropped. `lent` is what is left of a reused buffer's count: the
/// resident tail past the message, counted while the message lives.
pub(crate) fn into_bytes(v: Vec<u8>, lent: Option<Lent>) -> Bytes {
    if (MIN_POOLED..=MAX_POOLED).contains(&v.capacity()) {
        Bytes::from_owner(Returning(v, lent))
    } else {
        Bytes::from(v)
    }
}

/// The buffer, and the count of its tail (released with it).
struct Returning(Vec<u8>, #[allow(dead_code)] Option<Lent>);

impl AsRef<[u8]> for Returning {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        v.clear();
        let allowance = allowance();
        let mut c = cache();
        let uncounted = c.bytes + LENT.load(Ordering::Relaxed) + v.capacity();
        if c.free.len() < MAX_CACHED_BUFFERS && uncounted <= allowance {
            c.bytes += v.capacity();
            c.free.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_message_buffer_is_reused_for_the_next_of_similar_size() {
        // Sizes no other test in this binary uses, so that parallel tests cannot take it.
        let len = (3 << 20) + 4099;
        let (mut v, lent) = take(len);
        assert!(lent.is_none(), "a fresh buffer is not lent");
        v.resize(len, 7);
        let ptr = v.as_ptr();
        let b = into_bytes(v, lent);
        let copy = b.clone();
        drop(b);
        assert_eq!(copy.len(), len, "still shared: not back in the cache yet");
        drop(copy);
        let (again, lent) = take(len - 1000);
        assert_eq!(again.as_ptr(), ptr, "the cached buffer was not reused");
        assert!(again.is_empty());
        assert_eq!(
            lent.as_ref().map(|l| l.0),
            Some(again.capacity()),
            "the reused buffer is counted until written"
        );
        assert!(LENT.load(Ordering::Relaxed) >= again.capacity());
        // Far smaller messages do not take it.
        let (small, _) = take(MIN_POOLED);
        assert_ne!(small.as_ptr(), ptr);
    }

    #[test]
    fn small_and_huge_buffers_are_not_cached() {
        let b = into_bytes(vec![1u8; 1000], None);
        assert_eq!(b.len(), 1000);
        assert!(take(100).0.capacity() >= 100);
    }
}
