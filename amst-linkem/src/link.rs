//! The emulated link: the builder, the running [`LinkEm`] with its control handle, and the
//! schedule of timed changes.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::forward::{DirCounters, DirShared, Forwarder};
use crate::namespace::{Namespace, NsInner};
use crate::params::{Direction, GilbertElliott, LinkParams, QueueLimit};
use crate::sys;

/// Counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Left to right.
    pub left_to_right: DirCounters,
    /// Right to left.
    pub right_to_left: DirCounters,
}

impl Counters {
    /// The counters of one direction.
    pub fn get(&self, dir: Direction) -> DirCounters {
        match dir {
            Direction::LeftToRight => self.left_to_right,
            Direction::RightToLeft => self.right_to_left,
        }
    }
}

type Change = Box<dyn Fn(&mut LinkParams) + Send + Sync>;

/// Timed changes, relative to [`LinkEmBuilder::start`]: "at t = 10 s set rate 100 Mbit
/// and delay 40 ms" is `Schedule::new().at(Duration::from_secs(10), |p| { p.rate_bps =
/// 100_000_000; p.delay = Duration::from_millis(40) })`.
#[derive(Default)]
pub struct Schedule {
    steps: Vec<(Duration, Option<Direction>, Change)>,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let times: Vec<_> = self.steps.iter().map(|(t, d, _)| (t, d)).collect();
        f.debug_struct("Schedule").field("steps", &times).finish()
    }
}

impl Schedule {
    /// An empty schedule.
    pub fn new() -> Self {
        Self::default()
    }

    /// At `at`, apply `change` to both directions' current parameters.
    pub fn at(
        mut self,
        at: Duration,
        change: impl Fn(&mut LinkParams) + Send + Sync + 'static,
    ) -> Self {
        self.steps.push((at, None, Box::new(change)));
        self
    }

    /// At `at`, apply `change` to one direction.
    pub fn at_dir(
        mut self,
        at: Duration,
        dir: Direction,
        change: impl Fn(&mut LinkParams) + Send + Sync + 'static,
    ) -> Self {
        self.steps.push((at, Some(dir), Box::new(change)));
        self
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True if there are no steps.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Configures a [`LinkEm`]. Setters without a direction apply to both directions;
/// [`direction`](Self::direction) then overrides one.
#[derive(Debug)]
pub struct LinkEmBuilder {
    params: [LinkParams; 2],
    seed: Option<u64>,
    schedule: Schedule,
    left_addr: Ipv4Addr,
    right_addr: Ipv4Addr,
    prefix: u8,
    max_mtu: u32,
}

impl Default for LinkEmBuilder {
    fn default() -> Self {
        LinkEmBuilder {
            params: [LinkParams::default(), LinkParams::default()],
            seed: None,
            schedule: Schedule::new(),
            left_addr: Ipv4Addr::new(198, 18, 0, 1),
            right_addr: Ipv4Addr::new(198, 18, 0, 2),
            prefix: 30,
            max_mtu: 1500,
        }
    }
}

impl LinkEmBuilder {
    fn both(mut self, f: impl Fn(&mut LinkParams)) -> Self {
        self.params.iter_mut().for_each(f);
        self
    }

    /// Bottleneck rate in bit/s, each way (0 = unlimited, the default).
    pub fn rate_bps(self, bps: u64) -> Self {
        self.both(|p| p.rate_bps = bps)
    }

    /// One-way delay, each way: the round trip is twice this plus serialisation.
    pub fn delay(self, d: Duration) -> Self {
        self.both(|p| p.delay = d)
    }

    /// Round-trip time: sets the one-way delay to half of `rtt` each way.
    pub fn rtt(self, rtt: Duration) -> Self {
        self.delay(rtt / 2)
    }

    /// Uniform jitter on the one-way delay, each way (no reordering unless asked).
    pub fn jitter(self, j: Duration) -> Self {
        self.both(|p| p.jitter = j)
    }

    /// I.i.d. loss probability in `[0, 1]`, each way.
    pub fn loss(self, p: f64) -> Self {
        self.both(|x| x.loss = p)
    }

    /// Gilbert-Elliott burst loss, each way.
    pub fn gilbert_elliott(self, ge: GilbertElliott) -> Self {
        self.both(|p| p.gilbert_elliott = Some(ge))
    }

    /// Droptail queue limit, each way.
    pub fn queue(self, q: QueueLimit) -> Self {
        self.both(|p| p.queue = q)
    }

    /// Droptail queue limit in bytes, each way.
    pub fn queue_bytes(self, bytes: u64) -> Self {
        self.queue(QueueLimit::bytes(bytes))
    }

    /// Droptail queue limit in packets, each way.
    pub fn queue_packets(self, packets: u32) -> Self {
        self.queue(QueueLimit::packets(packets))
    }

    /// MTU of both TUN devices (default 1500).
    pub fn mtu(self, mtu: u32) -> Self {
        self.both(|p| p.mtu = mtu)
    }

    /// Replaces all parameters, both ways.
    pub fn params(self, params: LinkParams) -> Self {
        self.both(|p| *p = params.clone())
    }

    /// Replaces the parameters of one direction.
    pub fn direction(mut self, dir: Direction, params: LinkParams) -> Self {
        self.params[dir.index()] = params;
        self
    }

    /// Edits one direction's parameters in place: `.edit(Direction::RightToLeft, |p|
    /// p.rate_bps = 10_000_000)` for an asymmetric link.
    pub fn edit(mut self, dir: Direction, change: impl FnOnce(&mut LinkParams)) -> Self {
        change(&mut self.params[dir.index()]);
        self
    }

    /// Seeds the loss and jitter generators, for repeatable runs (default: random).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Timed changes, counted from `start`.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Largest MTU the link may be switched to at run time (default: the starting MTU).
    /// Packet buffers are sized for it.
    pub fn max_mtu(mut self, mtu: u32) -> Self {
        self.max_mtu = mtu;
        self
    }

    /// Addresses of the two sides and the prefix length of their shared subnet. They must
    /// lie in 198.18.0.0/15, the benchmarking range. Default 198.18.0.1 and .2 in a /30.
    pub fn addresses(mut self, left: Ipv4Addr, right: Ipv4Addr, prefix: u8) -> Self {
        (self.left_addr, self.right_addr, self.prefix) = (left, right, prefix);
        self
    }

    /// Creates the namespaces and devices and starts forwarding.
    pub fn start(self) -> io::Result<LinkEm> {
        LinkEm::start(self)
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

fn in_bench_range(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 198 && (o[1] & 0xfe) == 18
}

#[derive(Debug)]
struct Control {
    shared: [Arc<DirShared>; 2],
    namespaces: [Namespace; 2],
    buf_cap: usize,
}

impl Control {
    fn set(&self, dir: Direction, params: LinkParams) -> io::Result<()> {
        params.validate().map_err(invalid)?;
        if params.mtu as usize > self.buf_cap {
            return Err(invalid(format!(
                "mtu {} exceeds max_mtu {}",
                params.mtu, self.buf_cap
            )));
        }
        let i = dir.index();
        if self.shared[i].params().mtu != params.mtu {
            // The sending side's device MTU is what keeps oversized packets off this direction.
            let ns = &self.namespaces[i].inner;
            sys::set_mtu(ns.ctl.as_raw_fd(), &ns.device, params.mtu)?;
        }
        self.shared[i].set_params(params);
        Ok(())
    }
}

/// A running emulated link between two fresh network namespaces. Dropping it stops the
/// forwarders and removes the namespaces' names and devices (also during a panic).
///
/// Topology: `left` (198.18.0.1, TUN `linkem0`) ⇄ forwarder threads ⇄ `right`
/// (198.18.0.2, TUN `linkem0`). Each namespace has `lo`, its TUN and the /30 route only.
#[derive(Debug)]
pub struct LinkEm {
    control: Arc<Control>,
    stop: Arc<AtomicBool>,
    wake: OwnedFd,
    threads: Vec<JoinHandle<()>>,
    sched_stop: Arc<(Mutex<bool>, Condvar)>,
    tuns: Vec<OwnedFd>,
    epoch: Instant,
}

const DEVICE: &str = "linkem0";

impl LinkEm {
    /// Starts configuring a link.
    pub fn builder() -> LinkEmBuilder {
        LinkEmBuilder::default()
    }

    fn start(b: LinkEmBuilder) -> io::Result<LinkEm> {
        for p in &b.params {
            p.validate().map_err(invalid)?;
        }
        if !in_bench_range(b.left_addr)
            || !in_bench_range(b.right_addr)
            || b.left_addr == b.right_addr
        {
            return Err(invalid(
                "addresses must be two distinct addresses in 198.18.0.0/15",
            ));
        }
        if !(1..=31).contains(&b.prefix)
            || u32::from(b.left_addr) >> (32 - b.prefix)
                != u32::from(b.right_addr) >> (32 - b.prefix)
        {
            return Err(invalid("both addresses must share the given prefix"));
        }
        static STALE: Once = Once::new();
        STALE.call_once(|| {
            sys::cleanup_stale();
        });
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}{}-{}",
            sys::NS_PREFIX,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let max_mtu = b.max_mtu.max(b.params[0].mtu).max(b.params[1].mtu);
        let buf_cap = max_mtu as usize;

        let mk = |side: &str, addr, peer, mtu| -> io::Result<(Namespace, OwnedFd)> {
            let name = format!("{id}-{side}");
            let parts = sys::create_side(&name, DEVICE, addr, b.prefix, mtu)?;
            let ns = Namespace {
                inner: Arc::new(NsInner {
                    name,
                    device: DEVICE.into(),
                    addr,
                    peer,
                    ns: parts.ns,
                    ctl: parts.ctl,
                    name_path: parts.name_path,
                    dev_stats: parts.dev_stats,
                }),
            };
            Ok((ns, parts.tun))
        };
        let (left, left_tun) = mk("left", b.left_addr, b.right_addr, b.params[0].mtu)?;
        let (right, right_tun) = match mk("right", b.right_addr, b.left_addr, b.params[1].mtu) {
            Ok(x) => x,
            Err(e) => {
                remove_name(&left);
                return Err(e);
            }
        };

        let seed = b.seed.unwrap_or_else(rand::random);
        let shared = [
            Arc::new(DirShared::new(b.params[0].clone())),
            Arc::new(DirShared::new(b.params[1].clone())),
        ];
        let control = Arc::new(Control {
            shared: shared.clone(),
            namespaces: [left, right],
            buf_cap,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let wake = sys::eventfd()?;
        let epoch = Instant::now();
        let mut link = LinkEm {
            control,
            stop: stop.clone(),
            wake,
            threads: Vec::new(),
            sched_stop: Arc::new((Mutex::new(false), Condvar::new())),
            tuns: Vec::new(),
            epoch,
        };
        let fds = [
            (left_tun.as_raw_fd(), right_tun.as_raw_fd()),
            (right_tun.as_raw_fd(), left_tun.as_raw_fd()),
        ];
        link.tuns = vec![left_tun, right_tun];
        for (i, (ingress, egress)) in fds.into_iter().enumerate() {
            let fwd = Forwarder {
                ingress,
                egress,
                wake: link.wake.as_raw_fd(),
                stop: stop.clone(),
                shared: shared[i].clone(),
                buf_cap,
                seed: seed.wrapping_add(i as u64),
                epoch,
            };
            let name = ["linkem-l2r", "linkem-r2l"][i];
            link.threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || fwd.run())?,
            );
        }
        if !b.schedule.is_empty() {
            let mut steps = b.schedule.steps;
            steps.sort_by_key(|s| s.0);
            let control = link.control.clone();
            let sched_stop = link.sched_stop.clone();
            link.threads.push(
                std::thread::Builder::new()
                    .name("linkem-schedule".into())
                    .spawn(move || {
                        for (at, dir, change) in steps {
                            let (lock, cv) = &*sched_stop;
                            let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                            while !*stopped && epoch.elapsed() < at {
                                let left = at.saturating_sub(epoch.elapsed());
                                stopped = cv
                                    .wait_timeout(stopped, left)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                            }
                            if *stopped {
                                return;
                            }
                            drop(stopped);
                            for d in dir.map_or(Direction::BOTH.to_vec(), |d| vec![d]) {
                                let mut p = control.shared[d.index()].params();
                                change(&mut p);
                                match control.set(d, p.clone()) {
                                    Ok(()) => tracing::info!("t={at:?}: {d:?} now {p}"),
                                    Err(e) => {
                                        tracing::warn!("t={at:?}: schedule step rejected: {e}")
                                    }
                                }
                            }
                        }
                    })?,
            );
        }
        tracing::debug!("link {id} up");
        Ok(link)
    }

    /// The left namespace (198.18.0.1 by default).
    pub fn left(&self) -> &Namespace {
        &self.control.namespaces[0]
    }

    /// The right namespace (198.18.0.2 by default).
    pub fn right(&self) -> &Namespace {
        &self.control.namespaces[1]
    }

    /// The current parameters of one direction.
    pub fn params(&self, dir: Direction) -> LinkParams {
        self.control.shared[dir.index()].params()
    }

    /// Replaces one direction's parameters; packets arriving from now on see them.
    pub fn set(&self, dir: Direction, params: LinkParams) -> io::Result<()> {
        self.control.set(dir, params)
    }

    /// Replaces both directions' parameters.
    pub fn set_both(&self, params: LinkParams) -> io::Result<()> {
        for d in Direction::BOTH {
            self.control.set(d, params.clone())?;
        }
        Ok(())
    }

    /// Edits both directions' current parameters in place: `link.update(|p| p.delay = d)`.
    pub fn update(&self, change: impl Fn(&mut LinkParams)) -> io::Result<()> {
        for d in Direction::BOTH {
            let mut p = self.params(d);
            change(&mut p);
            self.control.set(d, p)?;
        }
        Ok(())
    }

    /// Edits one direction's current parameters in place.
    pub fn update_dir(
        &self,
        dir: Direction,
        change: impl FnOnce(&mut LinkParams),
    ) -> io::Result<()> {
        let mut p = self.params(dir);
        change(&mut p);
        self.control.set(dir, p)
    }

    /// Packet and byte counters of both directions.
    pub fn counters(&self) -> Counters {
        let dir = |i: usize| {
            let ns = &self.control.namespaces[i].inner;
            DirCounters {
                dropped_tun: sys::tx_dropped(&ns.dev_stats, &ns.device),
                ..self.control.shared[i].counters()
            }
        };
        Counters {
            left_to_right: dir(0),
            right_to_left: dir(1),
        }
    }

    /// Time since the link started (the schedule's clock).
    pub fn elapsed(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Stops forwarding and removes the namespaces; the same as dropping the link.
    pub fn shutdown(self) {}
}

fn remove_name(ns: &Namespace) {
    if let Some(p) = &ns.inner.name_path {
        sys::remove_name(p);
    }
}

impl Drop for LinkEm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        {
            let (lock, cv) = &*self.sched_stop;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        sys::eventfd_signal(self.wake.as_raw_fd());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Closing the TUN fds deletes the devices; removing the names lets the namespaces
        // go once nothing else (a child process, a Namespace clone) holds them.
        self.tuns.clear();
        for ns in &self.control.namespaces {
            remove_name(ns);
        }
    }
}
