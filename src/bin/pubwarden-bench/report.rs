//! Aggregation across rounds, the human-readable table and the JSON dump.

use crate::scenarios::{Check, Params, RunResult, Scenario};
use std::fmt::Write as _;

/// One run of one scenario against one target.
#[derive(Debug, Clone)]
pub struct Record {
    pub scenario: Scenario,
    pub target: String,
    pub round: usize,
    /// Position of this target within the round (0 = first).
    pub order: usize,
    /// Seconds since the benchmark started.
    pub at_secs: f64,
    pub result: Result<RunResult, String>,
}

pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn values(recs: &[Record], scn: Scenario, target: &str, metric: &str) -> Vec<f64> {
    recs.iter()
        .filter(|r| r.scenario == scn && r.target == target)
        .filter_map(|r| r.result.as_ref().ok())
        .filter_map(|res| {
            res.metrics
                .iter()
                .find(|m| m.name == metric)
                .map(|m| m.value)
        })
        .collect()
}

/// Formats a value for the table according to its unit.
pub fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "msg/s" if v >= 1e6 => format!("{:.3}M", v / 1e6),
        "msg/s" if v >= 1e3 => format!("{:.1}k", v / 1e3),
        "msg/s" => format!("{v:.0}"),
        "us" | "ms" => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// Metric names (with unit and direction) in the order the scenario reports them.
fn metric_names(recs: &[Record], scn: Scenario) -> Vec<(&'static str, &'static str, bool)> {
    let mut out: Vec<(&'static str, &'static str, bool)> = Vec::new();
    for r in recs.iter().filter(|r| r.scenario == scn) {
        if let Ok(res) = &r.result {
            for m in &res.metrics {
                if !out.iter().any(|(n, _, _)| *n == m.name) {
                    out.push((m.name, m.unit, m.higher_is_better));
                }
            }
        }
    }
    out
}

pub struct Summary {
    pub scenario: String,
    pub metric: &'static str,
    pub unit: &'static str,
    pub target: String,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub vs_redis: Option<f64>,
    pub vs_haproxy: Option<f64>,
    pub rounds: usize,
}

pub fn summarize(recs: &[Record], scenarios: &[Scenario], targets: &[String]) -> Vec<Summary> {
    let mut out = Vec::new();
    for &scn in scenarios {
        for (name, unit, _) in metric_names(recs, scn) {
            let med_of = |t: &str| median(&mut values(recs, scn, t, name));
            let redis = med_of("redis");
            let haproxy = med_of("haproxy");
            for t in targets {
                let mut v = values(recs, scn, t, name);
                let med = median(&mut v);
                let ratio = |base: Option<f64>| match (med, base) {
                    (Some(m), Some(b)) if b != 0.0 => Some(m / b),
                    _ => None,
                };
                out.push(Summary {
                    scenario: scn.id(),
                    metric: name,
                    unit,
                    target: t.clone(),
                    median: med,
                    min: v.first().copied(),
                    max: v.last().copied(),
                    vs_redis: ratio(redis),
                    vs_haproxy: ratio(haproxy),
                    rounds: v.len(),
                });
            }
        }
    }
    out
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

fn check_line(c: &Check, runs: usize, failed: usize) -> String {
    let verdict = if c.ok() && failed == 0 {
        "OK  "
    } else {
        "FAIL"
    };
    let mut s = format!(
        "{verdict} {runs} runs: {} published, {} delivered of {} expected; lost {}, dup {}, out-of-order {}",
        c.published, c.received, c.expected, c.lost, c.duplicated, c.out_of_order
    );
    if c.foreign > 0 {
        let _ = write!(s, ", foreign {}", c.foreign);
    }
    if c.publish_errors > 0 || c.unacked > 0 {
        let _ = write!(
            s,
            ", PUBLISH errors {}, unacknowledged {}",
            c.publish_errors, c.unacked
        );
    }
    if failed > 0 {
        let _ = write!(s, ", {failed} runs failed");
    }
    s
}

pub fn table(recs: &[Record], scenarios: &[Scenario], targets: &[String], p: &Params) -> String {
    let summary = summarize(recs, scenarios, targets);
    let mut out = String::new();
    let tw = targets.iter().map(String::len).max().unwrap_or(6).max(7);
    let lw = scenarios
        .iter()
        .flat_map(|&scn| metric_names(recs, scn))
        .map(|(n, u, _)| n.len() + u.len() + 5)
        .max()
        .unwrap_or(0)
        .max(26);
    let _ = writeln!(
        out,
        "\nMedians across rounds (min..max in brackets); ratios are median / median of direct redis and of haproxy.\n\
         ^ higher is better, v lower is better. p99 and above are noisy on this machine."
    );
    for &scn in scenarios {
        let _ = writeln!(out, "\n== {} : {}", scn.id(), scn.describe(p));
        let _ = writeln!(
            out,
            "  {:<lw$} {:<tw$} {:>10} {:>23} {:>9} {:>10}",
            "metric", "target", "median", "(min .. max)", "vs redis", "vs haproxy"
        );
        for (name, unit, hib) in metric_names(recs, scn) {
            let label = format!("{name} [{unit}] {}", if hib { "^" } else { "v" });
            let mut first = true;
            for t in targets {
                let Some(s) = summary.iter().find(|s| {
                    s.scenario == scn.id() && s.metric == name && &s.target == t && s.rounds > 0
                }) else {
                    continue;
                };
                let f =
                    |v: Option<f64>| v.map(|v| fmt_value(v, unit)).unwrap_or_else(|| "-".into());
                let range = format!("({} .. {})", f(s.min), f(s.max));
                let _ = writeln!(
                    out,
                    "  {:<lw$} {:<tw$} {:>10} {:>23} {:>9} {:>10}",
                    if first { label.as_str() } else { "" },
                    t,
                    f(s.median),
                    range,
                    fmt_ratio(s.vs_redis),
                    fmt_ratio(s.vs_haproxy)
                );
                first = false;
            }
        }
        for (i, t) in targets.iter().enumerate() {
            let mut c = Check::default();
            let (mut runs, mut failed) = (0, 0);
            for r in recs.iter().filter(|r| r.scenario == scn && &r.target == t) {
                runs += 1;
                match &r.result {
                    Ok(res) => {
                        c.add(&res.check);
                        if !res.errors.is_empty() {
                            failed += 1;
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            let _ = writeln!(
                out,
                "  {:<lw$} {:<tw$} {}",
                if i == 0 { "correctness" } else { "" },
                t,
                check_line(&c, runs, failed)
            );
        }
        for r in recs.iter().filter(|r| r.scenario == scn) {
            match &r.result {
                Err(e) => {
                    let _ = writeln!(out, "  ! round {} {}: {e}", r.round + 1, r.target);
                }
                Ok(res) => {
                    for e in &res.errors {
                        let _ = writeln!(out, "  ! round {} {}: {e}", r.round + 1, r.target);
                    }
                }
            }
        }
    }
    out
}

pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "null".into())
}

fn check_json(c: &Check) -> String {
    format!(
        "{{\"ok\":{},\"published\":{},\"expected\":{},\"received\":{},\"lost\":{},\"duplicated\":{},\
         \"out_of_order\":{},\"foreign\":{},\"publish_errors\":{},\"unacked\":{},\"receivers_reported\":{}}}",
        c.ok(),
        c.published,
        c.expected,
        c.received,
        c.lost,
        c.duplicated,
        c.out_of_order,
        c.foreign,
        c.publish_errors,
        c.unacked,
        c.receivers_reported
    )
}

/// The `--json` document. `header` holds pre-rendered top-level members.
pub fn json(
    header: &[(String, String)],
    recs: &[Record],
    scenarios: &[Scenario],
    targets: &[String],
) -> String {
    let mut o = String::from("{\n");
    for (k, v) in header {
        let _ = writeln!(o, "  {}: {},", esc(k), v);
    }
    o.push_str("  \"runs\": [\n");
    for (i, r) in recs.iter().enumerate() {
        let _ = write!(
            o,
            "    {{\"scenario\":{},\"target\":{},\"round\":{},\"order\":{},\"at_secs\":{},",
            esc(&r.scenario.id()),
            esc(&r.target),
            r.round + 1,
            r.order,
            num(r.at_secs)
        );
        match &r.result {
            Ok(res) => {
                o.push_str("\"ok\":true,\"metrics\":{");
                for (j, m) in res.metrics.iter().enumerate() {
                    let _ = write!(
                        o,
                        "{}{}:{{\"value\":{},\"unit\":{},\"higher_is_better\":{}}}",
                        if j > 0 { "," } else { "" },
                        esc(m.name),
                        num(m.value),
                        esc(m.unit),
                        m.higher_is_better
                    );
                }
                let errs: Vec<String> = res.errors.iter().map(|e| esc(e)).collect();
                let _ = write!(
                    o,
                    "}},\"check\":{},\"errors\":[{}]}}",
                    check_json(&res.check),
                    errs.join(",")
                );
            }
            Err(e) => {
                let _ = write!(o, "\"ok\":false,\"error\":{}}}", esc(e));
            }
        }
        o.push_str(if i + 1 < recs.len() { ",\n" } else { "\n" });
    }
    o.push_str("  ],\n  \"summary\": [\n");
    let summary = summarize(recs, scenarios, targets);
    for (i, s) in summary.iter().enumerate() {
        let _ = write!(
            o,
            "    {{\"scenario\":{},\"metric\":{},\"unit\":{},\"target\":{},\"rounds\":{},\"median\":{},\
             \"min\":{},\"max\":{},\"vs_redis\":{},\"vs_haproxy\":{}}}",
            esc(&s.scenario),
            esc(s.metric),
            esc(s.unit),
            esc(&s.target),
            s.rounds,
            opt(s.median),
            opt(s.min),
            opt(s.max),
            opt(s.vs_redis),
            opt(s.vs_haproxy)
        );
        o.push_str(if i + 1 < summary.len() { ",\n" } else { "\n" });
    }
    o.push_str("  ]\n}\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn escaping() {
        assert_eq!(esc("a\"b\\\n\u{1}"), "\"a\\\"b\\\\\\n\\u0001\"");
        assert_eq!(num(f64::NAN), "null");
    }
}
