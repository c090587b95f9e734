//! The job agent: runs job entrypoints on this node for the leader's job manager.
//!
//! Each attempt runs `sh -c ENTRYPOINT` in its own process group, in the job's directory,
//! with `RAYCTL_ADDRESS` and `RAYCTL_JOB_ID` in its environment, stdout and stderr appended
//! to `<log dir>/job-driver-<job id>.log`. The agent reports STARTED and then EXITED (with
//! the exit code) or STOPPED to the control plane, retrying until the report is taken.
//!
//! Invariants: each (job, attempt) starts at most once on this node, and only for the node
//! incarnation it was assigned to; a stop that arrives before the start marks the attempt
//! stopped so a late start cannot run it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use protocol::RpcError;
use protocol::client::HeadClient;
use protocol::pb;
use tonic::Status;

/// What the agent knows of one attempt.
enum Attempt {
    /// Fetching and unpacking its working_dir.
    Starting {
        stop: Arc<AtomicBool>,
    },
    Running {
        pgid: i32,
        stop: Arc<AtomicBool>,
    },
    Ended,
}

pub(crate) struct JobAgent {
    node: Arc<crate::NodeShared>,
    log_dir: PathBuf,
    work_dir: PathBuf,
    client: HeadClient,
    /// Handed to the entrypoint in its environment (never on a command line).
    token: Option<protocol::auth::AuthToken>,
    attempts: Mutex<HashMap<(String, u32), Attempt>>,
}

const MAX_READ: u64 = 4 * 1024 * 1024;

impl JobAgent {
    pub(crate) fn new(
        node: Arc<crate::NodeShared>,
        log_dir: PathBuf,
        work_dir: PathBuf,
        client: HeadClient,
        token: Option<protocol::auth::AuthToken>,
    ) -> Self {
        Self {
            node,
            log_dir,
            work_dir,
            client,
            token,
            attempts: Mutex::default(),
        }
    }

    fn log_path(&self, job_id: &str) -> PathBuf {
        self.log_dir.join(format!("job-driver-{job_id}.log"))
    }

    pub(crate) fn start(self: &Arc<Self>, r: pb::StartJobRequest) -> Result<bool, Status> {
        check_job_id(&r.job_id)?;
        let current = self.node.incarnation.load(Ordering::Acquire);
        if r.incarnation != current {
            return Err(RpcError::FailedPrecondition(format!(
                "job {} attempt {} was assigned to incarnation {} of this node, which is now {current}",
                r.job_id, r.attempt, r.incarnation
            ))
            .into());
        }
        if self.node.leases.draining() {
            return Err(RpcError::Unavailable(
                "this node is draining: it starts no new jobs".into(),
            )
            .into());
        }
        let key = (r.job_id.clone(), r.attempt);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            if attempts.contains_key(&key) {
                return Ok(false);
            }
            attempts.insert(key, Attempt::Starting { stop: stop.clone() });
        }
        // Setting up may fetch a package: answer now, run in the background.
        let me = self.clone();
        tokio::spawn(async move { me.run(r, stop).await });
        Ok(true)
    }

    async fn run(self: Arc<Self>, r: pb::StartJobRequest, stop: Arc<AtomicBool>) {
        let key = (r.job_id.clone(), r.attempt);
        let ended = |me: &Self| {
            me.attempts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), Attempt::Ended);
        };
        let (dir, env) = match self.prepare(&r).await {
            Ok(d) => d,
            Err(message) => {
                ended(&self);
                self.report(
                    &r.job_id,
                    r.attempt,
                    pb::JobAttemptEvent::FailedToStart,
                    0,
                    message,
                );
                return;
            }
        };
        let spawned = {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            if stop.load(Ordering::Acquire) {
                attempts.insert(key, Attempt::Ended);
                None
            } else {
                let res = self.spawn(&r, &dir, &env);
                attempts.insert(
                    key,
                    match &res {
                        Ok((_, pgid)) => Attempt::Running {
                            pgid: *pgid,
                            stop: stop.clone(),
                        },
                        Err(_) => Attempt::Ended,
                    },
                );
                Some(res)
            }
        };
        match spawned {
            None => self.report(
                &r.job_id,
                r.attempt,
                pb::JobAttemptEvent::Stopped,
                0,
                "stopped before it started".into(),
            ),
            Some(Ok((child, _))) => {
                // The driver runs; the head does not know yet (the chaos runner crashes the
                // node here: the attempt must still end once, and run at most once).
                fail::fail_point!("job-agent-start");
                self.report(
                    &r.job_id,
                    r.attempt,
                    pb::JobAttemptEvent::Started,
                    0,
                    String::new(),
                );
                self.wait(r.job_id, r.attempt, child, stop).await;
            }
            Some(Err(message)) => self.report(
                &r.job_id,
                r.attempt,
                pb::JobAttemptEvent::FailedToStart,
                0,
                message,
            ),
        }
    }

    /// The job's directory (fresh, with its working_dir package unpacked into it) and its
    /// parsed runtime_env.
    async fn prepare(
        &self,
        r: &pb::StartJobRequest,
    ) -> Result<(PathBuf, serde_json::Value), String> {
        let env: serde_json::Value = serde_json::from_str(if r.runtime_env_json.is_empty() {
            "{}"
        } else {
            &r.runtime_env_json
        })
        .map_err(|e| format!("runtime_env is not valid JSON: {e}"))?;
        let dir = self.work_dir.join(&r.job_id);
        // A retry starts from a clean copy.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("cannot clean the job directory {}: {e}", dir.display()))?;
        }
        match env.get("working_dir").and_then(|v| v.as_str()) {
            Some(uri) => {
                let bytes = crate::package::fetch(&self.client, uri).await?;
                let d = dir.clone();
                tokio::task::spawn_blocking(move || {
                    protocol::package::unpack(&bytes, &d, protocol::package::Limits::default())
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("working_dir {uri}: {e}"))?;
            }
            None => std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create the job directory {}: {e}", dir.display()))?,
        }
        Ok((dir, env))
    }

    fn spawn(
        &self,
        r: &pb::StartJobRequest,
        dir: &std::path::Path,
        env: &serde_json::Value,
    ) -> Result<(tokio::process::Child, i32), String> {
        std::fs::create_dir_all(&self.log_dir).map_err(|e| {
            format!(
                "cannot create the log directory {}: {e}",
                self.log_dir.display()
            )
        })?;
        let log_path = self.log_path(&r.job_id);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open the job log {}: {e}", log_path.display()))?;
        if r.attempt > 0 {
            use std::io::Write;
            let _ = writeln!(
                log,
                "--- rayctl: attempt {} of job {} ---",
                r.attempt, r.job_id
            );
        }
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot open the job log: {e}"))?;
        let mut cmd = tokio::process::Command::new("sh");
        match &self.token {
            Some(t) => cmd.env(protocol::AUTH_TOKEN_ENV, t.as_str()),
            None => cmd.env_remove(protocol::AUTH_TOKEN_ENV),
        };
        cmd.arg("-c")
            .arg(&r.entrypoint)
            .current_dir(dir)
            .env(protocol::ADDRESS_ENV, r.cluster_addresses.join(","))
            .env(protocol::env::JOB_ID, &r.job_id)
            .env("RAY_JOB_SUBMISSION_ID", &r.job_id)
            // The driver's local node (the SDK uses its store and leases from it).
            .env(protocol::env::NODE_ID, self.node.node_id.to_string())
            .env(protocol::env::NODE_ADDRESS, &self.node.address)
            .env(
                protocol::env::OBJECT_STORE_SOCKET,
                &self.node.object_store_socket,
            )
            .env(protocol::env::OBJECT_MANAGER_ADDRESS, self.node.my_om())
            // Job code never learns where the heads keep their peer secret.
            .env_remove(protocol::auth::PEER_SECRET_PATH_ENV)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(vars) = env.get("env_vars").and_then(|v| v.as_object()) {
            for (k, v) in vars {
                if let Some(v) = v.as_str() {
                    cmd.env(k, v);
                }
            }
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
        // shell dies with this daemon, so a dead node runs no driver.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start `sh -c {}`: {e}", r.entrypoint))?;
        let pgid = child
            .id()
            .map(|p| p as i32)
            .ok_or("the entrypoint exited before it could be tracked")?;
        Ok((child, pgid))
    }

    async fn wait(
        &self,
        job_id: String,
        attempt: u32,
        mut child: tokio::process::Child,
        stop: Arc<AtomicBool>,
    ) {
        let status = child.wait().await;
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((job_id.clone(), attempt), Attempt::Ended);
        let (event, code, message) = match status {
            _ if stop.load(Ordering::Acquire) => (
                pb::JobAttemptEvent::Stopped,
                0,
                "stopped by request".to_string(),
            ),
            Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(0), _) => (pb::JobAttemptEvent::Exited, 0, "succeeded".to_string()),
                (Some(c), _) => (
                    pb::JobAttemptEvent::Exited,
                    c,
                    format!("the entrypoint exited with code {c}"),
                ),
                (None, Some(sig)) => (
                    pb::JobAttemptEvent::Exited,
                    128 + sig,
                    format!("the entrypoint was killed by signal {sig}"),
                ),
                (None, None) => (
                    pb::JobAttemptEvent::Exited,
                    -1,
                    "the entrypoint ended without an exit code".to_string(),
                ),
            },
            Err(e) => (
                pb::JobAttemptEvent::Exited,
                -1,
                format!("cannot wait for the entrypoint: {e}"),
            ),
        };
        self.report(&job_id, attempt, event, code, message);
    }

    /// SIGTERM to the attempt's process group, SIGKILL after `grace`.
    pub(crate) fn stop(self: &Arc<Self>, r: &pb::StopJobProcessRequest) -> bool {
        let key = (r.job_id.clone(), r.attempt);
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        match attempts.get(&key) {
            Some(Attempt::Starting { stop }) => {
                stop.store(true, Ordering::Release);
                true
            }
            Some(Attempt::Running { pgid, stop }) => {
                stop.store(true, Ordering::Release);
                let pgid = Pid::from_raw(*pgid);
                let _ = killpg(pgid, Signal::SIGTERM);
                let grace = Duration::from_millis(r.grace_ms);
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let _ = killpg(pgid, Signal::SIGKILL);
                });
                true
            }
            Some(Attempt::Ended) => false,
            None => {
                // Stopped before it started here: make sure a late start cannot run it.
                attempts.insert(key, Attempt::Ended);
                drop(attempts);
                self.report(
                    &r.job_id,
                    r.attempt,
                    pb::JobAttemptEvent::Stopped,
                    0,
                    "stopped before it started".into(),
                );
                false
            }
        }
    }

    /// Kills every running attempt (the node is shutting down).
    /// Attempts starting or running here.
    pub(crate) fn running(&self) -> usize {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|a| !matches!(a, Attempt::Ended))
            .count()
    }

    pub(crate) fn kill_all(&self) {
        for a in self
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if let Attempt::Running { pgid, .. } = a {
                let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
            }
        }
    }

    pub(crate) fn read_log(&self, r: &pb::GetJobLogsRequest) -> Result<pb::JobLogs, Status> {
        use std::io::{Read, Seek, SeekFrom};
        check_job_id(&r.job_id)?;
        let path = self.log_path(&r.job_id);
        let running = self
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|((j, _), a)| j == &r.job_id && !matches!(a, Attempt::Ended));
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Not started yet (or never will be here): nothing to read so far.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(pb::JobLogs {
                    data: Vec::new(),
                    next_offset: r.offset,
                    complete: !running,
                });
            }
            Err(e) => {
                return Err(
                    RpcError::Internal(format!("cannot open {}: {e}", path.display())).into(),
                );
            }
        };
        let len = f
            .metadata()
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        let offset = r.offset.min(len);
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| Status::internal(e.to_string()))?;
        let want = r.max_bytes.clamp(1, MAX_READ).min(len - offset);
        let mut data = vec![0; want as usize];
        f.read_exact(&mut data)
            .map_err(|e| Status::internal(e.to_string()))?;
        let next = offset + want;
        Ok(pb::JobLogs {
            data,
            next_offset: next,
            complete: !running && next == len,
        })
    }

    /// Sends a report in the background, retrying until the control plane takes it or
    /// answers that it no longer applies.
    fn report(
        &self,
        job_id: &str,
        attempt: u32,
        event: pb::JobAttemptEvent,
        exit_code: i32,
        message: String,
    ) {
        let req = pb::ReportJobAttemptRequest {
            job_id: job_id.to_owned(),
            attempt,
            node_id: self.node.node_id.to_string(),
            event: event as i32,
            exit_code,
            message,
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let res = client
                    .call(|mut c| {
                        let r = req.clone();
                        async move { c.report_job_attempt(r).await }
                    })
                    .await;
                match res {
                    Ok(_) => return,
                    Err(e) if e.rpc().is_some_and(|r| !r.is_retryable()) => {
                        tracing::info!(
                            job = req.job_id,
                            attempt,
                            "job report no longer applies: {e}"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(
                            job = req.job_id,
                            attempt,
                            "job report will be retried: {e}"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }
}

fn check_job_id(id: &str) -> Result<(), Status> {
    protocol::ids::validate_submission_id(id)
        .map_err(|e| RpcError::InvalidArgument(e.to_string()).into())
}
