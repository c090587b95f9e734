//! Leader-only singleton services. `supervise` watches Raft's metrics; when this head
//! becomes leader it first confirms leadership through a read-index (so every entry committed
//! by earlier leaders is applied), then starts the services from the replicated state; when it
//! loses leadership it stops them. Services never mutate state directly: they propose commands.
//!
//! The services: node health (here), the job manager (`jobs`), the actor manager (`actors`),
//! the placement-group manager (`pgs`) and the autoscaler (`autoscaler`), each a
//! `leader_loop::LeaderService`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::head::{HeadShared, now_ms};
use crate::leader_loop::{LeaderService, run};
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
    provider_env: crate::autoscaler::provider::ProviderEnv,
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
                    tokio::spawn(run(shared.clone(), NodeHealth::new(health))),
                    tokio::spawn(run(shared.clone(), crate::jobs::JobManager::new(jobs))),
                    tokio::spawn(run(shared.clone(), crate::actors::ActorManager::default())),
                    tokio::spawn(run(shared.clone(), crate::pgs::PgManager)),
                    tokio::spawn(run(
                        shared.clone(),
                        crate::autoscaler::Autoscaler::new(provider_env.clone()),
                    )),
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
struct NodeHealth {
    window: Duration,
    period: Duration,
    /// Nodes get a full window from the moment this head took over (or was confirmed again):
    /// their heartbeats may have been going to another head until then.
    took_over: Instant,
    was_leading: bool,
}

impl NodeHealth {
    fn new(cfg: HealthConfig) -> Self {
        Self {
            window: cfg.period * cfg.failure_threshold.max(1),
            period: cfg.period.min(Duration::from_millis(500)),
            took_over: Instant::now(),
            was_leading: true,
        }
    }
}

impl LeaderService for NodeHealth {
    const NAME: &'static str = "node health";
    type Effects = ();

    fn kick(_: &HeadShared) -> Option<&Notify> {
        None
    }

    fn period(&self) -> Duration {
        self.period
    }

    fn started(&mut self, _: &Arc<HeadShared>) {
        self.took_over = Instant::now();
        tracing::info!(window = ?self.window, "node health window");
    }

    fn unconfirmed(&mut self) {
        // No verdicts; the window restarts when a quorum confirms us again.
        self.was_leading = false;
    }

    fn plan(&mut self, shared: &HeadShared) -> (Vec<Command>, ()) {
        if !self.was_leading {
            self.took_over = Instant::now();
            self.was_leading = true;
        }
        let now = Instant::now();
        let st = shared.state.read();
        let soft = shared.soft.lock().unwrap_or_else(|p| p.into_inner());
        let mut verdicts = Vec::new();
        for n in st.state.alive_nodes() {
            let last = match soft.heartbeats.get(&n.node_id) {
                Some((inc, at, _)) if *inc == n.incarnation => (*at).max(self.took_over),
                _ => self.took_over,
            };
            let silent = now.saturating_duration_since(last);
            if silent > self.window {
                verdicts.push(Command::MarkNodeDead {
                    node_id: n.node_id,
                    incarnation: n.incarnation,
                    reason: format!(
                        "no heartbeat for {:.1}s (limit {:.1}s)",
                        silent.as_secs_f64(),
                        self.window.as_secs_f64()
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
        crate::metrics::record_nodes(alive, dead);
        (verdicts, ())
    }

    fn committed(&mut self, _: &HeadShared, replies: &[Response]) {
        let applied = replies.iter().filter(|r| **r == Response::Ok).count();
        for _ in 0..applied {
            crate::metrics::record_node_declared_dead();
        }
        tracing::warn!(
            declared = applied,
            of = replies.len(),
            "declared nodes dead after missed heartbeats"
        );
    }

    fn act(&mut self, _: &Arc<HeadShared>, (): ()) {}
}
