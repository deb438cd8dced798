//! Performance gates: lower bounds on ratios, read from a committed TOML file.

use std::path::Path;

use serde::Deserialize;

use crate::report::Report;

/// One gate: `scenario.metric >= min`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
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
}

#[derive(Deserialize)]
struct GateFile {
    gate: Vec<Gate>,
}

/// Reads the gates file.
pub fn load(path: &Path) -> Result<Vec<Gate>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses gates from TOML text.
pub fn parse(text: &str) -> Result<Vec<Gate>, String> {
    let file: GateFile = toml::from_str(text).map_err(|e| e.to_string())?;
    Ok(file.gate)
}

/// The verdict on one gate.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Within bounds.
    Pass(f64),
    /// Out of bounds, with the value.
    Fail(f64),
    /// The scenario did not run or lacks the metric.
    Missing(String),
}

/// Checks every gate against the report; returns a human line per gate and whether all passed
/// (missing metrics do not fail the run: a skipped scenario says why in the report).
pub fn check(gates: &[Gate], report: &Report) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    for g in gates {
        let verdict = verdict(g, report);
        let bound = match (g.min, g.max) {
            (Some(lo), Some(hi)) => format!("{lo} ≤ x ≤ {hi}"),
            (Some(lo), None) => format!("≥ {lo}"),
            (None, Some(hi)) => format!("≤ {hi}"),
            (None, None) => "no bound".into(),
        };
        let line = match &verdict {
            Verdict::Pass(v) => format!(
                "PASS {}: {}.{} = {v:.3} ({bound})",
                g.name, g.scenario, g.metric
            ),
            Verdict::Fail(v) => {
                ok = false;
                let by = g
                    .min
                    .filter(|lo| v < lo)
                    .map(|lo| format!("{:.1}% below", (lo - v) / lo * 100.0))
                    .or_else(|| {
                        g.max
                            .map(|hi| format!("{:.1}% above", (v - hi) / hi * 100.0))
                    })
                    .unwrap_or_default();
                format!(
                    "FAIL {}: {}.{} = {v:.3}, needs {bound} ({by})",
                    g.name, g.scenario, g.metric
                )
            }
            Verdict::Missing(why) => format!("SKIP {}: {}.{}: {why}", g.name, g.scenario, g.metric),
        };
        lines.push(line);
    }
    (lines, ok)
}

fn verdict(g: &Gate, report: &Report) -> Verdict {
    let Some(s) = report.scenarios.iter().find(|s| s.id == g.scenario) else {
        return Verdict::Missing("scenario not run".into());
    };
    if let Some(why) = &s.skipped {
        return Verdict::Missing(format!("skipped: {why}"));
    }
    let Some(&v) = s.metrics.get(&g.metric) else {
        return Verdict::Missing("metric not measured".into());
    };
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
    use crate::report::Scenario;

    #[test]
    fn gates_pass_fail_and_skip_with_reasons() {
        let gates = parse(
            r#"
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
            "#,
        )
        .unwrap();
        let mut a = Scenario::new("a", "");
        a.metrics.insert("ratio".into(), 0.97);
        let mut b = Scenario::new("b", "");
        b.metrics.insert("ratio".into(), 0.45);
        let c = Scenario::skipped("c", "", "no root");
        let report = Report {
            quick: true,
            scenarios: vec![a, b, c],
            ..Report::default()
        };
        let (lines, ok) = check(&gates, &report);
        assert!(!ok);
        assert!(lines[0].starts_with("PASS P1"), "{}", lines[0]);
        assert!(
            lines[1].starts_with("FAIL P2") && lines[1].contains("50.0% below"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("SKIP P3") && lines[2].contains("no root"),
            "{}",
            lines[2]
        );
        assert!(parse("gate = 3").is_err());
    }
}
