//! `amst explain --peer ADDR`: measure the path with the detector's probes and say which
//! mode and settings AMST would pick, and why (in the spirit of `ucx_info`).

use std::time::{Duration, Instant};

use amst_core::Mode;
use amst_detect::{
    Classifier, ClassifierConfig, Decision, Observation, RateEstimate, RateProbeConfig,
    SampleSource, measure_rate,
};
use amst_hybrid::{AmstConfig, Congestion, LaneProfile};
use amst_tcp::tuner::{self, Aggregate, TunerBounds};
use serde::Serialize;

use crate::backend::{self, Settings};
use crate::cli::ExplainArgs;
use crate::error::{CliResult, Failure};
use crate::run::Global;
use crate::size::{human_bits_per_sec, human_bytes};

/// Round-trip probes.
const RTT_PROBES: usize = 10;

/// The explanation, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Explanation {
    schema: &'static str,
    peer: String,
    rtt_min_us: u64,
    rtt_median_us: u64,
    rtt_probes: usize,
    bandwidth_bytes_per_sec: Option<u64>,
    /// False when the measurement ran out of budget before two trains agreed: then the
    /// number only bounds the rate from below.
    bandwidth_measured: bool,
    bandwidth_trains: usize,
    bandwidth_probe_ms: f64,
    /// The mode whose transport carried the rate probe.
    bandwidth_probed_in: String,
    bdp_bytes: Option<u64>,
    probe_bytes_used: u64,
    mode: String,
    confidence: f64,
    reason: String,
    why: String,
    transport: String,
    transport_note: String,
    streams: usize,
    streams_range: (usize, usize),
    streams_for_bdp: usize,
    chunk_bytes: usize,
    chunk_for_path: usize,
    cc: String,
    pacing: bool,
}

/// Runs `amst explain`.
pub async fn run(args: ExplainArgs, g: &Global) -> CliResult<()> {
    let psk = crate::psk::load(args.psk.psk_file.as_deref(), g.psk_env.as_deref())?;
    let peer = backend::resolve(&args.peer).await?;
    let settings = Settings {
        psk,
        args: args.transport.clone(),
    };
    let config = backend::config(&settings)?;
    let amst = backend::connect_probe(peer, &settings).await?;
    let mut t = amst.active_transport();
    let doing = format!("probing {peer}");

    let mut classifier =
        Classifier::new(ClassifierConfig::default()).expect("the default configuration is valid");
    let mut rtts = Vec::with_capacity(RTT_PROBES);
    let mut used = 0u64;
    for _ in 0..RTT_PROBES {
        let s = t
            .probe(0)
            .await
            .map_err(|e| Failure::from_amst(&doing, &e))?;
        used += s.bytes_used;
        rtts.push(s.rtt);
    }
    // A short path's rate is measured the way datacenter mode would use it. The internet
    // profile's paced streams measure their own pacing there, not the path: over loopback
    // they read 13-17 Gbit/s where `iperf3 -P 8 -l 1M -Z` moved 51-62.
    let short = ClassifierConfig::default().thresholds.datacenter_max_rtt;
    let probed_in = if args.transport.mode == crate::cli::ModeArg::Auto && median_of(&rtts) < short
    {
        amst.force_mode(Mode::Datacenter)
            .await
            .map_err(|e| backend::hybrid_failure(&doing, &e))?;
        t = amst.active_transport();
        Mode::Datacenter
    } else {
        amst.mode()
    };
    // amst-detect's rate measurement: trains timed at the receiver that grow until two
    // agree, within --probe-bytes.
    let rate_config = RateProbeConfig {
        max_bytes: args
            .probe_bytes
            .0
            .max(RateProbeConfig::default().first_train),
        ..RateProbeConfig::default()
    };
    let rate = measure_rate(&*t, &rate_config)
        .await
        .map_err(|e| Failure::from_amst(&doing, &e))?;
    used += rate.wire_bytes;
    for &r in &rtts {
        classifier.observe(
            Instant::now(),
            Observation {
                rtt: Some(r),
                bandwidth: rate.bandwidth,
                source: SampleSource::Probe,
            },
        );
    }
    let decision = classifier.decide(Instant::now());
    drop(t);
    let _ = amst.close().await;

    let mut e = explain(peer.to_string(), &rtts, &rate, used, &decision, &config);
    e.bandwidth_probed_in = probed_in.to_string();
    if g.json {
        crate::stdout::line(serde_json::to_string_pretty(&e).expect("serialises"));
    } else {
        crate::stdout::text(human(&e));
    }
    Ok(())
}

/// The median of some RTT samples (zero for none).
fn median_of(rtts: &[Duration]) -> Duration {
    let mut sorted = rtts.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn explain(
    peer: String,
    rtts: &[Duration],
    rate: &RateEstimate,
    used: u64,
    d: &Decision,
    config: &AmstConfig,
) -> Explanation {
    let min = rtts.iter().min().copied().unwrap_or_default();
    let median = median_of(rtts);
    let best = rate.bandwidth.map(|b| b.bytes_per_sec);
    let bdp = best.map(|r| (r as f64 * min.as_secs_f64()) as u64);
    // The settings the chosen mode starts from; hybrid runs two lanes, show the bulk one.
    let lanes = config.lanes_for(d.mode).unwrap_or_default();
    let profile: LaneProfile = lanes
        .last()
        .cloned()
        .or_else(|| config.profile(Mode::Internet))
        .expect("at least one transport is enabled");
    let congestion = match profile.congestion {
        Congestion::Bbr => amst_tcp::Congestion::Bbr,
        Congestion::Cubic => amst_tcp::Congestion::Cubic,
    };
    let agg = Aggregate {
        delivered: best.unwrap_or(0),
        interval: Duration::from_secs(1),
        min_rtt: Some(min),
        srtt: Some(median),
        streams: profile.streams,
        chunk: profile.chunk_size,
        ..Aggregate::default()
    };
    let bounds = TunerBounds {
        min_streams: profile.min_streams,
        max_streams: profile.max_streams,
        congestion,
    };
    let note = match d.mode {
        Mode::Datacenter => {
            "RDMA is preferred on a datacenter path (--transport rdma, in an amst built with the \
             `rdma` feature, with a device at both ends); otherwise many parallel TCP streams \
             under CUBIC"
        }
        Mode::Internet => {
            "a few paced streams under BBR (or QUIC with --transport quic) keep the bottleneck \
             queue short"
        }
        Mode::Hybrid => "small messages go on the low-latency lane, bulk on the other lane",
    };
    let transport = profile.transport.to_string();
    Explanation {
        schema: "amst-explain/1",
        peer,
        rtt_min_us: min.as_micros() as u64,
        rtt_median_us: median.as_micros() as u64,
        rtt_probes: rtts.len(),
        bandwidth_bytes_per_sec: best,
        bandwidth_measured: rate.bandwidth.is_some_and(|b| !b.lower_bound),
        bandwidth_trains: rate.trains,
        bandwidth_probe_ms: rate.took.as_secs_f64() * 1e3,
        bandwidth_probed_in: String::new(),
        bdp_bytes: bdp,
        probe_bytes_used: used,
        mode: d.mode.to_string(),
        confidence: d.confidence,
        reason: d.reason.as_str().to_string(),
        why: d.to_string(),
        transport,
        transport_note: note.into(),
        streams: profile.streams,
        streams_range: (profile.min_streams, profile.max_streams),
        streams_for_bdp: tuner::target_streams(&agg, &bounds),
        chunk_bytes: profile.chunk_size,
        chunk_for_path: tuner::target_chunk(&agg),
        cc: congestion.as_str().into(),
        pacing: profile.pacing,
    }
}

fn human(e: &Explanation) -> String {
    let ms = |us: u64| format!("{:.3} ms", us as f64 / 1e3);
    let bw = e
        .bandwidth_bytes_per_sec
        .map_or("not measured".into(), |b| {
            let how = format!(
                "delivery rate at the receiver, {} probe trains in {:.0} ms in {} mode",
                e.bandwidth_trains, e.bandwidth_probe_ms, e.bandwidth_probed_in
            );
            if e.bandwidth_measured {
                format!(
                    "{} ({how}; the rate stopped growing with the train)",
                    human_bits_per_sec(b as f64)
                )
            } else {
                format!(
                    "at least {} ({how}; the probe budget ran out before two agreed; raise --probe-bytes)",
                    human_bits_per_sec(b as f64)
                )
            }
        });
    let rows = [
        ("peer", e.peer.clone()),
        (
            "rtt",
            format!(
                "min {}, median {} ({} probes)",
                ms(e.rtt_min_us),
                ms(e.rtt_median_us),
                e.rtt_probes
            ),
        ),
        ("bandwidth", bw),
        ("bdp", e.bdp_bytes.map_or("-".into(), human_bytes)),
        ("probe traffic", human_bytes(e.probe_bytes_used)),
        ("", String::new()),
        (
            "mode",
            format!("{} (confidence {:.2}, {})", e.mode, e.confidence, e.reason),
        ),
        ("why", e.why.clone()),
        ("", String::new()),
        (
            "transport",
            format!("{} — {}", e.transport, e.transport_note),
        ),
        (
            "streams",
            format!(
                "{} at start, tuned within {}..={} (this path's BDP needs {})",
                e.streams, e.streams_range.0, e.streams_range.1, e.streams_for_bdp
            ),
        ),
        (
            "chunk size",
            format!(
                "{} at start (the tuner's target for this path: {})",
                human_bytes(e.chunk_bytes as u64),
                human_bytes(e.chunk_for_path as u64)
            ),
        ),
        ("cc", e.cc.clone()),
        ("pacing", if e.pacing { "on" } else { "off" }.to_string()),
    ];
    let mut out = String::from("# amst explain\n");
    for (k, v) in rows {
        if k.is_empty() {
            out.push_str("#\n");
        } else {
            out.push_str(&format!("#   {k:<14} {v}\n"));
        }
    }
    out
}
