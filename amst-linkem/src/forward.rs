//! The forwarding thread of one direction: read packets from the sender's TUN until it
//! is empty, let the [`LinkModel`] decide each one's fate, keep accepted packets in a heap
//! ordered by due time, and write them into the receiver's TUN when due.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::{LinkModel, Verdict};
use crate::params::LinkParams;
use crate::sys;

/// Packet and byte counts of one direction, as returned by
/// [`LinkEm::counters`](crate::LinkEm::counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Packets read from the sending namespace.
    pub packets_in: u64,
    /// Bytes read from the sending namespace (IP packet sizes).
    pub bytes_in: u64,
    /// Packets delivered into the receiving namespace.
    pub packets_out: u64,
    /// Bytes delivered into the receiving namespace.
    pub bytes_out: u64,
    /// Packets dropped by random loss.
    pub dropped_loss: u64,
    /// Packets dropped because the droptail queue was full.
    pub dropped_queue: u64,
    /// Packets the receiving kernel refused (malformed or device gone).
    pub write_errors: u64,
    /// Packets the *sending* kernel dropped because the forwarder did not read them fast
    /// enough (the TUN queue overflowed): the emulator's own loss, 0 below its ceiling.
    /// Not included in `packets_in`.
    pub dropped_tun: u64,
}

impl DirCounters {
    /// Packets accepted but not yet delivered or refused.
    pub fn in_flight(&self) -> u64 {
        self.packets_in.saturating_sub(
            self.packets_out + self.dropped_loss + self.dropped_queue + self.write_errors,
        )
    }
}

#[derive(Debug, Default)]
struct AtomicCounters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    packets_out: AtomicU64,
    bytes_out: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    write_errors: AtomicU64,
}

/// State one direction shares with the control handle.
#[derive(Debug)]
pub(crate) struct DirShared {
    params: Mutex<LinkParams>,
    /// Bumped on every change so the hot loop checks one atomic instead of a lock.
    generation: AtomicU64,
    counters: AtomicCounters,
}

impl DirShared {
    pub(crate) fn new(params: LinkParams) -> Self {
        DirShared {
            params: Mutex::new(params),
            generation: AtomicU64::new(0),
            counters: Default::default(),
        }
    }

    pub(crate) fn params(&self) -> LinkParams {
        self.params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_params(&self, p: LinkParams) {
        *self.params.lock().unwrap_or_else(|e| e.into_inner()) = p;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn counters(&self) -> DirCounters {
        let c = &self.counters;
        DirCounters {
            packets_in: c.packets_in.load(Relaxed),
            bytes_in: c.bytes_in.load(Relaxed),
            packets_out: c.packets_out.load(Relaxed),
            bytes_out: c.bytes_out.load(Relaxed),
            dropped_loss: c.dropped_loss.load(Relaxed),
            dropped_queue: c.dropped_queue.load(Relaxed),
            write_errors: c.write_errors.load(Relaxed),
            dropped_tun: 0,
        }
    }
}

struct Pending {
    due: u64,
    seq: u64,
    len: usize,
    buf: Box<[u8]>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    // Reversed: BinaryHeap is a max-heap and we want the earliest due time on top; `seq`
    // keeps equal due times in arrival order.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// Most packets read in one go before due packets get a chance to leave.
const READ_BATCH: usize = 64;

/// Packets due this soon leave now: a sleep that short would overshoot by more.
const EARLY_NS: u64 = 5_000;

/// How long to sleep when the next packet is due in `remaining` ns. Long timed sleeps
/// overshoot by about 1% on some VMs (measured: 110 µs on a 10 ms sleep), so we wake a
/// little early and sleep again for the rest, which overshoots by a few µs only.
fn sleep_for(remaining: u64) -> Duration {
    let t = if remaining > 200_000 {
        remaining - remaining / 32 - 20_000
    } else {
        remaining
    };
    Duration::from_nanos(t)
}

/// What a forwarding thread needs.
pub(crate) struct Forwarder {
    pub ingress: RawFd,
    pub egress: RawFd,
    pub wake: RawFd,
    pub stop: Arc<AtomicBool>,
    pub shared: Arc<DirShared>,
    pub buf_cap: usize,
    pub seed: u64,
    pub epoch: Instant,
}

impl Forwarder {
    pub(crate) fn run(self) {
        sys::set_min_timer_slack();
        let prio = sys::raise_thread_priority();
        tracing::debug!("forwarder running at {prio}");
        let now_ns = || self.epoch.elapsed().as_nanos() as u64;
        let mut generation = self
            .shared
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
        let mut model = LinkModel::new(self.shared.params(), self.seed);
        let mut heap: BinaryHeap<Pending> = BinaryHeap::with_capacity(4096);
        let mut pool: Vec<Box<[u8]>> = Vec::with_capacity(4096);
        let mut seq = 0u64;
        let c = &self.shared.counters;
        while !self.stop.load(Relaxed) {
            let g = self
                .shared
                .generation
                .load(std::sync::atomic::Ordering::Acquire);
            if g != generation {
                generation = g;
                model.set_params(self.shared.params());
                tracing::debug!("link now {}", model.params());
            }
            let mut got = 0;
            while got < READ_BATCH {
                let mut buf = pool
                    .pop()
                    .unwrap_or_else(|| vec![0u8; self.buf_cap].into_boxed_slice());
                match sys::read_packet(self.ingress, &mut buf) {
                    Ok(Some(len)) => {
                        got += 1;
                        c.packets_in.fetch_add(1, Relaxed);
                        c.bytes_in.fetch_add(len as u64, Relaxed);
                        match model.on_packet(now_ns(), len) {
                            Verdict::Lost => {
                                c.dropped_loss.fetch_add(1, Relaxed);
                                pool.push(buf);
                            }
                            Verdict::QueueFull => {
                                c.dropped_queue.fetch_add(1, Relaxed);
                                pool.push(buf);
                            }
                            Verdict::Deliver(due) => {
                                seq += 1;
                                heap.push(Pending { due, seq, len, buf });
                            }
                        }
                    }
                    Ok(None) => {
                        pool.push(buf);
                        break;
                    }
                    Err(e) => {
                        pool.push(buf);
                        tracing::warn!("TUN read failed: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                        break;
                    }
                }
            }
            let now = now_ns();
            while heap.peek().is_some_and(|p| p.due <= now + EARLY_NS) {
                let Some(p) = heap.pop() else { break };
                match sys::write_packet(self.egress, &p.buf[..p.len]) {
                    Ok(()) => {
                        c.packets_out.fetch_add(1, Relaxed);
                        c.bytes_out.fetch_add(p.len as u64, Relaxed);
                    }
                    Err(e) => {
                        c.write_errors.fetch_add(1, Relaxed);
                        tracing::debug!("TUN write failed: {e}");
                    }
                }
                pool.push(p.buf);
            }
            if got == READ_BATCH {
                continue;
            }
            let timeout = heap
                .peek()
                .map(|p| sleep_for(p.due.saturating_sub(now_ns())));
            if timeout.is_some_and(|t| t.as_nanos() as u64 <= EARLY_NS) {
                continue;
            }
            sys::poll_two(self.ingress, self.wake, timeout);
        }
    }
}
