//! Scenario results, and the Markdown and JSON files written from them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::{fs, io};

use serde::Serialize;

use crate::stats::Summary;

/// One contender's samples in one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Contender {
    /// Its name, e.g. `amst-tcp 8 streams` or `iperf3 -P 8`.
    pub name: String,
    /// The unit of `samples`, e.g. `Gbit/s` or `ms`.
    pub unit: String,
    /// Every sample, in the order taken.
    pub samples: Vec<f64>,
    /// How many samples a complete run has; fewer fail the scenario (default 1).
    pub expected: usize,
    /// Why runs failed, one line per failed run.
    pub errors: Vec<String>,
    /// Goodput over time from the median run, `(seconds, value)`, for plots.
    pub timeseries: Vec<(f64, f64)>,
    /// Each run's series, by sample, until [`Contender::keep_median_series`] picks one.
    #[serde(skip)]
    runs: Vec<Vec<(f64, f64)>>,
}

impl Contender {
    /// A contender with no samples yet, expecting one.
    pub fn new(name: impl Into<String>, unit: impl Into<String>) -> Self {
        Contender {
            name: name.into(),
            unit: unit.into(),
            samples: Vec::new(),
            expected: 1,
            errors: Vec::new(),
            timeseries: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// Expects `n` samples: a scenario with a contender short of them fails.
    pub fn expecting(mut self, n: usize) -> Self {
        self.expected = n;
        self
    }

    /// Records one run: its sample and its goodput-over-time series.
    pub fn record(&mut self, sample: f64, series: Vec<(f64, f64)>) {
        self.samples.push(sample);
        self.runs.push(series);
    }

    /// Records a failed run (and prints it, so the console shows it as it happens).
    pub fn fail(&mut self, scenario: &str, why: impl Into<String>) {
        let why = why.into();
        eprintln!("{scenario}: {} failed: {why}", self.name);
        self.errors.push(why);
    }

    /// Why this contender lacks samples, if it does.
    pub fn shortfall(&self) -> Option<String> {
        if self.samples.len() >= self.expected {
            return None;
        }
        let mut why = format!(
            "{}: {} of {} samples",
            self.name,
            self.samples.len(),
            self.expected
        );
        if let Some(e) = self.errors.first() {
            let _ = write!(why, " ({} failed runs; first: {e})", self.errors.len());
        }
        Some(why)
    }

    /// Keeps the series of the run whose sample is the median (the lower middle one for an
    /// even count), so the plot shows a typical run rather than the last.
    pub fn keep_median_series(&mut self) {
        if self.runs.len() != self.samples.len() || self.runs.is_empty() {
            return;
        }
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        order.sort_by(|&a, &b| self.samples[a].total_cmp(&self.samples[b]));
        let mid = order[(order.len() - 1) / 2];
        self.timeseries = std::mem::take(&mut self.runs[mid]);
        self.runs.clear();
    }

    /// Median and spread of the samples.
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.samples)
    }

    /// The median over runs of each run's mean series value over the intervals that end
    /// after `from_s` seconds (before [`keep_median_series`](Self::keep_median_series)
    /// drops the runs): the rate past start-up, where a whole-run sample includes it.
    pub fn series_mean_after(&self, from_s: f64) -> Option<f64> {
        let per_run: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|run| {
                let after: Vec<f64> = run
                    .iter()
                    .filter(|(t, _)| *t > from_s)
                    .map(|(_, v)| *v)
                    .collect();
                (!after.is_empty()).then(|| after.iter().sum::<f64>() / after.len() as f64)
            })
            .collect();
        Summary::of(&per_run).map(|s| s.median)
    }
}

/// One scenario's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    /// Short id used by gates, e.g. `loopback-8`.
    pub id: String,
    /// What was measured, in a sentence.
    pub description: String,
    /// The contenders.
    pub contenders: Vec<Contender>,
    /// Derived numbers the gates read, e.g. `ratio` or `fraction_of_link`. A metric that has
    /// no value (see [`Scenario::insert_ratio`]) is NaN here, `null` in the JSON, and
    /// `undefined_metrics` says why.
    pub metrics: BTreeMap<String, f64>,
    /// Why a metric has no value, e.g. a ratio over a peer that delivered nothing.
    pub undefined_metrics: BTreeMap<String, String>,
    /// Remarks for the reader, e.g. which baseline was the best.
    pub notes: Vec<String>,
    /// Why the scenario could not produce its numbers: this fails the run.
    pub failed: Option<String>,
    /// Why the run left this scenario out on purpose (not selected, or `--rdma` not given):
    /// listed as not run, and its gates neither pass nor fail.
    pub not_run: Option<String>,
    /// Wall time the scenario took, set by the harness.
    pub seconds: f64,
}

impl Scenario {
    /// A scenario with no results yet.
    pub fn new(id: impl Into<String>, description: impl Into<String>) -> Self {
        Scenario {
            id: id.into(),
            description: description.into(),
            contenders: Vec::new(),
            metrics: BTreeMap::new(),
            undefined_metrics: BTreeMap::new(),
            notes: Vec::new(),
            failed: None,
            not_run: None,
            seconds: 0.0,
        }
    }

    /// A scenario that tried and could not produce its numbers (no privileges, a tool
    /// missing, a run that failed): it fails the run, naming `why`.
    pub fn failed(
        id: impl Into<String>,
        description: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        Scenario {
            failed: Some(why.into()),
            ..Scenario::new(id, description)
        }
    }

    /// A scenario the run explicitly left out, e.g. not selected by `--scenario`.
    pub fn not_run(
        id: impl Into<String>,
        description: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        Scenario {
            not_run: Some(why.into()),
            ..Scenario::new(id, description)
        }
    }

    /// Why the scenario did not produce every number it should have: its own failure, or
    /// contenders short of their samples. Empty for a complete (or a left-out) scenario.
    pub fn problems(&self) -> Vec<String> {
        if self.not_run.is_some() {
            return Vec::new();
        }
        let mut out: Vec<String> = self.failed.iter().cloned().collect();
        out.extend(self.contenders.iter().filter_map(Contender::shortfall));
        if self.failed.is_none() && self.contenders.is_empty() {
            out.push("no contender produced a number".into());
        }
        out
    }

    /// Inserts the ratio `key` = `value / peer`, where `peer` is the median of the contender
    /// named `peer_name`. When the peer delivered nothing (a zero median: quinn Cubic can move
    /// nothing in a 5 s run on the lossy link), the ratio has no value: it is recorded as
    /// undefined with that reason instead of as a quotient over a stand-in epsilon, which
    /// printed ratios like 1.2e11.
    pub fn insert_ratio(&mut self, key: impl Into<String>, value: f64, peer_name: &str, peer: f64) {
        let key = key.into();
        if peer > 0.0 && peer.is_finite() {
            self.undefined_metrics.remove(&key);
            self.metrics.insert(key, value / peer);
        } else {
            self.undefined_metrics.insert(
                key.clone(),
                format!("peer delivered nothing ({peer_name}: median {peer})"),
            );
            self.metrics.insert(key, f64::NAN);
        }
    }

    /// The median of the named contender.
    pub fn median(&self, name: &str) -> Option<f64> {
        self.contenders
            .iter()
            .find(|c| c.name == name)?
            .summary()
            .map(|s| s.median)
    }
}

/// One criterion micro-benchmark's estimate, read from `target/criterion`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Micro {
    /// Criterion's full id, `group/function`.
    pub id: String,
    /// Mean time per iteration in nanoseconds, with its 95 % confidence interval.
    pub mean_ns: f64,
    /// Lower end of the confidence interval.
    pub lower_ns: f64,
    /// Upper end of the confidence interval.
    pub upper_ns: f64,
    /// Bytes per iteration, when the bench declared a byte throughput.
    pub bytes: Option<u64>,
}

/// The whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// When it ran (UTC, RFC 3339).
    pub date: String,
    /// `git describe --always --dirty` of the tree that was measured.
    pub commit: String,
    /// The machine: CPU model, cores, kernel, memory.
    pub machine: String,
    /// Whether this was `--quick`.
    pub quick: bool,
    /// Sizes and durations relative to the full run (1 for a full run).
    pub scale: f64,
    /// Every scenario.
    pub scenarios: Vec<Scenario>,
    /// Criterion estimates folded in by `--micro`.
    pub micro: Vec<Micro>,
}

impl Report {
    /// Samples that look like a measurement artefact rather than a measurement: three or more
    /// identical throughputs are what a deadline counting whole large messages produces.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.scenarios {
            for c in &s.contenders {
                let identical = c.samples.len() >= 3
                    && c.unit.ends_with("bit/s")
                    && c.samples.windows(2).all(|w| w[0] == w[1]);
                if identical {
                    out.push(format!(
                        "{} / {}: all {} samples are identical ({}), suspect quantised counting",
                        s.id,
                        c.name,
                        c.samples.len(),
                        c.samples[0]
                    ));
                }
            }
        }
        out
    }

    /// The Markdown report people read.
    pub fn markdown(&self, gate_lines: &[String]) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# AMST benchmark report\n");
        let kind = if self.quick {
            "quick (`cargo xtask bench --quick`)".to_string()
        } else if self.scale == 1.0 {
            "full (`cargo xtask bench`)".to_string()
        } else {
            format!(
                "full at scale {} (not comparable with a full run)",
                self.scale
            )
        };
        let _ = writeln!(
            md,
            "- date: {}\n- commit: {}\n- machine: {}\n- run: {kind}\n",
            self.date, self.commit, self.machine
        );
        let _ = writeln!(
            md,
            "Written by the harness; do not edit. Every contender ran interleaved with the \
             others (A B A B …); ratios are between medians of the same run.\n"
        );
        let _ = writeln!(md, "| scenario | contender | median | min | max | n |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for s in &self.scenarios {
            if let Some(why) = &s.not_run {
                let _ = writeln!(md, "| {} | not run: {why} | | | | |", s.id);
                continue;
            }
            if let Some(why) = &s.failed {
                let _ = writeln!(md, "| {} | **FAILED**: {why} | | | | |", s.id);
                continue;
            }
            for c in &s.contenders {
                match c.summary() {
                    Some(sum) => {
                        let _ = writeln!(
                            md,
                            "| {} | {} | {:.3} {} | {:.3} | {:.3} | {} |",
                            s.id, c.name, sum.median, c.unit, sum.min, sum.max, sum.n
                        );
                    }
                    None => {
                        let _ = writeln!(md, "| {} | {} | no samples | | | |", s.id, c.name);
                    }
                }
                if let Some(short) = c.shortfall() {
                    let _ = writeln!(md, "| {} | **FAILED**: {short} | | | | |", s.id);
                }
            }
            for (k, v) in &s.metrics {
                match s.undefined_metrics.get(k) {
                    Some(why) => {
                        let _ = writeln!(md, "| {} | **{k}** | {why} | | | |", s.id);
                    }
                    None => {
                        let _ = writeln!(md, "| {} | **{k}** | **{v:.3}** | | | |", s.id);
                    }
                }
            }
        }
        if !gate_lines.is_empty() {
            let _ = writeln!(md, "\n## Gates (bench/gates.toml)\n");
            for g in gate_lines {
                let _ = writeln!(md, "- {g}");
            }
        }
        let warnings = self.warnings();
        if !warnings.is_empty() {
            let _ = writeln!(md, "\n## Warnings\n");
            for w in &warnings {
                let _ = writeln!(md, "- {w}");
            }
        }
        if !self.micro.is_empty() {
            let _ = writeln!(
                md,
                "\n## Micro-benchmarks (criterion, `--micro`)\n\n| bench | mean | 95 % CI | throughput |\n|---|---|---|---|"
            );
            for m in &self.micro {
                let rate = m
                    .bytes
                    .map(|b| format!("{:.2} GB/s", b as f64 / m.mean_ns))
                    .unwrap_or_default();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} – {} | {rate} |",
                    m.id,
                    human_ns(m.mean_ns),
                    human_ns(m.lower_ns),
                    human_ns(m.upper_ns)
                );
            }
        }
        let total: f64 = self.scenarios.iter().map(|s| s.seconds).sum();
        let _ = writeln!(md, "\n## Scenarios ({total:.0} s in all)\n");
        for s in &self.scenarios {
            if let Some(why) = &s.not_run {
                let _ = writeln!(md, "- `{}`: not run ({why})", s.id);
                continue;
            }
            let _ = writeln!(md, "- `{}` ({:.0} s): {}", s.id, s.seconds, s.description);
            for n in &s.notes {
                let _ = writeln!(md, "  - {n}");
            }
        }
        let plots: Vec<&str> = self
            .scenarios
            .iter()
            .filter(|s| s.contenders.iter().any(|c| !c.timeseries.is_empty()))
            .map(|s| s.id.as_str())
            .collect();
        if !plots.is_empty() {
            let _ = writeln!(md, "\n## Plots\n");
            for id in plots {
                let _ = writeln!(md, "- [{id}]({id}.svg)");
            }
        }
        md
    }

    /// Writes `report.md` and `samples.json` into `dir`.
    pub fn write(&self, dir: &Path, gate_lines: &[String]) -> io::Result<()> {
        self.write_as(dir, "report.md", "samples.json", gate_lines)
    }

    /// Writes the Markdown and the JSON (every sample) into `dir` under the given names.
    pub fn write_as(
        &self,
        dir: &Path,
        markdown: &str,
        json: &str,
        gate_lines: &[String],
    ) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join(markdown), self.markdown(gate_lines))?;
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        fs::write(dir.join(json), text + "\n")
    }
}

fn human_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.3} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// Reads every criterion estimate under `dir` (`*/new/estimates.json` with its
/// `benchmark.json`) written at or after `since` (so stale results of benches that did not run
/// are left out), sorted by id.
pub fn read_criterion(dir: &Path, since: std::time::SystemTime) -> Vec<Micro> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    if let Some(m) = read_one(&p, since) {
                        out.push(m);
                    }
                } else if p.file_name().is_none_or(|n| n != "base" && n != "report") {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

fn read_one(new: &Path, since: std::time::SystemTime) -> Option<Micro> {
    let est_path = new.join("estimates.json");
    let fresh = fs::metadata(&est_path).ok()?.modified().ok()? >= since;
    if !fresh {
        return None;
    }
    let est: serde_json::Value = serde_json::from_str(&fs::read_to_string(est_path).ok()?).ok()?;
    let bench: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(new.join("benchmark.json")).ok()?).ok()?;
    let mean = &est["mean"];
    Some(Micro {
        id: bench["full_id"].as_str()?.to_string(),
        mean_ns: mean["point_estimate"].as_f64()?,
        lower_ns: mean["confidence_interval"]["lower_bound"].as_f64()?,
        upper_ns: mean["confidence_interval"]["upper_bound"].as_f64()?,
        bytes: bench["throughput"]["Bytes"].as_u64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_past_startup_is_the_median_run_mean_after_the_cut() {
        let mut c = Contender::new("x", "Mbit/s");
        assert_eq!(c.series_mean_after(1.0), None);
        c.record(
            1.0,
            vec![(0.5, 0.0), (1.0, 10.0), (1.5, 100.0), (2.0, 200.0)],
        );
        c.record(1.0, vec![(0.5, 0.0), (1.5, 50.0)]);
        c.record(1.0, vec![(1.5, 80.0), (2.0, 120.0)]);
        // Run means past 1 s: 150, 50, 100; their median.
        assert_eq!(c.series_mean_after(1.0), Some(100.0));
    }

    #[test]
    fn reads_fresh_criterion_estimates_and_flags_identical_samples() {
        let dir = std::env::temp_dir().join(format!("amst-bench-crit-{}", std::process::id()));
        let new = dir.join("codec/encode/new");
        fs::create_dir_all(&new).unwrap();
        fs::write(
            new.join("estimates.json"),
            r#"{"mean":{"point_estimate":2000.0,"confidence_interval":{"lower_bound":1900.0,"upper_bound":2100.0}}}"#,
        )
        .unwrap();
        fs::write(
            new.join("benchmark.json"),
            r#"{"full_id":"codec/encode","throughput":{"Bytes":262144}}"#,
        )
        .unwrap();
        let since = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let micro = read_criterion(&dir, since);
        assert_eq!(micro.len(), 1);
        assert_eq!(micro[0].id, "codec/encode");
        assert_eq!(micro[0].bytes, Some(262144));
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        assert!(
            read_criterion(&dir, later).is_empty(),
            "stale estimates are left out"
        );
        let _ = fs::remove_dir_all(&dir);

        let mut s = Scenario::new("wan", "");
        let mut c = Contender::new("x", "Mbit/s");
        c.samples = vec![5.592, 5.592, 5.592];
        s.contenders.push(c);
        let report = Report {
            scale: 1.0,
            scenarios: vec![s],
            micro,
            ..Report::default()
        };
        assert_eq!(report.warnings().len(), 1);
        let md = report.markdown(&[]);
        assert!(
            md.contains("## Warnings") && md.contains("131.07 GB/s"),
            "{md}"
        );
    }
}
