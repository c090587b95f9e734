//! Normal tasks: they wait for their `ObjectRef` arguments (PENDING_ARGS_AVAIL), queue per
//! scheduling key until a lease has room (PENDING_NODE_ASSIGNMENT), and go to the leased
//! worker (SUBMITTED_TO_WORKER), up to `Key::depth` in flight per lease. A lease with
//! nothing to do is kept for `LINGER` (so sequential calls reuse it), then closed, which
//! returns it. A broken stream means the worker (or its node) died: its in-flight tasks
//! are retried while `attempt < max_retries`, else they fail with WORKER_DIED.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use protocol::pb::TaskState;
use protocol::{ObjectId, pb};

use super::engine::{At, Effect, Engine, Note, Waiting, task_error, value_state};
use super::state::{Conn, Key, Lease};
use super::{ArgOut, LINGER, MAX_PENDING_LEASES, Task};
use crate::TaskErrorKind;
use crate::owner::{Loc, Rebuild, State};

impl Engine {
    /// Queues the task once every `ObjectRef` argument is ready.
    pub(super) fn resolve_args(&mut self, t: Task) {
        let pending = self.pending_args(&t);
        if pending.is_empty() {
            self.args_ready(t);
        } else {
            self.note(&t, TaskState::PendingArgsAvail, At::default());
            self.out.push(Effect::WaitArgs {
                ids: pending,
                then: Waiting::Task(t.id),
            });
            self.waiting.insert(t.id, t);
        }
    }

    pub(super) fn args_ready(&mut self, t: Task) {
        self.stats.pending_args.fetch_sub(1, Ordering::Relaxed);
        self.stats.pending_node.fetch_add(1, Ordering::Relaxed);
        self.note(&t, TaskState::PendingNodeAssignment, At::default());
        self.dirty.push(t.key.clone());
        self.keys
            .entry(t.key.clone())
            .or_default()
            .queue
            .push_back(t);
    }

    /// Sends queued tasks to the key's leases with room (the least loaded first) and asks
    /// for as many more leases as the rest need, up to `MAX_PENDING_LEASES` at a time.
    pub(super) fn dispatch(&mut self, key: &Arc<Key>, _now: Instant) {
        let depth = key.depth();
        let Some(ks) = self.keys.get_mut(key) else {
            return;
        };
        let mut queue = std::mem::take(&mut ks.queue);
        let conns = ks.conns.clone();
        let mut out: Vec<(u64, Vec<pb::TaskSpec>)> = Vec::new();
        let mut failed = Vec::new();
        let log = self.log.clone();
        while !queue.is_empty() {
            let free = conns
                .iter()
                .filter(|c| self.conns[c].in_flight.len() < depth)
                .min_by_key(|c| self.conns[c].in_flight.len());
            let Some(&cid) = free else { break };
            let t = queue.pop_front().expect("not empty");
            self.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
            match self.spec(&t) {
                Ok(spec) => {
                    self.stats.submitted.fetch_add(1, Ordering::Relaxed);
                    let c = self.conns.get_mut(&cid).expect("listed conns exist");
                    c.idle_since = None;
                    let at = At {
                        node: Some(c.lease.node_id),
                        worker: Some(&c.lease.worker_id),
                        actor: None,
                    };
                    log(
                        &t.ev,
                        Note::of(&t, TaskState::SubmittedToWorker, at, self.now),
                    );
                    c.in_flight.insert(t.id, t);
                    match out.iter_mut().find(|(c, _)| *c == cid) {
                        Some((_, v)) => v.push(spec),
                        None => out.push((cid, vec![spec])),
                    }
                }
                Err(e) => failed.push((t, e)),
            }
        }
        for (t, e) in failed {
            self.finish_failed(&t, e);
        }
        for (conn, tasks) in out {
            self.out.push(Effect::Push { conn, tasks });
        }
        let ks = self.keys.get_mut(key).expect("taken above");
        ks.queue = queue;
        if ks.queue.is_empty() {
            // Nothing waits: abandon lease requests still queued at nodes.
            self.cancel_leases(key);
        } else {
            let want = ks.queue.len().div_ceil(depth).min(MAX_PENDING_LEASES);
            let have = ks.requests.len();
            for _ in have..want {
                self.request_lease(key);
            }
        }
    }

    pub(super) fn open(&mut self, key: Arc<Key>, lease: Lease, now: Instant) -> u64 {
        let id = self.next_id();
        self.out.push(Effect::Open {
            conn: id,
            address: lease.worker_address.clone(),
            first: pb::PushTasksRequest {
                lease_id: lease.lease_id.to_string(),
                ..Default::default()
            },
            direct: false,
        });
        self.conns.insert(
            id,
            Conn {
                key,
                lease,
                in_flight: HashMap::new(),
                idle_since: Some(now),
            },
        );
        id
    }

    pub(super) fn reply(&mut self, cid: u64, r: pb::TaskReply, now: Instant) {
        let Ok(id) = ObjectId::from_slice(&r.task_id) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&cid) else {
            return;
        };
        let Some(t) = c.in_flight.remove(&id) else {
            return;
        };
        if c.in_flight.is_empty() {
            c.idle_since = Some(now);
        }
        self.cancelling.remove(&id);
        self.dirty.push(c.key.clone());
        let (node_id, node_address, worker_id) = (
            c.lease.node_id,
            c.lease.node_address.clone(),
            c.lease.worker_id.clone(),
        );
        self.stats.submitted.fetch_sub(1, Ordering::Relaxed);
        match r.result {
            Some(pb::task_reply::Result::Value(v)) => {
                // Arguments the worker pulled now have a copy on its node too (known for
                // freeing; pulls use locations with an address).
                for a in &t.args {
                    if let ArgOut::Ref(h) = a
                        && let Some(State::Stored { locs, .. }) = self.owner.state(h.id)
                        && !locs.iter().any(|l| l.node_id == node_id.to_string())
                    {
                        self.owner.add_location(
                            h.id,
                            Loc {
                                node_id: node_id.to_string(),
                                om: String::new(),
                                nm: node_address.to_string(),
                            },
                        );
                    }
                }
                let state = value_state(&v).unwrap_or_else(|| {
                    State::Failed(Box::new(task_error(
                        &t,
                        TaskErrorKind::Store,
                        "the worker sent an empty value".into(),
                        &node_id.to_string(),
                        &worker_id,
                    )))
                });
                self.stats.finished.fetch_add(1, Ordering::Relaxed);
                self.note(&t, TaskState::Finished, At::default());
                for i in 1..t.num_returns {
                    let more = r.more_returns.get(usize::from(i) - 1);
                    let s = more.and_then(value_state).unwrap_or_else(|| {
                        State::Failed(Box::new(task_error(
                            &t,
                            TaskErrorKind::Store,
                            format!("the worker sent no return {i} of {}", t.num_returns),
                            &node_id.to_string(),
                            &worker_id,
                        )))
                    });
                    self.owner.complete(id.return_id(i), s);
                }
                self.owner.complete(id, state);
            }
            Some(pb::task_reply::Result::Error(e)) if e.kind() == pb::TaskErrorKind::ArgLost => {
                self.arg_lost(t, e)
            }
            // The function failed and the task asked for that to be retried too.
            Some(pb::task_reply::Result::Error(e))
                if e.kind() == pb::TaskErrorKind::Panic
                    && t.retry_exceptions
                    && !t.streaming
                    && t.attempt < t.max_retries =>
            {
                tracing::info!(task = %t.id, attempt = t.attempt + 1, "retrying a task whose function failed: {}", e.message);
                let mut t = t;
                t.attempt += 1;
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.stats.pending_node.fetch_add(1, Ordering::Relaxed);
                self.note(&t, TaskState::PendingNodeAssignment, At::default());
                self.keys
                    .entry(t.key.clone())
                    .or_default()
                    .queue
                    .push_front(t);
            }
            Some(pb::task_reply::Result::Error(e)) => {
                let mut e: crate::TaskError = e.into();
                if e.function.is_empty() {
                    // A worker that answered without running it (a cancel) names no function.
                    e.function = t.function.into();
                }
                self.finish_failed(&t, e);
            }
            None => {
                let e = task_error(
                    &t,
                    TaskErrorKind::Store,
                    "the worker sent an empty reply".into(),
                    &node_id.to_string(),
                    &worker_id,
                );
                self.finish_failed(&t, e);
            }
        }
    }

    /// An argument's copies are gone (its node died): rebuild it from its lineage, then
    /// run this task again once it is back.
    fn arg_lost(&mut self, t: Task, e: pb::TaskError) {
        let lost = ObjectId::from_slice(&e.lost_object_id).ok();
        match lost.map(|l| (l, self.owner.rebuild(l, &e.message))) {
            Some((l, Rebuild::Run(lineage, n))) => {
                tracing::info!(object = %l, "rebuilding a lost argument (rebuild {n})");
                self.stats.reconstructions.fetch_add(1, Ordering::Relaxed);
                self.stats.pending_args.fetch_add(1, Ordering::Relaxed);
                self.resolve_args(lineage.task(l, n));
                self.stats.pending_args.fetch_add(1, Ordering::Relaxed);
                self.resolve_args(t);
            }
            Some((_, Rebuild::InProgress)) => {
                self.stats.pending_args.fetch_add(1, Ordering::Relaxed);
                self.resolve_args(t);
            }
            Some((l, Rebuild::Lost(why))) => {
                let err = task_error(
                    &t,
                    TaskErrorKind::ObjectLost,
                    format!("argument {l} is lost: {why}"),
                    &e.node_id,
                    &e.worker_id,
                );
                self.finish_failed(&t, err);
            }
            None => self.finish_failed(&t, e.into()),
        }
    }

    pub(super) fn broken(&mut self, cid: u64, why: String) {
        let Some(c) = self.conns.remove(&cid) else {
            return;
        };
        self.dirty.push(c.key.clone());
        if let Some(ks) = self.keys.get_mut(&c.key) {
            ks.conns.retain(|x| *x != cid);
        }
        if c.in_flight.is_empty() {
            return;
        }
        tracing::warn!(worker = %c.lease.worker_id, node = %c.lease.node_id, tasks = c.in_flight.len(), "lost the worker: {why}");
        let mut retry = Vec::new();
        for (_, mut t) in c.in_flight {
            self.stats.submitted.fetch_sub(1, Ordering::Relaxed);
            if self.cancelling.remove(&t.id) {
                // Its worker exited because it was cancelled with force (or died anyway).
                let e = super::cancel::cancelled_error(
                    &t,
                    &c.lease.node_id.to_string(),
                    &c.lease.worker_id,
                );
                self.finish_failed(&t, e);
            } else if t.attempt < t.max_retries && !t.streaming {
                t.attempt += 1;
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.stats.pending_node.fetch_add(1, Ordering::Relaxed);
                self.note(&t, TaskState::PendingNodeAssignment, At::default());
                retry.push(t);
            } else {
                let msg = format!(
                    "the worker died while running it ({why}); {} attempt(s) made, max_retries={}",
                    t.attempt + 1,
                    t.max_retries
                );
                let e = task_error(
                    &t,
                    TaskErrorKind::WorkerDied,
                    msg,
                    &c.lease.node_id.to_string(),
                    &c.lease.worker_id,
                );
                self.finish_failed(&t, e);
            }
        }
        retry.sort_by_key(|t| t.id);
        let ks = self.keys.entry(c.key.clone()).or_default();
        for t in retry.into_iter().rev() {
            ks.queue.push_front(t);
        }
    }

    /// Closes streams idle for `LINGER` whose key has nothing queued (the worker then
    /// returns the lease).
    pub(super) fn close_idle(&mut self, now: Instant) {
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.idle_since
                    .is_some_and(|t| now.duration_since(t) >= LINGER)
            })
            .filter(|(_, c)| self.keys.get(&c.key).is_none_or(|k| k.queue.is_empty()))
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(c) = self.conns.remove(&id)
                && let Some(ks) = self.keys.get_mut(&c.key)
            {
                ks.conns.retain(|x| *x != id);
            }
            self.out.push(Effect::Close(id));
        }
    }
}
