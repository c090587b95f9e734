//! The heads' gRPC services: `Raft` (transport between heads) and `ControlPlane` (the
//! cluster API). Wire types are converted here and nowhere else; every request is validated
//! before anything is proposed.
//!
//! API Boundary: writes and linearizable reads are served by the leader only; a follower
//! answers `RpcError::NotLeader` with the leader's address. `HeadInfo` is answered by any head
//! about itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use protocol::auth::AuthToken;
use protocol::client::{self, ClientOptions};
use protocol::ids::validate_address;
use protocol::pb::{self, control_plane_server::ControlPlane};
use protocol::{NodeId, RaftId, RpcError};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::sm_store::StateReader;
use crate::state::{self, Command, NodeRecord, Rejection, Response as SmResponse};
use crate::types::Raft;

/// Limits of the small KV.
const MAX_KV_NAMESPACE: usize = 256;
const MAX_KV_KEY: usize = 4096;
const MAX_KV_VALUE: usize = 1024 * 1024;

/// How long the leader passes a dead owner on (every node heartbeats many times meanwhile).
const DEAD_OWNER_MEMORY: Duration = Duration::from_secs(60);

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
    pub(crate) lease: crate::lease::LeaderLease,
    /// When this head last heard from a leader (for pre-votes).
    pub(crate) leader_contact: crate::prevote::LeaderContact,
    /// How recent a leader's word must be for a pre-vote to be refused: the election
    /// timeout's maximum, openraft's own follower lease.
    pub(crate) election_max: Duration,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn invalid(msg: impl Into<String>) -> Status {
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
    fn leader_address(&self, leader: Option<u64>) -> Option<String> {
        let id = leader?;
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    fn not_leader(&self, leader: Option<u64>) -> Status {
        RpcError::NotLeader {
            leader: self.leader_address(leader),
        }
        .into()
    }

    /// Fails fast with NOT_LEADER unless this head believes it leads (a cheap local check for
    /// soft-state reads).
    fn require_local_leader(&self) -> Result<(), Status> {
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
    fn require_confirmed_leader(&self) -> Result<(), Status> {
        self.require_local_leader()?;
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
    async fn write(&self, cmd: Command) -> Result<SmResponse, Status> {
        let started = Instant::now();
        let result = self.raft.client_write(cmd).await;
        crate::metrics::record_commit_latency(started.elapsed());
        match result {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(RpcError::NotLeader {
                    leader: f
                        .leader_node
                        .map(|n| n.addr)
                        .or_else(|| self.leader_address(f.leader_id)),
                }
                .into())
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(RpcError::FailedPrecondition(e.to_string()).into())
            }
            Err(RaftError::Fatal(e)) => {
                Err(RpcError::Unavailable(format!("raft stopped: {e}")).into())
            }
        }
    }

    /// Read-index: returns once this head is confirmed leader by a quorum and has applied
    /// everything committed before the call.
    pub(crate) async fn linearizable(&self) -> Result<(), Status> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(RpcError::NotLeader {
                    leader: f
                        .leader_node
                        .map(|n| n.addr)
                        .or_else(|| self.leader_address(f.leader_id)),
                }
                .into())
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(RpcError::Unavailable(format!("leader lost its quorum: {q}")).into())
            }
            Err(RaftError::Fatal(e)) => {
                Err(RpcError::Unavailable(format!("raft stopped: {e}")).into())
            }
        }
    }

    fn head_info(&self) -> pb::HeadInfoReply {
        let m = self.raft.metrics().borrow().clone();
        pb::HeadInfoReply {
            raft_id: self.raft_id,
            address: self.address.clone(),
            role: role_name(m.state).into(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map_or(0, |l| l.index),
            ports: Some(self.ports),
            leader: self.leader_address(m.current_leader).unwrap_or_default(),
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

    /// Waits until this head's state has every entry earlier leaders committed (a read-index
    /// succeeds): where a singleton service (`who`) starts from.
    pub(crate) async fn settle_leadership(&self, who: &str) {
        while let Err(e) = self.linearizable().await {
            tracing::debug!("{who} waits for leadership to settle: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The available resources of the live nodes, from their last heartbeats (of their
    /// current incarnation).
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
    fn pending_demand(&self) -> Vec<pb::ResourceDemand> {
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

    fn node_info(&self, n: &NodeRecord) -> pb::NodeInfo {
        let soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
        let total = match soft.totals.get(&n.node_id) {
            Some((inc, t)) if *inc == n.incarnation && n.state == state::NodeState::Alive => {
                t.clone()
            }
            _ => n.resources_total.clone(),
        };
        let available = match soft.heartbeats.get(&n.node_id) {
            Some((inc, _, avail))
                if *inc == n.incarnation && n.state == state::NodeState::Alive =>
            {
                avail.clone()
            }
            _ if n.state == state::NodeState::Alive => n.resources_total.clone(),
            _ => BTreeMap::new(),
        };
        pb::NodeInfo {
            node_id: n.node_id.to_string(),
            address: n.address.clone(),
            state: match n.state {
                state::NodeState::Alive => pb::NodeState::Alive,
                state::NodeState::Dead => pb::NodeState::Dead,
            } as i32,
            incarnation: n.incarnation,
            ports: Some(pb::NodePorts {
                node_manager_port: n.ports.node_manager.into(),
                object_manager_port: n.ports.object_manager.into(),
                metrics_export_port: n.ports.metrics_export.into(),
            }),
            resources_total: total.into_iter().collect(),
            resources_available: available.into_iter().collect(),
            labels: n.labels.clone().into_iter().collect(),
            is_head: n.is_head,
            registered_at_ms: n.registered_at_ms,
            dead_at_ms: n.dead_at_ms,
            death_reason: n.death_reason.clone(),
        }
    }

    fn peers(&self) -> pb::RaftPeers {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<u64> = mem.voter_ids().collect();
        let peers = mem
            .nodes()
            .map(|(id, node)| pb::RaftPeer {
                raft_id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
                leader: m.current_leader == Some(*id),
                matched_index: m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned())
                    .map(|l| l.map_or(0, |l| l.index)),
            })
            .collect();
        pb::RaftPeers {
            peers,
            term: m.current_term,
            leader: self.leader_address(m.current_leader).unwrap_or_default(),
        }
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

fn parse_node_id(s: &str) -> Result<NodeId, Status> {
    s.parse::<NodeId>().map_err(|e| invalid(e.to_string()))
}

pub(crate) fn check_resources(m: &HashMap<String, f64>) -> Result<state::Resources, Status> {
    let set = scheduler::ResourceSet::from_map(m.iter().map(|(k, v)| (k.as_str(), *v)))
        .map_err(|e| invalid(e.to_string()))?;
    Ok(set.to_map())
}

fn check_kv(namespace: &str, key: &[u8]) -> Result<(), Status> {
    if namespace.len() > MAX_KV_NAMESPACE {
        return Err(invalid(format!(
            "kv namespace of {} bytes is over the {MAX_KV_NAMESPACE}-byte limit",
            namespace.len()
        )));
    }
    if key.is_empty() || key.len() > MAX_KV_KEY {
        return Err(invalid(format!(
            "kv key must be 1..={MAX_KV_KEY} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

/// A proposal waiting for its batch.
pub(crate) type Proposal = (Command, oneshot::Sender<Result<SmResponse, Status>>);

/// Most batches in flight at once. One: openraft 0.9 flushes appends one after another, so a
/// second batch in flight only waits in its queue while it could be growing in ours; measured
/// on 3 heads with 16 clients, 1 in flight gives 3,400 writes/s against 2,300 with 4.
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

/// The `ControlPlane` gRPC service.
#[derive(Clone)]
pub(crate) struct ControlPlaneService(pub(crate) Arc<HeadShared>);

#[tonic::async_trait]
impl ControlPlane for ControlPlaneService {
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeReply>, Status> {
        let r = req.into_inner();
        let node_id = parse_node_id(&r.node_id)?;
        validate_address(&r.address).map_err(|e| invalid(e.to_string()))?;
        let resources = check_resources(&r.resources_total)?;
        let p = r.ports.unwrap_or_default();
        let port = |v: u32, name: &str| {
            u16::try_from(v).map_err(|_| invalid(format!("{name} {v} is not a port")))
        };
        let ports = state::NodePorts {
            node_manager: port(p.node_manager_port, "node_manager_port")?,
            object_manager: port(p.object_manager_port, "object_manager_port")?,
            metrics_export: port(p.metrics_export_port, "metrics_export_port")?,
        };
        let cmd = Command::RegisterNode {
            node_id,
            address: r.address,
            ports,
            resources: resources.clone(),
            labels: r.labels.into_iter().collect(),
            is_head: r.is_head,
            time_ms: now_ms(),
        };
        match self.0.propose(cmd).await? {
            SmResponse::NodeRegistered { incarnation } => {
                let mut soft = self.0.soft.lock().unwrap_or_else(|p| p.into_inner());
                soft.heartbeats
                    .insert(node_id, (incarnation, Instant::now(), resources));
                Ok(Response::new(pb::RegisterNodeReply {
                    incarnation,
                    heartbeat_period_ms: self.0.heartbeat_period.as_millis() as u64,
                    node_timeout_ms: self.0.node_timeout.as_millis() as u64,
                }))
            }
            SmResponse::Rejected(r) => Err(rejection(r)),
            other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        self.0.require_confirmed_leader()?;
        let mut r = req.into_inner();
        let node_id = parse_node_id(&r.node_id)?;
        let available = check_resources(&r.resources_available)?;
        let total = check_resources(&r.resources_total)?;
        let actors_report = pb::HeartbeatRequest {
            running_actors: std::mem::take(&mut r.running_actors),
            dead_actors: std::mem::take(&mut r.dead_actors),
            ..Default::default()
        };
        {
            let st = self.0.state.read();
            let Some(n) = st.state.nodes.get(&node_id) else {
                return Err(RpcError::NotFound(format!("node {node_id} is not registered")).into());
            };
            if n.incarnation != r.incarnation || n.state != state::NodeState::Alive {
                return Err(rejection(Rejection::Fenced {
                    node_id: node_id.to_string(),
                    given: r.incarnation,
                    current: n.incarnation,
                    state: format!("{:?}", n.state).to_uppercase(),
                }));
            }
        }
        {
            let mut soft = self.0.soft.lock().unwrap_or_else(|p| p.into_inner());
            soft.heartbeats
                .insert(node_id, (r.incarnation, Instant::now(), available));
            if !total.is_empty() {
                soft.totals.insert(node_id, (r.incarnation, total));
            }
            soft.demand.insert(node_id, r.pending_demand);
            let now = Instant::now();
            for p in r
                .dead_owners
                .into_iter()
                .filter(|p| !p.is_empty() && p.len() <= 32)
                .take(10_000)
            {
                soft.dead_owners.insert(p, now);
            }
            soft.dead_owners
                .retain(|_, at| now.duration_since(*at) < DEAD_OWNER_MEMORY);
        }
        let dead_owners: Vec<Vec<u8>> = self
            .0
            .soft
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dead_owners
            .keys()
            .cloned()
            .collect();
        let kill_actors = crate::actors::heartbeat_actors(&self.0, node_id, &actors_report).await?;
        let cancel_placement_groups =
            crate::pgs::heartbeat_bundles(&self.0, node_id, &r.placement_groups);
        let cluster_view = {
            let st = self.0.state.read();
            st.state
                .alive_nodes()
                .map(|n| {
                    let info = self.0.node_info(n);
                    pb::NodeResources {
                        object_manager_port: info.ports.map_or(0, |p| p.object_manager_port),
                        node_id: info.node_id,
                        address: info.address,
                        total: info.resources_total,
                        available: info.resources_available,
                    }
                })
                .collect()
        };
        Ok(Response::new(pb::HeartbeatReply {
            cluster_view,
            dead_owners,
            kill_actors,
            cancel_placement_groups,
        }))
    }

    async fn unregister_node(
        &self,
        req: Request<pb::UnregisterNodeRequest>,
    ) -> Result<Response<pb::UnregisterNodeReply>, Status> {
        let r = req.into_inner();
        let node_id = parse_node_id(&r.node_id)?;
        let reason = if r.reason.is_empty() {
            "unregistered".to_string()
        } else {
            r.reason.chars().take(1024).collect()
        };
        let cmd = Command::MarkNodeDead {
            node_id,
            incarnation: r.incarnation,
            reason,
            time_ms: now_ms(),
        };
        match self.0.propose(cmd).await? {
            SmResponse::Ok => Ok(Response::new(pb::UnregisterNodeReply {})),
            SmResponse::Rejected(r) => Err(rejection(r)),
            other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn get_cluster_status(
        &self,
        _: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.0.linearizable().await?;
        let nodes: Vec<pb::NodeInfo> = {
            let st = self.0.state.read();
            st.state
                .nodes
                .values()
                .map(|n| self.0.node_info(n))
                .collect()
        };
        let m = self.0.raft.metrics().borrow().clone();
        let members: Vec<(u64, String)> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        // Ask every other head about itself, in parallel, with a short deadline.
        let opts = ClientOptions {
            rpc_timeout: Duration::from_millis(800),
            ..Default::default()
        };
        let mut asks = Vec::new();
        for (id, addr) in members {
            if id == self.0.raft_id {
                continue;
            }
            let token = self.0.token.clone();
            let opts = opts.clone();
            asks.push(tokio::spawn(async move {
                let reply = async {
                    let ch = client::channel(&addr, &opts).ok()?;
                    let mut c = pb::control_plane_client::ControlPlaneClient::with_interceptor(
                        ch,
                        protocol::auth::ClientAuth(token),
                    );
                    c.head_info(pb::HeadInfoRequest {})
                        .await
                        .ok()
                        .map(|r| r.into_inner())
                };
                reply.await.unwrap_or(pb::HeadInfoReply {
                    raft_id: id,
                    address: addr,
                    role: "unreachable".into(),
                    ..Default::default()
                })
            }));
        }
        let mut heads = vec![self.0.head_info()];
        for a in asks {
            if let Ok(h) = a.await {
                heads.push(h);
            }
        }
        heads.sort_by(|a, b| a.address.cmp(&b.address));
        let pending_demand = self.0.pending_demand();
        Ok(Response::new(pb::ClusterStatus {
            pending_demand,
            leader: self.0.address.clone(),
            term: m.current_term,
            commit_index: m.last_applied.map_or(0, |l| l.index),
            heads,
            nodes,
        }))
    }

    async fn get_node(
        &self,
        req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let node_id = parse_node_id(&req.into_inner().node_id)?;
        self.0.linearizable().await?;
        let st = self.0.state.read();
        match st.state.nodes.get(&node_id) {
            Some(n) => Ok(Response::new(self.0.node_info(n))),
            None => Err(RpcError::NotFound(format!("node {node_id} not found")).into()),
        }
    }

    async fn head_info(
        &self,
        _: Request<pb::HeadInfoRequest>,
    ) -> Result<Response<pb::HeadInfoReply>, Status> {
        Ok(Response::new(self.0.head_info()))
    }

    async fn kv_put(
        &self,
        req: Request<pb::KvPutRequest>,
    ) -> Result<Response<pb::KvPutReply>, Status> {
        let r = req.into_inner();
        check_kv(&r.namespace, &r.key)?;
        if r.value.len() > MAX_KV_VALUE {
            return Err(RpcError::ResourceExhausted(format!(
                "kv value of {} bytes is over the {MAX_KV_VALUE}-byte limit",
                r.value.len()
            ))
            .into());
        }
        let cmd = Command::KvPut {
            namespace: r.namespace,
            key: r.key,
            value: r.value,
            overwrite: r.overwrite,
        };
        match self.0.propose(cmd).await? {
            SmResponse::Kv(written) => Ok(Response::new(pb::KvPutReply { written })),
            other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn kv_get(
        &self,
        req: Request<pb::KvGetRequest>,
    ) -> Result<Response<pb::KvGetReply>, Status> {
        let r = req.into_inner();
        check_kv(&r.namespace, &r.key)?;
        self.0.linearizable().await?;
        let st = self.0.state.read();
        match st.state.kv.get(&(r.namespace, r.key)) {
            Some(v) => Ok(Response::new(pb::KvGetReply { value: v.clone() })),
            None => Err(RpcError::NotFound("kv key not found".into()).into()),
        }
    }

    async fn kv_delete(
        &self,
        req: Request<pb::KvDeleteRequest>,
    ) -> Result<Response<pb::KvDeleteReply>, Status> {
        let r = req.into_inner();
        check_kv(&r.namespace, &r.key)?;
        match self
            .0
            .propose(Command::KvDelete {
                namespace: r.namespace,
                key: r.key,
            })
            .await?
        {
            SmResponse::Kv(deleted) => Ok(Response::new(pb::KvDeleteReply { deleted })),
            other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn create_actor(
        &self,
        req: Request<pb::CreateActorRequest>,
    ) -> Result<Response<pb::ActorInfo>, Status> {
        crate::actors::create(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_actor(
        &self,
        req: Request<pb::GetActorRequest>,
    ) -> Result<Response<pb::ActorInfo>, Status> {
        crate::actors::get(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_actors(
        &self,
        _: Request<pb::ListActorsRequest>,
    ) -> Result<Response<pb::ListActorsReply>, Status> {
        Ok(Response::new(pb::ListActorsReply {
            actors: crate::actors::list(&self.0).await?,
        }))
    }

    async fn kill_actor(
        &self,
        req: Request<pb::KillActorRequest>,
    ) -> Result<Response<pb::ActorInfo>, Status> {
        crate::actors::kill(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_placement_group(
        &self,
        req: Request<pb::CreatePlacementGroupRequest>,
    ) -> Result<Response<pb::PlacementGroupInfo>, Status> {
        crate::pgs::create(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_placement_group(
        &self,
        req: Request<pb::GetPlacementGroupRequest>,
    ) -> Result<Response<pb::PlacementGroupInfo>, Status> {
        crate::pgs::get(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_placement_group(
        &self,
        req: Request<pb::RemovePlacementGroupRequest>,
    ) -> Result<Response<pb::PlacementGroupInfo>, Status> {
        crate::pgs::remove(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_placement_groups(
        &self,
        _: Request<pb::ListPlacementGroupsRequest>,
    ) -> Result<Response<pb::ListPlacementGroupsReply>, Status> {
        Ok(Response::new(pb::ListPlacementGroupsReply {
            placement_groups: crate::pgs::list(&self.0).await?,
        }))
    }

    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        crate::jobs::submit(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let j = crate::jobs::get(&self.0, &req.into_inner().job_id).await?;
        Ok(Response::new(crate::jobs::job_info(&self.0, &j)))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsReply>, Status> {
        Ok(Response::new(pb::ListJobsReply {
            jobs: crate::jobs::list(&self.0).await?,
        }))
    }

    async fn stop_job(
        &self,
        req: Request<pb::StopJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        crate::jobs::stop(&self.0, &req.into_inner().job_id)
            .await
            .map(Response::new)
    }

    async fn delete_job(
        &self,
        req: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobReply>, Status> {
        let deleted = crate::jobs::delete(&self.0, &req.into_inner().job_id).await?;
        Ok(Response::new(pb::DeleteJobReply { deleted }))
    }

    async fn get_job_logs(
        &self,
        req: Request<pb::GetJobLogsRequest>,
    ) -> Result<Response<pb::JobLogs>, Status> {
        crate::jobs::logs(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn report_job_attempt(
        &self,
        req: Request<pb::ReportJobAttemptRequest>,
    ) -> Result<Response<pb::ReportJobAttemptReply>, Status> {
        crate::jobs::report(&self.0, req.into_inner()).await?;
        Ok(Response::new(pb::ReportJobAttemptReply {}))
    }

    async fn raft_list_peers(
        &self,
        _: Request<pb::RaftListPeersRequest>,
    ) -> Result<Response<pb::RaftPeers>, Status> {
        self.0.linearizable().await?;
        Ok(Response::new(self.0.peers()))
    }

    async fn raft_add_peer(
        &self,
        req: Request<pb::RaftAddPeerRequest>,
    ) -> Result<Response<pb::RaftPeers>, Status> {
        let r = req.into_inner();
        validate_address(&r.address).map_err(|e| invalid(e.to_string()))?;
        self.0.require_local_leader()?;
        let id = RaftId::from_address(&r.address).0;
        let node = BasicNode {
            addr: r.address.clone(),
        };
        // Blocks until the new head has caught up with the log, so promoting it to voter
        // cannot stall commits.
        self.0
            .raft
            .add_learner(id, node, true)
            .await
            .map_err(|e| match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    self.0.not_leader(f.leader_id)
                }
                other => {
                    RpcError::FailedPrecondition(format!("adding {} failed: {other}", r.address))
                        .into()
                }
            })?;
        if !r.learner_only {
            self.0
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(|e| {
                    Status::from(RpcError::FailedPrecondition(format!(
                        "promoting {} failed: {e}",
                        r.address
                    )))
                })?;
        }
        Ok(Response::new(self.0.peers()))
    }

    async fn raft_remove_peer(
        &self,
        req: Request<pb::RaftRemovePeerRequest>,
    ) -> Result<Response<pb::RaftPeers>, Status> {
        let r = req.into_inner();
        validate_address(&r.address).map_err(|e| invalid(e.to_string()))?;
        self.0.require_local_leader()?;
        let id = RaftId::from_address(&r.address).0;
        let (is_voter, known) = {
            let m = self.0.raft.metrics().borrow().membership_config.clone();
            (
                m.membership().voter_ids().any(|v| v == id),
                m.membership().get_node(&id).is_some(),
            )
        };
        if !known {
            return Err(RpcError::NotFound(format!(
                "{} is not a member of the raft group",
                r.address
            ))
            .into());
        }
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.0
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| {
                Status::from(RpcError::FailedPrecondition(format!(
                    "removing {} failed: {e}",
                    r.address
                )))
            })?;
        Ok(Response::new(self.0.peers()))
    }
}
