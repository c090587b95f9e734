//! The scenarios of `../shared/CHAOS.md` §4 that the runner has, each a fault phase over
//! the recorded traffic. Every one heals what it did before it returns; the runner heals
//! again regardless.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::check::{self, Check};
use super::workload::{self, Load};
use super::{Run, Scenario, pause};
use crate::driver::Driver;
use crate::netns::NetOptions;

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "leader-kill",
            about: "kill -9 the leader under load, restart it after 5 s",
            net: three_heads_one_node,
            load: Load::default,
            fault: leader_kill,
        },
        Scenario {
            name: "leader-isolated",
            about: "cut the leader off from the other heads and nodes (clients still reach it); \
                    reads go to every head",
            net: three_heads_one_node,
            load: Load::default,
            fault: leader_isolated,
        },
        Scenario {
            name: "flapping-partition",
            about: "a new random head cut off every 2 s, both ways or one way",
            net: three_heads_one_node,
            load: Load::default,
            fault: flapping,
        },
        Scenario {
            name: "leader-pause",
            about: "SIGSTOP the leader, resume it; then freeze the next leader in the cgroup \
                    freezer, thaw it",
            net: three_heads_one_node,
            load: Load::default,
            fault: leader_pause,
        },
        Scenario {
            name: "crash-restart-all",
            about: "kill -9 every head within 50 ms, restart them all",
            net: three_heads_one_node,
            load: Load::default,
            fault: crash_restart_all,
        },
        Scenario {
            name: "lossy-links",
            about: "10 % then 30 % packet loss on every host, every packet duplicated, then \
                    a 1 Mbit/s cap on the leader with 10 % loss; no netem here, so no added \
                    delay",
            net: three_heads_one_node,
            load: Load::default,
            fault: lossy_links,
        },
        Scenario {
            name: "worker-kill-dag",
            about: "kill -9 a worker node mid-DAG (220 chained tasks, max_retries 3, puts \
                    checksummed at put time), restart it after 5 s",
            net: two_nodes,
            load: light,
            fault: worker_kill_dag,
        },
        Scenario {
            name: "zombie-worker",
            about: "cut off the node of a detached actor (max_restarts 1), sometimes with the \
                    leader, while a caller on that node calls it; heal",
            net: two_nodes_with_slots,
            load: light,
            fault: zombie_worker,
        },
        Scenario {
            name: "store-exhaustion",
            about: "three drivers on one node put 3x its 32 MiB store while holding every \
                    ref and four zero-copy views each",
            net: small_store,
            load: light,
            fault: store_exhaustion,
        },
        Scenario {
            name: "hostile-clients",
            about: "on every port of every head and node: random bytes, truncated and \
                    mistyped protobuf, deep nesting, 5 MiB and 1 GiB messages, 10k concurrent \
                    calls, unknown ids; no, wrong and right credentials; the token never in a \
                    log or a metric",
            net: three_heads_one_node,
            load: light,
            fault: hostile_clients,
        },
        Scenario {
            name: "disk-full",
            about: "fill the Raft store of the leader, then of a follower (each on a 32 MiB \
                    tmpfs): the head exits naming the error, the rest keep serving; free the \
                    space and restart it",
            net: stores_on_tmpfs,
            load: Load::default,
            fault: disk_full,
        },
        Scenario {
            name: "membership-change",
            about: "while the leader is killed or cut off: a fourth head joins and the old \
                    leader is removed, both at once; the removed head comes back and must \
                    not disrupt",
            net: with_spare_head,
            load: Load::default,
            fault: membership_change,
        },
        Scenario {
            name: "crash-at-failpoints",
            about: "every head crashed at once at a fail point (before and after the log \
                    flush, between apply and reply, mid snapshot build), restarted; then \
                    node-0 crashed between starting a job's driver and reporting it",
            net: frequent_snapshots,
            load: queued_jobs,
            fault: crash_at_failpoints,
        },
        Scenario {
            name: "hostile-http",
            about: "bad HTTP, CLI and archive input: unknown ids, ../ and absolute paths, \
                    links out and chains of links, zip bombs by size and by count, an \
                    over-limit upload, invalid JSON, a lone surrogate in an env value; 4xx \
                    or a clear CLI error each, and no byte written outside the sandbox",
            net: three_heads_one_node,
            load: light,
            fault: hostile_http,
        },
        Scenario {
            name: "clock-skew",
            about: "the leader's and a worker's wall clock +1 h, then -1 d, then running at \
                    twice the speed, changed at runtime (libfaketime; monotonic time untouched)",
            net: skewable,
            load: queued_jobs,
            fault: clock_skew,
        },
    ]
}

/// Jobs that hold node-0's single `node0` slot for a second each, submitted faster than
/// they finish, so some always wait in the queue when a clock jumps.
fn queued_jobs() -> Load {
    Load {
        job_every: Some(Duration::from_millis(800)),
        job_seconds: 1.0,
        job_resources: vec![("node0".into(), 1.0)],
        ..Load::default()
    }
}

/// libfaketime, as Debian's `faketime` package installs it.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Every daemon's wall clock follows its own file (`{dir}/clock-<host>`, re-read every
/// second): no file, no skew. Monotonic time stays real, as under an NTP step.
fn skewable() -> NetOptions {
    let mut o = three_heads_one_node();
    o.env = (0..o.heads + o.nodes)
        .map(|h| {
            let env = [
                ("LD_PRELOAD", LIBFAKETIME.to_string()),
                ("FAKETIME_TIMESTAMP_FILE", format!("{{dir}}/clock-{h}")),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
                ("FAKETIME_CACHE_DURATION", "1".into()),
            ];
            (h, env.map(|(k, v)| (k.to_string(), v)).to_vec())
        })
        .collect();
    o
}

fn three_heads_one_node() -> NetOptions {
    NetOptions {
        heads: 3,
        nodes: 1,
        ..Default::default()
    }
}

pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

impl Run {
    /// kill -9 head `i` (and remember it was on purpose).
    pub fn kill_head(&mut self, i: usize) {
        self.killed.insert(self.c.heads[i].name.clone());
        self.c.heads[i].kill9();
    }

    /// Restarts heads `which` on their data dirs (no longer counted as killed).
    pub fn restart_heads(&mut self, which: &[usize]) -> Result<()> {
        self.c.restart_heads(which)?;
        for &i in which {
            self.killed.remove(&self.c.heads[i].name);
        }
        Ok(())
    }
}

fn leader_kill(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    run.fault(&format!("kill -9 head-{l}, the leader"));
    run.kill_head(l);
    let t0 = Instant::now();
    let new = run.c.wait_leader(Duration::from_secs(30))?;
    run.detect_s = Some(t0.elapsed().as_secs_f64());
    run.hist.event(format!("head-{new} leads"));
    pause(Duration::from_secs(5).saturating_sub(t0.elapsed()))?;
    run.heal(&format!("restart head-{l}"));
    run.restart_heads(&[l])?;
    run.until_end(started)
}

fn leader_isolated(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    let (_, old_term) = run.c.head_view(l).context("the leader's view")?;
    let rest = run.others(&[l]);
    run.fault(&format!(
        "head-{l}, the leader, cut off from heads and nodes {rest:?}"
    ));
    run.c.partition(&[l], &rest)?;
    let t0 = Instant::now();
    // A new leader among the majority, in a later term.
    let majority: Vec<usize> = (0..run.c.heads.len()).filter(|h| *h != l).collect();
    let elected = crate::wait_for(
        "a new leader on the majority side",
        Duration::from_secs(15),
        || {
            majority.iter().find_map(|h| {
                let (role, term) = run.c.head_view(*h)?;
                (role == "leader" && term > old_term).then_some(*h)
            })
        },
    );
    let took = t0.elapsed().as_secs_f64();
    run.checks.push(Check::new(
        "new-leader-elected",
        elected.is_ok(),
        match &elected {
            Ok(h) => format!("head-{h} leads {took:.2} s after the cut"),
            Err(e) => format!("{e:#}"),
        },
    ));
    run.detect_s = Some(took);
    pause(run.duration.mul_f64(0.4).min(Duration::from_secs(10)))?;
    run.heal(&format!("head-{l} rejoins"));
    run.c.heal()?;
    run.until_end(started)
}

fn flapping(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let heads = run.c.heads.len();
    while started.elapsed() + Duration::from_secs(2) <= run.duration {
        let h = run.rng.below(heads as u64) as usize;
        let rest = run.others(&[h]);
        match run.rng.below(3) {
            0 => {
                run.fault(&format!("head-{h} cut off both ways"));
                run.c.partition(&[h], &rest)?;
            }
            1 => {
                run.fault(&format!("head-{h} hears nobody (one way)"));
                run.c.one_way(&rest, &[h])?;
            }
            _ => {
                run.fault(&format!("nobody hears head-{h} (one way)"));
                run.c.one_way(&[h], &rest)?;
            }
        }
        pause(Duration::from_secs(2))?;
    }
    run.heal("all links");
    run.c.heal()?;
    run.until_end(started)
}

/// A process frozen in a cgroup of its own (the v1 freezer, else v2's `cgroup.freeze`),
/// thawed and the cgroup removed on drop.
struct Frozen {
    dir: PathBuf,
    pid: i32,
    v2: bool,
}

impl Frozen {
    fn freeze(pid: i32) -> Result<Self> {
        let name = format!("rcn{}frz{pid}", std::process::id());
        let v1 = PathBuf::from("/sys/fs/cgroup/freezer");
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists());
        let (dir, v2) = if v1.join("freezer.state").exists() || v1.join("tasks").exists() {
            (v1.join(name), false)
        } else if let Some(root) = v2 {
            (root.join(name), true)
        } else {
            bail!("no cgroup freezer on this machine (neither v1 nor v2 is mounted)");
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let f = Frozen { dir, pid, v2 };
        std::fs::write(f.dir.join("cgroup.procs"), pid.to_string())?;
        if v2 {
            std::fs::write(f.dir.join("cgroup.freeze"), "1")?;
        } else {
            std::fs::write(f.dir.join("freezer.state"), "FROZEN")?;
        }
        Ok(f)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.v2 {
            let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        } else {
            let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::write(parent.join("cgroup.procs"), self.pid.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes freezer cgroups a killed run left (thawing what is in them).
pub fn clean_freezers() {
    for root in [
        "/sys/fs/cgroup/freezer",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ] {
        let Ok(rd) = std::fs::read_dir(root) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("rcn")
                .and_then(|r| r.split("frz").next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let _ = std::fs::write(e.path().join("freezer.state"), "THAWED");
            let _ = std::fs::write(e.path().join("cgroup.freeze"), "0");
            if let Ok(procs) = std::fs::read_to_string(e.path().join("cgroup.procs")) {
                for p in procs.lines() {
                    let _ = std::fs::write(std::path::Path::new(root).join("cgroup.procs"), p);
                }
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

fn leader_pause(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let hold = run.duration.mul_f64(0.3).min(Duration::from_secs(10));
    pause(run.random_start())?;
    let l = run.leader()?;
    run.fault(&format!("SIGSTOP head-{l}, the leader, for {hold:?}"));
    run.killed.insert(run.c.heads[l].name.clone());
    run.c.heads[l].signal(Signal::SIGSTOP)?;
    pause(hold)?;
    run.heal(&format!("SIGCONT head-{l}"));
    run.c.heads[l].signal(Signal::SIGCONT)?;
    run.killed.remove(&run.c.heads[l].name);
    pause(Duration::from_secs(3))?;
    let l = run.leader()?;
    let pid = run.c.heads[l].pid().context("the leader's pid")?;
    match Frozen::freeze(pid) {
        Ok(frozen) => {
            run.fault(&format!(
                "head-{l}, the leader, frozen (cgroup freezer) for {hold:?}"
            ));
            pause(hold)?;
            run.heal(&format!("thaw head-{l}"));
            drop(frozen);
        }
        Err(e) => run
            .notes
            .push(format!("the freezer half was skipped: {e:#}")),
    }
    run.until_end(started)
}

fn crash_restart_all(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let before = workload::head_infos(&run.target)
        .into_iter()
        .flatten()
        .map(|i| i.last_applied)
        .max()
        .unwrap_or(0);
    let all: Vec<usize> = (0..run.c.heads.len()).collect();
    run.fault("kill -9 every head");
    let t0 = Instant::now();
    for &i in &all {
        run.kill_head(i);
    }
    let spread = t0.elapsed();
    pause(Duration::from_secs(1))?;
    run.heal("restart every head");
    run.restart_heads(&all)?;
    let l = run.leader()?;
    let after = crate::wait_for("the log back at its index", Duration::from_secs(30), || {
        let m = workload::head_infos(&run.target)
            .into_iter()
            .flatten()
            .map(|i| i.last_log_index)
            .max()?;
        (m >= before).then_some(m)
    });
    run.checks.push(Check::new(
        "recovered-index",
        after.is_ok(),
        format!(
            "applied index {before} before the kill (all {} killed within {spread:?}); \
             head-{l} leads after the restart; log index after: {}",
            all.len(),
            after
                .as_ref()
                .map_or_else(|e| format!("{e:#}"), ToString::to_string)
        ),
    ));
    run.until_end(started)
}

fn lossy_links(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let hosts: Vec<usize> = (0..run.c.hosts.len()).collect();
    let phase = run.duration / 4;
    run.fault("10 % loss on every host");
    run.c.lossy(&hosts, 10)?;
    pause(phase)?;
    run.fault("30 % loss on every host");
    run.c.lossy(&hosts, 30)?;
    pause(phase)?;
    run.fault("every packet between hosts sent twice");
    run.c.heal()?;
    run.c.duplicate(&hosts)?;
    pause(phase)?;
    let l = run.leader()?;
    run.fault(&format!(
        "1 Mbit/s cap on head-{l}, the leader, and 10 % loss"
    ));
    run.c.lossy(&hosts, 10)?;
    run.c.cap_bandwidth(l, "1mbit")?;
    run.until_end(started)?;
    run.heal("no loss, no cap");
    run.c.heal()?;
    run.c.uncap_bandwidth(l)?;
    let dead = check::nodes_declared_dead(&run.hist.snapshot());
    run.checks.push(Check::new(
        "no-node-declared-dead",
        dead.is_empty(),
        format!("nodes the leader called DEAD: {dead:?}"),
    ));
    run.notes
        .push("no netem in this kernel: loss and bandwidth only, no added delay".into());
    Ok(())
}

fn clock_skew(run: &mut Run) -> Result<()> {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        bail!("{LIBFAKETIME} is missing: apt-get install faketime (.ci/run does)");
    }
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    let node_host = run.c.node_host(0);
    let phase = run.duration / 4;
    let set = |run: &Run, skew: &str| -> Result<()> {
        for h in [l, node_host] {
            std::fs::write(run.c.path().join(format!("clock-{h}")), format!("{skew}\n"))?;
        }
        Ok(())
    };
    for (skew, what) in [
        ("+1h", "an hour fast"),
        ("-1d", "a day slow"),
        ("+0 x2", "running at twice the speed"),
    ] {
        run.fault(&format!(
            "the wall clocks of head-{l} (the leader) and node-0 {what} ({skew})"
        ));
        set(run, skew)?;
        pause(phase)?;
    }
    run.heal("every clock true again");
    set(run, "+0")?;
    let rec = run.hist.snapshot();
    let terms = check::leader_terms(&rec);
    run.checks.push(Check::new(
        "no-elections",
        terms == 1,
        format!("{terms} term(s) had a leader: wall-clock jumps must not cause elections"),
    ));
    let dead = check::nodes_declared_dead(&rec);
    run.checks.push(Check::new(
        "no-node-declared-dead",
        dead.is_empty(),
        format!("nodes the leader called DEAD: {dead:?}"),
    ));
    run.until_end(started)?;
    run.require_jobs_succeeded = true;
    run.after = Some(skew_seen);
    Ok(())
}

/// The skew really reached the leader: some job it accepted carries a submission time an
/// hour ahead, and some a day behind.
fn skew_seen(jobs: &[protocol::pb::JobInfo]) -> Check {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let ahead = jobs
        .iter()
        .filter(|j| j.submitted_at_ms as i64 > now + 50 * 60_000)
        .count();
    let behind = jobs
        .iter()
        .filter(|j| (j.submitted_at_ms as i64) < now - 20 * 3_600_000)
        .count();
    Check::new(
        "skew-took-effect",
        ahead > 0 && behind > 0,
        format!(
            "jobs stamped an hour ahead: {ahead}, a day behind: {behind} (of {})",
            jobs.len()
        ),
    )
}

/// A binary built beside the runner (`sdk_driver`, `actor_driver`).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: cargo build -p chaos-tests --bins",
        p.display()
    );
    Ok(p)
}

/// Starts driver `bin ARGS` in host `host`'s namespace.
fn driver(run: &Run, host: usize, bin: &str, args: &[&str]) -> Result<Driver> {
    let mut cmd = run.c.exec(host, &sibling(bin)?);
    cmd.args(args);
    Driver::spawn(cmd)
}

fn two_nodes() -> NetOptions {
    NetOptions {
        heads: 3,
        nodes: 2,
        ..Default::default()
    }
}

fn two_nodes_with_slots() -> NetOptions {
    NetOptions {
        node_resources: vec![("slot".into(), 1.0)],
        ..two_nodes()
    }
}

fn light() -> Load {
    Load {
        kv_clients: 2,
        job_every: Some(Duration::from_secs(3)),
        ..Load::default()
    }
}

/// Seconds from `since` until the leader calls node `id` DEAD (None: not within 30 s).
fn detect_dead(run: &Run, id: &str, since: Instant) -> Option<f64> {
    crate::wait_for("the node declared dead", Duration::from_secs(30), || {
        (workload::node_state(&run.target, id).as_deref() == Some("DEAD")).then_some(())
    })
    .ok()
    .map(|()| since.elapsed().as_secs_f64())
}

fn worker_kill_dag(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let (chains, steps) = (20u64, 10u64);
    let mut d = driver(
        run,
        0,
        "sdk_driver",
        &["chain", &chains.to_string(), &steps.to_string()],
    )?;
    let strike = chains * run.rng.between(2.0, 5.0) as u64;
    crate::wait_for("the DAG under way", Duration::from_secs(120), || {
        d.stdout_lines()
            .iter()
            .filter_map(|l| l.strip_prefix("PROGRESS ")?.parse::<u64>().ok())
            .any(|n| n >= strike)
            .then_some(())
    })
    .with_context(|| format!("driver output:\n{}", d.output()))?;
    let id = run.c.nodes[0].ready["node_id"]
        .as_str()
        .context("node-0's id")?
        .to_string();
    run.fault(&format!(
        "kill -9 node-0 after {strike} of {} tasks",
        chains * (steps + 1)
    ));
    run.killed.insert(run.c.nodes[0].name.clone());
    run.c.nodes[0].kill9();
    let t0 = Instant::now();
    run.detect_s = detect_dead(run, &id, t0);
    run.checks.push(Check::new(
        "dead-node-detected",
        run.detect_s.is_some_and(|s| s <= 10.0),
        format!(
            "node-0 declared DEAD after {:?} s (at most 10 s)",
            run.detect_s
        ),
    ));
    pause(Duration::from_secs(5).saturating_sub(t0.elapsed()))?;
    run.heal("restart node-0");
    run.c.restart_node(0)?;
    run.killed.remove(&run.c.nodes[0].name);
    let r = d.result(Duration::from_secs(240))?;
    let mismatches = r["mismatches"].as_u64().unwrap_or(u64::MAX)
        + r["put_mismatches"].as_u64().unwrap_or(u64::MAX);
    let errors = r["errors"].as_array().map_or(0, Vec::len);
    run.checksum_mismatch += mismatches as usize;
    run.checks.push(Check::new(
        "checksums",
        mismatches == 0,
        format!(
            "{} tasks: {} chain results and {} put objects differ from what was recorded",
            r["tasks"], r["mismatches"], r["put_mismatches"]
        ),
    ));
    run.checks.push(Check::new(
        "dag-complete",
        errors == 0,
        format!(
            "every task's result arrived (lineage rebuilt what node-0 held); errors: {}",
            r["errors"]
        ),
    ));
    run.until_end(started)
}

/// I8 under a partition: the actor's worker node (and, on a seeded coin, the leader) cut
/// off while a caller on that node keeps calling; the majority restarts the actor elsewhere
/// only once the old copy is gone, and the old copy answers nothing sent after that.
fn zombie_worker(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let name = format!("zombie-{}", run.target.tag);
    driver(run, 0, "actor_driver", &["detached", &name])?.result(Duration::from_secs(120))?;
    let a = workload::actor_named(&run.target, &run.target.heads, &name).context("the actor")?;
    let w = run
        .c
        .nodes
        .iter()
        .position(|n| n.ready["node_id"].as_str() == Some(a.node_id.as_str()))
        .context("the actor is on a worker node")?;
    let (old_node, old_pid) = (a.node_id.clone(), a.pid as i32);
    let mut caller = driver(run, run.c.node_host(w), "actor_driver", &["caller", &name])?;
    caller.result(Duration::from_secs(60))?;
    crate::wait_for("a first acknowledged call", Duration::from_secs(60), || {
        caller
            .stdout_lines()
            .iter()
            .any(|l| l.starts_with("ACK"))
            .then_some(())
    })?;
    pause(Duration::from_millis(run.rng.below(1000)))?;
    let mut cut = vec![run.c.node_host(w)];
    let with_leader = run.rng.below(2) == 0;
    if with_leader {
        cut.push(run.leader()?);
    }
    let rest: Vec<usize> = (0..run.c.hosts.len())
        .filter(|h| !cut.contains(h))
        .collect();
    let majority: Vec<String> = (0..run.c.heads.len())
        .filter(|h| !cut.contains(h))
        .map(|h| run.c.head_addrs[h].clone())
        .collect();
    run.fault(&format!(
        "node-{w} (the actor's){} cut off",
        if with_leader { " and the leader" } else { "" }
    ));
    let cut_at = wall_ms();
    run.c.partition(&cut, &rest)?;
    let (mut exited, mut restarted) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while restarted.is_none() && Instant::now() < deadline {
        if exited.is_none() && !crate::process_alive(old_pid) {
            exited = Some(wall_ms());
        }
        if workload::actor_named(&run.target, &majority, &name).is_some_and(|a| a.num_restarts >= 1)
        {
            restarted = Some(wall_ms());
        }
        pause(Duration::from_millis(50))?;
    }
    run.detect_s = restarted.map(|r| (r - cut_at) as f64 / 1000.0);
    pause(run.duration.mul_f64(0.4).min(Duration::from_secs(10)))?;
    run.heal(&format!("node-{w} rejoins"));
    run.c.heal()?;
    let new_ack = crate::wait_for(
        "a call answered by the new copy",
        Duration::from_secs(60),
        || {
            caller
                .stdout_lines()
                .iter()
                .any(|l| l.starts_with("ACK") && !l.ends_with(&old_node))
                .then_some(())
        },
    );
    caller.send_line("stop")?;
    pause(Duration::from_millis(500))?;
    // (sent, value, node) of every acknowledgement.
    let acks: Vec<(u128, i64, String)> = caller
        .stdout_lines()
        .iter()
        .filter_map(|l| {
            let mut f = l.strip_prefix("ACK ")?.split_whitespace();
            let sent = f.next()?.parse().ok()?;
            let _recv = f.next()?;
            let value = f.next()?.parse().ok()?;
            Some((sent, value, f.next().unwrap_or_default().to_string()))
        })
        .collect();
    let mut bad = Vec::new();
    match (exited, restarted) {
        (_, None) => bad.push("the majority never restarted the actor".to_string()),
        (None, Some(_)) => bad.push(format!(
            "the old copy (pid {old_pid}) still ran at the restart"
        )),
        (Some(e), Some(r)) if e > r => bad.push(format!(
            "the old copy was gone {} ms after the cut, the restart seen at {} ms",
            e - cut_at,
            r - cut_at
        )),
        _ => {}
    }
    if let Some(r) = restarted {
        let late: Vec<_> = acks
            .iter()
            .filter(|(s, _, n)| *n == old_node && *s > r)
            .collect();
        if !late.is_empty() {
            bad.push(format!(
                "the old copy answered calls sent after the restart: {late:?}"
            ));
        }
    }
    let new_vals: Vec<i64> = acks
        .iter()
        .filter(|(_, _, n)| *n != old_node)
        .map(|(_, v, _)| *v)
        .collect();
    if let Err(e) = &new_ack {
        bad.push(format!("{e:#}"));
    }
    if !new_vals.windows(2).all(|w| w[0] < w[1]) {
        bad.push(format!("the new copy's values went back: {new_vals:?}"));
    }
    match workload::actor_named(&run.target, &run.target.heads, &name) {
        Some(a) if a.num_restarts == 1 && a.node_id != old_node => {}
        other => bad.push(format!(
            "afterwards: {other:?} (want one restart, on another node)"
        )),
    }
    run.checks.push(Check::new(
        "one-actor-instance",
        bad.is_empty(),
        if bad.is_empty() {
            format!(
                "old copy gone {} ms after the cut, before the restart at {} ms; {} acknowledgements, none from the old copy after it",
                exited.map_or(0, |e| e - cut_at),
                restarted.map_or(0, |r| r - cut_at),
                acks.len()
            )
        } else {
            bad.join("; ")
        },
    ));
    run.until_end(started)
}

fn wall_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn small_store() -> NetOptions {
    NetOptions {
        node_args: vec!["--object-store-memory=32MiB".into()],
        ..three_heads_one_node()
    }
}

fn store_exhaustion(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let host = run.c.node_host(0);
    run.fault("three drivers fill node-0's 32 MiB store threefold (2 MiB objects, all held)");
    let mut drivers = Vec::new();
    for k in 0..3u64 {
        let seed = (run.rng.below(1000) + 1) * 10 + k;
        drivers.push(driver(
            run,
            host,
            "sdk_driver",
            &["pressure", &seed.to_string(), "16", "2"],
        )?);
    }
    let mut other = Vec::new();
    let (mut ok, mut full, mut pinned_bad, mut read_bad) = (0, 0, 0, 0);
    for d in &mut drivers {
        let r = d.result(Duration::from_secs(180))?;
        ok += r["puts_ok"].as_u64().unwrap_or(0);
        full += r["store_full"].as_u64().unwrap_or(0);
        pinned_bad += r["pinned_bad"].as_u64().unwrap_or(u64::MAX);
        read_bad += r["read_bad"].as_u64().unwrap_or(u64::MAX);
        if let Some(e) = r["other_errors"].as_array() {
            other.extend(e.iter().map(ToString::to_string));
        }
    }
    let spilled = node_metric(run, 0, "rayctl_object_store_spilled_bytes_total");
    run.heal("the drivers exit and release everything");
    drop(drivers);
    run.checks.push(Check::new(
        "store-was-exhausted",
        spilled.is_some_and(|b| b > 0.0) || full > 0,
        format!("node-0 spilled {spilled:?} bytes and refused {full} puts"),
    ));
    run.checksum_mismatch += (pinned_bad + read_bad) as usize;
    run.checks.push(Check::new(
        "store-full-is-clean",
        other.is_empty() && ok > 0,
        format!("{ok} puts stored (spilled as needed), {full} refused with ObjectStoreFull; other errors: {other:?}"),
    ));
    run.checks.push(Check::new(
        "checksums",
        pinned_bad == 0 && read_bad == 0,
        format!("held views changed: {pinned_bad}; objects read back wrong: {read_bad}"),
    ));
    run.until_end(started)
}

/// A value from worker node `i`'s `/metrics` (asked from the observer, with the token).
fn node_metric(run: &Run, i: usize, query: &str) -> Option<f64> {
    let port = run.c.nodes[i].ready["metrics_export_port"].as_u64()?;
    let ip = &run.c.hosts[run.c.node_host(i)].ip;
    let text = ureq::get(&format!("http://{ip}:{port}/metrics"))
        .header("authorization", format!("Bearer {}", run.c.token))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    crate::find_metric(&text, query)
}

/// Every daemon's listeners, and the pids whose memory the probes must not grow.
fn listeners(run: &Run) -> (crate::probe::Listeners, Vec<(String, i32)>) {
    let mut l = crate::probe::Listeners::default();
    let mut pids = Vec::new();
    for (i, h) in run.c.heads.iter().enumerate() {
        let ip = &run.c.hosts[run.c.head_host(i)].ip;
        l.heads.push(run.c.head_addrs[i].clone());
        if let Some(p) = h.ready["dashboard_port"].as_u64() {
            l.http.push((
                format!("head-{i} REST"),
                format!("{ip}:{p}"),
                "/api/jobs/".into(),
            ));
            l.http.push((
                format!("head-{i} /metrics"),
                format!("{ip}:{p}"),
                "/metrics".into(),
            ));
        }
        if let Some(p) = h.pid() {
            pids.push((h.name.clone(), p));
        }
        node_listeners(
            &mut l,
            &mut pids,
            &format!("head-{i}'s node"),
            ip,
            &h.ready["node"],
        );
    }
    for (i, n) in run.c.nodes.iter().enumerate() {
        let ip = &run.c.hosts[run.c.node_host(i)].ip;
        node_listeners(&mut l, &mut pids, &n.name, ip, &n.ready);
    }
    (l, pids)
}

fn node_listeners(
    l: &mut crate::probe::Listeners,
    pids: &mut Vec<(String, i32)>,
    name: &str,
    ip: &str,
    ready: &serde_json::Value,
) {
    if let Some(p) = ready["node_manager_port"].as_u64() {
        l.node_managers.push(format!("{ip}:{p}"));
    }
    if let Some(p) = ready["object_manager_port"].as_u64() {
        l.object_managers.push(format!("{ip}:{p}"));
    }
    if let Some(p) = ready["metrics_export_port"].as_u64() {
        l.http.push((
            format!("{name} /metrics"),
            format!("{ip}:{p}"),
            "/metrics".into(),
        ));
    }
    if let Some(p) = ready["pid"].as_i64() {
        pids.push((name.to_string(), p as i32));
    }
}

fn hostile_clients(run: &mut Run) -> Result<()> {
    use prost::Message;
    let started = Instant::now();
    pause(run.random_start())?;
    let (l, pids) = listeners(run);
    let before: Vec<Option<u64>> = pids.iter().map(|(_, p)| crate::probe::rss(*p)).collect();
    let token = run.c.token.clone();
    run.fault(&format!(
        "hostile clients on {} head, {} node manager and {} object manager ports, {} HTTP endpoints",
        l.heads.len(),
        l.node_managers.len(),
        l.object_managers.len(),
        l.http.len()
    ));
    let mut seed = run.rng.next_u64() | 1;
    let mut garbage = 0;
    for a in l
        .heads
        .iter()
        .chain(&l.node_managers)
        .chain(&l.object_managers)
    {
        garbage += crate::probe::garbage(a, 10, &mut seed);
    }
    let unknown = "ab".repeat(16);
    let head_paths: Vec<(&'static str, Vec<u8>)> = vec![
        (
            "/rayctl.v1.ControlPlane/HeadInfo",
            pb_bytes(&protocol::pb::HeadInfoRequest {}),
        ),
        (
            "/rayctl.v1.ControlPlane/KvPut",
            protocol::pb::KvPutRequest {
                namespace: "hostile".into(),
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                overwrite: true,
            }
            .encode_to_vec(),
        ),
        (
            "/rayctl.v1.ControlPlane/GetNode",
            protocol::pb::GetNodeRequest {
                node_id: unknown.clone(),
            }
            .encode_to_vec(),
        ),
        (
            "/rayctl.v1.ControlPlane/GetJob",
            protocol::pb::GetJobRequest {
                job_id: "nope".into(),
            }
            .encode_to_vec(),
        ),
        (
            "/rayctl.v1.ControlPlane/Heartbeat",
            protocol::pb::HeartbeatRequest {
                node_id: unknown.clone(),
                incarnation: 1,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ];
    let node_paths: Vec<(&'static str, Vec<u8>)> = vec![(
        "/rayctl.v1.NodeManager/HealthCheck",
        pb_bytes(&protocol::pb::NodeHealthCheckRequest {}),
    )];
    let om_paths: Vec<(&'static str, Vec<u8>)> = vec![(
        "/rayctl.v1.ObjectManager/GetObjectInfo",
        protocol::pb::GetObjectInfoRequest {
            object_id: vec![9; 20],
        }
        .encode_to_vec(),
    )];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (seen, auth) = rt.block_on(async {
        let mut seen = crate::probe::Seen::default();
        for h in &l.heads {
            crate::probe::bad_grpc(h, &token, &head_paths, 10_000, &mut seen).await?;
        }
        for n in &l.node_managers {
            crate::probe::bad_grpc(n, &token, &node_paths, 1000, &mut seen).await?;
        }
        for o in &l.object_managers {
            crate::probe::bad_grpc(o, &token, &om_paths, 1000, &mut seen).await?;
        }
        let auth = crate::probe::auth_matrix(&l, &token).await?;
        anyhow::Ok((seen, auth))
    })?;
    drop(rt);
    run.heal("the hostile clients stop");
    run.checks.push(Check::new(
        "bad-grpc-answered-clearly",
        seen.bad.is_empty(),
        if seen.bad.is_empty() {
            format!(
                "{garbage} garbage connections and {} bad calls; answers by code: {:?}",
                seen.calls, seen.codes
            )
        } else {
            format!(
                "{} bad answers of {}: {}",
                seen.bad.len(),
                seen.calls,
                seen.bad
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    ));
    run.checks.push(Check::new(
        "auth-on-every-port",
        auth.is_empty(),
        if auth.is_empty() {
            format!(
                "{} gRPC listeners and {} HTTP endpoints: no and wrong tokens refused, the cluster token admitted (never on Raft)",
                l.heads.len() * 2 + l.node_managers.len() + l.object_managers.len(),
                l.http.len()
            )
        } else {
            auth.join("; ")
        },
    ));
    // Memory settles after the flood; then no daemon may have grown by 50 MiB or more.
    pause(Duration::from_secs(2))?;
    let mut grew = Vec::new();
    let mut growth = Vec::new();
    for ((name, pid), b) in pids.iter().zip(&before) {
        if let (Some(b), Some(a)) = (b, crate::probe::rss(*pid)) {
            let mib = (a as f64 - *b as f64) / f64::from(1 << 20);
            growth.push(format!("{name} {mib:+.1}"));
            if mib >= 50.0 {
                grew.push(format!("{name} grew {mib:.1} MiB"));
            }
        }
    }
    run.checks.push(Check::new(
        "memory-bounded",
        grew.is_empty(),
        format!("RSS change in MiB: {}", growth.join(", ")),
    ));
    // The token in no log, no metric.
    let mut leaks = Vec::new();
    for f in crate::files_below(run.c.path(), &|n: &str| {
        n.ends_with(".log") || n.ends_with(".out") || n.ends_with(".err")
    }) {
        if std::fs::read_to_string(&f).is_ok_and(|t| t.contains(&token)) {
            leaks.push(f.display().to_string());
        }
    }
    for (name, addr, path) in l.http.iter().filter(|(_, _, p)| p == "/metrics") {
        let text = ureq::get(&format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        if text.contains(&token) {
            leaks.push(name.clone());
        }
    }
    run.checks.push(Check::new(
        "token-not-leaked",
        leaks.is_empty(),
        format!("logs and /metrics holding the token: {leaks:?}"),
    ));
    run.until_end(started)
}

fn pb_bytes<M: prost::Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

fn stores_on_tmpfs() -> NetOptions {
    NetOptions {
        store_tmpfs: Some("32m".into()),
        ..three_heads_one_node()
    }
}

fn disk_full(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    for leader in [true, false] {
        let l = run.leader()?;
        let h = if leader {
            l
        } else {
            (l + 1 + run.rng.below(2) as usize) % run.c.heads.len()
        };
        let role = if leader { "the leader" } else { "a follower" };
        run.fault(&format!("head-{h}'s store full ({role})"));
        run.killed.insert(run.c.heads[h].name.clone());
        run.c.stores[h].fill()?;
        let t0 = Instant::now();
        let exited = crate::wait_for(
            &format!("head-{h} to exit"),
            Duration::from_secs(30),
            || run.c.heads[h].exited().then_some(()),
        );
        let took = t0.elapsed().as_secs_f64();
        let log = std::fs::read_to_string(run.c.heads[h].log_path()).unwrap_or_default();
        let status = run.c.heads[h].exit_status;
        let named = log.contains("No space left on device");
        run.checks.push(Check::new(
            &format!("full-{}-exits", if leader { "leader" } else { "follower" }),
            exited.is_ok() && status.is_some_and(|s| !s.success()) && named,
            format!(
                "head-{h} ({role}) exited {took:.1} s after its disk filled, with {status:?}; \
                 its log names ENOSPC: {named}"
            ),
        ));
        if leader {
            run.detect_s = Some(took);
        }
        pause(Duration::from_secs(2))?;
        run.heal(&format!("free head-{h}'s disk, restart it"));
        run.c.stores[h].free()?;
        run.restart_heads(&[h])?;
        // It catches up with the others.
        let caught = crate::wait_for(
            &format!("head-{h} to catch up"),
            Duration::from_secs(30),
            || {
                let infos = workload::head_infos(&run.target);
                let mine = infos.get(h)?.as_ref()?.last_applied;
                let best = infos.iter().flatten().map(|i| i.last_applied).max()?;
                (mine + 50 >= best).then_some(mine)
            },
        );
        run.checks.push(Check::new(
            &format!(
                "full-{}-rejoins",
                if leader { "leader" } else { "follower" }
            ),
            caught.is_ok(),
            format!(
                "head-{h} restarted on the freed disk and applied up to {}",
                caught
                    .as_ref()
                    .map_or_else(|e| format!("{e:#}"), ToString::to_string)
            ),
        ));
        pause(Duration::from_secs(2))?;
    }
    run.until_end(started)
}

fn with_spare_head() -> NetOptions {
    NetOptions {
        spare_heads: 1,
        ..three_heads_one_node()
    }
}

/// `rayctl operator raft ARGS… --address <every head>` from the observer, with the peer
/// secret: (exit code, stdout, stderr).
fn operator(run: &Run, args: &[&str]) -> Result<(i32, String, String)> {
    let mut cmd = std::process::Command::new(crate::rayctl_bin()?);
    cmd.args(["operator", "raft"]).args(args);
    if args[0] != "list-peers" {
        cmd.arg("--peer-secret-file")
            .arg(run.c.path().join("peer_secret"));
    }
    let out = cmd
        .arg("--address")
        .arg(run.target.heads.join(","))
        .env("RAYCTL_TMPDIR", run.c.path())
        .env(protocol::AUTH_TOKEN_ENV, &run.c.token)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The group's voters, as `rayctl operator raft list-peers` reports them.
fn voters(run: &Run) -> Option<Vec<String>> {
    let (code, out, _) = operator(run, &["list-peers", "-o", "json"]).ok()?;
    if code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let mut p: Vec<String> = v["peers"]
        .as_array()?
        .iter()
        .filter(|p| p["voter"].as_bool() == Some(true))
        .filter_map(|p| p["address"].as_str().map(str::to_string))
        .collect();
    p.sort();
    Some(p)
}

fn membership_change(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    let old = run.c.head_addrs[l].clone();
    let kill = run.rng.below(2) == 0;
    if kill {
        run.fault(&format!("kill -9 head-{l}, the leader"));
        run.kill_head(l);
    } else {
        let rest = run.others(&[run.c.head_host(l)]);
        run.fault(&format!("head-{l}, the leader, cut off"));
        run.c.partition(&[run.c.head_host(l)], &rest)?;
    }
    // Both changes at once: the join (the new head asks the leader) and the removal.
    run.hist
        .event(format!("head-3 joins while head-{l} is removed"));
    let removal = {
        let bin = crate::rayctl_bin()?;
        let mut cmd = std::process::Command::new(bin);
        cmd.args([
            "operator",
            "raft",
            "remove-peer",
            &old,
            "--peer-secret-file",
        ])
        .arg(run.c.path().join("peer_secret"))
        .arg("--address")
        .arg(run.target.heads.join(","))
        .env("RAYCTL_TMPDIR", run.c.path())
        .env(protocol::AUTH_TOKEN_ENV, &run.c.token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd.spawn()?
    };
    let joined = run.c.join_head();
    let removal = removal.wait_with_output()?;
    let mut refused_once = None;
    if !removal.status.success() {
        // One change at a time: a removal refused while the join was in flight is retried.
        refused_once = Some(String::from_utf8_lossy(&removal.stderr).trim().to_string());
        let (code, _, err) =
            crate::wait_for("the removal to go through", Duration::from_secs(30), || {
                let r = operator(run, &["remove-peer", &old]).ok()?;
                (r.0 == 0 || r.0 == 4).then_some(r)
            })?;
        anyhow::ensure!(code == 0 || code == 4, "remove-peer {old}: {err}");
    }
    let j = joined.context("the fourth head joining")?;
    let mut want: Vec<String> = run
        .c
        .head_addrs
        .iter()
        .filter(|a| **a != old)
        .cloned()
        .collect();
    want.sort();
    let mut last = None;
    let got = crate::wait_for("the new membership", Duration::from_secs(60), || {
        let v = operator(run, &["list-peers", "-o", "json"]).ok();
        last.clone_from(&v);
        voters(run).filter(|v| *v == want)
    });
    run.checks.push(Check::new(
        "membership-changed",
        got.is_ok(),
        format!(
            "voters {} (want {want:?}); head-{j} joined; a concurrent change refused first: \
             {refused_once:?}{}",
            got.as_ref()
                .map_or_else(|e| format!("{e:#}"), |v| format!("{v:?}")),
            if got.is_ok() {
                String::new()
            } else {
                format!(
                    "; the removal said {:?}; list-peers last said {last:?}",
                    String::from_utf8_lossy(&removal.stderr).trim()
                )
            }
        ),
    ));
    run.members = Some(want.clone());
    // The removed head returns (restarted or reconnected) and must not disrupt the group.
    let term_before = run
        .c
        .head_view(run.leader()?)
        .map(|v| v.1)
        .context("the leader's term")?;
    if kill {
        run.heal(&format!("restart head-{l}, no longer a member"));
        run.restart_heads(&[l])?;
    } else {
        run.heal(&format!("head-{l}, no longer a member, reconnected"));
        run.c.heal()?;
    }
    pause(Duration::from_secs(5))?;
    let leader_now = run.leader()?;
    let term_after = run.c.head_view(leader_now).map(|v| v.1).unwrap_or(u64::MAX);
    run.checks.push(Check::new(
        "removed-head-harmless",
        term_after == term_before && leader_now != l,
        format!(
            "the group's term {term_before} before head-{l} returned, {term_after} 5 s after; head-{leader_now} leads"
        ),
    ));
    run.until_end(started)
}

fn frequent_snapshots() -> NetOptions {
    NetOptions {
        head_args: vec![
            "--raft-snapshot-interval=50".into(),
            "--raft-logs-to-keep=20".into(),
        ],
        ..three_heads_one_node()
    }
}

/// Waits until every head of `which` has exited, or none more has for 3 s after the first
/// did (the rest, without a quorum, may never reach the point), or `timeout`; kills the
/// rest. Returns how many exited on their own.
fn wait_heads_exit(run: &mut Run, which: &[usize], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let done = which.iter().filter(|&&i| run.c.heads[i].exited()).count();
        if done != last {
            (last, last_change) = (done, Instant::now());
        }
        let settled = done > 0 && last_change.elapsed() > Duration::from_secs(3);
        if done == which.len() || settled || Instant::now() > deadline || super::interrupted() {
            for &i in which {
                run.c.heads[i].kill9();
            }
            return done;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn crash_at_failpoints(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start() / 2)?;
    let all: Vec<usize> = (0..run.c.heads.len()).collect();
    let mut fired = Vec::new();
    for fp in [
        "raft-log-flush-before",
        "raft-log-flush-after",
        "raft-apply-before-reply",
        "raft-snapshot-build-mid",
    ] {
        // Each head crashes the n-th time it reaches the point (n seeded, small), all
        // restarted at once with the point armed.
        let n = 1 + run.rng.below(if fp.starts_with("raft-snapshot") {
            2
        } else {
            20
        });
        let spec = format!("{fp}={n}*off->panic");
        run.fault(&format!("every head restarted with FAILPOINTS={spec}"));
        for &i in &all {
            run.killed.insert(run.c.heads[i].name.clone());
            run.c.set_env(i, "FAILPOINTS", Some(&spec));
        }
        run.c.relaunch_heads(&all)?;
        let crashed = wait_heads_exit(run, &all, Duration::from_secs(30));
        run.hist
            .event(format!("{crashed} of {} heads crashed at {fp}", all.len()));
        fired.push(format!("{fp}: {crashed}/{}", all.len()));
        for &i in &all {
            run.c.set_env(i, "FAILPOINTS", None);
        }
        run.heal("every head restarted without fail points");
        run.restart_heads(&all)?;
        run.leader()?;
        pause(Duration::from_millis(500))?;
    }
    // A follower that lags behind the purged log gets a snapshot, and crashes installing it.
    let l = run.leader()?;
    let f = (l + 1) % all.len();
    run.fault(&format!(
        "head-{f} (a follower) down while the log moves on"
    ));
    run.kill_head(f);
    let lead_index = |run: &Run| {
        workload::head_infos(&run.target)
            .get(l)
            .cloned()
            .flatten()
            .map(|i| i.last_log_index)
    };
    let from = lead_index(run).unwrap_or(0);
    crate::wait_for("the log 150 entries on", Duration::from_secs(60), || {
        (lead_index(run)? > from + 150).then_some(())
    })?;
    let spec = "raft-snapshot-install-mid=panic";
    run.fault(&format!("head-{f} restarted with FAILPOINTS={spec}"));
    run.c.set_env(f, "FAILPOINTS", Some(spec));
    run.c.relaunch_heads(&[f])?;
    let crashed = wait_heads_exit(run, &[f], Duration::from_secs(30));
    fired.push(format!("raft-snapshot-install-mid: {crashed}/1"));
    run.c.set_env(f, "FAILPOINTS", None);
    run.heal(&format!("head-{f} restarted without fail points"));
    run.restart_heads(&[f])?;
    let some_fired = !fired.iter().any(|f| f.contains(": 0/"));
    run.checks.push(Check::new(
        "fail-points-fired",
        some_fired,
        format!("heads crashed at each point: {}", fired.join(", ")),
    ));
    // Node-0 crashes after spawning a job's driver, before telling the head.
    let host = run.c.node_host(0);
    run.fault("node-0 restarted with FAILPOINTS=job-agent-start=panic");
    run.killed.insert(run.c.nodes[0].name.clone());
    run.c
        .set_env(host, "FAILPOINTS", Some("job-agent-start=panic"));
    run.c.restart_node(0)?;
    let crashed = crate::wait_for(
        "node-0 to crash at a job start",
        Duration::from_secs(30),
        || run.c.nodes[0].exited().then_some(()),
    );
    run.c.set_env(host, "FAILPOINTS", None);
    run.checks.push(Check::new(
        "job-start-crash-fired",
        crashed.is_ok(),
        match &crashed {
            Ok(()) => "node-0 crashed between spawning a driver and reporting it".to_string(),
            Err(e) => format!("{e:#}"),
        },
    ));
    run.heal("node-0 restarted without fail points");
    run.c.restart_node(0)?;
    run.killed.remove(&run.c.nodes[0].name);
    run.until_end(started)
}

/// `(status, body)` of one HTTP request with the cluster token.
fn http(
    run: &Run,
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let auth = format!("Bearer {}", run.c.token);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut r = match method {
        "GET" => agent.get(&url).header("authorization", &auth).call()?,
        "POST" => agent
            .post(&url)
            .header("authorization", &auth)
            .header("content-type", content_type)
            .send(&body[..])?,
        "PUT" => agent
            .put(&url)
            .header("authorization", &auth)
            .header("content-type", content_type)
            .send(&body[..])?,
        other => bail!("no method {other}"),
    };
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    Ok((status, text))
}

fn hostile_http(run: &mut Run) -> Result<()> {
    use crate::probe::{zip_archive, zip_bomb, zip_many_entries};
    let started = Instant::now();
    pause(run.random_start())?;
    let tag = run.target.tag.clone();
    let ip = run.c.hosts[run.c.head_host(0)].ip.clone();
    let port = run.c.heads[0].ready["dashboard_port"]
        .as_u64()
        .context("dashboard port")?;
    let api = format!("{ip}:{port}");
    let node_id = run.c.nodes[0].ready["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Where an escape would land: none of these may exist afterwards.
    let escapes = [
        std::env::temp_dir().join(format!("escape-{tag}")),
        std::env::temp_dir().join(format!("abs-{tag}")),
        run.c.path().join(format!("escape-{tag}")),
    ];
    run.fault("hostile HTTP requests, archives and CLI arguments");
    let pkg = "_ray_pkg_00112233445566778899aabbccddeeff.zip";
    let json = "application/json";
    let zip = "application/zip";
    let abs = format!("/tmp/abs-{tag}");
    let cases: Vec<(String, &str, String, &str, Vec<u8>)> = vec![
        (
            "unknown job".into(),
            "GET",
            "/api/jobs/no-such-job".into(),
            json,
            vec![],
        ),
        (
            "../ in a job id".into(),
            "GET",
            "/api/jobs/..%2F..%2Fetc%2Fpasswd".into(),
            json,
            vec![],
        ),
        (
            "unknown job's logs".into(),
            "GET",
            "/api/jobs/no-such-job/logs".into(),
            json,
            vec![],
        ),
        (
            "invalid JSON".into(),
            "POST",
            "/api/jobs/".into(),
            json,
            b"{not json".to_vec(),
        ),
        (
            "a number for the entrypoint".into(),
            "POST",
            "/api/jobs/".into(),
            json,
            br#"{"entrypoint": 5}"#.to_vec(),
        ),
        (
            "a lone surrogate in an env value".into(),
            "POST",
            "/api/jobs/".into(),
            json,
            br#"{"entrypoint": "true", "runtime_env": {"env_vars": {"A": "\ud800"}}}"#.to_vec(),
        ),
        (
            "a host path as working_dir".into(),
            "POST",
            "/api/jobs/".into(),
            json,
            br#"{"entrypoint": "true", "runtime_env": {"working_dir": "/etc"}}"#.to_vec(),
        ),
        (
            "an archive entry with ../".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[(&format!("../../escape-{tag}"), b"x")], &[]),
        ),
        (
            "an absolute archive entry".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[(&abs, b"x")], &[]),
        ),
        (
            "a link out".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[], &[("out", "../../../etc")]),
        ),
        (
            "a chain of links out".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[], &[("a", "b"), ("b", "c/.."), ("c", "../..")]),
        ),
        (
            "a file through a link out".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[(&format!("t/escape-{tag}"), b"x")], &[("t", "/tmp")]),
        ),
        (
            "a zip bomb by size".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_bomb(),
        ),
        (
            "a zip bomb by count".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_many_entries(100_001),
        ),
        (
            "not a zip".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            b"not a zip".to_vec(),
        ),
        (
            "an over-limit upload".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            vec![0u8; (protocol::package::DEFAULT_MAX_BYTES + 2) as usize],
        ),
        (
            "../ in a package name".into(),
            "PUT",
            "/api/packages/gcs/..%2F..%2Fx.zip".into(),
            zip,
            zip_archive(&[("a", b"x")], &[]),
        ),
        (
            "a log file outside the logs".into(),
            "GET",
            format!("/api/v0/logs/file?node_id={node_id}&filename=../../../../etc/passwd"),
            json,
            vec![],
        ),
        (
            "an absolute log file".into(),
            "GET",
            format!("/api/v0/logs/file?node_id={node_id}&filename=/etc/passwd"),
            json,
            vec![],
        ),
        (
            "an unknown State API resource".into(),
            "GET",
            "/api/v0/nonsense".into(),
            json,
            vec![],
        ),
    ];
    let mut bad = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for (what, method, path, ct, body) in cases {
        match http(run, &api, method, &path, ct, body) {
            Ok((code, text)) => {
                *statuses.entry(code).or_default() += 1;
                if !(400..500).contains(&code) || text.trim().is_empty() {
                    bad.push(format!(
                        "{what}: HTTP {code} {:?}",
                        text.chars().take(120).collect::<String>()
                    ));
                }
            }
            Err(e) => bad.push(format!("{what}: {e:#}")),
        }
    }
    // Nothing of the refused archives was stored.
    if let Ok((code, _)) = http(
        run,
        &api,
        "GET",
        &format!("/api/packages/gcs/{pkg}"),
        json,
        vec![],
    ) && code != 404
    {
        bad.push(format!(
            "a refused package is there after all (HTTP {code})"
        ));
    }
    run.checks.push(Check::new(
        "bad-http-refused-clearly",
        bad.is_empty(),
        if bad.is_empty() {
            format!("every bad request answered 4xx with a reason: {statuses:?}")
        } else {
            bad.join("; ")
        },
    ));
    // The CLI: clear errors and usage exit codes.
    let rayctl = |args: &[&std::ffi::OsStr]| -> Result<(i32, String)> {
        let out = std::process::Command::new(crate::rayctl_bin()?)
            .args(args)
            .env("RAYCTL_TMPDIR", run.c.path())
            .env(protocol::AUTH_TOKEN_ENV, &run.c.token)
            .env(protocol::ADDRESS_ENV, run.c.head_addrs.join(","))
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    use std::os::unix::ffi::OsStrExt;
    let os = |s: &str| std::ffi::OsStr::new(s).to_os_string();
    let mut cli_bad = Vec::new();
    for (what, args, want) in [
        (
            "invalid runtime_env JSON",
            vec![
                os("job"),
                os("submit"),
                os("--runtime-env-json"),
                os("{bad"),
                os("--"),
                os("true"),
            ],
            "runtime",
        ),
        (
            "a non-UTF-8 argument",
            vec![
                os("job"),
                os("submit"),
                os("--runtime-env-json"),
                std::ffi::OsStr::from_bytes(b"{\"env_vars\": {\"A\": \"\xff\"}}").to_os_string(),
                os("--"),
                os("true"),
            ],
            "UTF-8",
        ),
        (
            "../ as a job id",
            vec![os("job"), os("logs"), os("../../etc/passwd")],
            "",
        ),
    ] {
        let a: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_os_str()).collect();
        match rayctl(&a) {
            Ok((0, _)) => cli_bad.push(format!("{what}: exit 0")),
            Ok((code, err)) if !err.contains("error") || !err.contains(want) => {
                cli_bad.push(format!("{what}: exit {code}, {:?}", err.trim()))
            }
            Ok(_) => {}
            Err(e) => cli_bad.push(format!("{what}: {e:#}")),
        }
    }
    run.checks.push(Check::new(
        "bad-cli-input-refused",
        cli_bad.is_empty(),
        if cli_bad.is_empty() {
            "each refused with a named error and a non-zero exit".into()
        } else {
            cli_bad.join("; ")
        },
    ));
    run.heal("the hostile clients stop");
    let found: Vec<String> = escapes
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .chain(
            crate::files_below(run.c.path(), &|n: &str| {
                n.contains(&format!("escape-{tag}")) || n.contains(&format!("abs-{tag}"))
            })
            .into_iter()
            .map(|p| p.display().to_string()),
        )
        .collect();
    run.checks.push(Check::new(
        "nothing-written-outside",
        found.is_empty(),
        format!("files the archives tried to plant: {found:?}"),
    ));
    run.until_end(started)
}
