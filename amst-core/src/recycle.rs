//! A process-wide cache of large message buffers.
//!
//! Each message that arrives in several chunks is assembled in a buffer of its own and handed
//! to the application as `Bytes`. A fresh buffer of a few MiB comes from `mmap` and
//! page-faults under the first copy into it: with 8 streams over loopback that was 15% of all
//! CPU (perf). When the application drops such a message, its buffer comes back here, and the
//! next message of a similar size reuses the mapped pages. The cache is bounded for the whole
//! process, in bytes and in buffers, whatever the number of sessions, and it keeps a buffer
//! only while the process's [`MemoryBudget`](crate::MemoryBudget) has room for it besides
//! what the receivers hold: idle memory never pushes the process past its budget.
//!
//! A reused buffer holds an earlier message's bytes. [`Assembly`](crate::assembly) never
//! exposes a byte it has not written, so none of them can leak into a new message.

use std::sync::Mutex;

use bytes::Bytes;

/// Smaller buffers come from the allocator's own free lists without faulting.
const MIN_POOLED: usize = 256 << 10;
/// Larger ones are rare, and one would take much of the cache.
const MAX_POOLED: usize = 64 << 20;
/// Most bytes the cache keeps.
const MAX_CACHED_BYTES: usize = 64 << 20;
/// Most buffers the cache keeps; also bounds the search for a fit.
const MAX_CACHED_BUFFERS: usize = 32;

struct Cache {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    free: Vec::new(),
    bytes: 0,
});

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // A panic while holding it cannot leave it inconsistent beyond a wrong byte count.
    crate::util::lock(&CACHE)
}

/// An empty buffer with room for `len` bytes: a cached one when one fits without wasting
/// more than half of it, else a new one.
pub(crate) fn take(len: usize) -> Vec<u8> {
    if (MIN_POOLED..=MAX_POOLED).contains(&len) {
        let mut c = cache();
        let best = c
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() / 2 <= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let v = c.free.swap_remove(i);
            c.bytes -= v.capacity();
            return v;
        }
    }
    Vec::with_capacity(len)
}

/// Hands a filled buffer out as `Bytes`; a large one returns to the cache when the last
/// `Bytes` sharing it is dropped.
pub(crate) fn into_bytes(v: Vec<u8>) -> Bytes {
    if (MIN_POOLED..=MAX_POOLED).contains(&v.capacity()) {
        Bytes::from_owner(Returning(v))
    } else {
        Bytes::from(v)
    }
}

struct Returning(Vec<u8>);

impl AsRef<[u8]> for Returning {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        v.clear();
        let budget = crate::MemoryBudget::process();
        let mut c = cache();
        let room = budget.limit().saturating_sub(budget.held());
        if c.free.len() < MAX_CACHED_BUFFERS
            && c.bytes + v.capacity() <= MAX_CACHED_BYTES.min(room as usize)
        {
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
        let mut v = take(len);
        v.resize(len, 7);
        let ptr = v.as_ptr();
        let b = into_bytes(v);
        let copy = b.clone();
        drop(b);
        assert_eq!(copy.len(), len, "still shared: not back in the cache yet");
        drop(copy);
        let again = take(len - 1000);
        assert_eq!(again.as_ptr(), ptr, "the cached buffer was not reused");
        assert!(again.is_empty());
        // Far smaller messages do not take it.
        let small = take(MIN_POOLED);
        assert_ne!(small.as_ptr(), ptr);
    }

    #[test]
    fn small_and_huge_buffers_are_not_cached() {
        let b = into_bytes(vec![1u8; 1000]);
        assert_eq!(b.len(), 1000);
        assert!(take(100).capacity() >= 100);
    }
}
