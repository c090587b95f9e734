//! Logs through any head: `rayctl logs cluster|actor|task|worker|job` (Ray's `ray logs`
//! shape, with `--tail` and `-f`) and the heads' `/api/v0/logs`, `/logs/file` and
//! `/logs/stream`, over real nodes, workers and jobs.

use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::driver::Driver;
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use serde_json::Value;

const TOKEN: &str = "logs-test-token";

fn get(port: &Value, path: &str) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut r = agent
        .get(&format!("http://127.0.0.1:{port}{path}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .call()?;
    Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
}

/// One head with no CPUs and a worker node: every task runs on the worker node.
fn cluster() -> Result<Cluster> {
    Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        head_cpus: 0.0,
        node_cpus: 2.0,
        token: Some(TOKEN.into()),
        ..Default::default()
    })
}

#[test]
fn logs_of_nodes_workers_tasks_actors_and_jobs_through_any_head() -> Result<()> {
    let c = cluster()?;
    let addr = c.head_addrs.join(",");
    // Tasks that print (their worker's log has the lines), and an actor.
    let mut d = Driver::start(env!("CARGO_BIN_EXE_sdk_driver"), &c, &["print"], &[])?;
    d.result(Duration::from_secs(120))?;
    let mut a = Driver::start(env!("CARGO_BIN_EXE_actor_driver"), &c, &["introspect"], &[])?;
    let actor = a.result(Duration::from_secs(120))?["actor"]
        .as_str()
        .context("actor")?
        .to_owned();

    // Every node's files; worker logs among them.
    let (code, out, err) = c.rayctl(&["logs", "cluster", "--address", &addr])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("worker-") && out.contains("node"), "{out}");

    // A task by id: its worker's log holds what it printed.
    let tasks = wait_for("the chatty tasks listed", Duration::from_secs(30), || {
        let (code, out, _) = c
            .rayctl(&["list", "tasks", "-o", "json", "--address", &addr])
            .ok()?;
        let v: Vec<Value> = serde_json::from_str(&out).ok()?;
        (code == 0
            && v.iter()
                .any(|t| t["name"].as_str().is_some_and(|n| n.ends_with("chatty"))))
        .then_some(v)
    })?;
    // A task declared with `enable_task_events = false` (run before the chatty ones) is
    // not listed.
    assert!(
        !tasks
            .iter()
            .any(|t| t["name"].as_str().is_some_and(|n| n.ends_with("unlisted"))),
        "{tasks:?}"
    );
    let t = tasks
        .iter()
        .find(|t| {
            t["name"].as_str().is_some_and(|n| n.ends_with("chatty")) && t["state"] == "FINISHED"
        })
        .context("a finished chatty task")?;
    let task_id = t["task_id"].as_str().context("task id")?;
    let worker = t["worker_id"].as_str().context("worker id")?;
    let (code, out, err) = c.rayctl(&["logs", "task", task_id, "--address", &addr])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stdout line from task"), "{out}\n{err}");
    assert!(err.contains(&format!("worker-{worker}.log")), "{err}");
    // The same file by worker id, its last line only.
    let (code, out, err) =
        c.rayctl(&["logs", "worker", worker, "--tail", "1", "--address", &addr])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    // One file named by glob and node is printed; several are listed.
    let node = c.nodes[0].ready["node_id"]
        .as_str()
        .context("node")?
        .to_owned();
    let (code, out, err) = c.rayctl(&[
        "logs",
        "cluster",
        &format!("worker-{worker}.log"),
        "--node-id",
        &node,
        "--address",
        &addr,
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stdout line from task"), "{out}");
    // An actor by id.
    let (code, _, err) = c.rayctl(&["logs", "actor", &actor, "--address", &addr])?;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("worker-"), "{err}");
    let (code, _, err) = c.rayctl(&[
        "logs",
        "actor",
        "00000000000000000000000000000000",
        "--address",
        &addr,
    ])?;
    assert_eq!(code, 4, "not found: {err}");

    // A job, followed to its end.
    let (code, out, err) = c.rayctl(&[
        "job",
        "submit",
        "--no-wait",
        "--submission-id",
        "logs-job",
        "--address",
        &addr,
        "--",
        "sh",
        "-c",
        "echo first; sleep 2; echo second",
    ])?;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = c.rayctl(&["logs", "job", "logs-job", "-f", "--address", &addr])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("first") && out.contains("second"),
        "{out}\n{err}"
    );

    // The same through the HTTP API.
    let port = &c.heads[0].ready["dashboard_port"];
    let (code, body) = get(port, &format!("/api/v0/logs?node_id={node}&glob=worker-*"))?;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert!(
        v["data"]["result"]["worker"]
            .as_array()
            .is_some_and(|w| !w.is_empty()),
        "{v}"
    );
    let (code, body) = get(
        port,
        &format!("/api/v0/logs/file?task_id={task_id}&lines=-1"),
    )?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("stdout line from task"), "{body}");
    let (code, body) = get(port, "/api/v0/logs/stream?submission_id=logs-job")?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("first") && body.contains("second"), "{body}");
    let (code, _) = get(
        port,
        &format!("/api/v0/logs/file?node_id={node}&filename=../../etc/passwd"),
    )?;
    assert_eq!(code, 400, "a path is refused");
    let (code, _) = get(
        port,
        "/api/v0/logs/file?actor_id=00000000000000000000000000000000",
    )?;
    assert_eq!(code, 404);
    d.send_line("done")?;
    a.send_line("done")?;
    d.finish(Duration::from_secs(30))?;
    a.finish(Duration::from_secs(30))?;
    Ok(())
}

/// `rayctl timeline`: one Chrome-trace complete event per finished task, as `ray timeline`.
#[test]
fn the_timeline_has_one_complete_event_per_finished_task() -> Result<()> {
    let c = cluster()?;
    let addr = c.head_addrs.join(",");
    let mut d = Driver::start(env!("CARGO_BIN_EXE_sdk_driver"), &c, &["print"], &[])?;
    d.result(Duration::from_secs(120))?;
    // Six tasks finished (four, a parent and its child); their events reach the node.
    let finished = wait_for("six finished tasks listed", Duration::from_secs(30), || {
        let (_, out, _) = c
            .rayctl(&["list", "tasks", "-o", "json", "--address", &addr])
            .ok()?;
        let v: Vec<Value> = serde_json::from_str(&out).ok()?;
        let done: Vec<String> = v
            .iter()
            .filter(|t| t["state"] == "FINISHED")
            .filter_map(|t| t["task_id"].as_str().map(str::to_owned))
            .collect();
        (done.len() == 6).then_some(done)
    })?;
    let path = c.path().join("trace.json");
    let (code, _, err) = c.rayctl(&[
        "timeline",
        "-o",
        path.to_str().context("path")?,
        "--address",
        &addr,
    ])?;
    assert_eq!(code, 0, "{err}");
    let events: Vec<Value> = serde_json::from_slice(&std::fs::read(&path)?)?;
    assert_eq!(events.len(), 6, "{events:?}");
    for e in &events {
        assert_eq!(e["ph"], "X", "{e}");
        assert!(e["ts"].as_u64().is_some_and(|t| t > 0), "{e}");
        assert!(e["dur"].as_u64().is_some(), "{e}");
        assert!(
            e["name"].as_str().is_some_and(|n| n.contains("chatty")),
            "{e}"
        );
        assert!(
            finished
                .iter()
                .any(|id| e["args"]["task_id"] == id.as_str()),
            "{e}"
        );
    }
    d.send_line("done")?;
    d.finish(Duration::from_secs(30))?;
    Ok(())
}
