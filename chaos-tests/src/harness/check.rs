//! The checkers run after every run, on the recorded history and the final state
//! (`../shared/CHAOS.md` §3): each gives a pass or a failure with what it found.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use protocol::pb;
use serde::Serialize;

use super::history::{Kind, Outcome, Recorded};
use super::lin::{self, RegKind, RegOp, Verdict};

/// One invariant's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, pass: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            pass,
            detail: detail.into(),
        }
    }
}

/// Steps the linearizability search may take per key before it says "unknown".
const SEARCH_BUDGET: u64 = 5_000_000;

/// I1/I2 for KV: every key's history (the final reads included) is linearizable; an
/// acknowledged write missing afterwards, a write applied twice or a stale read all make it
/// fail. Returns the check and how many keys failed.
pub fn kv_linearizable(rec: &Recorded) -> (Check, usize) {
    let mut by_key: BTreeMap<&str, Vec<RegOp>> = BTreeMap::new();
    for o in &rec.ops {
        let kind = match (o.op, &o.outcome) {
            (Kind::Put, _) if o.ok() || o.indeterminate() => {
                RegKind::Write(o.value.clone().unwrap_or_default())
            }
            (Kind::Get, Outcome::Ok(v)) => RegKind::Read(v.clone()),
            _ => continue,
        };
        by_key.entry(&o.key).or_default().push(RegOp {
            invoke: o.invoke,
            complete: if o.ok() { o.complete } else { f64::INFINITY },
            kind,
        });
    }
    let mut failed = Vec::new();
    let mut unknown = Vec::new();
    let mut n = 0;
    for (k, ops) in &by_key {
        n += ops.len();
        match lin::check(ops, SEARCH_BUDGET) {
            Verdict::Linearizable => {}
            Verdict::Violation(why) => failed.push(format!("{k}: {why}")),
            Verdict::Unknown => unknown.push(*k),
        }
    }
    let pass = failed.is_empty() && unknown.is_empty();
    let detail = if pass {
        format!("{} keys, {n} ops: linearizable", by_key.len())
    } else {
        format!(
            "not linearizable: {}; search gave up on: {unknown:?}",
            failed.join("; ")
        )
    };
    (Check::new("kv-linearizable", pass, detail), failed.len())
}

/// Reads that returned a value some acknowledged write had already replaced before the read
/// was sent (a sufficient sign of staleness, independent of the full search).
pub fn stale_reads(rec: &Recorded) -> usize {
    // For each key: acknowledged writes as (invoke, complete, value).
    let mut writes: HashMap<&str, Vec<(f64, f64, &str)>> = HashMap::new();
    for o in &rec.ops {
        if o.op == Kind::Put && o.ok() {
            writes.entry(&o.key).or_default().push((
                o.invoke,
                o.complete,
                o.value.as_deref().unwrap_or(""),
            ));
        }
    }
    let mut stale = 0;
    for o in &rec.ops {
        let (Kind::Get, Outcome::Ok(Some(v))) = (o.op, &o.outcome) else {
            continue;
        };
        let Some(ws) = writes.get(o.key.as_str()) else {
            continue;
        };
        let Some(&(_, w_done, _)) = ws.iter().find(|w| w.2 == v) else {
            continue;
        };
        // A later write, begun after v's write ended and ended before this read began.
        if ws
            .iter()
            .any(|&(i, c, x)| x != v && i > w_done && c < o.invoke)
        {
            stale += 1;
        }
    }
    stale
}

/// Rank of a job status in the state machine PENDING → RUNNING → terminal.
fn rank(s: &str) -> u8 {
    match s {
        "PENDING" => 0,
        "RUNNING" => 1,
        _ => 2,
    }
}

/// Job checks: I1 (every acknowledged submission exists), I2 (one job per submission, run
/// at most once, states in order, one terminal state) and I4 (all terminal now). Returns the
/// checks, lost and duplicated counts.
pub fn jobs(rec: &Recorded, last: &[pb::JobInfo], markers: &Path) -> (Vec<Check>, usize, usize) {
    let acked: BTreeSet<&str> = rec
        .ops
        .iter()
        .filter(|o| o.op == Kind::Submit && o.ok())
        .map(|o| o.key.as_str())
        .collect();
    let mut listed: BTreeMap<&str, usize> = BTreeMap::new();
    for j in last {
        *listed.entry(j.submission_id.as_str()).or_default() += 1;
    }
    let lost: Vec<&&str> = acked.iter().filter(|s| !listed.contains_key(**s)).collect();
    let twice: Vec<&&str> = listed
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| s)
        .collect();
    let mut ran_twice = Vec::new();
    for j in last {
        let runs = std::fs::read_to_string(markers.join(&j.submission_id))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if runs > 1 {
            ran_twice.push(format!("{} ran {runs} times", j.submission_id));
        }
    }
    // Observed statuses, in time order per job, the final listing last.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let finals = last
        .iter()
        .map(|j| (&j.submission_id, super::workload::job_status_name(j.status)));
    for (sid, st) in rec
        .jobs
        .iter()
        .map(|s| (&s.submission_id, s.status.clone()))
        .chain(finals)
    {
        let v = seen.entry(sid.clone()).or_default();
        if v.last() != Some(&st) {
            v.push(st);
        }
    }
    let mut disorder = Vec::new();
    for (sid, v) in &seen {
        let ordered = v.windows(2).all(|w| rank(&w[0]) < rank(&w[1]));
        if !ordered {
            disorder.push(format!("{sid}: {}", v.join(" → ")));
        }
    }
    let not_terminal: Vec<String> = last
        .iter()
        .filter(|j| rank(&super::workload::job_status_name(j.status)) < 2)
        .map(|j| {
            format!(
                "{} {}",
                j.submission_id,
                super::workload::job_status_name(j.status)
            )
        })
        .collect();
    let checks = vec![
        Check::new(
            "jobs-not-lost",
            lost.is_empty(),
            format!(
                "{} acknowledged, {} listed; missing: {lost:?}",
                acked.len(),
                listed.len()
            ),
        ),
        Check::new(
            "jobs-once",
            twice.is_empty() && ran_twice.is_empty(),
            format!("listed twice: {twice:?}; ran more than once: {ran_twice:?}"),
        ),
        Check::new(
            "jobs-state-machine",
            disorder.is_empty(),
            if disorder.is_empty() {
                format!(
                    "{} jobs, every one PENDING → RUNNING → one terminal state",
                    seen.len()
                )
            } else {
                format!("out of order: {}", disorder.join("; "))
            },
        ),
        Check::new(
            "jobs-terminal",
            not_terminal.is_empty(),
            format!("not terminal after the heal: {not_terminal:?}"),
        ),
    ];
    (checks, lost.len(), twice.len() + ran_twice.len())
}

/// I3: no two heads claimed leadership in the same term (from every head's own samples).
pub fn one_leader_per_term(rec: &Recorded) -> Check {
    let mut leaders: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    for s in &rec.heads {
        if s.role == "leader" {
            leaders.entry(s.term).or_default().insert(s.head);
        }
    }
    let bad: Vec<String> = leaders
        .iter()
        .filter(|(_, h)| h.len() > 1)
        .map(|(t, h)| format!("term {t}: heads {h:?}"))
        .collect();
    Check::new(
        "one-leader-per-term",
        bad.is_empty(),
        if bad.is_empty() {
            format!("{} terms with a leader", leaders.len())
        } else {
            format!("two leaders: {}", bad.join("; "))
        },
    )
}

/// How many terms had a leader (elections the run caused, plus the first).
pub fn leader_terms(rec: &Recorded) -> usize {
    rec.heads
        .iter()
        .filter(|s| s.role == "leader")
        .map(|s| s.term)
        .collect::<BTreeSet<_>>()
        .len()
}

/// Seconds from `fault_at` until the first acknowledged write sent after it completed, and
/// the longest gap between acknowledged writes from `fault_at` to `until`.
pub fn availability(rec: &Recorded, fault_at: f64, until: f64) -> (Option<f64>, f64) {
    let mut oks: Vec<(f64, f64)> = rec
        .ops
        .iter()
        .filter(|o| o.op == Kind::Put && o.ok() && o.client != u32::MAX)
        .map(|o| (o.invoke, o.complete))
        .collect();
    oks.sort_by(|a, b| a.1.total_cmp(&b.1));
    let failover = oks
        .iter()
        .find(|(i, _)| *i >= fault_at)
        .map(|(_, c)| c - fault_at);
    let mut last = fault_at;
    let mut gap: f64 = 0.0;
    for (_, c) in oks.iter().filter(|(_, c)| *c > fault_at && *c <= until) {
        gap = gap.max(c - last);
        last = *c;
    }
    gap = gap.max(until - last);
    (failover, gap)
}

/// Nodes the leader reported DEAD at some point while the scenario killed none.
pub fn nodes_declared_dead(rec: &Recorded) -> BTreeSet<String> {
    rec.nodes
        .iter()
        .filter(|n| n.state == "DEAD")
        .map(|n| n.node_id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::history::{HeadSample, JobSample, Op};
    use super::*;

    fn put(key: &str, v: &str, a: f64, b: f64, ok: bool) -> Op {
        Op {
            client: 0,
            op: Kind::Put,
            key: key.into(),
            value: Some(v.into()),
            head: String::new(),
            invoke: a,
            complete: b,
            outcome: if ok {
                Outcome::Ok(None)
            } else {
                Outcome::Timeout
            },
        }
    }
    fn get(key: &str, v: Option<&str>, a: f64, b: f64) -> Op {
        Op {
            client: 1,
            op: Kind::Get,
            key: key.into(),
            value: None,
            head: String::new(),
            invoke: a,
            complete: b,
            outcome: Outcome::Ok(v.map(str::to_string)),
        }
    }

    #[test]
    fn kv_checks_find_lost_and_stale_values_per_key() {
        let mut rec = Recorded {
            ops: vec![
                put("a", "1", 0.0, 1.0, true),
                put("a", "2", 2.0, 3.0, true),
                get("a", Some("2"), 4.0, 5.0),
                put("b", "9", 0.0, 1.0, false),
                get("b", None, 2.0, 3.0),
            ],
            ..Default::default()
        };
        assert!(kv_linearizable(&rec).0.pass);
        assert_eq!(stale_reads(&rec), 0);
        rec.ops.push(get("a", Some("1"), 6.0, 7.0));
        let (c, bad) = kv_linearizable(&rec);
        assert!(!c.pass && bad == 1, "{c:?}");
        assert_eq!(stale_reads(&rec), 1);
    }

    #[test]
    fn two_leaders_in_one_term_fail_and_one_each_passes() {
        let s = |head, term, role: &str| HeadSample {
            at: 0.0,
            head,
            role: role.into(),
            term,
            last_log_index: 0,
            last_applied: 0,
        };
        let mut rec = Recorded {
            heads: vec![s(0, 1, "leader"), s(1, 1, "follower"), s(1, 2, "leader")],
            ..Default::default()
        };
        assert!(one_leader_per_term(&rec).pass);
        assert_eq!(leader_terms(&rec), 2);
        rec.heads.push(s(2, 2, "leader"));
        assert!(!one_leader_per_term(&rec).pass);
    }

    #[test]
    fn job_checks_find_lost_repeated_and_backward_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let job = |sid: &str, status: pb::JobStatus| pb::JobInfo {
            submission_id: sid.into(),
            status: status as i32,
            ..Default::default()
        };
        let submit = |sid: &str| Op {
            client: 0,
            op: Kind::Submit,
            key: sid.into(),
            value: None,
            head: String::new(),
            invoke: 0.0,
            complete: 1.0,
            outcome: Outcome::Ok(None),
        };
        let mut rec = Recorded {
            ops: vec![submit("j1"), submit("j2")],
            ..Default::default()
        };
        let sample = |sid: &str, st: &str, at| JobSample {
            at,
            submission_id: sid.into(),
            status: st.into(),
        };
        rec.jobs = vec![
            sample("j1", "PENDING", 1.0),
            sample("j1", "RUNNING", 2.0),
            sample("j2", "PENDING", 1.0),
        ];
        std::fs::write(dir.path().join("j1"), "ran\n").unwrap();
        let last = vec![
            job("j1", pb::JobStatus::Succeeded),
            job("j2", pb::JobStatus::Failed),
        ];
        let (checks, lost, dup) = jobs(&rec, &last, dir.path());
        assert!(checks.iter().all(|c| c.pass), "{checks:?}");
        assert_eq!((lost, dup), (0, 0));
        // j2 lost from the listing, j1 ran twice and went back to PENDING.
        std::fs::write(dir.path().join("j1"), "ran\nran\n").unwrap();
        rec.jobs.push(sample("j1", "PENDING", 3.0));
        let (checks, lost, dup) = jobs(&rec, &last[..1], dir.path());
        let failed: Vec<&str> = checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(failed, ["jobs-not-lost", "jobs-once", "jobs-state-machine"]);
        assert_eq!((lost, dup), (1, 1));
        // A job still running at the end is not terminal.
        let (checks, ..) = jobs(&rec, &[job("j1", pb::JobStatus::Running)], dir.path());
        assert!(checks.iter().any(|c| c.name == "jobs-terminal" && !c.pass));
    }

    #[test]
    fn availability_measures_the_first_write_after_the_fault_and_the_longest_gap() {
        let rec = Recorded {
            ops: vec![
                put("a", "1", 9.0, 9.5, true),
                put("a", "2", 10.2, 13.0, true),
                put("a", "3", 13.1, 13.2, true),
                put("a", "4", 13.5, 20.0, false),
            ],
            ..Default::default()
        };
        let (f, gap) = availability(&rec, 10.0, 15.0);
        assert!((f.unwrap() - 3.0).abs() < 1e-9);
        assert!((gap - 3.0).abs() < 1e-9);
    }
}
