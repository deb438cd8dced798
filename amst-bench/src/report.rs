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
    /// Goodput over time from the median run, `(seconds, value)`, for plots.
    pub timeseries: Vec<(f64, f64)>,
}

impl Contender {
    /// A contender with no samples yet.
    pub fn new(name: impl Into<String>, unit: impl Into<String>) -> Self {
        Contender {
            name: name.into(),
            unit: unit.into(),
            samples: Vec::new(),
            timeseries: Vec::new(),
        }
    }

    /// Median and spread of the samples.
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.samples)
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
    /// Derived numbers the gates read, e.g. `ratio` or `fraction_of_link`.
    pub metrics: BTreeMap<String, f64>,
    /// Why the scenario did not run, if it did not.
    pub skipped: Option<String>,
}

impl Scenario {
    /// A scenario with no results yet.
    pub fn new(id: impl Into<String>, description: impl Into<String>) -> Self {
        Scenario {
            id: id.into(),
            description: description.into(),
            contenders: Vec::new(),
            metrics: BTreeMap::new(),
            skipped: None,
        }
    }

    /// A scenario that could not run here.
    pub fn skipped(
        id: impl Into<String>,
        description: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        Scenario {
            skipped: Some(why.into()),
            ..Scenario::new(id, description)
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

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// When it ran (UTC, RFC 3339).
    pub date: String,
    /// The machine: kernel, cores, memory.
    pub machine: String,
    /// Whether this was `--quick`.
    pub quick: bool,
    /// Every scenario.
    pub scenarios: Vec<Scenario>,
}

impl Report {
    /// The Markdown report people read.
    pub fn markdown(&self, gate_lines: &[String]) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# AMST benchmark report\n");
        let _ = writeln!(
            md,
            "- date: {}\n- machine: {}\n- quick: {}\n",
            self.date, self.machine, self.quick
        );
        let _ = writeln!(md, "| scenario | contender | median | min | max | n |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for s in &self.scenarios {
            if let Some(why) = &s.skipped {
                let _ = writeln!(md, "| {} | skipped: {why} | | | | |", s.id);
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
            }
            for (k, v) in &s.metrics {
                let _ = writeln!(md, "| {} | **{k}** | **{v:.3}** | | | |", s.id);
            }
        }
        let _ = writeln!(md, "\n## Scenarios\n");
        for s in &self.scenarios {
            let _ = writeln!(md, "- `{}`: {}", s.id, s.description);
        }
        if !gate_lines.is_empty() {
            let _ = writeln!(md, "\n## Gates\n");
            for g in gate_lines {
                let _ = writeln!(md, "- {g}");
            }
        }
        md
    }

    /// Writes `report.md` and `samples.json` into `dir`.
    pub fn write(&self, dir: &Path, gate_lines: &[String]) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join("report.md"), self.markdown(gate_lines))?;
        let json = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        fs::write(dir.join("samples.json"), json)
    }
}
