//! Worker leases and the spillback protocol (DESIGN §3, §6): a lease reserves a resource
//! shape on this node. A request goes through `scheduler::decide` over the leader's view (with
//! this node's own entry replaced by its exact local accounting): granted here, answered with
//! a better node (spillback), queued here until resources free up or its timeout passes, or
//! refused as infeasible. Hops are bounded: past `MAX_SPILLBACKS` the node asked last keeps a
//! request it could ever run.
//!
//! Invariants: leased resources never exceed the node's total (`ResourceSet::subtract` is
//! all-or-nothing); a returned lease frees exactly what it took, once. Queued and infeasible
//! shapes are reported with heartbeats for the autoscaler.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::pb;
use protocol::{NodeId, RpcError};
use scheduler::{ClusterView, Decision, NodeView, PolicyConfig, ResourceSet, SchedulingStrategy};
use tonic::Status;

/// Spillback hops after which a request stays on the node asked last (if it can ever run it).
pub(crate) const MAX_SPILLBACKS: u32 = 4;
/// How long an infeasible shape stays in the reported demand after it was last asked for.
const INFEASIBLE_MEMORY: Duration = Duration::from_secs(3);

/// A placement group's bundles on this node.
struct Bundles {
    /// The bundles' own resources, taken from the pool at prepare.
    reserved: ResourceSet,
    /// The group resources they provide once committed (`CPU_group_0_<pg>`, …).
    provided: ResourceSet,
    committed: bool,
}

/// The resources a committed bundle provides: each of its resources under its group names,
/// and `bundle` = 1000 (so a zero-resource task can still ask for a bundle).
pub(crate) fn group_resources(pg: &str, bundles: &[(u32, ResourceSet)]) -> ResourceSet {
    let mut out = ResourceSet::new();
    for (i, r) in bundles {
        let mut pairs: Vec<(String, f64)> = r.iter().map(|(k, v)| (k.to_owned(), v)).collect();
        pairs.push(("bundle".into(), 1000.0));
        for (k, v) in pairs {
            let one = ResourceSet::from_map([
                (format!("{k}_group_{i}_{pg}").as_str(), v),
                (format!("{k}_group_{pg}").as_str(), v),
            ]);
            out.add(&one.unwrap_or_default());
        }
    }
    out
}

/// (a resource shape as sorted fixed-point pairs, the owner's prefix)
type OwnerShape = (ResourceSet, Vec<u8>);

struct State {
    /// The node's resources, plus the group resources of committed bundles.
    total: ResourceSet,
    available: ResourceSet,
    bundles: HashMap<String, Bundles>,
    leases: HashMap<String, ResourceSet>,
    /// Leases whose CPU is lent out while their task is blocked in `get`.
    lent: std::collections::HashSet<String>,
    next_lease: u64,
    spread_cursor: usize,
    rng: u64,
    /// shape (sorted pairs) → requests waiting now
    /// (shape, owner) → (requests waiting here now, the owner's backlog of tasks of that
    /// shape as its latest waiting request said)
    queued: BTreeMap<OwnerShape, (u32, u32)>,
    /// shape → (requests, last asked)
    /// (shape, owner) → (the owner's backlog as its latest request said, when): an owner
    /// retries every second, so each owner counts once, with its latest backlog.
    infeasible: BTreeMap<OwnerShape, (u32, Instant)>,
    /// The node accepted a drain: it grants nothing new.
    draining: bool,
}

pub(crate) struct Leases {
    node_id: NodeId,
    state: Mutex<State>,
    freed: tokio::sync::Notify,
}

fn shape_map(k: &ResourceSet) -> std::collections::HashMap<String, f64> {
    k.iter().map(|(n, v)| (n.to_owned(), v)).collect()
}

fn invalid(msg: String) -> Status {
    RpcError::InvalidArgument(msg).into()
}

impl Leases {
    pub(crate) fn new(node_id: NodeId, total: ResourceSet) -> Self {
        let seed = u64::from_le_bytes(node_id.as_bytes()[..8].try_into().unwrap_or([1; 8])) | 1;
        Self {
            node_id,
            state: Mutex::new(State {
                available: total.clone(),
                total,
                bundles: HashMap::new(),
                leases: HashMap::new(),
                lent: Default::default(),
                next_lease: 0,
                spread_cursor: 0,
                rng: seed,
                queued: BTreeMap::new(),
                infeasible: BTreeMap::new(),
                draining: false,
            }),
            freed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn available(&self) -> ResourceSet {
        self.lock().available.clone()
    }

    pub(crate) fn total(&self) -> ResourceSet {
        self.lock().total.clone()
    }

    /// What this node's resources are held by now (leases, bundles), for the idle check.
    pub(crate) fn held(&self) -> (usize, usize) {
        let st = self.lock();
        (st.leases.len(), st.bundles.len())
    }

    /// Starts a drain unless a lease or bundle is held: from then on nothing new is granted
    /// (checked under the same lock as every grant, so no lease slips in between).
    pub(crate) fn begin_drain(&self) -> Result<(), String> {
        let mut st = self.lock();
        if st.draining {
            return Err("a drain of this node is already under way".into());
        }
        if !st.leases.is_empty() || !st.bundles.is_empty() {
            return Err(format!(
                "busy: {} lease(s) and {} placement group(s) hold resources here",
                st.leases.len(),
                st.bundles.len()
            ));
        }
        st.draining = true;
        Ok(())
    }

    /// The drain was refused after all (something else still runs here).
    pub(crate) fn cancel_drain(&self) {
        self.lock().draining = false;
    }

    pub(crate) fn draining(&self) -> bool {
        self.lock().draining
    }

    /// Placement groups with bundles here (prepared or committed).
    pub(crate) fn placement_groups(&self) -> Vec<String> {
        self.lock().bundles.keys().cloned().collect()
    }

    /// Phase one: reserves the bundles' resources, all or none (again for the same group:
    /// nothing more).
    pub(crate) fn prepare_bundles(
        &self,
        pg: &str,
        bundles: &[(u32, ResourceSet)],
    ) -> Result<(), Status> {
        let provided = group_resources(pg, bundles);
        if self
            .lock()
            .bundles
            .get(pg)
            .is_some_and(|b| b.provided == provided)
        {
            return Ok(());
        }
        if self.lock().draining {
            return Err(Status::unavailable(
                "this node is draining: it takes no new bundles",
            ));
        }
        // Held from an earlier placement of the group (it is being rescheduled): let those
        // go first.
        self.cancel_bundles(pg);
        let mut st = self.lock();
        let mut need = ResourceSet::new();
        for (_, r) in bundles {
            need.add(r);
        }
        st.available.subtract(&need).map_err(|_| {
            Status::resource_exhausted(format!(
                "this node has {:?} free, the bundles need {:?}",
                st.available.to_map(),
                need.to_map()
            ))
        })?;
        st.bundles.insert(
            pg.to_owned(),
            Bundles {
                reserved: need,
                provided,
                committed: false,
            },
        );
        Ok(())
    }

    /// Phase two: the group resources become usable by leases.
    pub(crate) fn commit_bundles(&self, pg: &str) -> Result<(), Status> {
        let mut st = self.lock();
        let State {
            bundles,
            total,
            available,
            ..
        } = &mut *st;
        let b = bundles.get_mut(pg).ok_or_else(|| {
            Status::failed_precondition(format!(
                "placement group {pg} has no prepared bundles here"
            ))
        })?;
        if !b.committed {
            b.committed = true;
            total.add(&b.provided);
            available.add(&b.provided);
        }
        drop(st);
        self.freed.notify_waiters();
        Ok(())
    }

    /// Releases the group's bundles: their resources go back to the pool and their group
    /// resources disappear (leases still holding some give back only what still exists).
    pub(crate) fn cancel_bundles(&self, pg: &str) -> bool {
        let mut st = self.lock();
        let Some(b) = st.bundles.remove(pg) else {
            return false;
        };
        if b.committed {
            let names: Vec<String> = b.provided.iter().map(|(k, _)| k.to_owned()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            st.total = st.total.without(&names);
            st.available = st.available.without(&names);
        }
        st.available.add(&b.reserved);
        drop(st);
        self.freed.notify_waiters();
        true
    }

    /// Queued and infeasible shapes for the next heartbeat.
    pub(crate) fn demand(&self) -> Vec<pb::ResourceDemand> {
        let mut st = self.lock();
        let now = Instant::now();
        st.infeasible
            .retain(|_, (_, at)| now.duration_since(*at) < INFEASIBLE_MEMORY);
        let mut out: BTreeMap<ResourceSet, (u32, u32)> = BTreeMap::new();
        for ((k, _), (waiting, backlog)) in &st.queued {
            let e = &mut out.entry(k.clone()).or_default().0;
            *e = e.saturating_add((*waiting).max(*backlog));
        }
        for ((k, _), (n, _)) in &st.infeasible {
            let e = &mut out.entry(k.clone()).or_default().1;
            *e = e.saturating_add(*n);
        }
        out.into_iter()
            .filter(|(_, (q, i))| q + i > 0)
            .map(|(k, (queued, infeasible))| pb::ResourceDemand {
                shape: shape_map(&k),
                queued,
                infeasible,
                kind: "task".into(),
            })
            .collect()
    }

    fn try_grant(&self, st: &mut State, demand: &ResourceSet) -> Option<String> {
        if st.draining {
            return None;
        }
        st.available.subtract(demand).ok()?;
        st.next_lease += 1;
        let id = format!("{}-{}", self.node_id, st.next_lease);
        st.leases.insert(id.clone(), demand.clone());
        Some(id)
    }

    fn granted(&self, lease_id: String) -> pb::LeaseReply {
        pb::LeaseReply {
            outcome: pb::LeaseOutcome::Granted as i32,
            lease_id,
            node_id: self.node_id.to_string(),
            ..Default::default()
        }
    }

    /// Answers a lease request. `view` is the leader's last resource view.
    pub(crate) async fn request(
        &self,
        r: pb::LeaseRequest,
        view: &[pb::NodeResources],
    ) -> Result<pb::LeaseReply, Status> {
        let demand = ResourceSet::from_map(r.resources.iter().map(|(k, v)| (k.as_str(), *v)))
            .map_err(|e| invalid(e.to_string()))?;
        let strategy = match pb::SchedulingStrategy::try_from(r.strategy) {
            Ok(pb::SchedulingStrategy::Hybrid) => SchedulingStrategy::Hybrid,
            Ok(pb::SchedulingStrategy::Spread) => SchedulingStrategy::Spread,
            Ok(pb::SchedulingStrategy::NodeAffinity) => SchedulingStrategy::NodeAffinity {
                node: r
                    .affinity_node_id
                    .parse()
                    .map_err(|e: protocol::ids::IdError| invalid(e.to_string()))?,
                soft: r.affinity_soft,
            },
            Err(_) => {
                return Err(invalid(format!(
                    "unknown scheduling strategy {}",
                    r.strategy
                )));
            }
        };
        let mut addresses = HashMap::new();
        let mut cluster = ClusterView::default();
        for n in view {
            let Ok(id) = n.node_id.parse::<NodeId>() else {
                continue;
            };
            let set = |m: &std::collections::HashMap<String, f64>| {
                ResourceSet::from_map(m.iter().map(|(k, v)| (k.as_str(), *v))).unwrap_or_default()
            };
            addresses.insert(id, n.address.clone());
            cluster.nodes.insert(
                id,
                NodeView {
                    total: set(&n.total),
                    available: set(&n.available),
                    alive: true,
                },
            );
        }
        let decision = {
            let mut st = self.lock();
            // This node knows itself exactly; the view may lag. A draining node is leaving.
            cluster.nodes.insert(
                self.node_id,
                NodeView {
                    total: st.total.clone(),
                    available: st.available.clone(),
                    alive: !st.draining,
                },
            );
            if st.draining {
                let elsewhere = cluster
                    .nodes
                    .iter()
                    .filter(|(id, n)| **id != self.node_id && n.total.contains(&demand))
                    .min_by(|a, b| {
                        let util = |n: &NodeView| n.total.utilization(&n.available, &demand);
                        util(a.1).total_cmp(&util(b.1)).then(a.0.cmp(b.0))
                    })
                    .map(|(id, _)| *id);
                return match elsewhere {
                    Some(node) => Ok(pb::LeaseReply {
                        outcome: pb::LeaseOutcome::Spillback as i32,
                        node_id: node.to_string(),
                        address: addresses.get(&node).cloned().unwrap_or_default(),
                        ..Default::default()
                    }),
                    None => Err(Status::unavailable(
                        "this node is draining and no other node can take the lease yet",
                    )),
                };
            }
            let d = if r.spillback_count >= MAX_SPILLBACKS {
                // Enough hops: keep it here if this node can ever run it.
                if st.total.contains(&demand) {
                    Decision::Local
                } else {
                    Decision::Infeasible
                }
            } else {
                let State {
                    spread_cursor, rng, ..
                } = &mut *st;
                let spread = matches!(strategy, SchedulingStrategy::Spread);
                let mut pick = |n: usize| {
                    if spread {
                        *spread_cursor = spread_cursor.wrapping_add(1);
                        *spread_cursor % n
                    } else {
                        *rng ^= *rng << 13;
                        *rng ^= *rng >> 7;
                        *rng ^= *rng << 17;
                        (*rng % n as u64) as usize
                    }
                };
                scheduler::decide(
                    &cluster,
                    self.node_id,
                    &demand,
                    &strategy,
                    PolicyConfig::default(),
                    &mut pick,
                )
            };
            match d {
                Decision::Local => match self.try_grant(&mut st, &demand) {
                    Some(id) => {
                        st.infeasible
                            .remove(&(demand.clone(), r.owner_prefix.clone()));
                        return Ok(self.granted(id));
                    }
                    None => Decision::Queue,
                },
                Decision::Infeasible => {
                    st.infeasible.insert(
                        (demand.clone(), r.owner_prefix.clone()),
                        (r.backlog.clamp(1, 1_000_000), Instant::now()),
                    );
                    d
                }
                Decision::Spillback(_) => {
                    // It has a better place now: it no longer waits here as infeasible.
                    st.infeasible
                        .remove(&(demand.clone(), r.owner_prefix.clone()));
                    d
                }
                other => other,
            }
        };
        match decision {
            Decision::Spillback(node) => Ok(pb::LeaseReply {
                outcome: pb::LeaseOutcome::Spillback as i32,
                node_id: node.to_string(),
                address: addresses.get(&node).cloned().unwrap_or_default(),
                ..Default::default()
            }),
            Decision::Infeasible => Ok(pb::LeaseReply {
                outcome: pb::LeaseOutcome::Infeasible as i32,
                message: format!("no live node has {:?} in total", demand.to_map()),
                ..Default::default()
            }),
            Decision::Queue | Decision::Local => {
                self.wait(
                    demand,
                    Duration::from_millis(r.queue_timeout_ms),
                    (r.owner_prefix.clone(), r.backlog),
                )
                .await
            }
        }
    }

    /// A lease on this node only (an actor placed here by the actor manager): granted now,
    /// or after waiting in this node's queue up to `timeout`.
    pub(crate) async fn request_here(
        &self,
        resources: &std::collections::HashMap<String, f64>,
        timeout: Duration,
    ) -> Result<String, Status> {
        let demand = ResourceSet::from_map(resources.iter().map(|(k, v)| (k.as_str(), *v)))
            .map_err(|e| invalid(e.to_string()))?;
        if !self.lock().total.contains(&demand) {
            return Err(Status::failed_precondition(format!(
                "this node does not have {:?} in total",
                demand.to_map()
            )));
        }
        if let Some(id) = self.try_grant(&mut self.lock(), &demand) {
            return Ok(id);
        }
        let r = self.wait(demand, timeout, (Vec::new(), 1)).await?;
        if r.outcome == pb::LeaseOutcome::Granted as i32 {
            Ok(r.lease_id)
        } else {
            Err(Status::resource_exhausted(format!(
                "the actor's resources did not free up here within {timeout:?}"
            )))
        }
    }

    /// Waits in this node's queue until the demand fits or `timeout` passes.
    /// `owner` is (the owner's prefix, its backlog of tasks of this shape), for the demand.
    async fn wait(
        &self,
        demand: ResourceSet,
        timeout: Duration,
        owner: (Vec<u8>, u32),
    ) -> Result<pb::LeaseReply, Status> {
        let key = (demand.clone(), owner.0);
        {
            let mut st = self.lock();
            let e = st.queued.entry(key.clone()).or_default();
            e.0 += 1;
            e.1 = owner.1.min(1_000_000);
        }
        // Counted as queued until this ends, however it ends (a caller may give up).
        let _queued = Queued { leases: self, key };
        let deadline = tokio::time::Instant::now() + timeout;
        let result = loop {
            let freed = self.freed.notified();
            if let Some(id) = self.try_grant(&mut self.lock(), &demand) {
                break self.granted(id);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                break pb::LeaseReply {
                    outcome: pb::LeaseOutcome::TimedOut as i32,
                    message: format!(
                        "{:?} did not free up on this node within {timeout:?}",
                        demand.to_map()
                    ),
                    ..Default::default()
                };
            }
        };
        Ok(result)
    }

    /// Frees a lease's resources; false if it is unknown (already returned).
    pub(crate) fn give_back(&self, lease_id: &str) -> bool {
        let mut st = self.lock();
        let Some(mut r) = st.leases.remove(lease_id) else {
            return false;
        };
        if st.lent.remove(lease_id) {
            // Its CPU is already back in the pool.
            r.subtract_allowing_debt(&r.only(&["CPU"]));
        }
        // Group resources of a bundle cancelled meanwhile are gone.
        let names: Vec<String> = r
            .iter()
            .map(|(k, _)| k.to_owned())
            .filter(|k| st.total.get(k) > 0.0)
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let r = r.only(&names);
        st.available.add(&r);
        drop(st);
        self.freed.notify_waiters();
        true
    }

    /// The lease's task is blocked waiting for an object: its CPU goes back to the pool.
    pub(crate) fn lend(&self, lease_id: &str) {
        let mut st = self.lock();
        let Some(cpu) = st.leases.get(lease_id).map(|r| r.only(&["CPU"])) else {
            return;
        };
        if cpu.is_empty() || !st.lent.insert(lease_id.to_owned()) {
            return;
        }
        st.available.add(&cpu);
        drop(st);
        self.freed.notify_waiters();
    }

    /// The task runs again: it takes its CPU back, even if that leaves the pool in debt
    /// until another lease ends.
    pub(crate) fn reclaim(&self, lease_id: &str) {
        let mut st = self.lock();
        if !st.lent.remove(lease_id) {
            return;
        }
        if let Some(cpu) = st.leases.get(lease_id).map(|r| r.only(&["CPU"])) {
            st.available.subtract_allowing_debt(&cpu);
        }
    }
}

/// Gives a granted lease back when dropped, unless disarmed: a lease request whose caller
/// goes away while the node is still giving the lease a worker (fetching the binary,
/// starting a process) must not keep the lease's resources forever.
pub(crate) struct GrantGuard<'a> {
    leases: &'a Leases,
    lease_id: Option<String>,
}

impl<'a> GrantGuard<'a> {
    pub(crate) fn new(leases: &'a Leases, lease_id: &str) -> Self {
        Self {
            leases,
            lease_id: Some(lease_id.to_owned()),
        }
    }

    /// The lease is in its holder's hands now.
    pub(crate) fn disarm(mut self) {
        self.lease_id = None;
    }
}

impl Drop for GrantGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.lease_id.take() {
            self.leases.give_back(&id);
        }
    }
}

struct Queued<'a> {
    leases: &'a Leases,
    key: OwnerShape,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut st = self.leases.lock();
        if let Some(n) = st.queued.get_mut(&self.key) {
            n.0 -= 1;
            if n.0 == 0 {
                st.queued.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(n: f64) -> ResourceSet {
        ResourceSet::from_map([("CPU", n), ("mem", 2.0)]).unwrap()
    }

    #[tokio::test]
    async fn bundles_reserve_then_provide_group_resources_and_give_everything_back() {
        let cpus = |n: f64| ResourceSet::from_map([("CPU", n)]).unwrap();
        let l = Leases::new(NodeId::from_bytes([1; 16]), cpus(4.0));
        let b = vec![(0, cpus(1.0)), (1, cpus(2.0))];
        // Too big: nothing reserved.
        assert!(l.prepare_bundles("g", &[(0, cpus(5.0))]).is_err());
        assert_eq!(l.available(), cpus(4.0));
        l.prepare_bundles("g", &b).unwrap();
        l.prepare_bundles("g", &b).unwrap();
        assert_eq!(l.available().get("CPU"), 1.0, "reserved once");
        assert_eq!(
            l.available().get("CPU_group_0_g"),
            0.0,
            "not usable before commit"
        );
        l.commit_bundles("g").unwrap();
        assert_eq!(l.total().get("CPU_group_1_g"), 2.0);
        assert_eq!(l.total().get("CPU_group_g"), 3.0);
        // A lease in bundle 1, then the group goes away before the lease ends.
        let demand: std::collections::HashMap<String, f64> =
            [("CPU_group_1_g".to_string(), 2.0)].into_iter().collect();
        let lease = l
            .request_here(&demand, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(l.available().get("CPU_group_1_g"), 0.0);
        assert!(l.cancel_bundles("g"));
        assert!(!l.cancel_bundles("g"));
        assert!(l.give_back(&lease));
        assert_eq!(
            l.available(),
            cpus(4.0),
            "the lease gave back no group resource that no longer exists"
        );
        assert_eq!(l.total(), cpus(4.0));
    }

    #[tokio::test]
    async fn a_grant_whose_caller_went_away_is_given_back() {
        let l = Leases::new(NodeId::from_bytes([1; 16]), cpu(2.0));
        let one: std::collections::HashMap<String, f64> =
            [("CPU".to_string(), 1.0)].into_iter().collect();
        let a = l.request_here(&one, Duration::from_secs(1)).await.unwrap();
        // Dropped while the worker was being found (the request was cancelled): back.
        drop(GrantGuard::new(&l, &a));
        assert_eq!(l.available().get("CPU"), 2.0);
        let b = l.request_here(&one, Duration::from_secs(1)).await.unwrap();
        GrantGuard::new(&l, &b).disarm();
        assert_eq!(
            l.available().get("CPU"),
            1.0,
            "a handed-over lease stays out"
        );
        assert!(l.give_back(&b));
        assert!(!l.give_back(&a), "given back once");
    }

    #[test]
    fn a_lent_cpu_is_counted_once_whatever_the_order() {
        let l = Leases::new(NodeId::from_bytes([1; 16]), cpu(1.0));
        let mut st = l.lock();
        let a = l.try_grant(&mut st, &cpu(1.0)).unwrap();
        assert!(l.try_grant(&mut st, &cpu(1.0)).is_none());
        drop(st);
        l.lend(&a);
        l.lend(&a);
        // The CPU is free again, the rest of the lease is not.
        assert_eq!(l.available().get("CPU"), 1.0);
        assert_eq!(l.available().get("mem"), 0.0);
        let b = l
            .try_grant(
                &mut l.lock(),
                &ResourceSet::from_map([("CPU", 1.0)]).unwrap(),
            )
            .unwrap();
        // The blocked task resumes: the pool is in debt until the other lease ends.
        l.reclaim(&a);
        l.reclaim(&a);
        assert_eq!(l.available().get("CPU"), -1.0);
        assert!(l.give_back(&b));
        assert_eq!(l.available().get("CPU"), 0.0);
        // Ended while lent: only what was not lent comes back.
        l.lend(&a);
        assert!(l.give_back(&a));
        assert_eq!(l.available(), cpu(1.0));
        assert!(!l.give_back(&a));
    }
}
