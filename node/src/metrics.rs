//! Every metric the node daemon records.

use metrics::{counter, describe_counter, describe_gauge, gauge};

pub const REGISTRATIONS: &str = "rayctl_node_registrations_total";
pub const HEARTBEATS: &str = "rayctl_node_heartbeats_total";
pub const INCARNATION: &str = "rayctl_node_incarnation";

pub fn describe() {
    describe_counter!(
        REGISTRATIONS,
        "times this node registered with the control plane"
    );
    describe_counter!(HEARTBEATS, "heartbeats sent, by result (ok, fenced, error)");
    describe_gauge!(
        INCARNATION,
        "this node's current incarnation (0 before registering)"
    );
    protocol::server::describe_rpc_metrics();
}

pub(crate) fn registered(incarnation: u64) {
    counter!(REGISTRATIONS).increment(1);
    gauge!(INCARNATION).set(incarnation as f64);
}

pub(crate) fn heartbeat(result: &'static str) {
    counter!(HEARTBEATS, "result" => result).increment(1);
}

pub const WORKERS: &str = "rayctl_workers";
pub const WORKER_STARTS: &str = "rayctl_worker_starts_total";
pub const LEASE_SPILLBACKS: &str = "rayctl_lease_spillbacks_total";
pub const LEASE_GRANT_LATENCY: &str = "rayctl_lease_grant_seconds";
pub const LEASES: &str = "rayctl_lease_requests_total";
/// Ray's name: tasks by state, summed over the owners and workers on this node.
pub const TASKS: &str = "ray_tasks";
pub const TASK_RETRIES: &str = "rayctl_task_retries_total";
pub const TASKS_EXECUTED: &str = "rayctl_tasks_executed_total";
pub const RECONSTRUCTIONS: &str = "rayctl_object_reconstructions_total";

pub fn describe_workers() {
    describe_gauge!(
        WORKERS,
        "worker processes on this node, by state (starting, idle, leased)"
    );
    describe_counter!(WORKER_STARTS, "worker processes started");
    describe_counter!(
        LEASE_SPILLBACKS,
        "lease requests answered with another node"
    );
    metrics::describe_histogram!(
        LEASE_GRANT_LATENCY,
        metrics::Unit::Seconds,
        "scheduling latency: lease request to grant, including queueing and worker start"
    );
    describe_counter!(
        LEASES,
        "lease requests by outcome (granted, spillback, infeasible, timed_out, error)"
    );
    describe_gauge!(
        TASKS,
        "tasks by State (Ray's names), Name (function), IsRetry and Source: owner (the states the tasks' owners on this node recorded) or executor (running in this node's workers)"
    );
    describe_counter!(
        TASK_RETRIES,
        "task retries after worker failures, by owners on this node"
    );
    describe_counter!(TASKS_EXECUTED, "tasks executed by workers on this node");
    describe_counter!(
        RECONSTRUCTIONS,
        "objects rebuilt from lineage by owners on this node after their copies were lost"
    );
}

pub(crate) fn worker_started() {
    counter!(WORKER_STARTS).increment(1);
}

pub(crate) fn lease(outcome: &'static str, seconds: Option<f64>) {
    counter!(LEASES, "outcome" => outcome).increment(1);
    if outcome == "spillback" {
        counter!(LEASE_SPILLBACKS).increment(1);
    }
    if let Some(s) = seconds {
        metrics::histogram!(LEASE_GRANT_LATENCY).record(s);
    }
}

pub(crate) fn workers(
    by_state: &std::collections::HashMap<&'static str, u64>,
    s: &protocol::pb::WorkerStats,
) {
    for (k, v) in by_state {
        gauge!(WORKERS, "state" => *k).set(*v as f64);
    }
    // Tasks running in this node's workers (the owners' states, by function, come from the
    // task table: `host_metrics::HostMetrics::tasks`). Workers do not say which function.
    gauge!(TASKS, "State" => "RUNNING", "Name" => "", "IsRetry" => "0", "Source" => "executor")
        .set(s.tasks_running as f64);
    counter!(TASK_RETRIES).absolute(s.task_retries_total);
    counter!(TASKS_EXECUTED).absolute(s.tasks_executed_total);
    counter!(RECONSTRUCTIONS).absolute(s.reconstructions_total);
}
