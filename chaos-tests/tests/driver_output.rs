//! What a user sees on the driver's terminal without installing anything: what tasks print
//! (Ray's `log_to_driver`, prefixed `(NAME pid=PID, ip=IP)`, across nodes and through a
//! nested call; off with `Config::log_to_driver(false)`), and a warning within seconds when
//! work cannot be scheduled.

use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::driver::Driver;
use chaos_tests::{Cluster, ClusterOptions, wait_for};

fn sdk_driver() -> &'static str {
    env!("CARGO_BIN_EXE_sdk_driver")
}

fn two_nodes() -> Result<Cluster> {
    Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })
}

/// The driver's output lines that are worker output: `(NAME pid=PID, ip=IP) TEXT`.
fn prefixed(out: &str, name: &str) -> Vec<String> {
    let head = format!("({name} pid=");
    out.lines()
        .filter(|l| l.starts_with(&head) && l.contains(", ip=127.0.0.1) "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn what_tasks_print_on_another_node_reaches_the_driver_prefixed() -> Result<()> {
    // The head has no CPUs: every task runs on the worker node, while the driver is
    // attached to the head's node, so every line crosses nodes.
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        head_cpus: 0.0,
        node_cpus: 2.0,
        ..Default::default()
    })?;
    let worker_node = c.nodes[0].ready["node_id"]
        .as_str()
        .context("node id")?
        .to_owned();
    let mut d = Driver::start(sdk_driver(), &c, &["print"], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    let nodes: std::collections::BTreeSet<&str> = r["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert_eq!(nodes, [worker_node.as_str()].into(), "{r}");
    let want: Vec<String> = (0..4)
        .flat_map(|i| {
            [
                format!("stdout line from task {i}"),
                format!("stderr line from task {i}"),
            ]
        })
        .chain([
            "stdout line from task 99".into(),
            "stderr line from task 99".into(),
        ])
        .collect();
    let out = wait_for(
        "every task's lines on the driver",
        Duration::from_secs(30),
        || {
            let out = d.output();
            let lines = prefixed(&out, "chatty");
            want.iter()
                .all(|w| lines.iter().any(|l| l.ends_with(&format!(") {w}"))))
                .then_some(out)
        },
    )
    .with_context(|| format!("driver output:\n{}", d.output()))?;
    // The parent's own lines, and the nested task's lines once, with its own prefix only.
    let parent = prefixed(&out, "chatty_parent");
    assert!(
        parent.iter().any(|l| l.ends_with(") parent before")),
        "{out}"
    );
    assert!(
        parent.iter().any(|l| l.ends_with(") parent after")),
        "{out}"
    );
    assert_eq!(
        out.matches("stdout line from task 99").count(),
        1,
        "once: {out}"
    );
    assert!(
        !out.lines().any(|l| l.matches(" pid=").count() > 1),
        "no line carries two prefixes: {out}"
    );
    d.send_line("done")?;
    d.finish(Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn log_to_driver_false_keeps_the_driver_quiet() -> Result<()> {
    let c = two_nodes()?;
    let mut d = Driver::start(sdk_driver(), &c, &["quiet"], &[])?;
    d.result(Duration::from_secs(120))?;
    // Output arrives within a flush or two when it is on; give it far longer.
    std::thread::sleep(Duration::from_secs(3));
    let out = d.output();
    assert!(!out.contains("line from task"), "{out}");
    assert!(!out.contains("parent before"), "{out}");
    d.send_line("done")?;
    d.finish(Duration::from_secs(30))?;
    // The lines are still in the workers' logs.
    let logs = walk(c.path());
    assert!(
        logs.iter().any(|t| t.contains("stdout line from task 0")),
        "the worker logs keep the output"
    );
    Ok(())
}

/// The text of every `worker-*.log` below `dir`.
fn walk(dir: &std::path::Path) -> Vec<String> {
    chaos_tests::files_below(dir, &|n| n.starts_with("worker-") && n.ends_with(".log"))
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

#[test]
fn work_waiting_for_busy_nodes_is_named_on_the_drivers_stderr() -> Result<()> {
    // One node with one CPU (the head's has none): a 20 s task holds it, and a task of
    // another shape waits for it past the lease's 10 s queue timeout.
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        head_cpus: 0.0,
        node_cpus: 1.0,
        node_resources: vec![("slot".into(), 1.0)],
        ..Default::default()
    })?;
    // Both nodes registered first, and the driver runs a probe task before the two that
    // matter: a driver whose node does not see the worker node yet sees its first task as
    // infeasible, and once the node comes both tasks race for the CPU; if the short one
    // wins, nothing ever waits and no busy warning is due.
    c.wait_alive(2)?;
    let mut d = Driver::start(sdk_driver(), &c, &["busy"], &[])?;
    wait_for("the busy warning", Duration::from_secs(30), || {
        d.output()
            .contains("(rayctl) warning: tasks needing {CPU: 1, slot: 1} have waited 10s for a worker: every node that can run them is busy")
            .then_some(())
    })
    .with_context(|| format!("driver output:\n{}", d.output()))?;
    // And both run once the CPU is free.
    assert_eq!(d.result(Duration::from_secs(60))?["done"], true);
    d.finish(Duration::from_secs(30))
}

#[test]
fn work_no_node_can_run_is_named_on_the_drivers_stderr_within_seconds() -> Result<()> {
    let c = two_nodes()?;
    let start = std::time::Instant::now();
    let mut d = Driver::start(sdk_driver(), &c, &["infeasible"], &[])?;
    wait_for(
        "the infeasible task's warning",
        Duration::from_secs(10),
        || {
            let out = d.output();
            (out.contains(
                "(rayctl) warning: tasks needing {CPU: 1, unobtainium: 1} cannot be scheduled",
            ))
            .then_some(())
        },
    )
    .with_context(|| {
        format!(
            "after {:?}, driver output:\n{}",
            start.elapsed(),
            d.output()
        )
    })?;
    assert_eq!(d.result(Duration::from_secs(30))?["ready_after_2s"], 0);
    d.send_line("done")?;
    d.finish(Duration::from_secs(30))?;

    // An actor no node can host: calls to it say why they wait.
    let mut a = Driver::start(env!("CARGO_BIN_EXE_actor_driver"), &c, &["stuck"], &[])?;
    a.result(Duration::from_secs(60))?;
    wait_for("the stuck actor's warning", Duration::from_secs(20), || {
        let out = a.output();
        (out.contains("(rayctl) warning: actor actor_driver::Counter")
            && out.contains("has not started after"))
        .then_some(())
    })
    .with_context(|| format!("driver output:\n{}", a.output()))?;
    assert!(
        a.output().contains("unobtainium"),
        "names the missing resource: {}",
        a.output()
    );
    a.send_line("done")?;
    a.finish(Duration::from_secs(30))?;
    Ok(())
}
