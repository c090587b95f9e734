//! A new user's first hour, over the real `rayctl` and SDK: after `rayctl stop` the tools say
//! at once that nothing runs (and the SDK starts its own cluster, as the README promises), a
//! second `rayctl start --head` says which head runs and how to stop it, heads that died
//! without `rayctl stop` are noticed, and `--address http://HOST:8265` works as Ray users
//! type it. Each test keeps its session root, token and ports to itself.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos_tests::{free_port, rayctl_in};

fn run(mut cmd: Command) -> Result<Output> {
    Ok(cmd.stdin(std::process::Stdio::null()).output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Stops whatever `rayctl start` left in `dir`, even when the test fails.
struct Stop(std::path::PathBuf);

impl Drop for Stop {
    fn drop(&mut self) {
        if let Ok(mut c) = rayctl_in(&self.0) {
            let _ = c.args(["stop", "--force"]).output();
        }
    }
}

fn start_head(dir: &std::path::Path, port: u16, dashboard: u16) -> Result<Output> {
    let mut c = rayctl_in(dir)?;
    c.args([
        "start",
        "--head",
        "--port",
        &port.to_string(),
        "--dashboard-port",
        &dashboard.to_string(),
        "--num-cpus",
        "1",
    ]);
    run(c)
}

#[test]
fn after_rayctl_stop_status_answers_at_once_and_the_sdk_starts_its_own_cluster() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _stop = Stop(dir.path().to_owned());
    let o = start_head(dir.path(), free_port(), free_port())?;
    assert!(o.status.success(), "{}", text(&o));
    let o = run({
        let mut c = rayctl_in(dir.path())?;
        c.arg("stop");
        c
    })?;
    assert!(o.status.success(), "{}", text(&o));

    let t = Instant::now();
    let o = run({
        let mut c = rayctl_in(dir.path())?;
        c.arg("status");
        c
    })?;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "answered in {:?}",
        t.elapsed()
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = text(&o);
    assert!(
        err.contains("no cluster is running here") && err.contains("stopped at"),
        "{err}"
    );

    // The SDK does not wait for the stopped cluster: it starts a one-node cluster of its own
    // for its lifetime, runs the task, and stops it again.
    let mut c = Command::new(env!("CARGO_BIN_EXE_sdk_driver"));
    c.arg("mode")
        .env("RAYCTL_TMPDIR", dir.path())
        .env(
            protocol::auth::AUTH_TOKEN_PATH_ENV,
            dir.path().join("auth_token"),
        )
        .env_remove(protocol::AUTH_TOKEN_ENV)
        .env_remove(protocol::ADDRESS_ENV)
        .env_remove("RAYCTL_NODE_ADDRESS")
        .env_remove("RAYCTL_WORKER_ID");
    let t = Instant::now();
    let o = run(c)?;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("\"sum\":42"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    Ok(())
}

#[test]
fn a_second_head_on_the_same_port_says_which_one_runs_and_how_to_stop_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _stop = Stop(dir.path().to_owned());
    let (port, dash) = (free_port(), free_port());
    let o = start_head(dir.path(), port, dash)?;
    assert!(o.status.success(), "{}", text(&o));
    let t = Instant::now();
    let o = start_head(dir.path(), port, free_port())?;
    assert!(!o.status.success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let err = text(&o);
    assert!(
        err.contains(&format!("a head already runs here at 127.0.0.1:{port}"))
            && err.contains("rayctl stop"),
        "{err}"
    );

    // `--address http://HOST:8265`, as a Ray user types it, reaches the same cluster.
    let o = run({
        let mut c = rayctl_in(dir.path())?;
        c.args([
            "job",
            "list",
            "--address",
            &format!("http://127.0.0.1:{dash}"),
        ]);
        c
    })?;
    assert!(o.status.success(), "{}", text(&o));
    let o = run({
        let mut c = rayctl_in(dir.path())?;
        c.args([
            "status",
            "-o",
            "json",
            "--address",
            &format!("http://127.0.0.1:{dash}"),
        ]);
        c
    })?;
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["leader"], format!("127.0.0.1:{port}"));
    // A URL that is no dashboard of ours says so.
    let o = run({
        let mut c = rayctl_in(dir.path())?;
        c.args([
            "status",
            "--address",
            &format!("http://127.0.0.1:{}", free_port()),
        ]);
        c
    })?;
    assert!(!o.status.success());
    assert!(
        text(&o).contains("cannot reach the dashboard"),
        "{}",
        text(&o)
    );
    Ok(())
}

#[test]
fn heads_that_died_without_rayctl_stop_are_noticed_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _stop = Stop(dir.path().to_owned());
    let o = start_head(dir.path(), free_port(), free_port())?;
    assert!(o.status.success(), "{}", text(&o));
    // Kill every daemon the way a crash would.
    let records: Vec<serde_json::Value> = std::fs::read_dir(dir.path().join("daemons"))?
        .filter_map(Result::ok)
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    assert!(!records.is_empty());
    for r in &records {
        let pid = r["pid"].as_i64().context("pid")? as i32;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    chaos_tests::wait_for("the daemons gone", Duration::from_secs(20), || {
        records
            .iter()
            .all(|r| !chaos_tests::process_alive(r["pid"].as_i64().unwrap_or(0) as i32))
            .then_some(())
    })?;
    let t = Instant::now();
    let o = run({
        let mut c = rayctl_in(dir.path())?;
        c.arg("status");
        c
    })?;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("are gone"), "{}", text(&o));
    Ok(())
}
