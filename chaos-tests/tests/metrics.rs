//! Every process's `/metrics` is scraped by a real Prometheus (Debian's `prometheus`
//! package; `.ci/run` installs it) and the control plane's series arrive.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::driver::Driver;
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
    let files = chaos_tests::files_below(c.path(), &|n| n == "prom_metrics_service_discovery.json");
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

    // Work of every kind, and an autoscaler config (its node types make its series), for
    // the dashboards' panels.
    c.apply_autoscaling(
        "max_workers: 1\navailable_node_types:\n  cpu1:\n    resources: {CPU: 1}\n    min_workers: 0\n    max_workers: 1\nprovider:\n  type: local\n",
    )?;
    let mut d = Driver::start(env!("CARGO_BIN_EXE_actor_driver"), &c, &["introspect"], &[])?;
    d.result(Duration::from_secs(120))?;
    c.submit_job(&[], "echo panel check")?;
    wait_for("tasks and jobs scraped", Duration::from_secs(60), || {
        let done = values(&query(port, "sum(ray_tasks{State=\"FINISHED\"})")?);
        let jobs = values(&query(port, "sum(rayctl_jobs{status=\"SUCCEEDED\"})")?);
        (done.first().is_some_and(|v| *v >= 5.0) && jobs.first().is_some_and(|v| *v >= 1.0))
            .then_some(())
    })?;
    // Two more scrapes for the rates.
    std::thread::sleep(Duration::from_secs(3));
    let unset = |e: &str| {
        ["$SessionName", "$Cluster", "$Instance", "$RayNodeType"]
            .iter()
            .fold(e.to_owned(), |e, v| e.replace(v, ".*"))
    };

    // Our Grafana dashboard: every query of every panel returns data.
    let ours: Value = serde_json::from_str(include_str!("../../deploy/grafana/rayctl.json"))?;
    let mut empty = Vec::new();
    let mut n = 0;
    for p in ours["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().context("targets")? {
            let e = unset(t["expr"].as_str().context("expr")?);
            n += 1;
            if query(port, &e).is_none_or(|r| r.is_empty()) {
                empty.push(format!("{}: {e}", p["title"]));
            }
        }
    }
    assert!(empty.is_empty(), "queries with no data: {empty:#?}");
    eprintln!(
        "rayctl.json: all {n} queries of {} panels return data",
        ours["panels"].as_array().map_or(0, Vec::len)
    );

    // Ray 2.60's default dashboard, from the file in its wheel: at least 90 % of the panels
    // that are not about GPUs or TPUs return data (a panel does when one of its queries
    // does; Ray's panels carry alternatives, e.g. host or cgroup memory).
    let venv = chaos_tests::ray_venv()?;
    let dump = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(RAY_PANELS_PY)
        .output()?;
    anyhow::ensure!(
        dump.status.success(),
        "reading Ray's panels: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let panels: Vec<Value> = serde_json::from_slice(&dump.stdout)?;
    let mut table = Vec::new();
    let (mut with_data, mut counted) = (0, 0);
    for p in &panels {
        let title = p["title"].as_str().unwrap_or_default();
        if ["GPU", "TPU", "GRAM"].iter().any(|g| title.contains(g)) {
            continue;
        }
        counted += 1;
        let data = p["exprs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|e| query(port, &unset(e)).is_some_and(|r| !r.is_empty()));
        with_data += usize::from(data);
        table.push(format!(
            "{} {:>3} {title}",
            if data { "data " } else { "EMPTY" },
            p["id"]
        ));
    }
    let share = with_data as f64 / counted.max(1) as f64;
    eprintln!(
        "Ray 2.60 default dashboard: {with_data} of {counted} non-GPU panels return data ({:.0} %)\n{}",
        share * 100.0,
        table.join("\n")
    );
    assert!(
        counted >= 20,
        "Ray's panel file changed shape: {counted} panels"
    );
    assert!(
        share >= 0.9,
        "only {with_data} of {counted}:\n{}",
        table.join("\n")
    );

    // `promtool check metrics` on every endpoint: nothing but what Ray's own names make it
    // say (camelCase label names such as SessionName and State, which Ray's dashboards
    // filter by, and the `_count` suffix of Ray's `ray_node_cpu_count`).
    let promtool = which("promtool").context("promtool (Debian's prometheus package)")?;
    let token = std::fs::read_to_string(c.token_path())?;
    let sd: Value = serde_json::from_str(
        &ureq::get(&format!("http://127.0.0.1:{dash}/api/prometheus/sd"))
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .call()?
            .body_mut()
            .read_to_string()?,
    )?;
    let targets: Vec<String> = sd
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    assert_eq!(targets.len(), 8, "{sd}");
    for t in &targets {
        let body = ureq::get(&format!("http://{t}/metrics"))
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .call()?
            .body_mut()
            .read_to_string()?;
        let mut p = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(p.stdin.as_mut().context("stdin")?, body.as_bytes())?;
        drop(p.stdin.take());
        let out = p.wait_with_output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let other: Vec<&str> = said
            .lines()
            .filter(|l| {
                !l.trim().is_empty()
                    && !l.contains("label names should be written in 'snake_case' not 'camelCase'")
                    && !l.starts_with("ray_node_cpu_count non-histogram and non-summary metrics should not have \"_count\" suffix")
            })
            .collect();
        assert!(other.is_empty(), "promtool on {t}: {other:#?}");
        assert!(
            body.contains("SessionName="),
            "{t} has no SessionName label"
        );
    }
    d.send_line("done")?;
    Ok(())
}

/// Prints Ray 2.60's default dashboard panels as JSON: id, title and the queries with the
/// global filters filled in, as Ray's dashboard factory does.
const RAY_PANELS_PY: &str = r#"
import json
from ray.dashboard.modules.metrics.dashboards import default_dashboard_panels as m
c = m.default_dashboard_config
panels = list(c.panels)
for r in c.rows:
    panels += r.panels
filters = ",".join(c.standard_global_filters)
print(json.dumps([
    {"id": p.id, "title": p.title,
     "exprs": [t.expr.format(global_filters=filters) for t in p.targets]}
    for p in panels
]))
"#;
