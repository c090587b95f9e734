//! Faults of the surroundings: lossy, duplicating and capped links; skewed clocks.

use super::*;

/// libfaketime, as Debian's `faketime` package installs it.
pub(super) const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Every daemon's wall clock follows its own file (`{dir}/clock-<host>`, re-read every
/// second): no file, no skew. Monotonic time stays real, as under an NTP step.
pub(super) fn skewable() -> NetOptions {
    let mut o = three_heads_one_node();
    o.env = (0..o.heads + o.nodes)
        .map(|h| {
            let env = [
                ("LD_PRELOAD", LIBFAKETIME.to_string()),
                ("FAKETIME_TIMESTAMP_FILE", format!("{{dir}}/clock-{h}")),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
                ("FAKETIME_CACHE_DURATION", "1".into()),
            ];
            (h, env.map(|(k, v)| (k.to_string(), v)).to_vec())
        })
        .collect();
    o
}

pub(super) fn lossy_links(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let hosts: Vec<usize> = (0..run.c.hosts.len()).collect();
    let phase = run.duration / 4;
    run.fault("10 % loss on every host");
    run.c.lossy(&hosts, 10)?;
    pause(phase)?;
    run.fault("30 % loss on every host");
    run.c.lossy(&hosts, 30)?;
    pause(phase)?;
    run.fault("every packet between hosts sent twice");
    run.c.heal()?;
    run.c.duplicate(&hosts)?;
    pause(phase)?;
    let l = run.leader()?;
    run.fault(&format!(
        "1 Mbit/s cap on head-{l}, the leader, and 10 % loss"
    ));
    run.c.lossy(&hosts, 10)?;
    run.c.cap_bandwidth(l, "1mbit")?;
    run.until_end(started)?;
    run.heal("no loss, no cap");
    run.c.heal()?;
    run.c.uncap_bandwidth(l)?;
    let dead = check::nodes_declared_dead(&run.hist.snapshot());
    run.checks.push(Check::new(
        "no-node-declared-dead",
        dead.is_empty(),
        format!("nodes the leader called DEAD: {dead:?}"),
    ));
    run.notes
        .push("no netem in this kernel: loss and bandwidth only, no added delay".into());
    Ok(())
}

pub(super) fn clock_skew(run: &mut Run) -> Result<()> {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        bail!("{LIBFAKETIME} is missing: apt-get install faketime (.ci/run does)");
    }
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    let node_host = run.c.node_host(0);
    let phase = run.duration / 4;
    let set = |run: &Run, skew: &str| -> Result<()> {
        for h in [l, node_host] {
            std::fs::write(run.c.path().join(format!("clock-{h}")), format!("{skew}\n"))?;
        }
        Ok(())
    };
    for (skew, what) in [
        ("+1h", "an hour fast"),
        ("-1d", "a day slow"),
        ("+0 x2", "running at twice the speed"),
    ] {
        run.fault(&format!(
            "the wall clocks of head-{l} (the leader) and node-0 {what} ({skew})"
        ));
        set(run, skew)?;
        pause(phase)?;
    }
    run.heal("every clock true again");
    set(run, "+0")?;
    let rec = run.hist.snapshot();
    let terms = check::leader_terms(&rec);
    run.checks.push(Check::new(
        "no-elections",
        terms == 1,
        format!("{terms} term(s) had a leader: wall-clock jumps must not cause elections"),
    ));
    let dead = check::nodes_declared_dead(&rec);
    run.checks.push(Check::new(
        "no-node-declared-dead",
        dead.is_empty(),
        format!("nodes the leader called DEAD: {dead:?}"),
    ));
    run.until_end(started)?;
    run.require_jobs_succeeded = true;
    run.after = Some(skew_seen);
    Ok(())
}

/// The skew really reached the leader: some job it accepted carries a submission time an
/// hour ahead, and some a day behind.
pub(super) fn skew_seen(jobs: &[protocol::pb::JobInfo]) -> Check {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let ahead = jobs
        .iter()
        .filter(|j| j.submitted_at_ms as i64 > now + 50 * 60_000)
        .count();
    let behind = jobs
        .iter()
        .filter(|j| (j.submitted_at_ms as i64) < now - 20 * 3_600_000)
        .count();
    Check::new(
        "skew-took-effect",
        ahead > 0 && behind > 0,
        format!(
            "jobs stamped an hour ahead: {ahead}, a day behind: {behind} (of {})",
            jobs.len()
        ),
    )
}
