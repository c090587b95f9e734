//! What every part of a head shares: the Raft handle, the applied state, the leader's soft
//! state, the proposer that batches commands into log entries, and the leadership checks
//! every leader-only service and RPC starts from. The gRPC layer (`service`), the leader
//! services (`leader`, `jobs`, `actors`, `pgs`, `autoscaler`) and the Raft transport all
//! build on this module; it imports none of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::ServerState;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use protocol::auth::AuthToken;
use protocol::client::{self, ClientOptions};
use protocol::pb;
use protocol::{NodeId, RpcError};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::sm_store::StateReader;
use crate::state::{self, Command, Rejection, Response as SmResponse};
use crate::types::Raft;

/// Soft state the leader keeps from heartbeats; never in the log.
#[derive(Default)]
pub(crate) struct SoftState {
    /// node → (incarnation, when its last heartbeat arrived, available resources)
    pub(crate) heartbeats: HashMap<NodeId, (u64, Instant, state::Resources)>,
    /// node → the queued and infeasible shapes of its last heartbeat
    pub(crate) demand: HashMap<NodeId, Vec<pb::ResourceDemand>>,
    /// Owners that went away recently (owner prefix → when reported), passed on to every
    /// node with its heartbeat reply so all of them free those owners' objects.
    pub(crate) dead_owners: HashMap<Vec<u8>, Instant>,
    /// node → (incarnation, totals with placement-group bundle resources) from heartbeats
    pub(crate) totals: HashMap<NodeId, (u64, state::Resources)>,
    /// Placement groups the manager is reserving now (their bundles on nodes are not
    /// leftovers to release).
    pub(crate) pg_in_progress: std::collections::HashSet<String>,
    /// Why a placement group waits (from the manager's last round).
    pub(crate) pg_messages: HashMap<String, String>,
    /// Why an actor waits for a node (from the actor manager's last round).
    pub(crate) actor_messages: HashMap<String, String>,
    /// node → (incarnation, idle for how long when reported (None: busy), when, draining)
    pub(crate) idle: HashMap<NodeId, (u64, Option<u64>, Instant, bool)>,
    /// node → (incarnation, the worker binaries its last heartbeat advertised)
    pub(crate) binaries: HashMap<NodeId, (u64, Vec<String>)>,
}

pub(crate) struct HeadShared {
    pub(crate) raft: Raft,
    pub(crate) state: StateReader,
    pub(crate) soft: Mutex<SoftState>,
    pub(crate) raft_id: u64,
    pub(crate) address: String,
    pub(crate) ports: pb::HeadPorts,
    pub(crate) heartbeat_period: Duration,
    /// The leader declares a node dead after this long without a heartbeat.
    pub(crate) node_timeout: Duration,
    pub(crate) token: Option<AuthToken>,
    pub(crate) proposals: mpsc::UnboundedSender<Proposal>,
    /// Wakes the job manager (a job was submitted, stopped, or an attempt changed).
    pub(crate) job_kick: tokio::sync::Notify,
    /// One client per node manager address, so job starts and log reads reuse a connection.
    pub(crate) node_clients: Mutex<HashMap<String, client::NmClient>>,
    /// Wakes the actor manager (an actor was created, killed, or died).
    pub(crate) actor_kick: tokio::sync::Notify,
    /// Wakes GetActor waiters (an actor changed state).
    pub(crate) actor_changed: tokio::sync::Notify,
    /// Node manager clients with a long timeout, for StartActor (which waits for the constructor).
    pub(crate) actor_node_clients: Mutex<HashMap<String, client::NmClient>>,
    /// Wakes the placement-group manager, and GetPlacementGroup waiters.
    pub(crate) pg_kick: tokio::sync::Notify,
    pub(crate) pg_changed: tokio::sync::Notify,
    /// Whether a quorum confirmed this head's leadership recently enough to grant anything.
    pub(crate) lease: Arc<crate::lease::LeaderLease>,
    /// When this head last heard from a leader (for pre-votes).
    pub(crate) leader_contact: Arc<crate::prevote::LeaderContact>,
    /// How recent a leader's word must be for a pre-vote to be refused: the election
    /// timeout's maximum, openraft's own follower lease.
    pub(crate) election_max: Duration,
    /// Wakes the autoscaler (demand appeared, a record changed).
    pub(crate) autoscaler_kick: tokio::sync::Notify,
    /// What the autoscaler's last rounds found (for status and metrics).
    pub(crate) autoscaler_status: Mutex<AutoscalerSoft>,
}

/// What the autoscaler's last rounds left for `rayctl status` (soft state).
#[derive(Debug, Clone, Default)]
pub(crate) struct AutoscalerSoft {
    /// Shapes no node type can hold, with how many wait.
    pub(crate) infeasible: Vec<(BTreeMap<String, f64>, u32)>,
    /// Shapes a limit (max_workers, upscaling_speed, a launch backoff) holds back.
    pub(crate) held_back: Vec<(BTreeMap<String, f64>, u32)>,
    pub(crate) last_round_ms: u64,
    pub(crate) last_error: String,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn invalid(msg: impl Into<String>) -> Status {
    RpcError::InvalidArgument(msg.into()).into()
}

pub(crate) fn rejection(r: Rejection) -> Status {
    let msg = r.to_string();
    match r {
        Rejection::NotFound { .. } => RpcError::NotFound(msg),
        Rejection::AlreadyExists { .. } => RpcError::AlreadyExists(msg),
        Rejection::Fenced { .. } => RpcError::Fenced(msg),
        Rejection::InvalidTransition { .. } => RpcError::FailedPrecondition(msg),
        Rejection::Invalid(_) => RpcError::InvalidArgument(msg),
    }
    .into()
}

impl HeadShared {
    pub(crate) fn leader_address(&self, leader: Option<u64>) -> Option<String> {
        let id = leader?;
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    pub(crate) fn not_leader(&self, leader: Option<u64>) -> Status {
        RpcError::NotLeader {
            leader: self.leader_address(leader),
        }
        .into()
    }

    /// Fails fast with NOT_LEADER unless this head believes it leads (a cheap local check for
    /// soft-state reads).
    pub(crate) fn require_local_leader(&self) -> Result<(), Status> {
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            Ok(())
        } else {
            Err(self.not_leader(m.current_leader))
        }
    }

    /// Whether this head leads with its leadership confirmed by a quorum within the lease:
    /// the condition for anything it grants (heartbeat replies, verdicts, starts).
    pub(crate) fn leading(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && self.lease.holds(m.current_term)
    }

    /// NOT_LEADER unless this head leads, UNAVAILABLE (retryable, so a client moves on at
    /// once) while its leadership is not confirmed.
    pub(crate) fn require_confirmed_leader(&self) -> Result<(), Status> {
        self.require_local_leader()?;
        if !self.caught_up() {
            // A new leader that has not applied its first entry yet may lack what earlier
            // leaders committed (a node's registration, say): it must not answer from that.
            return Err(RpcError::Unavailable(
                "this head became leader and is still applying the log".into(),
            )
            .into());
        }
        if self.leading() {
            Ok(())
        } else {
            Err(RpcError::Unavailable(format!(
                "this head's leadership has not been confirmed by a quorum within {:?}",
                self.lease.length()
            ))
            .into())
        }
    }

    /// Commits `cmd` through Raft and returns what `apply` answered. Concurrent proposals
    /// are batched into one log entry by the proposer task (`run_proposer`).
    pub(crate) async fn propose(&self, cmd: Command) -> Result<SmResponse, Status> {
        let (tx, rx) = oneshot::channel();
        self.proposals
            .send((cmd, tx))
            .map_err(|_| Status::from(RpcError::Unavailable("the head is shutting down".into())))?;
        rx.await
            .map_err(|_| Status::from(RpcError::Unavailable("the head is shutting down".into())))?
    }

    /// One Raft write, unbatched.
    pub(crate) async fn write(&self, cmd: Command) -> Result<SmResponse, Status> {
        let started = Instant::now();
        let result = self.raft.client_write(cmd).await;
        crate::metrics::record_commit_latency(started.elapsed());
        match result {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(self.forward(f)),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(RpcError::FailedPrecondition(e.to_string()).into())
            }
            Err(RaftError::Fatal(e)) => {
                Err(RpcError::Unavailable(format!("raft stopped: {e}")).into())
            }
        }
    }

    /// NOT_LEADER with the leader's address, from openraft's forward-to-leader answer.
    fn forward(&self, f: openraft::error::ForwardToLeader<u64, openraft::BasicNode>) -> Status {
        RpcError::NotLeader {
            leader: f
                .leader_node
                .map(|n| n.addr)
                .or_else(|| self.leader_address(f.leader_id)),
        }
        .into()
    }

    /// Read-index: returns once this head is confirmed leader by a quorum and has applied
    /// everything committed before the call.
    pub(crate) async fn linearizable(&self) -> Result<(), Status> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(self.forward(f))
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(RpcError::Unavailable(format!("leader lost its quorum: {q}")).into())
            }
            Err(RaftError::Fatal(e)) => {
                Err(RpcError::Unavailable(format!("raft stopped: {e}")).into())
            }
        }
    }

    pub(crate) fn head_info(&self) -> pb::HeadInfoReply {
        let m = self.raft.metrics().borrow().clone();
        let (state_hash_index, state_hash) = self.state.state_hash().unwrap_or_default();
        pb::HeadInfoReply {
            raft_id: self.raft_id,
            address: self.address.clone(),
            role: role_name(m.state).into(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map_or(0, |l| l.index),
            ports: Some(self.ports),
            leader: self.leader_address(m.current_leader).unwrap_or_default(),
            state_hash,
            state_hash_index,
        }
    }

    /// A client of the node manager at `addr` (cached; the channel reconnects by itself).
    pub(crate) fn node_manager(&self, addr: &str) -> Result<client::NmClient, Status> {
        let mut m = self.node_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let opts = ClientOptions {
            rpc_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let c = client::node_manager(addr, self.token.clone(), &opts).map_err(Status::from)?;
        m.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Whether this head has applied an entry of its current term: its state then has
    /// everything committed before (the leader's first, blank entry comes after it all).
    pub(crate) fn caught_up(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.last_applied
            .is_some_and(|l| l.leader_id.term == m.current_term)
    }

    /// Waits until this head's state has every entry earlier leaders committed, and its
    /// leadership is confirmed: where a singleton service (`who`) starts from. No RPC of its
    /// own: an applied entry of the current term (the leader's first, blank entry) comes
    /// after every entry committed before it, and the lease says a quorum confirmed this
    /// leader (`lease::keep_confirmed` runs the read-index rounds for every service at once).
    pub(crate) async fn settle_leadership(&self, who: &str) {
        let mut rx = self.raft.metrics();
        loop {
            let (settled, term) = {
                let m = rx.borrow_and_update();
                (m.state == ServerState::Leader, m.current_term)
            };
            let settled = settled && self.caught_up();
            if settled && self.lease.holds(term) {
                return;
            }
            tracing::debug!("{who} waits for leadership to settle (term {term})");
            tokio::select! {
                r = rx.changed() => if r.is_err() {
                    // Raft stopped: nothing to wait for.
                    return;
                },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    pub(crate) fn autoscaler_soft(&self) -> std::sync::MutexGuard<'_, AutoscalerSoft> {
        self.autoscaler_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The available resources of the live nodes, from their last heartbeats (of their
    /// current incarnation). Draining nodes are left out: they take nothing new.
    pub(crate) fn available_view(
        &self,
        st: &state::ClusterState,
    ) -> HashMap<NodeId, state::Resources> {
        let soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
        soft.heartbeats
            .iter()
            .filter(|(id, (inc, _, _))| {
                st.nodes
                    .get(id)
                    .is_some_and(|n| n.incarnation == *inc && n.state == state::NodeState::Alive)
                    && !soft.idle.get(id).is_some_and(|i| i.0 == *inc && i.3)
            })
            .map(|(id, (_, _, a))| (*id, a.clone()))
            .collect()
    }

    /// A client of the node manager at `addr` whose calls may take up to `timeout` (cached).
    pub(crate) fn actor_node_manager(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<client::NmClient, Status> {
        let mut m = self
            .actor_node_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let opts = ClientOptions {
            rpc_timeout: timeout,
            ..Default::default()
        };
        let c = client::node_manager(addr, self.token.clone(), &opts).map_err(Status::from)?;
        m.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// What waits for resources, summed by kind and shape: the tasks queued on live nodes
    /// (from their heartbeats), the actors waiting for a node and the bundles of the
    /// placement groups waiting to be placed (from the managers' last rounds).
    pub(crate) fn pending_demand(&self) -> Vec<pb::ResourceDemand> {
        let st = self.state.read();
        let state = &st.state;
        let alive: BTreeSet<NodeId> = state.alive_nodes().map(|n| n.node_id).collect();
        let soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_shape: BTreeMap<(String, String), pb::ResourceDemand> = BTreeMap::new();
        let mut add = |kind: &str, shape: &state::Resources, queued: u32, infeasible: u32| {
            if shape.values().all(|v| *v <= 0.0) {
                return;
            }
            let e = by_shape
                .entry((kind.to_owned(), format!("{shape:?}")))
                .or_insert_with(|| pb::ResourceDemand {
                    shape: shape.clone().into_iter().collect(),
                    kind: kind.to_owned(),
                    ..Default::default()
                });
            e.queued += queued;
            e.infeasible += infeasible;
        };
        for (node, demands) in &soft.demand {
            if !alive.contains(node) {
                continue;
            }
            for d in demands {
                let shape = d.shape.clone().into_iter().collect();
                add("task", &shape, d.queued, d.infeasible);
            }
        }
        let infeasible = |m: Option<&String>| m.is_some_and(|m| m.starts_with("infeasible"));
        for a in state.actors.values() {
            let waiting = matches!(
                a.state,
                state::ActorState::PendingCreation | state::ActorState::Restarting
            ) && a.node_id.is_none();
            if waiting {
                let inf = infeasible(soft.actor_messages.get(&a.actor_id));
                add("actor", &a.spec.resources, u32::from(!inf), u32::from(inf));
            }
        }
        for p in state.placement_groups.values() {
            if matches!(
                p.state,
                state::PgState::Pending | state::PgState::Rescheduling
            ) {
                let inf = infeasible(soft.pg_messages.get(&p.pg_id));
                let kind = format!("placement_group:{}", p.strategy.name());
                for b in &p.bundles {
                    add(&kind, b, u32::from(!inf), u32::from(inf));
                }
            }
        }
        by_shape.into_values().collect()
    }
}

pub(crate) fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

pub(crate) fn check_resources(m: &HashMap<String, f64>) -> Result<state::Resources, Status> {
    let set = scheduler::ResourceSet::from_map(m.iter().map(|(k, v)| (k.as_str(), *v)))
        .map_err(|e| invalid(e.to_string()))?;
    Ok(set.to_map())
}

/// A proposal waiting for its batch.
pub(crate) type Proposal = (Command, oneshot::Sender<Result<SmResponse, Status>>);

/// Most batches in flight at once. One: a commit's cost is mostly per batch (RPCs, wake-ups,
/// fsyncs on three heads), so a second batch in flight only splits the same clients into
/// smaller batches. Measured on 3 heads with 16 clients, with the log on sled: 3,400
/// writes/s with 1, 2,300 with 4; with the WAL: 5,400 with 1, 4,900 with 2, 4,300 with 4.
const BATCHES_IN_FLIGHT: usize = 1;
const MAX_BATCH: usize = 1024;

/// Turns queued proposals into batched Raft writes (`Command::Batch`), pipelined.
/// Most bytes of commands in one batched log entry.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

pub(crate) async fn run_proposer(
    shared: Arc<HeadShared>,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.0.approx_bytes();
        let mut batch = vec![first];
        // One log entry stays well under the gRPC message limit, whatever the KV values.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) if bytes + p.0.approx_bytes() > MAX_BATCH_BYTES => {
                    carried = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.0.approx_bytes();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            crate::metrics::record_proposal_batch(batch.len());
            if batch.len() == 1 {
                let (cmd, reply) = batch.pop().expect("one proposal");
                let _ = reply.send(shared.write(cmd).await);
                return;
            }
            let (cmds, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            match shared.write(Command::Batch(cmds)).await {
                Ok(SmResponse::Batch(rs)) if rs.len() == replies.len() => {
                    for (r, reply) in rs.into_iter().zip(replies) {
                        let _ = reply.send(Ok(r));
                    }
                }
                Ok(other) => {
                    let e = Status::from(RpcError::Internal(format!(
                        "unexpected batch result {other:?}"
                    )));
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
