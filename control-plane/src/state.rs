//! The replicated cluster state: one closed `Command` enum and one deterministic `apply`.
//!
//! Invariants:
//! - `apply` reads no clock and no RNG: every timestamp travels inside the command, so every
//!   head that applies the same log reaches the same state.
//! - A rejected command changes nothing and yields `Response::Rejected`; it is still a
//!   committed log entry (the leader cannot know the outcome before applying).
//! - Node incarnations only grow; `MarkNodeDead` applies only to the incarnation it names
//!   (fencing), so a late death verdict cannot kill a re-registered node.
//! - Terminal job states (SUCCEEDED, FAILED, STOPPED) and DEAD actors never change again.

use std::collections::BTreeMap;

use protocol::NodeId;
use serde::{Deserialize, Serialize};

pub type Resources = BTreeMap<String, f64>;
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodePorts {
    pub node_manager: u16,
    pub object_manager: u16,
    pub metrics_export: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Alive,
    Dead,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: NodeId,
    pub address: String,
    pub ports: NodePorts,
    pub resources_total: Resources,
    pub labels: Labels,
    pub is_head: bool,
    pub state: NodeState,
    pub incarnation: u64,
    pub registered_at_ms: u64,
    pub dead_at_ms: u64,
    pub death_reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Stopped,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Stopped)
    }
    fn may_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Pending, Running | Failed | Stopped) | (Running, Succeeded | Failed | Stopped)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub submission_id: Option<String>,
    pub entrypoint: String,
    pub runtime_env_json: String,
    pub metadata: Labels,
    pub entrypoint_resources: Resources,
    pub status: JobStatus,
    pub driver_node: Option<NodeId>,
    /// The incarnation of `driver_node` the current attempt was assigned to.
    pub driver_incarnation: u64,
    pub exit_code: Option<i32>,
    pub message: String,
    pub submitted_at_ms: u64,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    /// 0 for the first run; a retry is a new attempt, and reports of older attempts are stale.
    pub attempt: u32,
    pub max_retries: u32,
    pub priority: i32,
    pub stop_requested: bool,
    /// Set by the submitting client; a retried submit with the same token gets this job back.
    pub client_token: String,
}

/// How one attempt of a job ended, as its node (or the job manager) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// The entrypoint exited with this code.
    Exited(i32),
    /// Ended by a stop request.
    Stopped,
    /// The attempt was lost with its node; may be retried.
    Lost,
    /// Could not run at all (queue timeout, bad working dir); never retried.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActorState {
    PendingCreation,
    Alive,
    Restarting,
    Dead,
}

/// What the actor manager needs to (re)start an actor, fixed at creation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActorSpec {
    /// `pb::ActorSpec`, prost-encoded (constructor, binary, options).
    pub encoded: Vec<u8>,
    pub resources: Resources,
    /// Not detached: the actor dies with the process whose objects carry this prefix.
    pub owner_prefix: Vec<u8>,
    pub max_task_retries: i64,
    pub max_concurrency: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorRecord {
    pub actor_id: String,
    pub job_id: String,
    pub class_name: String,
    pub name: Option<String>,
    pub namespace: String,
    pub detached: bool,
    /// -1 means unlimited, as in Ray.
    pub max_restarts: i64,
    /// Also the incarnation of the actor: every start names it, stale reports are refused.
    pub num_restarts: u64,
    pub state: ActorState,
    /// PENDING_CREATION/RESTARTING: the node it is being started on, once assigned;
    /// ALIVE: where it runs.
    pub node_id: Option<NodeId>,
    pub node_incarnation: u64,
    pub worker_id: String,
    pub worker_address: String,
    pub pid: u32,
    pub created_at_ms: u64,
    pub message: String,
    pub spec: ActorSpec,
}

impl ActorRecord {
    pub fn restarts_left(&self) -> bool {
        self.max_restarts < 0 || self.num_restarts < self.max_restarts.unsigned_abs()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PgStrategy {
    Pack,
    Spread,
    StrictPack,
    StrictSpread,
}

impl PgStrategy {
    /// Ray's name of the strategy.
    pub fn name(self) -> &'static str {
        match self {
            PgStrategy::Pack => "PACK",
            PgStrategy::Spread => "SPREAD",
            PgStrategy::StrictPack => "STRICT_PACK",
            PgStrategy::StrictSpread => "STRICT_SPREAD",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PgState {
    Pending,
    Created,
    Rescheduling,
    Removed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementGroupRecord {
    pub pg_id: String,
    pub job_id: String,
    pub name: String,
    pub strategy: PgStrategy,
    pub bundles: Vec<Resources>,
    /// Where each bundle is reserved; `None` while unplaced.
    pub bundle_nodes: Vec<Option<NodeId>>,
    /// The incarnation of each bundle's node when it was placed.
    pub bundle_incarnations: Vec<u64>,
    pub state: PgState,
    pub created_at_ms: u64,
    pub detached: bool,
    /// Not detached: removed when the process with this owner prefix exits.
    pub owner_prefix: Vec<u8>,
}

/// Every change to the replicated state. Closed: adding a variant is a log-format change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    RegisterNode {
        node_id: NodeId,
        address: String,
        ports: NodePorts,
        resources: Resources,
        labels: Labels,
        is_head: bool,
        time_ms: u64,
    },
    MarkNodeDead {
        node_id: NodeId,
        incarnation: u64,
        reason: String,
        time_ms: u64,
    },
    KvPut {
        namespace: String,
        key: Vec<u8>,
        value: Vec<u8>,
        overwrite: bool,
    },
    KvDelete {
        namespace: String,
        key: Vec<u8>,
    },
    SubmitJob {
        job_id: String,
        submission_id: Option<String>,
        entrypoint: String,
        runtime_env_json: String,
        metadata: Labels,
        resources: Resources,
        max_retries: u32,
        priority: i32,
        client_token: String,
        time_ms: u64,
    },
    /// The job manager placed the current attempt of a PENDING job on a node.
    AssignJob {
        job_id: String,
        attempt: u32,
        node_id: NodeId,
        incarnation: u64,
    },
    /// The node's agent started the attempt: PENDING → RUNNING.
    JobAttemptStarted {
        job_id: String,
        attempt: u32,
        node_id: NodeId,
        time_ms: u64,
    },
    /// The attempt ended: the job becomes terminal, or PENDING again as a new attempt when it
    /// failed and has retries left.
    JobAttemptEnded {
        job_id: String,
        attempt: u32,
        outcome: AttemptOutcome,
        message: String,
        time_ms: u64,
    },
    /// Stop: at once for a job not yet placed, else through its node's agent.
    RequestJobStop {
        job_id: String,
        time_ms: u64,
    },
    /// Forgets a terminal job.
    DeleteJob {
        job_id: String,
    },
    SetJobStatus {
        job_id: String,
        status: JobStatus,
        driver_node: Option<NodeId>,
        exit_code: Option<i32>,
        message: String,
        time_ms: u64,
    },
    CreateActor {
        actor_id: String,
        job_id: String,
        class_name: String,
        name: Option<String>,
        namespace: String,
        detached: bool,
        max_restarts: i64,
        time_ms: u64,
        spec: ActorSpec,
    },
    /// The actor manager chose a node for this incarnation of the actor (before it asks
    /// the node to start it, so a new leader asks the same node again).
    AssignActor {
        actor_id: String,
        num_restarts: u64,
        node_id: NodeId,
        node_incarnation: u64,
    },
    /// The node started it: ALIVE at this worker.
    ActorStarted {
        actor_id: String,
        num_restarts: u64,
        worker_id: String,
        worker_address: String,
        pid: u32,
    },
    /// Its worker or node died, it was killed, or its owner died: RESTARTING when restarts
    /// are left and `no_restart` is false, else DEAD. A report for another incarnation
    /// changes nothing.
    ActorDied {
        actor_id: String,
        num_restarts: u64,
        reason: String,
        no_restart: bool,
    },
    CreatePlacementGroup {
        pg_id: String,
        job_id: String,
        name: String,
        strategy: PgStrategy,
        bundles: Vec<Resources>,
        time_ms: u64,
        detached: bool,
        owner_prefix: Vec<u8>,
    },
    /// CREATED needs a node (and its incarnation) for every bundle; RESCHEDULING and
    /// REMOVED clear them.
    SetPlacementGroupState {
        pg_id: String,
        state: PgState,
        bundle_nodes: Vec<Option<NodeId>>,
        bundle_incarnations: Vec<u64>,
    },
    /// Several commands in one log entry (one fsync); each is applied in order and answered
    /// on its own. Decoding refuses batches nested deeper than [`MAX_BATCH_DEPTH`].
    Batch(#[serde(deserialize_with = "bounded_batch")] Vec<Command>),
    /// The autoscaler's config as canonical JSON, checked before it is proposed; `None`
    /// turns the autoscaler off.
    SetAutoscalerConfig {
        config_json: Option<String>,
    },
    /// `request_resources`: replaces the floor.
    SetResourceRequest {
        bundles: Vec<Resources>,
    },
    /// A launch record, in REQUESTED, committed before the provider is called.
    CreateInstance {
        instance_id: String,
        request_id: String,
        node_type: String,
        time_ms: u64,
    },
    UpdateInstance {
        update: crate::instances::InstanceUpdate,
        time_ms: u64,
    },
    /// `RegisterNode` from a daemon that names its registration (one id per daemon start):
    /// a retry of a registration that was committed while its reply was lost (a leader died)
    /// gets the same incarnation back instead of fencing the node's work.
    RegisterNodeOnce {
        node_id: NodeId,
        address: String,
        ports: NodePorts,
        resources: Resources,
        labels: Labels,
        is_head: bool,
        time_ms: u64,
        registration_id: String,
    },
}

/// How deep batches may nest in a decoded command: the proposer's batch of proposals that
/// are themselves batches (a manager's round) is 2. Anything deeper is refused while it is
/// decoded, so no log entry or message, however crafted, can recurse the decoder (or
/// `apply`, or a drop) off the stack.
pub const MAX_BATCH_DEPTH: usize = 2;

thread_local! {
    static BATCH_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn bounded_batch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Command>, D::Error> {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            BATCH_DEPTH.with(|c| c.set(self.0));
        }
    }
    let depth = BATCH_DEPTH.with(|c| c.get());
    if depth >= MAX_BATCH_DEPTH {
        return Err(serde::de::Error::custom(format!(
            "command batches nested deeper than {MAX_BATCH_DEPTH}"
        )));
    }
    BATCH_DEPTH.with(|c| c.set(depth + 1));
    let _restore = Restore(depth);
    Vec::<Command>::deserialize(d)
}

pub use crate::rejection::Rejection;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    NodeRegistered {
        incarnation: u64,
    },
    /// KvPut: whether the value was written; KvDelete: whether a key was removed.
    Kv(bool),
    Batch(Vec<Response>),
    Rejected(Rejection),
}

/// All replicated tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub jobs: BTreeMap<String, JobRecord>,
    /// submission_id → job_id, so a retried submit finds its job.
    pub submissions: BTreeMap<String, String>,
    pub actors: BTreeMap<String, ActorRecord>,
    /// (namespace, name) → actor_id, for actors that are not DEAD.
    pub named_actors: BTreeMap<(String, String), String>,
    pub placement_groups: BTreeMap<String, PlacementGroupRecord>,
    pub kv: BTreeMap<(String, Vec<u8>), Vec<u8>>,
    /// Serialized after the rest in snapshots (version 3), so version-2 snapshots still load.
    #[serde(skip)]
    pub autoscaler: crate::instances::AutoscalerState,
    /// node → the registration id of its current incarnation (snapshot version 3, after the
    /// autoscaler's state).
    #[serde(skip)]
    pub registrations: BTreeMap<NodeId, String>,
}

fn answer(r: Result<(), Rejection>) -> Response {
    match r {
        Ok(()) => Response::Ok,
        Err(e) => Response::Rejected(e),
    }
}

fn not_found(kind: &str, id: impl ToString) -> Response {
    Response::Rejected(Rejection::NotFound {
        kind: kind.into(),
        id: id.to_string(),
    })
}

fn exists(kind: &str, id: impl ToString) -> Response {
    Response::Rejected(Rejection::AlreadyExists {
        kind: kind.into(),
        id: id.to_string(),
    })
}

fn transition(
    kind: &str,
    id: &str,
    from: impl std::fmt::Debug,
    to: impl std::fmt::Debug,
) -> Response {
    Response::Rejected(Rejection::InvalidTransition {
        kind: kind.into(),
        id: id.into(),
        from: format!("{from:?}"),
        to: format!("{to:?}"),
    })
}

impl Command {
    /// A rough size of the command in the log, for batching under a byte budget.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Command::KvPut {
                namespace,
                key,
                value,
                ..
            } => 64 + namespace.len() + key.len() + value.len(),
            Command::SubmitJob {
                entrypoint,
                runtime_env_json,
                ..
            } => 256 + entrypoint.len() + runtime_env_json.len(),
            Command::SetAutoscalerConfig { config_json } => {
                64 + config_json.as_ref().map_or(0, String::len)
            }
            Command::Batch(cmds) => cmds.iter().map(Command::approx_bytes).sum(),
            _ => 256,
        }
    }
}

fn stale_actor(a: &ActorRecord, given: u64, what: &str) -> Response {
    Response::Rejected(Rejection::Invalid(format!(
        "actor {}: stale {what} for incarnation {given} (now {:?}, {} restart(s), node {:?})",
        a.actor_id, a.state, a.num_restarts, a.node_id
    )))
}

fn stale_attempt(job_id: &str, given: u32, current: u32) -> Response {
    Response::Rejected(Rejection::Invalid(format!(
        "job {job_id}: attempt {given} is not the current attempt {current}"
    )))
}

impl ClusterState {
    /// Applies one committed command. Deterministic; never panics on any input.
    pub fn apply(&mut self, cmd: Command) -> Response {
        let Command::Batch(cmds) = cmd else {
            return self.apply_one(cmd);
        };
        // Iterative, so the depth of a batch never deepens the stack.
        let mut stack: Vec<(std::vec::IntoIter<Command>, Vec<Response>)> =
            vec![(cmds.into_iter(), Vec::new())];
        while let Some((cmds, answered)) = stack.last_mut() {
            match cmds.next() {
                Some(Command::Batch(inner)) => stack.push((inner.into_iter(), Vec::new())),
                Some(c) => {
                    let r = self.apply_one(c);
                    answered.push(r);
                }
                None => {
                    let done = stack.pop().map(|(_, rs)| Response::Batch(rs));
                    match (stack.last_mut(), done) {
                        (Some((_, parent)), Some(r)) => parent.push(r),
                        (None, Some(r)) => return r,
                        _ => break,
                    }
                }
            }
        }
        Response::Batch(Vec::new())
    }

    fn apply_one(&mut self, cmd: Command) -> Response {
        match cmd {
            Command::Batch(_) => self.apply(cmd),
            Command::RegisterNode {
                node_id,
                address,
                ports,
                resources,
                labels,
                is_head,
                time_ms,
            } => {
                if let Some(bad) = resources.iter().find(|(_, v)| !v.is_finite() || **v < 0.0) {
                    return Response::Rejected(Rejection::Invalid(format!(
                        "resource {} = {} must be finite and non-negative",
                        bad.0, bad.1
                    )));
                }
                let incarnation = self.nodes.get(&node_id).map_or(1, |n| n.incarnation + 1);
                self.nodes.insert(
                    node_id,
                    NodeRecord {
                        node_id,
                        address,
                        ports,
                        resources_total: resources,
                        labels,
                        is_head,
                        state: NodeState::Alive,
                        incarnation,
                        registered_at_ms: time_ms,
                        dead_at_ms: 0,
                        death_reason: String::new(),
                    },
                );
                Response::NodeRegistered { incarnation }
            }
            Command::MarkNodeDead {
                node_id,
                incarnation,
                reason,
                time_ms,
            } => {
                let Some(n) = self.nodes.get_mut(&node_id) else {
                    return not_found("node", node_id);
                };
                if n.incarnation != incarnation || n.state != NodeState::Alive {
                    return Response::Rejected(Rejection::Fenced {
                        node_id: node_id.to_string(),
                        given: incarnation,
                        current: n.incarnation,
                        state: format!("{:?}", n.state).to_uppercase(),
                    });
                }
                n.state = NodeState::Dead;
                n.dead_at_ms = time_ms;
                self.autoscaler.node_gone(node_id, &reason, time_ms);
                n.death_reason = reason;
                Response::Ok
            }
            Command::RegisterNodeOnce {
                node_id,
                address,
                ports,
                resources,
                labels,
                is_head,
                time_ms,
                registration_id,
            } => {
                if let Some(n) = self.nodes.get(&node_id)
                    && n.state == NodeState::Alive
                    && !registration_id.is_empty()
                    && self.registrations.get(&node_id) == Some(&registration_id)
                {
                    return Response::NodeRegistered {
                        incarnation: n.incarnation,
                    };
                }
                let r = self.apply_one(Command::RegisterNode {
                    node_id,
                    address,
                    ports,
                    resources,
                    labels,
                    is_head,
                    time_ms,
                });
                if matches!(r, Response::NodeRegistered { .. }) {
                    self.registrations.insert(node_id, registration_id);
                }
                r
            }
            Command::SetAutoscalerConfig { config_json } => {
                self.autoscaler.set_config(config_json);
                Response::Ok
            }
            Command::SetResourceRequest { bundles } => answer(self.autoscaler.set_floor(bundles)),
            Command::CreateInstance {
                instance_id,
                request_id,
                node_type,
                time_ms,
            } => answer(
                self.autoscaler
                    .create(instance_id, request_id, node_type, time_ms),
            ),
            Command::UpdateInstance { update, time_ms } => {
                answer(self.autoscaler.update(update, time_ms))
            }
            Command::KvPut {
                namespace,
                key,
                value,
                overwrite,
            } => {
                let k = (namespace, key);
                if !overwrite && self.kv.contains_key(&k) {
                    return Response::Kv(false);
                }
                self.kv.insert(k, value);
                Response::Kv(true)
            }
            Command::KvDelete { namespace, key } => {
                Response::Kv(self.kv.remove(&(namespace, key)).is_some())
            }
            Command::SubmitJob {
                job_id,
                submission_id,
                entrypoint,
                runtime_env_json,
                metadata,
                resources,
                max_retries,
                priority,
                client_token,
                time_ms,
            } => {
                if self.jobs.contains_key(&job_id) {
                    return exists("job", job_id);
                }
                if let Some(sid) = &submission_id {
                    if self.submissions.contains_key(sid) {
                        return exists("submission", sid);
                    }
                    self.submissions.insert(sid.clone(), job_id.clone());
                }
                self.jobs.insert(
                    job_id.clone(),
                    JobRecord {
                        job_id,
                        submission_id,
                        entrypoint,
                        runtime_env_json,
                        metadata,
                        entrypoint_resources: resources,
                        status: JobStatus::Pending,
                        driver_node: None,
                        driver_incarnation: 0,
                        exit_code: None,
                        message: "waiting for a node".into(),
                        submitted_at_ms: time_ms,
                        started_at_ms: 0,
                        ended_at_ms: 0,
                        attempt: 0,
                        max_retries,
                        priority,
                        stop_requested: false,
                        client_token,
                    },
                );
                Response::Ok
            }
            Command::AssignJob {
                job_id,
                attempt,
                node_id,
                incarnation,
            } => {
                if let Err(r) = self.autoscaler.leaving(node_id) {
                    return Response::Rejected(r);
                }
                let Some(j) = self.jobs.get_mut(&job_id) else {
                    return not_found("job", job_id);
                };
                if j.status != JobStatus::Pending
                    || j.driver_node.is_some()
                    || j.attempt != attempt
                    || j.stop_requested
                {
                    return transition("job", &job_id, j.status, "ASSIGNED");
                }
                j.driver_node = Some(node_id);
                j.driver_incarnation = incarnation;
                j.message = format!("starting on node {node_id}");
                Response::Ok
            }
            Command::JobAttemptStarted {
                job_id,
                attempt,
                node_id,
                time_ms,
            } => {
                let Some(j) = self.jobs.get_mut(&job_id) else {
                    return not_found("job", job_id);
                };
                if j.attempt != attempt || j.driver_node != Some(node_id) {
                    return stale_attempt(&job_id, attempt, j.attempt);
                }
                match j.status {
                    JobStatus::Running => Response::Ok,
                    JobStatus::Pending => {
                        j.status = JobStatus::Running;
                        j.started_at_ms = time_ms;
                        j.message = "running".into();
                        Response::Ok
                    }
                    other => transition("job", &job_id, other, JobStatus::Running),
                }
            }
            Command::JobAttemptEnded {
                job_id,
                attempt,
                outcome,
                message,
                time_ms,
            } => {
                let Some(j) = self.jobs.get_mut(&job_id) else {
                    return not_found("job", job_id);
                };
                if j.status.is_terminal() {
                    return transition("job", &job_id, j.status, "ENDED");
                }
                if j.attempt != attempt {
                    return stale_attempt(&job_id, attempt, j.attempt);
                }
                let (status, exit_code) = match outcome {
                    _ if j.stop_requested => (JobStatus::Stopped, None),
                    AttemptOutcome::Stopped => (JobStatus::Stopped, None),
                    AttemptOutcome::Exited(0) => (JobStatus::Succeeded, Some(0)),
                    AttemptOutcome::Exited(c) => (JobStatus::Failed, Some(c)),
                    AttemptOutcome::Lost | AttemptOutcome::Failed => (JobStatus::Failed, None),
                };
                let retry = status == JobStatus::Failed
                    && outcome != AttemptOutcome::Failed
                    && j.attempt < j.max_retries;
                if retry {
                    j.status = JobStatus::Pending;
                    j.attempt += 1;
                    j.driver_node = None;
                    j.driver_incarnation = 0;
                    j.exit_code = exit_code;
                    j.message = format!(
                        "attempt {attempt} failed ({message}); retrying, attempt {} of {}",
                        j.attempt, j.max_retries
                    );
                } else {
                    j.status = status;
                    j.exit_code = exit_code;
                    j.ended_at_ms = time_ms;
                    j.message = message;
                }
                Response::Ok
            }
            Command::RequestJobStop { job_id, time_ms } => {
                let Some(j) = self.jobs.get_mut(&job_id) else {
                    return not_found("job", job_id);
                };
                if j.status.is_terminal() {
                    return transition("job", &job_id, j.status, JobStatus::Stopped);
                }
                if j.status == JobStatus::Pending && j.driver_node.is_none() {
                    j.status = JobStatus::Stopped;
                    j.ended_at_ms = time_ms;
                    j.message = "stopped before it started".into();
                } else {
                    j.stop_requested = true;
                    j.message = "stopping".into();
                }
                Response::Ok
            }
            Command::DeleteJob { job_id } => {
                let Some(j) = self.jobs.get(&job_id) else {
                    return not_found("job", job_id);
                };
                if !j.status.is_terminal() {
                    return transition("job", &job_id, j.status, "DELETED");
                }
                if let Some(sid) = &j.submission_id {
                    self.submissions.remove(sid);
                }
                self.jobs.remove(&job_id);
                Response::Ok
            }
            Command::SetJobStatus {
                job_id,
                status,
                driver_node,
                exit_code,
                message,
                time_ms,
            } => {
                let Some(j) = self.jobs.get_mut(&job_id) else {
                    return not_found("job", job_id);
                };
                if !j.status.may_become(status) {
                    return transition("job", &job_id, j.status, status);
                }
                j.status = status;
                if driver_node.is_some() {
                    j.driver_node = driver_node;
                }
                if status == JobStatus::Running {
                    j.started_at_ms = time_ms;
                }
                if status.is_terminal() {
                    j.ended_at_ms = time_ms;
                }
                j.exit_code = exit_code.or(j.exit_code);
                j.message = message;
                Response::Ok
            }
            Command::CreateActor {
                actor_id,
                job_id,
                class_name,
                name,
                namespace,
                detached,
                max_restarts,
                time_ms,
                spec,
            } => {
                if self.actors.contains_key(&actor_id) {
                    return exists("actor", actor_id);
                }
                if let Some(n) = &name {
                    let key = (namespace.clone(), n.clone());
                    if self.named_actors.contains_key(&key) {
                        return exists("named actor", format!("{namespace}/{n}"));
                    }
                    self.named_actors.insert(key, actor_id.clone());
                }
                self.actors.insert(
                    actor_id.clone(),
                    ActorRecord {
                        actor_id,
                        job_id,
                        class_name,
                        name,
                        namespace,
                        detached,
                        max_restarts,
                        num_restarts: 0,
                        state: ActorState::PendingCreation,
                        node_id: None,
                        node_incarnation: 0,
                        worker_id: String::new(),
                        worker_address: String::new(),
                        pid: 0,
                        created_at_ms: time_ms,
                        message: String::new(),
                        spec,
                    },
                );
                Response::Ok
            }
            Command::AssignActor {
                actor_id,
                num_restarts,
                node_id,
                node_incarnation,
            } => {
                if let Err(r) = self.autoscaler.leaving(node_id) {
                    return Response::Rejected(r);
                }
                let Some(a) = self.actors.get_mut(&actor_id) else {
                    return not_found("actor", actor_id);
                };
                let starting = matches!(
                    a.state,
                    ActorState::PendingCreation | ActorState::Restarting
                );
                if !starting || a.num_restarts != num_restarts || a.node_id.is_some() {
                    return stale_actor(a, num_restarts, "assign");
                }
                match self.nodes.get(&node_id) {
                    Some(n) if n.state == NodeState::Alive && n.incarnation == node_incarnation => {
                    }
                    _ => {
                        return Response::Rejected(Rejection::Invalid(format!(
                            "node {node_id} incarnation {node_incarnation} is not alive"
                        )));
                    }
                }
                a.node_id = Some(node_id);
                a.node_incarnation = node_incarnation;
                a.message.clear();
                Response::Ok
            }
            Command::ActorStarted {
                actor_id,
                num_restarts,
                worker_id,
                worker_address,
                pid,
            } => {
                let Some(a) = self.actors.get_mut(&actor_id) else {
                    return not_found("actor", actor_id);
                };
                let starting = matches!(
                    a.state,
                    ActorState::PendingCreation | ActorState::Restarting
                );
                if !starting || a.num_restarts != num_restarts || a.node_id.is_none() {
                    return stale_actor(a, num_restarts, "start");
                }
                a.state = ActorState::Alive;
                a.worker_id = worker_id;
                a.worker_address = worker_address;
                a.pid = pid;
                Response::Ok
            }
            Command::ActorDied {
                actor_id,
                num_restarts,
                reason,
                no_restart,
            } => {
                let Some(a) = self.actors.get_mut(&actor_id) else {
                    return not_found("actor", actor_id);
                };
                if a.state == ActorState::Dead || a.num_restarts != num_restarts {
                    return stale_actor(a, num_restarts, "death");
                }
                if !no_restart && a.restarts_left() {
                    a.state = ActorState::Restarting;
                    a.num_restarts += 1;
                } else {
                    a.state = ActorState::Dead;
                    if let Some(n) = &a.name {
                        self.named_actors.remove(&(a.namespace.clone(), n.clone()));
                    }
                }
                a.node_id = None;
                a.node_incarnation = 0;
                a.worker_id.clear();
                a.worker_address.clear();
                a.pid = 0;
                a.message = reason;
                Response::Ok
            }
            Command::CreatePlacementGroup {
                pg_id,
                job_id,
                name,
                strategy,
                bundles,
                time_ms,
                detached,
                owner_prefix,
            } => {
                if self.placement_groups.contains_key(&pg_id) {
                    return exists("placement group", pg_id);
                }
                if bundles.is_empty() {
                    return Response::Rejected(Rejection::Invalid(
                        "a placement group needs at least one bundle".into(),
                    ));
                }
                let n = bundles.len();
                self.placement_groups.insert(
                    pg_id.clone(),
                    PlacementGroupRecord {
                        pg_id,
                        job_id,
                        name,
                        strategy,
                        bundles,
                        bundle_nodes: vec![None; n],
                        bundle_incarnations: vec![0; n],
                        state: PgState::Pending,
                        created_at_ms: time_ms,
                        detached,
                        owner_prefix,
                    },
                );
                Response::Ok
            }
            Command::SetPlacementGroupState {
                pg_id,
                state,
                bundle_nodes,
                bundle_incarnations,
            } => {
                use PgState::*;
                if state == Created
                    && let Some(r) = bundle_nodes
                        .iter()
                        .flatten()
                        .find_map(|n| self.autoscaler.leaving(*n).err())
                {
                    return Response::Rejected(r);
                }
                let Some(pg) = self.placement_groups.get_mut(&pg_id) else {
                    return not_found("placement group", pg_id);
                };
                let allowed = matches!(
                    (pg.state, state),
                    (Pending, Created | Removed)
                        | (Created, Rescheduling | Removed)
                        | (Rescheduling, Created | Removed)
                );
                if !allowed {
                    return transition("placement group", &pg_id, pg.state, state);
                }
                if state == Created
                    && (bundle_nodes.len() != pg.bundles.len()
                        || bundle_incarnations.len() != pg.bundles.len()
                        || bundle_nodes.iter().any(Option::is_none))
                {
                    return Response::Rejected(Rejection::Invalid(format!(
                        "placement group {pg_id}: CREATED needs a node for each of its {} bundles",
                        pg.bundles.len()
                    )));
                }
                pg.state = state;
                if state == Created {
                    pg.bundle_nodes = bundle_nodes;
                    pg.bundle_incarnations = bundle_incarnations;
                } else {
                    pg.bundle_nodes = vec![None; pg.bundles.len()];
                    pg.bundle_incarnations = vec![0; pg.bundles.len()];
                }
                Response::Ok
            }
        }
    }

    pub fn alive_nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().filter(|n| n.state == NodeState::Alive)
    }

    /// The live nodes by id.
    pub fn alive_map(&self) -> BTreeMap<NodeId, &NodeRecord> {
        self.alive_nodes().map(|n| (n.node_id, n)).collect()
    }
}

/// Helpers for the tests of the services built on this state.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn nid(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }

    /// Registers node `b` with `cpus` CPUs.
    pub(crate) fn register_with(b: u8, cpus: f64) -> Command {
        Command::RegisterNode {
            node_id: nid(b),
            address: format!("127.0.0.1:{}", 1000 + u16::from(b)),
            ports: NodePorts::default(),
            resources: [("CPU".to_string(), cpus)].into(),
            labels: Labels::new(),
            is_head: false,
            time_ms: 10,
        }
    }

    pub(crate) fn register(b: u8) -> Command {
        register_with(b, 2.0)
    }

    /// A state with live nodes 1..=n of `cpus` CPUs each.
    pub(crate) fn with_nodes(n: u8, cpus: f64) -> ClusterState {
        let mut s = ClusterState::default();
        for b in 1..=n {
            s.apply(register_with(b, cpus));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use super::testing::{nid, register};

    fn once(b: u8, id: &str) -> Command {
        let Command::RegisterNode {
            node_id,
            address,
            ports,
            resources,
            labels,
            is_head,
            time_ms,
        } = register(b)
        else {
            unreachable!("register makes a RegisterNode")
        };
        Command::RegisterNodeOnce {
            node_id,
            address,
            ports,
            resources,
            labels,
            is_head,
            time_ms,
            registration_id: id.into(),
        }
    }

    #[test]
    fn a_retried_registration_keeps_its_incarnation() {
        let mut s = ClusterState::default();
        let inc = |r: Response| match r {
            Response::NodeRegistered { incarnation } => incarnation,
            other => panic!("{other:?}"),
        };
        assert_eq!(inc(s.apply(once(1, "a"))), 1);
        assert_eq!(inc(s.apply(once(1, "a"))), 1, "the same daemon's retry");
        assert_eq!(inc(s.apply(once(1, "b"))), 2, "a restarted daemon");
        s.apply(dead(1, 2));
        assert_eq!(inc(s.apply(once(1, "b"))), 3, "fenced: a new incarnation");
        assert_eq!(inc(s.apply(register(1))), 4, "without an id, as before");
    }

    fn dead(b: u8, incarnation: u64) -> Command {
        Command::MarkNodeDead {
            node_id: nid(b),
            incarnation,
            reason: "missed heartbeats".into(),
            time_ms: 20,
        }
    }

    #[test]
    fn node_incarnations_are_fenced() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(register(1)),
            Response::NodeRegistered { incarnation: 1 }
        );
        assert_eq!(s.apply(dead(1, 1)), Response::Ok);
        assert_eq!(s.nodes[&nid(1)].state, NodeState::Dead);
        // Dead twice, or a stale incarnation: fenced.
        assert!(matches!(
            s.apply(dead(1, 1)),
            Response::Rejected(Rejection::Fenced { .. })
        ));
        assert_eq!(
            s.apply(register(1)),
            Response::NodeRegistered { incarnation: 2 }
        );
        assert!(matches!(
            s.apply(dead(1, 1)),
            Response::Rejected(Rejection::Fenced { current: 2, .. })
        ));
        assert_eq!(s.nodes[&nid(1)].state, NodeState::Alive);
        assert!(matches!(
            s.apply(dead(9, 1)),
            Response::Rejected(Rejection::NotFound { .. })
        ));
    }

    #[test]
    fn bad_resources_are_rejected() {
        let mut s = ClusterState::default();
        for v in [f64::NAN, -1.0, f64::INFINITY] {
            let Command::RegisterNode {
                node_id,
                address,
                ports,
                labels,
                is_head,
                time_ms,
                ..
            } = register(1)
            else {
                unreachable!()
            };
            let cmd = Command::RegisterNode {
                node_id,
                address,
                ports,
                resources: [("CPU".to_string(), v)].into(),
                labels,
                is_head,
                time_ms,
            };
            assert!(
                matches!(s.apply(cmd), Response::Rejected(Rejection::Invalid(_))),
                "{v}"
            );
        }
        assert!(s.nodes.is_empty());
    }

    #[test]
    fn kv_put_get_delete() {
        let mut s = ClusterState::default();
        let put = |v: &str, overwrite| Command::KvPut {
            namespace: "ns".into(),
            key: b"k".to_vec(),
            value: v.as_bytes().to_vec(),
            overwrite,
        };
        assert_eq!(s.apply(put("a", false)), Response::Kv(true));
        assert_eq!(s.apply(put("b", false)), Response::Kv(false));
        assert_eq!(s.kv[&("ns".to_string(), b"k".to_vec())], b"a");
        assert_eq!(s.apply(put("c", true)), Response::Kv(true));
        assert_eq!(s.kv[&("ns".to_string(), b"k".to_vec())], b"c");
        let del = Command::KvDelete {
            namespace: "ns".into(),
            key: b"k".to_vec(),
        };
        assert_eq!(s.apply(del.clone()), Response::Kv(true));
        assert_eq!(s.apply(del), Response::Kv(false));
    }

    fn submit(id: &str, sid: Option<&str>) -> Command {
        Command::SubmitJob {
            job_id: id.into(),
            submission_id: sid.map(str::to_string),
            entrypoint: "echo hi".into(),
            runtime_env_json: "{}".into(),
            metadata: Labels::new(),
            resources: Resources::new(),
            max_retries: 0,
            priority: 0,
            client_token: String::new(),
            time_ms: 1,
        }
    }

    fn job_status(id: &str, status: JobStatus) -> Command {
        Command::SetJobStatus {
            job_id: id.into(),
            status,
            driver_node: Some(nid(1)),
            exit_code: None,
            message: String::new(),
            time_ms: 2,
        }
    }

    #[test]
    fn job_transitions() {
        use JobStatus::*;
        // (from-path, to, accepted)
        let cases: &[(&[JobStatus], JobStatus, bool)] = &[
            (&[], Running, true),
            (&[], Succeeded, false),
            (&[], Stopped, true),
            (&[Running], Succeeded, true),
            (&[Running], Pending, false),
            (&[Running, Succeeded], Failed, false),
            (&[Failed], Running, false),
            (&[Stopped], Stopped, false),
        ];
        for (i, (path, to, ok)) in cases.iter().enumerate() {
            let mut s = ClusterState::default();
            s.apply(submit("j", None));
            for st in *path {
                assert_eq!(s.apply(job_status("j", *st)), Response::Ok, "case {i}");
            }
            let r = s.apply(job_status("j", *to));
            assert_eq!(r == Response::Ok, *ok, "case {i}: {r:?}");
        }
    }

    #[test]
    fn duplicate_submission_ids_are_rejected() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(submit("a", Some("sub"))), Response::Ok);
        assert!(matches!(
            s.apply(submit("b", Some("sub"))),
            Response::Rejected(Rejection::AlreadyExists { .. })
        ));
        assert!(matches!(
            s.apply(submit("a", None)),
            Response::Rejected(Rejection::AlreadyExists { .. })
        ));
        assert!(!s.jobs.contains_key("b"));
        assert_eq!(s.submissions["sub"], "a");
    }

    fn actor(id: &str, name: Option<&str>, max_restarts: i64) -> Command {
        Command::CreateActor {
            actor_id: id.into(),
            job_id: "j".into(),
            class_name: "Counter".into(),
            name: name.map(str::to_string),
            namespace: "default".into(),
            detached: false,
            max_restarts,
            time_ms: 1,
            spec: ActorSpec::default(),
        }
    }

    fn assign(id: &str, r: u64, node: u8) -> Command {
        Command::AssignActor {
            actor_id: id.into(),
            num_restarts: r,
            node_id: nid(node),
            node_incarnation: 1,
        }
    }

    fn started(id: &str, r: u64) -> Command {
        Command::ActorStarted {
            actor_id: id.into(),
            num_restarts: r,
            worker_id: "w".into(),
            worker_address: "a:1".into(),
            pid: 7,
        }
    }

    fn died(id: &str, r: u64, no_restart: bool) -> Command {
        Command::ActorDied {
            actor_id: id.into(),
            num_restarts: r,
            reason: "worker exited".into(),
            no_restart,
        }
    }

    #[test]
    fn actor_restarts_are_bounded_fenced_by_incarnation_and_names_freed_on_death() {
        use ActorState::*;
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(register(1)),
            Response::NodeRegistered { incarnation: 1 }
        );
        assert_eq!(s.apply(actor("a", Some("c"), 1)), Response::Ok);
        assert!(matches!(
            s.apply(actor("b", Some("c"), 0)),
            Response::Rejected(Rejection::AlreadyExists { .. })
        ));
        // Started only once assigned, and only on a live node incarnation.
        assert!(matches!(s.apply(started("a", 0)), Response::Rejected(_)));
        assert!(
            matches!(s.apply(assign("a", 0, 2)), Response::Rejected(_)),
            "node 2 is not registered"
        );
        assert_eq!(s.apply(assign("a", 0, 1)), Response::Ok);
        assert!(
            matches!(s.apply(assign("a", 0, 1)), Response::Rejected(_)),
            "assigned once per incarnation"
        );
        assert_eq!(s.apply(started("a", 0)), Response::Ok);
        assert_eq!(
            (s.actors["a"].state, s.actors["a"].node_id),
            (Alive, Some(nid(1)))
        );
        // A death restarts it (restart 1 of 1); a stale report of incarnation 0 is refused.
        assert_eq!(s.apply(died("a", 0, false)), Response::Ok);
        assert_eq!(
            (
                s.actors["a"].state,
                s.actors["a"].num_restarts,
                s.actors["a"].node_id
            ),
            (Restarting, 1, None)
        );
        assert!(matches!(
            s.apply(died("a", 0, false)),
            Response::Rejected(_)
        ));
        assert!(matches!(s.apply(started("a", 0)), Response::Rejected(_)));
        assert_eq!(s.apply(assign("a", 1, 1)), Response::Ok);
        assert_eq!(s.apply(started("a", 1)), Response::Ok);
        // No restart left: dead, and the name is free again.
        assert_eq!(s.apply(died("a", 1, false)), Response::Ok);
        assert_eq!(s.actors["a"].state, Dead);
        assert!(matches!(s.apply(assign("a", 1, 1)), Response::Rejected(_)));
        assert_eq!(
            s.apply(actor("b", Some("c"), 0)),
            Response::Ok,
            "name is free once the holder is dead"
        );
        // Killed with no_restart: dead at once even with restarts left.
        assert_eq!(s.apply(actor("u", None, -1)), Response::Ok);
        assert_eq!(s.apply(died("u", 0, true)), Response::Ok);
        assert_eq!(s.actors["u"].state, Dead);
    }

    #[test]
    fn placement_groups_need_every_bundle_placed() {
        let mut s = ClusterState::default();
        let create = Command::CreatePlacementGroup {
            pg_id: "pg".into(),
            job_id: "j".into(),
            name: String::new(),
            strategy: PgStrategy::StrictSpread,
            bundles: vec![Resources::new(), Resources::new()],
            time_ms: 1,
            detached: false,
            owner_prefix: Vec::new(),
        };
        assert_eq!(s.apply(create.clone()), Response::Ok);
        assert!(matches!(
            s.apply(create),
            Response::Rejected(Rejection::AlreadyExists { .. })
        ));
        let set = |state, nodes: Vec<Option<NodeId>>| Command::SetPlacementGroupState {
            pg_id: "pg".into(),
            state,
            bundle_incarnations: vec![1; nodes.len()],
            bundle_nodes: nodes,
        };
        assert!(matches!(
            s.apply(set(PgState::Created, vec![Some(nid(1)), None])),
            Response::Rejected(_)
        ));
        assert_eq!(
            s.apply(set(PgState::Created, vec![Some(nid(1)), Some(nid(2))])),
            Response::Ok
        );
        assert_eq!(s.apply(set(PgState::Removed, vec![])), Response::Ok);
        assert_eq!(s.placement_groups["pg"].bundle_nodes, vec![None, None]);
        assert!(matches!(
            s.apply(set(PgState::Created, vec![Some(nid(1)), Some(nid(2))])),
            Response::Rejected(_)
        ));
    }

    fn any_command() -> impl Strategy<Value = Command> {
        let b = 0u8..4;
        prop_oneof![
            b.clone().prop_map(register),
            (b.clone(), 0u64..4).prop_map(|(b, i)| dead(b, i)),
            (0u8..3, any::<bool>()).prop_map(|(k, o)| Command::KvPut {
                namespace: "n".into(),
                key: vec![k],
                value: vec![k],
                overwrite: o
            }),
            (0u8..3).prop_map(|k| Command::KvDelete {
                namespace: "n".into(),
                key: vec![k]
            }),
            (0u8..3).prop_map(|j| submit(&format!("j{j}"), Some(&format!("s{j}")))),
            (0u8..3, 0usize..5).prop_map(|(j, st)| job_status(
                &format!("j{j}"),
                [
                    JobStatus::Pending,
                    JobStatus::Running,
                    JobStatus::Succeeded,
                    JobStatus::Failed,
                    JobStatus::Stopped
                ][st]
            )),
            (0u8..3, 0u32..3, b.clone()).prop_map(|(j, attempt, n)| Command::AssignJob {
                job_id: format!("j{j}"),
                attempt,
                node_id: nid(n),
                incarnation: 1
            }),
            (0u8..3, 0u32..3, b.clone()).prop_map(|(j, attempt, n)| Command::JobAttemptStarted {
                job_id: format!("j{j}"),
                attempt,
                node_id: nid(n),
                time_ms: 3
            }),
            (0u8..3, 0u32..3, -1i32..2, 0usize..3).prop_map(|(j, attempt, code, o)| {
                Command::JobAttemptEnded {
                    job_id: format!("j{j}"),
                    attempt,
                    outcome: [
                        AttemptOutcome::Exited(code),
                        AttemptOutcome::Lost,
                        AttemptOutcome::Stopped,
                    ][o],
                    message: String::new(),
                    time_ms: 4,
                }
            }),
            (0u8..3).prop_map(|j| Command::RequestJobStop {
                job_id: format!("j{j}"),
                time_ms: 5
            }),
            (0u8..3).prop_map(|j| Command::DeleteJob {
                job_id: format!("j{j}")
            }),
            (0u8..3, -1i64..2).prop_map(|(a, m)| actor(&format!("a{a}"), Some("n"), m)),
            (0u8..3, 0u64..3, b.clone()).prop_map(|(a, r, n)| assign(&format!("a{a}"), r, n)),
            (0u8..3, 0u64..3).prop_map(|(a, r)| started(&format!("a{a}"), r)),
            (0u8..3, 0u64..3, any::<bool>()).prop_map(|(a, r, x)| died(&format!("a{a}"), r, x)),
        ]
    }

    #[test]
    fn job_attempts_retry_then_fail_and_stale_reports_are_refused() {
        let mut s = ClusterState::default();
        let mut sub = submit("j", Some("s"));
        if let Command::SubmitJob { max_retries, .. } = &mut sub {
            *max_retries = 1;
        }
        assert_eq!(s.apply(sub), Response::Ok);
        let assign = |attempt, n| Command::AssignJob {
            job_id: "j".into(),
            attempt,
            node_id: nid(n),
            incarnation: 1,
        };
        let started = |attempt, n| Command::JobAttemptStarted {
            job_id: "j".into(),
            attempt,
            node_id: nid(n),
            time_ms: 10,
        };
        let ended = |attempt, outcome| Command::JobAttemptEnded {
            job_id: "j".into(),
            attempt,
            outcome,
            message: "node died".into(),
            time_ms: 20,
        };
        assert!(
            matches!(s.apply(started(0, 1)), Response::Rejected(_)),
            "not assigned yet"
        );
        assert_eq!(s.apply(assign(0, 1)), Response::Ok);
        assert!(
            matches!(s.apply(assign(0, 2)), Response::Rejected(_)),
            "never assigned twice"
        );
        assert!(
            matches!(s.apply(started(0, 2)), Response::Rejected(_)),
            "only the assigned node starts it"
        );
        assert_eq!(s.apply(started(0, 1)), Response::Ok);
        assert_eq!(
            s.apply(started(0, 1)),
            Response::Ok,
            "a repeated report is harmless"
        );
        // The first attempt is lost with its node: a retry is a new, unassigned attempt.
        assert_eq!(s.apply(ended(0, AttemptOutcome::Lost)), Response::Ok);
        let j = &s.jobs["j"];
        assert_eq!(
            (j.status, j.attempt, j.driver_node),
            (JobStatus::Pending, 1, None)
        );
        assert!(
            matches!(
                s.apply(ended(0, AttemptOutcome::Exited(0))),
                Response::Rejected(_)
            ),
            "stale attempt"
        );
        assert_eq!(s.apply(assign(1, 2)), Response::Ok);
        assert_eq!(s.apply(started(1, 2)), Response::Ok);
        assert_eq!(s.apply(ended(1, AttemptOutcome::Exited(3))), Response::Ok);
        let j = &s.jobs["j"];
        assert_eq!(
            (j.status, j.exit_code, j.ended_at_ms),
            (JobStatus::Failed, Some(3), 20)
        );
        assert!(matches!(
            s.apply(Command::RequestJobStop {
                job_id: "j".into(),
                time_ms: 30
            }),
            Response::Rejected(_)
        ));
        assert_eq!(
            s.apply(Command::DeleteJob { job_id: "j".into() }),
            Response::Ok
        );
        assert!(s.jobs.is_empty() && s.submissions.is_empty());
    }

    #[test]
    fn stopping_a_job() {
        let mut s = ClusterState::default();
        s.apply(submit("a", None));
        s.apply(submit("b", None));
        assert!(
            matches!(
                s.apply(Command::DeleteJob { job_id: "a".into() }),
                Response::Rejected(_)
            ),
            "only terminal jobs"
        );
        // Not placed yet: stopped at once.
        assert_eq!(
            s.apply(Command::RequestJobStop {
                job_id: "a".into(),
                time_ms: 5
            }),
            Response::Ok
        );
        assert_eq!(s.jobs["a"].status, JobStatus::Stopped);
        // Placed: stop is requested; whatever the attempt reports, it ends STOPPED.
        s.apply(Command::AssignJob {
            job_id: "b".into(),
            attempt: 0,
            node_id: nid(1),
            incarnation: 1,
        });
        assert_eq!(
            s.apply(Command::RequestJobStop {
                job_id: "b".into(),
                time_ms: 5
            }),
            Response::Ok
        );
        assert_eq!(s.jobs["b"].status, JobStatus::Pending);
        let end = Command::JobAttemptEnded {
            job_id: "b".into(),
            attempt: 0,
            outcome: AttemptOutcome::Exited(143),
            message: "terminated".into(),
            time_ms: 6,
        };
        assert_eq!(s.apply(end), Response::Ok);
        assert_eq!(s.jobs["b"].status, JobStatus::Stopped);
    }

    /// postcard bytes of batches nested `depth` deep around one empty batch.
    fn nested_batch_bytes(depth: usize) -> Vec<u8> {
        let batch = postcard::to_allocvec(&Command::Batch(Vec::new())).unwrap();
        // A batch is its variant index then the vector's length: one inner command each.
        let mut b = Vec::new();
        for _ in 0..depth {
            b.extend_from_slice(&batch[..batch.len() - 1]);
            b.push(1);
        }
        b.extend_from_slice(&batch);
        b
    }

    #[test]
    fn deeply_nested_batches_are_refused_while_decoding() {
        // The proposer's depth (a batch of proposals that are batches) decodes and applies.
        let two = Command::Batch(vec![Command::Batch(vec![dead(1, 1)]), dead(2, 1)]);
        let back: Command = postcard::from_bytes(&postcard::to_allocvec(&two).unwrap()).unwrap();
        assert_eq!(back, two);
        assert_eq!(
            ClusterState::default().apply(back),
            Response::Batch(vec![
                Response::Batch(vec![ClusterState::default().apply(dead(1, 1))]),
                ClusterState::default().apply(dead(2, 1)),
            ])
        );
        assert!(postcard::from_bytes::<Command>(&nested_batch_bytes(1)).is_ok());
        // Deeper ones (the attacks: 1,200 and 100,000 deep) are errors, not stack overflows,
        // and the decoder is usable again afterwards.
        for depth in [2, 1_200, 100_000] {
            assert!(postcard::from_bytes::<Command>(&nested_batch_bytes(depth)).is_err());
        }
        assert!(postcard::from_bytes::<Command>(&nested_batch_bytes(1)).is_ok());
    }

    #[test]
    fn apply_of_a_deep_batch_built_in_memory_is_iterative() {
        let mut c = Command::Batch(vec![dead(1, 1)]);
        for _ in 0..100_000 {
            c = Command::Batch(vec![c]);
        }
        let mut r = ClusterState::default().apply(c);
        let mut depth = 0;
        while let Response::Batch(mut v) = r {
            depth += 1;
            r = v.pop().unwrap_or(Response::Ok);
        }
        assert_eq!(depth, 100_001);
    }

    proptest! {
        /// Same log, same state: and the snapshot encoding round-trips it.
        #[test]
        fn apply_is_deterministic(cmds in proptest::collection::vec(any_command(), 0..60)) {
            let mut a = ClusterState::default();
            let mut b = ClusterState::default();
            let ra: Vec<_> = cmds.iter().cloned().map(|c| a.apply(c)).collect();
            let rb = b.apply(Command::Batch(cmds));
            prop_assert_eq!(Response::Batch(ra), rb);
            prop_assert_eq!(&a, &b);
            let bytes = postcard::to_allocvec(&a).unwrap();
            let back: ClusterState = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(a, back);
        }

        /// Incarnations never go down and terminal jobs never change (they may be deleted).
        #[test]
        fn monotonic_invariants(cmds in proptest::collection::vec(any_command(), 0..80)) {
            let mut s = ClusterState::default();
            for c in cmds {
                let before = s.clone();
                s.apply(c);
                for (id, n) in &before.nodes {
                    prop_assert!(s.nodes[id].incarnation >= n.incarnation);
                }
                for (id, a) in &before.actors {
                    // Dead actors never change; incarnations never go down.
                    if a.state == ActorState::Dead {
                        prop_assert_eq!(&s.actors[id], a);
                    }
                    prop_assert!(s.actors[id].num_restarts >= a.num_restarts);
                    // At most one live actor per name.
                    if s.actors[id].state != ActorState::Dead && let Some(n) = &s.actors[id].name {
                        prop_assert_eq!(&s.named_actors[&(s.actors[id].namespace.clone(), n.clone())], id);
                    }
                }
                for (id, j) in &before.jobs {
                    if j.status.is_terminal() {
                        // Unchanged, or deleted.
                        prop_assert!(s.jobs.get(id).is_none_or(|now| now == j));
                    }
                }
            }
        }
    }
}
