//! `rayctl operator raft list-peers | add-peer | remove-peer` and `--join`.

use std::time::Duration;

use anyhow::Result;
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use serde_json::Value;

fn peers(c: &Cluster) -> Option<Vec<(String, bool)>> {
    let (code, out, _) = c
        .rayctl(&[
            "operator",
            "raft",
            "list-peers",
            "-o",
            "json",
            "--address",
            &c.head_addrs.join(","),
        ])
        .ok()?;
    if code != 0 {
        return None;
    }
    let v: Value = serde_json::from_str(&out).ok()?;
    let mut p: Vec<(String, bool)> = v["peers"]
        .as_array()?
        .iter()
        .map(|p| {
            (
                p["address"].as_str().unwrap_or_default().to_string(),
                p["voter"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    p.sort();
    Some(p)
}

#[test]
fn heads_leave_and_join_the_raft_group() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 3,
        ..Default::default()
    })?;
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let initial = wait_for("3 voters", Duration::from_secs(30), || {
        peers(&c).filter(|p| p.len() == 3 && p.iter().all(|x| x.1))
    })?;
    assert_eq!(initial.len(), 3);

    // Remove a follower (membership changes take the heads' peer secret).
    let secret = c.peer_secret_path().display().to_string();
    let victim = (leader + 1) % 3;
    let victim_addr = c.head_addrs[victim].clone();
    let (code, _, err) = c.rayctl(&[
        "operator",
        "raft",
        "remove-peer",
        &victim_addr,
        "--peer-secret-file",
        &secret,
        "--address",
        &c.head_addrs.join(","),
    ])?;
    assert_eq!(code, 0, "{err}");
    let after = wait_for("2 peers", Duration::from_secs(30), || {
        peers(&c).filter(|p| p.len() == 2)
    })?;
    assert!(!after.iter().any(|(a, _)| *a == victim_addr));
    c.heads[victim].kill9();
    // Removing it again: not found (exit code 4).
    let (code, _, _) = c.rayctl(&[
        "operator",
        "raft",
        "remove-peer",
        &victim_addr,
        "--peer-secret-file",
        &secret,
        "--address",
        &c.head_addrs.join(","),
    ])?;
    assert_eq!(code, 4);

    // A new head joins with --join and becomes a voter; the group serves with it.
    let j = c.add_joining_head()?;
    let joined = c.head_addrs[j].clone();
    let p = wait_for("the new head as voter", Duration::from_secs(60), || {
        peers(&c).filter(|p| p.iter().any(|(a, v)| *a == joined && *v))
    })?;
    assert_eq!(p.len(), 3, "{p:?}");
    let s = wait_for("status with the new head", Duration::from_secs(30), || {
        let s = c.status(None).ok()?;
        s["heads"]
            .as_array()?
            .iter()
            .any(|h| h["address"] == joined.as_str() && h["role"] == "follower")
            .then_some(s)
    })?;
    assert_eq!(s["heads"].as_array().unwrap().len(), 3);
    Ok(())
}
