//! One side of the emulated link: a network namespace, and ways to run code in it.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::sys;

#[derive(Debug)]
pub(crate) struct NsInner {
    pub name: String,
    pub device: String,
    pub addr: Ipv4Addr,
    pub peer: Ipv4Addr,
    pub ns: OwnedFd,
    /// AF_INET socket inside the namespace, for interface ioctls.
    pub ctl: OwnedFd,
    pub name_path: Option<PathBuf>,
    pub dev_stats: std::fs::File,
}

/// A network namespace holding `lo` and the link's TUN device, with one address and the
/// route to its peer only (no default route). Cheap to clone.
///
/// Sockets belong to the namespace they were created in, whichever thread uses them later:
/// create them with [`run`](Self::run), [`tcp_listener`](Self::tcp_listener),
/// [`udp_socket`](Self::udp_socket) and friends, then use them anywhere, including on the
/// test's own tokio runtime after `from_std`. Inside an async test, prefer that pattern or
/// [`spawn_tokio`](Self::spawn_tokio): [`block_on`](Self::block_on) and
/// [`run`](Self::run) block the calling thread until they finish.
#[derive(Debug, Clone)]
pub struct Namespace {
    pub(crate) inner: Arc<NsInner>,
}

impl Namespace {
    /// This side's address (198.18.0.1 on the left, 198.18.0.2 on the right by default).
    pub fn addr(&self) -> Ipv4Addr {
        self.inner.addr
    }

    /// The other side's address.
    pub fn peer_addr(&self) -> Ipv4Addr {
        self.inner.peer
    }

    /// The name under /run/netns, usable with `ip netns exec NAME ...` while the link
    /// lives (empty if the namespace could not be named and stayed anonymous).
    pub fn name(&self) -> &str {
        if self.inner.name_path.is_some() {
            &self.inner.name
        } else {
            ""
        }
    }

    /// The TUN device's name inside the namespace.
    pub fn device(&self) -> &str {
        &self.inner.device
    }

    /// Spawns a thread that enters the namespace and then runs `f`. Panics in the new
    /// thread (surfacing through `join`) if entering fails.
    pub fn spawn<F, R>(&self, f: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("ns-{}", self.inner.addr))
            .spawn(move || {
                me.enter_this_thread();
                f()
            })
            .expect("spawning a thread")
    }

    /// Runs `f` inside the namespace on a scoped thread and returns its result; `f` may
    /// borrow. A panic in `f` is resumed in the caller.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                self.enter_this_thread();
                f()
            });
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs a future to completion on a fresh current-thread tokio runtime (IO and time
    /// enabled) on a thread inside the namespace. Threads the runtime spawns inherit it.
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.run(|| new_runtime().block_on(fut))
    }

    /// Like [`block_on`](Self::block_on), on a detached thread.
    pub fn spawn_tokio<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn(move || new_runtime().block_on(fut))
    }

    /// A TCP listener bound inside the namespace. For tokio, set it non-blocking and use
    /// `tokio::net::TcpListener::from_std`.
    pub fn tcp_listener(&self, addr: impl ToSocketAddrs + Send) -> io::Result<TcpListener> {
        self.run(|| TcpListener::bind(addr))
    }

    /// A TCP connection made from inside the namespace (a blocking connect on a helper
    /// thread). For tokio, set it non-blocking and use `tokio::net::TcpStream::from_std`.
    pub fn tcp_connect(&self, addr: impl ToSocketAddrs + Send) -> io::Result<TcpStream> {
        self.run(|| TcpStream::connect(addr))
    }

    /// A UDP socket bound inside the namespace; also what `quinn::Endpoint::new` takes.
    pub fn udp_socket(&self, addr: impl ToSocketAddrs + Send) -> io::Result<UdpSocket> {
        self.run(|| UdpSocket::bind(addr))
    }

    /// A [`Command`] whose process runs inside the namespace (it calls `setns` between
    /// fork and exec). The process keeps the namespace alive until it exits, but it never
    /// has a route out of it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let me = self.inner.clone();
        // SAFETY: the closure only calls setns, which is async-signal-safe, and touches no
        // locks or allocations.
        unsafe {
            cmd.pre_exec(move || sys::setns_net(me.ns.as_raw_fd()));
        }
        cmd
    }

    fn enter_this_thread(&self) {
        if let Err(e) = sys::setns_net(self.inner.ns.as_raw_fd()) {
            panic!("cannot enter namespace {}: {e}", self.inner.name);
        }
    }
}

fn new_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}
