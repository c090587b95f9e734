//! Prometheus service discovery, as Ray does it: every live head's and node's `/metrics`
//! endpoint, as `[{"labels": {"job": "ray"}, "targets": ["IP:PORT", …]}]`, served at
//! `GET /api/prometheus/sd` (Prometheus's HTTP SD; token-protected like every route) and
//! written every 5 s to `<session>/prom_metrics_service_discovery.json` (Ray's file name;
//! written aside, then renamed, so Prometheus's file SD never reads half a file).
//!
//! Every head writes its own session's file, not only the leader: a Prometheus beside any
//! head finds the whole cluster, and a failover changes nothing. The list comes through the
//! cluster API, so a follower's is the leader's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use protocol::client::HeadClient;
use protocol::pb;
use serde_json::{Value, json};

use crate::cluster_view::{host, status};

/// How often the file is written (Ray's period).
pub(crate) const PERIOD: Duration = Duration::from_secs(5);

/// The targets of a cluster status: heads that answered (their dashboard port serves
/// `/metrics`), then live nodes (their metrics export port).
pub(crate) fn targets(s: &pb::ClusterStatus) -> Value {
    let mut t: Vec<String> = s
        .heads
        .iter()
        .filter(|h| h.role != "unreachable")
        .filter_map(|h| {
            let p = h.ports.as_ref()?.dashboard_port;
            (p != 0).then(|| format!("{}:{p}", host(&h.address)))
        })
        .collect();
    t.extend(
        s.nodes
            .iter()
            .filter(|n| n.state == pb::NodeState::Alive as i32)
            .filter_map(|n| {
                let p = n.ports.as_ref()?.metrics_export_port;
                (p != 0).then(|| format!("{}:{p}", host(&n.address)))
            }),
    );
    json!([{"labels": {"job": "ray"}, "targets": t}])
}

pub(crate) fn router(client: HeadClient) -> Router {
    Router::new()
        .route("/api/prometheus/sd", get(sd))
        .with_state(client)
}

async fn sd(State(c): State<HeadClient>) -> Response {
    match status(&c).await {
        Ok(s) => axum::Json(targets(&s)).into_response(),
        Err(e) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": e})),
        )
            .into_response(),
    }
}

fn write(path: &Path, v: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)?;
    std::fs::rename(&tmp, path)
}

/// Writes the file every `PERIOD` while the head runs; a round whose status fails keeps the
/// last file (Prometheus keeps scraping what it knew).
pub(crate) async fn write_loop(c: HeadClient, path: PathBuf) {
    loop {
        match status(&c).await {
            Ok(s) => {
                if let Err(e) = write(&path, &targets(&s)) {
                    tracing::warn!(path = %path.display(), "cannot write the service discovery file: {e}");
                }
            }
            Err(e) => tracing::debug!("service discovery: no cluster status: {e}"),
        }
        tokio::time::sleep(PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_answering_heads_and_live_nodes_in_rays_format() {
        let head = |addr: &str, role: &str, dash: u32| pb::HeadInfoReply {
            address: addr.into(),
            role: role.into(),
            ports: Some(pb::HeadPorts {
                port: 1,
                dashboard_port: dash,
            }),
            ..Default::default()
        };
        let node = |addr: &str, alive: bool, m: u32| pb::NodeInfo {
            address: addr.into(),
            state: if alive {
                pb::NodeState::Alive as i32
            } else {
                pb::NodeState::Dead as i32
            },
            ports: Some(pb::NodePorts {
                metrics_export_port: m,
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = pb::ClusterStatus {
            heads: vec![
                head("10.0.0.1:6379", "leader", 8265),
                head("10.0.0.2:6379", "unreachable", 8265),
                head("10.0.0.3:6379", "follower", 0),
            ],
            nodes: vec![
                node("10.0.0.1:4000", true, 9001),
                node("10.0.0.4:4000", false, 9002),
                node("10.0.0.5:4000", true, 9003),
            ],
            ..Default::default()
        };
        assert_eq!(
            targets(&s),
            json!([{"labels": {"job": "ray"}, "targets": ["10.0.0.1:8265", "10.0.0.1:9001", "10.0.0.5:9003"]}])
        );
    }
}
