//! The autoscaler end to end over real processes: heads with no CPUs of their own, an
//! autoscaling config with the local provider (node processes on this machine, started by
//! the leader), and drivers built with the SDK whose tasks, groups and resource requests are
//! the demand. The command and kubernetes providers run against stand-ins (`fake_cloud`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chaos_tests::driver::Driver;
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use serde_json::Value;

fn driver_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sdk_driver")
}

fn fake_cloud() -> &'static str {
    env!("CARGO_BIN_EXE_fake_cloud")
}

/// A cluster of `heads` heads with 0 CPUs each, whose autoscaler uses `config`.
fn cluster(heads: usize, config: &str) -> Result<Cluster> {
    let c = Cluster::start(ClusterOptions {
        heads,
        head_cpus: 0.0,
        ..Default::default()
    })?;
    c.apply_autoscaling(config)?;
    Ok(c)
}

const CPU2: &str = r#"
max_workers: 10
available_node_types:
  cpu2:
    resources: {CPU: 2}
    max_workers: 3
    idle_timeout_s: 5
provider:
  type: local
"#;

fn instances(s: &Value) -> Vec<Value> {
    s["autoscaler"]["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The provider ids the records are tied to.
fn cloud_ids(records: &[Value]) -> BTreeSet<&str> {
    records
        .iter()
        .filter_map(|i| i["cloud_instance_id"].as_str())
        .collect()
}

/// Worker nodes of a type, alive.
fn alive_of(s: &Value, t: &str) -> Vec<Value> {
    Cluster::nodes_in_state(s, "ALIVE")
        .into_iter()
        .filter(|n| n["labels"]["rayctl.io/node-type"] == t)
        .collect()
}

fn dead_of(s: &Value, t: &str) -> Vec<Value> {
    Cluster::nodes_in_state(s, "DEAD")
        .into_iter()
        .filter(|n| n["labels"]["rayctl.io/node-type"] == t)
        .collect()
}

/// Waits until every launched node is gone: DEAD with the autoscaler's reason, and every
/// record final (TERMINATED, or ALLOCATION_FAILED for launches that failed).
fn wait_all_removed(c: &Cluster, t: &str, timeout: Duration) -> Result<Value> {
    let mut last = Value::Null;
    wait_for("the idle nodes removed", timeout, || {
        let s = c.status(None).ok()?;
        let done = alive_of(&s, t).is_empty()
            && instances(&s)
                .iter()
                .all(|i| i["state"] == "TERMINATED" || i["state"] == "ALLOCATION_FAILED");
        if done {
            return Some(s);
        }
        last = s;
        None
    })
    .with_context(|| format!("last status: {last}"))
}

#[test]
fn tasks_jobs_and_infeasible_shapes_scale_the_cluster_up_then_idle_nodes_leave() -> Result<()> {
    let c = cluster(1, CPU2)?;
    // Six one-CPU tasks of 2 s: nodes of 2 CPUs are launched, never more than three.
    let mut d = Driver::start(driver_bin(), &c, &["burst", "6", "2000", "1"], &[])?;
    let mut most = 0;
    let t0 = Instant::now();
    let r = loop {
        if let Ok(s) = c.status(None) {
            most = most.max(alive_of(&s, "cpu2").len());
            assert!(
                instances(&s).len() <= 3,
                "launched more than max_workers: {s}"
            );
        }
        if let Ok(r) = d.result(Duration::from_millis(300)) {
            break r;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the burst did not finish: {}", d.output());
        }
    };
    assert_eq!(r["failed"], Value::Array(vec![]), "no task failed: {r}");
    let nodes: BTreeSet<&str> = r["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(r["nodes"].as_array().map(Vec::len), Some(6));
    assert!(
        (1..=3).contains(&nodes.len()) && most <= 3,
        "{nodes:?}, at most {most} alive"
    );
    d.finish(Duration::from_secs(30))?;

    // A job that needs two CPUs runs on a launched node.
    let (code, out, err) = c.rayctl(&[
        "job",
        "submit",
        "--entrypoint-num-cpus",
        "2",
        "--address",
        &c.head_addrs.join(","),
        "--",
        "echo ran on $RAYCTL_NODE_ID",
    ])?;
    // Exit code 0: SUCCEEDED.
    assert_eq!(code, 0, "job: {out} {err}");
    assert!(out.contains("ran on "), "{out} {err}");

    // A shape no type can hold: nothing is launched for it, and status says so.
    let before = instances(&c.status(None)?).len();
    let mut inf = Driver::start(driver_bin(), &c, &["infeasible"], &[])?;
    inf.result(Duration::from_secs(30))?;
    let s = wait_for(
        "the infeasible shape reported",
        Duration::from_secs(30),
        || {
            let s = c.status(None).ok()?;
            let inf = s["autoscaler"]["infeasible"].as_array()?;
            inf.iter()
                .any(|d| d["shape"]["unobtainium"] == 1.0)
                .then_some(s)
        },
    )?;
    let (_, text, _) = c.rayctl(&["status", "--address", &c.head_addrs.join(",")])?;
    assert!(
        text.contains("'unobtainium': 1") && text.contains("infeasible"),
        "{text}"
    );
    // Only launches for the job and tasks, none for the infeasible shape.
    assert!(instances(&s).len() <= before + 1, "{s}");
    drop(inf);

    // Idle for 5 s: every launched node is drained and removed, shown DEAD with the reason.
    let s = wait_all_removed(&c, "cpu2", Duration::from_secs(90))?;
    let dead = dead_of(&s, "cpu2");
    assert!(!dead.is_empty());
    for n in &dead {
        assert_eq!(n["death_reason"], "removed by autoscaler: idle", "{n}");
    }
    // The records prove each went through Ray's states.
    for i in instances(&s) {
        assert!(
            !i["cloud_instance_id"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{i}"
        );
    }
    let (_, text, _) = c.rayctl(&["status", "--address", &c.head_addrs.join(",")])?;
    assert!(
        text.contains("Autoscaler status") && text.contains("removed by autoscaler: idle"),
        "{text}"
    );
    // Ray's metric names, on the leader.
    let port = s["heads"][0]["ports"]["dashboard_port"]
        .as_u64()
        .context("port")?;
    let started = c
        .metric(port, "autoscaler_started_nodes_total{NodeType=\"cpu2\"}")
        .context("autoscaler_started_nodes_total")?;
    assert!(started >= 1.0, "{started}");
    let stopped = c
        .metric(port, "autoscaler_stopped_nodes_total{NodeType=\"cpu2\"}")
        .context("autoscaler_stopped_nodes_total")?;
    assert_eq!(started, stopped);
    assert_eq!(
        c.metric(port, "autoscaler_active_nodes{NodeType=\"cpu2\"}"),
        Some(0.0)
    );
    Ok(())
}

#[test]
fn groups_floors_and_min_workers_set_the_number_of_nodes() -> Result<()> {
    let c = cluster(1, CPU2)?;
    // A STRICT_SPREAD group of three bundles needs three nodes.
    let mut d = Driver::start(driver_bin(), &c, &["pg_spread", "3"], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    let nodes: BTreeSet<&str> = r["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(nodes.len(), 3, "{r}");
    d.send_line("remove")?;
    d.result(Duration::from_secs(30))?;
    d.finish(Duration::from_secs(30))?;
    wait_all_removed(&c, "cpu2", Duration::from_secs(90))?;

    // request_resources(num_cpus=6): three nodes of two CPUs, though nothing runs.
    let mut d = Driver::start(driver_bin(), &c, &["request_resources", "6"], &[])?;
    d.result(Duration::from_secs(30))?;
    let s = wait_for("three nodes for the floor", Duration::from_secs(90), || {
        let s = c.status(None).ok()?;
        (alive_of(&s, "cpu2").len() == 3).then_some(s)
    })?;
    assert_eq!(
        s["autoscaler"]["constraints"].as_array().map(Vec::len),
        Some(6)
    );
    let (_, text, _) = c.rayctl(&["status", "--address", &c.head_addrs.join(",")])?;
    assert!(
        text.contains("{'CPU': 1}: 6 from request_resources()"),
        "{text}"
    );
    // They stay past the idle timeout while the floor holds.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(alive_of(&c.status(None)?, "cpu2").len(), 3);
    // Cleared: back to min_workers (0).
    d.send_line("clear")?;
    d.result(Duration::from_secs(30))?;
    d.finish(Duration::from_secs(30))?;
    wait_all_removed(&c, "cpu2", Duration::from_secs(90))?;

    // min_workers: 1 keeps one idle node.
    c.apply_autoscaling(&CPU2.replace("max_workers: 3", "max_workers: 3\n    min_workers: 1"))?;
    wait_for("one node for min_workers", Duration::from_secs(60), || {
        let s = c.status(None).ok()?;
        (alive_of(&s, "cpu2").len() == 1).then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(8));
    let s = c.status(None)?;
    let alive = alive_of(&s, "cpu2");
    assert_eq!(alive.len(), 1, "{s}");
    assert!(
        alive[0]["idle_ms"].as_u64().unwrap_or(0) >= 5_000,
        "idle and kept: {}",
        alive[0]
    );
    // The config reads back as applied.
    let (code, out, _) =
        c.rayctl(&["autoscaler", "config", "--address", &c.head_addrs.join(",")])?;
    assert_eq!(code, 0);
    let cfg: Value = serde_json::from_str(&out)?;
    assert_eq!(cfg["available_node_types"]["cpu2"]["min_workers"], 1);
    Ok(())
}

/// The primary copies of objects (1 MiB or more: larger than inline values), as
/// (object id, node id) pairs, from `rayctl list objects`.
fn primary_copies(c: &Cluster) -> Result<Vec<(String, String)>> {
    let (code, out, err) = c.rayctl(&[
        "list",
        "objects",
        "-o",
        "json",
        "--address",
        &c.head_addrs.join(","),
    ])?;
    if code != 0 {
        bail!("rayctl list objects exited {code}: {err}");
    }
    let rows: Vec<Value> = serde_json::from_str(&out).with_context(|| out.clone())?;
    Ok(rows
        .iter()
        .filter(|o| o["copy"] == "PRIMARY" && o["size"].as_u64().is_some_and(|s| s >= 1 << 20))
        .filter_map(|o| {
            Some((
                o["object_id"].as_str()?.to_owned(),
                o["node_id"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

fn node_of(s: &Value, id: &str) -> Option<Value> {
    s["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node_id"] == id)
        .cloned()
}

/// One worker node at a time (so the driver's two tasks share it), 2 s idle timeout.
const ONE_CPU2: &str = r#"
max_workers: 10
available_node_types:
  cpu2:
    resources: {CPU: 2}
    max_workers: 1
    idle_timeout_s: 2
provider:
  type: local
"#;

#[test]
fn busy_nodes_stay_and_a_node_holding_a_referenced_object_leaves_after_moving_it() -> Result<()> {
    let c = cluster(1, ONE_CPU2)?;
    // A 12 s task on a node whose idle timeout is 2 s: the node stays and the task succeeds.
    let r = chaos_tests::driver::run(driver_bin(), &c, &["burst", "1", "12000", "2"], &[])?;
    assert_eq!(r["failed"], Value::Array(vec![]), "{r}");
    let s = c.status(None)?;
    assert!(
        dead_of(&s, "cpu2").is_empty(),
        "no node left while it ran: {s}"
    );

    // A 1 MiB object made on a launched node, its only copy, and still referenced: once the
    // node is idle the autoscaler drains it, the drain moves the copy to the head's node and
    // tells the driver (its owner), and only then does the node leave. The driver is remote,
    // so it reads the object from where its owner table says it is.
    let mut d = Driver::start(
        driver_bin(),
        &c,
        &["hold_object"],
        &[("RAYCTL_REMOTE", "1")],
    )?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["made"], 1, "{r}");
    let holder = r["node"].as_str().context("node")?.to_owned();
    let s = wait_for("the holder removed", Duration::from_secs(60), || {
        let s = c.status(None).ok()?;
        (node_of(&s, &holder)?["state"] == "DEAD").then_some(s)
    })?;
    let n = node_of(&s, &holder).context("the holder")?;
    assert_eq!(n["death_reason"], "removed by autoscaler: idle", "{n}");
    let head_node = s["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["is_head"] == true))
        .and_then(|n| n["node_id"].as_str())
        .context("head node")?
        .to_owned();
    let copies = primary_copies(&c)?;
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(copies[0].1, head_node, "the copy moved to the head's node");
    // The owner reads it from its new place: same bytes, and from that copy. Had the owner
    // not been told, it would have rebuilt the object (the head has no CPUs: a new node).
    let launches = instances(&c.status(None)?).len();
    d.send_line("get")?;
    assert_eq!(d.result(Duration::from_secs(60))?["equal"], true);
    assert_eq!(
        instances(&c.status(None)?).len(),
        launches,
        "nothing launched to rebuild it"
    );
    // Released by the owner (it dropped the ref and still runs): the copy at its new place
    // is freed, since the owner frees where it was told the copy is.
    wait_for("the moved copy freed", Duration::from_secs(30), || {
        primary_copies(&c).ok()?.is_empty().then_some(())
    })?;
    d.send_line("done")?;
    d.finish(Duration::from_secs(30))?;
    wait_all_removed(&c, "cpu2", Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn a_node_whose_objects_cannot_move_is_kept_until_they_are_released() -> Result<()> {
    // The head's store (1 MiB, the least a store can be) cannot take a 1 MiB object with
    // its metadata, and there is no other node.
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        head_cpus: 0.0,
        extra_args: vec!["--object-store-memory".into(), "1MiB".into()],
        ..Default::default()
    })?;
    c.apply_autoscaling(ONE_CPU2)?;
    // A remote driver reads objects into its own memory (the head's store could not hold it).
    let mut d = Driver::start(
        driver_bin(),
        &c,
        &["hold_object"],
        &[("RAYCTL_REMOTE", "1")],
    )?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["made"], 1, "{r}");
    let holder = r["node"].as_str().context("node")?.to_owned();
    // The autoscaler tries, the drain is refused naming why, and the node stays.
    let record = wait_for("a refused drain", Duration::from_secs(60), || {
        let s = c.status(None).ok()?;
        instances(&s).into_iter().find(|i| {
            i["node_id"] == holder.as_str()
                && i["message"].as_str().is_some_and(|m| {
                    m.contains("drain refused") && m.contains("could not be moved")
                })
        })
    })?;
    assert_eq!(record["state"], "RAY_RUNNING", "{record}");
    let (code, _, err) =
        c.rayctl(&["drain-node", &holder, "--address", &c.head_addrs.join(",")])?;
    assert_ne!(code, 0, "an operator's drain is refused too");
    assert!(err.contains("could not be moved"), "{err}");
    std::thread::sleep(Duration::from_secs(3));
    let s = c.status(None)?;
    assert_eq!(node_of(&s, &holder).context("holder")?["state"], "ALIVE");
    let copies = primary_copies(&c)?;
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(copies[0].1, holder, "the copy is still on its node");
    d.send_line("get")?;
    assert_eq!(d.result(Duration::from_secs(60))?["equal"], true);
    // Released: the copy is freed, nothing holds the node any more, and it goes.
    wait_for("the copy freed", Duration::from_secs(30), || {
        primary_copies(&c).ok()?.is_empty().then_some(())
    })?;
    d.send_line("done")?;
    d.finish(Duration::from_secs(30))?;
    wait_all_removed(&c, "cpu2", Duration::from_secs(90))?;
    Ok(())
}

#[test]
fn an_operator_drains_an_idle_node_and_it_leaves_with_the_reason() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        nodes: 1,
        ..Default::default()
    })?;
    let node = c.nodes[0].ready["node_id"]
        .as_str()
        .context("node id")?
        .to_owned();
    wait_for("the node idle", Duration::from_secs(30), || {
        let s = c.status(None).ok()?;
        s["nodes"]
            .as_array()?
            .iter()
            .any(|n| n["node_id"] == node.as_str() && n["idle_ms"].is_u64())
            .then_some(())
    })?;
    let (code, _, err) = c.rayctl(&[
        "drain-node",
        &node,
        "--reason",
        "kernel upgrade",
        "--address",
        &c.head_addrs.join(","),
    ])?;
    assert_eq!(code, 0, "{err}");
    wait_for("the node gone", Duration::from_secs(30), || {
        let s = c.status(None).ok()?;
        s["nodes"]
            .as_array()?
            .iter()
            .any(|n| {
                n["node_id"] == node.as_str()
                    && n["state"] == "DEAD"
                    && n["death_reason"] == "drained by operator: kernel upgrade"
            })
            .then_some(())
    })?;
    // Its process exited.
    wait_for("the node process exited", Duration::from_secs(30), || {
        c.nodes[0].exited().then_some(())
    })?;
    // A head's node is refused.
    let s = c.status(None)?;
    let head_node = s["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["is_head"] == true))
        .and_then(|n| n["node_id"].as_str())
        .context("head node")?
        .to_owned();
    let (code, _, err) = c.rayctl(&[
        "drain-node",
        &head_node,
        "--address",
        &c.head_addrs.join(","),
    ])?;
    assert_ne!(code, 0);
    assert!(err.contains("head"), "{err}");
    Ok(())
}

#[test]
fn a_leader_killed_mid_scale_up_never_launches_twice() -> Result<()> {
    let mut c = cluster(3, &CPU2.replace("max_workers: 3", "max_workers: 2"))?;
    let leader = c.wait_leader(Duration::from_secs(30))?;
    // Two jobs that need two CPUs each (the demand is in Raft, so it outlives the leader):
    // two nodes are planned.
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(c.submit_job(&["--entrypoint-num-cpus", "2"], "sleep 4")?);
    }
    wait_for("launch records", Duration::from_secs(60), || {
        let s = c.status(None).ok()?;
        (!instances(&s).is_empty()).then_some(())
    })?;
    c.heads[leader].kill9();
    let alive: Vec<String> = c
        .head_addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, a)| a.clone())
        .collect();
    let alive = alive.join(",");
    for id in &ids {
        let (code, out, err) =
            c.rayctl(&["job", "wait", id, "--address", &alive, "--timeout", "120s"])?;
        assert_eq!(code, 0, "job {id} after the failover: {out} {err}");
    }
    let mut last = Value::Null;
    let s = wait_for("the records settled", Duration::from_secs(60), || {
        let s = c.status(None).ok()?;
        last = s["autoscaler"].clone();
        instances(&s)
            .iter()
            .all(|i| i["state"] != "REQUESTED" && i["state"] != "ALLOCATED")
            .then_some(s)
    })
    .with_context(|| format!("the autoscaler last showed {last:#}"))?;
    let records = instances(&s);
    let clouds = cloud_ids(&records);
    assert!(
        (1..=2).contains(&records.len()),
        "at most the planned two: {records:?}"
    );
    assert_eq!(
        clouds.len(),
        records.len(),
        "one instance per record: {records:?}"
    );
    // On this machine, exactly one node process per record ever started.
    let dirs: Vec<String> = std::fs::read_dir(c.path().join("autoscaler"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(dirs.len(), records.len(), "{dirs:?} vs {records:?}");
    for d in &dirs {
        assert!(clouds.contains(d.as_str()), "{d} has no record");
    }
    Ok(())
}

fn command_config(dir: &Path, max: u32) -> String {
    let env = format!(
        "FAKE_CLOUD_DIR={} RAYCTL_BIN={}",
        dir.display(),
        chaos_tests::rayctl_bin().expect("rayctl").display()
    );
    let fc = fake_cloud();
    format!(
        r#"
max_workers: {max}
available_node_types:
  cpu2:
    resources: {{CPU: 2}}
    max_workers: {max}
    idle_timeout_s: 3
provider:
  type: command
  launch: "{env} {fc} launch"
  terminate: "{env} {fc} terminate"
  list: "{env} {fc} list"
  timeout_s: 20
"#
    )
}

#[test]
fn command_provider_failures_back_off_and_a_failing_list_removes_nothing() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        head_cpus: 0.0,
        ..Default::default()
    })?;
    let cloud = c.path().join("cloud");
    std::fs::create_dir_all(&cloud)?;
    std::fs::write(cloud.join("fail_launch"), "")?;
    c.apply_autoscaling(&command_config(&cloud, 1))?;
    let mut d = Driver::start(driver_bin(), &c, &["burst", "1", "500", "1"], &[])?;
    // Launches fail: they show as recent failures and are retried, with backoff.
    let s = wait_for("two failed launches", Duration::from_secs(60), || {
        let s = c.status(None).ok()?;
        (instances(&s)
            .iter()
            .filter(|i| i["state"] == "ALLOCATION_FAILED")
            .count()
            >= 2)
            .then_some(s)
    })?;
    let failed: Vec<u64> = instances(&s)
        .iter()
        .filter(|i| i["state"] == "ALLOCATION_FAILED")
        .filter_map(|i| i["updated_ms"].as_u64())
        .collect();
    let mut sorted = failed.clone();
    sorted.sort();
    assert!(
        sorted[1] - sorted[0] >= 4_000,
        "the retry waited for its backoff: {sorted:?}"
    );
    let (_, text, _) = c.rayctl(&["status", "--address", &c.head_addrs.join(",")])?;
    assert!(
        text.contains("Recent failures:\n cpu2: LaunchFailed"),
        "{text}"
    );
    assert!(text.contains("quota exceeded"), "{text}");
    // The cloud recovers: the node arrives and the task runs.
    std::fs::remove_file(cloud.join("fail_launch"))?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["failed"], Value::Array(vec![]), "{r}");
    d.finish(Duration::from_secs(30))?;
    // Listing fails: the idle node is not removed, however long it idles.
    std::fs::write(cloud.join("fail_list"), "")?;
    std::thread::sleep(Duration::from_secs(8));
    let s = c.status(None)?;
    assert_eq!(alive_of(&s, "cpu2").len(), 1, "{s}");
    assert!(
        s["autoscaler"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("listing instances failed"),
        "{}",
        s["autoscaler"]
    );
    let calls = std::fs::read_to_string(cloud.join("calls.log"))?;
    assert!(!calls.contains("terminate"), "{calls}");
    // The list works again: the idle node goes through the terminate script.
    std::fs::remove_file(cloud.join("fail_list"))?;
    wait_all_removed(&c, "cpu2", Duration::from_secs(60))?;
    let calls = std::fs::read_to_string(cloud.join("calls.log"))?;
    assert!(calls.contains("terminate"), "{calls}");
    Ok(())
}

#[test]
fn kubernetes_provider_scales_its_statefulset_through_kubectl() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        head_cpus: 0.0,
        ..Default::default()
    })?;
    let dir = c.path().join("k8s");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("k8s.json"),
        r#"{"workloads": {"ray-worker-cpu2": {"kind": "StatefulSet", "selector": "app=ray-worker-cpu2", "spec": {"replicas": 0}, "metadata": {"annotations": {}}}}}"#,
    )?;
    let kubectl = dir.join("kubectl");
    std::fs::write(
        &kubectl,
        format!(
            "#!/bin/sh\nFAKE_CLOUD_DIR={} exec {} kubectl \"$@\"\n",
            dir.display(),
            fake_cloud()
        ),
    )?;
    std::fs::set_permissions(
        &kubectl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    c.apply_autoscaling(&format!(
        r#"
max_workers: 4
available_node_types:
  cpu2:
    resources: {{CPU: 2}}
    max_workers: 4
    node_config: {{kind: StatefulSet, name: ray-worker-cpu2, selector: app=ray-worker-cpu2}}
provider:
  type: kubernetes
  namespace: ray
  kubectl: {}
"#,
        kubectl.display()
    ))?;
    // Demand for two nodes: the StatefulSet is scaled to 2, once per request.
    let _d = Driver::start(driver_bin(), &c, &["burst", "2", "60000", "2"], &[])?;
    let s = wait_for("two pods allocated", Duration::from_secs(60), || {
        let s = c.status(None).ok()?;
        (instances(&s)
            .iter()
            .filter(|i| i["state"] == "ALLOCATED")
            .count()
            == 2)
            .then_some(s)
    })?;
    let records = instances(&s);
    let pods = cloud_ids(&records);
    assert_eq!(
        pods,
        BTreeSet::from(["ray-worker-cpu2-0", "ray-worker-cpu2-1"])
    );
    let state: Value = serde_json::from_slice(&std::fs::read(dir.join("k8s.json"))?)?;
    assert_eq!(state["workloads"]["ray-worker-cpu2"]["spec"]["replicas"], 2);
    let log = std::fs::read_to_string(dir.join("kubectl.log"))?;
    let patches: Vec<&str> = log.lines().filter(|l| l.contains(" patch ")).collect();
    assert_eq!(patches.len(), 2, "one patch per launch request: {log}");
    for l in log.lines() {
        assert!(l.starts_with("--namespace ray "), "{l}");
    }
    // Idempotent: the recorded request ids stop a second patch for the same request.
    let annotations =
        state["workloads"]["ray-worker-cpu2"]["metadata"]["annotations"]["rayctl.io/requests"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    let requests: BTreeMap<&str, ()> = annotations.split(',').map(|r| (r, ())).collect();
    assert_eq!(requests.len(), 2, "{annotations}");
    Ok(())
}
