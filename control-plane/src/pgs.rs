//! Placement groups: the handlers of the placement-group RPCs and the placement-group
//! manager, a leader-only service.
//!
//! The manager places a PENDING (or RESCHEDULING) group with `scheduler::place_bundles` over
//! the live nodes' last heartbeats, then reserves it in two phases: `PrepareBundles` on every
//! node involved (each reserves all its bundles or none), and only if all succeeded
//! `CommitBundles` on each and a committed `SetPlacementGroupState(CREATED)` naming every
//! bundle's node and incarnation. A failed prepare cancels the others and the group waits for
//! the next round. Groups whose node died are RESCHEDULING (every bundle is placed again);
//! groups of an owner that exited are REMOVED unless detached.
//!
//! Invariant: bundles are held on a node only for a group the replicated state says is
//! CREATED there, or that the manager is reserving now. Nodes list their groups with their
//! heartbeats and release the others (a leader that died mid-reservation leaves such
//! leftovers; so does a removal whose cancel was lost).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{NodeId, RpcError, pb};
use scheduler::{BundlePlacement, BundleStrategy, ClusterView, NodeView, ResourceSet};
use tonic::Status;

use crate::head::{HeadShared, now_ms};
use crate::leader_loop::LeaderService;
use crate::state::{
    ClusterState, Command, PgState, PgStrategy, PlacementGroupRecord, Rejection, Resources,
    Response,
};
use tokio::sync::Notify;

const MAX_BUNDLES: usize = 1000;
const MAX_WAIT: Duration = Duration::from_secs(30);

fn invalid(msg: impl Into<String>) -> Status {
    RpcError::InvalidArgument(msg.into()).into()
}

fn strategy_pb(s: PgStrategy) -> pb::PlacementStrategy {
    match s {
        PgStrategy::Pack => pb::PlacementStrategy::Pack,
        PgStrategy::Spread => pb::PlacementStrategy::Spread,
        PgStrategy::StrictPack => pb::PlacementStrategy::StrictPack,
        PgStrategy::StrictSpread => pb::PlacementStrategy::StrictSpread,
    }
}

fn state_pb(s: PgState) -> pb::PlacementGroupState {
    match s {
        PgState::Pending => pb::PlacementGroupState::Pending,
        PgState::Created => pb::PlacementGroupState::Created,
        PgState::Rescheduling => pb::PlacementGroupState::Rescheduling,
        PgState::Removed => pb::PlacementGroupState::Removed,
    }
}

pub(crate) fn pg_info(shared: &HeadShared, p: &PlacementGroupRecord) -> pb::PlacementGroupInfo {
    let message = shared
        .soft
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pg_messages
        .get(&p.pg_id)
        .cloned()
        .unwrap_or_default();
    pb::PlacementGroupInfo {
        pg_id: p.pg_id.clone(),
        name: p.name.clone(),
        job_id: p.job_id.clone(),
        strategy: strategy_pb(p.strategy) as i32,
        state: state_pb(p.state) as i32,
        bundles: p
            .bundles
            .iter()
            .map(|b| pb::Bundle {
                resources: b.clone().into_iter().collect(),
            })
            .collect(),
        bundle_node_ids: p
            .bundle_nodes
            .iter()
            .map(|n| n.map(|n| n.to_string()).unwrap_or_default())
            .collect(),
        message: if p.state == PgState::Pending || p.state == PgState::Rescheduling {
            message
        } else {
            String::new()
        },
        created_at_ms: p.created_at_ms,
        detached: p.detached,
    }
}

pub(crate) async fn create(
    shared: &HeadShared,
    r: pb::CreatePlacementGroupRequest,
) -> Result<pb::PlacementGroupInfo, Status> {
    if r.pg_id.len() != 32 || !r.pg_id.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid("pg_id must be 32 hex characters"));
    }
    if r.bundles.is_empty() || r.bundles.len() > MAX_BUNDLES {
        return Err(invalid(format!(
            "a placement group has 1 to {MAX_BUNDLES} bundles, not {}",
            r.bundles.len()
        )));
    }
    let mut bundles = Vec::with_capacity(r.bundles.len());
    for (i, b) in r.bundles.iter().enumerate() {
        let set = crate::head::check_resources(&b.resources)
            .map_err(|e| invalid(format!("bundle {i}: {}", e.message())))?;
        if set.is_empty() {
            return Err(invalid(format!(
                "bundle {i} is empty: a bundle reserves at least one resource"
            )));
        }
        bundles.push(set);
    }
    let strategy = match pb::PlacementStrategy::try_from(r.strategy) {
        Ok(pb::PlacementStrategy::Pack) => PgStrategy::Pack,
        Ok(pb::PlacementStrategy::Spread) => PgStrategy::Spread,
        Ok(pb::PlacementStrategy::StrictPack) => PgStrategy::StrictPack,
        Ok(pb::PlacementStrategy::StrictSpread) => PgStrategy::StrictSpread,
        Err(_) => {
            return Err(invalid(format!(
                "unknown placement strategy {}",
                r.strategy
            )));
        }
    };
    let cmd = Command::CreatePlacementGroup {
        pg_id: r.pg_id.clone(),
        job_id: r.job_id,
        name: r.name.chars().take(256).collect(),
        strategy,
        bundles,
        time_ms: now_ms(),
        detached: r.detached,
        owner_prefix: if r.detached {
            Vec::new()
        } else {
            r.owner_prefix
        },
    };
    match shared.propose(cmd).await? {
        // A retried create.
        Response::Ok | Response::Rejected(Rejection::AlreadyExists { .. }) => {}
        Response::Rejected(e) => return Err(invalid(e.to_string())),
        other => {
            return Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into());
        }
    }
    shared.pg_kick.notify_one();
    // New demand: the autoscaler looks at once, not at its next period.
    shared.autoscaler_kick.notify_one();
    let p = shared
        .state
        .read()
        .state
        .placement_groups
        .get(&r.pg_id)
        .cloned()
        .ok_or_else(|| Status::internal("the created group is missing"))?;
    Ok(pg_info(shared, &p))
}

pub(crate) async fn get(
    shared: &HeadShared,
    r: pb::GetPlacementGroupRequest,
) -> Result<pb::PlacementGroupInfo, Status> {
    shared.linearizable().await?;
    let deadline = Instant::now() + Duration::from_millis(r.wait_ms).min(MAX_WAIT);
    loop {
        let changed = shared.pg_changed.notified();
        let p = shared
            .state
            .read()
            .state
            .placement_groups
            .get(&r.pg_id)
            .cloned()
            .ok_or_else(|| {
                Status::from(RpcError::NotFound(format!(
                    "no placement group {:?}",
                    r.pg_id
                )))
            })?;
        if matches!(p.state, PgState::Created | PgState::Removed) || Instant::now() >= deadline {
            return Ok(pg_info(shared, &p));
        }
        let _ = tokio::time::timeout(
            Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())),
            changed,
        )
        .await;
    }
}

pub(crate) async fn list(shared: &HeadShared) -> Result<Vec<pb::PlacementGroupInfo>, Status> {
    shared.linearizable().await?;
    let pgs: Vec<PlacementGroupRecord> = shared
        .state
        .read()
        .state
        .placement_groups
        .values()
        .cloned()
        .collect();
    let mut v: Vec<pb::PlacementGroupInfo> = pgs.iter().map(|p| pg_info(shared, p)).collect();
    v.sort_by_key(|p| (p.created_at_ms, p.pg_id.clone()));
    Ok(v)
}

pub(crate) async fn remove(
    shared: &HeadShared,
    r: pb::RemovePlacementGroupRequest,
) -> Result<pb::PlacementGroupInfo, Status> {
    shared.linearizable().await?;
    let nodes = {
        let st = shared.state.read();
        let p = st.state.placement_groups.get(&r.pg_id).ok_or_else(|| {
            Status::from(RpcError::NotFound(format!(
                "no placement group {:?}",
                r.pg_id
            )))
        })?;
        nodes_of(&st.state, p)
    };
    let cmd = Command::SetPlacementGroupState {
        pg_id: r.pg_id.clone(),
        state: PgState::Removed,
        bundle_nodes: Vec::new(),
        bundle_incarnations: Vec::new(),
    };
    match shared.propose(cmd).await? {
        // Removed already: fine.
        Response::Ok | Response::Rejected(Rejection::InvalidTransition { .. }) => {}
        Response::Rejected(e) => return Err(invalid(e.to_string())),
        other => {
            return Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into());
        }
    }
    shared.pg_changed.notify_waiters();
    // Release the bundles now (heartbeats would within a period).
    for addr in nodes {
        cancel_on(shared, &addr, &r.pg_id).await;
    }
    let p = shared.state.read().state.placement_groups[&r.pg_id].clone();
    Ok(pg_info(shared, &p))
}

/// The live node addresses holding the group's bundles.
fn nodes_of(st: &ClusterState, p: &PlacementGroupRecord) -> Vec<String> {
    let mut v: Vec<String> = p
        .bundle_nodes
        .iter()
        .flatten()
        .filter_map(|n| st.nodes.get(n))
        .map(|n| n.address.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

async fn cancel_on(shared: &HeadShared, addr: &str, pg: &str) {
    let Ok(mut nm) = shared.node_manager(addr) else {
        return;
    };
    if let Err(e) = nm
        .cancel_bundles(pb::BundlesRequest {
            pg_id: pg.to_owned(),
        })
        .await
    {
        tracing::warn!(
            pg,
            "could not release bundles on {addr} (its heartbeat will): {}",
            e.message()
        );
    }
}

/// The heartbeat's bundle part (leader): which of the groups a node holds bundles of it
/// must release.
pub(crate) fn heartbeat_bundles(shared: &HeadShared, node: NodeId, held: &[String]) -> Vec<String> {
    if held.is_empty() {
        return Vec::new();
    }
    let st = shared.state.read();
    let soft = shared.soft.lock().unwrap_or_else(|p| p.into_inner());
    held.iter()
        .filter(|pg| !soft.pg_in_progress.contains(*pg))
        .filter(|pg| match st.state.placement_groups.get(*pg) {
            Some(p) => p.state != PgState::Created || !p.bundle_nodes.contains(&Some(node)),
            None => true,
        })
        .cloned()
        .collect()
}

/// What the manager decides in one round: pure, tested without a cluster.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) commands: Vec<Command>,
    /// Groups to reserve now: per bundle, its node and that node's incarnation.
    pub(crate) reserve: Vec<(String, Vec<(NodeId, u64)>)>,
    /// Why groups wait.
    pub(crate) messages: HashMap<String, String>,
}

pub(crate) fn plan(
    state: &ClusterState,
    available: &HashMap<NodeId, Resources>,
    dead_owners: &HashSet<Vec<u8>>,
    in_progress: &HashSet<String>,
) -> Plan {
    let mut p = Plan::default();
    let set = |r: &Resources| {
        ResourceSet::from_map(r.iter().map(|(k, v)| (k.as_str(), *v))).unwrap_or_default()
    };
    let alive = state.alive_map();
    let mut view = ClusterView::default();
    for (id, n) in &alive {
        let total = set(&n.resources_total);
        let free = available.get(id).map(set).unwrap_or_else(|| total.clone());
        view.nodes.insert(
            *id,
            NodeView {
                total,
                available: free,
                alive: true,
            },
        );
    }
    for g in state.placement_groups.values() {
        if g.state == PgState::Removed || in_progress.contains(&g.pg_id) {
            continue;
        }
        if !g.detached && !g.owner_prefix.is_empty() && dead_owners.contains(&g.owner_prefix) {
            p.commands.push(Command::SetPlacementGroupState {
                pg_id: g.pg_id.clone(),
                state: PgState::Removed,
                bundle_nodes: Vec::new(),
                bundle_incarnations: Vec::new(),
            });
            continue;
        }
        if g.state == PgState::Created {
            let lost = g
                .bundle_nodes
                .iter()
                .zip(&g.bundle_incarnations)
                .any(|(n, inc)| match n.and_then(|n| alive.get(&n)) {
                    Some(rec) => rec.incarnation != *inc,
                    None => true,
                });
            if lost {
                p.commands.push(Command::SetPlacementGroupState {
                    pg_id: g.pg_id.clone(),
                    state: PgState::Rescheduling,
                    bundle_nodes: Vec::new(),
                    bundle_incarnations: Vec::new(),
                });
            }
            continue;
        }
        let strategy = match g.strategy {
            PgStrategy::Pack => BundleStrategy::Pack,
            PgStrategy::Spread => BundleStrategy::Spread,
            PgStrategy::StrictPack => BundleStrategy::StrictPack,
            PgStrategy::StrictSpread => BundleStrategy::StrictSpread,
        };
        let bundles: Vec<ResourceSet> = g.bundles.iter().map(set).collect();
        match scheduler::place_bundles(&view, &bundles, strategy) {
            BundlePlacement::Placed(nodes) => {
                // Later groups in this round see these resources taken.
                for (n, b) in nodes.iter().zip(&bundles) {
                    if let Some(v) = view.nodes.get_mut(n) {
                        v.available.subtract_allowing_debt(b);
                    }
                }
                p.reserve.push((
                    g.pg_id.clone(),
                    nodes.iter().map(|n| (*n, alive[n].incarnation)).collect(),
                ));
            }
            BundlePlacement::Wait => {
                p.messages.insert(g.pg_id.clone(), "waiting for resources: the bundles fit the live nodes but not what is free now".into());
            }
            BundlePlacement::Infeasible(why) => {
                p.messages
                    .insert(g.pg_id.clone(), format!("infeasible: {why}"));
            }
        }
    }
    p
}

/// The placement-group manager: runs on the leader only (started by `leader::supervise`).
pub(crate) struct PgManager;

impl LeaderService for PgManager {
    const NAME: &'static str = "placement-group manager";
    type Effects = Vec<(String, Vec<(NodeId, u64)>)>;

    fn kick(shared: &HeadShared) -> Option<&Notify> {
        Some(&shared.pg_kick)
    }

    fn started(&mut self, shared: &Arc<HeadShared>) {
        shared
            .soft
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pg_in_progress
            .clear();
    }

    fn plan(&mut self, shared: &HeadShared) -> (Vec<Command>, Self::Effects) {
        let plan = {
            let st = shared.state.read();
            crate::metrics::record_placement_groups(&st.state);
            let available = shared.available_view(&st.state);
            let soft = shared.soft.lock().unwrap_or_else(|p| p.into_inner());
            let dead_owners: HashSet<Vec<u8>> = soft.dead_owners.keys().cloned().collect();
            plan(&st.state, &available, &dead_owners, &soft.pg_in_progress)
        };
        shared
            .soft
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pg_messages = plan.messages;
        (plan.commands, plan.reserve)
    }

    fn committed(&mut self, shared: &HeadShared, _: &[Response]) {
        shared.pg_changed.notify_waiters();
    }

    fn act(&mut self, shared: &Arc<HeadShared>, reserve: Self::Effects) {
        for (pg, nodes) in reserve {
            shared
                .soft
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pg_in_progress
                .insert(pg.clone());
            let shared = shared.clone();
            tokio::spawn(async move {
                let placed = reserve_group(&shared, &pg, &nodes).await;
                shared
                    .soft
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pg_in_progress
                    .remove(&pg);
                match placed {
                    Ok(()) => shared.pg_changed.notify_waiters(),
                    Err(e) => {
                        tracing::info!(pg, "placement group not reserved this round: {e}");
                        shared
                            .soft
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .pg_messages
                            .insert(pg.clone(), format!("retrying: {e}"));
                    }
                }
                shared.pg_kick.notify_one();
            });
        }
    }
}

/// Two-phase reservation of one group; on any failure every prepared node is cancelled.
async fn reserve_group(
    shared: &HeadShared,
    pg: &str,
    nodes: &[(NodeId, u64)],
) -> Result<(), String> {
    let (bundles, addrs) = {
        let st = shared.state.read();
        let g = st
            .state
            .placement_groups
            .get(pg)
            .ok_or("the group is gone")?;
        if !matches!(g.state, PgState::Pending | PgState::Rescheduling) {
            return Err(format!("the group is {:?} now", g.state));
        }
        let addrs: HashMap<NodeId, String> = nodes
            .iter()
            .filter_map(|(n, _)| st.state.nodes.get(n).map(|r| (*n, r.address.clone())))
            .collect();
        (g.bundles.clone(), addrs)
    };
    // node → (incarnation, its bundles)
    let mut per_node: BTreeMap<NodeId, (u64, Vec<pb::BundleSpec>)> = BTreeMap::new();
    for (i, ((n, inc), b)) in nodes.iter().zip(&bundles).enumerate() {
        per_node
            .entry(*n)
            .or_insert((*inc, Vec::new()))
            .1
            .push(pb::BundleSpec {
                index: i as u32,
                resources: b.clone().into_iter().collect(),
            });
    }
    let prepares = per_node.iter().map(|(n, (inc, specs))| {
        let addr = addrs.get(n).cloned().unwrap_or_default();
        let req = pb::PrepareBundlesRequest {
            pg_id: pg.to_owned(),
            node_incarnation: *inc,
            bundles: specs.clone(),
        };
        async move {
            let r = match shared.node_manager(&addr) {
                Ok(mut nm) => nm
                    .prepare_bundles(req)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("node {n}: {}", e.message())),
                Err(e) => Err(e.message().to_owned()),
            };
            (addr, r)
        }
    });
    let results = futures_util::future::join_all(prepares).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().cloned())
        .collect();
    if !failed.is_empty() {
        for (addr, _) in &results {
            cancel_on(shared, addr, pg).await;
        }
        return Err(format!("prepare failed: {}", failed.join("; ")));
    }
    for (addr, _) in &results {
        let r = match shared.node_manager(addr) {
            Ok(mut nm) => nm
                .commit_bundles(pb::BundlesRequest {
                    pg_id: pg.to_owned(),
                })
                .await
                .map(|_| ())
                .map_err(|e| e.message().to_owned()),
            Err(e) => Err(e.message().to_owned()),
        };
        if let Err(e) = r {
            for (addr, _) in &results {
                cancel_on(shared, addr, pg).await;
            }
            return Err(format!("commit on {addr} failed: {e}"));
        }
    }
    let cmd = Command::SetPlacementGroupState {
        pg_id: pg.to_owned(),
        state: PgState::Created,
        bundle_nodes: nodes.iter().map(|(n, _)| Some(*n)).collect(),
        bundle_incarnations: nodes.iter().map(|(_, i)| *i).collect(),
    };
    match shared.propose(cmd).await {
        Ok(Response::Ok) => Ok(()),
        other => {
            // Removed meanwhile, or leadership lost: give the bundles back.
            for (addr, _) in &results {
                cancel_on(shared, addr, pg).await;
            }
            Err(format!("could not record the placement: {other:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::state::testing::nid;

    fn cluster(n: u8) -> ClusterState {
        crate::state::testing::with_nodes(n, 1.0)
    }

    fn group(s: &mut ClusterState, id: &str, n: usize, strategy: PgStrategy, owner: &[u8]) {
        let c = Command::CreatePlacementGroup {
            pg_id: id.into(),
            job_id: String::new(),
            name: String::new(),
            strategy,
            bundles: vec![[("CPU".to_string(), 1.0)].into_iter().collect(); n],
            time_ms: 1,
            detached: false,
            owner_prefix: owner.to_vec(),
        };
        assert_eq!(s.apply(c), Response::Ok);
    }

    #[test]
    fn groups_are_placed_wait_or_are_infeasible_and_reschedule_when_a_node_dies() {
        let mut s = cluster(3);
        group(&mut s, "a", 3, PgStrategy::StrictSpread, b"o");
        group(&mut s, "b", 4, PgStrategy::StrictSpread, b"o");
        let p = plan(&s, &HashMap::new(), &HashSet::new(), &HashSet::new());
        assert_eq!(p.reserve.len(), 1, "{p:?}");
        let (id, nodes) = &p.reserve[0];
        assert_eq!(id, "a");
        let distinct: HashSet<NodeId> = nodes.iter().map(|(n, _)| *n).collect();
        assert_eq!(distinct.len(), 3);
        assert!(
            p.messages["b"].starts_with("infeasible"),
            "{:?}",
            p.messages
        );
        // Recorded as created; then a node dies: rescheduling.
        let created = Command::SetPlacementGroupState {
            pg_id: "a".into(),
            state: PgState::Created,
            bundle_nodes: nodes.iter().map(|(n, _)| Some(*n)).collect(),
            bundle_incarnations: nodes.iter().map(|(_, i)| *i).collect(),
        };
        assert_eq!(s.apply(created), Response::Ok);
        assert!(
            plan(&s, &HashMap::new(), &HashSet::new(), &HashSet::new())
                .commands
                .is_empty()
        );
        s.apply(Command::MarkNodeDead {
            node_id: nid(2),
            incarnation: 1,
            reason: "x".into(),
            time_ms: 2,
        });
        let p = plan(&s, &HashMap::new(), &HashSet::new(), &HashSet::new());
        assert!(
            matches!(
                &p.commands[..],
                [Command::SetPlacementGroupState {
                    state: PgState::Rescheduling,
                    ..
                }]
            ),
            "{p:?}"
        );
        // A group whose owner died is removed.
        let dead: HashSet<Vec<u8>> = [b"o".to_vec()].into_iter().collect();
        let p = plan(&s, &HashMap::new(), &dead, &HashSet::new());
        assert_eq!(p.commands.len(), 2, "{p:?}");
        // No room now (the free view is full) but it fits the totals: it waits.
        let mut s = cluster(2);
        group(&mut s, "c", 2, PgStrategy::Pack, b"o");
        let full: HashMap<NodeId, Resources> =
            [(nid(1), Resources::new()), (nid(2), Resources::new())]
                .into_iter()
                .collect();
        let p = plan(&s, &full, &HashSet::new(), &HashSet::new());
        assert!(p.reserve.is_empty());
        assert!(p.messages["c"].starts_with("waiting"), "{:?}", p.messages);
    }
}
