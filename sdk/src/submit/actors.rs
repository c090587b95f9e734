//! Calls to actors: one queue per actor, sent in this process's submission order on one
//! stream to the actor's worker. A call waits for its arguments and the calls behind it
//! wait with it. A broken stream retries what `max_task_retries` allows on the actor's
//! next incarnation; the rest fail once the actor's fate is known. An actor no handle keeps
//! alive is killed when no call to it is left.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use protocol::pb::TaskState;
use protocol::{ActorId, NodeId, ObjectId, WorkerId, pb};

use super::Task;
use super::engine::{At, Effect, Engine, Note, Waiting};
use super::state::{ActorConn, ActorQueue};
use crate::TaskErrorKind;
use crate::actor::ActorRef;

impl Engine {
    pub(super) fn actor_call(&mut self, actor: Arc<ActorRef>, t: Task) {
        let q = self.actors.entry(actor.id).or_insert_with(|| ActorQueue {
            actor: actor.clone(),
            queue: VecDeque::new(),
            conn: None,
            resolving: false,
            waiting_args: false,
            min_restarts: 0,
            dead: None,
            orphans: Vec::new(),
            out_of_scope: false,
        });
        q.queue.push_back(t);
        self.dirty_actors.push(actor.id);
    }

    pub(super) fn actor_args_ready(&mut self, id: ActorId) {
        if let Some(q) = self.actors.get_mut(&id) {
            q.waiting_args = false;
        }
        self.dirty_actors.push(id);
    }

    /// This process holds no handle to the actor any more: its queue (and the actor's scope
    /// ref in it) goes once no call is left.
    pub(super) fn actor_out_of_scope(&mut self, id: ActorId) {
        if let Some(q) = self.actors.get_mut(&id) {
            q.out_of_scope = true;
            self.end_if_out_of_scope(id);
        }
    }

    fn resolve(&mut self, id: ActorId) {
        let Some(q) = self.actors.get_mut(&id) else {
            return;
        };
        if !q.resolving {
            q.resolving = true;
            self.out.push(Effect::ResolveActor {
                actor: id,
                min_restarts: q.min_restarts,
            });
        }
    }

    /// Sends the actor's queued calls in order while their arguments are ready; connects
    /// first if needed. A dead actor fails them.
    pub(super) fn dispatch_actor(&mut self, id: ActorId) {
        let Some(q) = self.actors.get_mut(&id) else {
            return;
        };
        if let Some(why) = q.dead.clone() {
            let tasks: Vec<Task> = q.queue.drain(..).collect();
            let actor = q.actor.clone();
            for t in tasks {
                self.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
                self.fail_actor_task(
                    &actor,
                    &t,
                    TaskErrorKind::ActorDied,
                    format!("the actor is dead: {why}"),
                );
            }
            return;
        }
        let Some(cid) = q.conn else {
            if !q.queue.is_empty() {
                self.resolve(id);
            }
            return;
        };
        if q.waiting_args {
            return;
        }
        let mut queue = std::mem::take(&mut q.queue);
        let mut out = Vec::new();
        let mut wait_for = Vec::new();
        while let Some(t) = queue.front() {
            wait_for = self.pending_args(t);
            if !wait_for.is_empty() {
                // Later calls wait behind this one: the order is the caller's.
                break;
            }
            let t = queue.pop_front().expect("front exists");
            self.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
            match self.spec(&t) {
                Ok(spec) => {
                    self.stats.submitted.fetch_add(1, Ordering::Relaxed);
                    out.push(spec);
                    if let Some(c) = self.actor_conns.get_mut(&cid) {
                        let at = At {
                            node: Some(c.node_id),
                            worker: Some(&c.worker_id),
                            actor: Some(c.actor_id),
                        };
                        (self.log)(
                            &t.ev,
                            Note::of(&t, TaskState::SubmittedToWorker, at, self.now),
                        );
                        c.in_flight.insert(t.id, t);
                    }
                }
                Err(e) => self.finish_failed(&t, e),
            }
        }
        let q = self.actors.get_mut(&id).expect("looked up above");
        q.queue = queue;
        if !wait_for.is_empty() {
            q.waiting_args = true;
            self.out.push(Effect::WaitArgs {
                ids: wait_for,
                then: Waiting::Actor(id),
            });
        }
        if !out.is_empty() {
            self.out.push(Effect::Push {
                conn: cid,
                tasks: out,
            });
        }
    }

    /// Lets go of an actor this process holds no handle to once no call to it is left
    /// (queued, waiting for arguments, in flight, or failed and waiting for the actor's
    /// fate): its stream closes and its queue goes, and with it the queue's ref to the
    /// actor's scope (the creator kills the actor when no ref to it is left anywhere).
    pub(super) fn end_if_out_of_scope(&mut self, id: ActorId) {
        let Some(q) = self.actors.get(&id) else {
            return;
        };
        let in_flight = q
            .conn
            .and_then(|c| self.actor_conns.get(&c))
            .is_some_and(|c| !c.in_flight.is_empty());
        if !q.out_of_scope
            || in_flight
            || !q.queue.is_empty()
            || q.waiting_args
            || !q.orphans.is_empty()
        {
            return;
        }
        let Some(q) = self.actors.remove(&id) else {
            return;
        };
        if let Some(c) = q.conn {
            // Closing the stream is all the worker needs to hear from this caller.
            self.actor_conns.remove(&c);
            self.out.push(Effect::Close(c));
        }
        drop(q);
    }

    fn fail_actor_task(
        &mut self,
        actor: &ActorRef,
        t: &Task,
        kind: TaskErrorKind,
        message: String,
    ) {
        let mut e = crate::actor::actor_error(actor, kind, message);
        e.task_id = t.id.to_string();
        e.function = t.function.to_owned();
        self.finish_failed(t, e);
    }

    pub(super) fn actor_resolved(&mut self, id: ActorId, r: Result<pb::ActorInfo, String>) {
        self.dirty_actors.push(id);
        let Some(q) = self.actors.get_mut(&id) else {
            return;
        };
        q.resolving = false;
        let orphans = std::mem::take(&mut q.orphans);
        let actor = q.actor.clone();
        // Where it runs, as ids (an answer without them cannot be used).
        let r = r.and_then(|info| {
            let bad = |e: protocol::ids::IdError| format!("the control plane answered {e}");
            let node = info.node_id.parse::<NodeId>().map_err(bad)?;
            let worker = info.worker_id.parse::<WorkerId>().map_err(bad)?;
            Ok((info, node, worker))
        });
        match r {
            Err(why) => {
                q.dead = Some(why.clone());
                for t in orphans {
                    self.fail_actor_task(
                        &actor,
                        &t,
                        TaskErrorKind::ActorDied,
                        format!("the actor died while running this call: {why}"),
                    );
                }
            }
            Ok((info, node, worker)) => {
                q.min_restarts = info.num_restarts;
                for t in orphans {
                    let msg = format!(
                        "the actor's worker died while running this call; the actor restarted ({} restart(s) so far) but the call was not retried (max_task_retries={})",
                        info.num_restarts, actor.max_task_retries
                    );
                    self.fail_actor_task(&actor, &t, TaskErrorKind::ActorUnavailable, msg);
                }
                let cid = self.open_actor(id, &info, node, worker);
                if let Some(q) = self.actors.get_mut(&id) {
                    q.conn = Some(cid);
                }
            }
        }
    }

    fn open_actor(
        &mut self,
        id: ActorId,
        info: &pb::ActorInfo,
        node_id: NodeId,
        worker_id: WorkerId,
    ) -> u64 {
        let cid = self.next_id();
        self.out.push(Effect::Open {
            conn: cid,
            address: info.worker_address.clone(),
            first: pb::PushTasksRequest {
                actor_id: id.to_string(),
                actor_restarts: info.num_restarts,
                ..Default::default()
            },
            direct: true,
        });
        self.actor_conns.insert(
            cid,
            ActorConn {
                actor_id: id,
                in_flight: HashMap::new(),
                restarts: info.num_restarts,
                node_id,
                worker_id,
            },
        );
        cid
    }

    /// Books an actor's replies (the stream already completed their objects).
    pub(super) fn actor_replies(&mut self, cid: u64, replies: Vec<pb::TaskReply>) {
        for r in replies {
            let Ok(id) = ObjectId::from_slice(&r.task_id) else {
                continue;
            };
            let Some(c) = self.actor_conns.get_mut(&cid) else {
                return;
            };
            let Some(t) = c.in_flight.remove(&id) else {
                continue;
            };
            let actor = c.actor_id;
            self.stats.submitted.fetch_sub(1, Ordering::Relaxed);
            match &r.result {
                Some(pb::task_reply::Result::Value(_)) => {
                    self.stats.finished.fetch_add(1, Ordering::Relaxed);
                    self.note(
                        &t,
                        TaskState::Finished,
                        At {
                            actor: Some(actor),
                            ..At::default()
                        },
                    );
                }
                other => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    let error = match other {
                        Some(pb::task_reply::Result::Error(e)) => {
                            format!(
                                "{}: {}",
                                protocol::task_error_kind_name(e.kind()),
                                e.message
                            )
                        }
                        _ => "STORE: an empty reply".into(),
                    };
                    self.note_failed(&t, error, Some(actor));
                }
            }
        }
        if let Some(c) = self.actor_conns.get(&cid)
            && c.in_flight.is_empty()
        {
            let id = c.actor_id;
            self.end_if_out_of_scope(id);
        }
    }

    /// The stream to the actor broke (its worker or node died, or it restarted): retry what
    /// may be retried, in order, on the next incarnation.
    pub(super) fn actor_broken(&mut self, cid: u64, why: String) {
        let Some(c) = self.actor_conns.remove(&cid) else {
            return;
        };
        let Some(q) = self.actors.get_mut(&c.actor_id) else {
            return;
        };
        q.conn = None;
        q.min_restarts = q.min_restarts.max(c.restarts + 1);
        let mut tasks: Vec<Task> = c.in_flight.into_values().collect();
        if !tasks.is_empty() {
            tracing::warn!(
                actor = %c.actor_id,
                calls = tasks.len(),
                "lost the actor's worker: {why}"
            );
        }
        tasks.sort_by_key(|t| t.id);
        let retries = q.actor.max_task_retries;
        let log = self.log.clone();
        for mut t in tasks.into_iter().rev() {
            self.stats.submitted.fetch_sub(1, Ordering::Relaxed);
            if retries < 0 || i64::from(t.attempt) < retries {
                t.attempt += 1;
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.stats.pending_node.fetch_add(1, Ordering::Relaxed);
                let at = At {
                    actor: Some(c.actor_id),
                    ..At::default()
                };
                log(
                    &t.ev,
                    Note::of(&t, TaskState::PendingNodeAssignment, at, self.now),
                );
                q.queue.push_front(t);
            } else {
                q.orphans.push(t);
            }
        }
        let learn_fate = !q.orphans.is_empty();
        if learn_fate {
            // Learn the actor's fate even if nothing else waits for it.
            self.resolve(c.actor_id);
        }
        self.dirty_actors.push(c.actor_id);
    }
}
