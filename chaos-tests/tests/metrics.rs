//! Every process's `/metrics` is scraped by a real Prometheus (Debian's `prometheus`
//! package; `.ci/run` installs it) and the control plane's series arrive.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::{Cluster, ClusterOptions, free_port, wait_for};
use serde_json::Value;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(port: u16, q: &str) -> Option<Vec<Value>> {
    let url = format!("http://127.0.0.1:{port}/api/v1/query");
    let mut resp = ureq::get(&url).query("query", q).call().ok()?;
    let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()?;
    body["data"]["result"].as_array().cloned()
}

fn values(results: &[Value]) -> Vec<f64> {
    results
        .iter()
        .filter_map(|r| r["value"][1].as_str()?.parse().ok())
        .collect()
}

#[test]
fn prometheus_scrapes_heads_and_nodes() -> Result<()> {
    let bin = which("prometheus").context(
        "the `prometheus` binary is required (apt-get install prometheus; .ci/run does)",
    )?;
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let head = &c.heads[0].ready;
    let targets = [
        format!("127.0.0.1:{}", head["dashboard_port"]),
        format!("127.0.0.1:{}", head["node"]["metrics_export_port"]),
        format!("127.0.0.1:{}", c.nodes[0].ready["metrics_export_port"]),
    ];
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: rayctl\n    authorization:\n      type: Bearer\n      credentials_file: {}\n    static_configs:\n      - targets: [{}]\n",
        c.token_path().display(),
        targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cfg_path = c.path().join("prometheus.yml");
    std::fs::write(&cfg_path, cfg)?;
    let port = free_port();
    let log = std::fs::File::create(c.path().join("prometheus.log"))?;
    let _prom = KillOnDrop(
        Command::new(bin)
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                c.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    wait_for("all 3 targets up", Duration::from_secs(60), || {
        let up = values(&query(port, "up")?);
        (up.len() == 3 && up.iter().all(|v| *v == 1.0)).then_some(())
    })?;
    wait_for("the leader's series", Duration::from_secs(30), || {
        let leader = values(&query(port, "rayctl_raft_is_leader")?);
        let term = values(&query(port, "rayctl_raft_term")?);
        let applied = values(&query(port, "rayctl_raft_applied_index")?);
        let alive = values(&query(port, "rayctl_nodes{state=\"ALIVE\"}")?);
        (leader == [1.0]
            && term.first().is_some_and(|t| *t >= 1.0)
            && applied.first().is_some_and(|a| *a >= 1.0)
            && alive == [2.0])
        .then_some(())
    })?;
    wait_for("node and rpc series", Duration::from_secs(30), || {
        let hb = values(&query(
            port,
            "sum(rayctl_node_heartbeats_total{result=\"ok\"})",
        )?);
        let rpc = query(
            port,
            "rayctl_rpc_latency_seconds_count{method=\"Heartbeat\"}",
        )?;
        let append = values(&query(port, "rayctl_raft_append_latency_seconds_count")?);
        (hb.first().is_some_and(|v| *v >= 1.0)
            && !rpc.is_empty()
            && append.first().is_some_and(|v| *v >= 1.0))
        .then_some(())
    })?;
    wait_for(
        "object store series from both nodes",
        Duration::from_secs(30),
        || {
            let cap = values(&query(port, "rayctl_object_store_capacity_bytes")?);
            let shm = query(port, "ray_object_store_memory{Location=\"MMAP_SHM\"}")?;
            (cap.len() == 2 && cap.iter().all(|v| *v > 0.0) && shm.len() == 2).then_some(())
        },
    )?;
    wait_for("the job manager's series", Duration::from_secs(30), || {
        let pending = query(port, "rayctl_jobs{status=\"PENDING\"}")?;
        (!pending.is_empty()).then_some(())
    })?;

    // Tasks: a driver on the head's node runs tasks that need node 0's resource (a spillback).
    let out = c
        .client_env(&mut Command::new(env!("CARGO_BIN_EXE_sdk_driver")))
        .args(["resource", "node0"])
        .env("RAYCTL_ADDRESS", c.head_addrs.join(","))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = std::cell::RefCell::new(String::new());
    wait_for("task, worker and lease series", Duration::from_secs(60), || {
        let finished = values(&query(port, "sum(ray_tasks{State=\"FINISHED\"})")?);
        let executed = values(&query(port, "sum(rayctl_tasks_executed_total)")?);
        let workers = query(port, "rayctl_workers{state=\"idle\"}")?;
        let spill = values(&query(port, "sum(rayctl_lease_spillbacks_total)")?);
        let grants = values(&query(port, "sum(rayctl_lease_grant_seconds_count)")?);
        let at_least = |v: &[f64], n: f64| v.first().is_some_and(|x| *x >= n);
        *last.borrow_mut() = format!("finished {finished:?} executed {executed:?} idle workers {} spillbacks {spill:?} grants {grants:?}", workers.len());
        (at_least(&finished, 1.0) && at_least(&executed, 1.0) && workers.len() == 2 && at_least(&spill, 1.0) && at_least(&grants, 1.0))
            .then_some(())
    })
    .with_context(|| last.borrow().clone())?;

    // Actors and placement groups: a driver makes both and exits; its two actors (not
    // detached; one never placed) die and its two groups (one never placed) are removed
    // with it.
    let out = c
        .client_env(&mut Command::new(env!("CARGO_BIN_EXE_actor_driver")))
        .arg("introspect")
        .env("RAYCTL_ADDRESS", c.head_addrs.join(","))
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "actor driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "actor and placement-group series",
        Duration::from_secs(60),
        || {
            let dead = values(&query(port, "ray_actors{State=\"DEAD\"}")?);
            let removed = values(&query(port, "ray_placement_groups{State=\"REMOVED\"}")?);
            let restarts = query(port, "rayctl_actor_restarts")?;
            *last.borrow_mut() = format!(
                "dead actors {dead:?}, removed groups {removed:?}, restarts series {}",
                restarts.len()
            );
            (dead == [2.0] && removed == [2.0] && restarts.len() == 1).then_some(())
        },
    )
    .with_context(|| last.borrow().clone())?;
    Ok(())
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Prometheus configured with nothing but the heads' service discovery finds every head and
/// node, and a node that joins later, with no config change; each head's session also has
/// Ray's discovery file.
#[test]
fn prometheus_finds_every_head_and_node_through_service_discovery() -> Result<()> {
    let bin = which("prometheus").context(
        "the `prometheus` binary is required (apt-get install prometheus; .ci/run does)",
    )?;
    let c = Cluster::start(ClusterOptions {
        heads: 3,
        nodes: 1,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(60))?;
    // A follower's endpoint: its list is the leader's.
    let dash = &c.heads[1].ready["dashboard_port"];
    let cfg = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rayctl\n    authorization:\n      type: Bearer\n      credentials_file: {token}\n    http_sd_configs:\n      - url: http://127.0.0.1:{dash}/api/prometheus/sd\n        refresh_interval: 1s\n        authorization:\n          type: Bearer\n          credentials_file: {token}\n",
        token = c.token_path().display(),
    );
    let cfg_path = c.path().join("prometheus-sd.yml");
    std::fs::write(&cfg_path, cfg)?;
    let port = free_port();
    let log = std::fs::File::create(c.path().join("prometheus-sd.log"))?;
    let _prom = KillOnDrop(
        Command::new(bin)
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                c.path().join("tsdb-sd").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    // 3 heads, their 3 node daemons, 1 worker node.
    wait_for("7 targets up", Duration::from_secs(90), || {
        let up = values(&query(port, "up{job=\"ray\"}")?);
        (up.len() == 7 && up.iter().all(|v| *v == 1.0)).then_some(())
    })
    .with_context(|| {
        std::fs::read_to_string(c.path().join("prometheus-sd.log")).unwrap_or_default()
    })?;
    // A node started later is found without touching the config.
    let (code, _, err) = c.rayctl(&[
        "start",
        "--address",
        &c.head_addrs.join(","),
        "--num-cpus",
        "1",
        "--data-dir",
        c.path().join("late-node").to_str().context("path")?,
    ])?;
    assert_eq!(code, 0, "{err}");
    wait_for("the late node scraped", Duration::from_secs(90), || {
        let up = values(&query(port, "up{job=\"ray\"}")?);
        (up.len() == 8 && up.iter().all(|v| *v == 1.0)).then_some(())
    })?;
    // Ray's file, in each head's session, lists the same targets.
    let files = find_files(c.path(), "prom_metrics_service_discovery.json");
    assert!(files.len() >= 3, "one per head: {files:?}");
    let listed = wait_for("the file lists 8 targets", Duration::from_secs(30), || {
        let v: Value = serde_json::from_slice(&std::fs::read(&files[0]).ok()?).ok()?;
        let t = v[0]["targets"].as_array()?.len();
        (t == 8 && v[0]["labels"]["job"] == "ray").then_some(v)
    })?;
    assert!(listed[0]["targets"].as_array().is_some_and(|t| {
        t.iter()
            .all(|x| x.as_str().is_some_and(|s| s.starts_with("127.0.0.1:")))
    }));
    Ok(())
}

fn find_files(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_files(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}
