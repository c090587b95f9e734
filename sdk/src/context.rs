//! What a program can ask about the cluster and about itself: Ray's `ray.nodes()`,
//! `ray.cluster_resources()`, `ray.available_resources()` and `ray.get_runtime_context()`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::sync::{LazyLock, Mutex};

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

thread_local! {
    /// The call running on this thread (set by the worker around each call).
    static RUNNING: RefCell<Option<(ObjectId, u32)>> = const { RefCell::new(None) };
}

/// The calls running now on any thread of this worker, the running ones its callers
/// cancelled, and the not yet started ones they cancelled (answered already: skipped).
#[derive(Default)]
struct Calls {
    running: Vec<ObjectId>,
    cancelled: HashSet<ObjectId>,
    skip: HashSet<ObjectId>,
}

static CALLS: LazyLock<Mutex<Calls>> = LazyLock::new(Mutex::default);

/// Cancels of calls that never came (or had just ended) are forgotten past this many.
const MAX_CANCELLED: usize = 100_000;

fn calls() -> std::sync::MutexGuard<'static, Calls> {
    CALLS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Call `task_id` starts on this thread: marked running until the guard drops. `None`:
/// its caller cancelled it before it started (and was answered then), so it must not run.
pub(crate) fn start(task_id: ObjectId, attempt: u32) -> Option<RunningGuard> {
    {
        let mut c = calls();
        if !c.skip.is_empty() && c.skip.remove(&task_id) {
            return None;
        }
        c.running.push(task_id);
    }
    RUNNING.with(|r| *r.borrow_mut() = Some((task_id, attempt)));
    Some(RunningGuard(task_id))
}

pub(crate) struct RunningGuard(ObjectId);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.with(|r| *r.borrow_mut() = None);
        let mut c = calls();
        if let Some(i) = c.running.iter().position(|x| *x == self.0) {
            c.running.swap_remove(i);
        }
        if !c.cancelled.is_empty() {
            c.cancelled.remove(&self.0);
        }
    }
}

/// The task running on this thread, if any (what tasks it submits are its children).
pub(crate) fn current_task() -> Option<ObjectId> {
    RUNNING.with(|r| r.borrow().map(|(id, _)| id))
}

/// A caller cancelled call `id`: if it runs, `is_cancelled` turns true for it and this
/// returns true; if not, it is skipped when it would start (the caller must be answered
/// now) and this returns false.
pub(crate) fn cancel_requested(id: ObjectId) -> bool {
    let mut c = calls();
    if c.running.contains(&id) {
        c.cancelled.insert(id);
        return true;
    }
    if c.skip.len() >= MAX_CANCELLED {
        c.skip.clear();
    }
    c.skip.insert(id);
    false
}

/// In a task or actor call: whether its caller cancelled it (`sdk::cancel`). A long task
/// should look now and then and return early; with `force` its worker is killed instead.
/// False outside a call.
pub fn is_cancelled() -> bool {
    current_task().is_some_and(|id| {
        let c = calls();
        !c.cancelled.is_empty() && c.cancelled.contains(&id)
    })
}

/// Where the calling code runs.
pub fn context() -> Result<Context, Error> {
    let rt = runtime::current()?;
    let (task_id, attempt) = RUNNING
        .with(|r| *r.borrow())
        .map_or((None, 0), |(id, a)| (Some(id), a));
    Ok(Context {
        job_id: rt.job_id.clone(),
        node_id: rt.node.node_id.clone(),
        worker_id: rt.worker_id.clone(),
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
    fn resources_sum_exactly_and_the_running_call_is_per_thread() {
        let a = BTreeMap::from([("CPU".to_string(), 0.1), ("GPU".to_string(), 1.0)]);
        let b = BTreeMap::from([("CPU".to_string(), 0.2)]);
        let s = sum([&a, &b].into_iter());
        assert_eq!(s.get("CPU"), Some(&0.3), "0.1 + 0.2 in fixed point");
        assert_eq!(s.get("GPU"), Some(&1.0));
        let id = ObjectId::from_bytes([3; 20]);
        {
            let _g = start(id, 2).expect("not cancelled");
            assert_eq!(RUNNING.with(|r| *r.borrow()), Some((id, 2)));
            assert_eq!(current_task(), Some(id));
            assert!(!is_cancelled());
            assert!(cancel_requested(id), "running now");
            assert!(is_cancelled());
            std::thread::spawn(|| assert_eq!(RUNNING.with(|r| *r.borrow()), None))
                .join()
                .unwrap();
        }
        assert_eq!(
            RUNNING.with(|r| *r.borrow()),
            None,
            "cleared after the call"
        );
        assert!(!is_cancelled());
        // A cancel that comes before the call starts: it never starts, once.
        let next = ObjectId::from_bytes([4; 20]);
        assert!(!cancel_requested(next), "not running");
        assert!(start(next, 0).is_none());
        assert!(
            start(next, 0).is_some(),
            "a later call of the same id is not skipped"
        );
    }
}
