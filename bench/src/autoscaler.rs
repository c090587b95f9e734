//! Autoscaler figures. On a one-head cluster with no CPUs of its own and the local provider:
//! `autoscale_up_s` (a job that needs two CPUs is submitted → RUNNING on a node launched for
//! it), `autoscale_down_s` (the node's idle timeout is reached → the node is DEAD, minus the
//! timeout). Baseline in the same run: `node_start_s`, one `rayctl start --address` to a
//! registered node by hand, the physical floor of a scale-up. And the pure planner:
//! `autoscaler_plan_ms` for 1,000 nodes, 10,000 demand shapes and 5 node types.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use scheduler::ResourceSet;
use scheduler::autoscale::{self, Demand, GroupStrategy, Input, Node, NodeType};
use serde_json::Value;

use crate::{emit, percentile};

const IDLE_S: f64 = 2.0;

fn config() -> String {
    format!(
        r#"
max_workers: 1
available_node_types:
  cpu2:
    resources: {{CPU: 2}}
    max_workers: 1
    idle_timeout_s: {IDLE_S}
provider:
  type: local
"#
    )
}

fn cpu2_nodes(s: &Value, state: &str) -> usize {
    Cluster::nodes_in_state(s, state)
        .iter()
        .filter(|n| n["labels"]["rayctl.io/node-type"] == "cpu2")
        .count()
}

fn job_status(c: &Cluster, id: &str) -> Option<String> {
    let (code, out, _) = c
        .rayctl(&[
            "job",
            "status",
            id,
            "-o",
            "json",
            "--address",
            &c.head_addrs.join(","),
        ])
        .ok()?;
    if code != 0 {
        return None;
    }
    let v: Value = serde_json::from_str(&out).ok()?;
    v["status"].as_str().map(str::to_owned)
}

/// One scale-up and scale-down; (up seconds, down seconds past the idle timeout).
fn cycle(c: &Cluster, round: usize) -> Result<(f64, f64)> {
    let dead_before = cpu2_nodes(&c.status(None)?, "DEAD");
    let t0 = Instant::now();
    let id = c.submit_job(&["--entrypoint-num-cpus", "2"], "sleep 1")?;
    wait_for(
        "the job running on a new node",
        Duration::from_secs(120),
        || matches!(job_status(c, &id).as_deref(), Some("RUNNING" | "SUCCEEDED")).then_some(()),
    )?;
    let up = t0.elapsed().as_secs_f64();
    wait_for("the job done", Duration::from_secs(60), || {
        (job_status(c, &id).as_deref() == Some("SUCCEEDED")).then_some(())
    })?;
    let ended = Instant::now();
    wait_for("the node removed", Duration::from_secs(120), || {
        let s = c.status(None).ok()?;
        (cpu2_nodes(&s, "DEAD") > dead_before && cpu2_nodes(&s, "ALIVE") == 0).then_some(())
    })
    .with_context(|| format!("round {round}"))?;
    let down = ended.elapsed().as_secs_f64() - IDLE_S;
    Ok((up, down))
}

/// `rayctl start --address` to a ready node, by hand: the floor of any scale-up here.
fn node_start(c: &Cluster) -> Result<f64> {
    let dir = c.path().join("by-hand");
    let t0 = Instant::now();
    let mut cmd = std::process::Command::new(chaos_tests::rayctl_bin()?);
    c.client_env(&mut cmd).args([
        "start",
        &format!("--address={}", c.head_addrs.join(",")),
        "--num-cpus=1",
        &format!("--data-dir={}", dir.display()),
    ]);
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("rayctl start: {}", String::from_utf8_lossy(&out.stderr));
    }
    let took = t0.elapsed().as_secs_f64();
    // And it goes: the operator's drain.
    let s = c.status(None)?;
    let id = Cluster::nodes_in_state(&s, "ALIVE")
        .into_iter()
        .find(|n| n["is_head"] == false && n["labels"].get("rayctl.io/node-type").is_none())
        .and_then(|n| n["node_id"].as_str().map(str::to_owned))
        .context("the node started by hand")?;
    wait_for(
        "the hand-started node idle",
        Duration::from_secs(30),
        || {
            let (code, _, _) = c
                .rayctl(&["drain-node", &id, "--address", &c.head_addrs.join(",")])
                .ok()?;
            (code == 0).then_some(())
        },
    )?;
    Ok(took)
}

fn rs(cpu: f64, gpu: f64, mem: f64) -> ResourceSet {
    let mut m = vec![("CPU", cpu), ("memory", mem)];
    if gpu > 0.0 {
        m.push(("GPU", gpu));
    }
    ResourceSet::from_map(m).unwrap_or_default()
}

/// 1,000 nodes of 5 types, 10,000 demand shapes (tasks, actors, groups), a floor.
fn plan_input() -> Input {
    let types: Vec<NodeType> = [(2.0, 0.0), (4.0, 0.0), (8.0, 0.0), (16.0, 0.0), (8.0, 1.0)]
        .iter()
        .enumerate()
        .map(|(i, (c, g))| NodeType {
            name: format!("t{i}"),
            resources: rs(*c, *g, c * 4e9),
            min_workers: 0,
            max_workers: 1000,
            idle_timeout_ms: 60_000,
            paused: false,
        })
        .collect();
    let mut seed = 12345u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let nodes: Vec<Node> = (0..1000)
        .map(|i| {
            let t = &types[i % types.len()];
            let used = (next() % 3) as f64;
            let cpu = t.resources.get("CPU");
            Node {
                id: format!("n{i:04}"),
                node_type: t.name.clone(),
                total: t.resources.clone(),
                available: rs((cpu - used).max(0.0), t.resources.get("GPU"), cpu * 4e9),
                idle_ms: (used == 0.0).then_some(next() % 120_000),
            }
        })
        .collect();
    let demand: Vec<Demand> = (0..10_000)
        .map(|i| match i % 10 {
            9 => Demand::Group {
                bundles: vec![rs(1.0, 0.0, 1e9); 1 + (next() % 4) as usize],
                strategy: if next() % 2 == 0 {
                    GroupStrategy::StrictSpread
                } else {
                    GroupStrategy::Any
                },
            },
            _ => Demand::Shape {
                shape: rs(
                    [0.5, 1.0, 2.0, 4.0][(next() % 4) as usize],
                    if next() % 50 == 0 { 1.0 } else { 0.0 },
                    1e9,
                ),
                count: 1,
            },
        })
        .collect();
    Input {
        types,
        max_workers: 5000,
        upscaling_speed: 1.0,
        fixed: vec![(rs(4.0, 0.0, 8e9), rs(0.0, 0.0, 8e9))],
        nodes,
        launching: BTreeMap::from([("t1".to_owned(), 20)]),
        demand,
        floor: vec![rs(1.0, 0.0, 0.0); 100],
    }
}

pub(crate) fn run(smoke: bool) -> Result<()> {
    // The pure planner first (no processes).
    let input = plan_input();
    let n = if smoke { 3 } else { 20 };
    let mut ms = Vec::with_capacity(n);
    let mut launched = 0;
    for _ in 0..n {
        let t = Instant::now();
        let p = autoscale::plan(&input);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        launched = p.launch.values().sum::<u32>();
    }
    ms.sort_by(f64::total_cmp);
    emit("autoscaler_plan_ms", percentile(&ms, 0.5), "ms");
    emit("autoscaler_plan_launches", f64::from(launched), "nodes");

    let c = Cluster::start(ClusterOptions {
        heads: 1,
        head_cpus: 0.0,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    c.apply_autoscaling(&config())?;
    emit("node_start_s", node_start(&c)?, "s");
    let rounds = if smoke { 1 } else { 3 };
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let (u, d) = cycle(&c, r)?;
        ups.push(u);
        downs.push(d);
    }
    ups.sort_by(f64::total_cmp);
    downs.sort_by(f64::total_cmp);
    emit("autoscale_up_s", percentile(&ups, 0.5), "s");
    emit("autoscale_down_s", percentile(&downs, 0.5), "s");
    Ok(())
}
