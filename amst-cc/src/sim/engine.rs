//! The event loop. Time is kept in integer nanoseconds so that runs are exactly repeatable.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::report::{FlowReport, FlowSample, LinkReport, PhaseChange, Report, Sample};
use super::{Link, LinkChange, Scenario};
use crate::delivery_rate::{DeliveryRateEstimator, PacketSendState};
use crate::{Ack, CongestionController, Loss, Phase};

type Nanos = u64;

const MS: Nanos = 1_000_000;
/// RFC 9002 §6.1.1: kPacketThreshold.
const PACKET_THRESHOLD: u64 = 3;
/// RFC 9002 §6.1.2: kTimeThreshold = 9/8.
const TIME_THRESHOLD_NUM: u64 = 9;
const TIME_THRESHOLD_DEN: u64 = 8;
/// RFC 9002 §6.1.2: kGranularity.
const GRANULARITY: Nanos = MS;
/// RFC 9002 §6.2.2: kInitialRtt.
const INITIAL_RTT: Nanos = 333 * MS;

fn nanos(d: Duration) -> Nanos {
    d.as_nanos().min(u64::MAX as u128) as Nanos
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    FlowStart(usize),
    LinkChange(usize),
    /// The packet being serialised has left the bottleneck.
    TxDone,
    /// A packet reached its receiver.
    Arrive(Packet),
    /// An ack reached its sender.
    AckArrive {
        flow: usize,
        pn: u64,
    },
    SendTimer(usize),
    LossTimer(usize),
    Sample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Packet {
    flow: usize,
    pn: u64,
    seg: u64,
    size: u64,
    enqueued: Nanos,
}

#[derive(Clone, Copy, Debug)]
enum SentState {
    Outstanding(PacketSendState),
    Acked,
    /// Declared lost; the details are in `Sender::lost_recent`.
    Lost,
}

#[derive(Clone, Copy, Debug)]
struct SentPacket {
    state: SentState,
    seg: u64,
    size: u64,
    sent: Nanos,
}

#[derive(Debug, Default)]
struct Episode {
    id: u64,
    /// Send time of the newest packet sent before the episode began.
    started: Nanos,
    lost: u64,
    spurious: u64,
    undone: bool,
}

#[derive(Debug)]
struct Sender {
    cc: Box<dyn CongestionController>,
    est: DeliveryRateEstimator,
    start: Nanos,
    total_segments: Option<u64>,
    next_seg: u64,
    retx: VecDeque<u64>,
    next_pn: u64,
    /// `sent[i]` is packet `base_pn + i`.
    sent: VecDeque<SentPacket>,
    base_pn: u64,
    /// Recently declared-lost packets `(pn, episode, declared at)`, in packet-number order
    /// (RFC 9002's thresholds declare losses in that order), kept for two RTTs so that a late
    /// ack can prove a loss spurious.
    lost_recent: VecDeque<(u64, u64, Nanos)>,
    bytes_in_flight: u64,
    largest_acked: Option<u64>,
    srtt: Option<Nanos>,
    rttvar: Nanos,
    latest_rtt: Nanos,
    min_rtt: Option<Nanos>,
    rtt_sum: u128,
    rtt_count: u64,
    pto_count: u32,
    probes: u32,
    next_send: Nanos,
    send_timer_pending: Option<Nanos>,
    loss_deadline: Option<Nanos>,
    loss_timer_pending: Option<Nanos>,
    app_limited: bool,
    episode: Episode,
    next_episode: u64,
    started: bool,
    // receiver side
    received: Vec<u64>,
    delivered_bytes: u64,
    delivered_at_last_sample: u64,
    completed_at: Option<Nanos>,
    // stats
    packets_sent: u64,
    declared_lost: u64,
    spurious: u64,
    undo_events: u64,
    dropped: u64,
    phase_trace: Vec<PhaseChange>,
    last_phase: Option<Phase>,
}

impl Sender {
    fn has_data(&self) -> bool {
        !self.retx.is_empty() || self.total_segments.is_none_or(|n| self.next_seg < n)
    }

    fn loss_delay(&self) -> Nanos {
        let rtt = self.srtt.unwrap_or(INITIAL_RTT).max(self.latest_rtt);
        (rtt * TIME_THRESHOLD_NUM / TIME_THRESHOLD_DEN).max(GRANULARITY)
    }

    fn pto(&self) -> Nanos {
        let (srtt, var) = match self.srtt {
            Some(s) => (s, self.rttvar),
            None => (INITIAL_RTT, INITIAL_RTT / 2),
        };
        (srtt + (4 * var).max(GRANULARITY)) << self.pto_count.min(16)
    }

    fn record_phase(&mut self, t: Nanos) {
        let phase = self.cc.metrics().phase;
        if self.last_phase != Some(phase) {
            self.last_phase = Some(phase);
            self.phase_trace.push(PhaseChange {
                at: Duration::from_nanos(t),
                phase,
            });
        }
    }

    fn mark_received(&mut self, seg: u64, size: u64, now: Nanos) {
        let (w, b) = ((seg / 64) as usize, seg % 64);
        if self.received.len() <= w {
            self.received.resize(w + 1, 0);
        }
        if self.received[w] & (1 << b) == 0 {
            self.received[w] |= 1 << b;
            self.delivered_bytes += size;
            if self.completed_at.is_none()
                && let Some(n) = self.total_segments
                && self.delivered_bytes >= n * size
            {
                self.completed_at = Some(now);
            }
        }
    }
}

#[derive(Debug)]
struct Bottleneck {
    link: Link,
    queue: VecDeque<Packet>,
    queued_bytes: u64,
    in_service: Option<Packet>,
    last_arrival: Nanos,
    last_ack_arrival: Vec<Nanos>,
    transmitted_bytes: u64,
    /// The policer's tokens in bytes, and when they were last topped up.
    policer_tokens: f64,
    policer_updated: Nanos,
    policer_drops: u64,
    overflow_drops: u64,
    random_drops: u64,
    delay_sum: u128,
    delay_count: u64,
    delay_max: Nanos,
    interval_delay_sum: u128,
    interval_delay_count: u64,
}

pub(super) struct Engine {
    origin: Instant,
    now: Nanos,
    end: Nanos,
    seq: u64,
    events: BinaryHeap<Reverse<(Nanos, u64, Event)>>,
    rng: ChaCha8Rng,
    mss: u64,
    link: Bottleneck,
    changes: Vec<(Duration, LinkChange)>,
    senders: Vec<Sender>,
    names: Vec<String>,
    sample_interval: Nanos,
    samples: Vec<Sample>,
}

impl Engine {
    pub(super) fn new(scenario: Scenario, origin: Instant) -> Self {
        let mss = scenario.mss.max(1);
        let n = scenario.flows.len();
        let mut names = Vec::with_capacity(n);
        let mut senders = Vec::with_capacity(n);
        for flow in scenario.flows {
            names.push(flow.name);
            senders.push(Sender {
                cc: flow.controller,
                est: DeliveryRateEstimator::new(),
                start: nanos(flow.start),
                total_segments: flow.bytes.map(|b| b.div_ceil(mss)),
                next_seg: 0,
                retx: VecDeque::new(),
                next_pn: 0,
                sent: VecDeque::new(),
                base_pn: 0,
                lost_recent: VecDeque::new(),
                bytes_in_flight: 0,
                largest_acked: None,
                srtt: None,
                rttvar: 0,
                latest_rtt: 0,
                min_rtt: None,
                rtt_sum: 0,
                rtt_count: 0,
                pto_count: 0,
                probes: 0,
                next_send: 0,
                send_timer_pending: None,
                loss_deadline: None,
                loss_timer_pending: None,
                app_limited: false,
                episode: Episode::default(),
                next_episode: 1,
                started: false,
                received: Vec::new(),
                delivered_bytes: 0,
                delivered_at_last_sample: 0,
                completed_at: None,
                packets_sent: 0,
                declared_lost: 0,
                spurious: 0,
                undo_events: 0,
                dropped: 0,
                phase_trace: Vec::new(),
                last_phase: None,
            });
        }
        let mut e = Self {
            origin,
            now: 0,
            end: nanos(scenario.duration),
            seq: 0,
            events: BinaryHeap::new(),
            rng: ChaCha8Rng::seed_from_u64(scenario.seed),
            mss,
            link: Bottleneck {
                link: scenario.link,
                queue: VecDeque::new(),
                queued_bytes: 0,
                in_service: None,
                last_arrival: 0,
                last_ack_arrival: vec![0; n],
                transmitted_bytes: 0,
                policer_tokens: 0.0,
                policer_updated: 0,
                policer_drops: 0,
                overflow_drops: 0,
                random_drops: 0,
                delay_sum: 0,
                delay_count: 0,
                delay_max: 0,
                interval_delay_sum: 0,
                interval_delay_count: 0,
            },
            changes: scenario.link_changes,
            senders,
            names,
            sample_interval: nanos(scenario.sample_interval).max(MS),
            samples: Vec::new(),
        };
        e.link.policer_tokens = e.link.link.policer.map_or(0.0, |p| p.burst_bytes as f64);
        for i in 0..n {
            let t = e.senders[i].start;
            e.push(t, Event::FlowStart(i));
        }
        for i in 0..e.changes.len() {
            let t = nanos(e.changes[i].0);
            e.push(t, Event::LinkChange(i));
        }
        let t = e.sample_interval;
        e.push(t, Event::Sample);
        e
    }

    fn push(&mut self, at: Nanos, ev: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    fn instant(&self, t: Nanos) -> Instant {
        self.origin + Duration::from_nanos(t)
    }

    pub(super) fn run(mut self) -> Report {
        while let Some(Reverse((t, _, ev))) = self.events.pop() {
            if t > self.end {
                break;
            }
            self.now = t;
            match ev {
                Event::FlowStart(f) => self.on_flow_start(f),
                Event::LinkChange(i) => self.on_link_change(i),
                Event::TxDone => self.on_tx_done(),
                Event::Arrive(p) => self.on_arrive(p),
                Event::AckArrive { flow, pn } => self.on_ack(flow, pn),
                Event::SendTimer(f) => {
                    if self.senders[f].send_timer_pending == Some(t) {
                        self.senders[f].send_timer_pending = None;
                        self.try_send(f);
                    }
                }
                Event::LossTimer(f) => self.on_loss_timer(f, t),
                Event::Sample => self.on_sample(),
            }
        }
        self.report()
    }

    fn on_flow_start(&mut self, f: usize) {
        let mss = self.mss;
        let now = self.now;
        let s = &mut self.senders[f];
        s.started = true;
        s.cc.on_mtu_update(mss);
        s.next_send = now;
        s.record_phase(now);
        self.try_send(f);
    }

    fn on_link_change(&mut self, i: usize) {
        let c = self.changes[i].1.clone();
        let l = &mut self.link.link;
        if let Some(r) = c.rate_bps {
            l.rate_bps = r;
        }
        if let Some(r) = c.rtt {
            l.rtt = r;
        }
        if let Some(b) = c.buffer_bytes {
            l.buffer_bytes = b;
        }
        if let Some(p) = c.loss {
            l.loss = p;
        }
    }

    fn serialisation(&self, size: u64) -> Nanos {
        ((size * 8) as f64 / self.link.link.rate_bps.max(1.0) * 1e9) as Nanos
    }

    fn enqueue(&mut self, p: Packet) {
        let loss = self.link.link.loss;
        if loss > 0.0 && self.rng.random::<f64>() < loss {
            self.link.random_drops += 1;
            self.senders[p.flow].dropped += 1;
            return;
        }
        if let Some(policer) = self.link.link.policer {
            let l = &mut self.link;
            let elapsed = (self.now - l.policer_updated) as f64 / 1e9;
            l.policer_updated = self.now;
            l.policer_tokens = (l.policer_tokens + elapsed * policer.rate_bps / 8.0)
                .min(policer.burst_bytes as f64);
            if l.policer_tokens < p.size as f64 {
                l.policer_drops += 1;
                self.senders[p.flow].dropped += 1;
                return;
            }
            l.policer_tokens -= p.size as f64;
        }
        if self.link.in_service.is_none() {
            self.start_service(p);
            return;
        }
        if self.link.queued_bytes + p.size > self.link.link.buffer_bytes {
            self.link.overflow_drops += 1;
            self.senders[p.flow].dropped += 1;
            return;
        }
        self.link.queued_bytes += p.size;
        self.link.queue.push_back(p);
    }

    fn start_service(&mut self, p: Packet) {
        let delay = self.now - p.enqueued;
        let l = &mut self.link;
        l.delay_sum += delay as u128;
        l.delay_count += 1;
        l.delay_max = l.delay_max.max(delay);
        l.interval_delay_sum += delay as u128;
        l.interval_delay_count += 1;
        l.in_service = Some(p);
        let t = self.now + self.serialisation(p.size);
        self.push(t, Event::TxDone);
    }

    fn on_tx_done(&mut self) {
        let Some(p) = self.link.in_service.take() else {
            return;
        };
        self.link.transmitted_bytes += p.size;
        let owd = nanos(self.link.link.rtt) / 2;
        let held_back = match self.link.link.reordering {
            Some(r) if r.probability > 0.0 && self.rng.random::<f64>() < r.probability => {
                Some(nanos(r.extra_delay))
            }
            _ => None,
        };
        match held_back {
            // A held-back packet does not hold up the ones behind it.
            Some(extra) => self.push(self.now + owd + extra, Event::Arrive(p)),
            None => {
                let at = (self.now + owd).max(self.link.last_arrival);
                self.link.last_arrival = at;
                self.push(at, Event::Arrive(p));
            }
        }
        if let Some(next) = self.link.queue.pop_front() {
            self.link.queued_bytes -= next.size;
            self.start_service(next);
        }
    }

    fn on_arrive(&mut self, p: Packet) {
        let now = self.now;
        self.senders[p.flow].mark_received(p.seg, p.size, now);
        let owd = nanos(self.link.link.rtt) / 2;
        let mut at = now + owd;
        if let Some(every) = self.link.link.ack_aggregation.map(nanos).filter(|&n| n > 0) {
            at = at.div_ceil(every) * every;
        }
        let at = at.max(self.link.last_ack_arrival[p.flow]);
        self.link.last_ack_arrival[p.flow] = at;
        self.push(
            at,
            Event::AckArrive {
                flow: p.flow,
                pn: p.pn,
            },
        );
    }

    fn try_send(&mut self, f: usize) {
        let now = self.now;
        let t_now = self.instant(now);
        let mss = self.mss;
        loop {
            let s = &mut self.senders[f];
            if !s.has_data() {
                if !s.app_limited {
                    s.app_limited = true;
                    s.est.on_app_limited(s.bytes_in_flight);
                    s.cc.on_app_limited(t_now, s.bytes_in_flight);
                }
                return;
            }
            s.app_limited = false;
            let probe = s.probes > 0;
            if !probe && s.bytes_in_flight + mss > s.cc.cwnd() {
                return;
            }
            if !probe && now < s.next_send {
                let at = s.next_send;
                if s.send_timer_pending.is_none_or(|p| p > at) {
                    s.send_timer_pending = Some(at);
                    self.push(at, Event::SendTimer(f));
                }
                return;
            }
            if probe {
                s.probes -= 1;
            }
            let seg = match s.retx.pop_front() {
                Some(seg) => seg,
                None => {
                    s.next_seg += 1;
                    s.next_seg - 1
                }
            };
            let pn = s.next_pn;
            s.next_pn += 1;
            s.bytes_in_flight += mss;
            let pss = s.est.on_packet_sent(t_now, pn, mss, s.bytes_in_flight);
            s.cc.on_packet_sent(t_now, mss, s.bytes_in_flight);
            s.sent.push_back(SentPacket {
                state: SentState::Outstanding(pss),
                seg,
                size: mss,
                sent: now,
            });
            s.packets_sent += 1;
            // Pacing: a token bucket `send_quantum` deep, filled at the pacing rate.
            let rate = s.cc.pacing_rate().max(1.0);
            let quantum = s.cc.send_quantum().max(mss);
            let per_packet = (mss as f64 / rate * 1e9) as Nanos;
            let burst = (quantum as f64 / rate * 1e9) as Nanos;
            s.next_send = s.next_send.max(now.saturating_sub(burst)) + per_packet;
            if s.loss_deadline.is_none() {
                let at = now + s.pto();
                self.arm_loss_timer(f, at);
            }
            self.enqueue(Packet {
                flow: f,
                pn,
                seg,
                size: mss,
                enqueued: now,
            });
        }
    }

    fn arm_loss_timer(&mut self, f: usize, at: Nanos) {
        let s = &mut self.senders[f];
        s.loss_deadline = Some(at);
        if s.loss_timer_pending.is_none_or(|p| p > at) {
            s.loss_timer_pending = Some(at);
            self.push(at, Event::LossTimer(f));
        }
    }

    fn on_loss_timer(&mut self, f: usize, t: Nanos) {
        let s = &mut self.senders[f];
        if s.loss_timer_pending != Some(t) {
            return;
        }
        s.loss_timer_pending = None;
        match s.loss_deadline {
            None => {}
            Some(d) if d > t => {
                s.loss_timer_pending = Some(d);
                self.push(d, Event::LossTimer(f));
            }
            Some(_) => {
                s.loss_deadline = None;
                let lost = self.detect_losses(f);
                if !lost {
                    // RFC 9002 §6.2.4: on PTO, send up to two probe datagrams, retransmitting
                    // the oldest outstanding data if there is nothing new to send.
                    let s = &mut self.senders[f];
                    if s.bytes_in_flight > 0 {
                        s.pto_count += 1;
                        s.probes = 2;
                        if !s.has_data()
                            && let Some(p) = s
                                .sent
                                .iter()
                                .find(|p| matches!(p.state, SentState::Outstanding(_)))
                        {
                            s.retx.push_back(p.seg);
                        }
                    }
                }
                self.rearm(f);
                self.try_send(f);
                self.senders[f].record_phase(self.now);
            }
        }
    }

    /// RFC 9002 §6.1: declares packets lost; returns whether any were.
    fn detect_losses(&mut self, f: usize) -> bool {
        let now = self.now;
        let t_now = self.instant(now);
        let s = &mut self.senders[f];
        let Some(largest) = s.largest_acked else {
            return false;
        };
        let loss_delay = s.loss_delay();
        let lost_send_time = now.saturating_sub(loss_delay);
        let mut lost_bytes = 0;
        let mut largest_lost_sent = 0;
        let mut new_episode = false;
        let mut next_deadline: Option<Nanos> = None;
        let end = largest.saturating_sub(s.base_pn).min(s.sent.len() as u64) as usize;
        for i in 0..end {
            let pn = s.base_pn + i as u64;
            let p = s.sent[i];
            let SentState::Outstanding(pss) = p.state else {
                continue;
            };
            if largest - pn >= PACKET_THRESHOLD || p.sent <= lost_send_time {
                // A loss of a packet sent after the current episode began opens a new one; so
                // does any loss once the episode was undone (the controller left recovery).
                if (s.episode.id == 0 || s.episode.undone || p.sent > s.episode.started)
                    && !new_episode
                {
                    new_episode = true;
                    s.episode = Episode {
                        id: s.next_episode,
                        started: s.sent.back().map_or(now, |b| b.sent),
                        ..Episode::default()
                    };
                    s.next_episode += 1;
                }
                s.episode.lost += 1;
                s.sent[i].state = SentState::Lost;
                s.lost_recent.push_back((pn, s.episode.id, now));
                s.bytes_in_flight -= p.size;
                let lost = s.est.on_packet_lost(&pss);
                s.cc.on_packet_lost(t_now, &lost);
                s.retx.push_back(p.seg);
                s.declared_lost += 1;
                lost_bytes += p.size;
                largest_lost_sent = largest_lost_sent.max(p.sent);
            } else {
                let d = p.sent + loss_delay;
                next_deadline = Some(next_deadline.map_or(d, |x| x.min(d)));
            }
        }
        if let Some(d) = next_deadline {
            s.loss_deadline = Some(d);
        }
        if lost_bytes > 0 {
            let loss = Loss {
                bytes_lost: lost_bytes,
                bytes_in_flight: s.bytes_in_flight,
                largest_lost_sent_at: self.origin + Duration::from_nanos(largest_lost_sent),
                persistent_congestion: false,
            };
            s.cc.on_loss(t_now, &loss);
            true
        } else {
            false
        }
    }

    fn rearm(&mut self, f: usize) {
        let now = self.now;
        let s = &mut self.senders[f];
        let at = match s.loss_deadline {
            Some(d) => Some(d),
            None if s.bytes_in_flight > 0 => Some(now + s.pto()),
            None => None,
        };
        match at {
            Some(at) => self.arm_loss_timer(f, at),
            None => s.loss_deadline = None,
        }
    }

    fn on_ack(&mut self, f: usize, pn: u64) {
        let now = self.now;
        let t_now = self.instant(now);
        let s = &mut self.senders[f];
        let idx = pn.checked_sub(s.base_pn).map(|i| i as usize);
        let state = idx.map_or(SentState::Lost, |i| s.sent[i].state);
        match state {
            SentState::Acked => return,
            SentState::Lost => {
                let Ok(j) = s.lost_recent.binary_search_by_key(&pn, |x| x.0) else {
                    return;
                };
                let (_, episode, _) = s.lost_recent.remove(j).unwrap_or_default();
                s.spurious += 1;
                if episode == s.episode.id && !s.episode.undone {
                    s.episode.spurious += 1;
                    if s.episode.spurious == s.episode.lost {
                        s.episode.undone = true;
                        s.undo_events += 1;
                        s.cc.on_spurious_loss(t_now);
                    }
                }
            }
            SentState::Outstanding(pss) => {
                let idx = idx.unwrap_or_default();
                let p = s.sent[idx];
                s.sent[idx].state = SentState::Acked;
                s.bytes_in_flight -= p.size;
                s.pto_count = 0;
                s.est.on_packet_acked(t_now, &pss);
                if s.largest_acked.is_none_or(|l| pn > l) {
                    s.largest_acked = Some(pn);
                    let rtt = now - p.sent;
                    s.latest_rtt = rtt;
                    s.min_rtt = Some(s.min_rtt.map_or(rtt, |m| m.min(rtt)));
                    s.rtt_sum += rtt as u128;
                    s.rtt_count += 1;
                    match s.srtt {
                        None => {
                            s.srtt = Some(rtt);
                            s.rttvar = rtt / 2;
                        }
                        Some(srtt) => {
                            s.rttvar = (3 * s.rttvar + srtt.abs_diff(rtt)) / 4;
                            s.srtt = Some((7 * srtt + rtt) / 8);
                        }
                    }
                    s.cc.on_rtt_sample(t_now, Duration::from_nanos(rtt), Duration::ZERO);
                }
                let min_rtt = s.min_rtt.map(Duration::from_nanos);
                let rs = s.est.generate_rate_sample(min_rtt);
                s.cc.on_ack(
                    t_now,
                    &Ack {
                        bytes_acked: p.size,
                        bytes_in_flight: s.bytes_in_flight,
                        rate_sample: rs,
                    },
                );
            }
        }
        s.loss_deadline = None;
        self.detect_losses(f);
        let s = &mut self.senders[f];
        while s
            .sent
            .front()
            .is_some_and(|p| !matches!(p.state, SentState::Outstanding(_)))
        {
            s.sent.pop_front();
            s.base_pn += 1;
        }
        let keep_lost = 2 * s.srtt.unwrap_or(INITIAL_RTT);
        while s.lost_recent.front().is_some_and(|x| x.2 + keep_lost < now) {
            s.lost_recent.pop_front();
        }
        self.rearm(f);
        self.try_send(f);
        self.senders[f].record_phase(now);
    }

    fn on_sample(&mut self) {
        let now = self.now;
        let interval = self.sample_interval;
        let secs = interval as f64 / 1e9;
        let flows = self
            .senders
            .iter_mut()
            .map(|s| {
                let d = s.delivered_bytes - s.delivered_at_last_sample;
                s.delivered_at_last_sample = s.delivered_bytes;
                let m = s.cc.metrics();
                FlowSample {
                    throughput_bps: d as f64 * 8.0 / secs,
                    cwnd: m.cwnd,
                    pacing_rate: m.pacing_rate,
                    srtt: m.srtt,
                    phase: m.phase,
                }
            })
            .collect();
        let l = &mut self.link;
        let queue_delay = if l.interval_delay_count == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos((l.interval_delay_sum / l.interval_delay_count as u128) as u64)
        };
        l.interval_delay_sum = 0;
        l.interval_delay_count = 0;
        self.samples.push(Sample {
            at: Duration::from_nanos(now),
            link_rate_bps: l.link.rate_bps,
            queue_delay,
            queue_bytes: l.queued_bytes,
            flows,
        });
        self.push(now + interval, Event::Sample);
    }

    fn report(self) -> Report {
        let end = self.end;
        let flows = self
            .senders
            .into_iter()
            .zip(self.names)
            .map(|(s, name)| {
                let stop = s.completed_at.unwrap_or(end);
                let active = stop.saturating_sub(s.start) as f64 / 1e9;
                FlowReport {
                    name,
                    start: Duration::from_nanos(s.start),
                    completed_at: s.completed_at.map(Duration::from_nanos),
                    delivered_bytes: s.delivered_bytes,
                    goodput_bps: if active > 0.0 {
                        s.delivered_bytes as f64 * 8.0 / active
                    } else {
                        0.0
                    },
                    packets_sent: s.packets_sent,
                    packets_declared_lost: s.declared_lost,
                    spurious_losses: s.spurious,
                    undo_events: s.undo_events,
                    packets_dropped: s.dropped,
                    mean_rtt: if s.rtt_count == 0 {
                        Duration::ZERO
                    } else {
                        Duration::from_nanos((s.rtt_sum / s.rtt_count as u128) as u64)
                    },
                    phase_trace: s.phase_trace,
                }
            })
            .collect();
        let l = &self.link;
        Report {
            duration: Duration::from_nanos(end),
            flows,
            link: LinkReport {
                transmitted_bytes: l.transmitted_bytes,
                overflow_drops: l.overflow_drops,
                policer_drops: l.policer_drops,
                random_drops: l.random_drops,
                mean_queue_delay: if l.delay_count == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_nanos((l.delay_sum / l.delay_count as u128) as u64)
                },
                max_queue_delay: Duration::from_nanos(l.delay_max),
            },
            samples: self.samples,
            sample_interval: Duration::from_nanos(self.sample_interval),
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("now", &self.now)
            .field("flows", &self.senders.len())
            .finish_non_exhaustive()
    }
}
