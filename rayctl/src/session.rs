//! Where `rayctl` keeps what it started on this machine.
//!
//! The per-user root (`protocol::session::root`: `$RAYCTL_TMPDIR`, else
//! `$XDG_RUNTIME_DIR/rayctl`, else `/tmp/rayctl-<uid>`, 0700 and refused unless it is this
//! user's alone) holds:
//! - `session_<time>_<pid>/` per `rayctl start` (logs, the daemon's data dir by default),
//!   with `session_latest` pointing at the newest;
//! - `session_latest/cluster.json`: the head addresses of the cluster last started here, the
//!   last resort for finding the cluster (after `--address` and `RAYCTL_ADDRESS`);
//! - `daemons/<pid>.json`: one file per running daemon, which `rayctl stop` reads.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub(crate) fn base_dir() -> anyhow::Result<PathBuf> {
    Ok(protocol::session::root()?)
}

/// No address was given and no cluster runs here.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NoCluster {
    #[error(
        "no cluster address: pass --address, set RAYCTL_ADDRESS, or start a cluster here with `rayctl start --head`"
    )]
    NeverStarted,
    #[error(
        "no cluster is running here (the last one, at {heads}, stopped at {at}); start one with `rayctl start --head`, or pass --address"
    )]
    Stopped { heads: String, at: String },
    #[error(
        "no cluster is running here (the head daemons `rayctl start` left at {heads} are gone); start one with `rayctl start --head`, or pass --address"
    )]
    Gone { heads: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ClusterFile {
    pub(crate) heads: Vec<String>,
    /// Set by `rayctl stop` when it stopped this cluster's heads (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stopped_at_ms: Option<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Creates a new session dir. `session_latest` moves to it once its daemon is up
/// (`write_cluster_file`), so a daemon that fails to start never hides a running cluster.
pub(crate) fn new_session() -> anyhow::Result<PathBuf> {
    let base = base_dir()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = base.join(format!("session_{now}_{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn point_latest_at(dir: &Path) -> anyhow::Result<()> {
    let base = base_dir()?;
    let latest = base.join("session_latest");
    let tmp = base.join(format!(".session_latest.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(dir, &tmp).context("cannot link session_latest")?;
    std::fs::rename(&tmp, &latest).context("cannot link session_latest")?;
    Ok(())
}

pub(crate) fn write_cluster_file(session: &Path, heads: &[String]) -> anyhow::Result<()> {
    let f = ClusterFile {
        heads: heads.to_vec(),
        stopped_at_ms: None,
    };
    write_atomic(
        &session.join("cluster.json"),
        &serde_json::to_vec_pretty(&f)?,
    )?;
    // Only sessions `rayctl start` made here become the latest: a node the autoscaler started
    // (its session lives in the provider's directory) never hides the cluster's own.
    if session.parent() == Some(base_dir()?.as_path()) {
        point_latest_at(session)?;
    }
    Ok(())
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Head addresses: `--address`, then `RAYCTL_ADDRESS`, then the latest local session. A
/// dashboard URL (`http://HOST:8265`, as Ray users type it) is asked for the heads.
pub(crate) fn resolve_heads(
    address: Option<&str>,
    token: Option<&protocol::auth::AuthToken>,
) -> anyhow::Result<Vec<String>> {
    let given = address
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            std::env::var(protocol::ADDRESS_ENV)
                .ok()
                .filter(|a| !a.is_empty())
        });
    if let Some(a) = given {
        if a.starts_with("http://") || a.starts_with("https://") {
            return dashboard_heads(&a, token);
        }
        return Ok(protocol::client::HeadClient::parse_addresses(&a));
    }
    let path = base_dir()?.join("session_latest").join("cluster.json");
    let f: ClusterFile = match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("corrupt {}", path.display()))?
        }
        Err(_) => return Err(NoCluster::NeverStarted.into()),
    };
    let heads = f.heads.join(",");
    if let Some(ms) = f.stopped_at_ms {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        return Err(NoCluster::Stopped {
            heads,
            at: humantime::format_rfc3339_seconds(at).to_string(),
        }
        .into());
    }
    // Heads this machine started whose daemons all died (a crash, a reboot): say so now
    // rather than let a client wait for them.
    let local: Vec<DaemonRecord> = list_daemons()?
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.kind == "head" && f.heads.contains(&r.address))
        .collect();
    if f.heads
        .iter()
        .all(|h| local.iter().any(|r| &r.address == h))
        && !local.iter().any(|r| alive(r.pid))
    {
        return Err(NoCluster::Gone { heads }.into());
    }
    Ok(f.heads)
}

/// The heads behind a dashboard URL, from its `GET /api/version` (`rayctl_heads`).
fn dashboard_heads(
    url: &str,
    token: Option<&protocol::auth::AuthToken>,
) -> anyhow::Result<Vec<String>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let mut req = agent.get(&format!("{}/api/version", url.trim_end_matches('/')));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {}", t.as_str()));
    }
    let mut r = req
        .call()
        .with_context(|| format!("cannot reach the dashboard at {url}"))?;
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        anyhow::bail!("{url}/api/version answered {status}: {}", body.trim());
    }
    let v: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("{url}/api/version is not JSON: {body}"))?;
    let heads: Vec<String> = v["rayctl_heads"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if heads.is_empty() {
        anyhow::bail!("{url} is not a rayctl head's dashboard (its /api/version names no heads)");
    }
    Ok(heads)
}

/// Whether `pid` is a live rayctl process (a reused pid is not taken for ours).
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("rayctl"))
        .unwrap_or(false)
}

/// After `rayctl stop` stopped heads: the latest cluster, if they were its heads, is marked
/// stopped, so clients answer "no cluster" at once and the SDK starts its own.
pub(crate) fn mark_stopped(stopped_heads: &[String]) -> anyhow::Result<()> {
    let path = base_dir()?.join("session_latest").join("cluster.json");
    let Ok(b) = std::fs::read(&path) else {
        return Ok(());
    };
    let mut f: ClusterFile =
        serde_json::from_slice(&b).with_context(|| format!("corrupt {}", path.display()))?;
    if f.stopped_at_ms.is_none() && f.heads.iter().any(|h| stopped_heads.contains(h)) {
        f.stopped_at_ms = Some(now_ms());
        write_atomic(&path, &serde_json::to_vec_pretty(&f)?)?;
    }
    Ok(())
}

/// A daemon `rayctl start` left running, as `rayctl stop` finds it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct DaemonRecord {
    pub(crate) pid: u32,
    pub(crate) kind: String,
    pub(crate) address: String,
    pub(crate) session: PathBuf,
}

pub(crate) fn daemons_dir() -> anyhow::Result<PathBuf> {
    Ok(base_dir()?.join("daemons"))
}

pub(crate) fn register_daemon(rec: &DaemonRecord) -> anyhow::Result<PathBuf> {
    let dir = daemons_dir()?;
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.json", rec.pid));
    write_atomic(&path, &serde_json::to_vec(rec)?)?;
    Ok(path)
}

pub(crate) fn list_daemons() -> anyhow::Result<Vec<(PathBuf, DaemonRecord)>> {
    let Ok(rd) = std::fs::read_dir(daemons_dir()?) else {
        return Ok(Vec::new());
    };
    Ok(rd
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let rec = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((e.path(), rec))
        })
        .collect())
}
