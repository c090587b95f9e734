//! Keeps the node registered: register, then heartbeat every period the control plane asked
//! for; when the control plane says this incarnation is fenced (declared dead) or unknown,
//! register anew and carry on with the new incarnation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::client::{ClientError, HeadClient};
use protocol::{RpcError, pb};

use crate::NodeShared;

pub(crate) async fn run(
    client: HeadClient,
    node: Arc<NodeShared>,
    resources: BTreeMap<String, f64>,
    labels: BTreeMap<String, String>,
    is_head: bool,
) {
    let register = pb::RegisterNodeRequest {
        node_id: node.node_id.to_string(),
        address: node.address.clone(),
        ports: Some(node.ports),
        resources_total: resources.clone().into_iter().collect(),
        labels: labels.into_iter().collect(),
        is_head,
        // A retry of this daemon's registration is recognised as one.
        registration_id: format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
    };
    loop {
        if node.drained.borrow().is_some() {
            // Drained: the node is leaving; it never registers again.
            return;
        }
        let asked = std::time::Instant::now();
        let reply = match client
            .call(|mut c| {
                let r = register.clone();
                async move { c.register_node(r).await }
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("registration failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        node.incarnation.store(reply.incarnation, Ordering::Release);
        crate::metrics::registered(reply.incarnation);
        tracing::info!(
            incarnation = reply.incarnation,
            "registered with the control plane"
        );
        let period = Duration::from_millis(reply.heartbeat_period_ms.clamp(10, 60_000));
        // Actor workers here may serve until 80 % of the node timeout after the last
        // heartbeat (or registration) the leader answered was sent: the leader cannot have
        // declared this node dead before then.
        let grace =
            Duration::from_millis(reply.node_timeout_ms.max(reply.heartbeat_period_ms)) * 4 / 5;
        *node.serve_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked + grace);
        // Heartbeats must land well inside the node timeout even while the leader changes:
        // an attempt stuck on a head that no longer leads (or is cut off) gives up after a
        // fifth of the timeout and the next head is tried.
        let node_timeout =
            Duration::from_millis(reply.node_timeout_ms.max(reply.heartbeat_period_ms));
        let attempt = (node_timeout / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let hb_client = client.with_options(protocol::client::ClientOptions {
            deadline: node_timeout / 2,
            rpc_timeout: attempt,
            connect_timeout: attempt,
            max_backoff: (period / 4).max(Duration::from_millis(10)),
        });
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sent = std::time::Instant::now();
            let hb = pb::HeartbeatRequest {
                node_id: node.node_id.to_string(),
                incarnation: reply.incarnation,
                // A CPU taken back from a blocked task can leave the pool in debt: report it as none free.
                resources_available: node
                    .leases
                    .available()
                    .to_map()
                    .into_iter()
                    .filter(|(_, v)| *v > 0.0)
                    .collect(),
                pending_demand: node.leases.demand(),
                dead_owners: node.workers.take_dead_owners(),
                running_actors: node.workers.running_actors(),
                dead_actors: node.workers.take_dead_actors(),
                resources_total: node.leases.total().to_map().into_iter().collect(),
                placement_groups: node.leases.placement_groups(),
                idle_ms: node.idle_ms(),
                draining: node.leases.draining(),
                binaries: node.workers.advertised_binaries(),
            };
            match hb_client
                .call(|mut c| {
                    let hb = hb.clone();
                    async move { c.heartbeat(hb).await }
                })
                .await
            {
                Ok(r) => {
                    crate::metrics::heartbeat("ok");
                    *node.serve_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(sent + grace);
                    node.set_cluster_view(r.cluster_view);
                    let w = node.workers.clone();
                    if !r.kill_actors.is_empty() {
                        w.kill_actors(&r.kill_actors);
                    }
                    for pg in &r.cancel_placement_groups {
                        if node.leases.cancel_bundles(pg) {
                            tracing::info!(
                                pg,
                                "released the bundles of a placement group the control plane says are not placed here"
                            );
                        }
                    }
                    if !r.dead_owners.is_empty() {
                        tokio::task::spawn_blocking(move || {
                            r.dead_owners.iter().for_each(|p| w.free_owner(p))
                        });
                    }
                }
                Err(ClientError::Rpc(RpcError::Fenced(msg)))
                | Err(ClientError::Rpc(RpcError::NotFound(msg))) => {
                    node.workers.return_dead_owners(hb.dead_owners);
                    node.workers.return_dead_actors(hb.dead_actors);
                    crate::metrics::heartbeat("fenced");
                    tracing::warn!("control plane fenced this node ({msg}); registering anew");
                    // Bundles were placed on the fenced incarnation: they are rescheduled.
                    for pg in node.leases.placement_groups() {
                        node.leases.cancel_bundles(&pg);
                    }
                    // Every actor here was assigned to the fenced incarnation and has been (or
                    // will be) restarted elsewhere: a zombie copy must not keep serving.
                    let all: Vec<String> = node
                        .workers
                        .running_actors()
                        .into_iter()
                        .map(|a| a.actor_id)
                        .collect();
                    node.workers.kill_actors(&all);
                    break;
                }
                Err(e) => {
                    node.workers.return_dead_owners(hb.dead_owners);
                    node.workers.return_dead_actors(hb.dead_actors);
                    crate::metrics::heartbeat("error");
                    tracing::warn!("heartbeat failed: {e}");
                }
            }
        }
    }
}
