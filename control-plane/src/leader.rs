//! Leader-only singleton services. `LeaderServices` watches Raft's metrics; when this head
//! becomes leader it first confirms leadership through a read-index (so every entry committed
//! by earlier leaders is applied), then starts the services from the replicated state; when it
//! loses leadership it stops them. Services never mutate state directly: they propose commands.
//!
//! Today: node health, the job manager (`jobs::job_manager`), the actor manager
//! (`actors::actor_manager`) and the placement-group manager (`pgs::pg_manager`). A later issue adds the autoscaler here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::task::JoinHandle;

use crate::service::{HeadShared, now_ms};
use crate::state::{Command, NodeState, Response};

#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Expected heartbeat period of every node.
    pub period: Duration,
    /// Missed periods after which a node is declared dead.
    pub failure_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(1),
            failure_threshold: 5,
        }
    }
}

/// Watches leadership and runs the singleton services while this head leads.
pub(crate) async fn supervise(
    shared: Arc<HeadShared>,
    health: HealthConfig,
    jobs: crate::jobs::JobConfig,
) {
    let mut rx = shared.raft.metrics();
    let mut running: Option<Vec<JoinHandle<()>>> = None;
    let mut last_leader = None;
    loop {
        let (is_leader, leader, term, last_log) = {
            let m = rx.borrow_and_update();
            (
                m.state == ServerState::Leader,
                m.current_leader,
                m.current_term,
                m.last_log_index,
            )
        };
        if leader != last_leader {
            crate::metrics::record_leader_change();
            tracing::info!(term, leader = ?leader, "leader changed");
            last_leader = leader;
        }
        crate::metrics::record_raft(term, is_leader && shared.lease.holds(term), last_log, None);
        match (is_leader, &running) {
            (true, None) => {
                running = Some(vec![
                    tokio::spawn(node_health(shared.clone(), health)),
                    tokio::spawn(crate::jobs::job_manager(shared.clone(), jobs)),
                    tokio::spawn(crate::actors::actor_manager(shared.clone())),
                    tokio::spawn(crate::pgs::pg_manager(shared.clone())),
                ])
            }
            (false, Some(hs)) => {
                hs.iter().for_each(JoinHandle::abort);
                running = None;
            }
            _ => {}
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
    if let Some(hs) = running {
        hs.iter().for_each(JoinHandle::abort);
    }
}

/// Declares nodes dead after `failure_threshold` missed heartbeat periods, through a
/// committed `MarkNodeDead` that names the incarnation it saw (fencing).
async fn node_health(shared: Arc<HeadShared>, cfg: HealthConfig) {
    // Rebuild from the replicated state: wait until every earlier commit is applied here.
    shared.settle_leadership("node health").await;
    // Nodes get a full window from the moment this head took over: their heartbeats were
    // going to the old leader until now.
    let mut took_over = Instant::now();
    let mut was_leading = true;
    let window = cfg.period * cfg.failure_threshold.max(1);
    tracing::info!(?window, "node health service started");
    let mut tick = tokio::time::interval(cfg.period.min(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !shared.leading() {
            // Unconfirmed: no verdicts. The window restarts when a quorum confirms us again,
            // since nodes may have been heartbeating to another head meanwhile.
            was_leading = false;
            continue;
        }
        if !was_leading {
            took_over = Instant::now();
            was_leading = true;
        }
        let now = Instant::now();
        let (verdicts, alive, dead) = {
            let st = shared.state.read();
            let soft = shared.soft.lock().unwrap_or_else(|p| p.into_inner());
            let mut verdicts = Vec::new();
            for n in st.state.alive_nodes() {
                let last = match soft.heartbeats.get(&n.node_id) {
                    Some((inc, at, _)) if *inc == n.incarnation => (*at).max(took_over),
                    _ => took_over,
                };
                let silent = now.saturating_duration_since(last);
                if silent > window {
                    verdicts.push(Command::MarkNodeDead {
                        node_id: n.node_id,
                        incarnation: n.incarnation,
                        reason: format!(
                            "no heartbeat for {:.1}s (limit {:.1}s)",
                            silent.as_secs_f64(),
                            window.as_secs_f64()
                        ),
                        time_ms: now_ms(),
                    });
                }
            }
            let alive = st.state.alive_nodes().count();
            let dead = st
                .state
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Dead)
                .count();
            (verdicts, alive, dead)
        };
        crate::metrics::record_nodes(alive, dead);
        if verdicts.is_empty() {
            continue;
        }
        let n = verdicts.len();
        match shared.propose(Command::Batch(verdicts)).await {
            Ok(Response::Batch(rs)) => {
                let applied = rs.iter().filter(|r| **r == Response::Ok).count();
                for _ in 0..applied {
                    crate::metrics::record_node_declared_dead();
                }
                tracing::warn!(
                    declared = applied,
                    of = n,
                    "declared nodes dead after missed heartbeats"
                );
            }
            Ok(other) => tracing::error!(?other, "unexpected reply to a node-death batch"),
            Err(e) => tracing::warn!("could not commit node deaths: {}", e.message()),
        }
    }
}
