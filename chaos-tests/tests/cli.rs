//! `rayctl start` in the background and `rayctl stop`, in an isolated RAYCTL_TMPDIR.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use chaos_tests::{rayctl_bin, wait_for};

#[test]
fn start_in_background_then_stop_everything() -> Result<()> {
    let bin = rayctl_bin()?;
    let tmp = tempfile::tempdir()?;
    let run = |args: &[&str]| {
        Command::new(&bin)
            .args(args)
            .env("RAYCTL_TMPDIR", tmp.path())
            .env_remove(protocol::ADDRESS_ENV)
            .output()
    };
    let out = run(&["start", "--head", "--port", "0", "--dashboard-port", "0"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("Started a head at 127.0.0.1:"), "{text}");
    // The status command finds the cluster through the session file.
    let status = wait_for(
        "status with the head's node",
        Duration::from_secs(30),
        || {
            let o = run(&["status", "-o", "json"]).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            (v["nodes"].as_array()?.len() == 1).then_some(v)
        },
    )?;
    let leader = status["leader"].as_str().unwrap().to_string();
    let data = tmp.path().join("w");
    let out = run(&[
        "start",
        "--address",
        &leader,
        "--num-cpus",
        "3",
        "--data-dir",
        data.to_str().unwrap(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second daemon on the same data dir is refused with a clear error.
    let out = run(&[
        "start",
        "--address",
        &leader,
        "--data-dir",
        data.to_str().unwrap(),
        "--block",
    ])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("2 nodes", Duration::from_secs(30), || {
        let o = run(&["status", "-o", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "ALIVE")
            .count()
            == 2)
            .then_some(())
    })?;
    let daemons: Vec<u32> = std::fs::read_dir(tmp.path().join("daemons"))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(daemons.len(), 2, "one record per daemon");
    let out = run(&["stop"])?;
    assert!(out.status.success());
    for pid in daemons {
        wait_for("daemon gone", Duration::from_secs(15), || {
            (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })?;
    }
    let out = run(&["status", "--timeout", "500ms"])?;
    assert_eq!(out.status.code(), Some(3), "unreachable cluster exit code");
    Ok(())
}
