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

mod environment;
mod heads;
mod hostile;
mod workers;

use environment::*;
pub use heads::clean_freezers;
use heads::*;
use hostile::*;
use workers::*;

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
            name: "format-drift",
            about: "a follower's store as another build left it: an unknown format stamp, \
                    then a log entry of an unknown version; each refused by name at start, \
                    and the head rejoins once its store is put back",
            net: three_heads_one_node,
            load: light,
            fault: format_drift,
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

fn wall_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
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
