//! Gates: bounds on a scenario's metrics, read from a committed TOML file, and the rule that
//! every scenario the run meant to measure produced its numbers.
//!
//! A gate whose number is missing fails and says why; only a scenario the run left out on
//! purpose (not selected, `rdma` without `--rdma`) is listed as not run. Gates come in two
//! classes: `correctness` (nothing lost, every number present) and `ratio` (performance
//! against a peer measured in the same run). [`Enforce`] picks which classes fail the run.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

use crate::report::Report;

/// What a gate protects.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// A fact that holds on any machine, however slow: no message lost or duplicated.
    Correctness,
    /// A performance ratio, which a noisy machine can miss.
    #[default]
    Ratio,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Correctness => "correctness",
            Class::Ratio => "ratio",
        })
    }
}

/// One gate: `scenario.metric` within `[min, max]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Short name, e.g. `P1`.
    pub name: String,
    /// The scenario id.
    pub scenario: String,
    /// The metric in that scenario.
    pub metric: String,
    /// The smallest acceptable value.
    #[serde(default)]
    pub min: Option<f64>,
    /// The largest acceptable value.
    #[serde(default)]
    pub max: Option<f64>,
    /// Correctness or ratio (default ratio).
    #[serde(default)]
    pub class: Class,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GateFile {
    gate: Vec<Gate>,
}

/// Which gates fail the run; the others are reported only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Enforce {
    /// Every gate (a full run).
    #[default]
    All,
    /// Correctness gates and missing numbers (CI's quick run on a noisy machine).
    Correctness,
    /// Nothing: report only.
    None,
}

impl Enforce {
    fn enforces(self, class: Class) -> bool {
        match self {
            Enforce::All => true,
            Enforce::Correctness => class == Class::Correctness,
            Enforce::None => false,
        }
    }
}

impl fmt::Display for Enforce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Enforce::All => "all",
            Enforce::Correctness => "correctness",
            Enforce::None => "none",
        })
    }
}

impl FromStr for Enforce {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Enforce::All),
            "correctness" => Ok(Enforce::Correctness),
            "none" => Ok(Enforce::None),
            other => Err(format!(
                "gate mode {other:?} is not one of all, correctness, none"
            )),
        }
    }
}

/// Reads the gates file.
pub fn load(path: &Path) -> Result<Vec<Gate>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses gates from TOML text.
pub fn parse(text: &str) -> Result<Vec<Gate>, String> {
    let file: GateFile = toml::from_str(text).map_err(|e| e.to_string())?;
    for g in &file.gate {
        if g.min.is_none() && g.max.is_none() {
            return Err(format!("gate {}: needs min or max", g.name));
        }
    }
    Ok(file.gate)
}

/// The verdict on one gate.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Within bounds.
    Pass(f64),
    /// Out of bounds, with the value.
    Fail(f64),
    /// The number is missing, and why: this fails the gate.
    Missing(String),
    /// The scenario produced every sample, but the metric has no value, and why: a ratio
    /// over a peer that delivered nothing. This fails the gate in its own class.
    Undefined(String),
    /// The run left the scenario out on purpose, and why.
    NotRun(String),
}

/// The gates' outcome: a line per gate and per incomplete scenario, and whether the run passes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Human lines, `PASS …`, `FAIL …` or `NOT RUN …`, for the report.
    pub lines: Vec<String>,
    /// The lines that fail the run under the chosen [`Enforce`].
    pub failures: Vec<String>,
}

impl Outcome {
    /// Whether every enforced gate passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Checks every gate against the report, and every scenario the run meant to measure for
/// missing numbers (a correctness check, whatever gates read it).
pub fn check(gates: &[Gate], report: &Report, enforce: Enforce) -> Outcome {
    let mut out = Outcome::default();
    let mut push = |line: String, fails: bool| {
        if fails {
            out.failures.push(line.clone());
        }
        out.lines.push(line);
    };
    let tag = |class: Class| {
        if enforce.enforces(class) {
            format!("({class})")
        } else {
            format!("({class}, report-only)")
        }
    };
    for s in &report.scenarios {
        let problems = s.problems();
        if !problems.is_empty() {
            push(
                format!(
                    "FAIL scenario {} {}: {}",
                    s.id,
                    tag(Class::Correctness),
                    problems.join("; ")
                ),
                enforce.enforces(Class::Correctness),
            );
        }
    }
    for g in gates {
        let bound = match (g.min, g.max) {
            (Some(lo), Some(hi)) => format!("{lo} ≤ x ≤ {hi}"),
            (Some(lo), None) => format!("≥ {lo}"),
            (None, Some(hi)) => format!("≤ {hi}"),
            (None, None) => "no bound".into(),
        };
        let what = format!("{}.{}", g.scenario, g.metric);
        match verdict(g, report) {
            Verdict::Pass(v) => push(
                format!(
                    "PASS {} {}: {what} = {v:.3} ({bound})",
                    g.name,
                    tag(g.class)
                ),
                false,
            ),
            Verdict::Fail(v) => {
                let by = g
                    .min
                    .filter(|lo| v < *lo)
                    .map(|lo| format!("{:.1}% below", (lo - v) / lo.abs().max(1e-12) * 100.0))
                    .or_else(|| {
                        g.max.map(|hi| {
                            if hi == 0.0 {
                                format!("{v} above 0")
                            } else {
                                format!("{:.1}% above", (v - hi) / hi.abs() * 100.0)
                            }
                        })
                    })
                    .unwrap_or_default();
                push(
                    format!(
                        "FAIL {} {}: {what} = {v:.3}, needs {bound} ({by})",
                        g.name,
                        tag(g.class)
                    ),
                    enforce.enforces(g.class),
                );
            }
            // A missing number is never a slow machine: it fails unless nothing is enforced.
            Verdict::Missing(why) => push(
                format!(
                    "FAIL {} {}: {what} is missing: {why}",
                    g.name,
                    tag(Class::Correctness)
                ),
                enforce.enforces(Class::Correctness),
            ),
            // A ratio over a peer that delivered nothing is neither a pass nor a missing number.
            // Not a pass: a baseline that moved nothing (broken, or a run too short for it)
            // shows nothing about amst, and a gate must not pass on a number that is not
            // there. Not missing: every sample is present (the peer ran and delivered zero),
            // so the harness did its job, and a correctness failure would turn CI's quick run
            // red whenever a weak peer (quinn Cubic, 5 s on a lossy 100 ms link) moves
            // nothing yet. So it fails in the gate's own class: a full run, whose longer runs
            // give the peer time to deliver, enforces it; CI's `--gate correctness` reports it.
            Verdict::Undefined(why) => push(
                format!(
                    "FAIL {} {}: {what} has no value: {why}",
                    g.name,
                    tag(g.class)
                ),
                enforce.enforces(g.class),
            ),
            Verdict::NotRun(why) => push(
                format!("NOT RUN {} ({}): {what}: {why}", g.name, g.class),
                false,
            ),
        }
    }
    out
}

/// One gate's verdict.
pub fn verdict(g: &Gate, report: &Report) -> Verdict {
    let Some(s) = report.scenarios.iter().find(|s| s.id == g.scenario) else {
        return Verdict::Missing(format!(
            "the report has no scenario {:?} (a gate for a scenario the harness does not know?)",
            g.scenario
        ));
    };
    if let Some(why) = &s.not_run {
        return Verdict::NotRun(why.clone());
    }
    let problems = s.problems();
    if !problems.is_empty() {
        return Verdict::Missing(format!("scenario incomplete: {}", problems.join("; ")));
    }
    let Some(&v) = s.metrics.get(&g.metric) else {
        return Verdict::Missing("the scenario ran but did not produce this metric".into());
    };
    if let Some(why) = s.undefined_metrics.get(&g.metric) {
        return Verdict::Undefined(why.clone());
    }
    if v.is_nan() {
        return Verdict::Missing("the metric is NaN".into());
    }
    let low_ok = g.min.is_none_or(|lo| v >= lo);
    let high_ok = g.max.is_none_or(|hi| v <= hi);
    if low_ok && high_ok {
        Verdict::Pass(v)
    } else {
        Verdict::Fail(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Contender, Scenario};

    const GATES: &str = r#"
        [[gate]]
        name = "P1"
        scenario = "a"
        metric = "ratio"
        min = 0.95
        [[gate]]
        name = "P2"
        scenario = "b"
        metric = "ratio"
        min = 0.9
        [[gate]]
        name = "P3"
        scenario = "c"
        metric = "p99_ms"
        max = 100.0
        [[gate]]
        name = "P4"
        scenario = "d"
        metric = "lost"
        max = 0.0
        class = "correctness"
        [[gate]]
        name = "P5"
        scenario = "e"
        metric = "ratio"
        min = 0.5
        [[gate]]
        name = "P6"
        scenario = "a"
        metric = "not_measured"
        min = 1.0
    "#;

    fn complete(id: &str, metric: &str, v: f64) -> Scenario {
        let mut s = Scenario::new(id, "");
        let mut c = Contender::new("x", "Gbit/s").expecting(3);
        for _ in 0..3 {
            c.record(1.0, Vec::new());
        }
        s.contenders.push(c);
        s.metrics.insert(metric.into(), v);
        s
    }

    fn report() -> Report {
        let a = complete("a", "ratio", 0.97);
        let b = complete("b", "ratio", 0.45);
        // A scenario that tried and failed: its gate must fail, not skip.
        let c = Scenario::failed("c", "", "could not start the emulated link: no root");
        // Lost one message: a correctness gate.
        let d = complete("d", "lost", 1.0);
        // Left out on purpose.
        let e = Scenario::not_run("e", "", "needs --rdma");
        Report {
            quick: true,
            scenarios: vec![a, b, c, d, e],
            ..Report::default()
        }
    }

    fn line<'a>(o: &'a Outcome, prefix: &str) -> &'a str {
        o.lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in {:#?}", o.lines))
    }

    #[test]
    fn a_missing_metric_fails_naming_why_and_a_left_out_scenario_is_listed_as_not_run() {
        let gates = parse(GATES).unwrap();
        let o = check(&gates, &report(), Enforce::All);
        assert!(!o.passed());
        assert!(line(&o, "PASS P1 (ratio)").contains("a.ratio = 0.970"));
        assert!(line(&o, "FAIL P2 (ratio)").contains("50.0% below"));
        let p3 = line(&o, "FAIL P3 (correctness)");
        assert!(
            p3.contains("c.p99_ms is missing") && p3.contains("no root"),
            "{p3}"
        );
        assert!(line(&o, "FAIL P4 (correctness)").contains("d.lost = 1.000"));
        assert!(line(&o, "NOT RUN P5 (ratio)").contains("needs --rdma"));
        assert!(line(&o, "FAIL P6").contains("did not produce this metric"));
        assert!(line(&o, "FAIL scenario c (correctness)").contains("no root"));
        assert!(!o.lines.iter().any(|l| l.contains("scenario e")));
        assert!(!o.failures.iter().any(|l| l.contains("P5")));
        assert_eq!(o.failures.len(), 5, "{:#?}", o.failures);
    }

    #[test]
    fn correctness_mode_reports_ratios_and_enforces_the_rest() {
        let gates = parse(GATES).unwrap();
        let o = check(&gates, &report(), Enforce::Correctness);
        assert!(line(&o, "FAIL P2 (ratio, report-only)").contains("b.ratio"));
        assert!(!o.failures.iter().any(|l| l.contains("P2")));
        for enforced in ["P3", "P4", "P6", "scenario c"] {
            assert!(
                o.failures.iter().any(|l| l.contains(enforced)),
                "{enforced} not enforced: {:#?}",
                o.failures
            );
        }
        let none = check(&gates, &report(), Enforce::None);
        assert!(none.passed() && none.lines.len() == o.lines.len());
    }

    #[test]
    fn a_contender_short_of_its_samples_fails_the_scenario() {
        let gates = parse(GATES).unwrap();
        let mut r = report();
        r.scenarios[0].contenders[0].samples.pop();
        r.scenarios[0].contenders[0]
            .errors
            .push("iperf3: connection refused".into());
        let o = check(&gates, &r, Enforce::Correctness);
        let p1 = line(&o, "FAIL P1 (correctness)");
        assert!(
            p1.contains("x: 2 of 3 samples") && p1.contains("connection refused"),
            "{p1}"
        );
        assert!(line(&o, "FAIL scenario a").contains("2 of 3"));
    }

    #[test]
    fn a_ratio_over_a_peer_that_delivered_nothing_has_no_value_and_fails_in_its_class() {
        let gates =
            parse("[[gate]]\nname = \"Q\"\nscenario = \"q\"\nmetric = \"over_cubic\"\nmin = 2.0\n")
                .unwrap();
        let mut s = Scenario::new("q", "");
        for (name, v) in [("bbr", 120.0), ("cubic", 0.0)] {
            let mut c = Contender::new(name, "Mbit/s");
            c.record(v, Vec::new());
            s.contenders.push(c);
        }
        s.insert_ratio("over_cubic", 120.0, "cubic", 0.0);
        let r = Report {
            scenarios: vec![s],
            ..Report::default()
        };
        let md = r.markdown(&[]);
        assert!(
            md.contains("peer delivered nothing (cubic: median 0)"),
            "{md}"
        );
        assert!(!md.contains("e11") && !md.contains("NaN"), "{md}");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(json["scenarios"][0]["metrics"]["over_cubic"].is_null());
        assert!(
            json["scenarios"][0]["undefined_metrics"]["over_cubic"]
                .as_str()
                .unwrap()
                .starts_with("peer delivered nothing")
        );
        let all = check(&gates, &r, Enforce::All);
        assert!(
            line(&all, "FAIL Q (ratio)")
                .contains("q.over_cubic has no value: peer delivered nothing")
        );
        assert_eq!(all.failures.len(), 1);
        let ci = check(&gates, &r, Enforce::Correctness);
        assert!(line(&ci, "FAIL Q (ratio, report-only)").contains("peer delivered nothing"));
        assert!(ci.passed());
        // A later ratio over a peer that did deliver replaces the undefined one.
        let mut s = r.scenarios[0].clone();
        s.insert_ratio("over_cubic", 120.0, "cubic", 40.0);
        assert_eq!(s.metrics["over_cubic"], 3.0);
        assert!(s.undefined_metrics.is_empty());
    }

    #[test]
    fn a_gate_for_an_unknown_scenario_fails_and_bad_files_are_rejected() {
        let gates =
            parse("[[gate]]\nname = \"Z\"\nscenario = \"nope\"\nmetric = \"m\"\nmin = 1.0\n")
                .unwrap();
        let o = check(&gates, &report(), Enforce::Correctness);
        assert!(line(&o, "FAIL Z").contains("no scenario \"nope\""));
        assert!(parse("gate = 3").is_err());
        assert!(parse("[[gate]]\nname = \"Y\"\nscenario = \"a\"\nmetric = \"m\"\n").is_err());
        assert!(
            parse("[[gate]]\nname = \"Y\"\nscenario = \"a\"\nmetric = \"m\"\nmin = 1.0\nclass = \"speed\"\n")
                .is_err()
        );
        assert_eq!("correctness".parse(), Ok(Enforce::Correctness));
        assert!("most".parse::<Enforce>().is_err());
    }
}
