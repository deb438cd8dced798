//! The session's housekeeping task: the protocol's timer (delayed acks, stall resends, idle
//! pings and timeout), `TCP_INFO` sampling, the pacing model and the adaptive tuner.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::aggregate;
use crate::session::{Role, Shared, hex, lock};
use crate::sockopt;
use crate::tuner::{self, Aggregate, TunerBounds};

/// Kernel counters summed over the live streams, keyed by path so that a stream that
/// disappears does not make the sums go backwards.
#[derive(Default)]
struct Totals {
    per_path: std::collections::HashMap<u32, (u64, u64, u64)>,
}

impl Totals {
    /// Returns the growth of (delivered, retransmitted, sent) since the last call. Delivered
    /// counts selectively acknowledged segments (times the MSS), not the cumulative ack:
    /// under random loss a repaired hole releases a whole round trip of one stream's data at
    /// once, and 100 ms samples of `bytes_acked` then read well above the bottleneck (2.7x of
    /// it at 200 Mbit/s and 1% loss), which the model's max filter takes for bandwidth.
    fn delta(&mut self, now: &[(u32, sockopt::TcpInfo)]) -> (u64, u64, u64) {
        let mut d = (0, 0, 0);
        let mut next = std::collections::HashMap::with_capacity(now.len());
        for (path, info) in now {
            let delivered = info.delivered_segments as u64 * info.mss as u64;
            let cur = (delivered, info.bytes_retrans, info.bytes_sent);
            let prev = self.per_path.get(path).copied().unwrap_or((0, 0, 0));
            d.0 += cur.0.saturating_sub(prev.0);
            d.1 += cur.1.saturating_sub(prev.1);
            d.2 += cur.2.saturating_sub(prev.2);
            next.insert(*path, cur);
        }
        self.per_path = next;
        d
    }
}

pub(crate) async fn run(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.sample_period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut totals = Totals::default();
    let mut period = Aggregate::default();
    let mut last_sample = Instant::now();
    let mut last_adapt = Instant::now();
    let gated = shared.config.pacing && !shared.config.aggressive;
    let mut model = shared
        .config
        .pacing
        .then(|| aggregate::Model::new(shared.config.congestion, gated, Instant::now()));
    let mut app_limited = false;
    let mut smoother = tuner::LossSmoother::default();
    let mut trend = tuner::RateTrend::default();
    let mut gate_tick = tokio::time::interval(aggregate::GATE_PERIOD);
    gate_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let moved = shared.timer.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let deadline = lock(&shared.proto).poll_timeout();
        let timeout = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut moved => continue,
            _ = timeout => {
                let requeued = shared.update(|p| p.on_timeout(Instant::now()));
                if requeued > 0 {
                    info!(session = %hex(&shared.session_id), requeued,
                        "chunks stalled past the timeout; resending on other streams");
                }
                if lock(&shared.proto).fatal().is_some() {
                    return;
                }
                continue;
            }
            _ = gate_tick.tick(), if gated => {
                aggregate::refresh_gate(&shared);
                continue;
            }
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let infos = sample(&shared);
        let (acked, retrans, sent) = totals.delta(&infos);
        let interval = now.saturating_duration_since(last_sample);
        last_sample = now;
        let (min_rtt, srtt) = rtts(&infos);
        let starved = {
            let mut p = lock(&shared.proto);
            // A long path lengthens the stall timeout.
            p.set_srtt(srtt);
            !p.send_buffer().has_sendable() && p.send_buffer().queued_bytes() == 0
        };
        app_limited |= starved;

        if let Some(m) = model.as_mut() {
            let sample = Aggregate {
                delivered: acked,
                retransmitted: retrans,
                sent,
                interval,
                min_rtt,
                srtt,
                streams: infos.len(),
                chunk: shared.chunk_size.load(Ordering::Relaxed),
                app_limited: starved,
            };
            let rtt = infos
                .iter()
                .map(|(_, i)| i.rtt)
                .filter(|r| !r.is_zero())
                .min();
            let in_flight = aggregate::in_flight(&infos);
            let notsent = infos
                .iter()
                .map(|(_, i)| u64::from(i.notsent_bytes))
                .sum::<u64>();
            let period = aggregate::Period {
                sample,
                in_flight,
                notsent,
                rtt,
            };
            if let Some(a) = m.on_sample(now, &period) {
                if let Some(cap) = a.cap {
                    shared.inflight_cap.store(cap, Ordering::Relaxed);
                }
                apply_pacing(&shared, a.rate);
                let p = m.pacer();
                tracing::debug!(
                    target: "amst_tcp::aggregate",
                    client = matches!(shared.role, Role::Client { .. }),
                    state = %p.state(),
                    rate_mbit = a.model_rate as f64 * 8e-6,
                    bw_mbit = p.bw() * 8e-6,
                    delivered_mbit = sample.rate() * 8e-6,
                    cwnd = p.cwnd(),
                    cap = shared.inflight_cap.load(Ordering::Relaxed),
                    trim = m.trim(),
                    in_flight,
                    notsent,
                    rtt_ms = rtt.unwrap_or_default().as_secs_f64() * 1e3,
                    min_rtt_ms = p.min_rtt().unwrap_or_default().as_secs_f64() * 1e3,
                    loss = sample.loss(),
                    "aggregate sample"
                );
            }
            shared.model_cwnd.store(m.pacer().cwnd(), Ordering::Relaxed);
        }

        period.delivered += acked;
        period.retransmitted += retrans;
        period.sent += sent;
        if shared.config.adaptive
            && matches!(shared.role, Role::Client { .. })
            && now.saturating_duration_since(last_adapt) >= shared.config.adapt_period
        {
            period.interval = now.saturating_duration_since(last_adapt);
            period.min_rtt = min_rtt;
            period.srtt = srtt;
            period.streams = shared.stream_count();
            period.chunk = shared.chunk_size.load(Ordering::Relaxed);
            period.app_limited = app_limited;
            smoother.smooth(&mut period);
            adapt(&shared, &period, &mut trend);
            period = Aggregate::default();
            app_limited = false;
            last_adapt = now;
        }
    }
}

/// Reads `TCP_INFO` of every stream, stores it for `stream_stats`, and publishes the
/// aggregate estimates for `metrics`.
fn sample(shared: &Shared) -> Vec<(u32, sockopt::TcpInfo)> {
    let socks: Vec<_> = lock(&shared.streams)
        .iter()
        .map(|e| (e.path, e.sock.clone(), e.ctl.clone()))
        .collect();
    let mut out = Vec::with_capacity(socks.len());
    let mut rate = 0u64;
    for (path, sock, ctl) in socks {
        match sockopt::tcp_info(sock.as_raw_fd()) {
            Ok(info) => {
                *lock(&ctl.info) = Some(info);
                rate += info.delivery_rate;
                out.push((path, info));
            }
            Err(e) => warn!(path, error = %e, "TCP_INFO failed"),
        }
    }
    let (min_rtt, srtt) = rtts(&out);
    shared.delivery_rate.store(rate, Ordering::Relaxed);
    let cwnd = out
        .iter()
        .map(|(_, i)| u64::from(i.cwnd) * u64::from(i.mss))
        .sum();
    shared.kernel_cwnd.store(cwnd, Ordering::Relaxed);
    let retrans = out.iter().map(|(_, i)| i.bytes_retrans).sum();
    shared
        .kernel_bytes_retrans
        .store(retrans, Ordering::Relaxed);
    let lost = out.iter().map(|(_, i)| u64::from(i.lost)).sum();
    shared.kernel_lost.store(lost, Ordering::Relaxed);
    let us = |d: Option<Duration>| d.map_or(0, |d| d.as_micros().max(1) as u64);
    shared.min_rtt_us.store(us(min_rtt), Ordering::Relaxed);
    shared.srtt_us.store(us(srtt), Ordering::Relaxed);
    out
}

fn rtts(infos: &[(u32, sockopt::TcpInfo)]) -> (Option<Duration>, Option<Duration>) {
    let live: Vec<_> = infos.iter().filter(|(_, i)| !i.rtt.is_zero()).collect();
    if live.is_empty() {
        return (None, None);
    }
    let min = live
        .iter()
        .map(|(_, i)| i.min_rtt)
        .filter(|d| !d.is_zero())
        .min();
    let mean = live.iter().map(|(_, i)| i.rtt).sum::<Duration>() / live.len() as u32;
    (min, Some(mean))
}

/// Caps every stream's kernel pacing at the aggregate rate divided by the stream count.
fn apply_pacing(shared: &Shared, aggregate: u64) {
    shared.pacing_rate.store(aggregate, Ordering::Relaxed);
    let socks: Vec<_> = lock(&shared.streams)
        .iter()
        .map(|e| (e.path, e.sock.clone()))
        .collect();
    let Some(per) = shared.per_stream_pacing(socks.len()) else {
        return;
    };
    for (path, sock) in socks {
        match sockopt::set_max_pacing_rate(sock.as_raw_fd(), per) {
            Ok(got) if got != per => {
                warn!(
                    path,
                    want = per,
                    got,
                    "SO_MAX_PACING_RATE read back differs"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(path, error = %e, "SO_MAX_PACING_RATE refused"),
        }
    }
}

fn adapt(shared: &Arc<Shared>, period: &Aggregate, trend: &mut tuner::RateTrend) {
    let bounds = TunerBounds {
        min_streams: shared.config.min_streams,
        max_streams: shared.config.max_streams,
        congestion: shared.config.congestion,
    };
    let d = tuner::decide(period, &bounds, trend.climbing(period));
    if let Some(chunk) = d.chunk {
        let old = shared.chunk_size.swap(chunk, Ordering::Relaxed);
        info!(session = %hex(&shared.session_id), old, new = chunk, reason = %d.reason, "chunk size adapted");
    }
    if let Some(want) = d.streams {
        let now = shared.stream_count();
        info!(session = %hex(&shared.session_id), from = now, to = want, reason = %d.reason, "stream count adapted");
        shared.target_streams.store(want, Ordering::Relaxed);
        if want > now {
            for _ in now..want {
                let me = shared.clone();
                shared.spawn_task(async move { me.grow().await });
            }
        } else {
            for _ in want..now {
                shared.shrink();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(acked: u64, delivered_segments: u32) -> sockopt::TcpInfo {
        sockopt::TcpInfo {
            bytes_acked: acked,
            delivered_segments,
            mss: 1448,
            bytes_sent: delivered_segments as u64 * 1448,
            ..Default::default()
        }
    }

    #[test]
    fn delivered_counts_sacked_segments_not_the_cumulative_ack() {
        let mut t = Totals::default();
        assert_eq!(t.delta(&[(1, info(0, 0))]).0, 0);
        // A hole holds the cumulative ack while 100 segments are selectively acknowledged.
        assert_eq!(t.delta(&[(1, info(0, 100))]).0, 100 * 1448);
        // The repair releases the cumulative ack at once; only one more segment was delivered.
        assert_eq!(t.delta(&[(1, info(101 * 1448, 101))]).0, 1448);
        // A stream that goes away does not make the sum go backwards; a new one counts from 0.
        assert_eq!(t.delta(&[(2, info(0, 10))]).0, 10 * 1448);
    }
}
