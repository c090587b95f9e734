//! Actors end to end over real processes: a driver built with the SDK (`actor_driver`), the
//! actor table in Raft, the leader's actor manager placing and restarting actors, node
//! daemons giving each actor a worker of its own, and calls straight from caller to actor.

use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::driver::{self, Driver};
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use protocol::pb;
use serde_json::Value;

fn driver_bin() -> &'static str {
    env!("CARGO_BIN_EXE_actor_driver")
}

fn run(c: &Cluster, args: &[&str]) -> Result<Value> {
    driver::run(driver_bin(), c, args, &[])
}

/// Polls until the actor is DEAD (up to a minute).
fn wait_dead(c: &Cluster, id: &str, what: &str) -> Result<pb::ActorInfo> {
    wait_for(what, Duration::from_secs(60), || {
        actor(c, id)
            .ok()
            .filter(|a| a.state == pb::ActorState::Dead as i32)
    })
}

fn actor(c: &Cluster, id: &str) -> Result<pb::ActorInfo> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = pb::GetActorRequest {
        actor_id: id.to_owned(),
        ..Default::default()
    };
    Ok(rt.block_on(c.client().call(|mut cl| {
        let req = req.clone();
        async move { cl.get_actor(req).await }
    }))?)
}

/// 10,000 calls from one caller: the actor keeps its state and runs them in call order,
/// including calls queued behind one whose argument is a slow task's result.
#[test]
fn an_actor_keeps_its_state_and_the_callers_order() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    let r = run(&c, &["counter", "10000"])?;
    assert_eq!(r["ordered"], true, "{r}");
    assert_eq!(r["last"], 10000, "{r}");
    assert_eq!(r["get"], 10000, "{r}");
    assert_eq!(r["calls"], 10000, "{r}");
    Ok(())
}

/// Names, namespaces, get-or-create, calls from a task, a panicking method, kill, and a
/// constructor that panics.
#[test]
fn named_actors_kill_and_errors() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        node_cpus: 2.0,
        ..Default::default()
    })?;
    let r = run(&c, &["named"])?;
    assert_eq!(r["same_state"], 5, "{r}");
    assert_eq!(r["found_id"], true, "{r}");
    assert_eq!(r["same_id"], true, "get_if_exists gave another actor: {r}");
    assert_eq!(r["other_ns"], "Actor", "found in the wrong namespace: {r}");
    assert!(
        r["dup"]
            .as_str()
            .is_some_and(|m| m.contains("already exists")),
        "{r}"
    );
    assert!(
        r["wrong_class"]
            .as_str()
            .is_some_and(|m| m.contains("not a")),
        "{r}"
    );
    assert_eq!(r["from_task"], 101, "{r}");
    assert_eq!(r["d_after"], 101, "{r}");
    assert!(
        r["panicked"]
            .as_str()
            .is_some_and(|m| m.contains("PANIC") && m.contains("method boom")),
        "{r}"
    );
    assert_eq!(
        r["after_panic"], 6,
        "the actor lost its state after a panicking method: {r}"
    );
    assert_eq!(r["after_kill"], "ActorDied", "{r}");
    assert_eq!(r["lookup_after_kill"], "Actor", "{r}");
    assert_eq!(r["ctor"][0], "ActorDied", "{r}");
    assert!(
        r["ctor"][1]
            .as_str()
            .is_some_and(|m| m.contains("ctor boom")),
        "{r}"
    );
    Ok(())
}

/// `max_concurrency` 4 runs `&self` calls at once; the default runs them one at a time.
#[test]
fn max_concurrency_runs_calls_in_parallel() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    let r = run(&c, &["concurrency"])?;
    assert!(r["parallel_max"].as_u64().is_some_and(|n| n >= 2), "{r}");
    assert_eq!(r["serial_max"], 1, "{r}");
    Ok(())
}

/// A non-detached actor dies with the driver that made it; a detached one outlives it and
/// another driver finds it by name.
#[test]
fn actors_die_with_their_owner_unless_detached() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    let r = run(&c, &["lifetime"])?;
    let owned = r["owned"].as_str().context("owned")?.to_owned();
    let detached = r["detached"].as_str().context("detached")?.to_owned();
    let info = wait_dead(&c, &owned, "the owned actor to die with its driver")?;
    assert!(info.message.contains("owner"), "{info:?}");
    assert_eq!(actor(&c, &detached)?.state, pb::ActorState::Alive as i32);
    let r = run(&c, &["find", "keeper"])?;
    assert_eq!(r["value"], 2, "{r}");
    Ok(())
}

/// Dropping the last handle to an unnamed actor ends it once the calls made through it have
/// returned; a clone of the handle keeps it alive, and so does a name.
#[test]
fn an_unnamed_actor_ends_with_its_last_handle() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    let mut d = Driver::start(driver_bin(), &c, &["scope"], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["first"], 1, "a call made before the drop returns: {r}");
    let gone = r["gone"].as_str().context("gone")?.to_owned();
    let info = wait_dead(&c, &gone, "the actor without handles to end")?;
    assert!(info.message.contains("every handle"), "{info:?}");
    for kept in ["kept", "named"] {
        let id = r[kept].as_str().context("id")?;
        let a = actor(&c, id)?;
        assert_eq!(a.state, pb::ActorState::Alive as i32, "{kept}: {a:?}");
    }
    let kept = r["kept"].as_str().context("kept")?.to_owned();
    d.send_line("")?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["copy"], 15, "{r}");
    d.finish(Duration::from_secs(60))?;
    // The driver dropped its clone on its way out: that actor ends too.
    wait_dead(&c, &kept, "the kept actor to end")?;
    Ok(())
}

/// Actor handles are values: one passed to 20 tasks on two nodes counts every increment
/// once and the unnamed actor ends when the last task lets go of it (the driver dropped its
/// own first); a handle a worker keeps past its call keeps the actor alive until that
/// worker dies; a handle returned by the task that created the actor works, and the actor
/// ends when the driver drops it.
#[test]
fn actor_handles_passed_kept_and_returned_count_like_refs() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        node_cpus: 2.0,
        head_cpus: 2.0,
        ..Default::default()
    })?;
    c.wait_alive(2)?;
    let pid_file = c.path().join("keeper.pid");
    let mut d = Driver::start(
        driver_bin(),
        &c,
        &["shared", pid_file.to_str().context("path")?],
        &[],
    )?;
    let r = d.result(Duration::from_secs(180))?;
    assert_eq!(
        r["max"], 100,
        "20 tasks x 5 increments, each counted once: {r}"
    );
    assert_eq!(r["distinct"], 20, "{r}");
    assert_eq!(r["nodes"].as_array().map(Vec::len), Some(2), "{r}");
    let shared = r["shared"].as_str().context("shared")?.to_owned();
    let info = wait_dead(&c, &shared, "the shared actor to end after its last task")?;
    assert!(info.message.contains("every handle"), "{info:?}");
    // Kept by a worker past its call: alive while that worker lives.
    assert_eq!(r["kept_first"], 1, "{r}");
    let kept = r["kept"].as_str().context("kept")?.to_owned();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        actor(&c, &kept)?.state,
        pb::ActorState::Alive as i32,
        "a worker still holds a handle"
    );
    let pid: i32 = wait_for("the keeper's pid", Duration::from_secs(30), || {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    })?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let info = wait_dead(&c, &kept, "the kept actor to end with its last holder")?;
    assert!(info.message.contains("every handle"), "{info:?}");
    // Made in a task and returned: the driver's handle works and keeps it.
    assert_eq!(r["made_value"], 42, "{r}");
    let made = r["made"].as_str().context("made")?.to_owned();
    assert_eq!(actor(&c, &made)?.state, pb::ActorState::Alive as i32);
    d.next_step()?;
    d.result(Duration::from_secs(60))?;
    let info = wait_dead(
        &c,
        &made,
        "the returned actor to end when the driver drops it",
    )?;
    assert!(info.message.contains("every handle"), "{info:?}");
    d.finish(Duration::from_secs(60))
}

/// kill -9 of the node hosting an actor with max_restarts=1: it restarts on the other node
/// and calls resume; a second kill leaves no restart and calls fail with ActorDied.
#[test]
fn an_actor_restarts_elsewhere_when_its_node_dies_then_dies_for_good() -> Result<()> {
    // Only the worker nodes have a `slot`.
    let mut c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 2,
        node_resources: vec![("slot".into(), 1.0)],
        ..Default::default()
    })?;
    let mut d = Driver::start(driver_bin(), &c, &["restart"], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["value"], 10, "{r}");
    assert_eq!(r["restarts"], 0, "{r}");
    let first = r["node"].as_str().context("node")?.to_owned();
    let i = (0..2)
        .find(|i| c.nodes[*i].ready["node_id"] == first.as_str())
        .context("the actor is not on a worker node")?;
    c.nodes[i].kill9();
    d.next_step()?;
    let r = d.result(Duration::from_secs(180))?;
    assert_eq!(r["value"], 1, "restarted from its constructor: {r}");
    assert_eq!(r["restarts"], 1, "{r}");
    let second = r["node"].as_str().context("node")?.to_owned();
    assert_ne!(second, first, "{r}");
    c.nodes[1 - i].kill9();
    d.next_step()?;
    let r = d.result(Duration::from_secs(180))?;
    assert_eq!(r["error"], "ActorDied", "{r}");
    assert_eq!(r["state"], "Dead", "{r}");
    assert!(
        r["message"].as_str().is_some_and(|m| m.contains("died")),
        "{r}"
    );
    d.finish(Duration::from_secs(30))
}

/// The leader head is killed while a driver creates 20 actors: every actor is created, none
/// twice (one worker each, no restart), and each keeps the state its constructor gave it.
#[test]
fn killing_the_leader_during_actor_creation_loses_none_and_doubles_none() -> Result<()> {
    // A node timeout of 5 s (the default's length): its actors' serving lease (80 %, 4 s)
    // outlasts the leader failover even on a loaded machine.
    let mut c = Cluster::start(ClusterOptions {
        heads: 3,
        nodes: 1,
        health_threshold: 10,
        node_resources: vec![("slot".into(), 1.0)],
        ..Default::default()
    })?;
    let leader = c.wait_leader(Duration::from_secs(60))?;
    // The driver runs on the worker node (which survives), as a job's driver would.
    let n = &c.nodes[0].ready;
    let host = n["address"]
        .as_str()
        .context("address")?
        .rsplit_once(':')
        .context("host")?
        .0
        .to_owned();
    let env = [
        (
            "RAYCTL_NODE_ADDRESS",
            n["address"].as_str().context("address")?.to_owned(),
        ),
        (
            "RAYCTL_NODE_ID",
            n["node_id"].as_str().context("node id")?.to_owned(),
        ),
        (
            "RAYCTL_OBJECT_STORE_SOCKET",
            n["object_store_socket"]
                .as_str()
                .context("socket")?
                .to_owned(),
        ),
        (
            "RAYCTL_OBJECT_MANAGER_ADDRESS",
            format!("{host}:{}", n["object_manager_port"]),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Driver::start(driver_bin(), &c, &["create-many", "20"], &env)?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["phase"], "creating", "{r}");
    c.heads[leader].kill9();
    let r = d.result(Duration::from_secs(300))?;
    assert_eq!(r["ok"], true, "{r}");
    let ids: Vec<String> = r["ids"]
        .as_array()
        .context("ids")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 20, "{r}");
    d.finish(Duration::from_secs(30))?;
    let others: Vec<String> = c
        .head_addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, a)| a.clone())
        .collect();
    let client = c.client_for(
        &others,
        protocol::client::ClientOptions {
            deadline: Duration::from_secs(60),
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let list = rt.block_on(
        client.call(|mut cl| async move { cl.list_actors(pb::ListActorsRequest {}).await }),
    )?;
    assert_eq!(
        list.actors.len(),
        20,
        "an actor was created twice or lost: {:?}",
        list.actors.iter().map(|a| &a.actor_id).collect::<Vec<_>>()
    );
    for a in &list.actors {
        assert!(ids.contains(&a.actor_id), "unknown actor {}", a.actor_id);
        assert_eq!(a.state, pb::ActorState::Alive as i32, "{a:?}");
        assert_eq!(a.num_restarts, 0, "{a:?}");
    }
    // One worker process per actor on the node: no second copy was started.
    let port = n["metrics_export_port"].as_u64().context("metrics port")?;
    wait_for("20 leased workers", Duration::from_secs(30), || {
        (c.metric(port, "rayctl_workers{state=\"leased\"}")? == 20.0).then_some(())
    })?;
    Ok(())
}

/// A STRICT_SPREAD group of 3 bundles over 4 nodes: one bundle per node, tasks and actors run
/// in their bundle; a group of 9 cannot fit, waits and says so; killing a bundle's node
/// places the group again on the live nodes.
#[test]
fn placement_groups_reserve_bundles_and_are_rescheduled() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 3,
        ..Default::default()
    })?;
    c.wait_alive(4)?;
    let mut d = Driver::start(driver_bin(), &c, &["pg"], &[])?;
    let r = d.result(Duration::from_secs(180))?;
    let nodes: Vec<String> = r["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let distinct: std::collections::HashSet<&String> = nodes.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "STRICT_SPREAD put two bundles on one node: {r}"
    );
    assert_eq!(
        r["task_nodes"],
        serde_json::json!(nodes),
        "tasks ran outside their bundles: {r}"
    );
    assert!(
        nodes.contains(&r["any_node"].as_str().unwrap_or_default().to_owned()),
        "{r}"
    );
    assert_eq!(r["actor_node"], nodes[1].as_str(), "{r}");
    assert_eq!(r["big_state"], "PENDING", "{r}");
    assert!(
        r["big_message"]
            .as_str()
            .is_some_and(|m| m.contains("infeasible")),
        "{r}"
    );
    assert!(
        r["waiting"]
            .as_str()
            .is_some_and(|m| m.contains("infeasible")),
        "{r}"
    );
    // Kill a worker node holding a bundle.
    let i = (0..3)
        .find(|i| {
            nodes
                .iter()
                .any(|n| c.nodes[*i].ready["node_id"] == n.as_str())
        })
        .context("no bundle on a worker node")?;
    let killed = c.nodes[i].ready["node_id"]
        .as_str()
        .context("node id")?
        .to_owned();
    c.nodes[i].kill9();
    d.send_line(&killed)?;
    let r = d.result(Duration::from_secs(180))?;
    let again: Vec<String> = r["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert!(!again.contains(&killed), "{r}");
    assert_eq!(
        again.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "{r}"
    );
    assert_eq!(r["task_nodes"], serde_json::json!(again), "{r}");
    assert_eq!(r["removed"], "REMOVED", "{r}");
    d.finish(Duration::from_secs(30))
}

fn rayctl_json(c: &Cluster, args: &[&str]) -> Result<Value> {
    let mut a: Vec<&str> = args.to_vec();
    let addr = c.head_addrs.join(",");
    a.extend(["--address", &addr, "-o", "json"]);
    let (code, out, err) = c.rayctl(&a)?;
    anyhow::ensure!(code == 0, "rayctl {args:?} exited {code}: {err}");
    serde_json::from_str(&out).with_context(|| format!("rayctl {args:?} printed {out}"))
}

/// `rayctl list actors|tasks|objects|placement-groups` (with filters), `summary tasks` and
/// `memory` show what a running driver made.
#[test]
fn rayctl_lists_actors_tasks_objects_and_placement_groups() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    let mut d = Driver::start(driver_bin(), &c, &["introspect"], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    let actor = r["actor"].as_str().context("actor")?.to_owned();
    let object = r["object"].as_str().context("object")?.to_owned();
    let pg = r["pg"].as_str().context("pg")?.to_owned();

    let actors = rayctl_json(&c, &["list", "actors", "--filter", "name=intro"])?;
    assert_eq!(actors.as_array().map(Vec::len), Some(1), "{actors}");
    assert_eq!(actors[0]["actor_id"], actor.as_str());
    assert_eq!(actors[0]["state"], "ALIVE");
    assert!(actors[0]["pid"].as_u64().is_some_and(|p| p > 0), "{actors}");
    let none = rayctl_json(&c, &["list", "actors", "--filter", "state=DEAD"])?;
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");
    let stuck = rayctl_json(
        &c,
        &["list", "actors", "--filter", "state=PENDING_CREATION"],
    )?;
    assert_eq!(stuck.as_array().map(Vec::len), Some(1), "{stuck}");
    assert!(
        stuck[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("infeasible") && m.contains("unobtainium")),
        "{stuck}"
    );

    // Owners report task events about once a second: wait until the last ones are in.
    let tasks = wait_for(
        "the driver's task events on its node",
        Duration::from_secs(60),
        || {
            let t = rayctl_json(&c, &["list", "tasks", "--limit", "1000"]).ok()?;
            let done = t
                .as_array()?
                .iter()
                .filter(|x| x["state"] == "FINISHED" || x["state"] == "FAILED")
                .count();
            (done >= 9).then_some(t)
        },
    )?;
    let tasks = tasks.as_array().context("tasks")?;
    let named = |n: &str, st: &str| {
        tasks
            .iter()
            .filter(|t| t["name"].as_str().is_some_and(|x| x.ends_with(n)) && t["state"] == st)
            .count()
    };
    assert_eq!(named("where_am_i", "FINISHED"), 5, "{tasks:?}");
    assert_eq!(named("Counter::incr", "FINISHED"), 3, "{tasks:?}");
    assert_eq!(named("Counter::fail", "FAILED"), 1, "{tasks:?}");
    let failed = tasks
        .iter()
        .find(|t| t["state"] == "FAILED")
        .context("failed task")?;
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("PANIC")),
        "{failed}"
    );
    assert_eq!(failed["actor_id"], actor.as_str());
    let only = rayctl_json(&c, &["list", "tasks", "--filter", "state=FAILED"])?;
    assert_eq!(only.as_array().map(Vec::len), Some(1), "{only}");

    let summary = rayctl_json(&c, &["summary", "tasks"])?;
    let by = summary["by_name"].as_object().context("by_name")?;
    let (_, counts) = by
        .iter()
        .find(|(k, _)| k.ends_with("where_am_i"))
        .context("where_am_i in the summary")?;
    assert_eq!(counts["FINISHED"], 5, "{summary}");

    let objects = rayctl_json(
        &c,
        &[
            "list",
            "objects",
            "--filter",
            &format!("object_id={object}"),
        ],
    )?;
    assert_eq!(objects.as_array().map(Vec::len), Some(1), "{objects}");
    assert_eq!(objects[0]["copy"], "PRIMARY");
    assert!(
        objects[0]["size"].as_u64().is_some_and(|s| s >= 1 << 20),
        "{objects}"
    );

    let pgs = rayctl_json(
        &c,
        &["list", "placement-groups", "--filter", "name=intro-pg"],
    )?;
    assert_eq!(pgs.as_array().map(Vec::len), Some(1), "{pgs}");
    assert_eq!(pgs[0]["placement_group_id"], pg.as_str(), "{pgs}");
    assert_eq!(pgs[0]["state"], "CREATED");
    let stuck = rayctl_json(
        &c,
        &["list", "placement-groups", "--filter", "state=PENDING"],
    )?;
    assert_eq!(stuck.as_array().map(Vec::len), Some(1), "{stuck}");
    assert_eq!(stuck[0]["name"], "intro-stuck", "{stuck}");

    // The actor and the group that wait are the cluster's pending demand, by kind (the
    // managers' rounds set why they wait, so poll).
    let demand = wait_for(
        "the waiting actor and group in the cluster's demand",
        Duration::from_secs(30),
        || {
            let d = c.status(None).ok()?["pending_demand"].clone();
            let of = |kind: &str| {
                d.as_array()?
                    .iter()
                    .find(|x| x["kind"] == kind && x["shape"]["unobtainium"] == 1.0)
                    .cloned()
            };
            let actor = of("actor")?;
            let group = of("placement_group:STRICT_SPREAD")?;
            (actor["infeasible"] == 1 && group["infeasible"] == 2).then_some(d)
        },
    )?;
    for d in demand.as_array().context("demand")? {
        assert_eq!(d["queued"], 0, "nothing here waits only for room: {demand}");
    }

    let mem = rayctl_json(&c, &["memory"])?;
    let driver_pid = r["pid"].as_u64().context("pid")?;
    let owner = mem
        .as_array()
        .context("nodes")?
        .iter()
        .flat_map(|n| n["processes"].as_array().cloned().unwrap_or_default())
        .find(|p| p["pid"].as_u64() == Some(driver_pid))
        .context("the driver in rayctl memory")?;
    assert!(
        owner["objects_owned"].as_u64().is_some_and(|n| n >= 1),
        "{owner}"
    );
    assert!(
        mem.as_array()
            .context("nodes")?
            .iter()
            .any(|n| n["used_bytes"].as_u64().is_some_and(|u| u >= 1 << 20)),
        "{mem}"
    );

    // Bad input: a clear error.
    let (code, _, err) = c.rayctl(&[
        "list",
        "actors",
        "--address",
        &c.head_addrs.join(","),
        "--filter",
        "colour=red",
    ])?;
    assert_ne!(code, 0);
    assert!(err.contains("no field \"colour\""), "{err}");
    d.finish(Duration::from_secs(30))
}

/// Running (a process that exited but is not reaped yet, as under a stopped parent, is not).
fn pid_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// A node frozen (SIGSTOP) long enough to be declared dead is a zombie when it wakes: its
/// actor copy stops serving on its own before the actor restarts elsewhere (the node stopped
/// renewing its lease), the caller moves to the new copy, and the woken node, fenced,
/// re-registers without bringing the old copy back.
#[test]
fn a_zombie_node_keeps_no_second_copy_of_an_actor() -> Result<()> {
    // A node timeout of 4 s: the old copy's serving lease ends 0.8 s before the leader may
    // restart the actor, a margin a loaded 2-core machine's scheduler cannot eat (with 2.5 s
    // it was 0.5 s, and CI once checked the old pid before its watchdog had run).
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 2,
        node_resources: vec![("slot".into(), 1.0)],
        health_threshold: 8,
        ..Default::default()
    })?;
    let mut d = Driver::start(driver_bin(), &c, &["zombie"], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["value"], 5, "{r}");
    let old_pid = r["pid"].as_u64().context("pid")?;
    let node = r["node"].as_str().context("node")?.to_owned();
    let i = (0..2)
        .find(|i| c.nodes[*i].ready["node_id"] == node.as_str())
        .context("the actor is not on a worker node")?;
    assert!(pid_alive(old_pid));
    c.nodes[i].signal(nix::sys::signal::Signal::SIGSTOP)?;
    let actor_id = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let list = rt.block_on(
            c.client()
                .call(|mut cl| async move { cl.list_actors(pb::ListActorsRequest {}).await }),
        )?;
        list.actors.first().context("no actor")?.actor_id.clone()
    };
    // Restarted elsewhere; by then the frozen node's copy is gone.
    let restarted = wait_for("the actor alive again", Duration::from_secs(60), || {
        actor(&c, &actor_id)
            .ok()
            .filter(|a| a.state == pb::ActorState::Alive as i32 && a.num_restarts == 1)
    })?;
    assert!(
        !pid_alive(old_pid),
        "the frozen node's copy (pid {old_pid}) still runs beside the restarted one ({restarted:?})"
    );
    assert_ne!(restarted.node_id, node);
    d.next_step()?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(
        r["value"], 1,
        "the caller did not reach the restarted copy: {r}"
    );
    assert_eq!(r["restarts"], 1, "{r}");
    // Wake the zombie: it is fenced, registers anew, and the actor stays where it is.
    c.nodes[i].signal(nix::sys::signal::Signal::SIGCONT)?;
    wait_for(
        "the woken node registered again",
        Duration::from_secs(60),
        || {
            let s = c.status(None).ok()?;
            (Cluster::nodes_in_state(&s, "ALIVE").len() == 3).then_some(())
        },
    )?;
    std::thread::sleep(Duration::from_secs(2));
    d.next_step()?;
    let r = d.result(Duration::from_secs(60))?;
    assert_eq!(r["value"], 2, "{r}");
    assert_eq!(
        r["restarts"], 1,
        "the actor restarted again after the zombie came back: {r}"
    );
    assert_eq!(r["pid"], restarted.pid, "{r}");
    d.finish(Duration::from_secs(30))
}

/// `max_task_retries`: a call in flight when the actor's worker dies runs again on the
/// restarted actor (1), or fails with ActorUnavailable (0); the actor serves later calls.
#[test]
fn calls_in_flight_are_retried_on_the_restarted_actor_within_max_task_retries() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    let r = run(&c, &["retries"])?;
    // Restarted from its constructor (100), the retried call makes it 101.
    assert_eq!(r["retries_1"]["first"]["value"], 101, "{r}");
    assert_eq!(r["retries_1"]["next"], 102, "{r}");
    assert_eq!(r["retries_1"]["restarts"], 1, "{r}");
    assert_eq!(r["retries_0"]["first"]["error"], "ActorUnavailable", "{r}");
    assert!(
        r["retries_0"]["first"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_task_retries=0")),
        "{r}"
    );
    assert_eq!(r["retries_0"]["next"], 101, "{r}");
    assert_eq!(r["retries_0"]["restarts"], 1, "{r}");
    Ok(())
}
