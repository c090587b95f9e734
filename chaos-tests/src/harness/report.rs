//! The report of a `chaos run`: `report.json` (every run, its checks and figures, and a
//! summary per scenario), `results.csv` (a row per scenario per run) and a Markdown table
//! (`summary.md`, the shape `docs/chaos.md` keeps).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::RunResult;

/// The invariant of `../shared/CHAOS.md` §3 a check belongs to ("S" for a scenario's own).
fn invariant(check: &str) -> &'static str {
    match check {
        "kv-linearizable" | "jobs-not-lost" | "recovered-index" => "I1",
        "jobs-once" | "jobs-state-machine" => "I2",
        "one-leader-per-term" => "I3",
        "jobs-terminal" | "progress-after-heal" => "I4",
        "replicas-converge" => "I5",
        "checksums" => "I6",
        "no-crash" => "I7",
        "one-actor-instance" => "I8",
        _ => "S",
    }
}

const INVARIANTS: [&str; 9] = ["I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "S"];

/// pass / FAIL / - (not exercised) for each invariant of a run.
fn per_invariant(r: &RunResult) -> BTreeMap<&'static str, &'static str> {
    let mut out: BTreeMap<&str, &str> = INVARIANTS.iter().map(|i| (*i, "-")).collect();
    for c in &r.checks {
        let slot = out.entry(invariant(&c.name)).or_insert("-");
        if !c.pass {
            *slot = "FAIL";
        } else if *slot == "-" {
            *slot = "pass";
        }
    }
    out
}

/// The `q` quantile (0..=1) of `xs`, nearest rank.
pub fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub runs: usize,
    pub passed: usize,
    pub failover_p50_s: Option<f64>,
    pub failover_p99_s: Option<f64>,
    pub unavail_p50_s: Option<f64>,
    pub unavail_max_s: Option<f64>,
    pub detect_p50_s: Option<f64>,
    pub ops: usize,
    pub lost: usize,
    pub dup: usize,
    pub stale_reads: usize,
    pub checksum_mismatch: usize,
    pub crashes: usize,
}

pub fn summarize(results: &[RunResult]) -> Vec<Summary> {
    let mut by: BTreeMap<&str, Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        by.entry(&r.scenario).or_default().push(r);
    }
    by.into_iter()
        .map(|(name, rs)| {
            let f: Vec<f64> = rs.iter().filter_map(|r| r.figures.failover_s).collect();
            let u: Vec<f64> = rs.iter().filter_map(|r| r.figures.unavail_s).collect();
            let d: Vec<f64> = rs.iter().filter_map(|r| r.figures.detect_s).collect();
            let sum = |g: fn(&RunResult) -> usize| rs.iter().map(|r| g(r)).sum();
            Summary {
                scenario: name.into(),
                runs: rs.len(),
                passed: rs.iter().filter(|r| r.pass).count(),
                failover_p50_s: quantile(&f, 0.5),
                failover_p99_s: quantile(&f, 0.99),
                unavail_p50_s: quantile(&u, 0.5),
                unavail_max_s: quantile(&u, 1.0),
                detect_p50_s: quantile(&d, 0.5),
                ops: sum(|r| r.figures.ops),
                lost: sum(|r| r.figures.lost),
                dup: sum(|r| r.figures.dup),
                stale_reads: sum(|r| r.figures.stale_reads),
                checksum_mismatch: sum(|r| r.figures.checksum_mismatch),
                crashes: sum(|r| r.figures.crashes),
            }
        })
        .collect()
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.2}"))
}

/// The CSV: a row per scenario per run.
pub fn csv(results: &[RunResult]) -> String {
    let mut s = String::from("scenario,seed,run,pass");
    for i in INVARIANTS {
        let _ = write!(s, ",{i}");
    }
    s.push_str(
        ",failover_s,unavail_s,ops,ops_ok,lost,dup,stale_reads,detect_s,checksum_mismatch,\
         crashes,leader_terms,jobs,seconds\n",
    );
    for r in results {
        let f = &r.figures;
        let _ = write!(s, "{},{},{},{}", r.scenario, r.seed, r.run, r.pass);
        for v in per_invariant(r).values() {
            let _ = write!(s, ",{v}");
        }
        let _ = writeln!(
            s,
            ",{},{},{},{},{},{},{},{},{},{},{},{},{:.1}",
            opt(f.failover_s),
            opt(f.unavail_s),
            f.ops,
            f.ops_ok,
            f.lost,
            f.dup,
            f.stale_reads,
            opt(f.detect_s),
            f.checksum_mismatch,
            f.crashes,
            f.leader_terms,
            f.jobs,
            r.seconds
        );
    }
    s
}

/// The Markdown table of the summary.
pub fn markdown(sums: &[Summary]) -> String {
    let mut s = String::from(
        "| scenario | runs | passed | failover p50 / p99 (s) | unavailable p50 / max (s) | \
         detect p50 (s) | ops | lost | dup | stale reads | checksum mismatches | crashes |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in sums {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} / {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            m.scenario,
            m.runs,
            m.passed,
            opt(m.failover_p50_s),
            opt(m.failover_p99_s),
            opt(m.unavail_p50_s),
            opt(m.unavail_max_s),
            opt(m.detect_p50_s),
            m.ops,
            m.lost,
            m.dup,
            m.stale_reads,
            m.checksum_mismatch,
            m.crashes
        );
    }
    s
}

/// Writes `report.json`, `results.csv` and `summary.md` into `dir`.
pub fn write(dir: &Path, base_seed: u64, results: &[RunResult]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let sums = summarize(results);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let json = serde_json::json!({
        "base_seed": base_seed,
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "summary": sums,
        "runs": results,
        "not_available_here": [
            "netem (tc qdisc netem is not in this kernel): no added delay, reorder or corruption"
        ],
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(dir.join("results.csv"), csv(results))?;
    std::fs::write(dir.join("summary.md"), markdown(&sums))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.99), Some(3.0));
        assert_eq!(quantile(&[5.0], 0.0), Some(5.0));
    }

    #[test]
    fn a_failed_check_marks_its_invariant_in_the_csv() {
        let r = RunResult {
            scenario: "x".into(),
            seed: 7,
            run: 0,
            pass: false,
            checks: vec![
                super::super::check::Check::new("kv-linearizable", true, ""),
                super::super::check::Check::new("jobs-not-lost", false, "missing"),
                super::super::check::Check::new("no-crash", true, ""),
            ],
            figures: Default::default(),
            notes: vec![],
            history: None,
            error: None,
            seconds: 1.0,
        };
        let csv = csv(&[r]);
        let row = csv.lines().nth(1).unwrap();
        assert!(
            row.starts_with("x,7,0,false,FAIL,-,-,-,-,-,pass,-,-,"),
            "{row}"
        );
    }
}
