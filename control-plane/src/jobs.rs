//! Jobs: the handlers of the job RPCs and the job manager, a leader-only service.
//!
//! The lifecycle lives in the replicated state (`Command::SubmitJob`, `AssignJob`,
//! `JobAttemptStarted`, `JobAttemptEnded`, `RequestJobStop`, `DeleteJob`); this module turns
//! requests and node reports into those commands, and the job manager places PENDING jobs on
//! nodes, starts them through the node's job agent, declares attempts on dead nodes lost and
//! fails jobs that waited in the queue too long.
//!
//! Invariant: an attempt runs on at most one node. It is assigned by a committed `AssignJob`
//! naming the node's incarnation; the agent refuses a start for another incarnation and
//! starts each (job, attempt) once; reports of an older attempt are rejected by `apply`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use protocol::pb;
use protocol::{NodeId, RpcError};
use tonic::Status;

use crate::head::{HeadShared, now_ms};
use crate::leader_loop::{InFlight, LeaderService};
use crate::state::{AttemptOutcome, Command, JobRecord, JobStatus, NodeState, Rejection, Response};
use tokio::sync::Notify;

const MAX_ENTRYPOINT: usize = 64 * 1024;
const MAX_RUNTIME_ENV: usize = 64 * 1024;
const MAX_RETRIES: u32 = 100;
const MAX_LOG_CHUNK: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct JobConfig {
    /// A job that no node could take for this long fails (as the leader watched it wait, on
    /// its monotonic clock; see [`plan`]).
    pub queue_timeout: Duration,
    /// SIGTERM → SIGKILL grace when a job is stopped.
    pub stop_grace: Duration,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            queue_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(3),
        }
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    RpcError::InvalidArgument(msg.into()).into()
}

fn status_pb(s: JobStatus) -> pb::JobStatus {
    match s {
        JobStatus::Pending => pb::JobStatus::Pending,
        JobStatus::Running => pb::JobStatus::Running,
        JobStatus::Succeeded => pb::JobStatus::Succeeded,
        JobStatus::Failed => pb::JobStatus::Failed,
        JobStatus::Stopped => pb::JobStatus::Stopped,
    }
}

pub(crate) fn job_info(shared: &HeadShared, j: &JobRecord) -> pb::JobInfo {
    let driver_node_address = j
        .driver_node
        .and_then(|n| {
            shared
                .state
                .read()
                .state
                .nodes
                .get(&n)
                .map(|r| r.address.clone())
        })
        .unwrap_or_default();
    pb::JobInfo {
        job_id: j.job_id.clone(),
        submission_id: j.submission_id.clone().unwrap_or_default(),
        entrypoint: j.entrypoint.clone(),
        status: status_pb(j.status) as i32,
        message: j.message.clone(),
        runtime_env_json: j.runtime_env_json.clone(),
        metadata: j.metadata.clone().into_iter().collect(),
        entrypoint_resources: j.entrypoint_resources.clone().into_iter().collect(),
        driver_node_id: j.driver_node.map(|n| n.to_string()).unwrap_or_default(),
        driver_node_address,
        has_exit_code: j.exit_code.is_some(),
        exit_code: j.exit_code.unwrap_or(0),
        submitted_at_ms: j.submitted_at_ms,
        started_at_ms: j.started_at_ms,
        ended_at_ms: j.ended_at_ms,
        attempt: j.attempt,
        max_retries: j.max_retries,
        priority: j.priority,
        stop_requested: j.stop_requested,
    }
}

/// A new submission id in Ray's form, `raysubmit_` and 16 random characters.
pub fn new_submission_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        // No /dev/urandom: fall back to the clock and the pid, still unique enough per head.
        let seed = now_ms() ^ u64::from(std::process::id()) << 32;
        b.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (seed >> (i % 8 * 8)) as u8 ^ i as u8);
    }
    let tail: String = b
        .iter()
        .map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char)
        .collect();
    format!("raysubmit_{tail}")
}

/// Checks a runtime_env: a JSON object with only the fields we support.
pub fn check_runtime_env(json: &str) -> Result<(), String> {
    if json.trim().is_empty() {
        return Ok(());
    }
    if json.len() > MAX_RUNTIME_ENV {
        return Err(format!(
            "runtime_env of {} bytes is over the {MAX_RUNTIME_ENV}-byte limit",
            json.len()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("runtime_env is not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("runtime_env must be a JSON object")?;
    for (k, v) in obj {
        match k.as_str() {
            "working_dir" if v.is_null() => {}
            // Only a package uploaded to the cluster: a path would name a directory on
            // whichever node runs the driver (Ray's job client uploads local directories
            // and sends their gcs:// URI, as `rayctl job submit --working-dir` does).
            "working_dir" if v.is_string() => {
                protocol::package::name_from_uri(v.as_str().unwrap_or_default()).map_err(|e| {
                    format!(
                        "runtime_env.{e}; upload a local directory with `rayctl job submit \
                         --working-dir` or Ray's job client"
                    )
                })?;
            }
            "env_vars" => {
                let m = v
                    .as_object()
                    .ok_or("runtime_env.env_vars must be an object of strings")?;
                if let Some((name, _)) = m.iter().find(|(_, v)| !v.is_string()) {
                    return Err(format!("runtime_env.env_vars.{name} must be a string"));
                }
            }
            "working_dir" => return Err("runtime_env.working_dir must be a string".into()),
            other => {
                return Err(format!(
                    "runtime_env.{other} is not supported (supported: working_dir, env_vars)"
                ));
            }
        }
    }
    Ok(())
}

fn check_submission_id(id: &str) -> Result<(), Status> {
    protocol::ids::validate_submission_id(id).map_err(|e| invalid(e.to_string()))
}

pub(crate) async fn submit(
    shared: &HeadShared,
    r: pb::SubmitJobRequest,
) -> Result<pb::JobInfo, Status> {
    let entrypoint = r.entrypoint.trim().to_owned();
    if entrypoint.is_empty() {
        return Err(invalid(
            "entrypoint is empty: give the shell command the job runs",
        ));
    }
    if entrypoint.len() > MAX_ENTRYPOINT {
        return Err(invalid(format!(
            "entrypoint of {} bytes is over the {MAX_ENTRYPOINT}-byte limit",
            entrypoint.len()
        )));
    }
    check_runtime_env(&r.runtime_env_json).map_err(invalid)?;
    if r.max_retries > MAX_RETRIES {
        return Err(invalid(format!(
            "max_retries {} is over the limit of {MAX_RETRIES}",
            r.max_retries
        )));
    }
    let resources = scheduler::ResourceSet::from_map(
        r.entrypoint_resources.iter().map(|(k, v)| (k.as_str(), *v)),
    )
    .map_err(|e| invalid(format!("entrypoint resources: {e}")))?
    .to_map();
    let id = if r.submission_id.is_empty() {
        new_submission_id()
    } else {
        r.submission_id.clone()
    };
    check_submission_id(&id)?;
    let cmd = Command::SubmitJob {
        job_id: id.clone(),
        submission_id: Some(id.clone()),
        entrypoint,
        runtime_env_json: if r.runtime_env_json.trim().is_empty() {
            "{}".into()
        } else {
            r.runtime_env_json
        },
        metadata: r.metadata.into_iter().collect(),
        resources,
        max_retries: r.max_retries,
        priority: r.priority,
        client_token: r.client_token.clone(),
        time_ms: now_ms(),
    };
    match shared.propose(cmd).await? {
        Response::Ok => {}
        Response::Rejected(Rejection::AlreadyExists { .. }) => {
            // A client retrying its own submit (same token) gets its job back.
            // Cloned out of the lock: `job_info` takes the read lock itself, and a second read
            // while a writer waits would deadlock.
            let same = {
                let st = shared.state.read();
                st.state
                    .jobs
                    .get(&id)
                    .filter(|j| !r.client_token.is_empty() && j.client_token == r.client_token)
                    .cloned()
            };
            return match same {
                Some(j) => Ok(job_info(shared, &j)),
                None => Err(RpcError::AlreadyExists(format!(
                    "a job with submission_id {id} already exists"
                ))
                .into()),
            };
        }
        Response::Rejected(e) => return Err(RpcError::FailedPrecondition(e.to_string()).into()),
        other => {
            return Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into());
        }
    }
    shared.job_kick.notify_one();
    // New demand: the autoscaler looks at once, not at its next period.
    shared.autoscaler_kick.notify_one();
    let st = shared.state.read();
    let j = st
        .state
        .jobs
        .get(&id)
        .cloned()
        .ok_or_else(|| Status::internal("submitted job vanished"))?;
    drop(st);
    Ok(job_info(shared, &j))
}

/// Finds a job by job id or submission id, after a read-index.
pub(crate) async fn get(shared: &HeadShared, id: &str) -> Result<JobRecord, Status> {
    shared.linearizable().await?;
    let st = shared.state.read();
    let job_id = st.state.submissions.get(id).map_or(id, String::as_str);
    st.state
        .jobs
        .get(job_id)
        .cloned()
        .ok_or_else(|| RpcError::NotFound(format!("no job {id:?}")).into())
}

pub(crate) async fn list(shared: &HeadShared) -> Result<Vec<pb::JobInfo>, Status> {
    shared.linearizable().await?;
    let jobs: Vec<JobRecord> = shared.state.read().state.jobs.values().cloned().collect();
    let mut out: Vec<pb::JobInfo> = jobs.iter().map(|j| job_info(shared, j)).collect();
    out.sort_by_key(|j| (j.submitted_at_ms, j.job_id.clone()));
    Ok(out)
}

fn rejected(e: Rejection) -> Status {
    match e {
        Rejection::NotFound { .. } => RpcError::NotFound(e.to_string()),
        _ => RpcError::FailedPrecondition(e.to_string()),
    }
    .into()
}

pub(crate) async fn stop(shared: &HeadShared, id: &str) -> Result<pb::JobInfo, Status> {
    let j = get(shared, id).await?;
    match shared
        .propose(Command::RequestJobStop {
            job_id: j.job_id.clone(),
            time_ms: now_ms(),
        })
        .await?
    {
        Response::Ok => shared.job_kick.notify_one(),
        Response::Rejected(e) => return Err(rejected(e)),
        other => {
            return Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into());
        }
    }
    let j = get(shared, &j.job_id).await?;
    Ok(job_info(shared, &j))
}

pub(crate) async fn delete(shared: &HeadShared, id: &str) -> Result<bool, Status> {
    let j = get(shared, id).await?;
    match shared
        .propose(Command::DeleteJob { job_id: j.job_id })
        .await?
    {
        Response::Ok => Ok(true),
        Response::Rejected(e) => Err(rejected(e)),
        other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
    }
}

/// Reads the job's log from the node that ran (or runs) its driver.
pub(crate) async fn logs(
    shared: &HeadShared,
    r: pb::GetJobLogsRequest,
) -> Result<pb::JobLogs, Status> {
    let j = get(shared, &r.job_id).await?;
    let Some(node) = j.driver_node else {
        return Ok(pb::JobLogs {
            data: Vec::new(),
            next_offset: r.offset,
            complete: j.status.is_terminal(),
        });
    };
    let (addr, alive) = {
        let st = shared.state.read();
        let n = st
            .state
            .nodes
            .get(&node)
            .ok_or_else(|| Status::internal(format!("driver node {node} is unknown")))?;
        (n.address.clone(), n.state == NodeState::Alive)
    };
    let mut nm = shared.node_manager(&addr)?;
    let req = pb::GetJobLogsRequest {
        job_id: j.job_id.clone(),
        offset: r.offset,
        max_bytes: r.max_bytes.clamp(1, MAX_LOG_CHUNK),
    };
    match nm.read_job_log(req).await {
        Ok(reply) => {
            let mut l = reply.into_inner();
            // Complete only once the job is terminal too: a retry may write more.
            l.complete = l.complete && j.status.is_terminal();
            Ok(l)
        }
        Err(e) if !alive => Err(RpcError::Unavailable(format!(
            "the log of job {} is on node {node} ({addr}), which is dead: {}",
            j.job_id,
            e.message()
        ))
        .into()),
        Err(e) => Err(e),
    }
}

pub(crate) async fn report(
    shared: &HeadShared,
    r: pb::ReportJobAttemptRequest,
) -> Result<(), Status> {
    let node_id: NodeId = r
        .node_id
        .parse()
        .map_err(|e: protocol::ids::IdError| invalid(e.to_string()))?;
    let time_ms = now_ms();
    let ended = |outcome| Command::JobAttemptEnded {
        job_id: r.job_id.clone(),
        attempt: r.attempt,
        outcome,
        message: r.message.clone(),
        time_ms,
    };
    let cmd =
        match pb::JobAttemptEvent::try_from(r.event).unwrap_or(pb::JobAttemptEvent::Unspecified) {
            pb::JobAttemptEvent::Started => Command::JobAttemptStarted {
                job_id: r.job_id.clone(),
                attempt: r.attempt,
                node_id,
                time_ms,
            },
            pb::JobAttemptEvent::Exited => ended(AttemptOutcome::Exited(r.exit_code)),
            pb::JobAttemptEvent::Stopped => ended(AttemptOutcome::Stopped),
            pb::JobAttemptEvent::FailedToStart => ended(AttemptOutcome::Failed),
            pb::JobAttemptEvent::Unspecified => {
                return Err(invalid(format!("unknown job attempt event {}", r.event)));
            }
        };
    match shared.propose(cmd).await? {
        Response::Ok => {
            let ended = shared
                .state
                .read()
                .state
                .jobs
                .get(&r.job_id)
                .filter(|j| j.status.is_terminal())
                .map(|j| (j.status, j.started_at_ms, j.ended_at_ms));
            if let Some((status, started, ended)) = ended {
                crate::metrics::record_job_ended(status, started, ended);
            }
            shared.job_kick.notify_one();
            Ok(())
        }
        Response::Rejected(e) => Err(rejected(e)),
        other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
    }
}

/// What the job manager does in one round, decided from a snapshot of the state.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Plan {
    pub(crate) commands: Vec<Command>,
    /// (job, attempt, node) to start through the node's agent.
    pub(crate) starts: Vec<(String, u32, NodeId)>,
    /// (job, attempt, node) to stop through the node's agent.
    pub(crate) stops: Vec<(String, u32, NodeId)>,
}

/// The job manager's decisions: pure, so they are tested without a cluster.
///
/// `waited` is how long this leader has itself watched each queued attempt wait (job id,
/// attempt), on its monotonic clock. The queue timeout is judged by that alone, never by
/// `submitted_at_ms`: that is another head's wall clock, and a head whose clock is an hour
/// fast would otherwise fail every queued job at once. A new leader starts watching afresh,
/// so a failover can only lengthen a wait, never cut it short.
pub(crate) fn plan(
    state: &crate::state::ClusterState,
    now_ms: u64,
    queue_timeout: Duration,
    waited: &HashMap<(String, u32), Duration>,
) -> Plan {
    let mut p = Plan::default();
    let alive = state.alive_map();
    // What jobs already hold on each node.
    let mut used: HashMap<NodeId, (scheduler::ResourceSet, usize)> = HashMap::new();
    let set = |r: &crate::state::Resources| {
        scheduler::ResourceSet::from_map(r.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap_or_default()
    };
    for j in state.jobs.values().filter(|j| !j.status.is_terminal()) {
        let Some(node) = j.driver_node else { continue };
        let lost = match alive.get(&node) {
            None => Some(format!("node {node} that ran the driver died")),
            Some(n) if n.incarnation != j.driver_incarnation => {
                Some(format!("node {node} that ran the driver restarted"))
            }
            Some(_) => None,
        };
        if let Some(message) = lost {
            p.commands.push(Command::JobAttemptEnded {
                job_id: j.job_id.clone(),
                attempt: j.attempt,
                outcome: AttemptOutcome::Lost,
                message,
                time_ms: now_ms,
            });
            continue;
        }
        let e = used.entry(node).or_default();
        e.0.add(&set(&j.entrypoint_resources));
        e.1 += 1;
        if j.stop_requested {
            p.stops.push((j.job_id.clone(), j.attempt, node));
        } else if j.status == JobStatus::Pending {
            p.starts.push((j.job_id.clone(), j.attempt, node));
        }
    }
    let mut queue: Vec<&JobRecord> = state
        .jobs
        .values()
        .filter(|j| j.status == JobStatus::Pending && j.driver_node.is_none())
        .collect();
    queue.sort_by_key(|j| {
        (
            std::cmp::Reverse(j.priority),
            j.submitted_at_ms,
            j.job_id.clone(),
        )
    });
    for j in queue {
        let need = set(&j.entrypoint_resources);
        let best = alive
            .iter()
            .filter(|(id, n)| {
                let mut free = set(&n.resources_total);
                match used.get(*id) {
                    Some((u, _)) if free.subtract(u).is_err() => false,
                    _ => free.contains(&need),
                }
            })
            .min_by_key(|(id, _)| (used.get(*id).map_or(0, |u| u.1), **id));
        match best {
            Some((id, n)) => {
                p.commands.push(Command::AssignJob {
                    job_id: j.job_id.clone(),
                    attempt: j.attempt,
                    node_id: *id,
                    incarnation: n.incarnation,
                });
                let e = used.entry(*id).or_default();
                e.0.add(&need);
                e.1 += 1;
                p.starts.push((j.job_id.clone(), j.attempt, *id));
            }
            None if waited
                .get(&(j.job_id.clone(), j.attempt))
                .is_some_and(|w| *w > queue_timeout) =>
            {
                p.commands.push(Command::JobAttemptEnded {
                    job_id: j.job_id.clone(),
                    attempt: j.attempt,
                    outcome: AttemptOutcome::Failed,
                    message: format!(
                        "no live node had the entrypoint's resources {:?} within the queue timeout of {}",
                        j.entrypoint_resources,
                        humantime::format_duration(queue_timeout)
                    ),
                    time_ms: now_ms,
                });
            }
            None => {}
        }
    }
    p
}

/// Agent RPCs (job, attempt, "start"|"stop") in flight or done in this term.
type SentSet = InFlight<(String, u32, &'static str)>;

/// The job manager: runs on the leader only (started and stopped by `leader::supervise`).
pub(crate) struct JobManager {
    cfg: JobConfig,
    sent: SentSet,
    /// When this head first saw each queued attempt (job id, attempt) waiting for a node.
    queued_since: HashMap<(String, u32), std::time::Instant>,
}

impl JobManager {
    pub(crate) fn new(cfg: JobConfig) -> Self {
        Self {
            cfg,
            sent: SentSet::default(),
            queued_since: HashMap::new(),
        }
    }

    /// How long this head has watched each queued attempt wait (see [`plan`]).
    fn waited(&mut self, state: &crate::state::ClusterState) -> HashMap<(String, u32), Duration> {
        let now = std::time::Instant::now();
        let queued: std::collections::HashSet<(String, u32)> = state
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Pending && j.driver_node.is_none())
            .map(|j| (j.job_id.clone(), j.attempt))
            .collect();
        self.queued_since.retain(|k, _| queued.contains(k));
        queued
            .into_iter()
            .map(|k| {
                let since = *self.queued_since.entry(k.clone()).or_insert(now);
                (k, now.duration_since(since))
            })
            .collect()
    }
}

impl LeaderService for JobManager {
    const NAME: &'static str = "job manager";
    type Effects = Plan;

    fn kick(shared: &HeadShared) -> Option<&Notify> {
        Some(&shared.job_kick)
    }

    fn plan(&mut self, shared: &HeadShared) -> (Vec<Command>, Plan) {
        let st = shared.state.read();
        crate::metrics::record_jobs(&st.state);
        let waited = self.waited(&st.state);
        let mut p = plan(&st.state, now_ms(), self.cfg.queue_timeout, &waited);
        (std::mem::take(&mut p.commands), p)
    }

    fn act(&mut self, shared: &Arc<HeadShared>, plan: Plan) {
        for (job, attempt, node) in plan.starts {
            send_once(shared, &self.sent, job, attempt, node, "start", self.cfg);
        }
        for (job, attempt, node) in plan.stops {
            send_once(shared, &self.sent, job, attempt, node, "stop", self.cfg);
        }
    }
}

/// Sends a start or stop to the node's agent unless one is already in flight or done; a
/// failed send is forgotten so the next round retries it.
fn send_once(
    shared: &Arc<HeadShared>,
    sent: &SentSet,
    job: String,
    attempt: u32,
    node: NodeId,
    what: &'static str,
    cfg: JobConfig,
) {
    let key = (job.clone(), attempt, what);
    if !sent.start(key.clone()) {
        return;
    }
    let (shared, sent) = (shared.clone(), sent.clone());
    tokio::spawn(async move {
        let res = agent_call(&shared, &job, attempt, node, what, cfg).await;
        if let Err(e) = res {
            tracing::warn!(job, attempt, %node, "job agent {what} failed: {}", e.message());
            tokio::time::sleep(Duration::from_millis(500)).await;
            sent.forget(&key);
        }
    });
}

async fn agent_call(
    shared: &HeadShared,
    job: &str,
    attempt: u32,
    node: NodeId,
    what: &str,
    cfg: JobConfig,
) -> Result<(), Status> {
    let (addr, incarnation, j, heads) = {
        let st = shared.state.read();
        let n = st
            .state
            .nodes
            .get(&node)
            .ok_or_else(|| Status::not_found("node gone"))?;
        let j = st
            .state
            .jobs
            .get(job)
            .cloned()
            .ok_or_else(|| Status::not_found("job gone"))?;
        let m = shared.raft.metrics().borrow().membership_config.clone();
        let heads: Vec<String> = m
            .membership()
            .nodes()
            .map(|(_, n)| n.addr.clone())
            .collect();
        (n.address.clone(), n.incarnation, j, heads)
    };
    let mut nm = shared.node_manager(&addr)?;
    if what == "start" {
        nm.start_job(pb::StartJobRequest {
            job_id: j.job_id,
            attempt,
            entrypoint: j.entrypoint,
            runtime_env_json: j.runtime_env_json,
            cluster_addresses: heads,
            incarnation,
        })
        .await?;
    } else {
        nm.stop_job_process(pb::StopJobProcessRequest {
            job_id: j.job_id,
            attempt,
            grace_ms: cfg.stop_grace.as_millis() as u64,
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterState, NodePorts};

    fn nid(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }

    fn state_with_nodes(cpus: &[f64]) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, c) in cpus.iter().enumerate() {
            s.apply(Command::RegisterNode {
                node_id: nid(i as u8 + 1),
                address: format!("127.0.0.1:{}", 1000 + i),
                ports: NodePorts::default(),
                resources: [("CPU".to_string(), *c)].into(),
                labels: Default::default(),
                is_head: i == 0,
                time_ms: 1,
            });
        }
        s
    }

    fn submit(s: &mut ClusterState, id: &str, cpus: f64, priority: i32, at: u64) {
        s.apply(Command::SubmitJob {
            job_id: id.into(),
            submission_id: Some(id.into()),
            entrypoint: "true".into(),
            runtime_env_json: "{}".into(),
            metadata: Default::default(),
            resources: if cpus > 0.0 {
                [("CPU".to_string(), cpus)].into()
            } else {
                Default::default()
            },
            max_retries: 0,
            priority,
            client_token: String::new(),
            time_ms: at,
        });
    }

    #[test]
    fn places_by_priority_within_capacity_and_queues_the_rest() {
        let mut s = state_with_nodes(&[1.0, 2.0]);
        submit(&mut s, "low", 2.0, 0, 10);
        submit(&mut s, "high", 2.0, 5, 20);
        submit(&mut s, "tiny", 0.0, 0, 30);
        submit(&mut s, "huge", 4.0, 0, 40);
        let p = plan(&s, 50, Duration::from_secs(60), &HashMap::new());
        let assigned: Vec<(String, NodeId)> = p
            .commands
            .iter()
            .filter_map(|c| match c {
                Command::AssignJob {
                    job_id, node_id, ..
                } => Some((job_id.clone(), *node_id)),
                _ => None,
            })
            .collect();
        // "high" goes first and takes node 2's 2 CPUs; "low" must wait; "tiny" needs nothing
        // and goes to the emptier node 1; "huge" fits nowhere and waits.
        assert_eq!(
            assigned,
            vec![("high".to_string(), nid(2)), ("tiny".to_string(), nid(1))]
        );
        assert_eq!(p.starts.len(), 2);
        // The wall clock says nothing about the queue timeout: this head's clock an hour
        // past every submission fails no job (a head with a fast clock once failed them all).
        let failed = |p: &Plan| -> Vec<String> {
            p.commands
                .iter()
                .filter_map(|c| match c {
                    Command::JobAttemptEnded { job_id, .. } => Some(job_id.clone()),
                    _ => None,
                })
                .collect()
        };
        let hour_later = 40 + 3_600_000;
        let p = plan(&s, hour_later, Duration::from_secs(60), &HashMap::new());
        assert!(failed(&p).is_empty(), "{:?}", p.commands);
        // What this leader watched wait past the timeout fails, with the reason; what it
        // watched for less (a new leader) waits on.
        let waited = HashMap::from([
            (("low".to_string(), 0), Duration::from_secs(61)),
            (("huge".to_string(), 0), Duration::from_secs(59)),
        ]);
        let p = plan(&s, 50, Duration::from_secs(60), &waited);
        assert_eq!(failed(&p), vec!["low".to_string()]);
    }

    #[test]
    fn the_leader_times_each_queued_attempt_from_when_it_first_saw_it() {
        let mut s = state_with_nodes(&[1.0]);
        submit(&mut s, "q", 4.0, 0, 10);
        let mut m = JobManager::new(JobConfig::default());
        let first = m.waited(&s)[&("q".to_string(), 0)];
        assert!(first < Duration::from_millis(50), "{first:?}");
        std::thread::sleep(Duration::from_millis(30));
        let later = m.waited(&s)[&("q".to_string(), 0)];
        assert!(later >= Duration::from_millis(30), "{later:?}");
        // Placed: no longer timed, and forgotten.
        s.apply(Command::AssignJob {
            job_id: "q".into(),
            attempt: 0,
            node_id: nid(1),
            incarnation: 1,
        });
        assert!(m.waited(&s).is_empty());
        assert!(m.queued_since.is_empty());
    }

    #[test]
    fn attempts_on_dead_or_restarted_nodes_are_lost() {
        let mut s = state_with_nodes(&[1.0, 1.0]);
        submit(&mut s, "a", 0.0, 0, 1);
        submit(&mut s, "b", 0.0, 0, 1);
        s.apply(Command::AssignJob {
            job_id: "a".into(),
            attempt: 0,
            node_id: nid(1),
            incarnation: 1,
        });
        s.apply(Command::AssignJob {
            job_id: "b".into(),
            attempt: 0,
            node_id: nid(2),
            incarnation: 1,
        });
        s.apply(Command::MarkNodeDead {
            node_id: nid(1),
            incarnation: 1,
            reason: "gone".into(),
            time_ms: 5,
        });
        // Node 2 re-registered: incarnation 2.
        s.apply(Command::RegisterNode {
            node_id: nid(2),
            address: "127.0.0.1:1001".into(),
            ports: NodePorts::default(),
            resources: Default::default(),
            labels: Default::default(),
            is_head: false,
            time_ms: 6,
        });
        let p = plan(&s, 10, Duration::from_secs(60), &HashMap::new());
        let msgs: Vec<String> = p
            .commands
            .iter()
            .filter_map(|c| match c {
                Command::JobAttemptEnded {
                    outcome: AttemptOutcome::Lost,
                    message,
                    ..
                } => Some(message.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(msgs.len(), 2);
        assert!(
            msgs[0].contains("died") && msgs[1].contains("restarted"),
            "{msgs:?}"
        );
        assert!(p.starts.is_empty());
    }

    #[test]
    fn runtime_env_is_checked() {
        assert!(check_runtime_env("").is_ok());
        assert!(
            check_runtime_env(
                r#"{"working_dir": "gcs://_ray_pkg_0011223344556677.zip", "env_vars": {"A": "1"}}"#
            )
            .is_ok()
        );
        assert!(check_runtime_env(r#"{"working_dir": null}"#).is_ok());
        for (bad, want) in [
            ("{", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"pip": ["x"]}"#, "runtime_env.pip is not supported"),
            (r#"{"env_vars": {"A": 1}}"#, "env_vars.A must be a string"),
            (r#"{"working_dir": "/etc"}"#, "is not a package URI"),
            (r#"{"working_dir": "pkg://x"}"#, "is not a package URI"),
            (
                r#"{"working_dir": "gcs://../../x.zip"}"#,
                "is not of the form _ray_pkg_",
            ),
        ] {
            let e = check_runtime_env(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(new_submission_id().starts_with("raysubmit_"));
        assert_ne!(new_submission_id(), new_submission_id());
    }
}
