//! Socket tuning with socket2 and libc. Every setting is read back; what the kernel refused
//! is logged and the stream goes on without it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tracing::{debug, warn};

use crate::config::TcpConfig;

/// What the kernel actually applied to one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The congestion control in force (read back).
    pub congestion: String,
    /// `TCP_NODELAY` as read back.
    pub nodelay: bool,
    /// `TCP_NOTSENT_LOWAT` as read back, if set.
    pub notsent_lowat: Option<u32>,
    /// Whether keepalive is on.
    pub keepalive: bool,
}

/// Applies the configuration to a connected stream.
pub(crate) fn tune(sock: &impl std::os::fd::AsFd, config: &TcpConfig) -> Applied {
    let s = SockRef::from(sock);
    let mut out = Applied::default();

    let want = config.congestion.as_str();
    if let Err(e) = s.set_tcp_congestion(want.as_bytes()) {
        warn!(want, error = %e, "TCP_CONGESTION refused; keeping the kernel default");
    }
    out.congestion = match s.tcp_congestion() {
        Ok(name) => String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_string(),
        Err(e) => {
            warn!(error = %e, "cannot read TCP_CONGESTION back");
            String::new()
        }
    };
    if out.congestion != want {
        warn!(want, got = %out.congestion, "congestion control fell back");
    }

    if let Err(e) = s.set_tcp_nodelay(true) {
        warn!(error = %e, "TCP_NODELAY refused");
    }
    out.nodelay = s.tcp_nodelay().unwrap_or(false);
    if !out.nodelay {
        warn!("TCP_NODELAY is off after setting it; small frames may be delayed");
    }

    if let Some(lowat) = config.notsent_lowat {
        if let Err(e) = s.set_tcp_notsent_lowat(lowat) {
            warn!(lowat, error = %e, "TCP_NOTSENT_LOWAT refused");
        }
        out.notsent_lowat = s.tcp_notsent_lowat().ok();
        if out.notsent_lowat != Some(lowat) {
            warn!(want = lowat, got = ?out.notsent_lowat, "TCP_NOTSENT_LOWAT differs");
        }
    }

    if let Some(idle) = config.keepalive {
        let ka = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(idle.as_secs().div_ceil(3).max(1)))
            .with_retries(3);
        if let Err(e) = s.set_tcp_keepalive(&ka) {
            warn!(error = %e, "TCP keepalive refused");
        }
        out.keepalive = s.keepalive().unwrap_or(false);
        if !out.keepalive {
            warn!("keepalive is off after setting it");
        }
    }

    if let Some(size) = config.send_buffer_size {
        if let Err(e) = s.set_send_buffer_size(size) {
            warn!(size, error = %e, "SO_SNDBUF refused");
        }
        // Linux doubles the value for bookkeeping and caps it at wmem_max.
        let got = s.send_buffer_size().unwrap_or(0);
        if got < size {
            warn!(
                want = size,
                got, "SO_SNDBUF capped by the kernel (net.core.wmem_max)"
            );
        }
    }
    if let Some(size) = config.recv_buffer_size {
        if let Err(e) = s.set_recv_buffer_size(size) {
            warn!(size, error = %e, "SO_RCVBUF refused");
        }
        let got = s.recv_buffer_size().unwrap_or(0);
        if got < size {
            warn!(
                want = size,
                got, "SO_RCVBUF capped by the kernel (net.core.rmem_max)"
            );
        }
    }
    debug!(?out, "stream tuned");
    out
}

/// Caps the kernel's pacing rate for one socket in bytes per second (`u64::MAX`: no cap).
/// Returns the value read back.
pub(crate) fn set_max_pacing_rate(fd: RawFd, rate: u64) -> io::Result<u64> {
    let v: u64 = rate;
    // SAFETY: fd is a socket we own a duplicate of; the option value is a plain u64 of the
    // size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&v as *const u64).cast(),
            size_of::<u64>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut got: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: as above; the kernel writes at most `len` bytes into `got`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&mut got as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Older kernels report a u32 (with ~0U meaning unlimited).
    if len as usize == size_of::<u32>() {
        got &= u32::MAX as u64;
    }
    Ok(got)
}

/// The head of the kernel's `struct tcp_info` (include/uapi/linux/tcp.h) up to the fields we
/// read; the kernel fills what it knows and reports the length.
#[repr(C)]
#[derive(Default)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    app_limited: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
    busy_time: u64,
    rwnd_limited: u64,
    sndbuf_limited: u64,
    delivered: u32,
    delivered_ce: u32,
    bytes_sent: u64,
    bytes_retrans: u64,
}

/// One `TCP_INFO` sample of a stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// Smoothed RTT.
    pub rtt: Duration,
    /// Minimum RTT seen by the kernel.
    pub min_rtt: Duration,
    /// The kernel's latest delivery-rate estimate, bytes per second.
    pub delivery_rate: u64,
    /// Whether that estimate was taken while application-limited.
    pub app_limited: bool,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    /// Bytes retransmitted over the connection's life.
    pub bytes_retrans: u64,
    /// Segments marked lost and not yet repaired (`tcpi_lost`, the kernel's `lost_out`): a
    /// level that falls back as retransmissions are acknowledged.
    pub lost: u32,
    /// Bytes sent over the connection's life, retransmissions included.
    pub bytes_sent: u64,
    /// Bytes acknowledged by the peer's kernel.
    pub bytes_acked: u64,
    /// Segments delivered, selectively acknowledged ones included (`tcpi_delivered`): unlike
    /// `bytes_acked`, it does not jump when a repaired hole releases a cumulative ack.
    pub delivered_segments: u32,
    /// Congestion window in segments.
    pub cwnd: u32,
    /// Sender MSS.
    pub mss: u32,
    /// The kernel's current pacing rate, bytes per second.
    pub pacing_rate: u64,
    /// The `SO_MAX_PACING_RATE` cap in force.
    pub max_pacing_rate: u64,
    /// Bytes written but not yet sent.
    pub notsent_bytes: u32,
    /// Segments sent and not cumulatively acknowledged (`tcpi_unacked`, `packets_out`).
    pub unacked: u32,
    /// Of those, segments selectively acknowledged (`tcpi_sacked`).
    pub sacked: u32,
    /// Retransmitted segments not yet acknowledged (`tcpi_retrans`, `retrans_out`).
    pub retrans: u32,
}

/// Reads `TCP_INFO`.
pub(crate) fn tcp_info(fd: RawFd) -> io::Result<TcpInfo> {
    let mut raw = RawTcpInfo::default();
    let mut len = size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: raw is a plain-old-data struct of `len` bytes; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut raw as *mut RawTcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpInfo {
        rtt: Duration::from_micros(raw.rtt as u64),
        min_rtt: Duration::from_micros(raw.min_rtt as u64),
        delivery_rate: raw.delivery_rate,
        app_limited: raw.app_limited & 1 == 1,
        total_retrans: raw.total_retrans,
        bytes_retrans: raw.bytes_retrans,
        lost: raw.lost,
        bytes_sent: raw.bytes_sent,
        bytes_acked: raw.bytes_acked,
        delivered_segments: raw.delivered,
        cwnd: raw.snd_cwnd,
        mss: raw.snd_mss,
        pacing_rate: raw.pacing_rate,
        max_pacing_rate: raw.max_pacing_rate,
        notsent_bytes: raw.notsent_bytes,
        unacked: raw.unacked,
        sacked: raw.sacked,
        retrans: raw.retrans,
    })
}

/// `shutdown(2)` both directions.
pub(crate) fn shutdown_fd(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we hold open.
    let rc = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
