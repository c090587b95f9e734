//! Partitions between network namespaces (`chaos_tests::netns`): a cut-off leader grants
//! nothing, so no actor runs twice; failovers declare no healthy node dead; a cut-off
//! follower cannot depose the leader (pre-vote); a driver attaches to its own node.
//!
//! Runs as root (CI does) with `ip` and `nft`. `RAYCTL_PARTITION_RUNS` sets how many seeded
//! runs the actor scenario makes (default 5).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use chaos_tests::netns::{NetCluster, NetOptions};
use chaos_tests::wait_for;
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb;
use serde_json::Value;

fn actor_driver() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_actor_driver").into()
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A small seeded generator (xorshift), so each run can be replayed from its seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A driver process in a namespace, whose stdout lines are collected as they come.
struct NsDriver {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    err: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for NsDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NsDriver {
    fn start(c: &NetCluster, host: usize, args: &[&str]) -> Result<Self> {
        use std::io::BufRead;
        let mut child = c
            .exec(host, &actor_driver())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let err = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for (stream, sink) in [
            (
                Box::new(child.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>,
                lines.clone(),
            ),
            (
                Box::new(child.stderr.take().context("stderr")?),
                err.clone(),
            ),
        ] {
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(l);
                }
            });
        }
        Ok(Self { child, lines, err })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn result(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self
                .lines()
                .iter()
                .find_map(|l| l.strip_prefix("RESULT ").map(str::to_owned))
            {
                return Ok(serde_json::from_str(&r)?);
            }
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "driver exited ({st}): {:?}",
                    self.err.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no RESULT within {timeout:?}: {:?}",
                    self.err.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs an actor driver to its first RESULT in `host`'s namespace.
fn run_driver(c: &NetCluster, host: usize, args: &[&str]) -> Result<Value> {
    let mut d = NsDriver::start(c, host, args)?;
    d.result(Duration::from_secs(120))
}

fn actor(client: &HeadClient, rt: &tokio::runtime::Runtime, name: &str) -> Result<pb::ActorInfo> {
    let all = rt.block_on(
        client.call(|mut h| async move { h.list_actors(pb::ListActorsRequest::default()).await }),
    )?;
    all.actors
        .into_iter()
        .find(|a| a.name == name)
        .with_context(|| format!("no actor {name}"))
}

/// A client of the heads in `keep` only (the majority side of a partition).
fn side_client(c: &NetCluster, keep: &[usize]) -> HeadClient {
    let addrs: Vec<String> = keep.iter().map(|i| c.head_addrs[*i].clone()).collect();
    HeadClient::new(
        &addrs,
        protocol::auth::AuthToken::new(&c.token, "test").ok(),
        ClientOptions {
            deadline: Duration::from_secs(3),
            rpc_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .expect("addresses")
}

/// One run: the actor's worker node is cut off, with the leader (`with_leader`) or alone.
fn cut_off_actor_run(seed: u64, with_leader: bool) -> Result<()> {
    eprintln!("partition run: seed {seed}, leader cut off too: {with_leader}");
    let mut rng = Rng(seed | 1);
    let c = NetCluster::start(NetOptions {
        node_resources: vec![("slot".into(), 1.0)],
        ..Default::default()
    })?;
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let rt = rt();
    let _enter = rt.enter();
    let name = format!("counter-{seed}");
    run_driver(&c, 0, &["detached", &name])?;
    let a = actor(&c.client(), &rt, &name)?;
    let node_ids: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.ready["node_id"].as_str().unwrap_or_default().to_string())
        .collect();
    let w = node_ids
        .iter()
        .position(|id| *id == a.node_id)
        .context("the actor is on a worker node")?;
    let old_node = a.node_id.clone();
    let old_pid = a.pid;
    anyhow::ensure!(
        old_pid != 0 && chaos_tests::process_alive(old_pid as i32),
        "the actor's worker runs"
    );
    // The caller sits with the old copy, on the cut-off side.
    let mut caller = NsDriver::start(&c, c.node_host(w), &["caller", &name])?;
    caller.result(Duration::from_secs(60))?;
    wait_for("a first acknowledged call", Duration::from_secs(60), || {
        caller
            .lines()
            .iter()
            .any(|l| l.starts_with("ACK"))
            .then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(rng.below(1000)));

    let mut cut = vec![c.node_host(w)];
    if with_leader {
        cut.push(leader);
    }
    let rest: Vec<usize> = (0..c.hosts.len()).filter(|h| !cut.contains(h)).collect();
    let majority_heads: Vec<usize> = (0..c.heads.len()).filter(|h| !cut.contains(h)).collect();
    let cut_at = now_ms();
    c.partition(&cut, &rest)?;
    let majority = side_client(&c, &majority_heads);
    let (mut exited, mut restarted) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while restarted.is_none() && Instant::now() < deadline {
        if exited.is_none() && !chaos_tests::process_alive(old_pid as i32) {
            exited = Some(now_ms());
        }
        if let Ok(a) = actor(&majority, &rt, &name)
            && a.num_restarts >= 1
        {
            restarted = Some(now_ms());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let restarted = restarted.context("the majority never restarted the actor")?;
    let exited = exited.with_context(|| {
        format!(
            "the old copy (pid {old_pid}) still ran when the majority restarted the actor, {} ms after the cut",
            restarted - cut_at
        )
    })?;
    eprintln!(
        "cut at 0: old copy gone by {} ms, restart seen at {} ms",
        exited - cut_at,
        restarted - cut_at
    );
    assert!(
        exited + 100 < restarted,
        "the old copy must be gone before the restart: gone {} ms, restart {} ms after the cut",
        exited - cut_at,
        restarted - cut_at
    );

    std::thread::sleep(Duration::from_secs(1));
    c.heal()?;
    wait_for(
        "a call answered by the new copy",
        Duration::from_secs(60),
        || {
            caller
                .lines()
                .iter()
                .any(|l| l.starts_with("ACK") && !l.ends_with(&old_node))
                .then_some(())
        },
    )?;
    let _ = std::io::Write::write_all(caller.child.stdin.as_mut().context("stdin")?, b"stop\n");
    std::thread::sleep(Duration::from_millis(500));
    // Every acknowledgement: (sent, value, node).
    let acks: Vec<(u128, i64, String)> = caller
        .lines()
        .iter()
        .filter_map(|l| {
            let mut f = l.strip_prefix("ACK ")?.split_whitespace();
            let sent = f.next()?.parse().ok()?;
            let _recv = f.next()?;
            let value = f.next()?.parse().ok()?;
            Some((sent, value, f.next().unwrap_or_default().to_string()))
        })
        .collect();
    let late_old: Vec<_> = acks
        .iter()
        .filter(|(sent, _, node)| *node == old_node && *sent > restarted)
        .collect();
    assert!(
        late_old.is_empty(),
        "the old copy answered after the restart: {late_old:?}"
    );
    let new_vals: Vec<i64> = acks
        .iter()
        .filter(|(_, _, node)| *node != old_node)
        .map(|(_, v, _)| *v)
        .collect();
    assert!(!new_vals.is_empty());
    assert!(
        new_vals.windows(2).all(|w| w[0] < w[1]),
        "the new copy's acknowledged values only grow: {new_vals:?}"
    );
    // Nothing the new copy acknowledged is lost, and exactly one copy lives.
    let final_value = run_driver(&c, c.node_host(1 - w), &["value", &name])?["value"]
        .as_i64()
        .context("value")?;
    assert!(
        final_value >= *new_vals.last().unwrap_or(&0),
        "{final_value} < {new_vals:?}"
    );
    let now = actor(&c.client(), &rt, &name)?;
    assert_eq!(now.num_restarts, 1);
    assert_eq!(now.state, pb::ActorState::Alive as i32);
    assert_ne!(now.node_id, old_node);
    assert!(!chaos_tests::process_alive(old_pid as i32));
    Ok(())
}

#[test]
fn a_cut_off_leader_and_worker_serve_no_actor_call_after_the_restart() -> Result<()> {
    let runs: u64 = std::env::var("RAYCTL_PARTITION_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let base = now_ms() as u64;
    eprintln!("base seed {base}");
    for i in 0..runs {
        cut_off_actor_run(base.wrapping_add(i * 7919), true)?;
    }
    Ok(())
}

#[test]
fn a_cut_off_worker_with_the_leader_on_the_majority_side_changes_nothing() -> Result<()> {
    cut_off_actor_run(now_ms() as u64, false)
}

#[test]
fn a_cut_off_follower_returns_without_deposing_the_leader() -> Result<()> {
    let c = NetCluster::start(NetOptions {
        nodes: 0,
        ..Default::default()
    })?;
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let (_, term) = c.head_view(leader).context("leader view")?;
    let follower = (leader + 1) % 3;
    let rest: Vec<usize> = (0..3).filter(|h| *h != follower).collect();
    c.partition(&[follower], &rest)?;
    let until = Instant::now() + Duration::from_secs(15);
    let mut highest = 0;
    while Instant::now() < until {
        if let Some((_, t)) = c.head_view(follower) {
            highest = highest.max(t);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("the cut-off follower's term: {term} before, at most {highest} while cut off");
    assert!(
        highest <= term,
        "the cut-off follower raised its term: {term} → {highest}"
    );
    c.heal()?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.wait_leader(Duration::from_secs(10))?,
        leader,
        "the leader kept leading"
    );
    let (role, after) = c.head_view(leader).context("leader view")?;
    assert_eq!(
        (role.as_str(), after),
        ("leader", term),
        "the leader kept its term"
    );
    let (_, f) = c.head_view(follower).context("follower view")?;
    assert_eq!(f, term, "the follower rejoined at the leader's term");
    Ok(())
}

#[test]
fn failovers_declare_no_healthy_node_dead() -> Result<()> {
    let c = NetCluster::start(NetOptions::default())?;
    let incarnations = |c: &NetCluster| -> Result<HashMap<String, (String, u64)>> {
        let s = c.status(None)?;
        Ok(s["nodes"]
            .as_array()
            .context("nodes")?
            .iter()
            .map(|n| {
                (
                    n["node_id"].as_str().unwrap_or_default().to_string(),
                    (
                        n["state"].as_str().unwrap_or_default().to_string(),
                        n["incarnation"].as_u64().unwrap_or(0),
                    ),
                )
            })
            .collect())
    };
    let head_node = |i: usize| {
        c.heads[i].ready["node"]["node_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let mut leader = c.wait_leader(Duration::from_secs(30))?;
    wait_for("5 live nodes", Duration::from_secs(30), || {
        let m = incarnations(&c).ok()?;
        (m.len() == 5 && m.values().all(|(s, _)| s == "ALIVE")).then_some(())
    })?;
    for round in 0..10 {
        let before = incarnations(&c)?;
        let rest: Vec<usize> = (0..c.hosts.len()).filter(|h| *h != leader).collect();
        c.partition(&[leader], &rest)?;
        let new = wait_for("a new leader", Duration::from_secs(30), || {
            c.wait_leader(Duration::from_secs(2))
                .ok()
                .filter(|l| *l != leader)
        })?;
        // Past one whole node timeout (2.5 s) after the takeover, and then some.
        std::thread::sleep(Duration::from_millis(3500));
        let after = incarnations(&c)?;
        for (id, (state, inc)) in &before {
            if *id == head_node(leader) {
                continue; // cut off with its head: its death is real
            }
            let (s2, i2) = after.get(id).with_context(|| format!("node {id}"))?;
            assert_eq!(
                (s2.as_str(), *i2),
                (state.as_str(), *inc),
                "failover {round}: healthy node {id} was declared dead or re-registered"
            );
        }
        c.heal()?;
        wait_for(
            "the cut-off head's node back",
            Duration::from_secs(30),
            || {
                let m = incarnations(&c).ok()?;
                (m.values().filter(|(s, _)| s == "ALIVE").count() == 5).then_some(())
            },
        )?;
        leader = new;
    }
    Ok(())
}

#[test]
fn a_driver_attaches_to_its_own_node_not_to_a_visible_socket() -> Result<()> {
    let c = NetCluster::start(NetOptions {
        heads: 1,
        nodes: 2,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    for i in 0..2 {
        let out = c
            .exec(
                c.node_host(i),
                std::path::Path::new(env!("CARGO_BIN_EXE_sdk_driver")),
            )
            .arg("mode")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let r: Value = text
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .and_then(|r| serde_json::from_str(r).ok())
            .with_context(|| format!("{text} {}", String::from_utf8_lossy(&out.stderr)))?;
        assert_eq!(r["mode"], "Local", "{r}");
        assert_eq!(
            r["node"], c.nodes[i].ready["node_id"],
            "driver in node {i}'s namespace"
        );
    }
    Ok(())
}
