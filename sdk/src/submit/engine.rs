//! The submitter's decisions, without IO (as openraft's `Engine`): every queue, lease,
//! stream and actor connection of this process changes only in `Engine::handle`, and what
//! must happen outside (a lease RPC, a push on a stream, a timer, a task event) comes out of
//! `Engine::flush` as an `Effect` for the executor (`exec`) to run. The owner table and the
//! counters are in-memory structures the core reads and completes directly.
//!
//! `handle` takes events as they come; `flush` then dispatches every queue they touched at
//! once, so pushes go out in batches.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protocol::pb::TaskState;
use protocol::{ActorId, NodeId, ObjectId, WorkerId, pb};

use super::state::{ActorConn, ActorQueue, Conn, Key, KeyState, LeaseReq};
use super::{ArgOut, Task};
use crate::actor::ActorRef;
use crate::owner::{Loc, Owner, State};
use crate::runtime::Stats;
use crate::{TaskError, TaskErrorKind};

/// What happened: fed to `Engine::handle`.
pub(crate) enum Event {
    /// A new task (or a lineage's re-run) from this process.
    Submit(Task),
    /// Every `ObjectRef` argument of the waiting task is ready.
    ArgsReady(ObjectId),
    /// The node at `addr` answered lease request `req` (or the RPC failed: why).
    LeaseReply {
        req: u64,
        key: Arc<Key>,
        addr: String,
        reply: Result<pb::LeaseReply, String>,
    },
    /// Lease request `req` asks again, from this process's node.
    LeaseRetry(u64),
    /// Results on connection `conn`.
    Replies(u64, Vec<pb::TaskReply>),
    /// Connection `conn` broke: its worker (or node) died, or the stream failed.
    Broken(u64, String),
    /// A call to an actor, in this process's submission order.
    ActorCall(Arc<ActorRef>, Box<Task>),
    /// The actor's worker to connect to, or why the actor is dead.
    ActorResolved(ActorId, Box<Result<pb::ActorInfo, String>>),
    /// The arguments of the actor's next call are ready.
    ActorArgsReady(ActorId),
    /// `sdk::cancel` on a task or actor call of this process.
    Cancel(ObjectId, super::CancelOptions),
    /// A task running here was cancelled with `recursive`: cancel what it submitted.
    CancelChildren { parent: ObjectId, force: bool },
    /// The last handle that kept the actor alive was dropped: kill it once the calls made
    /// from here have returned.
    ActorOutOfScope(ActorId),
    /// No process holds a handle to a counted actor this process created: kill it.
    ActorUnreferenced(ActorId),
    /// The caller consumed a streaming task's items below this index.
    StreamConsumed(ObjectId, u64),
}

/// What the executor must do.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Ask the node at `addr` for a lease; the answer comes back as `Event::LeaseReply`.
    RequestLease {
        req: u64,
        key: Arc<Key>,
        addr: String,
        request: pb::LeaseRequest,
    },
    /// Nothing waits for lease request `req` any more: abandon it.
    CancelLease(u64),
    /// Feed `event` back after `after`.
    Timer { after: Duration, event: TimerEvent },
    /// Feed `then` back once none of `ids` is pending.
    WaitArgs { ids: Vec<ObjectId>, then: Waiting },
    /// Tell the worker on `conn` how far the caller read a streaming task's items.
    StreamAck {
        conn: u64,
        task: ObjectId,
        next: u64,
    },
    /// Open a `PushTasks` stream to `address` starting with `first` (its `owner_node` is
    /// the executor's to fill); replies and the break come back for connection `conn`.
    /// `direct`: the stream completes results itself (an actor's, a hop sooner).
    Open {
        conn: u64,
        address: String,
        first: pb::PushTasksRequest,
        direct: bool,
    },
    /// Send these tasks on connection `conn`.
    Push { conn: u64, tasks: Vec<pb::TaskSpec> },
    /// Tell the worker on connection `conn` that task `task_id` is cancelled.
    CancelRemote {
        conn: u64,
        task_id: ObjectId,
        force: bool,
        recursive: bool,
    },
    /// Close connection `conn` (a lease's worker then returns it).
    Close(u64),
    /// Find where the actor runs (incarnation `min_restarts` or later), or that it is dead.
    ResolveActor { actor: ActorId, min_restarts: u64 },
    /// Kill the actor for good: no handle to it is left.
    KillActor(ActorId),
    /// Tell the user (at most once a minute per `key`).
    Warn { key: String, message: String },
}

/// The events a timer feeds back.
#[derive(Debug)]
pub(crate) enum TimerEvent {
    LeaseRetry(u64),
}

/// What waits for arguments: a task (in `Engine::waiting`) or an actor's next call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Waiting {
    Task(ObjectId),
    Actor(ActorId),
}

pub(crate) use crate::events::Note;

impl Note {
    /// Task `t` is in `state` since `time`, at `at`.
    pub(super) fn of(t: &Task, state: TaskState, at: At<'_>, time: Instant) -> Self {
        Self {
            time,
            id: t.id,
            function: t.function,
            state,
            node: at.node,
            worker: at.worker.cloned(),
            attempt: t.attempt,
            error: String::new(),
            actor: at.actor,
        }
    }
}

/// What every lease request of this process says besides its shape.
#[derive(Clone, Default)]
pub(crate) struct Identity {
    /// sha256 of the worker binary, and the node to fetch it from.
    pub(crate) binary: (String, String),
    pub(crate) job_id: String,
    pub(crate) prefix: Vec<u8>,
}

/// Where the engine records task events, at once and in order: a task's event is
/// recorded before its result is completed (a driver that exits right after `get` has
/// reported it).
pub(crate) type TaskLog = Arc<dyn Fn(&crate::events::Slot, Note) + Send + Sync>;

pub(crate) struct Engine {
    pub(super) owner: Arc<Owner>,
    pub(super) stats: Arc<Stats>,
    pub(super) log: TaskLog,
    /// This process's node: where lease requests start, and the copy of an argument
    /// assumed when none is known.
    pub(super) home: Loc,
    pub(super) identity: Identity,
    pub(super) keys: HashMap<Arc<Key>, KeyState>,
    pub(super) conns: HashMap<u64, Conn>,
    pub(super) leases: HashMap<u64, LeaseReq>,
    pub(super) actors: HashMap<ActorId, ActorQueue>,
    pub(super) actor_conns: HashMap<u64, ActorConn>,
    /// Tasks waiting for their arguments (`Effect::WaitArgs`).
    pub(super) waiting: HashMap<ObjectId, Task>,
    /// Tasks at a worker whose cancel was sent: if the stream breaks they fail with
    /// CANCELLED rather than being retried.
    pub(super) cancelling: HashSet<ObjectId>,
    next_id: u64,
    pub(super) dirty: Vec<Arc<Key>>,
    pub(super) dirty_actors: Vec<ActorId>,
    pub(super) out: Vec<Effect>,
    /// The time of the event being handled (or of the flush): task events' times, so
    /// recording one reads no clock.
    pub(super) now: Instant,
}

impl Engine {
    pub(crate) fn new(
        owner: Arc<Owner>,
        stats: Arc<Stats>,
        log: TaskLog,
        home: Loc,
        identity: Identity,
    ) -> Self {
        Self {
            owner,
            stats,
            log,
            home,
            identity,
            keys: HashMap::new(),
            conns: HashMap::new(),
            leases: HashMap::new(),
            actors: HashMap::new(),
            actor_conns: HashMap::new(),
            waiting: HashMap::new(),
            cancelling: HashSet::new(),
            next_id: 0,
            dirty: Vec::new(),
            dirty_actors: Vec::new(),
            out: Vec::new(),
            now: Instant::now(),
        }
    }

    /// A new id for a connection or a lease request.
    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn handle(&mut self, ev: Event, now: Instant) {
        self.now = now;
        match ev {
            Event::Submit(t) => self.resolve_args(t),
            Event::ArgsReady(id) => {
                if let Some(t) = self.waiting.remove(&id) {
                    self.args_ready(t);
                }
            }
            Event::LeaseReply {
                req,
                key,
                addr,
                reply,
            } => self.lease_reply(req, key, addr, reply, now),
            Event::LeaseRetry(req) => self.lease_retry(req),
            Event::Replies(conn, replies) if self.actor_conns.contains_key(&conn) => {
                self.actor_replies(conn, replies)
            }
            Event::Replies(conn, replies) => {
                for r in replies {
                    self.reply(conn, r, now);
                }
            }
            Event::Broken(conn, why) if self.actor_conns.contains_key(&conn) => {
                self.actor_broken(conn, why)
            }
            Event::Broken(conn, why) => self.broken(conn, why),
            Event::ActorCall(actor, t) => self.actor_call(actor, *t),
            Event::ActorResolved(id, r) => self.actor_resolved(id, *r),
            Event::ActorArgsReady(id) => self.actor_args_ready(id),
            Event::ActorOutOfScope(id) => self.actor_out_of_scope(id),
            Event::ActorUnreferenced(id) => self.out.push(Effect::KillActor(id)),
            Event::StreamConsumed(task, next) => {
                if let Some(conn) = self
                    .conns
                    .iter()
                    .find(|(_, c)| c.in_flight.contains_key(&task))
                    .map(|(id, _)| *id)
                {
                    self.out.push(Effect::StreamAck { conn, task, next });
                }
            }
            Event::Cancel(id, opts) => self.cancel(id, opts),
            Event::CancelChildren { parent, force } => self.cancel_children(parent, force),
        }
    }

    /// Dispatches every queue the events touched, closes connections idle for `LINGER`,
    /// and returns what the executor must do, in order.
    pub(crate) fn flush(&mut self, now: Instant) -> Vec<Effect> {
        self.now = now;
        let mut actors = std::mem::take(&mut self.dirty_actors);
        actors.sort();
        actors.dedup();
        for a in actors {
            self.dispatch_actor(a);
            self.end_if_out_of_scope(a);
        }
        let mut keys = std::mem::take(&mut self.dirty);
        keys.sort_by_key(|k| Arc::as_ptr(k) as usize);
        keys.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for k in keys {
            self.dispatch(&k, now);
        }
        self.close_idle(now);
        std::mem::take(&mut self.out)
    }

    /// Whether a connection is idle, so `flush` should run again within `LINGER` even if
    /// no event comes.
    pub(crate) fn has_idle(&self) -> bool {
        self.conns.values().any(|c| c.idle_since.is_some())
    }

    /// Builds the wire spec; an argument whose task failed fails this task (DEPENDENCY).
    #[allow(clippy::result_large_err)]
    pub(super) fn spec(&self, t: &Task) -> Result<pb::TaskSpec, TaskError> {
        let mut args = Vec::with_capacity(t.args.len());
        for a in &t.args {
            args.push(match a {
                ArgOut::Inline(v) | ArgOut::InlineRefs(v, _) => v.clone(),
                // Borrowed: the worker asks its owner for it.
                ArgOut::Ref(h) if h.borrowed().is_some() => pb::Value {
                    kind: h
                        .borrowed()
                        .map(|b| pb::value::Kind::OwnerNode(b.owner_node.clone())),
                    type_tag: String::new(),
                    object_id: h.id.as_bytes().to_vec(),
                },
                ArgOut::Ref(h) => match self.owner.state(h.id) {
                    Some(State::Inline { bytes, tag }) => pb::Value {
                        kind: Some(pb::value::Kind::Inline(bytes)),
                        type_tag: tag,
                        object_id: Vec::new(),
                    },
                    Some(State::Stored { tag, locs }) => {
                        let l = locs.first().cloned().unwrap_or_else(|| self.home.clone());
                        pb::Value {
                            kind: Some(pb::value::Kind::Stored(pb::ObjectLocation {
                                node_id: l.node_id,
                                object_manager_address: l.om,
                                node_address: l.nm,
                            })),
                            type_tag: tag,
                            object_id: h.id.as_bytes().to_vec(),
                        }
                    }
                    Some(State::Failed(e)) => {
                        return Err(task_error(
                            t,
                            TaskErrorKind::Dependency,
                            format!("argument {} failed: {e}", h.id),
                            "",
                            "",
                        ));
                    }
                    Some(State::Pending) | None => {
                        return Err(task_error(
                            t,
                            TaskErrorKind::Dependency,
                            format!("argument {} is not available", h.id),
                            "",
                            "",
                        ));
                    }
                },
                ArgOut::Failed(e) => {
                    return Err(task_error(t, TaskErrorKind::Argument, e.clone(), "", ""));
                }
            });
        }
        Ok(pb::TaskSpec {
            task_id: t.id.as_bytes().to_vec(),
            function: t.function.to_owned(),
            args,
            attempt: t.attempt,
            num_returns: t.num_returns.into(),
            streaming: t.streaming,
        })
    }

    /// The `ObjectRef` arguments of `t` still pending.
    pub(super) fn pending_args(&self, t: &Task) -> Vec<ObjectId> {
        t.args
            .iter()
            .filter_map(|a| match a {
                ArgOut::Ref(h) if matches!(self.owner.state(h.id), Some(State::Pending)) => {
                    Some(h.id)
                }
                _ => None,
            })
            .collect()
    }

    pub(super) fn finish_failed(&mut self, t: &Task, e: TaskError) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let error = format!("{}: {}", e.kind_name(), e.message);
        self.note_failed(t, error, None);
        for i in 1..t.num_returns {
            self.owner
                .complete(t.id.return_id(i), State::Failed(Box::new(e.clone())));
        }
        self.owner.complete(t.id, State::Failed(Box::new(e)));
    }

    /// Records a task's new state for `rayctl list tasks`.
    pub(super) fn note(&mut self, t: &Task, state: TaskState, at: At<'_>) {
        (self.log)(&t.ev, Note::of(t, state, at, self.now));
    }

    pub(super) fn note_failed(&mut self, t: &Task, error: String, actor: Option<ActorId>) {
        let at = At {
            actor,
            ..At::default()
        };
        (self.log)(
            &t.ev,
            Note {
                error,
                ..Note::of(t, TaskState::Failed, at, self.now)
            },
        );
    }
}

/// Where a task's state changed (for its task event).
#[derive(Default, Clone, Copy)]
pub(super) struct At<'a> {
    pub(super) node: Option<NodeId>,
    pub(super) worker: Option<&'a WorkerId>,
    pub(super) actor: Option<ActorId>,
}

pub(super) fn task_error(
    t: &Task,
    kind: TaskErrorKind,
    message: String,
    node: &str,
    worker: &str,
) -> TaskError {
    TaskError {
        kind,
        message,
        task_id: t.id.to_string(),
        function: t.function.into(),
        node_id: node.into(),
        worker_id: worker.into(),
    }
}

/// The object state a returned value gives (None: an empty value).
pub(crate) fn value_state(v: &pb::Value) -> Option<State> {
    Some(match &v.kind {
        Some(pb::value::Kind::Inline(bytes)) => State::Inline {
            bytes: bytes.clone(),
            tag: v.type_tag.clone(),
        },
        Some(pb::value::Kind::Stored(l)) => State::Stored {
            tag: v.type_tag.clone(),
            locs: vec![l.clone().into()],
        },
        // Only arguments are borrowed by reference.
        Some(pb::value::Kind::OwnerNode(_)) | None => return None,
    })
}

/// What an actor's reply makes of its object.
pub(crate) fn reply_state(r: &pb::TaskReply) -> State {
    let empty = |what: &str| {
        State::Failed(Box::new(TaskError {
            kind: TaskErrorKind::Store,
            message: format!("the worker sent an empty {what}"),
            task_id: ObjectId::from_slice(&r.task_id)
                .map(|i| i.to_string())
                .unwrap_or_default(),
            function: String::new(),
            node_id: String::new(),
            worker_id: String::new(),
        }))
    };
    match &r.result {
        Some(pb::task_reply::Result::Value(v)) => value_state(v).unwrap_or_else(|| empty("value")),
        Some(pb::task_reply::Result::Error(e)) => State::Failed(Box::new(e.clone().into())),
        None => empty("reply"),
    }
}
