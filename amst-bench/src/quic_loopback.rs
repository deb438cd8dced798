//! The `quic-loopback` scenario: amst-quic against quinn's own bulk transfer over loopback,
//! interleaved in the same run.
//!
//! The peer is quinn at its best, written here against quinn directly the way quinn's `perf`
//! client moves bulk data: 1 MiB `Bytes` handed to `write_chunk`, `read_chunks` on the
//! receiver, quinn's own BBR, stream and connection windows far above the BDP, 4 MiB socket
//! buffers (the most this host's `rmem_max` allows; `perf` asks for 2 MiB), and quinn-udp's
//! GSO and GRO as quinn turns them on by default. It runs with one stream and with four
//! (amst-quic's default striping), and amst-quic is compared with the better median.
//! TLS is the same for everyone: TLS 1.3 on ring, from amst-tls.
//!
//! Both sides count bytes at the receiving application; a run's goodput is the bytes over the
//! time from the first write until the receiver has them all. Every receiver checks every byte
//! against the pattern sent, so the scenario also says whether anything arrived wrong.
//! Beside goodput it reports CPU seconds per GB (the whole process: sender and receiver),
//! which a machine shared with other work disturbs far less than it disturbs goodput.
//! `AMST_QUIC_LOOPBACK_STATS=1` prints quinn's path statistics (packets, losses, cwnd, RTT,
//! UDP I/O calls) for each run; `AMST_QUIC_LOOPBACK_ONLY=TEXT` runs only the contenders whose
//! name holds TEXT (for a profiler).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amst_core::Transport;
use amst_core::codec::Psk;
use amst_quic::{
    CongestionControl, Identity, PeerVerification, QuicConfig, QuicListener, QuicTransport,
};
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, TokioRuntime, TransportConfig, VarInt};
use tokio::sync::Notify;

use crate::report::{Contender, Scenario};
use crate::stats::Summary;

/// The scenario id.
pub const ID: &str = "quic-loopback";

/// Message and write size: quinn's perf client writes 1 MiB at a time, and amst-quic gets
/// the same as messages.
const BLOCK: usize = 1 << 20;
/// quinn's windows in the baseline: far above loopback's BDP, so flow control never limits.
const QUINN_WINDOW: u64 = 64 << 20;
/// Socket buffers the baseline asks for (the kernel caps them at `rmem_max`/`wmem_max`).
const SOCKET_BUFFER: usize = 4 << 20;
/// The longest one run may take before it counts as failed.
const RUN_LIMIT: Duration = Duration::from_secs(120);
const PSK: &[u8] = b"amst benchmark key, loopback only";

/// Who moves the bytes in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// amst-quic with this controller and its default stream mapping.
    Amst(CongestionControl),
    /// quinn alone on this many unidirectional streams, with quinn's BBR or its default
    /// CUBIC.
    Quinn { streams: usize, bbr: bool },
}

impl Who {
    fn name(self) -> String {
        match self {
            Who::Amst(CongestionControl::AmstBbr) => "amst-quic (amst-cc BBR)".into(),
            Who::Amst(cc) => format!("amst-quic ({cc})"),
            Who::Quinn { streams, bbr } => format!(
                "quinn bulk (quinn {}, {streams} stream{})",
                if bbr { "BBR" } else { "CUBIC" },
                if streams == 1 { "" } else { "s" }
            ),
        }
    }
}

/// Runs the scenario: each contender moves `bytes` once per round, in turn, `rounds` times.
///
/// Metrics: `ratio_vs_quinn` (amst-quic with amst-cc BBR over the better quinn median),
/// `quinn_bbr_ratio_vs_quinn` (amst-quic with quinn's BBR, which separates the controller
/// from the transport), `cubic_ratio_vs_quinn_cubic` (amst-quic with amst-cc CUBIC over quinn
/// alone with its CUBIC: the transport's cost with a controller of the same kind on both
/// sides), and `corrupted_or_missing_bytes` (over every run of every contender).
pub fn run(bytes: u64, rounds: usize) -> Scenario {
    let bytes = bytes.max(BLOCK as u64).next_multiple_of(BLOCK as u64);
    let desc = format!(
        "loopback bulk, {} MiB per run, {rounds} interleaved rounds: amst-quic (1 MiB messages, \
         4 striped streams, amst-cc BBR; and with quinn's BBR and amst-cc CUBIC) vs quinn alone (1 MiB write_chunk, \
         quinn BBR, 64 MiB windows, 4 MiB socket buffers, GSO/GRO), 1 and 4 streams; goodput \
         until the receiver had every byte, each byte checked",
        bytes >> 20
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Scenario::failed(ID, desc, format!("tokio runtime: {e}")),
    };
    let who = [
        Who::Amst(CongestionControl::AmstBbr),
        Who::Amst(CongestionControl::QuinnBbr),
        Who::Amst(CongestionControl::AmstCubic),
        Who::Quinn {
            streams: 1,
            bbr: true,
        },
        Who::Quinn {
            streams: 4,
            bbr: true,
        },
        Who::Quinn {
            streams: 1,
            bbr: false,
        },
    ];
    // A profiler's knob: only the contenders whose name holds this text run (the others then
    // read as missing, so the scenario's ratios are missing too).
    let only = std::env::var("AMST_QUIC_LOOPBACK_ONLY").ok();
    let runs = |w: &Who| only.as_ref().is_none_or(|o| w.name().contains(o.as_str()));
    let mut contenders: Vec<Contender> = who
        .iter()
        .map(|w| Contender::new(w.name(), "Gbit/s").expecting(rounds))
        .collect();
    let mut bad_bytes = 0u64;
    // CPU seconds (user + system, this process: sender and receiver) per GB moved, per run.
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); who.len()];
    for _ in 0..rounds {
        for (i, (w, c)) in who.iter().zip(contenders.iter_mut()).enumerate() {
            if !runs(w) {
                continue;
            }
            let r = rt.block_on(async {
                match tokio::time::timeout(RUN_LIMIT, once(*w, bytes)).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no result after {RUN_LIMIT:?}")),
                }
            });
            match r {
                Ok(out) => {
                    bad_bytes += out.bad_bytes;
                    c.record(out.bps / 1e9, out.series);
                    cpu[i].push(out.cpu_s_per_gb);
                }
                Err(e) => c.fail(ID, e),
            }
        }
    }
    let mut s = Scenario::new(ID, desc);
    let median = |i: usize| contenders[i].summary().map(|m| m.median);
    let at = |w: Who| {
        who.iter()
            .position(|x| *x == w)
            .expect("a listed contender")
    };
    let (amst_bbr, amst_quinn_bbr, amst_cubic) = (
        at(Who::Amst(CongestionControl::AmstBbr)),
        at(Who::Amst(CongestionControl::QuinnBbr)),
        at(Who::Amst(CongestionControl::AmstCubic)),
    );
    let quinn_cubic = at(Who::Quinn {
        streams: 1,
        bbr: false,
    });
    let best_quinn = (0..who.len())
        .filter(|&i| matches!(who[i], Who::Quinn { .. }))
        .filter_map(|i| median(i).map(|m| (i, m)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((qi, q)) = best_quinn {
        s.notes.push(format!(
            "the ratios are against the better quinn median: `{}`",
            contenders[qi].name
        ));
        s.metrics.insert("quinn_gbps".into(), q);
        if let Some(a) = median(amst_bbr) {
            s.metrics.insert("ratio_vs_quinn".into(), a / q.max(1e-9));
        }
        let cpu_median = |i: usize| Summary::of(&cpu[i]).map(|m| m.median);
        if let (Some(a), Some(q)) = (cpu_median(amst_bbr), cpu_median(qi)) {
            s.metrics.insert("cpu_s_per_gb".into(), a);
            s.metrics.insert("quinn_cpu_s_per_gb".into(), q);
            s.metrics.insert("cpu_over_quinn".into(), a / q.max(1e-9));
        }
        if let Some(a) = median(amst_quinn_bbr) {
            s.metrics
                .insert("quinn_bbr_ratio_vs_quinn".into(), a / q.max(1e-9));
        }
    }
    // The transport without the controller's part: CUBIC on both sides (each its own).
    if let (Some(a), Some(q)) = (median(amst_cubic), median(quinn_cubic)) {
        s.metrics
            .insert("cubic_ratio_vs_quinn_cubic".into(), a / q.max(1e-9));
    }
    s.metrics
        .insert("corrupted_or_missing_bytes".into(), bad_bytes as f64);
    for (c, v) in contenders.iter().zip(&cpu) {
        if let Some(m) = Summary::of(v) {
            s.notes.push(format!(
                "{}: median {:.2} CPU s/GB (sender and receiver, user + system)",
                c.name, m.median
            ));
        }
    }
    s.contenders = contenders;
    s
}

/// What one run measured.
#[derive(Debug)]
struct Outcome {
    bps: f64,
    /// Receiver goodput every 0.25 s, in Gbit/s.
    series: Vec<(f64, f64)>,
    /// Bytes that arrived different from what was sent, plus bytes that never arrived.
    bad_bytes: u64,
    /// CPU seconds this process spent per GB (10^9 bytes) moved.
    cpu_s_per_gb: f64,
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (Linux; 0
/// elsewhere). Its resolution is the clock tick, 10 ms, against runs of a second or more.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // utime and stime, in clock ticks of 1/100 s (USER_HZ on Linux).
    f.iter().sum::<u64>() as f64 / 100.0
}

/// The byte pattern sent: position `i` of every 1 MiB block holds `pattern(i)`.
fn block() -> Bytes {
    Bytes::from(
        (0..BLOCK)
            .map(|i| (i * 131 % 251) as u8)
            .collect::<Vec<_>>(),
    )
}

/// Counts what a receiver got and how much of it differed from the pattern.
#[derive(Debug, Default)]
struct Tally {
    received: AtomicU64,
    wrong: AtomicU64,
    done: Notify,
}

impl Tally {
    /// Checks `data`, found at stream offset `at`, against the pattern.
    fn check(&self, reference: &[u8], at: u64, data: &[u8]) {
        let mut off = (at % BLOCK as u64) as usize;
        let mut rest = data;
        let mut wrong = 0u64;
        while !rest.is_empty() {
            let n = rest.len().min(BLOCK - off);
            if rest[..n] != reference[off..off + n] {
                wrong += rest[..n]
                    .iter()
                    .zip(&reference[off..off + n])
                    .filter(|(a, b)| a != b)
                    .count() as u64;
            }
            rest = &rest[n..];
            off = 0;
        }
        if wrong > 0 {
            self.wrong.fetch_add(wrong, Ordering::Relaxed);
        }
        self.received
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }
}

async fn once(who: Who, bytes: u64) -> Result<Outcome, String> {
    let tally = Arc::new(Tally::default());
    let (sender, stop_receiver) = match who {
        Who::Amst(cc) => amst_pair(cc, tally.clone(), bytes).await?,
        Who::Quinn { streams, bbr } => quinn_pair(streams, bbr, tally.clone(), bytes).await?,
    };
    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    let sampler = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut series = Vec::new();
            let mut last = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.tick().await;
            // Bounded: 480 points is two minutes, the run limit.
            while series.len() < 480 {
                tick.tick().await;
                let now = tally.received.load(Ordering::Relaxed);
                series.push((
                    start.elapsed().as_secs_f64(),
                    (now - last) as f64 * 8.0 / 0.25 / 1e9,
                ));
                last = now;
            }
            series
        })
    };
    let sending = tokio::spawn(sender);
    // Done when the receiver holds every byte (or the sender failed first).
    let finished = async {
        loop {
            let notified = tally.done.notified();
            if tally.received.load(Ordering::Relaxed) >= bytes {
                return;
            }
            notified.await;
        }
    };
    let mut sending = sending;
    let send_result = tokio::select! {
        () = finished => None,
        r = &mut sending => Some(r),
    };
    if let Some(r) = send_result {
        match r {
            Ok(Ok(())) => finished_or_timeout(&tally, bytes).await?,
            Ok(Err(e)) => return Err(format!("sending: {e}")),
            Err(e) => return Err(format!("the sender panicked: {e}")),
        }
    }
    let elapsed = start.elapsed();
    let cpu = process_cpu_seconds() - cpu_start;
    sampler.abort();
    let series = sampler.await.unwrap_or_default();
    // Let the sender wind down (close, finish) before the next run starts.
    let _ = tokio::time::timeout(Duration::from_secs(10), sending).await;
    stop_receiver.notify_one();
    let received = tally.received.load(Ordering::Relaxed);
    Ok(Outcome {
        bps: bytes as f64 * 8.0 / elapsed.as_secs_f64(),
        series,
        bad_bytes: tally.wrong.load(Ordering::Relaxed) + bytes.abs_diff(received),
        cpu_s_per_gb: cpu / (bytes as f64 / 1e9),
    })
}

/// After the sender finished, the receiver still has to read the tail.
async fn finished_or_timeout(tally: &Tally, bytes: u64) -> Result<(), String> {
    let wait = async {
        loop {
            let notified = tally.done.notified();
            if tally.received.load(Ordering::Relaxed) >= bytes {
                return;
            }
            notified.await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .map_err(|_| {
            format!(
                "the receiver had {} of {bytes} bytes 30 s after the sender finished",
                tally.received.load(Ordering::Relaxed)
            )
        })
}

type Sender = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// A connected amst-quic pair: the sender's future, and the notify that stops the receiver.
async fn amst_pair(
    cc: CongestionControl,
    tally: Arc<Tally>,
    bytes: u64,
) -> Result<(Sender, Arc<Notify>), String> {
    let psk = Psk::new(PSK).map_err(|e| e.to_string())?;
    let identity = Identity::self_signed(&["localhost"]).map_err(|e| e.to_string())?;
    let pin = identity.fingerprint();
    let base = QuicConfig::new(psk).with_congestion(cc);
    let listener = QuicListener::bind(
        "127.0.0.1:0".parse().expect("an address"),
        base.clone().with_identity(identity),
    )
    .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let client_config = base.with_verification(PeerVerification::Pinned(vec![pin]));
    let (client, server) = tokio::join!(
        QuicTransport::connect(addr, "localhost", client_config),
        listener.accept()
    );
    let (client, server) = (
        client.map_err(|e| format!("connecting: {e}"))?,
        server.map_err(|e| format!("accepting: {e}"))?,
    );
    let stop = Arc::new(Notify::new());
    {
        let (stop, tally) = (stop.clone(), tally.clone());
        tokio::spawn(async move {
            let reference = block();
            let mut at = 0u64;
            let receive = async {
                while let Ok(Some(m)) = server.recv().await {
                    tally.check(&reference, at, &m);
                    at += m.len() as u64;
                    tally.done.notify_waiters();
                }
            };
            tokio::select! {
                () = receive => {}
                () = stop.notified() => {}
            }
            if std::env::var_os("AMST_QUIC_LOOPBACK_STATS").is_some() {
                receiver_stats(&format!("{cc}"), &server.quic_stats());
            }
            drop(listener);
        });
    }
    let sender: Sender = Box::pin(async move {
        let data = block();
        let mut sent = 0u64;
        while sent < bytes {
            client.send(data.clone()).await.map_err(|e| e.to_string())?;
            sent += BLOCK as u64;
        }
        if std::env::var_os("AMST_QUIC_LOOPBACK_STATS").is_some() {
            let st = client.quic_stats();
            eprintln!(
                "{cc}: sent {} pkts, lost {}, cwnd {}, rtt {:?}, udp tx {} datagrams {} ios, rx {} datagrams {} ios",
                st.path.sent_packets,
                st.path.lost_packets,
                st.path.cwnd,
                st.path.rtt,
                st.udp_tx.datagrams,
                st.udp_tx.ios,
                st.udp_rx.datagrams,
                st.udp_rx.ios
            );
        }
        client.close().await.map_err(|e| e.to_string())
    });
    Ok((sender, stop))
}

/// What the receiver sent back: QUIC's ACKs, and for amst-quic also amst-core's Ack and
/// Credit frames on the control stream (the receiver sends no other stream data).
fn receiver_stats(who: &str, st: &quinn::ConnectionStats) {
    eprintln!(
        "{who} receiver: udp tx {} datagrams {} bytes {} ios; frames tx: {} QUIC ACK, {} STREAM, {} MAX_DATA, {} MAX_STREAM_DATA",
        st.udp_tx.datagrams,
        st.udp_tx.bytes,
        st.udp_tx.ios,
        st.frame_tx.acks,
        st.frame_tx.stream,
        st.frame_tx.max_data,
        st.frame_tx.max_stream_data
    );
}

/// A UDP socket on loopback with the baseline's socket buffers.
fn quinn_socket() -> Result<UdpSocket, String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("binding UDP: {e}"))?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())
        .map_err(|e| format!("quinn-udp socket state: {e}"))?;
    // The kernel caps these at its maximum; what it grants is what the run had.
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
    Ok(socket)
}

fn quinn_transport(bbr: bool) -> TransportConfig {
    let mut t = TransportConfig::default();
    let w = VarInt::from_u64(QUINN_WINDOW).unwrap_or(VarInt::MAX);
    t.stream_receive_window(w)
        .receive_window(w)
        .send_window(QUINN_WINDOW)
        .max_concurrent_uni_streams(VarInt::from_u32(64));
    if bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    t
}

/// A connected quinn pair: the sender writes `bytes` over `streams` unidirectional streams.
async fn quinn_pair(
    streams: usize,
    bbr: bool,
    tally: Arc<Tally>,
    bytes: u64,
) -> Result<(Sender, Arc<Notify>), String> {
    let identity = Identity::self_signed(&["localhost"]).map_err(|e| e.to_string())?;
    let alpn = b"amst-bench-quinn".to_vec();
    let mut server_tls =
        amst_tls::server_config(&identity, "identity").map_err(|e| e.to_string())?;
    server_tls.alpn_protocols = vec![alpn.clone()];
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).map_err(|e| e.to_string())?,
    ));
    server_config.transport_config(Arc::new(quinn_transport(bbr)));
    let server = Endpoint::new(
        EndpointConfig::default(),
        Some(server_config),
        quinn_socket()?,
        Arc::new(TokioRuntime),
    )
    .map_err(|e| format!("server endpoint: {e}"))?;
    let addr: SocketAddr = server.local_addr().map_err(|e| e.to_string())?;
    let mut client_tls = amst_tls::client_config(
        &amst_tls::ServerCheck::Pinned(vec![identity.fingerprint()]),
        "verification",
    )
    .map_err(|e| e.to_string())?;
    client_tls.alpn_protocols = vec![alpn];
    let mut client_config = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).map_err(|e| e.to_string())?,
    ));
    client_config.transport_config(Arc::new(quinn_transport(bbr)));
    let client = Endpoint::new(
        EndpointConfig::default(),
        None,
        quinn_socket()?,
        Arc::new(TokioRuntime),
    )
    .map_err(|e| format!("client endpoint: {e}"))?;
    let connecting = client
        .connect_with(client_config, addr, "localhost")
        .map_err(|e| e.to_string())?;
    let accepting = async {
        server
            .accept()
            .await
            .ok_or_else(|| "the server endpoint closed".to_string())?
            .await
            .map_err(|e| format!("accepting: {e}"))
    };
    let (conn, server_conn) = tokio::join!(connecting, accepting);
    let conn = conn.map_err(|e| format!("connecting: {e}"))?;
    let server_conn = server_conn?;
    let stop = Arc::new(Notify::new());
    {
        let (stop, tally) = (stop.clone(), tally.clone());
        tokio::spawn(async move {
            let accept_all = async {
                while let Ok(mut stream) = server_conn.accept_uni().await {
                    let tally = tally.clone();
                    tokio::spawn(async move {
                        let reference = block();
                        let mut bufs: [Bytes; 32] = std::array::from_fn(|_| Bytes::new());
                        let mut at = 0u64;
                        while let Ok(Some(n)) = stream.read_chunks(&mut bufs).await {
                            for b in &bufs[..n] {
                                tally.check(&reference, at, b);
                                at += b.len() as u64;
                            }
                            tally.done.notify_waiters();
                        }
                    });
                }
            };
            tokio::select! {
                () = accept_all => {}
                () = stop.notified() => {}
            }
            if std::env::var_os("AMST_QUIC_LOOPBACK_STATS").is_some() {
                receiver_stats(
                    &format!("quinn bbr={bbr} streams={streams}"),
                    &server_conn.stats(),
                );
            }
            server_conn.close(VarInt::from_u32(0), b"done");
            server.wait_idle().await;
        });
    }
    let sender: Sender = Box::pin(async move {
        let data = block();
        let blocks = bytes / BLOCK as u64;
        let per_stream = blocks.div_ceil(streams as u64);
        let mut writers = Vec::new();
        for i in 0..streams as u64 {
            let mine = per_stream.min(blocks.saturating_sub(i * per_stream));
            let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
            let data = data.clone();
            writers.push(tokio::spawn(async move {
                for _ in 0..mine {
                    s.write_chunk(data.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                s.finish().map_err(|e| e.to_string())?;
                let _ = s.stopped().await;
                Ok::<(), String>(())
            }));
        }
        for w in writers {
            w.await.map_err(|e| e.to_string())??;
        }
        if std::env::var_os("AMST_QUIC_LOOPBACK_STATS").is_some() {
            let st = conn.stats();
            eprintln!(
                "quinn bbr={bbr} streams={streams}: sent {} pkts, lost {}, cwnd {}, rtt {:?}, udp tx {} datagrams {} ios, rx {} datagrams {} ios",
                st.path.sent_packets,
                st.path.lost_packets,
                st.path.cwnd,
                st.path.rtt,
                st.udp_tx.datagrams,
                st.udp_tx.ios,
                st.udp_rx.datagrams,
                st.udp_rx.ios
            );
        }
        conn.close(VarInt::from_u32(0), b"done");
        client.wait_idle().await;
        Ok(())
    });
    Ok((sender, stop))
}
