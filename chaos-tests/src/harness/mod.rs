//! The chaos harness behind the `chaos` binary: builds a cluster in network namespaces,
//! runs recorded traffic, injects one scenario's faults at seeded random points, heals,
//! waits out a quiet period, then checks the history and the final state
//! (`../shared/CHAOS.md`).
//!
//! A run is repeatable from its seed in what it decides (fault times, targets, client
//! choices); what the cluster does with them is timing, as on any real network.

pub mod check;
pub mod history;
pub mod lin;
pub mod report;
pub mod rng;
pub mod scenarios;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::netns::{NetCluster, NetOptions};
use check::Check;
use history::History;
use rng::Rng;
use workload::{Load, Target};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // A second Ctrl-C: leave now (`chaos clean` removes what the run left).
        // SAFETY: _exit is async-signal-safe.
        unsafe { nix::libc::_exit(130) };
    }
}

/// Makes Ctrl-C and SIGTERM end the current run through its normal teardown (every process,
/// namespace and mount removed) instead of killing the runner mid-way; a second one exits at
/// once.
pub fn catch_interrupts() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for s in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { signal(s, SigHandler::Handler(on_signal)) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps `d`, failing at once if the runner was interrupted.
pub fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            bail!("interrupted");
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// What the runner was asked for.
#[derive(Debug, Clone)]
pub struct Config {
    /// The fault phase of each run.
    pub duration: Duration,
    /// Keep the history of passing runs too.
    pub keep_history: bool,
}

/// One scenario: its cluster shape and the fault phase.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// The cluster: heads, nodes, per-host environment (the runner adds the client host).
    pub net: fn() -> NetOptions,
    pub load: fn() -> Load,
    /// Injects the faults over `run.duration` and heals before it returns.
    pub fault: fn(&mut Run) -> Result<()>,
}

/// Figures of one run (`../shared/CHAOS.md` §5).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub failover_s: Option<f64>,
    pub unavail_s: Option<f64>,
    pub ops: usize,
    pub ops_ok: usize,
    pub lost: usize,
    pub dup: usize,
    pub stale_reads: usize,
    pub detect_s: Option<f64>,
    pub checksum_mismatch: usize,
    pub crashes: usize,
    pub leader_terms: usize,
    pub jobs: usize,
}

/// What one run found.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub scenario: String,
    pub seed: u64,
    pub run: u32,
    pub pass: bool,
    pub checks: Vec<Check>,
    pub figures: Figures,
    pub notes: Vec<String>,
    pub history: Option<PathBuf>,
    pub error: Option<String>,
    pub seconds: f64,
}

/// A run in progress, as the scenario's fault function sees it.
pub struct Run {
    pub c: NetCluster,
    pub hist: History,
    pub rng: Rng,
    pub target: Target,
    pub duration: Duration,
    /// Processes the scenario killed or stopped on purpose (not crashes).
    pub killed: BTreeSet<String>,
    /// Scenario-specific checks.
    pub checks: Vec<Check>,
    /// What the report should say besides the figures (e.g. a fault this kernel lacks).
    pub notes: Vec<String>,
    /// When the first fault was injected (seconds of the history's clock).
    pub fault_at: Option<f64>,
    pub detect_s: Option<f64>,
    /// Objects whose bytes differed from the checksum recorded when they were made.
    pub checksum_mismatch: usize,
    /// Whether the traffic runs a job submitter (its checks apply).
    pub jobs: bool,
    /// Every job must end SUCCEEDED (no fault in the scenario may fail one).
    pub require_jobs_succeeded: bool,
    /// The heads in the group at the end (None: every head of the target), for the
    /// convergence check.
    pub members: Option<Vec<String>>,
    /// A scenario's own check of the final job list.
    pub after: Option<fn(&[protocol::pb::JobInfo]) -> Check>,
}

impl Run {
    /// Index of the head that leads now (as the majority says), within 30 s.
    pub fn leader(&self) -> Result<usize> {
        self.c.wait_leader(Duration::from_secs(30))
    }

    /// Records the first fault's time and the event.
    pub fn fault(&mut self, what: &str) {
        if self.fault_at.is_none() {
            self.fault_at = Some(self.hist.now());
        }
        self.hist.event(format!("fault: {what}"));
    }

    pub fn heal(&self, what: &str) {
        self.hist.event(format!("heal: {what}"));
    }

    /// A seeded point in the first half of the fault phase.
    pub fn random_start(&mut self) -> Duration {
        self.duration.mul_f64(self.rng.between(0.1, 0.4))
    }

    /// Every host that is not in `h`: heads, worker nodes and spare hosts (not the clients',
    /// which is the last).
    pub fn others(&self, h: &[usize]) -> Vec<usize> {
        (0..self.c.hosts.len() - 1)
            .filter(|i| !h.contains(i))
            .collect()
    }

    /// Sleeps the rest of the fault phase, counted from `started`.
    pub fn until_end(&self, started: Instant) -> Result<()> {
        pause(self.duration.saturating_sub(started.elapsed()))
    }
}

/// The quiet period after the heal: 2 × the longest election timeout + 5 s.
const QUIET: Duration = Duration::from_secs(6);
/// How long after the heal every job must be terminal.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `scn` once with `seed`. Never panics on a cluster fault: what went wrong is in the
/// result. The cluster is torn down before it returns.
pub fn run_once(scn: &Scenario, seed: u64, run: u32, cfg: &Config, report: &Path) -> RunResult {
    let started = Instant::now();
    let mut result = RunResult {
        scenario: scn.name.into(),
        seed,
        run,
        pass: false,
        checks: Vec::new(),
        figures: Figures::default(),
        notes: Vec::new(),
        history: None,
        error: None,
        seconds: 0.0,
    };
    let hist = History::new();
    let outcome = run_inner(scn, seed, cfg, &hist, &mut result);
    if let Err(e) = outcome {
        result.error = Some(format!("{e:#}"));
    }
    result.pass = result.error.is_none() && result.checks.iter().all(|c| c.pass);
    if !result.pass || cfg.keep_history {
        let path = report.join(format!("history-{}-{seed}.jsonl", scn.name));
        if hist.snapshot().write_jsonl(&path).is_ok() {
            result.history = Some(path);
        }
    }
    result.seconds = started.elapsed().as_secs_f64();
    result
}

fn run_inner(
    scn: &Scenario,
    seed: u64,
    cfg: &Config,
    hist: &History,
    result: &mut RunResult,
) -> Result<()> {
    let c = NetCluster::start(NetOptions {
        clients: 1,
        ..(scn.net)()
    })
    .context("starting the cluster")?;
    let client_host = c.hosts.len() - 1;
    let load = (scn.load)();
    let target = Target {
        // Heads that may join later are addressed from the start (refused until they run).
        heads: c
            .head_addrs
            .iter()
            .cloned()
            .chain(c.spare_addresses())
            .collect(),
        token: c.token.clone(),
        client_ns: Some(c.hosts[client_host].ns.clone()),
        tag: format!("s{seed}"),
        jobs_dir: c.path().join("job-runs"),
    };
    let mut run = Run {
        c,
        hist: hist.clone(),
        rng: Rng::new(seed),
        target: target.clone(),
        duration: cfg.duration,
        killed: BTreeSet::new(),
        checks: Vec::new(),
        notes: Vec::new(),
        fault_at: None,
        detect_s: None,
        checksum_mismatch: 0,
        jobs: load.job_every.is_some(),
        require_jobs_succeeded: false,
        after: None,
        members: None,
    };
    run.leader().context("no first leader")?;
    let traffic = workload::start(target.clone(), load.clone(), hist.clone(), seed)?;
    pause(Duration::from_secs(2))?;
    hist.event("fault phase begins");
    let faulted = (scn.fault)(&mut run);
    // Whatever the scenario did, nothing stays cut off, stopped or down.
    let _ = run.c.heal();
    for h in 0..run.c.hosts.len() {
        let _ = run.c.uncap_bandwidth(h);
    }
    for p in run.c.heads.iter().chain(run.c.nodes.iter()) {
        let _ = p.signal(nix::sys::signal::Signal::SIGCONT);
    }
    faulted.context("the scenario's fault phase")?;
    let healed_at = hist.now();
    hist.event("healed; quiet period");
    pause(QUIET)?;
    traffic.stop();
    let traffic_end = hist.now();
    hist.event("traffic stopped; final reads");

    // The final state: every key, and every job terminal (or the deadline).
    let deadline = Instant::now() + JOB_DEADLINE;
    let jobs = loop {
        let jobs = workload::final_reads_jobs(&target, Duration::from_secs(30))?;
        let open = jobs
            .iter()
            .filter(|j| {
                !matches!(
                    workload::job_status_name(j.status).as_str(),
                    "SUCCEEDED" | "FAILED" | "STOPPED"
                )
            })
            .count();
        if open == 0 || Instant::now() > deadline {
            break jobs;
        }
        pause(Duration::from_millis(500))?;
    };
    workload::final_kv_reads(&target, load.keys, hist, Duration::from_secs(30))?;
    let rec = hist.snapshot();

    let (kv, kv_bad) = check::kv_linearizable(&rec);
    result.checks.push(kv);
    let mut lost = kv_bad;
    let mut dup = 0;
    if run.jobs {
        let (checks, l, d) = check::jobs(&rec, &jobs, &target.jobs_dir);
        result.checks.extend(checks);
        lost += l;
        dup += d;
    }
    if run.require_jobs_succeeded {
        let failed: Vec<String> = jobs
            .iter()
            .filter(|j| workload::job_status_name(j.status) != "SUCCEEDED")
            .map(|j| {
                format!(
                    "{} {}: {}",
                    j.submission_id,
                    workload::job_status_name(j.status),
                    j.message
                )
            })
            .collect();
        result.checks.push(Check::new(
            "jobs-succeeded",
            failed.is_empty(),
            format!("{} jobs; not SUCCEEDED: {failed:?}", jobs.len()),
        ));
    }
    if let Some(f) = run.after {
        result.checks.push(f(&jobs));
    }
    result.checks.push(check::one_leader_per_term(&rec));
    let members = run.members.clone().unwrap_or_else(|| target.heads.clone());
    result.checks.push(converged(&Target {
        heads: members,
        ..target.clone()
    }));
    let crashes = crashes(&mut run);
    result.checks.push(Check::new(
        "no-crash",
        crashes.is_empty(),
        if crashes.is_empty() {
            "every process the scenario did not kill still runs; no panic in any log".into()
        } else {
            crashes.join("; ")
        },
    ));
    // Liveness: writes go through again soon after the heal.
    let (after_heal, _) = check::availability(&rec, healed_at, traffic_end);
    result.checks.push(Check::new(
        "progress-after-heal",
        after_heal.is_some_and(|s| s <= 5.0),
        format!(
            "first acknowledged write sent after the heal took {}",
            after_heal.map_or("forever".into(), |s| format!("{s:.2} s"))
        ),
    ));
    result.checks.append(&mut run.checks);

    let fault_at = run.fault_at.unwrap_or(healed_at);
    let (failover, gap) = check::availability(&rec, fault_at, healed_at);
    result.figures = Figures {
        failover_s: run.fault_at.and(failover),
        unavail_s: run.fault_at.map(|_| gap),
        ops: rec.ops.len(),
        ops_ok: rec.ops.iter().filter(|o| o.ok()).count(),
        lost,
        dup,
        stale_reads: check::stale_reads(&rec),
        detect_s: run.detect_s,
        checksum_mismatch: run.checksum_mismatch,
        crashes: crashes.len(),
        leader_terms: check::leader_terms(&rec),
        jobs: jobs.len(),
    };
    result.notes = std::mem::take(&mut run.notes);
    Ok(())
}

/// I5: every head reports the same state hash at the same applied index. Polls until every
/// head answers at one common index (the cluster is quiet by now), 20 s at most.
fn converged(target: &Target) -> Check {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen: BTreeMap<u64, BTreeMap<usize, u64>> = BTreeMap::new();
    loop {
        let infos = workload::head_infos(target);
        for (i, info) in infos.iter().enumerate() {
            if let Some(r) = info {
                seen.entry(r.state_hash_index)
                    .or_default()
                    .insert(i, r.state_hash);
            }
        }
        let diverged: Vec<String> = seen
            .iter()
            .filter(|(_, by)| by.values().collect::<BTreeSet<_>>().len() > 1)
            .map(|(ix, by)| format!("index {ix}: {by:?}"))
            .collect();
        if !diverged.is_empty() {
            return Check::new(
                "replicas-converge",
                false,
                format!("different state at the same index: {}", diverged.join("; ")),
            );
        }
        if let Some((ix, by)) = seen
            .iter()
            .rev()
            .find(|(_, by)| by.len() == target.heads.len())
        {
            return Check::new(
                "replicas-converge",
                true,
                format!(
                    "all {} heads hold state {:016x} at index {ix}",
                    by.len(),
                    by.values().next().copied().unwrap_or(0)
                ),
            );
        }
        if Instant::now() > deadline {
            return Check::new(
                "replicas-converge",
                false,
                format!("the heads never reported one common applied index in 20 s: {seen:?}"),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// I7: processes that exited although the scenario did not kill them, and panics, SIGBUS
/// or out-of-memory kills named in any log of the run.
fn crashes(run: &mut Run) -> Vec<String> {
    let mut out = Vec::new();
    for p in run.c.heads.iter_mut().chain(run.c.nodes.iter_mut()) {
        if !run.killed.contains(&p.name) && p.exited() {
            out.push(format!("{} exited: {}", p.name, p.log_tail()));
        }
    }
    let logs = crate::files_below(run.c.path(), &|n: &str| {
        n.ends_with(".log") || n.ends_with(".out") || n.ends_with(".err")
    });
    for f in logs {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        // A fail point the scenario set fires as a panic that its hook names on a line of
        // its own: only panics beyond those are crashes.
        let panics: Vec<&str> = text.lines().filter(|l| l.contains("panicked at")).collect();
        let fail_points = text
            .lines()
            .filter(|l| {
                l.starts_with("fail point ") && l.ends_with("reached: aborting the process")
            })
            .count();
        if panics.len() > fail_points {
            out.push(format!("{}: {}", f.display(), panics[0]));
        } else if let Some(l) = text
            .lines()
            .find(|l| l.contains("SIGBUS") || l.contains("Out of memory"))
        {
            out.push(format!("{}: {l}", f.display()));
        }
    }
    out
}
