//! Faults of the heads: kill, isolation, flapping partitions, pauses (SIGSTOP and the
//! cgroup freezer), whole-group crashes (also at fail points), full disks, membership
//! changes.

use super::*;

pub(super) fn leader_kill(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    run.fault(&format!("kill -9 head-{l}, the leader"));
    run.kill_head(l);
    let t0 = Instant::now();
    let new = run.c.wait_leader(Duration::from_secs(30))?;
    run.detect_s = Some(t0.elapsed().as_secs_f64());
    run.hist.event(format!("head-{new} leads"));
    pause(Duration::from_secs(5).saturating_sub(t0.elapsed()))?;
    run.heal(&format!("restart head-{l}"));
    run.restart_heads(&[l])?;
    run.until_end(started)
}

pub(super) fn leader_isolated(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    let (_, old_term) = run.c.head_view(l).context("the leader's view")?;
    let rest = run.others(&[l]);
    run.fault(&format!(
        "head-{l}, the leader, cut off from heads and nodes {rest:?}"
    ));
    run.c.partition(&[l], &rest)?;
    let t0 = Instant::now();
    // A new leader among the majority, in a later term.
    let majority: Vec<usize> = (0..run.c.heads.len()).filter(|h| *h != l).collect();
    let elected = crate::wait_for(
        "a new leader on the majority side",
        Duration::from_secs(15),
        || {
            majority.iter().find_map(|h| {
                let (role, term) = run.c.head_view(*h)?;
                (role == "leader" && term > old_term).then_some(*h)
            })
        },
    );
    let took = t0.elapsed().as_secs_f64();
    run.checks.push(Check::new(
        "new-leader-elected",
        elected.is_ok(),
        match &elected {
            Ok(h) => format!("head-{h} leads {took:.2} s after the cut"),
            Err(e) => format!("{e:#}"),
        },
    ));
    run.detect_s = Some(took);
    pause(run.duration.mul_f64(0.4).min(Duration::from_secs(10)))?;
    run.heal(&format!("head-{l} rejoins"));
    run.c.heal()?;
    run.until_end(started)
}

pub(super) fn flapping(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let heads = run.c.heads.len();
    while started.elapsed() + Duration::from_secs(2) <= run.duration {
        let h = run.rng.below(heads as u64) as usize;
        let rest = run.others(&[h]);
        match run.rng.below(3) {
            0 => {
                run.fault(&format!("head-{h} cut off both ways"));
                run.c.partition(&[h], &rest)?;
            }
            1 => {
                run.fault(&format!("head-{h} hears nobody (one way)"));
                run.c.one_way(&rest, &[h])?;
            }
            _ => {
                run.fault(&format!("nobody hears head-{h} (one way)"));
                run.c.one_way(&[h], &rest)?;
            }
        }
        pause(Duration::from_secs(2))?;
    }
    run.heal("all links");
    run.c.heal()?;
    run.until_end(started)
}

/// A process frozen in a cgroup of its own (the v1 freezer, else v2's `cgroup.freeze`),
/// thawed and the cgroup removed on drop.
pub(super) struct Frozen {
    dir: PathBuf,
    pid: i32,
    v2: bool,
}

impl Frozen {
    fn freeze(pid: i32) -> Result<Self> {
        let name = format!("rcn{}frz{pid}", std::process::id());
        let v1 = PathBuf::from("/sys/fs/cgroup/freezer");
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists());
        let (dir, v2) = if v1.join("freezer.state").exists() || v1.join("tasks").exists() {
            (v1.join(name), false)
        } else if let Some(root) = v2 {
            (root.join(name), true)
        } else {
            bail!("no cgroup freezer on this machine (neither v1 nor v2 is mounted)");
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let f = Frozen { dir, pid, v2 };
        std::fs::write(f.dir.join("cgroup.procs"), pid.to_string())?;
        if v2 {
            std::fs::write(f.dir.join("cgroup.freeze"), "1")?;
        } else {
            std::fs::write(f.dir.join("freezer.state"), "FROZEN")?;
        }
        Ok(f)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.v2 {
            let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        } else {
            let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::write(parent.join("cgroup.procs"), self.pid.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes freezer cgroups a killed run left (thawing what is in them).
pub fn clean_freezers() {
    for root in [
        "/sys/fs/cgroup/freezer",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ] {
        let Ok(rd) = std::fs::read_dir(root) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("rcn")
                .and_then(|r| r.split("frz").next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let _ = std::fs::write(e.path().join("freezer.state"), "THAWED");
            let _ = std::fs::write(e.path().join("cgroup.freeze"), "0");
            if let Ok(procs) = std::fs::read_to_string(e.path().join("cgroup.procs")) {
                for p in procs.lines() {
                    let _ = std::fs::write(std::path::Path::new(root).join("cgroup.procs"), p);
                }
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

pub(super) fn leader_pause(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    let hold = run.duration.mul_f64(0.3).min(Duration::from_secs(10));
    pause(run.random_start())?;
    let l = run.leader()?;
    run.fault(&format!("SIGSTOP head-{l}, the leader, for {hold:?}"));
    run.killed.insert(run.c.heads[l].name.clone());
    run.c.heads[l].signal(Signal::SIGSTOP)?;
    pause(hold)?;
    run.heal(&format!("SIGCONT head-{l}"));
    run.c.heads[l].signal(Signal::SIGCONT)?;
    run.killed.remove(&run.c.heads[l].name);
    pause(Duration::from_secs(3))?;
    let l = run.leader()?;
    let pid = run.c.heads[l].pid().context("the leader's pid")?;
    match Frozen::freeze(pid) {
        Ok(frozen) => {
            run.fault(&format!(
                "head-{l}, the leader, frozen (cgroup freezer) for {hold:?}"
            ));
            pause(hold)?;
            run.heal(&format!("thaw head-{l}"));
            drop(frozen);
        }
        Err(e) => run
            .notes
            .push(format!("the freezer half was skipped: {e:#}")),
    }
    run.until_end(started)
}

pub(super) fn crash_restart_all(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let before = workload::head_infos(&run.target)
        .into_iter()
        .flatten()
        .map(|i| i.last_applied)
        .max()
        .unwrap_or(0);
    let all: Vec<usize> = (0..run.c.heads.len()).collect();
    run.fault("kill -9 every head");
    let t0 = Instant::now();
    for &i in &all {
        run.kill_head(i);
    }
    let spread = t0.elapsed();
    pause(Duration::from_secs(1))?;
    run.heal("restart every head");
    run.restart_heads(&all)?;
    let l = run.leader()?;
    let after = crate::wait_for("the log back at its index", Duration::from_secs(30), || {
        let m = workload::head_infos(&run.target)
            .into_iter()
            .flatten()
            .map(|i| i.last_log_index)
            .max()?;
        (m >= before).then_some(m)
    });
    run.checks.push(Check::new(
        "recovered-index",
        after.is_ok(),
        format!(
            "applied index {before} before the kill (all {} killed within {spread:?}); \
             head-{l} leads after the restart; log index after: {}",
            all.len(),
            after
                .as_ref()
                .map_or_else(|e| format!("{e:#}"), ToString::to_string)
        ),
    ));
    run.until_end(started)
}

pub(super) fn stores_on_tmpfs() -> NetOptions {
    NetOptions {
        store_tmpfs: Some("32m".into()),
        ..three_heads_one_node()
    }
}

pub(super) fn disk_full(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    for leader in [true, false] {
        let l = run.leader()?;
        let h = if leader {
            l
        } else {
            (l + 1 + run.rng.below(2) as usize) % run.c.heads.len()
        };
        let role = if leader { "the leader" } else { "a follower" };
        run.fault(&format!("head-{h}'s store full ({role})"));
        run.killed.insert(run.c.heads[h].name.clone());
        run.c.stores[h].fill()?;
        let t0 = Instant::now();
        let exited = crate::wait_for(
            &format!("head-{h} to exit"),
            Duration::from_secs(30),
            || run.c.heads[h].exited().then_some(()),
        );
        let took = t0.elapsed().as_secs_f64();
        let log = std::fs::read_to_string(run.c.heads[h].log_path()).unwrap_or_default();
        let status = run.c.heads[h].exit_status;
        let named = log.contains("No space left on device");
        run.checks.push(Check::new(
            &format!("full-{}-exits", if leader { "leader" } else { "follower" }),
            exited.is_ok() && status.is_some_and(|s| !s.success()) && named,
            format!(
                "head-{h} ({role}) exited {took:.1} s after its disk filled, with {status:?}; \
                 its log names ENOSPC: {named}"
            ),
        ));
        if leader {
            run.detect_s = Some(took);
        }
        pause(Duration::from_secs(2))?;
        run.heal(&format!("free head-{h}'s disk, restart it"));
        run.c.stores[h].free()?;
        run.restart_heads(&[h])?;
        // It catches up with the others.
        let caught = crate::wait_for(
            &format!("head-{h} to catch up"),
            Duration::from_secs(30),
            || {
                let infos = workload::head_infos(&run.target);
                let mine = infos.get(h)?.as_ref()?.last_applied;
                let best = infos.iter().flatten().map(|i| i.last_applied).max()?;
                (mine + 50 >= best).then_some(mine)
            },
        );
        run.checks.push(Check::new(
            &format!(
                "full-{}-rejoins",
                if leader { "leader" } else { "follower" }
            ),
            caught.is_ok(),
            format!(
                "head-{h} restarted on the freed disk and applied up to {}",
                caught
                    .as_ref()
                    .map_or_else(|e| format!("{e:#}"), ToString::to_string)
            ),
        ));
        pause(Duration::from_secs(2))?;
    }
    run.until_end(started)
}

pub(super) fn with_spare_head() -> NetOptions {
    NetOptions {
        spare_heads: 1,
        ..three_heads_one_node()
    }
}

/// `rayctl operator raft ARGS… --address <every head>` from the observer, with the peer
/// secret: (exit code, stdout, stderr).
pub(super) fn operator(run: &Run, args: &[&str]) -> Result<(i32, String, String)> {
    let mut cmd = std::process::Command::new(crate::rayctl_bin()?);
    cmd.args(["operator", "raft"]).args(args);
    if args[0] != "list-peers" {
        cmd.arg("--peer-secret-file")
            .arg(run.c.path().join("peer_secret"));
    }
    let out = cmd
        .arg("--address")
        .arg(run.target.heads.join(","))
        .env("RAYCTL_TMPDIR", run.c.path())
        .env(protocol::AUTH_TOKEN_ENV, &run.c.token)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The group's voters, as `rayctl operator raft list-peers` reports them.
pub(super) fn voters(run: &Run) -> Option<Vec<String>> {
    let (code, out, _) = operator(run, &["list-peers", "-o", "json"]).ok()?;
    if code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let mut p: Vec<String> = v["peers"]
        .as_array()?
        .iter()
        .filter(|p| p["voter"].as_bool() == Some(true))
        .filter_map(|p| p["address"].as_str().map(str::to_string))
        .collect();
    p.sort();
    Some(p)
}

pub(super) fn membership_change(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    let old = run.c.head_addrs[l].clone();
    let kill = run.rng.below(2) == 0;
    if kill {
        run.fault(&format!("kill -9 head-{l}, the leader"));
        run.kill_head(l);
    } else {
        let rest = run.others(&[run.c.head_host(l)]);
        run.fault(&format!("head-{l}, the leader, cut off"));
        run.c.partition(&[run.c.head_host(l)], &rest)?;
    }
    // Both changes at once: the join (the new head asks the leader) and the removal.
    run.hist
        .event(format!("head-3 joins while head-{l} is removed"));
    let removal = {
        let bin = crate::rayctl_bin()?;
        let mut cmd = std::process::Command::new(bin);
        cmd.args([
            "operator",
            "raft",
            "remove-peer",
            &old,
            "--peer-secret-file",
        ])
        .arg(run.c.path().join("peer_secret"))
        .arg("--address")
        .arg(run.target.heads.join(","))
        .env("RAYCTL_TMPDIR", run.c.path())
        .env(protocol::AUTH_TOKEN_ENV, &run.c.token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd.spawn()?
    };
    let joined = run.c.join_head();
    let removal = removal.wait_with_output()?;
    let mut refused_once = None;
    if !removal.status.success() {
        // One change at a time: a removal refused while the join was in flight is retried.
        refused_once = Some(String::from_utf8_lossy(&removal.stderr).trim().to_string());
        let (code, _, err) =
            crate::wait_for("the removal to go through", Duration::from_secs(30), || {
                let r = operator(run, &["remove-peer", &old]).ok()?;
                (r.0 == 0 || r.0 == 4).then_some(r)
            })?;
        anyhow::ensure!(code == 0 || code == 4, "remove-peer {old}: {err}");
    }
    let j = joined.context("the fourth head joining")?;
    let mut want: Vec<String> = run
        .c
        .head_addrs
        .iter()
        .filter(|a| **a != old)
        .cloned()
        .collect();
    want.sort();
    let mut last = None;
    let got = crate::wait_for("the new membership", Duration::from_secs(60), || {
        let v = operator(run, &["list-peers", "-o", "json"]).ok();
        last.clone_from(&v);
        voters(run).filter(|v| *v == want)
    });
    run.checks.push(Check::new(
        "membership-changed",
        got.is_ok(),
        format!(
            "voters {} (want {want:?}); head-{j} joined; a concurrent change refused first: \
             {refused_once:?}{}",
            got.as_ref()
                .map_or_else(|e| format!("{e:#}"), |v| format!("{v:?}")),
            if got.is_ok() {
                String::new()
            } else {
                format!(
                    "; the removal said {:?}; list-peers last said {last:?}",
                    String::from_utf8_lossy(&removal.stderr).trim()
                )
            }
        ),
    ));
    run.members = Some(want.clone());
    // The removed head returns (restarted or reconnected) and must not disrupt the group.
    let term_before = run
        .c
        .head_view(run.leader()?)
        .map(|v| v.1)
        .context("the leader's term")?;
    if kill {
        run.heal(&format!("restart head-{l}, no longer a member"));
        run.restart_heads(&[l])?;
    } else {
        run.heal(&format!("head-{l}, no longer a member, reconnected"));
        run.c.heal()?;
    }
    pause(Duration::from_secs(5))?;
    let leader_now = run.leader()?;
    let term_after = run.c.head_view(leader_now).map(|v| v.1).unwrap_or(u64::MAX);
    run.checks.push(Check::new(
        "removed-head-harmless",
        term_after == term_before && leader_now != l,
        format!(
            "the group's term {term_before} before head-{l} returned, {term_after} 5 s after; head-{leader_now} leads"
        ),
    ));
    run.until_end(started)
}

pub(super) fn frequent_snapshots() -> NetOptions {
    NetOptions {
        head_args: vec![
            "--raft-snapshot-interval=50".into(),
            "--raft-logs-to-keep=20".into(),
        ],
        ..three_heads_one_node()
    }
}

pub(super) fn crash_at_failpoints(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start() / 2)?;
    let all: Vec<usize> = (0..run.c.heads.len()).collect();
    let mut fired = Vec::new();
    for fp in [
        "raft-log-flush-before",
        "raft-log-flush-after",
        "raft-apply-before-reply",
        "raft-snapshot-build-mid",
    ] {
        // Each head crashes the n-th time it reaches the point (n seeded, small), all
        // restarted at once with the point armed.
        let n = 1 + run.rng.below(if fp.starts_with("raft-snapshot") {
            2
        } else {
            20
        });
        let spec = format!("{fp}={n}*off->panic");
        run.fault(&format!("every head restarted with FAILPOINTS={spec}"));
        for &i in &all {
            run.killed.insert(run.c.heads[i].name.clone());
            run.c.set_env(i, "FAILPOINTS", Some(&spec));
        }
        run.c.relaunch_heads(&all)?;
        let crashed = wait_heads_exit(run, &all, Duration::from_secs(30));
        run.hist
            .event(format!("{crashed} of {} heads crashed at {fp}", all.len()));
        fired.push(format!("{fp}: {crashed}/{}", all.len()));
        for &i in &all {
            run.c.set_env(i, "FAILPOINTS", None);
        }
        run.heal("every head restarted without fail points");
        run.restart_heads(&all)?;
        run.leader()?;
        pause(Duration::from_millis(500))?;
    }
    // A follower that lags behind the purged log gets a snapshot, and crashes installing it.
    let l = run.leader()?;
    let f = (l + 1) % all.len();
    run.fault(&format!(
        "head-{f} (a follower) down while the log moves on"
    ));
    run.kill_head(f);
    let lead_index = |run: &Run| {
        workload::head_infos(&run.target)
            .get(l)
            .cloned()
            .flatten()
            .map(|i| i.last_log_index)
    };
    let from = lead_index(run).unwrap_or(0);
    crate::wait_for("the log 150 entries on", Duration::from_secs(60), || {
        (lead_index(run)? > from + 150).then_some(())
    })?;
    let spec = "raft-snapshot-install-mid=panic";
    run.fault(&format!("head-{f} restarted with FAILPOINTS={spec}"));
    run.c.set_env(f, "FAILPOINTS", Some(spec));
    run.c.relaunch_heads(&[f])?;
    let crashed = wait_heads_exit(run, &[f], Duration::from_secs(30));
    fired.push(format!("raft-snapshot-install-mid: {crashed}/1"));
    run.c.set_env(f, "FAILPOINTS", None);
    run.heal(&format!("head-{f} restarted without fail points"));
    run.restart_heads(&[f])?;
    let some_fired = !fired.iter().any(|f| f.contains(": 0/"));
    run.checks.push(Check::new(
        "fail-points-fired",
        some_fired,
        format!("heads crashed at each point: {}", fired.join(", ")),
    ));
    // Node-0 crashes after spawning a job's driver, before telling the head.
    let host = run.c.node_host(0);
    run.fault("node-0 restarted with FAILPOINTS=job-agent-start=panic");
    run.killed.insert(run.c.nodes[0].name.clone());
    run.c
        .set_env(host, "FAILPOINTS", Some("job-agent-start=panic"));
    run.c.restart_node(0)?;
    let crashed = crate::wait_for(
        "node-0 to crash at a job start",
        Duration::from_secs(30),
        || run.c.nodes[0].exited().then_some(()),
    );
    run.c.set_env(host, "FAILPOINTS", None);
    run.checks.push(Check::new(
        "job-start-crash-fired",
        crashed.is_ok(),
        match &crashed {
            Ok(()) => "node-0 crashed between spawning a driver and reporting it".to_string(),
            Err(e) => format!("{e:#}"),
        },
    ));
    run.heal("node-0 restarted without fail points");
    run.c.restart_node(0)?;
    run.killed.remove(&run.c.nodes[0].name);
    run.until_end(started)
}

/// Head `h`'s Raft store, opened raw (the head is down), as another build would have left
/// it: `edit` changes it; flushed and closed before returning.
fn edit_store(run: &Run, h: usize, edit: impl FnOnce(&sled::Db) -> Result<()>) -> Result<()> {
    let dir = run.c.path().join(format!("head-{h}")).join("raft");
    let db = sled::open(&dir).with_context(|| format!("open {}", dir.display()))?;
    edit(&db)?;
    db.flush()?;
    Ok(())
}

/// Starts head `h` and waits for it to exit on its own (30 s at most); its exit and the log
/// lines it wrote since `from` bytes.
fn start_expecting_refusal(run: &mut Run, h: usize, from: usize) -> (bool, String) {
    if run.c.relaunch_heads(&[h]).is_err() {
        return (false, String::new());
    }
    let exited = wait_heads_exit(run, &[h], Duration::from_secs(30)) == 1;
    let log = std::fs::read_to_string(run.c.heads[h].log_path()).unwrap_or_default();
    (exited, log.get(from..).unwrap_or_default().to_string())
}

pub(super) fn format_drift(run: &mut Run) -> Result<()> {
    let started = Instant::now();
    pause(run.random_start())?;
    let l = run.leader()?;
    let h = (l + 1 + run.rng.below(2) as usize) % run.c.heads.len();
    let log_len =
        |run: &Run| std::fs::metadata(run.c.heads[h].log_path()).map_or(0, |m| m.len() as usize);
    run.fault(&format!(
        "head-{h}'s store stamped with format 99 (a newer build's)"
    ));
    run.kill_head(h);
    let mut own_stamp = None;
    edit_store(run, h, |db| {
        own_stamp = db.open_tree("meta")?.get("format")?;
        db.open_tree("meta")?
            .insert("format", &99u32.to_be_bytes())?;
        Ok(())
    })?;
    let from = log_len(run);
    let (exited, said) = start_expecting_refusal(run, h, from);
    let named = said.contains("written by format version 99");
    run.checks.push(Check::new(
        "unknown-format-refused",
        exited && named,
        format!(
            "head-{h} exited: {exited}; it named the format: {named}{}",
            if named {
                String::new()
            } else {
                format!(
                    " (its log: {:?})",
                    said.chars()
                        .rev()
                        .take(300)
                        .collect::<String>()
                        .chars()
                        .rev()
                        .collect::<String>()
                )
            }
        ),
    ));
    // Format 2 kept the log in sled; this build moves such a log into its WAL on start,
    // decoding every entry first.
    run.fault(&format!(
        "head-{h}'s store at format 2 (the log in sled), with a log entry of version 99 there"
    ));
    let mut planted = 0u64;
    edit_store(run, h, |db| {
        db.open_tree("meta")?
            .insert("format", &2u32.to_be_bytes())?;
        let logs = db.open_tree("logs")?;
        let last = logs
            .last()?
            .map(|(k, _)| u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        planted = last + 1;
        // Version 99 (a postcard varint), then bytes this build cannot know.
        logs.insert(planted.to_be_bytes(), &[99u8, 1, 2, 3, 4][..])?;
        Ok(())
    })?;
    let from = log_len(run);
    let (exited, said) = start_expecting_refusal(run, h, from);
    let named = said.contains("log entry was written by format version 99");
    run.checks.push(Check::new(
        "unknown-entry-refused",
        exited && named,
        format!(
            "head-{h} exited: {exited}; it named the entry's version: {named}{}",
            if named {
                String::new()
            } else {
                format!(
                    " (its log: {:?})",
                    said.chars()
                        .rev()
                        .take(300)
                        .collect::<String>()
                        .chars()
                        .rev()
                        .collect::<String>()
                )
            }
        ),
    ));
    run.heal(&format!("head-{h}'s store put back; restart it"));
    edit_store(run, h, |db| {
        db.open_tree("logs")?.remove(planted.to_be_bytes())?;
        if let Some(stamp) = &own_stamp {
            db.open_tree("meta")?.insert("format", stamp)?;
        }
        Ok(())
    })?;
    run.restart_heads(&[h])?;
    let caught = crate::wait_for(
        &format!("head-{h} to catch up"),
        Duration::from_secs(30),
        || {
            let infos = workload::head_infos(&run.target);
            let mine = infos.get(h)?.as_ref()?.last_applied;
            let best = infos.iter().flatten().map(|i| i.last_applied).max()?;
            (mine + 50 >= best).then_some(mine)
        },
    );
    run.checks.push(Check::new(
        "drifted-head-rejoins",
        caught.is_ok(),
        format!(
            "head-{h}, its store put back, applied up to {}",
            caught
                .as_ref()
                .map_or_else(|e| format!("{e:#}"), ToString::to_string)
        ),
    ));
    run.until_end(started)
}
