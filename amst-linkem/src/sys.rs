//! Thin Linux plumbing: network namespaces, TUN devices and interface ioctls, done with
//! raw syscalls so the library needs neither `ip` nor a netlink crate.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// Where iproute2 keeps named namespaces; `ip netns exec NAME ...` finds ours here.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Every namespace we name starts with this, followed by `<pid>-<counter>-<side>`.
pub(crate) const NS_PREFIX: &str = "amst-linkem-";

/// Packets the kernel may queue on a TUN device for the forwarder. A 2-core machine running
/// iperf3 at both ends deschedules the forwarder for several ms at times; 1000 packets (11 ms
/// at 1 Gbit/s) overflowed then, 4096 (45 ms) does not. It only fills when the emulator is
/// overloaded, so it adds no delay below the ceiling.
const TXQUEUELEN: u32 = 4096;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn ctx(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn open(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated string; the fd returned is owned by us.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o444) })?;
    // SAFETY: `fd` was just returned by open and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the calling thread into the network namespace `ns`.
pub(crate) fn setns_net(ns: RawFd) -> io::Result<()> {
    // SAFETY: setns only reads the fd; a bad fd is reported as an error.
    cvt(unsafe { libc::setns(ns, libc::CLONE_NEWNET) }).map(|_| ())
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ioctl_req(fd: RawFd, op: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid ifreq for the interface ioctls used in this module.
    cvt(unsafe { libc::ioctl(fd, op as _, req as *mut libc::ifreq) }).map(|_| ())
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the ioctl API works.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Sets the MTU of `dev`, using `ctl`, an AF_INET socket created in the device's namespace.
pub(crate) fn set_mtu(ctl: RawFd, dev: &str, mtu: u32) -> io::Result<()> {
    let mut req = ifreq(dev)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl_req(ctl, libc::SIOCSIFMTU, &mut req)
        .map_err(|e| ctx(e, format!("set mtu {mtu} on {dev}")))
}

fn set_up(ctl: RawFd, dev: &str) -> io::Result<()> {
    let mut req = ifreq(dev)?;
    ioctl_req(ctl, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl_req(ctl, libc::SIOCSIFFLAGS, &mut req).map_err(|e| ctx(e, format!("bring {dev} up")))
}

/// The pieces of one side of the topology.
#[derive(Debug)]
pub(crate) struct NsParts {
    pub ns: OwnedFd,
    pub tun: OwnedFd,
    /// An AF_INET socket inside the namespace, for later interface ioctls (MTU changes).
    pub ctl: OwnedFd,
    /// `Some` when the namespace got a name under /run/netns.
    pub name_path: Option<PathBuf>,
    /// /proc/net/dev as seen from inside the namespace: the file stays bound to the
    /// namespace it was opened in, so re-reading it needs no thread hop.
    pub dev_stats: fs::File,
}

/// Creates a namespace holding only `lo` and a TUN device `dev` with `addr/prefix`.
/// Runs on a throwaway thread so the caller's own namespace never changes.
pub(crate) fn create_side(
    name: &str,
    dev: &str,
    addr: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> io::Result<NsParts> {
    let (name, dev) = (name.to_owned(), dev.to_owned());
    std::thread::Builder::new()
        .name("linkem-setup".into())
        .spawn(move || create_side_here(&name, &dev, addr, prefix, mtu))?
        .join()
        .map_err(|_| io::Error::other("namespace setup thread panicked"))?
}

fn create_side_here(
    name: &str,
    dev: &str,
    addr: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> io::Result<NsParts> {
    // SAFETY: unshare affects only this (throwaway) thread's namespace membership.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) })
        .map_err(|e| ctx(e, "unshare(CLONE_NEWNET)"))?;
    let ns = open("/proc/thread-self/ns/net", libc::O_RDONLY)?;
    let name_path = match name_namespace(name) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("namespace stays anonymous, could not name it {name}: {e}");
            None
        }
    };
    let result = (|| {
        let tun = open("/dev/net/tun", libc::O_RDWR | libc::O_NONBLOCK)
            .map_err(|e| ctx(e, "/dev/net/tun"))?;
        let mut req = ifreq(dev)?;
        req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
        ioctl_req(tun.as_raw_fd(), TUNSETIFF, &mut req).map_err(|e| ctx(e, "TUNSETIFF"))?;
        // SAFETY: plain socket creation; ownership moves into the OwnedFd.
        let ctl = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
            ))?)
        };
        let c = ctl.as_raw_fd();
        // No IPv6 on the TUN: router solicitations and MLD would add packets nobody asked for.
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
        set_mtu(c, dev, mtu)?;
        let mut req = ifreq(dev)?;
        req.ifr_ifru.ifru_metric = TXQUEUELEN as libc::c_int;
        ioctl_req(c, libc::SIOCSIFTXQLEN, &mut req)?;
        let mut req = ifreq(dev)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(addr);
        ioctl_req(c, libc::SIOCSIFADDR, &mut req).map_err(|e| ctx(e, "set address"))?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        let mut req = ifreq(dev)?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
        ioctl_req(c, libc::SIOCSIFNETMASK, &mut req).map_err(|e| ctx(e, "set netmask"))?;
        set_up(c, "lo")?;
        set_up(c, dev)?;
        let stats = fs::File::open("/proc/thread-self/net/dev")?;
        Ok((tun, ctl, stats))
    })();
    match result {
        Ok((tun, ctl, dev_stats)) => Ok(NsParts {
            ns,
            tun,
            ctl,
            name_path,
            dev_stats,
        }),
        Err(e) => {
            if let Some(p) = &name_path {
                remove_name(p);
            }
            Err(e)
        }
    }
}

/// Serialises /run/netns set-up between processes, as concurrent bind mounts of the
/// directory onto itself would stack.
fn with_netns_lock<T>(f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let lock = open("/run/amst-linkem.lock", libc::O_RDWR | libc::O_CREAT)?;
    // SAFETY: flock on an fd we own; released when `lock` closes.
    cvt(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) })?;
    f()
}

/// Makes /run/netns a shared mount point, as iproute2 does, so that unmounting a name
/// propagates to every mount namespace and the network namespace can really go away.
fn prepare_netns_dir() -> io::Result<()> {
    fs::create_dir_all(NETNS_DIR)?;
    let dir = cstr(NETNS_DIR)?;
    let none = cstr("none")?;
    let mut made_mount_point = false;
    loop {
        // SAFETY: valid C strings; changes propagation flags of an existing mount.
        let r = unsafe {
            libc::mount(
                c"".as_ptr(),
                dir.as_ptr(),
                none.as_ptr(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) || made_mount_point {
            return Err(e);
        }
        // SAFETY: bind-mounts the directory onto itself to make it a mount point.
        cvt(unsafe {
            libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                none.as_ptr(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        })?;
        made_mount_point = true;
    }
}

/// Bind-mounts the calling thread's network namespace at /run/netns/`name`.
fn name_namespace(name: &str) -> io::Result<PathBuf> {
    with_netns_lock(|| {
        prepare_netns_dir()?;
        let path = Path::new(NETNS_DIR).join(name);
        drop(open(
            path.to_str().unwrap_or_default(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_EXCL,
        )?);
        let src = cstr("/proc/thread-self/ns/net")?;
        let dst = cstr(path.to_str().unwrap_or_default())?;
        let none = cstr("none")?;
        // SAFETY: valid C strings; a plain bind mount.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                none.as_ptr(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if let Err(e) = cvt(r) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    })
}

/// Removes a namespace name (what `ip netns delete` does). The namespace itself goes away
/// once no process, thread or fd refers to it.
pub(crate) fn remove_name(path: &Path) {
    if let Ok(p) = cstr(path.to_str().unwrap_or_default()) {
        // SAFETY: valid C string; detaching an unused mount is harmless.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = fs::remove_file(path);
}

/// Removes `/run/netns/amst-linkem-<pid>-*` names whose process is gone; returns their names.
/// Namespaces of live processes (parallel tests) are left alone.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        remove_name(&entry.path());
        removed.push(name);
    }
    if !removed.is_empty() {
        tracing::info!("removed stale namespaces: {removed:?}");
    }
    removed
}

/// Checks that this process can create a network namespace and a TUN device in it, which
/// is all the emulator needs. Tests call it and skip, printing the reason, on `Err`.
pub fn check_privileges() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            let probe = std::thread::spawn(|| -> Result<(), String> {
                // SAFETY: affects only this throwaway thread.
                cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) }).map_err(|e| {
                    format!("cannot create a network namespace (need root or CAP_SYS_ADMIN): {e}")
                })?;
                let tun = open("/dev/net/tun", libc::O_RDWR)
                    .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
                let mut req = ifreq("probe0").map_err(|e| e.to_string())?;
                req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
                ioctl_req(tun.as_raw_fd(), TUNSETIFF, &mut req)
                    .map_err(|e| format!("cannot create a TUN device (need CAP_NET_ADMIN): {e}"))
            });
            probe
                .join()
                .unwrap_or_else(|_| Err("privilege probe panicked".into()))
        })
        .clone()
}

/// An eventfd used to wake forwarder threads out of `ppoll` for shutdown.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: creates a new fd that we own.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Lets this thread's timed sleeps wake within about a microsecond instead of the default
/// 50 µs slack, which would otherwise show up as added delay and jitter.
pub(crate) fn set_min_timer_slack() {
    // SAFETY: prctl with integer arguments; affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Gives the calling thread the lowest real-time priority (SCHED_FIFO 1), or nice -15 where
/// that is not allowed. The forwarder plays the part of a network: if it queued behind
/// CPU-bound test or build processes, their time slices (milliseconds) would show up as link
/// delay and jitter nobody configured. It sleeps whenever no packet is due, and the kernel's
/// real-time throttling keeps 5% of each CPU for everything else in any case.
pub(crate) fn raise_thread_priority() -> &'static str {
    // SAFETY: plain syscalls on the calling thread (tid 0 = self) with a valid sched_param.
    unsafe {
        let param = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 {
            return "SCHED_FIFO 1";
        }
        if libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -15) == 0 {
            return "nice -15";
        }
    }
    "default priority"
}

/// Waits until `fd` is readable, `wake` is signalled, or `timeout` passes (None: forever).
pub(crate) fn poll_two(fd: RawFd, wake: RawFd, timeout: Option<Duration>) {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` and `ts` outlive the call; EINTR is fine (the caller loops).
    unsafe { libc::ppoll(fds.as_mut_ptr(), 2, tsp, std::ptr::null()) };
}

/// Reads one packet; `Ok(None)` when none is waiting.
pub(crate) fn read_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(e),
    }
}

/// Writes one packet into a TUN device, which hands it to that namespace's stack.
pub(crate) fn write_packet(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: `buf` is valid for reads of its length.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The transmit-drop count of `dev` from a /proc/net/dev file: packets the kernel dropped
/// because the TUN reader (the forwarder) fell behind.
pub(crate) fn tx_dropped(stats: &fs::File, dev: &str) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        match stats.read_at(&mut buf[len..], len as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    let text = String::from_utf8_lossy(&buf[..len]);
    let prefix = format!("{dev}:");
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(&prefix).map(str::to_owned))
        .and_then(|rest| rest.split_whitespace().nth(11).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
