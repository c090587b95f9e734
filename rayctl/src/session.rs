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

/// No address was given and no local session names a cluster.
#[derive(Debug, thiserror::Error)]
#[error(
    "no cluster address: pass --address, set RAYCTL_ADDRESS, or start a cluster here with `rayctl start --head`"
)]
pub(crate) struct NoCluster;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ClusterFile {
    pub(crate) heads: Vec<String>,
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

/// Head addresses: `--address`, then `RAYCTL_ADDRESS`, then the latest local session.
pub(crate) fn resolve_heads(address: Option<&str>) -> anyhow::Result<Vec<String>> {
    if let Some(a) = address.filter(|a| !a.is_empty()) {
        return Ok(protocol::client::HeadClient::parse_addresses(a));
    }
    if let Ok(a) = std::env::var(protocol::ADDRESS_ENV)
        && !a.is_empty()
    {
        return Ok(protocol::client::HeadClient::parse_addresses(&a));
    }
    let path = base_dir()?.join("session_latest").join("cluster.json");
    match std::fs::read(&path) {
        Ok(b) => {
            let f: ClusterFile = serde_json::from_slice(&b)
                .with_context(|| format!("corrupt {}", path.display()))?;
            Ok(f.heads)
        }
        Err(_) => Err(NoCluster.into()),
    }
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
