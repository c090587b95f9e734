//! Every metric the node daemon records.

use metrics::{counter, describe_counter, describe_gauge, gauge};

pub const REGISTRATIONS: &str = "rayctl_node_registrations_total";
pub const HEARTBEATS: &str = "rayctl_node_heartbeats_total";
pub const INCARNATION: &str = "rayctl_node_incarnation";

pub fn describe() {
    describe_counter!(REGISTRATIONS, "times this node registered with the control plane");
    describe_counter!(HEARTBEATS, "heartbeats sent, by result (ok, fenced, error)");
    describe_gauge!(INCARNATION, "this node's current incarnation (0 before registering)");
    protocol::server::describe_rpc_metrics();
}

pub(crate) fn registered(incarnation: u64) {
    counter!(REGISTRATIONS).increment(1);
    gauge!(INCARNATION).set(incarnation as f64);
}

pub(crate) fn heartbeat(result: &'static str) {
    counter!(HEARTBEATS, "result" => result).increment(1);
}
