//! What a program can ask about the cluster and about itself: Ray's `ray.nodes()`,
//! `ray.cluster_resources()`, `ray.available_resources()` and `ray.get_runtime_context()`.

use std::collections::BTreeMap;

use protocol::{NodeId, ObjectId, pb};

use crate::{Error, runtime};

/// A node of the cluster, as the control plane has it (an entry of Ray's `ray.nodes()`).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub node_id: NodeId,
    /// Its node manager (host:port).
    pub address: String,
    pub alive: bool,
    pub is_head: bool,
    /// What it has in all.
    pub resources: BTreeMap<String, f64>,
    /// What is free, as of its last heartbeat (about a second old).
    pub available: BTreeMap<String, f64>,
    pub labels: BTreeMap<String, String>,
    /// Why it died (empty while alive).
    pub death_reason: String,
}

/// Where the calling code runs (Ray's runtime context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The job this process belongs to (empty for a driver not started as a job).
    pub job_id: String,
    /// The node this process leases from (in remote mode, the node it talks to).
    pub node_id: String,
    /// The worker's id; empty in a driver.
    pub worker_id: String,
    /// Whether this process is a worker (started by a node to run tasks or an actor).
    pub is_worker: bool,
    /// The task or actor call running on this thread, if any.
    pub task_id: Option<ObjectId>,
    /// Its attempt: 0 the first time, then one more per retry.
    pub attempt: u32,
    /// The actor this worker hosts, if any.
    pub actor_id: Option<String>,
}

/// Where the calling code runs.
pub fn context() -> Result<Context, Error> {
    let rt = runtime::current()?;
    let (task_id, attempt) = crate::calls::current().map_or((None, 0), |(id, a)| (Some(id), a));
    Ok(Context {
        job_id: rt.job().to_owned(),
        node_id: rt.node.node_id.clone(),
        worker_id: rt.worker().to_owned(),
        is_worker: rt.mode == runtime::Mode::Worker,
        task_id,
        attempt,
        actor_id: rt.actor.get().map(|a| a.actor_id().to_owned()),
    })
}

/// Every node the control plane knows, alive and dead (Ray's `ray.nodes()`).
pub fn nodes() -> Result<Vec<Node>, Error> {
    let rt = runtime::current()?;
    let status = rt
        .block_on(rt.head()?.call(|mut c| async move {
            c.get_cluster_status(pb::GetClusterStatusRequest {}).await
        }))
        .map_err(Error::Rpc)?;
    status.nodes.into_iter().map(node).collect()
}

fn node(n: pb::NodeInfo) -> Result<Node, Error> {
    let node_id = n
        .node_id
        .parse()
        .map_err(|e: protocol::ids::IdError| Error::Internal(format!("a node id: {e}")))?;
    Ok(Node {
        node_id,
        alive: n.state == pb::NodeState::Alive as i32,
        is_head: n.is_head,
        resources: n.resources_total.into_iter().collect(),
        available: n.resources_available.into_iter().collect(),
        labels: n.labels.into_iter().collect(),
        address: n.address,
        death_reason: n.death_reason,
    })
}

/// What the live nodes have in all, summed (Ray's `ray.cluster_resources()`).
pub fn cluster_resources() -> Result<BTreeMap<String, f64>, Error> {
    Ok(sum(nodes()?
        .iter()
        .filter(|n| n.alive)
        .map(|n| &n.resources)))
}

/// What is free on the live nodes, summed, as of their last heartbeats (Ray's
/// `ray.available_resources()`).
pub fn available_resources() -> Result<BTreeMap<String, f64>, Error> {
    Ok(sum(nodes()?
        .iter()
        .filter(|n| n.alive)
        .map(|n| &n.available)))
}

/// Sums resource maps in the scheduler's fixed point (so fractions add up exactly); a
/// resource that sums to zero is left out.
fn sum<'a>(maps: impl Iterator<Item = &'a BTreeMap<String, f64>>) -> BTreeMap<String, f64> {
    let mut total = scheduler::ResourceSet::new();
    for m in maps {
        // Amounts a node reported are valid; one that is not is skipped, not fatal.
        if let Ok(s) = scheduler::ResourceSet::from_map(m.iter().map(|(k, v)| (k.as_str(), *v))) {
            total.add(&s);
        }
    }
    total.to_map()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_sum_exactly() {
        let a = BTreeMap::from([("CPU".to_string(), 0.1), ("GPU".to_string(), 1.0)]);
        let b = BTreeMap::from([("CPU".to_string(), 0.2)]);
        let s = sum([&a, &b].into_iter());
        assert_eq!(s.get("CPU"), Some(&0.3), "0.1 + 0.2 in fixed point");
        assert_eq!(s.get("GPU"), Some(&1.0));
    }
}
