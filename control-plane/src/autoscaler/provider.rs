//! Node providers: what launches and removes worker machines (Ray v2's
//! `ICloudInstanceProvider` is the model). Every call is idempotent per request id, and the
//! list is eventually consistent: the autoscaler ties what it lists to its launch records.
//!
//! - `LocalProvider`: node processes on this machine, each `rayctl start --address … --block`
//!   in its own session and directory, not children that die with the head: a head's death
//!   does not take them down, and a new leader on this machine finds them in `state_dir`.
//! - `CommandProvider`: operator scripts, JSON on stdin and stdout, with a timeout.
//! - `KubernetesProvider`: one StatefulSet or Deployment per node type, through `kubectl`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::config::{Config, KubernetesWorkload, ProviderConfig};

/// Labels every launched node registers with, tying it to its record.
pub const LABEL_CLOUD_ID: &str = "rayctl.io/cloud-instance-id";
pub const LABEL_NODE_TYPE: &str = "rayctl.io/node-type";

/// A machine (or process) the provider has and that is not terminated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInstance {
    pub id: String,
    pub node_type: String,
    /// The launch request that made it (empty if the provider cannot tell).
    #[serde(default)]
    pub request_id: String,
    /// Whether it is up (false: starting, or going away).
    #[serde(default)]
    pub running: bool,
}

/// What a launch needs to know about the type and the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct LaunchSpec {
    pub node_type: String,
    pub resources: BTreeMap<String, f64>,
    pub labels: BTreeMap<String, String>,
    pub node_config: serde_json::Value,
    pub head_addresses: Vec<String>,
}

pub trait NodeProvider: Send + Sync {
    /// Every instance not yet terminated. An error means "unknown": the caller must not
    /// conclude that anything is gone.
    fn non_terminated(&self) -> impl Future<Output = Result<Vec<CloudInstance>, String>> + Send;
    /// Launches `count` instances of a type; a repeated call with the same request id does
    /// nothing more.
    fn launch(
        &self,
        spec: &LaunchSpec,
        count: u32,
        request_id: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Terminates instances; terminating one that is gone is not an error.
    fn terminate(
        &self,
        ids: &[String],
        request_id: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// How the head process runs things the provider needs.
#[derive(Debug, Clone, Default)]
pub struct ProviderEnv {
    /// The `rayctl` binary (the local provider runs `rayctl start`).
    pub rayctl: PathBuf,
    /// Environment for what the provider starts: the cluster token (never the peer secret).
    pub env: Vec<(String, String)>,
    /// The per-user session root (the local provider's default `state_dir` is under it).
    pub session_root: PathBuf,
}

/// The provider a config names.
pub enum AnyProvider {
    Local(LocalProvider),
    Command(CommandProvider),
    Kubernetes(KubernetesProvider),
}

impl AnyProvider {
    pub fn from_config(c: &Config, env: &ProviderEnv) -> Self {
        match &c.provider {
            ProviderConfig::Local { state_dir } => Self::Local(LocalProvider {
                dir: state_dir
                    .clone()
                    .unwrap_or_else(|| env.session_root.join("autoscaler")),
                rayctl: env.rayctl.clone(),
                env: env.env.clone(),
            }),
            ProviderConfig::Command {
                launch,
                terminate,
                list,
                timeout_s,
            } => Self::Command(CommandProvider {
                launch: launch.clone(),
                terminate: terminate.clone(),
                list: list.clone(),
                timeout: Duration::from_secs_f64(*timeout_s),
                env: env.env.clone(),
            }),
            ProviderConfig::Kubernetes {
                kubectl,
                namespace,
                timeout_s,
            } => Self::Kubernetes(KubernetesProvider {
                kubectl: kubectl.clone(),
                namespace: namespace.clone(),
                timeout: Duration::from_secs_f64(*timeout_s),
                workloads: c
                    .available_node_types
                    .iter()
                    .filter_map(|(n, t)| {
                        Some((n.clone(), KubernetesWorkload::of(&t.node_config).ok()?))
                    })
                    .collect(),
            }),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Local(_) => "local",
            Self::Command(_) => "command",
            Self::Kubernetes(_) => "kubernetes",
        }
    }

    /// Of `ids` (instances chosen for removal), those the provider can remove without
    /// removing any other: a StatefulSet only loses its highest ordinals.
    pub fn removable(&self, ids: &[String], listed: &[CloudInstance]) -> Vec<String> {
        match self {
            Self::Kubernetes(k) => k.removable(ids, listed),
            _ => ids.to_vec(),
        }
    }
}

impl NodeProvider for AnyProvider {
    async fn non_terminated(&self) -> Result<Vec<CloudInstance>, String> {
        match self {
            Self::Local(p) => p.non_terminated().await,
            Self::Command(p) => p.non_terminated().await,
            Self::Kubernetes(p) => p.non_terminated().await,
        }
    }

    async fn launch(&self, spec: &LaunchSpec, count: u32, request_id: &str) -> Result<(), String> {
        match self {
            Self::Local(p) => p.launch(spec, count, request_id).await,
            Self::Command(p) => p.launch(spec, count, request_id).await,
            Self::Kubernetes(p) => p.launch(spec, count, request_id).await,
        }
    }

    async fn terminate(&self, ids: &[String], request_id: &str) -> Result<(), String> {
        match self {
            Self::Local(p) => p.terminate(ids, request_id).await,
            Self::Command(p) => p.terminate(ids, request_id).await,
            Self::Kubernetes(p) => p.terminate(ids, request_id).await,
        }
    }
}

/// Runs `program args` (or `sh -c script` when `args` is None), feeding `stdin`, within
/// `timeout`; its stdout on success, else an error with the end of its stderr.
async fn run(
    program: &str,
    args: Option<&[String]>,
    stdin: &[u8],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let mut cmd = match args {
        Some(a) => {
            let mut c = tokio::process::Command::new(program);
            c.args(a);
            c
        }
        None => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(program);
            c
        }
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env_remove("RAYCTL_PEER_SECRET_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program:?}: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        // A script that does not read its input is fine.
        let _ = i.write_all(stdin).await;
    }
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("{program:?} did not finish within {timeout:?} (killed)"))?
        .map_err(|e| format!("{program:?}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(format!(
            "{program:?} failed ({}): {}",
            out.status,
            tail.trim()
        ));
    }
    Ok(out.stdout)
}

// ---------------------------------------------------------------------------------------------

/// One record of a local instance, `<state_dir>/<id>/instance.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LocalRecord {
    id: String,
    node_type: String,
    request_id: String,
    pid: u32,
}

pub struct LocalProvider {
    dir: PathBuf,
    rayctl: PathBuf,
    env: Vec<(String, String)>,
}

/// A process is ours if it is alive and its command line names the instance (its labels
/// carry the id), so a reused pid is never taken for it.
fn local_alive(pid: u32, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let s = String::from_utf8_lossy(&c);
            s.contains(id)
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|st| {
                        st.rsplit(')')
                            .next()
                            .is_some_and(|r| r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// A live process one of whose arguments is exactly `arg`.
fn find_process_with_arg(arg: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let ours = cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes());
        (ours && local_alive(pid, arg)).then_some(pid)
    })
}

impl LocalProvider {
    fn record(&self, id: &str) -> Option<LocalRecord> {
        let b = std::fs::read(self.dir.join(id).join("instance.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Writes the instance's record (atomically: a reader sees the old one or the new one).
    fn write_record(&self, rec: &LocalRecord) -> Result<(), String> {
        let dir = self.instance_dir(&rec.id);
        let tmp = dir.join(".instance.json");
        std::fs::write(&tmp, serde_json::to_vec(rec).unwrap_or_default())
            .and_then(|()| std::fs::rename(&tmp, dir.join("instance.json")))
            .map_err(|e| format!("cannot record instance {}: {e}", rec.id))
    }

    /// Makes instance `id` unless this request already made it. A head killed mid-launch
    /// (directory made, node maybe started, record not yet written) leaves nothing a new
    /// leader mistakes for done: the launch holds a lock on the directory (released by the
    /// kernel when its holder dies), and a node process started without its record is found
    /// by its data directory and recorded instead of started twice.
    fn launch_one(&self, spec: &LaunchSpec, id: &str, request_id: &str) -> Result<(), String> {
        use nix::fcntl::{Flock, FlockArg};
        let dir = self.instance_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let lock = std::fs::File::create(dir.join("launch.lock"))
            .map_err(|e| format!("cannot create {}/launch.lock: {e}", dir.display()))?;
        let _held = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("cannot lock {}/launch.lock: {e}", dir.display()))?;
        if self.record(id).is_some() || dir.join("terminated").exists() {
            return Ok(());
        }
        let data = format!("--data-dir={}", dir.join("data").display());
        if let Some(pid) = find_process_with_arg(&data) {
            tracing::info!(
                id,
                pid,
                "a node started for this instance had no record; recorded it"
            );
            return self.write_record(&LocalRecord {
                id: id.into(),
                node_type: spec.node_type.clone(),
                request_id: request_id.into(),
                pid,
            });
        }
        self.spawn(spec, id, request_id)
    }

    fn spawn(&self, spec: &LaunchSpec, id: &str, request_id: &str) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        let dir = self.instance_dir(id);
        std::fs::create_dir_all(dir.join("session").join("logs"))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut labels = spec.labels.clone();
        labels.insert(LABEL_CLOUD_ID.into(), id.into());
        labels.insert(LABEL_NODE_TYPE.into(), spec.node_type.clone());
        let mut custom = spec.resources.clone();
        let cpus = custom.remove("CPU").unwrap_or(0.0);
        let gpus = custom.remove("GPU");
        let memory = custom.remove("memory");
        let log = std::fs::File::create(dir.join("node.log")).map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new(&self.rayctl);
        cmd.arg("start")
            .arg(format!("--address={}", spec.head_addresses.join(",")))
            .arg(format!("--num-cpus={cpus}"))
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--session-dir={}", dir.join("session").display()))
            .arg(format!(
                "--labels={}",
                serde_json::to_string(&labels).unwrap_or_default()
            ))
            .arg("--block");
        if let Some(g) = gpus {
            cmd.arg(format!("--num-gpus={g}"));
        }
        if let Some(m) = memory {
            cmd.arg(format!("--memory={}", m as u64));
        }
        if !custom.is_empty() {
            cmd.arg(format!(
                "--resources={}",
                serde_json::to_string(&custom).unwrap_or_default()
            ));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .env_remove("RAYCTL_PEER_SECRET_PATH");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // SAFETY: setsid is async-signal-safe. The node leaves the head's session, so the
        // head's death (or its process group's) does not take it down.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.rayctl.display()))?;
        self.write_record(&LocalRecord {
            id: id.into(),
            node_type: spec.node_type.clone(),
            request_id: request_id.into(),
            pid: child.id(),
        })?;
        // Reap it when it exits (while this head lives; after, init does).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }
}

impl NodeProvider for LocalProvider {
    async fn non_terminated(&self) -> Result<Vec<CloudInstance>, String> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("cannot list {}: {e}", self.dir.display())),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if e.path().join("terminated").exists() {
                continue;
            }
            let Some(rec) = self.record(&id) else {
                continue;
            };
            if local_alive(rec.pid, &rec.id) {
                out.push(CloudInstance {
                    id: rec.id,
                    node_type: rec.node_type,
                    request_id: rec.request_id,
                    running: true,
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn launch(&self, spec: &LaunchSpec, count: u32, request_id: &str) -> Result<(), String> {
        for k in 0..count {
            let id = if count == 1 {
                request_id.to_owned()
            } else {
                format!("{request_id}-{k}")
            };
            // Idempotent: an instance this request already made stays the only one.
            self.launch_one(spec, &id, request_id)?;
        }
        Ok(())
    }

    async fn terminate(&self, ids: &[String], _request_id: &str) -> Result<(), String> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let mut live = Vec::new();
        for id in ids {
            // Its record's process, or one a launch cut short started without a record.
            let pid = self
                .record(id)
                .map(|r| r.pid)
                .filter(|pid| local_alive(*pid, id))
                .or_else(|| {
                    let data = self.instance_dir(id).join("data");
                    find_process_with_arg(&format!("--data-dir={}", data.display()))
                });
            if let Some(pid) = pid {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                live.push((pid, id.clone()));
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while live.iter().any(|(pid, id)| local_alive(*pid, id))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (pid, id) in &live {
            if local_alive(*pid, id) {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
        for id in ids {
            let dir = self.instance_dir(id);
            if dir.exists() {
                // The data and session go; the record and the log stay, marked terminated.
                let _ = std::fs::remove_dir_all(dir.join("data"));
                let _ = std::fs::remove_dir_all(dir.join("session"));
                std::fs::write(dir.join("terminated"), b"")
                    .map_err(|e| format!("cannot mark {id} terminated: {e}"))?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

pub struct CommandProvider {
    launch: String,
    terminate: String,
    list: String,
    timeout: Duration,
    env: Vec<(String, String)>,
}

impl NodeProvider for CommandProvider {
    async fn non_terminated(&self) -> Result<Vec<CloudInstance>, String> {
        let out = run(&self.list, None, b"{}", &self.env, self.timeout).await?;
        serde_json::from_slice(&out).map_err(|e| {
            format!(
                "the list command must print a JSON array of {{id, node_type, request_id, running}}: {e}"
            )
        })
    }

    async fn launch(&self, spec: &LaunchSpec, count: u32, request_id: &str) -> Result<(), String> {
        let input = serde_json::json!({
            "node_type": spec.node_type,
            "count": count,
            "request_id": request_id,
            "resources": spec.resources,
            "labels": spec.labels,
            "node_config": spec.node_config,
            "head_addresses": spec.head_addresses,
            "cloud_instance_id_label": LABEL_CLOUD_ID,
        });
        run(
            &self.launch,
            None,
            input.to_string().as_bytes(),
            &self.env,
            self.timeout,
        )
        .await
        .map(|_| ())
    }

    async fn terminate(&self, ids: &[String], request_id: &str) -> Result<(), String> {
        let input = serde_json::json!({"ids": ids, "request_id": request_id});
        run(
            &self.terminate,
            None,
            input.to_string().as_bytes(),
            &self.env,
            self.timeout,
        )
        .await
        .map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------

/// The annotation that makes scaling idempotent per request id: the latest request ids that
/// changed the workload's replicas, comma separated.
const LAST_REQUEST: &str = "rayctl.io/requests";
const REQUESTS_KEPT: usize = 32;

pub struct KubernetesProvider {
    kubectl: String,
    namespace: String,
    timeout: Duration,
    workloads: BTreeMap<String, KubernetesWorkload>,
}

impl KubernetesProvider {
    async fn kubectl(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        let mut a: Vec<String> = vec!["--namespace".into(), self.namespace.clone()];
        a.extend(args.iter().map(|s| s.to_string()));
        run(&self.kubectl, Some(&a), b"", &[], self.timeout).await
    }

    async fn workload(&self, w: &KubernetesWorkload) -> Result<(u64, Vec<String>), String> {
        let out = self
            .kubectl(&["get", &w.kind.to_lowercase(), &w.name, "-o", "json"])
            .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&out).map_err(|e| format!("kubectl get {}: {e}", w.name))?;
        let replicas = v["spec"]["replicas"].as_u64().unwrap_or(0);
        let done = v["metadata"]["annotations"][LAST_REQUEST]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Ok((replicas, done))
    }

    async fn patch(
        &self,
        w: &KubernetesWorkload,
        replicas: u64,
        mut done: Vec<String>,
        request_id: &str,
    ) -> Result<(), String> {
        done.push(request_id.to_owned());
        let skip = done.len().saturating_sub(REQUESTS_KEPT);
        let patch = serde_json::json!({
            "metadata": {"annotations": {LAST_REQUEST: done[skip..].join(",")}},
            "spec": {"replicas": replicas},
        });
        self.kubectl(&[
            "patch",
            &w.kind.to_lowercase(),
            &w.name,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .await
        .map(|_| ())
    }

    fn ordinal(pod: &str) -> Option<u64> {
        pod.rsplit('-').next()?.parse().ok()
    }

    fn removable(&self, ids: &[String], listed: &[CloudInstance]) -> Vec<String> {
        let mut out = Vec::new();
        for (ty, w) in &self.workloads {
            let chosen: Vec<&String> = ids
                .iter()
                .filter(|id| listed.iter().any(|c| &c.id == *id && &c.node_type == ty))
                .collect();
            if w.kind != "StatefulSet" {
                out.extend(chosen.into_iter().cloned());
                continue;
            }
            // Highest ordinals first, while they are chosen.
            let mut pods: Vec<(u64, &String)> = listed
                .iter()
                .filter(|c| &c.node_type == ty)
                .filter_map(|c| Some((Self::ordinal(&c.id)?, &c.id)))
                .collect();
            pods.sort_by_key(|p| std::cmp::Reverse(p.0));
            for (_, id) in pods {
                if chosen.contains(&id) {
                    out.push(id.clone());
                } else {
                    break;
                }
            }
        }
        out
    }
}

impl NodeProvider for KubernetesProvider {
    async fn non_terminated(&self) -> Result<Vec<CloudInstance>, String> {
        let mut out = Vec::new();
        for (ty, w) in &self.workloads {
            let got = self
                .kubectl(&["get", "pods", "-l", &w.selector, "-o", "json"])
                .await?;
            let v: serde_json::Value =
                serde_json::from_slice(&got).map_err(|e| format!("kubectl get pods: {e}"))?;
            let items = v["items"]
                .as_array()
                .ok_or("kubectl get pods printed no items")?;
            for p in items {
                let Some(name) = p["metadata"]["name"].as_str() else {
                    continue;
                };
                let phase = p["status"]["phase"].as_str().unwrap_or_default();
                if matches!(phase, "Succeeded" | "Failed") {
                    continue;
                }
                out.push(CloudInstance {
                    id: name.to_owned(),
                    node_type: ty.clone(),
                    request_id: String::new(),
                    running: phase == "Running" && p["metadata"]["deletionTimestamp"].is_null(),
                });
            }
        }
        Ok(out)
    }

    async fn launch(&self, spec: &LaunchSpec, count: u32, request_id: &str) -> Result<(), String> {
        let w = self
            .workloads
            .get(&spec.node_type)
            .ok_or_else(|| format!("no workload for node type {}", spec.node_type))?;
        let (replicas, done) = self.workload(w).await?;
        if done.iter().any(|d| d == request_id) {
            return Ok(());
        }
        self.patch(w, replicas + u64::from(count), done, request_id)
            .await
    }

    async fn terminate(&self, ids: &[String], request_id: &str) -> Result<(), String> {
        let listed = self.non_terminated().await?;
        for (ty, w) in &self.workloads {
            let mine: Vec<&String> = ids
                .iter()
                .filter(|id| listed.iter().any(|c| &c.id == *id && &c.node_type == ty))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let (replicas, done) = self.workload(w).await?;
            if done.iter().any(|d| d == request_id) {
                continue;
            }
            if w.kind == "Deployment" {
                for id in &mine {
                    self.kubectl(&[
                        "annotate",
                        "pod",
                        id,
                        "controller.kubernetes.io/pod-deletion-cost=-1000",
                        "--overwrite",
                    ])
                    .await?;
                }
            }
            self.patch(
                w,
                replicas.saturating_sub(mine.len() as u64),
                done,
                request_id,
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(id: &str, ty: &str) -> CloudInstance {
        CloudInstance {
            id: id.into(),
            node_type: ty.into(),
            request_id: String::new(),
            running: true,
        }
    }

    fn k8s(kubectl: &str, kind: &str) -> KubernetesProvider {
        KubernetesProvider {
            kubectl: kubectl.into(),
            namespace: "ray".into(),
            timeout: Duration::from_secs(20),
            workloads: BTreeMap::from([(
                "cpu2".to_owned(),
                KubernetesWorkload {
                    kind: kind.into(),
                    name: "w".into(),
                    selector: "app=w".into(),
                },
            )]),
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_statefulset_loses_only_its_highest_ordinals_and_a_deployment_any_pod() {
        let listed = [
            pod("w-0", "cpu2"),
            pod("w-1", "cpu2"),
            pod("w-2", "cpu2"),
            pod("other-5", "gpu"),
        ];
        let sts = k8s("kubectl", "StatefulSet");
        // (chosen, removable): scaling a StatefulSet down removes its highest ordinals, so
        // only a chosen run from the top can go; anything else would kill the wrong pod.
        for (chosen, want) in [
            (vec!["w-2"], vec!["w-2"]),
            (vec!["w-1", "w-2"], vec!["w-2", "w-1"]),
            (vec!["w-0", "w-2"], vec!["w-2"]),
            (vec!["w-0"], vec![]),
            (vec!["w-1"], vec![]),
            (vec!["other-5", "w-2"], vec!["w-2"]),
            (vec!["gone-9"], vec![]),
        ] {
            assert_eq!(
                sts.removable(&ids(&chosen), &listed),
                ids(&want),
                "{chosen:?}"
            );
        }
        let dep = k8s("kubectl", "Deployment");
        assert_eq!(
            dep.removable(&ids(&["w-0", "w-2"]), &listed),
            ids(&["w-0", "w-2"])
        );
        assert_eq!(dep.removable(&ids(&["other-5"]), &listed), ids(&[]));
    }

    /// A local provider whose `rayctl` is a stand-in that only waits (its arguments stay in
    /// its command line, as a real node's do).
    fn local(dir: &std::path::Path) -> LocalProvider {
        let script = dir.join("rayctl");
        std::fs::write(&script, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        LocalProvider {
            dir: dir.join("instances"),
            rayctl: script,
            env: Vec::new(),
        }
    }

    fn spec() -> LaunchSpec {
        LaunchSpec {
            node_type: "cpu2".into(),
            resources: BTreeMap::from([("CPU".to_owned(), 2.0)]),
            labels: BTreeMap::new(),
            node_config: serde_json::Value::Null,
            head_addresses: vec!["127.0.0.1:1".into()],
        }
    }

    async fn listed_ids(p: &LocalProvider) -> Vec<String> {
        p.non_terminated()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    #[tokio::test]
    async fn a_launch_cut_short_by_a_dead_head_is_finished_once_by_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let p = local(tmp.path());
        // Cut short before the node started: the directory alone is not an instance.
        std::fs::create_dir_all(p.instance_dir("r1")).unwrap();
        p.launch(&spec(), 1, "r1").await.unwrap();
        assert_eq!(listed_ids(&p).await, ids(&["r1"]));
        // Asked again: still one.
        p.launch(&spec(), 1, "r1").await.unwrap();
        let first = p.record("r1").unwrap().pid;
        // Cut short after the node started, before its record: the node is found, not
        // started again.
        std::fs::remove_file(p.instance_dir("r1").join("instance.json")).unwrap();
        assert_eq!(listed_ids(&p).await, ids(&[]));
        p.launch(&spec(), 1, "r1").await.unwrap();
        assert_eq!(p.record("r1").unwrap().pid, first);
        assert_eq!(listed_ids(&p).await, ids(&["r1"]));
        // A node without a record is terminated too, and a terminated instance is not
        // launched again.
        p.launch(&spec(), 1, "r2").await.unwrap();
        std::fs::remove_file(p.instance_dir("r2").join("instance.json")).unwrap();
        p.terminate(&ids(&["r1", "r2"]), "t").await.unwrap();
        assert!(!local_alive(first, "r1"));
        assert_eq!(
            find_process_with_arg(&format!(
                "--data-dir={}",
                p.instance_dir("r2").join("data").display()
            )),
            None
        );
        p.launch(&spec(), 1, "r1").await.unwrap();
        assert_eq!(listed_ids(&p).await, ids(&[]));
    }

    /// A stand-in `kubectl`: logs each call, prints `workload.json` and `pods.json` for the
    /// gets, and makes a merge patch the workload's new state.
    fn stand_in(dir: &std::path::Path) -> String {
        let script = dir.join("kubectl");
        let d = dir.display();
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$*\" >> {d}/log\ncase \"$3 $4\" in\n\
                 'get pods') cat {d}/pods.json ;;\n\
                 get*) cat {d}/workload.json ;;\n\
                 patch*) printf '%s' \"$8\" > {d}/workload.json ;;\n\
                 'annotate pod') ;;\n\
                 *) echo \"unexpected $*\" >&2; exit 1 ;;\nesac\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(
            dir.join("workload.json"),
            r#"{"spec": {"replicas": 3}, "metadata": {"annotations": {}}}"#,
        )
        .unwrap();
        let pods = |names: &[&str]| {
            serde_json::json!({"items": names.iter().map(|n| serde_json::json!({
                "metadata": {"name": n}, "status": {"phase": "Running"}
            })).collect::<Vec<_>>()})
        };
        std::fs::write(
            dir.join("pods.json"),
            pods(&["w-0", "w-1", "w-2"]).to_string(),
        )
        .unwrap();
        script.display().to_string()
    }

    fn workload(dir: &std::path::Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("workload.json")).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn terminating_a_deployment_pod_marks_it_cheapest_then_scales_down_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = k8s(&stand_in(dir.path()), "Deployment");
        p.terminate(&ids(&["w-1"]), "req-1").await.unwrap();
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        let calls: Vec<&str> = log.lines().collect();
        let annotate = calls
            .iter()
            .position(|l| {
                *l == "--namespace ray annotate pod w-1 controller.kubernetes.io/pod-deletion-cost=-1000 --overwrite"
            })
            .expect("the pod is marked");
        let patch = calls
            .iter()
            .position(|l| l.starts_with("--namespace ray patch deployment w --type=merge -p "))
            .expect("the deployment is patched");
        assert!(annotate < patch, "marked before the scale-down: {log}");
        let w = workload(dir.path());
        assert_eq!(w["spec"]["replicas"], 2);
        assert_eq!(w["metadata"]["annotations"][LAST_REQUEST], "req-1");
        // The same request again (a new leader retrying): nothing more is patched.
        p.terminate(&ids(&["w-1"]), "req-1").await.unwrap();
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert_eq!(
            log.lines().filter(|l| l.contains(" patch ")).count(),
            1,
            "{log}"
        );
        assert_eq!(workload(dir.path())["spec"]["replicas"], 2);
        // A pod the provider does not list is not counted against the replicas.
        p.terminate(&ids(&["nope-7"]), "req-2").await.unwrap();
        assert_eq!(workload(dir.path())["spec"]["replicas"], 2);
    }

    #[tokio::test]
    async fn terminating_statefulset_pods_scales_down_without_marking_pods() {
        let dir = tempfile::tempdir().unwrap();
        let p = k8s(&stand_in(dir.path()), "StatefulSet");
        p.terminate(&ids(&["w-2", "w-1"]), "req-9").await.unwrap();
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert!(!log.contains("annotate"), "{log}");
        assert!(log.contains("--namespace ray patch statefulset w"), "{log}");
        assert_eq!(workload(dir.path())["spec"]["replicas"], 1);
        // A kubectl that fails is an error, not a silent success.
        let bad = k8s("/nonexistent/kubectl", "StatefulSet");
        let e = bad.terminate(&ids(&["w-0"]), "req-10").await.unwrap_err();
        assert!(e.contains("/nonexistent/kubectl"), "{e}");
    }
}
