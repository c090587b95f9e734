//! Actors: the handlers of the actor RPCs and the actor manager, a leader-only service.
//!
//! The lifecycle lives in the replicated state (`CreateActor`, `AssignActor`,
//! `ActorStarted`, `ActorDied`). The manager turns it into work: it assigns each actor
//! waiting for a node (committed before the node is asked, so a new leader asks the same
//! node again), calls `NodeManager.StartActor`, records the worker it got, and declares
//! actors on dead nodes, of dead owners and of ended jobs dead or restarting. Nodes report
//! actor workers that exited with their heartbeats, and learn from the reply which actors
//! they run that must not run (a killed actor, or a zombie copy after their node was
//! declared dead): see `heartbeat_actors`.
//!
//! Invariant: an incarnation (`num_restarts`) of an actor runs on at most one node: it is
//! assigned once by a committed `AssignActor` naming the node's incarnation, the node starts
//! each (actor, incarnation) once and refuses other node incarnations, and a node running an
//! incarnation that is not the record's current one is told to kill it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use protocol::{NodeId, RpcError, pb};
use tonic::Status;

use crate::head::{HeadShared, now_ms};
use crate::leader_loop::{InFlight, LeaderService};
use crate::state::{
    ActorRecord, ActorSpec, ActorState, ClusterState, Command, Rejection, Response,
};
use tokio::sync::Notify;

const MAX_NAME: usize = 256;
const MAX_SPEC_BYTES: usize = 4 * 1024 * 1024;
const MAX_CONCURRENCY: u32 = 1000;
/// How long one GetActor may wait.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// StartActor waits for resources, a worker and the constructor.
const START_TIMEOUT: Duration = Duration::from_secs(600);

fn invalid(msg: impl Into<String>) -> Status {
    RpcError::InvalidArgument(msg.into()).into()
}

pub(crate) fn state_pb(s: ActorState) -> pb::ActorState {
    match s {
        ActorState::PendingCreation => pb::ActorState::PendingCreation,
        ActorState::Alive => pb::ActorState::Alive,
        ActorState::Restarting => pb::ActorState::Restarting,
        ActorState::Dead => pb::ActorState::Dead,
    }
}

pub(crate) fn actor_info(shared: &HeadShared, st: &ClusterState, a: &ActorRecord) -> pb::ActorInfo {
    let node_address = a
        .node_id
        .and_then(|n| st.nodes.get(&n))
        .map(|n| n.address.clone())
        .unwrap_or_default();
    pb::ActorInfo {
        actor_id: a.actor_id.clone(),
        class_name: a.class_name.clone(),
        name: a.name.clone().unwrap_or_default(),
        namespace: a.namespace.clone(),
        job_id: a.job_id.clone(),
        state: state_pb(a.state) as i32,
        num_restarts: a.num_restarts,
        max_restarts: a.max_restarts,
        max_task_retries: a.spec.max_task_retries,
        max_concurrency: a.spec.max_concurrency,
        detached: a.detached,
        node_id: a.node_id.map(|n| n.to_string()).unwrap_or_default(),
        node_address,
        worker_id: a.worker_id.clone(),
        worker_address: a.worker_address.clone(),
        // Why it waits for a node (the manager's last round), else why it restarted or died.
        message: if a.state == ActorState::PendingCreation || a.state == ActorState::Restarting {
            shared
                .soft
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .actor_messages
                .get(&a.actor_id)
                .cloned()
                .unwrap_or_else(|| a.message.clone())
        } else {
            a.message.clone()
        },
        created_at_ms: a.created_at_ms,
        resources: a.spec.resources.clone().into_iter().collect(),
        pid: a.pid,
    }
}

fn check_id(id: &str) -> Result<(), Status> {
    id.parse::<protocol::ActorId>()
        .map(drop)
        .map_err(|e| invalid(e.to_string()))
}

fn namespace_or_default(ns: &str) -> String {
    if ns.is_empty() {
        "default".into()
    } else {
        ns.to_owned()
    }
}

pub(crate) async fn create(
    shared: &HeadShared,
    r: pb::CreateActorRequest,
) -> Result<pb::ActorInfo, Status> {
    check_id(&r.actor_id)?;
    let spec = r.spec.ok_or_else(|| invalid("the actor spec is missing"))?;
    if spec.class_name.is_empty() || spec.class_name.len() > 1024 {
        return Err(invalid("class_name must be 1 to 1024 characters"));
    }
    let ctor = spec
        .constructor
        .as_ref()
        .ok_or_else(|| invalid("the constructor call is missing"))?;
    if ctor
        .args
        .iter()
        .any(|a| !matches!(a.kind, Some(pb::value::Kind::Inline(_))))
    {
        return Err(invalid(
            "constructor arguments must be inline values (at most 100 KiB each)",
        ));
    }
    if spec.binary_sha256.len() != 64 {
        return Err(invalid(
            "binary_sha256 must be the 64-hex sha256 of the worker binary",
        ));
    }
    if r.name.len() > MAX_NAME || r.namespace.len() > MAX_NAME {
        return Err(invalid(format!(
            "actor names and namespaces are at most {MAX_NAME} characters"
        )));
    }
    let max_concurrency = if spec.max_concurrency == 0 {
        1
    } else {
        spec.max_concurrency
    };
    if max_concurrency > MAX_CONCURRENCY {
        return Err(invalid(format!(
            "max_concurrency {max_concurrency} is over the limit of {MAX_CONCURRENCY}"
        )));
    }
    if spec.max_restarts < -1 || spec.max_task_retries < -1 {
        return Err(invalid(
            "max_restarts and max_task_retries are -1 (unlimited) or at least 0",
        ));
    }
    let resources = crate::head::check_resources(&spec.resources)?;
    if !spec.node_id.is_empty() {
        spec.node_id
            .parse::<NodeId>()
            .map_err(|e| invalid(format!("node_id: {e}")))?;
    }
    let encoded = spec.encode_to_vec();
    if encoded.len() > MAX_SPEC_BYTES {
        return Err(invalid(format!(
            "the actor spec is {} bytes, over the {MAX_SPEC_BYTES}-byte limit",
            encoded.len()
        )));
    }
    let namespace = namespace_or_default(&r.namespace);
    let name = (!r.name.is_empty()).then(|| r.name.clone());
    shared.linearizable().await?;
    if r.get_if_exists
        && let Some(n) = &name
        && let Some(info) = by_name(shared, &namespace, n)
    {
        return Ok(info);
    }
    let cmd = Command::CreateActor {
        actor_id: r.actor_id.clone(),
        job_id: r.job_id.clone(),
        class_name: spec.class_name.clone(),
        name: name.clone(),
        namespace: namespace.clone(),
        detached: spec.detached,
        max_restarts: spec.max_restarts,
        time_ms: now_ms(),
        spec: ActorSpec {
            encoded,
            resources,
            owner_prefix: if spec.detached {
                Vec::new()
            } else {
                spec.owner_prefix.clone()
            },
            max_task_retries: spec.max_task_retries,
            max_concurrency,
        },
    };
    match shared.propose(cmd).await? {
        Response::Ok => {}
        // A retried create of the same actor.
        Response::Rejected(Rejection::AlreadyExists { kind, .. }) if kind == "actor" => {}
        Response::Rejected(Rejection::AlreadyExists { .. }) if r.get_if_exists => {
            if let Some(info) = name.as_deref().and_then(|n| by_name(shared, &namespace, n)) {
                return Ok(info);
            }
            return Err(RpcError::Unavailable(
                "the named actor died while being looked up; retry".into(),
            )
            .into());
        }
        Response::Rejected(e) => return Err(crate::head::rejection(e)),
        other => {
            return Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into());
        }
    }
    shared.actor_kick.notify_one();
    // New demand: the autoscaler looks at once, not at its next period.
    shared.autoscaler_kick.notify_one();
    let st = shared.state.read();
    let a = st
        .state
        .actors
        .get(&r.actor_id)
        .ok_or_else(|| Status::internal("the created actor is missing"))?;
    Ok(actor_info(shared, &st.state, a))
}

fn by_name(shared: &HeadShared, namespace: &str, name: &str) -> Option<pb::ActorInfo> {
    let st = shared.state.read();
    let id = st
        .state
        .named_actors
        .get(&(namespace.to_owned(), name.to_owned()))?;
    st.state
        .actors
        .get(id)
        .map(|a| actor_info(shared, &st.state, a))
}

pub(crate) async fn get(
    shared: &HeadShared,
    r: pb::GetActorRequest,
) -> Result<pb::ActorInfo, Status> {
    shared.linearizable().await?;
    let id = if !r.actor_id.is_empty() {
        r.actor_id.clone()
    } else if !r.name.is_empty() {
        let ns = namespace_or_default(&r.namespace);
        let st = shared.state.read();
        st.state
            .named_actors
            .get(&(ns.clone(), r.name.clone()))
            .cloned()
            .ok_or_else(|| {
                Status::from(RpcError::NotFound(format!(
                    "no live actor named {:?} in namespace {ns:?}",
                    r.name
                )))
            })?
    } else {
        return Err(invalid("give an actor id or a name"));
    };
    let deadline = Instant::now() + Duration::from_millis(r.wait_ms).min(MAX_WAIT);
    loop {
        let changed = shared.actor_changed.notified();
        {
            let st = shared.state.read();
            let a = st
                .state
                .actors
                .get(&id)
                .ok_or_else(|| Status::from(RpcError::NotFound(format!("no actor {id}"))))?;
            let settled = (a.state == ActorState::Alive && a.num_restarts >= r.min_restarts)
                || a.state == ActorState::Dead;
            if settled || Instant::now() >= deadline {
                return Ok(actor_info(shared, &st.state, a));
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())),
            changed,
        )
        .await;
    }
}

pub(crate) async fn list(shared: &HeadShared) -> Result<Vec<pb::ActorInfo>, Status> {
    shared.linearizable().await?;
    let st = shared.state.read();
    let mut v: Vec<pb::ActorInfo> = st
        .state
        .actors
        .values()
        .map(|a| actor_info(shared, &st.state, a))
        .collect();
    v.sort_by_key(|a| (a.created_at_ms, a.actor_id.clone()));
    Ok(v)
}

pub(crate) async fn kill(
    shared: &HeadShared,
    r: pb::KillActorRequest,
) -> Result<pb::ActorInfo, Status> {
    check_id(&r.actor_id)?;
    if r.reason.len() > 200 {
        return Err(invalid(format!(
            "a kill reason is at most 200 bytes, not {}",
            r.reason.len()
        )));
    }
    for _ in 0..5 {
        shared.linearizable().await?;
        let (restarts, dead, node) = {
            let st = shared.state.read();
            let a = st.state.actors.get(&r.actor_id).ok_or_else(|| {
                Status::from(RpcError::NotFound(format!("no actor {}", r.actor_id)))
            })?;
            let node = a
                .node_id
                .and_then(|n| st.state.nodes.get(&n))
                .map(|n| n.address.clone());
            (a.num_restarts, a.state == ActorState::Dead, node)
        };
        if !dead {
            let reason = match (r.no_restart, r.reason.as_str()) {
                (true, "") => "killed (no restart)".to_owned(),
                (true, why) => format!("killed: {why}"),
                (false, _) => "killed; restarting if restarts are left".to_owned(),
            };
            let cmd = Command::ActorDied {
                actor_id: r.actor_id.clone(),
                num_restarts: restarts,
                reason,
                no_restart: r.no_restart,
            };
            match shared.propose(cmd).await? {
                Response::Ok => {}
                // It died or restarted meanwhile: look again.
                Response::Rejected(_) => continue,
                other => {
                    return Err(
                        RpcError::Internal(format!("unexpected apply result {other:?}")).into(),
                    );
                }
            }
            shared.actor_kick.notify_one();
            shared.actor_changed.notify_waiters();
            // Stop the worker now (the node's next heartbeat would tell it too).
            if let Some(addr) = node {
                kill_worker(shared, &addr, &r.actor_id, restarts).await;
            }
        }
        let st = shared.state.read();
        return Ok(actor_info(shared, &st.state, &st.state.actors[&r.actor_id]));
    }
    Err(RpcError::Unavailable(format!(
        "actor {} kept changing; retry the kill",
        r.actor_id
    ))
    .into())
}

async fn kill_worker(shared: &HeadShared, addr: &str, actor: &str, restarts: u64) {
    let Ok(mut nm) = shared.node_manager(addr) else {
        return;
    };
    let req = pb::KillActorWorkerRequest {
        actor_id: actor.to_owned(),
        num_restarts: restarts,
    };
    if let Err(e) = nm.kill_actor_worker(req).await {
        tracing::warn!(
            actor,
            "could not reach node {addr} to kill the actor's worker (its heartbeat will): {}",
            e.message()
        );
    }
}

/// The heartbeat's actor part (leader): commits the deaths a node reports, and answers which
/// of the actors it runs must not run.
pub(crate) async fn heartbeat_actors(
    shared: &HeadShared,
    node: NodeId,
    r: &pb::HeartbeatRequest,
) -> Result<Vec<String>, Status> {
    if !r.dead_actors.is_empty() {
        let cmds: Vec<Command> = r
            .dead_actors
            .iter()
            .take(10_000)
            .map(|d| Command::ActorDied {
                actor_id: d.actor_id.clone(),
                num_restarts: d.num_restarts,
                reason: format!(
                    "its worker exited on node {node}: {}",
                    d.reason.chars().take(2048).collect::<String>()
                ),
                no_restart: false,
            })
            .collect();
        // Stale reports (another incarnation, already dead) are refused by apply: fine.
        shared.propose(Command::Batch(cmds)).await?;
        shared.actor_kick.notify_one();
    }
    let st = shared.state.read();
    Ok(r.running_actors
        .iter()
        .filter(|a| match st.state.actors.get(&a.actor_id) {
            Some(rec) => {
                rec.state == ActorState::Dead
                    || rec.node_id != Some(node)
                    || rec.num_restarts != a.num_restarts
            }
            None => true,
        })
        .map(|a| a.actor_id.clone())
        .collect())
}

/// The actor manager's decisions for one round: pure, tested without a cluster.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Plan {
    pub(crate) commands: Vec<Command>,
    /// (actor, incarnation) assigned and not yet started: ask their node.
    pub(crate) starts: Vec<(String, u64)>,
    /// Why actors wait for a node.
    pub(crate) waiting: HashMap<String, String>,
}

pub(crate) fn plan(
    state: &ClusterState,
    available: &HashMap<NodeId, crate::state::Resources>,
    dead_owners: &HashSet<Vec<u8>>,
) -> Plan {
    let mut p = Plan::default();
    let set = |r: &crate::state::Resources| {
        scheduler::ResourceSet::from_map(r.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap_or_default()
    };
    let alive = state.alive_map();
    // Free resources per node: the last heartbeat, less actors assigned but not yet started
    // (their leases may not show yet), less what this round assigns.
    let mut free: HashMap<NodeId, scheduler::ResourceSet> = alive
        .keys()
        .map(|id| {
            (
                *id,
                set(available.get(id).unwrap_or(&alive[id].resources_total)),
            )
        })
        .collect();
    let mut count: HashMap<NodeId, usize> = HashMap::new();
    for a in state
        .actors
        .values()
        .filter(|a| a.state != ActorState::Dead)
    {
        if let Some(n) = a.node_id {
            *count.entry(n).or_default() += 1;
            if a.state != ActorState::Alive
                && let Some(f) = free.get_mut(&n)
            {
                f.subtract_allowing_debt(&set(&a.spec.resources));
            }
        }
    }
    for a in state
        .actors
        .values()
        .filter(|a| a.state != ActorState::Dead)
    {
        let died = |reason: String, no_restart: bool| Command::ActorDied {
            actor_id: a.actor_id.clone(),
            num_restarts: a.num_restarts,
            reason,
            no_restart,
        };
        if !a.detached
            && !a.spec.owner_prefix.is_empty()
            && dead_owners.contains(&a.spec.owner_prefix)
        {
            p.commands.push(died(
                "its owner (the process that created it) exited; the actor is not detached".into(),
                true,
            ));
            continue;
        }
        if !a.detached
            && let Some(j) = state.jobs.get(&a.job_id)
            && j.status.is_terminal()
        {
            p.commands.push(died(
                format!(
                    "its job {} ended ({:?}); the actor is not detached",
                    a.job_id, j.status
                ),
                true,
            ));
            continue;
        }
        if let Some(n) = a.node_id {
            match alive.get(&n) {
                Some(rec) if rec.incarnation == a.node_incarnation => {
                    if a.state != ActorState::Alive {
                        p.starts.push((a.actor_id.clone(), a.num_restarts));
                    }
                }
                _ => p.commands.push(died(format!("its node {n} died"), false)),
            }
            continue;
        }
        // Waiting for a node: the one with the fewest actors that has room (and is the
        // requested one, if any).
        let need = set(&a.spec.resources);
        let affinity = pb::ActorSpec::decode(a.spec.encoded.as_slice())
            .ok()
            .and_then(|s| s.node_id.parse::<NodeId>().ok());
        let best = alive
            .keys()
            .filter(|id| affinity.is_none_or(|x| x == **id))
            .filter(|id| free.get(*id).is_some_and(|f| f.contains(&need)))
            .min_by_key(|id| (count.get(*id).copied().unwrap_or(0), **id));
        if let Some(id) = best {
            p.commands.push(Command::AssignActor {
                actor_id: a.actor_id.clone(),
                num_restarts: a.num_restarts,
                node_id: *id,
                node_incarnation: alive[id].incarnation,
            });
            *count.entry(*id).or_default() += 1;
            if let Some(f) = free.get_mut(id) {
                f.subtract_allowing_debt(&need);
            }
            p.starts.push((a.actor_id.clone(), a.num_restarts));
        } else {
            let fits_a_total = alive
                .iter()
                .filter(|(id, _)| affinity.is_none_or(|x| x == **id))
                .any(|(_, n)| set(&n.resources_total).contains(&need));
            let why = if fits_a_total {
                format!("waiting for a node with {:?} free", need.to_map())
            } else {
                format!("infeasible: no live node has {:?} in total", need.to_map())
            };
            p.waiting.insert(a.actor_id.clone(), why);
        }
    }
    p
}

type SentSet = InFlight<(String, u64)>;

/// The actor manager: runs on the leader only (started and stopped by `leader::supervise`).
#[derive(Default)]
pub(crate) struct ActorManager {
    sent: SentSet,
}

impl LeaderService for ActorManager {
    const NAME: &'static str = "actor manager";
    type Effects = Vec<(String, u64)>;

    fn kick(shared: &HeadShared) -> Option<&Notify> {
        Some(&shared.actor_kick)
    }

    fn plan(&mut self, shared: &HeadShared) -> (Vec<Command>, Self::Effects) {
        let plan = {
            let st = shared.state.read();
            crate::metrics::record_actors(&st.state);
            let available = shared.available_view(&st.state);
            let soft = shared.soft.lock().unwrap_or_else(|p| p.into_inner());
            let dead_owners: HashSet<Vec<u8>> = soft.dead_owners.keys().cloned().collect();
            plan(&st.state, &available, &dead_owners)
        };
        shared
            .soft
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .actor_messages = plan.waiting;
        (plan.commands, plan.starts)
    }

    fn committed(&mut self, shared: &HeadShared, _: &[Response]) {
        shared.actor_changed.notify_waiters();
    }

    fn act(&mut self, shared: &Arc<HeadShared>, starts: Self::Effects) {
        for (actor, restarts) in starts {
            start_once(shared, &self.sent, actor, restarts);
        }
    }
}

fn start_once(shared: &Arc<HeadShared>, sent: &SentSet, actor: String, restarts: u64) {
    let key = (actor.clone(), restarts);
    if !sent.start(key.clone()) {
        return;
    }
    let (shared, sent) = (shared.clone(), sent.clone());
    tokio::spawn(async move {
        match start(&shared, &actor, restarts).await {
            Ok(cmd) => {
                if let Err(e) = shared.propose(cmd).await {
                    tracing::warn!(actor, "could not record the actor's start: {}", e.message());
                    sent.forget(&key);
                }
                shared.actor_changed.notify_waiters();
                shared.actor_kick.notify_one();
            }
            Err(e) => {
                tracing::warn!(
                    actor,
                    restarts,
                    "starting the actor failed: {}",
                    e.message()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
                sent.forget(&key);
                shared.actor_kick.notify_one();
            }
        }
    });
}

/// Asks the assigned node to start the actor; the command to commit with the outcome.
async fn start(shared: &HeadShared, actor: &str, restarts: u64) -> Result<Command, Status> {
    let (addr, req) = {
        let st = shared.state.read();
        let a = st
            .state
            .actors
            .get(actor)
            .ok_or_else(|| Status::not_found("actor gone"))?;
        let node = a
            .node_id
            .ok_or_else(|| Status::failed_precondition("not assigned"))?;
        if a.num_restarts != restarts || a.state == ActorState::Alive || a.state == ActorState::Dead
        {
            return Err(Status::failed_precondition("the actor moved on"));
        }
        let n = st
            .state
            .nodes
            .get(&node)
            .ok_or_else(|| Status::not_found("node gone"))?;
        let spec = pb::ActorSpec::decode(a.spec.encoded.as_slice())
            .map_err(|e| Status::internal(format!("bad stored spec: {e}")))?;
        let req = pb::StartActorRequest {
            actor_id: actor.to_owned(),
            num_restarts: restarts,
            node_incarnation: a.node_incarnation,
            job_id: a.job_id.clone(),
            spec: Some(spec),
        };
        (n.address.clone(), req)
    };
    let mut nm = shared.actor_node_manager(&addr, START_TIMEOUT)?;
    let reply = nm.start_actor(req).await?.into_inner();
    Ok(match reply.creation_error {
        Some(e) => Command::ActorDied {
            actor_id: actor.to_owned(),
            num_restarts: restarts,
            reason: format!(
                "the constructor failed: {}: {}",
                protocol::task_error_kind_name(e.kind()),
                e.message
            ),
            no_restart: true,
        },
        None => Command::ActorStarted {
            actor_id: actor.to_owned(),
            num_restarts: restarts,
            worker_id: reply.worker_id,
            worker_address: reply.worker_address,
            pid: reply.pid,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Resources;

    fn state_with_nodes(n: u8) -> ClusterState {
        crate::state::testing::with_nodes(n, 1.0)
    }

    fn create(s: &mut ClusterState, id: &str, cpus: f64, owner: &[u8]) {
        let spec = ActorSpec {
            resources: if cpus > 0.0 {
                [("CPU".to_string(), cpus)].into_iter().collect()
            } else {
                Resources::new()
            },
            owner_prefix: owner.to_vec(),
            max_concurrency: 1,
            ..Default::default()
        };
        let c = Command::CreateActor {
            actor_id: id.into(),
            job_id: String::new(),
            class_name: "C".into(),
            name: None,
            namespace: "default".into(),
            detached: false,
            max_restarts: 1,
            time_ms: 1,
            spec,
        };
        assert_eq!(s.apply(c), Response::Ok);
    }

    #[test]
    fn actors_spread_over_nodes_within_their_resources_and_wait_when_full() {
        let mut s = state_with_nodes(2);
        for i in 0..3 {
            create(&mut s, &format!("a{i}"), 1.0, b"o");
        }
        let p = plan(&s, &HashMap::new(), &HashSet::new());
        let nodes: Vec<NodeId> = p
            .commands
            .iter()
            .map(|c| match c {
                Command::AssignActor { node_id, .. } => *node_id,
                _ => panic!("{c:?}"),
            })
            .collect();
        // Two nodes of one CPU: two actors placed, one per node; the third waits.
        assert_eq!(nodes.len(), 2);
        assert_ne!(nodes[0], nodes[1]);
        assert_eq!(p.starts.len(), 2);
        assert!(
            p.waiting
                .values()
                .all(|m| m.starts_with("waiting for a node")),
            "{:?}",
            p.waiting
        );
        for c in p.commands {
            assert_eq!(s.apply(c), Response::Ok);
        }
        create(&mut s, "big", 5.0, b"o");
        let p = plan(&s, &HashMap::new(), &HashSet::new());
        assert!(
            p.waiting["big"].starts_with("infeasible"),
            "{:?}",
            p.waiting
        );
        // Next round: the assigned ones are started again (idempotent), none is re-placed.
        let p = plan(&s, &HashMap::new(), &HashSet::new());
        assert!(p.commands.is_empty(), "{:?}", p.commands);
        assert_eq!(p.starts.len(), 2);
    }

    #[test]
    fn actors_of_dead_nodes_restart_and_of_dead_owners_die() {
        let mut s = state_with_nodes(2);
        create(&mut s, "a", 0.0, b"owner1");
        create(&mut s, "b", 0.0, b"owner2");
        for c in plan(&s, &HashMap::new(), &HashSet::new()).commands {
            assert_eq!(s.apply(c), Response::Ok);
        }
        let node_a = s.actors["a"].node_id.unwrap();
        s.apply(Command::MarkNodeDead {
            node_id: node_a,
            incarnation: 1,
            reason: "x".into(),
            time_ms: 2,
        });
        let dead: HashSet<Vec<u8>> = [b"owner2".to_vec()].into_iter().collect();
        for c in plan(&s, &HashMap::new(), &dead).commands {
            assert_eq!(s.apply(c), Response::Ok);
        }
        assert_eq!(s.actors["a"].state, ActorState::Restarting);
        assert!(
            s.actors["a"].message.contains("died"),
            "{}",
            s.actors["a"].message
        );
        assert_eq!(s.actors["b"].state, ActorState::Dead);
        // The restarted one goes to the live node.
        let p = plan(&s, &HashMap::new(), &dead);
        assert!(
            matches!(&p.commands[..], [Command::AssignActor { node_id, num_restarts: 1, .. }] if *node_id != node_a)
        );
    }
}
