//! The cluster as the dashboard port's handlers (State API, logs, Prometheus discovery) see
//! it: the status through the cluster API (so a follower's is the leader's), and the host
//! part of the addresses in it.

use std::collections::BTreeMap;

use protocol::client::HeadClient;
use protocol::pb;
use serde_json::{Value, json};

/// The cluster's status from whichever head leads.
pub(crate) async fn status(c: &HeadClient) -> Result<pb::ClusterStatus, String> {
    c.call(|mut c| async move { c.get_cluster_status(pb::GetClusterStatusRequest {}).await })
        .await
        .map_err(|e| format!("cannot get the cluster status: {e}"))
}

/// The host of a `host:port` address.
pub(crate) fn host(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

fn state_name(s: i32) -> &'static str {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::Alive) => "ALIVE",
        Ok(pb::NodeState::Dead) => "DEAD",
        _ => "UNKNOWN",
    }
}

fn sorted(m: &std::collections::HashMap<String, f64>) -> BTreeMap<String, f64> {
    m.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// The status as JSON: what `rayctl status --format json` prints and the dashboard reads.
pub fn status_json(s: &pb::ClusterStatus) -> Value {
    json!({
        "leader": s.leader,
        "term": s.term,
        "commit_index": s.commit_index,
        "heads": s.heads.iter().map(|h| {
            let p = h.ports.unwrap_or_default();
            json!({
                "address": h.address,
                "role": h.role,
                "raft_id": h.raft_id.to_string(),
                "term": h.term,
                "last_log_index": h.last_log_index,
                "last_applied": h.last_applied,
                "ports": {"port": p.port, "dashboard_port": p.dashboard_port},
            })
        }).collect::<Vec<_>>(),
        "nodes": s.nodes.iter().map(|n| {
            let p = n.ports.unwrap_or_default();
            json!({
                "node_id": n.node_id,
                "address": n.address,
                "state": state_name(n.state),
                "incarnation": n.incarnation,
                "is_head": n.is_head,
                "resources_total": sorted(&n.resources_total),
                "resources_available": sorted(&n.resources_available),
                "labels": n.labels.iter().collect::<BTreeMap<_, _>>(),
                "ports": {
                    "node_manager_port": p.node_manager_port,
                    "object_manager_port": p.object_manager_port,
                    "metrics_export_port": p.metrics_export_port,
                },
                "registered_at_ms": n.registered_at_ms,
                "dead_at_ms": n.dead_at_ms,
                "death_reason": n.death_reason,
                "idle_ms": n.idle_ms,
                "draining": n.draining,
                "node_type": n.labels.get(NODE_TYPE_LABEL),
            })
        }).collect::<Vec<_>>(),
        "autoscaler": s.autoscaler.as_ref().map(autoscaler_json),
        "pending_demand": s.pending_demand.iter().map(|d| json!({
            "shape": sorted(&d.shape),
            "kind": d.kind,
            "queued": d.queued,
            "infeasible": d.infeasible,
        })).collect::<Vec<_>>(),
    })
}

/// The label the autoscaler's providers give the nodes they launch.
pub const NODE_TYPE_LABEL: &str = "rayctl.io/node-type";

fn shape_json(m: &std::collections::HashMap<String, f64>) -> Value {
    json!(sorted(m))
}

fn autoscaler_json(a: &pb::AutoscalerStatus) -> Value {
    json!({
        "enabled": a.enabled,
        "instances": a.instances.iter().map(|i| json!({
            "instance_id": i.instance_id,
            "request_id": i.request_id,
            "node_type": i.node_type,
            "state": i.state,
            "cloud_instance_id": i.cloud_instance_id,
            "node_id": i.node_id,
            "message": i.message,
            "created_ms": i.created_ms,
            "updated_ms": i.updated_ms,
        })).collect::<Vec<_>>(),
        "constraints": a.constraints.iter().map(|b| shape_json(&b.resources)).collect::<Vec<_>>(),
        "infeasible": a.infeasible.iter().map(|d| json!({"shape": sorted(&d.shape), "count": d.queued})).collect::<Vec<_>>(),
        "held_back": a.held_back.iter().map(|d| json!({"shape": sorted(&d.shape), "count": d.queued})).collect::<Vec<_>>(),
        "last_round_ms": a.last_round_ms,
        "last_error": a.last_error,
    })
}
