//! Every metric the control plane records: names, units and help text in one place.

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

pub const RAFT_TERM: &str = "rayctl_raft_term";
pub const RAFT_IS_LEADER: &str = "rayctl_raft_is_leader";
pub const RAFT_COMMIT_INDEX: &str = "rayctl_raft_commit_index";
pub const RAFT_APPLIED_INDEX: &str = "rayctl_raft_applied_index";
pub const RAFT_LAST_LOG_INDEX: &str = "rayctl_raft_last_log_index";
pub const RAFT_LEADER_CHANGES: &str = "rayctl_raft_leader_changes_total";
pub const RAFT_APPEND_LATENCY: &str = "rayctl_raft_append_latency_seconds";
pub const RAFT_LOG_SYNCS: &str = "rayctl_raft_log_syncs_total";
pub const RAFT_LOG_WRITES: &str = "rayctl_raft_log_writes_total";
pub const RAFT_COMMIT_LATENCY: &str = "rayctl_raft_commit_latency_seconds";
pub const PROPOSAL_BATCH: &str = "rayctl_raft_proposal_batch_size";
pub const RAFT_SNAPSHOT_BYTES: &str = "rayctl_raft_snapshot_bytes";
pub const RAFT_STORAGE_ERRORS: &str = "rayctl_raft_storage_errors_total";
pub const NODES: &str = "rayctl_nodes";
pub const NODES_DECLARED_DEAD: &str = "rayctl_nodes_declared_dead_total";
pub const JOBS: &str = "rayctl_jobs";
pub const ACTORS: &str = "ray_actors";
pub const ACTOR_RESTARTS: &str = "rayctl_actor_restarts";
pub const PLACEMENT_GROUPS: &str = "ray_placement_groups";
pub const JOB_RUN_TIME: &str = "rayctl_job_run_seconds";
pub const JOBS_ENDED: &str = "rayctl_jobs_ended_total";
// Ray's autoscaler metric names and labels, so Ray's Grafana panels work.
pub const AS_ACTIVE: &str = "autoscaler_active_nodes";
pub const AS_PENDING: &str = "autoscaler_pending_nodes";
pub const AS_FAILED: &str = "autoscaler_recently_failed_nodes";
pub const AS_CLUSTER_RES: &str = "autoscaler_cluster_resources";
pub const AS_PENDING_RES: &str = "autoscaler_pending_resources";
pub const AS_STARTED: &str = "autoscaler_started_nodes_total";
pub const AS_STOPPED: &str = "autoscaler_stopped_nodes_total";
pub const AS_FAILED_CREATE: &str = "autoscaler_failed_create_nodes_total";

pub fn describe() {
    describe_gauge!(
        AS_ACTIVE,
        "worker nodes the autoscaler launched that are running, by NodeType (leader only)"
    );
    describe_gauge!(
        AS_PENDING,
        "worker nodes requested and not yet running, by NodeType (leader only)"
    );
    describe_gauge!(
        AS_FAILED,
        "launches that failed in the last 10 minutes, by NodeType (leader only)"
    );
    describe_gauge!(
        AS_CLUSTER_RES,
        "total resources of the live nodes, by resource (leader only)"
    );
    describe_gauge!(
        AS_PENDING_RES,
        "resources of the nodes being launched, by resource (leader only)"
    );
    describe_counter!(
        AS_STARTED,
        "launches this head requested as leader, by NodeType"
    );
    describe_counter!(
        AS_STOPPED,
        "nodes this head terminated as leader, by NodeType"
    );
    describe_counter!(
        AS_FAILED_CREATE,
        "launches that failed on this head as leader, by NodeType"
    );
    describe_gauge!(RAFT_TERM, "current Raft term of this head");
    describe_gauge!(RAFT_IS_LEADER, "1 if this head is the Raft leader, else 0");
    describe_gauge!(
        RAFT_COMMIT_INDEX,
        "highest log index known committed by this head"
    );
    describe_gauge!(
        RAFT_APPLIED_INDEX,
        "highest log index applied to this head's state machine"
    );
    describe_gauge!(RAFT_LAST_LOG_INDEX, "highest log index in this head's log");
    describe_counter!(RAFT_LEADER_CHANGES, "times this head saw the leader change");
    describe_histogram!(
        RAFT_APPEND_LATENCY,
        Unit::Seconds,
        "log append to durable (fsync done), per append"
    );
    describe_counter!(
        RAFT_LOG_SYNCS,
        "fsyncs of the Raft log (one per group of queued appends)"
    );
    describe_counter!(
        RAFT_LOG_WRITES,
        "records written to the Raft log (appends, votes, commit indexes, purges); over \
         rayctl_raft_log_syncs_total, the records each fsync covers"
    );
    describe_histogram!(
        RAFT_COMMIT_LATENCY,
        Unit::Seconds,
        "Raft write proposed → committed and applied, on the leader"
    );
    describe_histogram!(
        PROPOSAL_BATCH,
        Unit::Count,
        "client commands carried by one Raft log entry"
    );
    describe_gauge!(
        RAFT_SNAPSHOT_BYTES,
        Unit::Bytes,
        "size of the last snapshot built"
    );
    describe_counter!(
        RAFT_STORAGE_ERRORS,
        "failed Raft store operations, by op (read, write, flush); the head exits after one"
    );
    describe_gauge!(NODES, "nodes in the node table, by state (leader only)");
    describe_counter!(
        NODES_DECLARED_DEAD,
        "nodes this head, as leader, declared dead"
    );
    describe_gauge!(JOBS, "jobs in the job table, by status (leader only)");
    describe_gauge!(
        ACTORS,
        "actors in the actor table, by State, Source=gcs (leader only; Ray's name)"
    );
    describe_gauge!(
        PLACEMENT_GROUPS,
        "placement groups in the table, by State (leader only; Ray's name)"
    );
    describe_gauge!(
        ACTOR_RESTARTS,
        "restarts so far of the actors in the actor table now (a gauge: it falls when actors leave the table; leader only)"
    );
    describe_histogram!(
        JOB_RUN_TIME,
        Unit::Seconds,
        "RUNNING to terminal, per job that ran (leader only)"
    );
    describe_counter!(
        JOBS_ENDED,
        "jobs that reached a terminal status, by status (leader only)"
    );
    protocol::server::describe_rpc_metrics();
}

pub(crate) fn record_jobs(state: &crate::state::ClusterState) {
    use crate::state::JobStatus::*;
    for (status, name) in [
        (Pending, "PENDING"),
        (Running, "RUNNING"),
        (Succeeded, "SUCCEEDED"),
        (Failed, "FAILED"),
        (Stopped, "STOPPED"),
    ] {
        let n = state.jobs.values().filter(|j| j.status == status).count();
        gauge!(JOBS, "status" => name).set(n as f64);
    }
}

pub(crate) fn record_actors(state: &crate::state::ClusterState) {
    use crate::state::ActorState::*;
    for (st, name) in [
        (PendingCreation, "PENDING_CREATION"),
        (Alive, "ALIVE"),
        (Restarting, "RESTARTING"),
        (Dead, "DEAD"),
    ] {
        let n = state.actors.values().filter(|a| a.state == st).count();
        gauge!(ACTORS, "State" => name, "Source" => "gcs").set(n as f64);
    }
    gauge!(ACTOR_RESTARTS).set(state.actors.values().map(|a| a.num_restarts).sum::<u64>() as f64);
}

pub(crate) fn record_placement_groups(state: &crate::state::ClusterState) {
    use crate::state::PgState::*;
    for (st, name) in [
        (Pending, "PENDING"),
        (Created, "CREATED"),
        (Rescheduling, "RESCHEDULING"),
        (Removed, "REMOVED"),
    ] {
        let n = state
            .placement_groups
            .values()
            .filter(|p| p.state == st)
            .count();
        gauge!(PLACEMENT_GROUPS, "State" => name).set(n as f64);
    }
}

pub(crate) fn record_job_ended(status: crate::state::JobStatus, started_ms: u64, ended_ms: u64) {
    counter!(JOBS_ENDED, "status" => format!("{status:?}").to_uppercase()).increment(1);
    if started_ms > 0 && ended_ms >= started_ms {
        histogram!(JOB_RUN_TIME).record((ended_ms - started_ms) as f64 / 1000.0);
    }
}

/// The Raft log's cumulative fsync counters, as the WAL's flush worker keeps them.
pub(crate) fn record_wal(m: &raft_log::FlushMetrics) {
    counter!(RAFT_LOG_SYNCS).absolute(m.sync_batch_count);
    counter!(RAFT_LOG_WRITES).absolute(m.write_request_count);
}

/// What a failed Raft store operation was doing: the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StorageOp {
    Read,
    Write,
    Flush,
}

impl StorageOp {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
        }
    }
}

pub(crate) fn record_storage_error(op: StorageOp) {
    counter!(RAFT_STORAGE_ERRORS, "op" => op.label()).increment(1);
}

pub(crate) fn record_commit_latency(d: Duration) {
    histogram!(RAFT_COMMIT_LATENCY).record(d.as_secs_f64());
}

pub(crate) fn record_proposal_batch(commands: usize) {
    histogram!(PROPOSAL_BATCH).record(commands as f64);
}

pub(crate) fn record_append_latency(d: Duration) {
    histogram!(RAFT_APPEND_LATENCY).record(d.as_secs_f64());
}

pub(crate) fn record_applied(index: u64) {
    gauge!(RAFT_APPLIED_INDEX).set(index as f64);
}

pub(crate) fn record_snapshot(bytes: usize) {
    gauge!(RAFT_SNAPSHOT_BYTES).set(bytes as f64);
}

pub(crate) fn record_raft(
    term: u64,
    is_leader: bool,
    last_log: Option<u64>,
    committed: Option<u64>,
) {
    gauge!(RAFT_TERM).set(term as f64);
    gauge!(RAFT_IS_LEADER).set(if is_leader { 1.0 } else { 0.0 });
    gauge!(RAFT_LAST_LOG_INDEX).set(last_log.unwrap_or(0) as f64);
    if let Some(c) = committed {
        gauge!(RAFT_COMMIT_INDEX).set(c as f64);
    }
}

pub(crate) fn record_leader_change() {
    counter!(RAFT_LEADER_CHANGES).increment(1);
}

pub(crate) fn record_nodes(alive: usize, dead: usize) {
    gauge!(NODES, "state" => "ALIVE").set(alive as f64);
    gauge!(NODES, "state" => "DEAD").set(dead as f64);
}

pub(crate) fn record_node_declared_dead() {
    counter!(NODES_DECLARED_DEAD).increment(1);
}

/// The autoscaler's gauges, from the replicated state (called every round on the leader).
pub(crate) fn record_autoscaler(state: &crate::state::ClusterState, now: u64) {
    use std::collections::BTreeMap;
    let types: Vec<(String, BTreeMap<String, f64>)> = state
        .autoscaler
        .config_json
        .as_deref()
        .and_then(|j| crate::autoscaler::config::Config::from_json(j).ok())
        .map(|c| {
            c.available_node_types
                .into_iter()
                .map(|(n, t)| (n, t.resources))
                .collect()
        })
        .unwrap_or_default();
    let mut pending_res: BTreeMap<String, f64> = BTreeMap::new();
    for (name, res) in &types {
        let of = |f: &dyn Fn(&crate::instances::InstanceRecord) -> bool| {
            state
                .autoscaler
                .instances
                .values()
                .filter(|r| &r.node_type == name && f(r))
                .count() as f64
        };
        use crate::instances::InstanceState as S;
        as_set(
            AS_ACTIVE,
            "NodeType",
            name.clone(),
            of(&|r| r.state == S::RayRunning),
        );
        let pending = of(&|r| r.state.is_pending());
        as_set(AS_PENDING, "NodeType", name.clone(), pending);
        let failed = of(&|r| {
            matches!(r.state, S::AllocationFailed | S::AllocationTimeout)
                && now.saturating_sub(r.updated_ms) < 10 * 60 * 1000
        });
        as_set(AS_FAILED, "NodeType", name.clone(), failed);
        for (k, v) in res {
            *pending_res.entry(k.clone()).or_default() += v * pending;
        }
    }
    // Nodes no launch record stands for (heads' nodes, nodes started by hand): Ray counts
    // its head node type among the active nodes too.
    let launched: std::collections::HashSet<protocol::NodeId> = state
        .autoscaler
        .instances
        .values()
        .filter_map(|r| r.node_id)
        .collect();
    let (mut heads, mut others) = (0.0, 0.0);
    for n in state
        .alive_nodes()
        .filter(|n| !launched.contains(&n.node_id))
    {
        if n.is_head {
            heads += 1.0;
        } else {
            others += 1.0;
        }
    }
    as_set(AS_ACTIVE, "NodeType", "head", heads);
    as_set(AS_ACTIVE, "NodeType", "unmanaged", others);
    let mut total: BTreeMap<String, f64> = BTreeMap::new();
    for n in state.alive_nodes() {
        for (k, v) in &n.resources_total {
            *total.entry(k.clone()).or_default() += v;
        }
    }
    for k in ["CPU", "GPU", "memory"] {
        total.entry(k.into()).or_default();
        pending_res.entry(k.into()).or_default();
    }
    for (k, v) in total {
        as_set(AS_CLUSTER_RES, "resource", k, v);
    }
    for (k, v) in pending_res {
        as_set(AS_PENDING_RES, "resource", k, v);
    }
}

/// A head that does not lead (any more) reports none of the leader-only gauges: zero, so a
/// sum over every head counts the leader's alone, also after a failover.
pub(crate) fn record_not_leading() {
    let empty = crate::state::ClusterState::default();
    record_actors(&empty);
    record_placement_groups(&empty);
    record_jobs(&empty);
    record_nodes(0, 0);
    // Every autoscaler label set this head reported, at zero.
    let seen = AS_SEEN.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (metric, key, value) in seen {
        gauge!(metric, key => value).set(0.0);
    }
}

/// The autoscaler gauges' label sets reported so far, for [`record_not_leading`].
static AS_SEEN: std::sync::Mutex<std::collections::BTreeSet<(&'static str, &'static str, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Sets an autoscaler gauge and remembers its label set.
fn as_set(metric: &'static str, key: &'static str, value: impl Into<String>, v: f64) {
    let value = value.into();
    gauge!(metric, key => value.clone()).set(v);
    AS_SEEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((metric, key, value));
}

pub(crate) fn record_autoscaler_launch(node_type: &str) {
    counter!(AS_STARTED, "NodeType" => node_type.to_owned()).increment(1);
}

pub(crate) fn record_autoscaler_termination(node_type: &str) {
    counter!(AS_STOPPED, "NodeType" => node_type.to_owned()).increment(1);
}

pub(crate) fn record_autoscaler_failure(node_type: &str) {
    counter!(AS_FAILED_CREATE, "NodeType" => node_type.to_owned()).increment(1);
}
