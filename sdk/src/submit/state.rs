//! What the submitter's engine holds: the shape tasks share leases by (`Key`), leases and
//! lease requests, per-key queues and connections, and per-actor queues and connections.
//! Data only; how it changes is in `tasks`, `leases`, `actors` and `cancel`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{ActorId, LeaseId, NodeId, ObjectId, WorkerId, pb};
use scheduler::ResourceSet;

use super::Task;
use crate::Strategy;
use crate::actor::ActorRef;

/// Tasks with the same key can share leases. Keys are looked up for every task, so the
/// hash is computed once and equal keys are usually the same `Arc` (the runtime reuses the
/// last key it built).
#[derive(Debug, Clone)]
pub(crate) struct Key {
    pub(super) shape: ResourceSet,
    pub(super) strategy: i32,
    pub(super) affinity: String,
    pub(super) soft: bool,
    hash: u64,
}

impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        std::ptr::eq(self, o)
            || (self.hash == o.hash
                && self.shape == o.shape
                && self.strategy == o.strategy
                && self.affinity == o.affinity
                && self.soft == o.soft)
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

impl Key {
    /// The shape as a user wrote it: `{CPU: 1, unobtainium: 1}`.
    pub(crate) fn describe(&self) -> String {
        let parts: Vec<String> = self
            .shape
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        format!("{{{}}}", parts.join(", "))
    }

    pub(crate) fn new(shape: ResourceSet, s: &Strategy) -> Arc<Self> {
        let (strategy, affinity, soft) = match s {
            // Bundle resources exist only on the bundles' nodes: the hybrid policy finds them.
            Strategy::Default | Strategy::PlacementGroup { .. } => {
                (pb::SchedulingStrategy::Hybrid as i32, String::new(), false)
            }
            Strategy::Spread => (pb::SchedulingStrategy::Spread as i32, String::new(), false),
            Strategy::NodeAffinity { node, soft } => (
                pb::SchedulingStrategy::NodeAffinity as i32,
                node.to_string(),
                *soft,
            ),
        };
        use std::hash::BuildHasher;
        let hash =
            foldhash::quality::FixedState::default().hash_one((&shape, strategy, &affinity, soft));
        Arc::new(Self {
            shape,
            strategy,
            affinity,
            soft,
            hash,
        })
    }

    /// Tasks in flight per lease: one for SPREAD (each task its own lease), else
    /// `PIPELINE`.
    pub(super) fn depth(&self) -> usize {
        if self.strategy == pb::SchedulingStrategy::Spread as i32 {
            1
        } else {
            super::PIPELINE
        }
    }
}

/// A granted lease: a worker this process may push tasks of one key to.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub(super) lease_id: LeaseId,
    pub(super) node_id: NodeId,
    /// Shared with every location that names it (no copy per task).
    pub(super) node_address: Arc<str>,
    pub(super) worker_id: WorkerId,
    pub(super) worker_address: String,
}

/// One lease request on its way.
#[derive(Debug)]
pub(crate) struct LeaseReq {
    pub(super) key: Arc<Key>,
    /// The node asked now.
    pub(super) addr: String,
    pub(super) hops: u32,
    /// Consecutive failed RPCs.
    pub(super) failures: u32,
    pub(super) backoff: Duration,
}

/// A stream to a leased worker.
pub(crate) struct Conn {
    pub(super) key: Arc<Key>,
    pub(super) lease: Lease,
    pub(super) in_flight: HashMap<ObjectId, Task>,
    /// Since when nothing is in flight.
    pub(super) idle_since: Option<Instant>,
}

/// One scheduling key's tasks, leases and lease requests.
#[derive(Default)]
pub(crate) struct KeyState {
    pub(super) queue: VecDeque<Task>,
    pub(super) conns: Vec<u64>,
    pub(super) requests: Vec<u64>,
}

/// Calls to one actor from this process.
pub(crate) struct ActorQueue {
    pub(super) actor: Arc<ActorRef>,
    /// Not yet sent, in submission order.
    pub(super) queue: VecDeque<Task>,
    pub(super) conn: Option<u64>,
    pub(super) resolving: bool,
    pub(super) waiting_args: bool,
    /// Connect only to this incarnation or a later one.
    pub(super) min_restarts: u64,
    pub(super) dead: Option<String>,
    /// In flight when the worker died and not retried: failed once the actor's fate is known.
    pub(super) orphans: Vec<Task>,
    /// No handle keeps the actor alive any more: it is killed when no call is left.
    pub(super) out_of_scope: bool,
}

/// A stream to an actor's worker.
pub(crate) struct ActorConn {
    pub(super) actor_id: ActorId,
    pub(super) in_flight: HashMap<ObjectId, Task>,
    pub(super) restarts: u64,
    pub(super) node_id: NodeId,
    pub(super) worker_id: WorkerId,
}
