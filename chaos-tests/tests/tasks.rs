//! Tasks end to end over real processes: a driver built with the SDK (`sdk_driver`), node
//! daemons that run it again as workers, leases with spillback, object transfer between
//! nodes, retries after a worker is killed, reference counting, and the three ways to run a
//! driver (job entrypoint, by hand on a node, remote).

use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::driver::Driver;
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use serde_json::Value;

fn driver_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sdk_driver")
}

fn run(c: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Result<Value> {
    chaos_tests::driver::run(driver_bin(), c, args, env)
}

fn node_id(c: &Cluster, i: usize) -> String {
    c.nodes[i].ready["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn wait_view(c: &Cluster) -> Result<()> {
    // Every node must be in the leader's resource view for spillback to find it.
    c.wait_alive(3)?;
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

#[test]
fn tasks_are_placed_by_resources_strategy_and_affinity() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 2,
        ..Default::default()
    })?;
    wait_view(&c)?;
    let (n0, n1) = (node_id(&c, 0), node_id(&c, 1));

    let r = run(&c, &["mode"], &[])?;
    assert_eq!(r["mode"], "Local", "{r}");
    assert_eq!(r["sum"], 42);

    // Only node 1 has `node1`: the driver's node spills the lease back to it.
    let r = run(&c, &["resource", "node1"], &[])?;
    assert_eq!(r["node"], n1.as_str(), "{r}");

    // Three half-second tasks, SPREAD over three one-CPU nodes: not all on one node.
    let r = run(&c, &["spread", "3"], &[])?;
    let nodes: std::collections::BTreeSet<&str> = r["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(nodes.len() >= 2, "SPREAD put every task on one node: {r}");

    // Hard affinity pins every task to node 0.
    let r = run(&c, &["affinity", &n0], &[])?;
    assert!(
        r["nodes"]
            .as_array()
            .context("nodes")?
            .iter()
            .all(|v| v == n0.as_str()),
        "{r}"
    );

    // A panic comes back with its message, the task id and the node.
    let r = run(&c, &["panic"], &[])?;
    assert_eq!(r["kind"], "PANIC", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or_default()
            .contains("boom from the test"),
        "{r}"
    );
    assert_eq!(r["task_id"].as_str().map(str::len), Some(40), "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap_or_default()
            .contains(r["node"].as_str().unwrap_or("?")),
        "{r}"
    );

    // An infeasible task waits (it is not failed) and the demand is reported.
    let mut d = Driver::start(driver_bin(), &c, &["infeasible"], &[])?;
    let r = d.result(Duration::from_secs(60))?;
    assert_eq!(r["ready_after_2s"], 0, "{r}");
    wait_for(
        "the infeasible demand in the cluster status",
        Duration::from_secs(30),
        || {
            let s = c.status(None).ok()?;
            s["pending_demand"]
                .as_array()?
                .iter()
                .any(|x| x["shape"]["unobtainium"] == 1.0 && x["infeasible"].as_u64() >= Some(1))
                .then_some(())
        },
    )?;
    d.finish(Duration::from_secs(30))?;

    // wait: two of five are ready well before the slowest, then all five.
    let r = run(&c, &["wait"], &[])?;
    assert_eq!(r["first"][0], 2, "{r}");
    assert_eq!(r["first"][1], 3, "{r}");
    assert_eq!(
        (r["all"].as_u64(), r["left"].as_u64()),
        (Some(5), Some(0)),
        "{r}"
    );
    assert!(
        r["early"].as_u64() < Some(3),
        "a 1 ms wait found every slow task done: {r}"
    );

    // A task that submits tasks owns their results.
    let r = run(&c, &["nested"], &[])?;
    assert_eq!(r["value"], 32, "{r}");

    // Many small tasks and a chain of dependent ones.
    let r = run(&c, &["many", "500"], &[])?;
    assert_eq!(r["total"], (0..500).map(|i| i + 1).sum::<i64>(), "{r}");
    assert_eq!(r["chain"], 21, "{r}");
    Ok(())
}

fn used_memory(c: &Cluster, port: u64) -> Option<f64> {
    c.metric(port, "ray_object_store_used_memory")
}

#[test]
fn large_objects_move_between_nodes_and_are_freed_with_their_refs() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 2,
        ..Default::default()
    })?;
    wait_view(&c)?;
    let (n0, n1) = (node_id(&c, 0), node_id(&c, 1));

    let r = run(&c, &["transfer", &n0, &n1], &[])?;
    assert_eq!(r["task_crc"], r["expected"], "{r}");
    assert_eq!(r["node"], n1.as_str(), "{r}");
    assert_eq!(r["put_crc"], r["put_expected"], "{r}");
    assert_eq!(r["put_node"], n1.as_str(), "{r}");
    assert_eq!(r["driver_crc"], r["expected"], "{r}");
    assert_eq!(r["driver_view_shared"], true, "{r}");

    // Reference counting: store usage on every node returns to its baseline.
    let ports: Vec<u64> = std::iter::once(c.heads[0].ready["node"]["metrics_export_port"].as_u64())
        .chain(
            c.nodes
                .iter()
                .map(|n| n.ready["metrics_export_port"].as_u64()),
        )
        .collect::<Option<_>>()
        .context("metrics ports")?;
    let all = |f: &dyn Fn(f64) -> bool| ports.iter().all(|p| used_memory(&c, *p).is_some_and(f));
    wait_for(
        "stores empty after the first driver",
        Duration::from_secs(30),
        || all(&|u| u == 0.0).then_some(()),
    )?;
    let mut d = Driver::start(driver_bin(), &c, &["refcount", &n0, &n1], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["holding"], 8, "{r}");
    // Held: node 0 has 4 results, node 1 copies of 8 objects, the driver's node 4 puts.
    wait_for(
        "objects in all three stores",
        Duration::from_secs(30),
        || all(&|u| u >= 32.0 * 1024.0 * 1024.0).then_some(()),
    )?;
    d.next_step()?;
    let r = d.result(Duration::from_secs(60))?;
    assert_eq!(r["owned"], 0, "{r}");
    wait_for(
        "every store back to empty once the refs dropped",
        Duration::from_secs(30),
        || all(&|u| u == 0.0).then_some(()),
    )
    .with_context(|| {
        format!(
            "used: {:?}",
            ports
                .iter()
                .map(|p| used_memory(&c, *p))
                .collect::<Vec<_>>()
        )
    })?;
    d.finish(Duration::from_secs(30))
}

#[test]
fn a_killed_worker_is_retried_and_without_retries_the_error_is_clear() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    for (retries, expect_value) in [("3", true), ("0", false)] {
        let pid_file = c.path().join(format!("victim-{retries}.pid"));
        let _ = std::fs::remove_file(&pid_file);
        let mut d = Driver::start(
            driver_bin(),
            &c,
            &["victim", pid_file.to_str().context("path")?, retries],
            &[],
        )?;
        let pid: i32 = wait_for("the task to start", Duration::from_secs(60), || {
            std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        })
        .with_context(|| d.output())?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let r = d.result(Duration::from_secs(120))?;
        if expect_value {
            assert_eq!(r["value"], 42, "{r}");
            // The retry ran in another worker process.
            let again: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
            assert_ne!(again, pid);
        } else {
            assert_eq!(r["error_kind"], "WORKER_DIED", "{r}");
            assert!(
                r["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("max_retries=0"),
                "{r}"
            );
        }
        d.finish(Duration::from_secs(30))?;
    }
    // Both deaths are counted as Ray counts them (its dashboard's "Unexpected System Level
    // Worker Failures"); the workers the node itself ends are not.
    let port = c.heads[0].ready["node"]["metrics_export_port"]
        .as_u64()
        .context("metrics port")?;
    let failures = "ray_node_manager_unexpected_worker_failure_total";
    wait_for(
        "two worker failures counted",
        Duration::from_secs(30),
        || (c.metric_sum(port, failures)? == 2.0).then_some(()),
    )?;
    Ok(())
}

#[test]
fn drivers_run_as_jobs_by_hand_and_from_outside_the_cluster() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    c.wait_alive(2)?;
    // By hand on a node's machine: local mode through the node's store.
    let r = run(&c, &["mode"], &[])?;
    assert_eq!(
        (r["mode"].as_str(), r["sum"].as_i64()),
        (Some("Local"), Some(42)),
        "{r}"
    );

    // From outside: no shared memory, objects over the network, the binary uploaded.
    let r = run(&c, &["mode"], &[("RAYCTL_REMOTE", "1")])?;
    assert_eq!(
        (r["mode"].as_str(), r["sum"].as_i64()),
        (Some("Remote"), Some(42)),
        "{r}"
    );
    let n0 = node_id(&c, 0);
    let head_node = c.heads[0].ready["node"]["node_id"]
        .as_str()
        .context("head node id")?
        .to_owned();
    let r = run(
        &c,
        &["transfer", &head_node, &n0],
        &[("RAYCTL_REMOTE", "1")],
    )?;
    assert_eq!(r["task_crc"], r["expected"], "{r}");
    assert_eq!(r["put_crc"], r["put_expected"], "{r}");
    assert_eq!(r["driver_crc"], r["expected"], "{r}");
    assert_eq!(r["driver_view_shared"], false, "{r}");

    // As a job's entrypoint.
    let (code, out, err) = c.rayctl(&["job", "submit", "--", driver_bin(), "mode"])?;
    assert_eq!(code, 0, "job submit failed: {out}\n{err}");
    assert!(
        out.contains("\"sum\":42") && out.contains("\"mode\":\"Local\""),
        "job output: {out}\n{err}"
    );
    Ok(())
}

/// The examples, as a user runs them: jobs whose entrypoint is the example binary.
#[test]
fn the_examples_run_as_jobs() -> Result<()> {
    let dir = chaos_tests::rayctl_bin()?
        .parent()
        .context("bin dir")?
        .to_owned();
    let (pi, wordcount, points) = (dir.join("pi"), dir.join("wordcount"), dir.join("points"));
    anyhow::ensure!(
        pi.is_file() && wordcount.is_file() && points.is_file(),
        "build the examples first: cargo build -p task-examples (scripts/test does)"
    );
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let (code, out, err) = c.rayctl(&[
        "job",
        "submit",
        "--",
        pi.to_str().context("path")?,
        "8",
        "200000",
    ])?;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("pi ≈ 3.1"), "{out}\n{err}");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tasks/data");
    let (code, out, err) = c.rayctl(&[
        "job",
        "submit",
        "--working-dir",
        data,
        "--",
        wordcount.to_str().context("path")?,
        ".",
    ])?;
    assert_eq!(code, 0, "{out}\n{err}");
    // The three texts shipped with the example hold 294 words, "the" 26 times.
    assert!(
        out.contains("3 files") && out.contains(": 294 words"),
        "{out}\n{err}"
    );
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["26", "the"]),
        "{out}"
    );
    // A struct of the user's own through tasks (`#[sdk::value]`), a `&str` argument and an
    // integer literal: y = 2x + 1 sampled on [0, 8], 11 points per part.
    let (code, out, err) =
        c.rayctl(&["job", "submit", "--", points.to_str().context("path")?, "8"])?;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("8 parts (part-0…part-7): 88 points, mean y 9.000, max y 17.000"),
        "{out}\n{err}"
    );
    assert!(out.contains("hello points ×3"), "{out}\n{err}");
    // Map-reduce: a Vec of refs to the reducer, one actor handle passed to every mapper.
    let mapreduce = dir.join("mapreduce");
    let (code, out, err) = c.rayctl(&[
        "job",
        "submit",
        "--",
        mapreduce.to_str().context("path")?,
        "6",
        "60000",
    ])?;
    assert_eq!(code, 0, "{out}\n{err}");
    let expect: u64 = (0..60_000u64).map(|x| x * x % 1_000_003).sum();
    assert!(
        out.contains(&format!(
            "6 parts of 0..60000: sum {expect} (expected {expect}), 6 reports"
        )),
        "{out}\n{err}"
    );
    Ok(())
}

fn workers_idle(c: &Cluster, port: u64) -> Option<f64> {
    c.metric(port, "rayctl_workers{state=\"idle\"}")
}

#[test]
fn prestarted_workers_wait_for_a_driver_and_idle_ones_exit() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        extra_args: vec![
            "--prestart-workers=2".into(),
            "--worker-idle-timeout=3s".into(),
        ],
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let port = c.heads[0].ready["node"]["metrics_export_port"]
        .as_u64()
        .context("metrics port")?;
    assert_eq!(workers_idle(&c, port), Some(0.0));
    let mut d = Driver::start(driver_bin(), &c, &["idle"], &[])?;
    d.result(Duration::from_secs(60))?;
    // Two workers start as soon as the driver has handed over its binary, before any task.
    wait_for(
        "two prestarted idle workers",
        Duration::from_secs(30),
        || (workers_idle(&c, port) == Some(2.0)).then_some(()),
    )?;
    // Idle longer than --worker-idle-timeout: they exit.
    wait_for("idle workers to exit", Duration::from_secs(30), || {
        (workers_idle(&c, port) == Some(0.0)).then_some(())
    })?;
    d.finish(Duration::from_secs(30))
}

/// A lease granted with a worker that no owner ever claims (the owner died or gave up after
/// the node granted it) comes back: the worker gives it up and its resources are free again.
#[test]
fn an_unclaimed_lease_is_given_back() -> Result<()> {
    use protocol::pb;
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let addr = c.heads[0].ready["node"]["address"]
        .as_str()
        .context("node address")?
        .to_owned();
    let port = c.heads[0].ready["node"]["metrics_export_port"]
        .as_u64()
        .context("metrics port")?;
    let sha = {
        use sha2::Digest;
        let bytes = std::fs::read(driver_bin())?;
        protocol::hex::encode(sha2::Sha256::digest(&bytes))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _in_rt = rt.enter();
    let opts = protocol::client::ClientOptions {
        rpc_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let mut nm = protocol::client::node_manager(&addr, c.auth(), &opts)?;
    rt.block_on(nm.register_binary(pb::RegisterBinaryRequest {
        sha256: sha.clone(),
        path: driver_bin().into(),
        job_id: String::new(),
    }))?;
    let req = || pb::LeaseRequest {
        resources: [("CPU".to_string(), 1.0)].into_iter().collect(),
        binary_sha256: sha.clone(),
        binary_source: addr.clone(),
        ..Default::default()
    };
    let first = rt.block_on(nm.request_worker_lease(req()))?.into_inner();
    assert_eq!(first.outcome, pb::LeaseOutcome::Granted as i32, "{first:?}");
    assert!(!first.worker_address.is_empty(), "{first:?}");
    // The node's only CPU is leased: a second request times out while the first is held.
    let second = rt
        .block_on(nm.request_worker_lease(pb::LeaseRequest {
            queue_timeout_ms: 200,
            ..req()
        }))?
        .into_inner();
    assert_eq!(
        second.outcome,
        pb::LeaseOutcome::TimedOut as i32,
        "{second:?}"
    );
    // Nobody opens the lease's stream: within the worker's orphan timeout it is given back.
    wait_for(
        "the unclaimed lease to be given back",
        Duration::from_secs(60),
        || (workers_idle(&c, port) == Some(1.0)).then_some(()),
    )?;
    let third = rt
        .block_on(nm.request_worker_lease(pb::LeaseRequest {
            queue_timeout_ms: 5_000,
            ..req()
        }))?
        .into_inner();
    assert_eq!(third.outcome, pb::LeaseOutcome::Granted as i32, "{third:?}");
    // The idle worker is reused.
    assert_eq!(third.worker_id, first.worker_id);
    Ok(())
}

/// Lineage reconstruction: the node holding the only copies of 100 intermediate results
/// dies; the consumers' owner runs the producers again elsewhere and the checksums match.
#[test]
fn results_lost_with_their_node_are_rebuilt_from_lineage() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 2,
        node_cpus: 2.0,
        ..Default::default()
    })?;
    wait_view(&c)?;
    let a = node_id(&c, 0);
    let mut d = Driver::start(driver_bin(), &c, &["dag", &a], &[])?;
    let r = d.result(Duration::from_secs(180))?;
    assert_eq!(r["stage1"], 100, "{r}");
    assert_eq!(
        r["on"][0],
        a.as_str(),
        "the producers did not run on node 0: {r}"
    );
    c.nodes[0].kill9();
    d.next_step()?;
    let r = d.result(Duration::from_secs(240))?;
    assert_eq!(r["equal"], true, "{r}");
    assert_eq!(r["direct_equal"], true, "{r}");
    assert_eq!(r["tasks"], 200, "{r}");
    d.finish(Duration::from_secs(30))?;
    // The driver (on the head's node) reported its rebuilds to its node.
    let port = c.heads[0].ready["node"]["metrics_export_port"]
        .as_u64()
        .context("metrics port")?;
    wait_for(
        "rebuilds in the head node's metrics",
        Duration::from_secs(30),
        || (c.metric(port, "rayctl_object_reconstructions_total")? >= 1.0).then_some(()),
    )
}

/// A task that waits for tasks it submitted lends its CPU meanwhile: on a one-CPU cluster the
/// children still run (without lending they would wait for the parent's CPU forever).
#[test]
fn a_blocked_task_lends_its_cpu_to_its_children() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let r = run(&c, &["nested"], &[])?;
    assert_eq!(r["value"], 32, "{r}");
    Ok(())
}

/// A driver killed with -9 frees nothing itself: its node notices its channel end, frees
/// its objects there and tells the leader, which tells every node to free them too.
#[test]
fn objects_of_a_killed_driver_are_freed_on_every_node() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 2,
        ..Default::default()
    })?;
    wait_view(&c)?;
    let (n0, n1) = (node_id(&c, 0), node_id(&c, 1));
    let ports: Vec<u64> = std::iter::once(c.heads[0].ready["node"]["metrics_export_port"].as_u64())
        .chain(
            c.nodes
                .iter()
                .map(|n| n.ready["metrics_export_port"].as_u64()),
        )
        .collect::<Option<_>>()
        .context("metrics ports")?;
    let mut d = Driver::start(driver_bin(), &c, &["refcount", &n0, &n1], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["holding"], 8, "{r}");
    wait_for(
        "objects in all three stores",
        Duration::from_secs(30),
        || {
            ports
                .iter()
                .all(|p| used_memory(&c, *p).is_some_and(|u| u >= 32.0 * 1024.0 * 1024.0))
                .then_some(())
        },
    )?;
    d.child.kill()?;
    d.child.wait()?;
    wait_for(
        "every store empty after the driver died",
        Duration::from_secs(60),
        || {
            ports
                .iter()
                .all(|p| used_memory(&c, *p) == Some(0.0))
                .then_some(())
        },
    )
    .with_context(|| {
        format!(
            "used: {:?}",
            ports
                .iter()
                .map(|p| used_memory(&c, *p))
                .collect::<Vec<_>>()
        )
    })
}

/// A head and a worker node with these CPUs, both alive.
fn head_and_node(head_cpus: f64, node_cpus: f64) -> Result<Cluster> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        head_cpus,
        node_cpus,
        ..Default::default()
    })?;
    c.wait_alive(2)?;
    Ok(c)
}

#[test]
fn a_program_sees_the_clusters_resources_nodes_and_where_its_code_runs() -> Result<()> {
    let c = head_and_node(1.0, 2.0)?;
    let r = run(&c, &["context"], &[])?;
    assert_eq!(r["cluster"]["CPU"], 3.0, "{r}");
    let avail = r["available"]["CPU"].as_f64().unwrap_or(0.0);
    assert!((0.0..=3.0).contains(&avail), "{r}");
    let nodes = r["nodes"].as_array().context("nodes")?;
    assert_eq!(nodes.len(), 2, "{r}");
    assert!(nodes.iter().all(|n| n["alive"] == true), "{r}");
    assert_eq!(nodes.iter().filter(|n| n["head"] == true).count(), 1, "{r}");
    let mut cpus: Vec<f64> = nodes.iter().filter_map(|n| n["cpus"].as_f64()).collect();
    cpus.sort_by(f64::total_cmp);
    assert_eq!(cpus, vec![1.0, 2.0], "{r}");
    // The driver is no worker and runs no task; the task knows its id and its retry.
    assert_eq!(r["driver_is_worker"], false, "{r}");
    assert!(r["driver_task"].is_null(), "{r}");
    assert_eq!(r["task_id"], r["ref_id"], "{r}");
    assert_eq!(r["attempt"], 1, "the first attempt's worker exited: {r}");
    assert_eq!(r["task_is_worker"], true, "{r}");
    let ids: Vec<&str> = nodes.iter().filter_map(|n| n["id"].as_str()).collect();
    assert!(ids.contains(&r["task_node"].as_str().unwrap_or("")), "{r}");
    assert!(
        ids.contains(&r["driver_node"].as_str().unwrap_or("")),
        "{r}"
    );
    Ok(())
}

#[test]
fn cancel_drops_queued_tasks_stops_running_ones_and_their_children() -> Result<()> {
    // One CPU in the cluster (the head has none).
    let c = head_and_node(0.0, 1.0)?;
    let r = run(&c, &["cancel"], &[])?;
    // Each would otherwise take a minute (or, queued, until the running one ends).
    for case in ["queued", "running", "forced", "recursive"] {
        assert_eq!(r[case]["kind"], "CANCELLED", "{case}: {r}");
        let ms = r[case]["ms"].as_u64().unwrap_or(u64::MAX);
        assert!(ms < 20_000, "{case} took {ms} ms: {r}");
    }
    assert_eq!(r["after"], 0, "{r}");
    Ok(())
}

#[test]
fn a_read_that_needs_room_waits_for_pins_and_says_store_full_not_lost() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        extra_args: vec!["--object-store-memory".into(), "32MiB".into()],
        ..Default::default()
    })?;
    let r = run(&c, &["read-when-full"], &[])?;
    let held = r["held"].as_str().unwrap_or_default();
    assert!(
        held.contains("cannot be read here yet") && held.contains("ObjectStoreFull"),
        "{r}"
    );
    assert!(
        !held.contains("is lost"),
        "a full store is not a lost object: {r}"
    );
    let held_ms = r["held_ms"].as_u64().unwrap_or(0);
    assert!(
        (9_000..60_000).contains(&held_ms),
        "waited for room first: {r}"
    );
    assert_eq!(r["freed"], "read", "{r}");
    let freed_ms = r["freed_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        (900..9_000).contains(&freed_ms),
        "read once a view let go: {r}"
    );
    Ok(())
}

/// An `async fn` remote function awaits refs (`ObjectRef` is `IntoFuture`); an async actor
/// with `max_concurrency = 8` runs 8 sleeping calls at once.
#[test]
fn async_functions_and_an_async_actor_run_concurrently() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    let r = run(&c, &["async"], &[])?;
    assert_eq!(r["sum"], 55, "{r}");
    assert_eq!(r["concurrent"], 8, "{r}");
    let ms = r["naps_ms"].as_u64().context("naps_ms")?;
    assert!(
        ms < 4000,
        "8 naps of 1 s at once, not one after another: {r}"
    );
    Ok(())
}

/// A streaming generator of 1,000 items is read while it runs, in order, never more than
/// the back-pressure window (16) ahead; a slow reader holds the worker back; stored items
/// come through; a generator that panics gives its items and then the error.
#[test]
fn a_streaming_generator_is_read_while_it_runs_with_back_pressure() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    let r = run(&c, &["stream"], &[])?;
    assert_eq!(r["in_order"], true, "{r}");
    let (first, total) = (
        r["first_ms"].as_u64().context("first")?,
        r["total_ms"].as_u64().context("total")?,
    );
    assert!(total >= 1000, "1,000 items of 1 ms each: {r}");
    assert!(
        first * 3 < total,
        "the first item came long before the last: {r}"
    );
    assert!(r["most_buffered"].as_u64() <= Some(16), "{r}");
    assert_eq!(r["slow_n"], 100, "{r}");
    assert!(r["slow_most"].as_u64() <= Some(16), "{r}");
    assert_eq!(r["blobs_ok"], 5, "{r}");
    let e = r["blobs_error"].as_str().unwrap_or_default();
    assert!(
        e.starts_with("PANIC: ") && e.contains("no more blobs"),
        "{r}"
    );
    assert_eq!(r["owned"], 0, "every item and stream end freed: {r}");
    Ok(())
}

/// Options written on the attribute are applied: `num_cpus = 2` waits while only a 1-CPU
/// node is alive and runs once a 2-CPU node is; `max_retries = 2, retry_exceptions = true`
/// retries panics (and the call site can turn it off); an actor's `max_concurrency = 4`.
#[test]
fn options_on_the_attribute_are_applied_and_the_call_site_overrides_them() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        head_cpus: 1.0,
        node_cpus: 2.0,
        ..Default::default()
    })?;
    let r = run(&c, &["attr-options"], &[])?;
    assert_eq!(r["sum"], 42, "num_returns = 2, the inline one: {r}");
    assert_eq!(r["big_ok"], true, "the stored one: {r}");
    assert_eq!(r["ids_differ"], true, "{r}");
    assert_eq!(r["retried"], 2, "ran a third time after two panics: {r}");
    let not = r["not_retried"].as_str().unwrap_or_default();
    assert!(
        not.starts_with("PANIC: ") && not.contains("flaky on attempt 0"),
        "{r}"
    );
    assert_eq!(r["concurrent"], 4, "{r}");
    assert_eq!(r["declared_cpus"], 2.0, "{r}");
    assert_eq!(r["max_concurrency"], 4, "{r}");

    // Only the 1-CPU head is left: the 2-CPU task waits, then runs on the node once it is back.
    let two = node_id(&c, 0);
    c.nodes[0].kill9();
    wait_for("node-0 dead", Duration::from_secs(60), || {
        let s = c.status(None).ok()?;
        (Cluster::nodes_in_state(&s, "ALIVE").len() == 1).then_some(())
    })?;
    let mut d = Driver::start(driver_bin(), &c, &["two-cpus"], &[])?;
    let r = d.result(Duration::from_secs(60))?;
    assert_eq!(r["ready_early"], false, "no node has 2 CPUs: {r}");
    c.restart_node(0)?;
    d.next_step()?;
    let r = d.result(Duration::from_secs(150))?;
    assert_eq!(r["node"], two.as_str(), "{r}");
    d.finish(Duration::from_secs(60))
}

/// A node that joins while a driver runs fetches the driver's program before any task
/// reaches it (the driver's node advertises the binaries its running jobs registered, the
/// leader passes them on with the cluster view): the autoscaler's new nodes start work
/// without a fetch in the way.
#[test]
fn a_new_node_fetches_a_running_drivers_binary_before_any_task() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let sha = protocol::sha256_file(std::path::Path::new(driver_bin()))?;
    let mut d = Driver::start(driver_bin(), &c, &["idle"], &[])?;
    d.result(Duration::from_secs(60))?;
    let i = c.add_node(1.0)?;
    let cached = c
        .path()
        .join(format!("node-{i}"))
        .join("binaries")
        .join(&sha);
    wait_for(
        "the new node to hold the driver's binary",
        Duration::from_secs(60),
        || cached.exists().then_some(()),
    )?;
    assert_eq!(
        std::fs::metadata(&cached)?.len(),
        std::fs::metadata(driver_bin())?.len()
    );
    let log = std::fs::read_to_string(c.nodes[i].log_path())?;
    assert!(
        log.contains("prefetched a worker binary another node's driver uses"),
        "{}",
        c.nodes[i].log_tail()
    );
    d.finish(Duration::from_secs(30))
}
