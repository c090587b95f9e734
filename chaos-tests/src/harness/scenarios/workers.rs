//! Faults of the worker side: a node killed mid-DAG, a zombie node with an actor, an
//! exhausted object store.

use super::*;

pub(super) fn worker_kill_dag(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let (chains, steps) = (20u64, 10u64);
    let mut d = driver(
        run,
        0,
        "sdk_driver",
        &["chain", &chains.to_string(), &steps.to_string()],
    )?;
    let strike = chains * run.rng.between(2.0, 5.0) as u64;
    crate::wait_for("the DAG under way", Duration::from_secs(120), || {
        d.stdout_lines()
            .iter()
            .filter_map(|l| l.strip_prefix("PROGRESS ")?.parse::<u64>().ok())
            .any(|n| n >= strike)
            .then_some(())
    })
    .with_context(|| format!("driver output:\n{}", d.output()))?;
    let id = run.c.nodes[0].ready["node_id"]
        .as_str()
        .context("node-0's id")?
        .to_string();
    run.fault(&format!(
        "kill -9 node-0 after {strike} of {} tasks",
        chains * (steps + 1)
    ));
    run.killed.insert(run.c.nodes[0].name.clone());
    run.c.nodes[0].kill9();
    let t0 = Instant::now();
    run.detect_s = detect_dead(run, &id, t0);
    run.checks.push(Check::new(
        "dead-node-detected",
        run.detect_s.is_some_and(|s| s <= 10.0),
        format!(
            "node-0 declared DEAD after {:?} s (at most 10 s)",
            run.detect_s
        ),
    ));
    pause(Duration::from_secs(5).saturating_sub(t0.elapsed()))?;
    run.heal("restart node-0");
    run.c.restart_node(0)?;
    run.killed.remove(&run.c.nodes[0].name);
    let r = d.result(Duration::from_secs(240))?;
    let mismatches = r["mismatches"].as_u64().unwrap_or(u64::MAX)
        + r["put_mismatches"].as_u64().unwrap_or(u64::MAX);
    let errors = r["errors"].as_array().map_or(0, Vec::len);
    run.checksum_mismatch += mismatches as usize;
    run.checks.push(Check::new(
        "checksums",
        mismatches == 0,
        format!(
            "{} tasks: {} chain results and {} put objects differ from what was recorded",
            r["tasks"], r["mismatches"], r["put_mismatches"]
        ),
    ));
    run.checks.push(Check::new(
        "dag-complete",
        errors == 0,
        format!(
            "every task's result arrived (lineage rebuilt what node-0 held); errors: {}",
            r["errors"]
        ),
    ));
    run.until_end(started)
}

/// I8 under a partition: the actor's worker node (and, on a seeded coin, the leader) cut
/// off while a caller on that node keeps calling; the majority restarts the actor elsewhere
/// only once the old copy is gone, and the old copy answers nothing sent after that.
pub(super) fn zombie_worker(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let name = format!("zombie-{}", run.target.tag);
    driver(run, 0, "actor_driver", &["detached", &name])?.result(Duration::from_secs(120))?;
    let a = workload::actor_named(&run.target, &run.target.heads, &name).context("the actor")?;
    let w = run
        .c
        .nodes
        .iter()
        .position(|n| n.ready["node_id"].as_str() == Some(a.node_id.as_str()))
        .context("the actor is on a worker node")?;
    let (old_node, old_pid) = (a.node_id.clone(), a.pid as i32);
    let mut caller = driver(run, run.c.node_host(w), "actor_driver", &["caller", &name])?;
    caller.result(Duration::from_secs(60))?;
    crate::wait_for("a first acknowledged call", Duration::from_secs(60), || {
        caller
            .stdout_lines()
            .iter()
            .any(|l| l.starts_with("ACK"))
            .then_some(())
    })?;
    pause(Duration::from_millis(run.rng.below(1000)))?;
    let mut cut = vec![run.c.node_host(w)];
    let with_leader = run.rng.below(2) == 0;
    if with_leader {
        cut.push(run.leader()?);
    }
    let rest: Vec<usize> = (0..run.c.hosts.len())
        .filter(|h| !cut.contains(h))
        .collect();
    let majority: Vec<String> = (0..run.c.heads.len())
        .filter(|h| !cut.contains(h))
        .map(|h| run.c.head_addrs[h].clone())
        .collect();
    run.fault(&format!(
        "node-{w} (the actor's){} cut off",
        if with_leader { " and the leader" } else { "" }
    ));
    let cut_at = wall_ms();
    run.c.partition(&cut, &rest)?;
    let (mut exited, mut restarted) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while restarted.is_none() && Instant::now() < deadline {
        if exited.is_none() && !crate::process_alive(old_pid) {
            exited = Some(wall_ms());
        }
        if workload::actor_named(&run.target, &majority, &name).is_some_and(|a| a.num_restarts >= 1)
        {
            restarted = Some(wall_ms());
        }
        pause(Duration::from_millis(50))?;
    }
    run.detect_s = restarted.map(|r| (r - cut_at) as f64 / 1000.0);
    pause(run.duration.mul_f64(0.4).min(Duration::from_secs(10)))?;
    run.heal(&format!("node-{w} rejoins"));
    run.c.heal()?;
    let new_ack = crate::wait_for(
        "a call answered by the new copy",
        Duration::from_secs(60),
        || {
            caller
                .stdout_lines()
                .iter()
                .any(|l| l.starts_with("ACK") && !l.ends_with(&old_node))
                .then_some(())
        },
    );
    caller.send_line("stop")?;
    pause(Duration::from_millis(500))?;
    // (sent, value, node) of every acknowledgement.
    let acks: Vec<(u128, i64, String)> = caller
        .stdout_lines()
        .iter()
        .filter_map(|l| {
            let mut f = l.strip_prefix("ACK ")?.split_whitespace();
            let sent = f.next()?.parse().ok()?;
            let _recv = f.next()?;
            let value = f.next()?.parse().ok()?;
            Some((sent, value, f.next().unwrap_or_default().to_string()))
        })
        .collect();
    let mut bad = Vec::new();
    match (exited, restarted) {
        (_, None) => bad.push("the majority never restarted the actor".to_string()),
        (None, Some(_)) => bad.push(format!(
            "the old copy (pid {old_pid}) still ran at the restart"
        )),
        (Some(e), Some(r)) if e > r => bad.push(format!(
            "the old copy was gone {} ms after the cut, the restart seen at {} ms",
            e - cut_at,
            r - cut_at
        )),
        _ => {}
    }
    if let Some(r) = restarted {
        let late: Vec<_> = acks
            .iter()
            .filter(|(s, _, n)| *n == old_node && *s > r)
            .collect();
        if !late.is_empty() {
            bad.push(format!(
                "the old copy answered calls sent after the restart: {late:?}"
            ));
        }
    }
    let new_vals: Vec<i64> = acks
        .iter()
        .filter(|(_, _, n)| *n != old_node)
        .map(|(_, v, _)| *v)
        .collect();
    if let Err(e) = &new_ack {
        bad.push(format!("{e:#}"));
    }
    if !new_vals.windows(2).all(|w| w[0] < w[1]) {
        bad.push(format!("the new copy's values went back: {new_vals:?}"));
    }
    match workload::actor_named(&run.target, &run.target.heads, &name) {
        Some(a) if a.num_restarts == 1 && a.node_id != old_node => {}
        other => bad.push(format!(
            "afterwards: {other:?} (want one restart, on another node)"
        )),
    }
    run.checks.push(Check::new(
        "one-actor-instance",
        bad.is_empty(),
        if bad.is_empty() {
            format!(
                "old copy gone {} ms after the cut, before the restart at {} ms; {} acknowledgements, none from the old copy after it",
                exited.map_or(0, |e| e - cut_at),
                restarted.map_or(0, |r| r - cut_at),
                acks.len()
            )
        } else {
            bad.join("; ")
        },
    ));
    run.until_end(started)
}

pub(super) fn small_store() -> NetOptions {
    NetOptions {
        node_args: vec!["--object-store-memory=32MiB".into()],
        ..three_heads_one_node()
    }
}

pub(super) fn store_exhaustion(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let host = run.c.node_host(0);
    run.fault("three drivers fill node-0's 32 MiB store threefold (2 MiB objects, all held)");
    let mut drivers = Vec::new();
    for k in 0..3u64 {
        let seed = (run.rng.below(1000) + 1) * 10 + k;
        drivers.push(driver(
            run,
            host,
            "sdk_driver",
            &["pressure", &seed.to_string(), "16", "2"],
        )?);
    }
    let mut other = Vec::new();
    let (mut ok, mut full, mut pinned_bad, mut read_bad) = (0, 0, 0, 0);
    for d in &mut drivers {
        let r = d.result(Duration::from_secs(180))?;
        ok += r["puts_ok"].as_u64().unwrap_or(0);
        full += r["store_full"].as_u64().unwrap_or(0);
        pinned_bad += r["pinned_bad"].as_u64().unwrap_or(u64::MAX);
        read_bad += r["read_bad"].as_u64().unwrap_or(u64::MAX);
        if let Some(e) = r["other_errors"].as_array() {
            other.extend(e.iter().map(ToString::to_string));
        }
    }
    let spilled = node_metric(run, 0, "rayctl_object_store_spilled_bytes_total");
    run.heal("the drivers exit and release everything");
    drop(drivers);
    run.checks.push(Check::new(
        "store-was-exhausted",
        spilled.is_some_and(|b| b > 0.0) || full > 0,
        format!("node-0 spilled {spilled:?} bytes and refused {full} puts"),
    ));
    run.checksum_mismatch += (pinned_bad + read_bad) as usize;
    run.checks.push(Check::new(
        "store-full-is-clean",
        other.is_empty() && ok > 0,
        format!("{ok} puts stored (spilled as needed), {full} refused with ObjectStoreFull; other errors: {other:?}"),
    ));
    run.checks.push(Check::new(
        "checksums",
        pinned_bad == 0 && read_bad == 0,
        format!("held views changed: {pinned_bad}; objects read back wrong: {read_bad}"),
    ));
    run.until_end(started)
}
