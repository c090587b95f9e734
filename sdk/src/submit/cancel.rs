//! Cancelling tasks (`sdk::cancel`, Ray's `ray.cancel`). Where the task is decides what
//! happens:
//! - waiting for its arguments or queued for a lease: it fails with CANCELLED at once and
//!   never runs;
//! - sent to a worker: the worker is told (`Effect::CancelRemote`); a task it has not
//!   started is answered CANCELLED, a running one sees `sdk::is_cancelled()`, and with
//!   `force` its worker exits; if the stream then breaks the task fails with CANCELLED
//!   instead of being retried. `recursive` makes that worker cancel what the task
//!   submitted (`Event::CancelChildren` there);
//! - an actor call not yet sent is dropped and fails; one sent is told, never forced;
//! - finished or unknown: nothing.

use std::sync::atomic::Ordering;

use protocol::ObjectId;

use super::engine::{Effect, Engine, task_error};
use super::{CancelOptions, Task};
use crate::TaskErrorKind;

const WHY: &str = "cancelled by its caller (sdk::cancel)";

impl Engine {
    pub(super) fn cancel(&mut self, id: ObjectId, opts: CancelOptions) {
        // Waiting for its arguments: fail it now (its wait's end finds nothing).
        if let Some(w) = self.waiting.remove(&id) {
            self.stats.pending_args.fetch_sub(1, Ordering::Relaxed);
            self.finish_failed(&w, cancelled(&w));
            return;
        }
        // Queued for a lease.
        let queued = self
            .keys
            .iter_mut()
            .find_map(|(k, ks)| Some((k.clone(), take(&mut ks.queue, id)?)));
        if let Some((key, t)) = queued {
            self.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
            self.finish_failed(&t, cancelled(&t));
            self.dirty.push(key);
            return;
        }
        // At a worker.
        if let Some(conn) = self
            .conns
            .iter()
            .find_map(|(c, conn)| conn.in_flight.contains_key(&id).then_some(*c))
        {
            self.cancelling.insert(id);
            self.out.push(Effect::CancelRemote {
                conn,
                task_id: id,
                force: opts.force,
                recursive: opts.recursive,
            });
            return;
        }
        // A call to an actor, not yet sent.
        let queued = self
            .actors
            .iter_mut()
            .find_map(|(a, q)| Some((*a, take(&mut q.queue, id)?)));
        if let Some((actor, t)) = queued {
            self.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
            self.finish_failed(&t, cancelled(&t));
            self.dirty_actors.push(actor);
            return;
        }
        // A call to an actor, sent: the call is told, the actor's worker is never killed.
        if let Some(conn) = self
            .actor_conns
            .iter()
            .find_map(|(c, conn)| conn.in_flight.contains_key(&id).then_some(*c))
        {
            self.out.push(Effect::CancelRemote {
                conn,
                task_id: id,
                force: false,
                recursive: opts.recursive,
            });
        }
    }

    /// The task `parent` (running here) was cancelled with `recursive`: so is everything it
    /// submitted, and what those submitted.
    pub(super) fn cancel_children(&mut self, parent: ObjectId, force: bool) {
        let mut ids: Vec<ObjectId> = self
            .waiting
            .values()
            .chain(self.keys.values().flat_map(|k| k.queue.iter()))
            .chain(self.conns.values().flat_map(|c| c.in_flight.values()))
            .chain(self.actors.values().flat_map(|q| q.queue.iter()))
            .chain(self.actor_conns.values().flat_map(|c| c.in_flight.values()))
            .filter(|t| t.parent == Some(parent))
            .map(|t| t.id)
            .collect();
        ids.sort();
        for id in ids {
            self.cancel(
                id,
                CancelOptions {
                    force,
                    recursive: true,
                },
            );
        }
    }
}

/// Takes task `id` out of `queue`.
fn take(queue: &mut std::collections::VecDeque<Task>, id: ObjectId) -> Option<Task> {
    let i = queue.iter().position(|t| t.id == id)?;
    queue.remove(i)
}

fn cancelled(t: &Task) -> crate::TaskError {
    task_error(t, TaskErrorKind::Cancelled, WHY.into(), "", "")
}

/// The error a cancelled task fails with, for a broken stream's task that was being
/// cancelled.
pub(super) fn cancelled_error(t: &Task, node: &str, worker: &str) -> crate::TaskError {
    task_error(t, TaskErrorKind::Cancelled, WHY.into(), node, worker)
}
