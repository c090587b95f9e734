//! The autoscaler: the fourth leader service (DESIGN §9). Each round it snapshots the config,
//! the demand, the nodes and the launch records, asks the pure planner
//! (`scheduler::autoscale`) what to launch and remove, commits launch records and stop
//! requests, and hands the provider calls to one worker task whose results (ALLOCATED,
//! ALLOCATION_FAILED, RAY_STOPPING, TERMINATED, …) are committed as they come and show in a
//! later round.
//!
//! What keeps it from Ray's known failures:
//! - demand is placed on launching nodes before new ones, so it is never counted twice;
//! - a record is committed before its provider call, and the call is idempotent per request
//!   id, so a new leader resumes from the records and never launches twice;
//! - removal is a drain the node refuses if it became busy, after a committed stop request
//!   that the state machine checks on every new assignment (no idle-check race);
//! - only the node itself says it is idle (nothing referenced lives there), and a failed
//!   provider listing removes nothing that round (fail closed);
//! - launch failures back off per type instead of retrying every round.

pub mod config;
pub mod provider;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{NodeId, pb};
use scheduler::ResourceSet;
use scheduler::autoscale::{self, Demand, GroupStrategy};
use tokio::sync::Notify;

use crate::head::{HeadShared, now_ms};
use crate::instances::{InstanceRecord, InstanceState, InstanceUpdate};
use crate::leader_loop::LeaderService;
use crate::state::{ActorState, ClusterState, Command, JobStatus, PgState, PgStrategy, Response};
use config::Config;
use provider::{AnyProvider, CloudInstance, LABEL_CLOUD_ID, LaunchSpec, NodeProvider, ProviderEnv};

/// A REQUESTED record the provider has not produced within this long times out (Ray: 600 s).
const ALLOCATION_TIMEOUT: Duration = Duration::from_secs(600);
/// An ALLOCATED instance whose node has not registered within this long times out (Ray: 300 s).
const RUNNING_TIMEOUT: Duration = Duration::from_secs(300);
/// Launch failures counted for backoff, and shown as recent failures, within this window.
const FAILURE_WINDOW_MS: u64 = 10 * 60 * 1000;
/// The first retry after a failed launch waits this long, doubling per recent failure.
const BACKOFF_BASE_MS: u64 = 5_000;
const BACKOFF_MAX_MS: u64 = 5 * 60 * 1000;
/// A launch not yet seen in the listing is asked for again after this long (idempotent).
const RELAUNCH_AFTER: Duration = Duration::from_secs(30);
/// A node that accepted its drain but has not left within this long is terminated.
const STOPPING_TIMEOUT: Duration = Duration::from_secs(60);
/// A listing older than this is not trusted for removals.
const LISTING_FRESH: Duration = Duration::from_secs(30);

/// The provider's last listing.
#[derive(Default)]
struct Listing {
    at: Option<Instant>,
    instances: Vec<CloudInstance>,
    error: Option<String>,
}

/// Provider calls for one round, run by the worker task in order.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    launch: Vec<InstanceRecord>,
    drain: Vec<(InstanceRecord, String, String)>,
    terminate: Vec<InstanceRecord>,
}

pub(crate) struct Autoscaler {
    env: ProviderEnv,
    /// The provider of the config it was made for.
    provider: Option<(String, Arc<AnyProvider>)>,
    listing: Arc<Mutex<Listing>>,
    /// The worker task runs (one at a time, so provider calls never race each other).
    busy: Arc<std::sync::atomic::AtomicBool>,
    seq: u64,
    /// Launch requests handed to the provider by this leader, and when.
    asked: HashMap<String, Instant>,
}

impl Autoscaler {
    pub(crate) fn new(env: ProviderEnv) -> Self {
        Self {
            env,
            provider: None,
            listing: Arc::default(),
            busy: Arc::default(),
            seq: 0,
            asked: HashMap::new(),
        }
    }

    fn provider_for(&mut self, json: &str, cfg: &Config) -> Arc<AnyProvider> {
        match &self.provider {
            Some((j, p)) if j == json => p.clone(),
            _ => {
                let p = Arc::new(AnyProvider::from_config(cfg, &self.env));
                tracing::info!(provider = p.kind(), "autoscaler provider set up");
                self.provider = Some((json.to_owned(), p.clone()));
                *self.listing.lock().unwrap_or_else(|e| e.into_inner()) = Listing::default();
                p
            }
        }
    }
}

fn set(m: &BTreeMap<String, f64>) -> ResourceSet {
    ResourceSet::from_map(m.iter().map(|(k, v)| (k.as_str(), *v))).unwrap_or_default()
}

fn update(r: &InstanceRecord, state: InstanceState, message: impl Into<String>) -> Command {
    Command::UpdateInstance {
        update: InstanceUpdate {
            instance_id: r.instance_id.clone(),
            state,
            cloud_instance_id: String::new(),
            node_id: None,
            message: message.into(),
        },
        time_ms: now_ms(),
    }
}

/// Recent launch failures of a type: (count within the window, the latest one's time).
fn recent_failures(st: &ClusterState, node_type: &str, now: u64) -> (u32, u64) {
    let mut n = 0;
    let mut latest = 0;
    for r in st.autoscaler.instances.values() {
        let failed = r.history.iter().any(|(s, _)| {
            matches!(
                s,
                InstanceState::AllocationFailed | InstanceState::AllocationTimeout
            )
        });
        if r.node_type == node_type
            && failed
            && now.saturating_sub(r.updated_ms) < FAILURE_WINDOW_MS
        {
            n += 1;
            latest = latest.max(r.updated_ms);
        }
    }
    (n, latest)
}

fn backoff_ms(failures: u32) -> u64 {
    if failures == 0 {
        return 0;
    }
    BACKOFF_BASE_MS
        .saturating_mul(1 << (failures - 1).min(16))
        .min(BACKOFF_MAX_MS)
}

/// The demand the planner sees: queued and infeasible tasks from the nodes, actors waiting
/// for a node, pending and rescheduling placement groups (all or nothing), and pending jobs'
/// entrypoint resources.
fn demand(
    st: &ClusterState,
    soft_demand: &HashMap<NodeId, Vec<pb::ResourceDemand>>,
) -> Vec<Demand> {
    let alive: HashSet<NodeId> = st.alive_nodes().map(|n| n.node_id).collect();
    let mut out = Vec::new();
    for (node, ds) in soft_demand {
        if !alive.contains(node) {
            continue;
        }
        for d in ds {
            let shape = ResourceSet::from_map(d.shape.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap_or_default();
            out.push(Demand::Shape {
                shape,
                count: d.queued.saturating_add(d.infeasible),
            });
        }
    }
    for a in st.actors.values() {
        if matches!(
            a.state,
            ActorState::PendingCreation | ActorState::Restarting
        ) && a.node_id.is_none()
        {
            out.push(Demand::Shape {
                shape: set(&a.spec.resources),
                count: 1,
            });
        }
    }
    for p in st.placement_groups.values() {
        if matches!(p.state, PgState::Pending | PgState::Rescheduling) {
            out.push(Demand::Group {
                bundles: p.bundles.iter().map(set).collect(),
                strategy: match p.strategy {
                    PgStrategy::StrictPack => GroupStrategy::StrictPack,
                    PgStrategy::StrictSpread => GroupStrategy::StrictSpread,
                    PgStrategy::Pack | PgStrategy::Spread => GroupStrategy::Any,
                },
            });
        }
    }
    for j in st.jobs.values() {
        if j.status == JobStatus::Pending && j.driver_node.is_none() && !j.stop_requested {
            out.push(Demand::Shape {
                shape: set(&j.entrypoint_resources),
                count: 1,
            });
        }
    }
    out
}

/// Whether the state assigns anything to the node (a job driver, an actor, a bundle), which
/// the node may not know of yet.
fn assigned_work(st: &ClusterState, node: NodeId) -> Option<String> {
    if let Some(j) = st
        .jobs
        .values()
        .find(|j| j.driver_node == Some(node) && !j.status.is_terminal())
    {
        return Some(format!("job {} is assigned to it", j.job_id));
    }
    if let Some(a) = st
        .actors
        .values()
        .find(|a| a.node_id == Some(node) && a.state != ActorState::Dead)
    {
        return Some(format!("actor {} is assigned to it", a.actor_id));
    }
    if let Some(p) = st
        .placement_groups
        .values()
        .find(|p| p.state == PgState::Created && p.bundle_nodes.contains(&Some(node)))
    {
        return Some(format!("placement group {} has bundles on it", p.pg_id));
    }
    None
}

impl LeaderService for Autoscaler {
    const NAME: &'static str = "autoscaler";
    type Effects = Option<(Arc<AnyProvider>, Calls)>;

    fn kick(shared: &HeadShared) -> Option<&Notify> {
        Some(&shared.autoscaler_kick)
    }

    fn period(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn plan(&mut self, shared: &HeadShared) -> (Vec<Command>, Self::Effects) {
        let st_guard = shared.state.read();
        let st = &st_guard.state;
        let Some(json) = st.autoscaler.config_json.clone() else {
            crate::metrics::record_autoscaler(st, now_ms());
            return (Vec::new(), None);
        };
        let cfg = match Config::from_json(&json) {
            Ok(c) => c,
            Err(e) => {
                shared.autoscaler_soft().last_error = e.to_string();
                return (Vec::new(), None);
            }
        };
        drop(st_guard);
        let provider = self.provider_for(&json, &cfg);
        let st_guard = shared.state.read();
        let st = &st_guard.state;
        let now = now_ms();
        let mut commands = Vec::new();
        let mut calls = Calls::default();

        let (listing_ok, listed): (bool, Vec<CloudInstance>) = {
            let l = self.listing.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = l.error.is_none() && l.at.is_some_and(|t| t.elapsed() < LISTING_FRESH);
            (fresh, l.instances.clone())
        };
        let soft = shared.soft.lock().unwrap_or_else(|p| p.into_inner());

        // 1. Tie records to what the provider listed and to the nodes that registered.
        let by_cloud_id: HashMap<&str, NodeId> = st
            .alive_nodes()
            .filter_map(|n| Some((n.labels.get(LABEL_CLOUD_ID)?.as_str(), n.node_id)))
            .collect();
        let bound: HashSet<&str> = st
            .autoscaler
            .instances
            .values()
            .filter(|r| !r.cloud_instance_id.is_empty())
            .map(|r| r.cloud_instance_id.as_str())
            .collect();
        let mut unbound: Vec<&CloudInstance> = listed
            .iter()
            .filter(|c| !bound.contains(c.id.as_str()))
            .collect();
        for r in st.autoscaler.instances.values() {
            let age = Duration::from_millis(now.saturating_sub(r.updated_ms));
            match r.state {
                InstanceState::Requested => {
                    // The provider's instance for this request: by request id, else the
                    // oldest unbound one of its type (providers that cannot tell).
                    let pos = unbound
                        .iter()
                        .position(|c| c.request_id == r.request_id)
                        .or_else(|| {
                            unbound
                                .iter()
                                .position(|c| c.request_id.is_empty() && c.node_type == r.node_type)
                        });
                    let cloud = pos.map(|i| unbound.remove(i).id.clone()).or_else(|| {
                        // A node may register before any listing shows its instance.
                        by_cloud_id
                            .contains_key(r.request_id.as_str())
                            .then(|| r.request_id.clone())
                    });
                    if let Some(cloud) = cloud {
                        commands.push(Command::UpdateInstance {
                            update: InstanceUpdate {
                                instance_id: r.instance_id.clone(),
                                state: InstanceState::Allocated,
                                cloud_instance_id: cloud,
                                node_id: None,
                                message: String::new(),
                            },
                            time_ms: now,
                        });
                    } else if age > ALLOCATION_TIMEOUT {
                        commands.push(update(
                            r,
                            InstanceState::AllocationTimeout,
                            format!("no instance within {ALLOCATION_TIMEOUT:?}"),
                        ));
                    } else if self
                        .asked
                        .get(&r.request_id)
                        .is_none_or(|t| t.elapsed() > RELAUNCH_AFTER)
                    {
                        // Asked again only now and then (it is idempotent, but slow clouds
                        // need not hear it every round).
                        self.asked.insert(r.request_id.clone(), Instant::now());
                        calls.launch.push(r.clone());
                    }
                }
                InstanceState::Allocated => {
                    if let Some(node) = by_cloud_id.get(r.cloud_instance_id.as_str()) {
                        commands.push(Command::UpdateInstance {
                            update: InstanceUpdate {
                                instance_id: r.instance_id.clone(),
                                state: InstanceState::RayRunning,
                                cloud_instance_id: String::new(),
                                node_id: Some(*node),
                                message: String::new(),
                            },
                            time_ms: now,
                        });
                    } else if listing_ok && !listed.iter().any(|c| c.id == r.cloud_instance_id) {
                        commands.push(update(
                            r,
                            InstanceState::AllocationFailed,
                            "the instance went away before its node registered",
                        ));
                    } else if age > RUNNING_TIMEOUT {
                        commands.push(update(
                            r,
                            InstanceState::AllocationTimeout,
                            format!("its node did not register within {RUNNING_TIMEOUT:?}"),
                        ));
                    }
                }
                InstanceState::AllocationTimeout | InstanceState::TerminationFailed => {
                    commands.push(update(r, InstanceState::Terminating, ""));
                }
                InstanceState::Terminating => calls.terminate.push(r.clone()),
                InstanceState::RayStopping if age > STOPPING_TIMEOUT => {
                    commands.push(update(
                        r,
                        InstanceState::Terminating,
                        format!(
                            "{}; the node did not leave within {STOPPING_TIMEOUT:?}",
                            r.message
                        ),
                    ));
                }
                InstanceState::RayStopRequested => {
                    // Committed in an earlier round: check what the state assigns, then drain.
                    let node = r.node_id.unwrap_or(NodeId::from_bytes([0; 16]));
                    match assigned_work(st, node) {
                        Some(why) => commands.push(update(
                            r,
                            InstanceState::RayRunning,
                            format!("kept: {why}"),
                        )),
                        None => {
                            let addr = st
                                .nodes
                                .get(&node)
                                .map(|n| n.address.clone())
                                .unwrap_or_default();
                            calls.drain.push((r.clone(), addr, r.message.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        // Instances the provider still has for records that are finished: terminate again.
        for c in &listed {
            if let Some(r) = st
                .autoscaler
                .instances
                .values()
                .find(|r| r.cloud_instance_id == c.id && r.state.is_final())
                && listing_ok
            {
                let mut again = r.clone();
                again.state = InstanceState::Terminating;
                calls.terminate.push(again);
            }
        }

        // 2. The planner's input.
        let types = cfg.node_types();
        let mut input = autoscale::Input {
            max_workers: cfg.max_workers,
            upscaling_speed: cfg.upscaling_speed,
            ..Default::default()
        };
        // Backoff after launch failures: a type may not grow until its backoff is over.
        let mut backed_off = HashSet::new();
        for t in &types {
            let (n, latest) = recent_failures(st, &t.name, now);
            if n > 0 && now.saturating_sub(latest) < backoff_ms(n) {
                backed_off.insert(t.name.clone());
            }
        }
        let managed: HashMap<NodeId, &InstanceRecord> = st
            .autoscaler
            .instances
            .values()
            .filter(|r| r.state == InstanceState::RayRunning)
            .filter_map(|r| Some((r.node_id?, r)))
            .collect();
        let mut launching: BTreeMap<String, u32> = BTreeMap::new();
        for r in st.autoscaler.instances.values() {
            // Pending records, and running ones whose node this head has not seen register
            // yet, are capacity on its way.
            let on_the_way = r.state.is_pending()
                || (matches!(r.state, InstanceState::RayRunning)
                    && r.node_id.is_some_and(|n| {
                        !st.nodes
                            .get(&n)
                            .is_some_and(|x| x.state == crate::state::NodeState::Alive)
                    }));
            if on_the_way {
                *launching.entry(r.node_type.clone()).or_default() += 1;
            }
        }
        // Job drivers hold their entrypoint resources in the job manager's accounting, not as
        // leases: take them off the nodes' free capacity.
        let mut job_use: HashMap<NodeId, ResourceSet> = HashMap::new();
        for j in st.jobs.values() {
            if let Some(n) = j.driver_node
                && !j.status.is_terminal()
            {
                job_use
                    .entry(n)
                    .or_default()
                    .add(&set(&j.entrypoint_resources));
            }
        }
        for n in st.alive_nodes() {
            let (total, mut available) =
                match (soft.totals.get(&n.node_id), soft.heartbeats.get(&n.node_id)) {
                    (Some((ti, t)), Some((ai, _, a)))
                        if *ti == n.incarnation && *ai == n.incarnation =>
                    {
                        (set(t), set(a))
                    }
                    _ => (set(&n.resources_total), set(&n.resources_total)),
                };
            if let Some(u) = job_use.get(&n.node_id) {
                available.subtract_allowing_debt(u);
            }
            let idle = soft.idle.get(&n.node_id);
            let draining = idle.is_some_and(|i| i.0 == n.incarnation && i.3);
            if draining {
                continue;
            }
            match managed.get(&n.node_id) {
                Some(r) if !n.is_head => {
                    let idle_ms = idle
                        .filter(|i| i.0 == n.incarnation)
                        .and_then(|i| i.1.map(|ms| ms + i.2.elapsed().as_millis() as u64))
                        .filter(|_| assigned_work(st, n.node_id).is_none());
                    input.nodes.push(autoscale::Node {
                        id: n.node_id.to_string(),
                        node_type: r.node_type.clone(),
                        total,
                        available,
                        idle_ms,
                    });
                }
                _ => input.fixed.push((total, available)),
            }
        }
        input.types = types
            .into_iter()
            .map(|mut t| {
                t.paused = backed_off.contains(&t.name);
                t
            })
            .collect();
        input.launching = launching;
        input.demand = demand(st, &soft.demand);
        input.floor = st.autoscaler.floor.iter().map(set).collect();
        drop(soft);

        // 3. Plan.
        let plan = autoscale::plan(&input);
        {
            let mut s = shared.autoscaler_soft();
            s.infeasible = plan
                .infeasible
                .iter()
                .map(|(r, k)| (r.to_map(), *k))
                .collect();
            s.held_back = plan
                .held_back
                .iter()
                .map(|(r, k)| (r.to_map(), *k))
                .collect();
            s.last_round_ms = now;
            s.last_error = if listing_ok || listed.is_empty() && st.autoscaler.instances.is_empty()
            {
                String::new()
            } else {
                self.listing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .error
                    .clone()
                    .unwrap_or_else(|| "waiting for the provider's first listing".into())
            };
        }
        crate::metrics::record_autoscaler(st, now_ms());
        let term = shared.raft.metrics().borrow().current_term;
        for (node_type, k) in &plan.launch {
            for _ in 0..*k {
                self.seq += 1;
                let id = format!("i-{term:x}-{now:x}-{:x}", self.seq);
                commands.push(Command::CreateInstance {
                    instance_id: id.clone(),
                    request_id: id,
                    node_type: node_type.clone(),
                    time_ms: now,
                });
                crate::metrics::record_autoscaler_launch(node_type);
            }
        }
        if listing_ok {
            let chosen: Vec<String> = plan
                .remove
                .iter()
                .filter_map(|(id, _)| {
                    let node: NodeId = id.parse().ok()?;
                    Some(managed.get(&node)?.cloud_instance_id.clone())
                })
                .collect();
            let removable = provider.removable(&chosen, &listed);
            for (id, why) in &plan.remove {
                let Ok(node) = id.parse::<NodeId>() else {
                    continue;
                };
                let Some(r) = managed.get(&node) else {
                    continue;
                };
                if !removable.contains(&r.cloud_instance_id) {
                    continue;
                }
                let reason = match why {
                    autoscale::RemoveReason::Idle => "removed by autoscaler: idle",
                    autoscale::RemoveReason::OverMax => {
                        "removed by autoscaler: idle, above max_workers"
                    }
                };
                commands.push(update(r, InstanceState::RayStopRequested, reason));
            }
        }
        drop(st_guard);
        // The worker runs every round, if only to refresh the listing.
        (commands, Some((provider, calls)))
    }

    fn committed(&mut self, shared: &HeadShared, replies: &[Response]) {
        for r in replies {
            if let Response::Rejected(e) = r {
                tracing::debug!("autoscaler command rejected: {e}");
            }
        }
        // Launch records and stop requests act in the next round: run it now.
        shared.autoscaler_kick.notify_one();
    }

    fn act(&mut self, shared: &Arc<HeadShared>, effects: Self::Effects) {
        let Some((provider, calls)) = effects else {
            return;
        };
        if self.busy.swap(true, std::sync::atomic::Ordering::AcqRel) {
            // The last round's calls still run: these wait for a later round.
            for r in &calls.launch {
                self.asked.remove(&r.request_id);
            }
            return;
        }
        let shared = shared.clone();
        let busy = self.busy.clone();
        let listing = self.listing.clone();
        tokio::spawn(async move {
            work(&shared, &provider, calls, &listing).await;
            busy.store(false, std::sync::atomic::Ordering::Release);
        });
    }
}

async fn commit(shared: &HeadShared, cmds: Vec<Command>) {
    if cmds.is_empty() {
        return;
    }
    if let Err(e) = shared.propose(Command::Batch(cmds)).await {
        tracing::warn!(
            "autoscaler could not record provider results: {}",
            e.message()
        );
    }
    shared.autoscaler_kick.notify_one();
}

/// One round's provider calls, in order: list, launch, drain, terminate.
async fn work(
    shared: &Arc<HeadShared>,
    provider: &AnyProvider,
    calls: Calls,
    listing: &Mutex<Listing>,
) {
    match provider.non_terminated().await {
        Ok(v) => {
            *listing.lock().unwrap_or_else(|e| e.into_inner()) = Listing {
                at: Some(Instant::now()),
                instances: v,
                error: None,
            };
        }
        Err(e) => {
            tracing::warn!(
                "autoscaler: listing instances failed (nothing is removed while it does): {e}"
            );
            let mut l = listing.lock().unwrap_or_else(|p| p.into_inner());
            l.error = Some(format!("listing instances failed: {e}"));
        }
    }
    let heads: Vec<String> = {
        let m = shared.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(_, n)| n.addr.clone())
            .collect()
    };
    let cfg = {
        let st = shared.state.read();
        st.state
            .autoscaler
            .config_json
            .as_deref()
            .and_then(|j| Config::from_json(j).ok())
    };
    // Each call only if its record is still in the state the round saw: a round planned
    // while the previous calls ran may hold some that are done.
    let now_state = |id: &str| {
        shared
            .state
            .read()
            .state
            .autoscaler
            .instances
            .get(id)
            .map(|r| r.state)
    };
    let still = |r: &InstanceRecord| {
        now_state(&r.instance_id).is_some_and(|now| {
            now == r.state || (r.state == InstanceState::Terminating && now.is_final())
        })
    };
    for r in calls.launch {
        if !shared.leading() {
            return;
        }
        if !still(&r) {
            continue;
        }
        let Some(t) = cfg
            .as_ref()
            .and_then(|c| c.available_node_types.get(&r.node_type))
        else {
            commit(
                shared,
                vec![update(
                    &r,
                    InstanceState::AllocationFailed,
                    format!("node type {} is no longer in the config", r.node_type),
                )],
            )
            .await;
            continue;
        };
        let spec = LaunchSpec {
            node_type: r.node_type.clone(),
            resources: t.resources.clone(),
            labels: t.labels.clone(),
            node_config: t.node_config.clone(),
            head_addresses: heads.clone(),
        };
        match provider.launch(&spec, 1, &r.request_id).await {
            Ok(()) => tracing::info!(
                instance = r.instance_id,
                node_type = r.node_type,
                "launch requested"
            ),
            Err(e) => {
                tracing::warn!(
                    instance = r.instance_id,
                    node_type = r.node_type,
                    "launch failed: {e}"
                );
                crate::metrics::record_autoscaler_failure(&r.node_type);
                commit(
                    shared,
                    vec![update(
                        &r,
                        InstanceState::AllocationFailed,
                        format!("LaunchFailed: {e}"),
                    )],
                )
                .await;
            }
        }
    }
    for (r, addr, reason) in calls.drain {
        if !shared.leading() {
            return;
        }
        if !still(&r) {
            continue;
        }
        let outcome = match shared.node_manager(&addr) {
            Ok(mut nm) => nm
                .drain_node(pb::DrainNodeRequest {
                    node_id: String::new(),
                    reason: reason.clone(),
                })
                .await
                .map(tonic::Response::into_inner),
            Err(e) => Err(e),
        };
        let cmd = match outcome {
            Ok(rep) if rep.accepted => {
                tracing::info!(instance = r.instance_id, node = ?r.node_id, "drain accepted: {reason}");
                update(&r, InstanceState::RayStopping, reason)
            }
            Ok(rep) => {
                tracing::info!(
                    instance = r.instance_id,
                    "drain refused, node kept: {}",
                    rep.rejected_because
                );
                update(
                    &r,
                    InstanceState::RayRunning,
                    format!("drain refused: {}", rep.rejected_because),
                )
            }
            Err(e) => update(
                &r,
                InstanceState::RayRunning,
                format!("drain failed: {}", e.message()),
            ),
        };
        commit(shared, vec![cmd]).await;
    }
    for r in calls.terminate {
        if !shared.leading() {
            return;
        }
        if !still(&r) {
            continue;
        }
        let done_already = now_state(&r.instance_id).is_some_and(InstanceState::is_final);
        let ids: Vec<String> = [r.cloud_instance_id.clone()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        let res = if ids.is_empty() {
            Ok(())
        } else {
            provider
                .terminate(&ids, &format!("{}-terminate", r.request_id))
                .await
        };
        if done_already {
            continue;
        }
        let cmd = match res {
            Ok(()) => {
                crate::metrics::record_autoscaler_termination(&r.node_type);
                update(&r, InstanceState::Terminated, "")
            }
            Err(e) => update(
                &r,
                InstanceState::TerminationFailed,
                format!("TerminateFailed: {e}"),
            ),
        };
        commit(shared, vec![cmd]).await;
    }
}

/// The autoscaler part of `rayctl status`.
pub(crate) fn status(shared: &HeadShared, st: &ClusterState) -> pb::AutoscalerStatus {
    let soft = shared.autoscaler_soft().clone();
    let demand = |v: &[(BTreeMap<String, f64>, u32)]| {
        v.iter()
            .map(|(shape, k)| pb::ResourceDemand {
                shape: shape.clone().into_iter().collect(),
                queued: *k,
                infeasible: 0,
                kind: String::new(),
            })
            .collect()
    };
    pb::AutoscalerStatus {
        enabled: st.autoscaler.config_json.is_some(),
        instances: st
            .autoscaler
            .instances
            .values()
            .map(|r| pb::AutoscalerInstance {
                instance_id: r.instance_id.clone(),
                request_id: r.request_id.clone(),
                node_type: r.node_type.clone(),
                state: r.state.name().into(),
                cloud_instance_id: r.cloud_instance_id.clone(),
                node_id: r.node_id.map(|n| n.to_string()).unwrap_or_default(),
                message: r.message.clone(),
                created_ms: r.created_ms,
                updated_ms: r.updated_ms,
            })
            .collect(),
        constraints: st
            .autoscaler
            .floor
            .iter()
            .map(|b| pb::Bundle {
                resources: b.clone().into_iter().collect(),
            })
            .collect(),
        infeasible: demand(&soft.infeasible),
        held_back: demand(&soft.held_back),
        last_round_ms: soft.last_round_ms,
        last_error: soft.last_error,
    }
}
