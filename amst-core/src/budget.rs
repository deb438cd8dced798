//! One byte budget for everything a receiver holds for its peers, shared by every session of
//! the process.
//!
//! A receiver grants credit only against bytes reserved here, so a peer can make it hold no
//! more than its share, and 64 sessions divide one budget instead of each taking a default
//! window. Bytes keep their charge after they leave the transport: a delivered message
//! releases its bytes only when the application drops the last `Bytes` sharing it (see
//! [`charged`]), so queues above the transport (a reorder buffer, a file sink's queue) are
//! counted without knowing about the budget.
//!
//! The hot path is one atomic add or compare-and-swap per change, with no lock; only a
//! receiver that has run out of room takes one, to queue for the overdraft.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

/// Allocations from this size up get their own mapping under
/// [`limit_allocator_retention`].
pub const DIRECT_MAPPING_THRESHOLD: usize = 128 << 10;

/// Makes glibc's malloc give every allocation of [`DIRECT_MAPPING_THRESHOLD`] or more its
/// own mapping, returned to the system when freed. Call it once, early, in a process that
/// receives; it returns whether it applied (glibc on Linux only).
///
/// The budget bounds the bytes held, but not what the allocator keeps after they are freed.
/// glibc raises its mapping threshold each time it frees a large mapped block (up to
/// 32 MiB), after which read slabs and messages come from its heaps and their free space is
/// kept. `amst serve --output` receiving 10 GiB peaked at 177-189 MiB against 146-170 MiB
/// for 1 GiB by default, and at 148-150 against 137-141 MiB with the threshold fixed at 1 MiB,
/// with no change in goodput beyond the run-to-run noise. At 128 KiB the read slabs (512 KiB
/// for each of 64 datacenter streams, and those of many sessions) are mapped too: in the
/// `rss` scenario 64 sessions at once peaked at the budget plus 24-27 MiB in three runs,
/// against plus 68-69 MiB in two runs at 1 MiB (the goal is plus 64), and one 10 GiB file
/// at 143-167 MiB against 154-168. The price is an `mmap`, page faults and a `munmap` for a
/// slab replaced while a chunk still pins it: 10,000 files of 4 KiB took 3% longer (0.276 s
/// against 0.268 s, eight runs each in alternating order) with 6% more receiver CPU.
pub fn limit_allocator_retention() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a parameter of the allocator; any value is accepted or
        // refused with 0, and allocations made before keep working.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, DIRECT_MAPPING_THRESHOLD as i32) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The default process-wide budget: 128 MiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 128 << 20;

/// [`MemoryBudget::largest_message`] is the limit over this.
const LARGEST_MESSAGE_DIVISOR: u64 = 4;

/// A shared byte budget. Cloning gives another handle to the same budget.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: u64,
    held: AtomicU64,
    receivers: AtomicU64,
    /// The member allowed past the limit to complete its head message (0: none).
    overdraft: AtomicU64,
    /// Members waiting for the overdraft, first come first served.
    overdraft_queue: Mutex<VecDeque<u64>>,
    /// Ids for members; 0 is never given out.
    next_member: AtomicU64,
}

impl MemoryBudget {
    /// A new budget of `limit` bytes, separate from every other.
    pub fn new(limit: u64) -> Self {
        MemoryBudget {
            inner: Arc::new(Inner {
                limit,
                held: AtomicU64::new(0),
                receivers: AtomicU64::new(0),
                overdraft: AtomicU64::new(0),
                overdraft_queue: Mutex::new(VecDeque::new()),
                next_member: AtomicU64::new(1),
            }),
        }
    }

    /// The budget every configuration uses unless given another: one per process,
    /// [`DEFAULT_MEMORY_BUDGET`] bytes.
    pub fn process() -> Self {
        static PROCESS: OnceLock<MemoryBudget> = OnceLock::new();
        PROCESS
            .get_or_init(|| MemoryBudget::new(DEFAULT_MEMORY_BUDGET))
            .clone()
    }

    /// Bytes this budget allows.
    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// The largest message a receiver on this budget accepts: a quarter of the limit.
    ///
    /// A message is delivered whole, and the one receiver holding the overdraft (see
    /// [`BudgetMember::take_overdraft`]) may go past the limit to complete it; this bounds
    /// how far. Without it a peer announcing one message of the transport's largest size
    /// (1 GiB by default) could make a receiver with a 128 MiB budget hold 1.1 GiB.
    pub fn largest_message(&self) -> u64 {
        (self.inner.limit / LARGEST_MESSAGE_DIVISOR).max(1)
    }

    /// Bytes held against the budget now; may exceed [`limit`](Self::limit) by the small
    /// guaranteed minimum each session keeps, and by at most
    /// [`largest_message`](Self::largest_message) for the holder of the overdraft (see
    /// [`BudgetMember::take_overdraft`]).
    pub fn held(&self) -> u64 {
        self.inner.held.load(Ordering::Relaxed)
    }

    /// Receivers (sessions) sharing the budget now.
    pub fn receivers(&self) -> u64 {
        self.inner.receivers.load(Ordering::Relaxed)
    }

    /// One receiver's fair share: the limit divided among the receivers registered now.
    pub fn share(&self) -> u64 {
        self.inner.limit / self.receivers().max(1)
    }

    /// Registers a receiver for [`share`](Self::share) until the returned guard drops.
    pub fn join(&self) -> BudgetMember {
        self.inner.receivers.fetch_add(1, Ordering::Relaxed);
        BudgetMember {
            budget: self.clone(),
            id: self.inner.next_member.fetch_add(1, Ordering::Relaxed),
            queued: AtomicBool::new(false),
        }
    }

    /// Charges `bytes` if the budget has room for them, else nothing.
    pub fn try_charge(&self, bytes: u64) -> Option<Charge> {
        self.try_reserve(bytes).then(|| Charge {
            budget: self.clone(),
            bytes,
        })
    }

    /// Charges `bytes` whether or not the budget has room: for bytes already in memory
    /// (which must be counted so that others back off) or a guaranteed minimum.
    pub fn charge(&self, bytes: u64) -> Charge {
        self.inner.held.fetch_add(bytes, Ordering::Relaxed);
        Charge {
            budget: self.clone(),
            bytes,
        }
    }

    /// A charge of nothing, to grow later.
    pub fn empty_charge(&self) -> Charge {
        Charge {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn try_reserve(&self, bytes: u64) -> bool {
        let held = &self.inner.held;
        let mut now = held.load(Ordering::Relaxed);
        loop {
            let Some(after) = now.checked_add(bytes).filter(|a| *a <= self.inner.limit) else {
                return false;
            };
            match held.compare_exchange_weak(now, after, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => now = actual,
            }
        }
    }

    fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.inner.held.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        MemoryBudget::process()
    }
}

/// Bytes held against a [`MemoryBudget`], given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: MemoryBudget,
    bytes: u64,
}

impl Charge {
    /// Bytes this charge holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds `more` bytes if the budget has room; returns whether it did.
    pub fn try_grow(&mut self, more: u64) -> bool {
        let ok = self.budget.try_reserve(more);
        if ok {
            self.bytes += more;
        }
        ok
    }

    /// Adds as many of `more` bytes as the budget has room for; returns how many.
    pub fn grow_up_to(&mut self, more: u64) -> u64 {
        self.grow_below(more, self.budget.inner.limit)
    }

    /// Adds as many of `more` bytes as the overdraft allows: past the limit, up to
    /// [`MemoryBudget::largest_message`] beyond it. For the holder of the overdraft only
    /// (see [`BudgetMember::take_overdraft`]); returns how many.
    pub fn grow_into_overdraft(&mut self, more: u64) -> u64 {
        let ceiling = self
            .budget
            .inner
            .limit
            .saturating_add(self.budget.largest_message());
        self.grow_below(more, ceiling)
    }

    /// Adds as many of `more` bytes as keep the budget's total at most `ceiling`.
    fn grow_below(&mut self, more: u64, ceiling: u64) -> u64 {
        let held = &self.budget.inner.held;
        let mut now = held.load(Ordering::Relaxed);
        loop {
            let take = more.min(ceiling.saturating_sub(now));
            if take == 0 {
                return 0;
            }
            match held.compare_exchange_weak(now, now + take, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.bytes += take;
                    return take;
                }
                Err(actual) => now = actual,
            }
        }
    }

    /// Adds `more` bytes whether or not the budget has room.
    pub fn grow(&mut self, more: u64) {
        self.budget.inner.held.fetch_add(more, Ordering::Relaxed);
        self.bytes += more;
    }

    /// Gives `less` bytes (at most all) back to the budget.
    pub fn shrink(&mut self, less: u64) {
        let less = less.min(self.bytes);
        self.budget.release(less);
        self.bytes -= less;
    }

    /// Moves `bytes` (at most all) of this charge into a charge of their own.
    pub fn split(&mut self, bytes: u64) -> Charge {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Charge {
            budget: self.budget.clone(),
            bytes,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// A receiver registered with [`MemoryBudget::join`]; leaves the budget's count when dropped.
#[derive(Debug)]
pub struct BudgetMember {
    budget: MemoryBudget,
    id: u64,
    /// Whether this member is in the overdraft's queue.
    queued: AtomicBool,
}

impl BudgetMember {
    /// The budget joined.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Takes the budget's one overdraft, or keeps it; returns whether this member holds it.
    ///
    /// A message is delivered whole, so a receiver whose head message is larger than what
    /// the budget has left can only finish it by going past the limit. If every receiver
    /// could, each would hold a message beyond the budget (64 sessions of 4 MiB messages:
    /// 256 MiB over a 128 MiB budget); if none could, receivers holding parts of their head
    /// messages could fill the budget and wait on each other forever. One at a time may, and
    /// only by [`MemoryBudget::largest_message`] in all ([`Charge::grow_into_overdraft`]):
    /// the messages that earlier holders completed stay charged until their applications
    /// drop them, so the holder waits for them when the overdraft is used up. Peak memory is
    /// then the budget, a quarter of it, and the receivers' guaranteed minimum windows.
    ///
    /// Members that ask while another holds it queue up and get it in the order they first
    /// asked (each asks again, from its timer, until it gets it); a member that no longer
    /// needs it leaves the queue with [`stop_waiting`](Self::stop_waiting). Before the
    /// queue, whichever asked first after a release took it, and one busy receiver could
    /// take it again and again while another waited.
    pub fn take_overdraft(&self) -> bool {
        let inner = &self.budget.inner;
        if inner.overdraft.load(Ordering::Acquire) == self.id {
            return true;
        }
        let mut queue = crate::util::lock(&inner.overdraft_queue);
        if !self.queued.swap(true, Ordering::Relaxed) {
            queue.push_back(self.id);
        }
        if queue.front() != Some(&self.id) {
            return false;
        }
        let taken = inner
            .overdraft
            .compare_exchange(0, self.id, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if taken {
            queue.pop_front();
            self.queued.store(false, Ordering::Relaxed);
        }
        taken
    }

    /// Leaves the overdraft's queue, if this member is in it: it no longer needs it.
    pub fn stop_waiting(&self) {
        if self.queued.swap(false, Ordering::Relaxed) {
            crate::util::lock(&self.budget.inner.overdraft_queue).retain(|&id| id != self.id);
        }
    }

    /// Whether this member holds the overdraft.
    pub fn holds_overdraft(&self) -> bool {
        self.budget.inner.overdraft.load(Ordering::Acquire) == self.id
    }

    /// Gives the overdraft back, if this member holds it.
    pub fn release_overdraft(&self) {
        let _ = self.budget.inner.overdraft.compare_exchange(
            self.id,
            0,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

impl Drop for BudgetMember {
    fn drop(&mut self) {
        self.stop_waiting();
        self.release_overdraft();
        self.budget.inner.receivers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `bytes` holding `charge` until the last `Bytes` sharing them (slices and clones too) is
/// dropped. A charge of nothing leaves `bytes` as they are.
pub fn charged(bytes: Bytes, charge: Charge) -> Bytes {
    if charge.bytes == 0 {
        return bytes;
    }
    Bytes::from_owner(Charged {
        _charge: charge,
        bytes,
    })
}

/// Field order matters: the charge is released after the bytes are freed, so that whoever
/// sees the budget's room has the memory too.
struct Charged {
    bytes: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_charge_stops_at_the_limit_and_drops_give_back() {
        let b = MemoryBudget::new(100);
        let a = b.try_charge(60).expect("room");
        assert!(b.try_charge(41).is_none());
        let mut c = b.try_charge(40).expect("room");
        assert_eq!(b.held(), 100);
        assert!(!c.try_grow(1));
        drop(a);
        assert!(c.try_grow(10));
        assert_eq!(c.grow_up_to(100), 50);
        c.shrink(50);
        let part = c.split(30);
        assert_eq!((c.bytes(), part.bytes(), b.held()), (20, 30, 50));
        c.shrink(100);
        assert_eq!(b.held(), 30);
        drop(part);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_forced_charge_may_exceed_the_limit() {
        let b = MemoryBudget::new(10);
        let c = b.charge(25);
        assert_eq!(b.held(), 25);
        assert!(b.try_charge(1).is_none());
        drop(c);
        assert!(b.try_charge(10).is_some());
    }

    #[test]
    fn charged_bytes_release_when_the_last_slice_drops() {
        let b = MemoryBudget::new(1 << 20);
        let msg = charged(Bytes::from(vec![7u8; 1000]), b.charge(1000));
        let tail = msg.slice(500..);
        drop(msg);
        assert_eq!(b.held(), 1000, "a slice still holds the bytes");
        assert_eq!(tail.len(), 500);
        drop(tail);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn the_overdraft_goes_to_waiting_members_in_the_order_they_asked() {
        let b = MemoryBudget::new(100);
        let (first, second, third) = (b.join(), b.join(), b.join());
        assert!(first.take_overdraft());
        assert!(!third.take_overdraft(), "held by the first");
        assert!(!second.take_overdraft());
        first.release_overdraft();
        // The first asks again at once, and the second (queued after the third) asks
        // before the third: neither jumps the queue.
        assert!(!first.take_overdraft());
        assert!(!second.take_overdraft());
        assert!(third.take_overdraft(), "the third asked first");
        third.release_overdraft();
        assert!(!first.take_overdraft(), "queued behind the second");
        assert!(second.take_overdraft());
        // A member that stops waiting, or goes, leaves the queue.
        second.release_overdraft();
        first.stop_waiting();
        let fourth = b.join();
        assert!(fourth.take_overdraft(), "the queue is empty again");
    }

    #[test]
    fn a_member_that_goes_leaves_the_overdraft_queue() {
        let b = MemoryBudget::new(100);
        let (holder, gone, next) = (b.join(), b.join(), b.join());
        assert!(holder.take_overdraft());
        assert!(!gone.take_overdraft());
        assert!(!next.take_overdraft());
        drop(gone);
        holder.release_overdraft();
        assert!(
            next.take_overdraft(),
            "the member that went no longer blocks the queue"
        );
    }

    #[test]
    fn members_divide_the_limit() {
        let b = MemoryBudget::new(120);
        assert_eq!(b.share(), 120);
        let m1 = b.join();
        let m2 = b.join();
        let _m3 = m1.budget().join();
        assert_eq!(b.share(), 40);
        drop(m2);
        assert_eq!(b.share(), 60);
    }
}
