//! The owner's task submitter (DESIGN §3): one tokio task that owns every queue, lease and
//! push stream of this process, fed by events. No lock is held across an await, and the
//! control plane is never called.
//!
//! - Tasks wait for their `ObjectRef` arguments (PENDING_ARGS_AVAIL), then queue per
//!   scheduling key (resource shape + strategy) until a lease has room
//!   (PENDING_NODE_ASSIGNMENT), then are pushed to the leased worker (SUBMITTED_TO_WORKER).
//! - Lease requests start at this process's node and follow spillback replies; the node
//!   bounds the hops. Infeasible or timed-out requests are retried every second while tasks
//!   wait (the nodes report that demand to the autoscaler).
//! - Up to `PIPELINE` tasks are in flight per lease (one for SPREAD, so each task gets its
//!   own lease); pushes and replies are batched per stream message.
//! - A lease with nothing to do is kept for `LINGER` (so sequential calls reuse it), then
//!   its stream is closed, which returns it.
//! - A broken stream means the worker (or its node) died: its in-flight tasks are retried
//!   while `attempt < max_retries`, else they fail with WORKER_DIED.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protocol::{ObjectId, pb};
use tokio::sync::mpsc;

use crate::__private::ArgOut;
use crate::actor::ActorRef;
use crate::owner::{Loc, Rebuild, State};
use crate::runtime::Runtime;
use crate::{Strategy, TaskError};

const PIPELINE: usize = 16;
const MAX_PENDING_LEASES: usize = 8;
const LINGER: Duration = Duration::from_millis(200);
const LEASE_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long calls wait for an actor that is not running before the user is told why.
const ACTOR_WAIT_WARNING: Duration = Duration::from_secs(5);
/// The longest a lease request may take at one node: its queue, a binary fetch and a worker
/// start (each bounded on the node).
const LEASE_RPC_TIMEOUT: Duration = Duration::from_secs(300);
/// Consecutive failed lease RPCs (not refusals) after which waiting tasks fail (~15 s).
const MAX_LEASE_FAILURES: u32 = 10;

/// Tasks with the same key can share leases.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    shape: Vec<(String, u64)>,
    strategy: i32,
    affinity: String,
    soft: bool,
}

/// How often the same warning may be printed again.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A warning the user must see without having installed a logger (Ray prints these too): on
/// stderr, at most once a minute per `key`.
pub(crate) fn user_warning(key: &str, msg: &str) {
    static LAST: std::sync::Mutex<Option<HashMap<String, Instant>>> = std::sync::Mutex::new(None);
    let now = Instant::now();
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let last = last.get_or_insert_with(HashMap::new);
        if last
            .get(key)
            .is_some_and(|t| now.duration_since(*t) < WARN_EVERY)
        {
            return;
        }
        if last.len() > 10_000 {
            last.clear();
        }
        last.insert(key.to_owned(), now);
    }
    tracing::warn!("{msg}");
    eprintln!("(rayctl) warning: {msg}");
}

impl Key {
    /// The shape as a user wrote it: `{CPU: 1, unobtainium: 1}`.
    pub(crate) fn describe(&self) -> String {
        let parts: Vec<String> = self
            .shape
            .iter()
            .map(|(k, v)| format!("{k}: {}", *v as f64 / 10_000.0))
            .collect();
        format!("{{{}}}", parts.join(", "))
    }

    pub(crate) fn new(shape: std::collections::BTreeMap<String, f64>, s: &Strategy) -> Arc<Self> {
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
        Arc::new(Self {
            shape: shape
                .into_iter()
                .map(|(k, v)| (k, (v * 10_000.0).round() as u64))
                .collect(),
            strategy,
            affinity,
            soft,
        })
    }

    fn depth(&self) -> usize {
        if self.strategy == pb::SchedulingStrategy::Spread as i32 {
            1
        } else {
            PIPELINE
        }
    }
}

/// How to run a task again (kept by the owner while its result is referenced).
pub(crate) struct Lineage {
    pub(crate) function: &'static str,
    pub(crate) args: Vec<ArgOut>,
    pub(crate) key: Arc<Key>,
    pub(crate) max_retries: u32,
}

impl Lineage {
    pub(crate) fn task(&self, id: ObjectId, attempt: u32) -> Task {
        Task {
            id,
            function: self.function,
            args: self.args.clone(),
            key: self.key.clone(),
            attempt,
            max_retries: self.max_retries,
        }
    }
}

pub(crate) struct Task {
    pub(crate) id: ObjectId,
    pub(crate) function: &'static str,
    pub(crate) args: Vec<ArgOut>,
    pub(crate) key: Arc<Key>,
    pub(crate) attempt: u32,
    pub(crate) max_retries: u32,
}

pub(crate) struct Lease {
    lease_id: String,
    node_id: String,
    node_address: String,
    worker_id: String,
    worker_address: String,
}

pub(crate) enum Event {
    Submit(Task),
    ArgsReady(Task),
    Granted(Arc<Key>, Lease),
    LeaseDone(Arc<Key>),
    /// Lease requests for this key keep failing: its waiting tasks fail with this message.
    LeaseFailed(Arc<Key>, String),
    Replies(u64, Vec<pb::TaskReply>),
    Broken(u64, String),
    /// A call to an actor, in this process's submission order.
    ActorCall(Arc<ActorRef>, Box<Task>),
    /// The actor's worker to connect to, or why the actor is dead.
    ActorResolved(String, Box<Result<pb::ActorInfo, String>>),
    /// The arguments of the actor's next call are ready.
    ActorArgsReady(String),
    /// The last handle that kept the actor alive was dropped: kill it once the calls made
    /// from here have returned.
    ActorOutOfScope(String),
}

/// Calls to one actor from this process: sent in order on one stream.
struct ActorQueue {
    actor: Arc<ActorRef>,
    /// Not yet sent, in submission order.
    queue: VecDeque<Task>,
    conn: Option<u64>,
    resolving: bool,
    waiting_args: bool,
    /// Connect only to this incarnation or a later one.
    min_restarts: u64,
    dead: Option<String>,
    /// In flight when the worker died and not retried: failed once the actor's fate is known.
    orphans: Vec<Task>,
    /// No handle keeps the actor alive any more: it is killed when no call is left.
    out_of_scope: bool,
}

struct ActorConn {
    actor_id: String,
    tx: mpsc::UnboundedSender<pb::PushTasksRequest>,
    in_flight: HashMap<ObjectId, Task>,
    restarts: u64,
    node_id: String,
    worker_id: String,
}

struct Conn {
    key: Arc<Key>,
    lease: Lease,
    tx: mpsc::UnboundedSender<pb::PushTasksRequest>,
    in_flight: HashMap<ObjectId, Task>,
    idle_since: Option<Instant>,
}

#[derive(Default)]
struct KeyState {
    queue: VecDeque<Task>,
    conns: Vec<u64>,
    requests: Vec<tokio::task::AbortHandle>,
    /// Tasks waiting in `queue`, as the lease requests tell the nodes (the autoscaler's
    /// demand: every waiting task wants a worker, however few leases are asked for).
    backlog: Arc<std::sync::atomic::AtomicU32>,
    /// Leases of this shape held now (a lease request that times out while some run is a
    /// backlog, not a cluster that can run none of them).
    running: Arc<std::sync::atomic::AtomicU32>,
}

struct Submitter {
    rt: Arc<Runtime>,
    tx: mpsc::UnboundedSender<Event>,
    keys: HashMap<Arc<Key>, KeyState>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    actors: HashMap<String, ActorQueue>,
    actor_conns: HashMap<u64, ActorConn>,
}

pub(crate) async fn run(rt: Arc<Runtime>, mut rx: mpsc::UnboundedReceiver<Event>) {
    let tx = rt.submit_tx.clone();
    let mut s = Submitter {
        rt,
        tx,
        keys: HashMap::new(),
        conns: HashMap::new(),
        next_conn: 0,
        actors: HashMap::new(),
        actor_conns: HashMap::new(),
    };
    let mut dirty_actors: Vec<String> = Vec::new();
    let mut dirty: Vec<Arc<Key>> = Vec::new();
    loop {
        let ev = if s.conns.values().any(|c| c.idle_since.is_some()) {
            match tokio::time::timeout(LINGER / 2, rx.recv()).await {
                Ok(ev) => ev,
                Err(_) => {
                    s.close_idle();
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(ev) = ev else { return };
        s.handle(ev, &mut dirty, &mut dirty_actors);
        // Take whatever else is queued before dispatching: pushes go out in batches.
        for _ in 0..4096 {
            match rx.try_recv() {
                Ok(ev) => s.handle(ev, &mut dirty, &mut dirty_actors),
                Err(_) => break,
            }
        }
        dirty_actors.sort();
        dirty_actors.dedup();
        for a in dirty_actors.drain(..) {
            s.dispatch_actor(&a);
            s.end_if_out_of_scope(&a);
        }
        dirty.sort_by_key(|k| Arc::as_ptr(k) as usize);
        dirty.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for k in dirty.drain(..) {
            s.dispatch(&k);
        }
        s.close_idle();
    }
}

impl Submitter {
    fn handle(&mut self, ev: Event, dirty: &mut Vec<Arc<Key>>, dirty_actors: &mut Vec<String>) {
        match ev {
            Event::Replies(conn, replies) if self.actor_conns.contains_key(&conn) => {
                for r in replies {
                    self.actor_reply(conn, r);
                }
                if let Some(c) = self.actor_conns.get(&conn)
                    && c.in_flight.is_empty()
                {
                    let id = c.actor_id.clone();
                    self.end_if_out_of_scope(&id);
                }
            }
            Event::ActorOutOfScope(id) => match self.actors.get_mut(&id) {
                Some(q) => {
                    q.out_of_scope = true;
                    self.end_if_out_of_scope(&id);
                }
                None => self.end_actor(id),
            },
            Event::Broken(conn, why) if self.actor_conns.contains_key(&conn) => {
                if let Some(a) = self.actor_broken(conn, why) {
                    dirty_actors.push(a);
                }
            }
            Event::ActorCall(actor, t) => {
                let q = self
                    .actors
                    .entry(actor.id.clone())
                    .or_insert_with(|| ActorQueue {
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
                q.queue.push_back(*t);
                dirty_actors.push(actor.id.clone());
            }
            Event::ActorResolved(id, r) => {
                self.actor_resolved(&id, *r);
                dirty_actors.push(id);
            }
            Event::ActorArgsReady(id) => {
                if let Some(q) = self.actors.get_mut(&id) {
                    q.waiting_args = false;
                }
                dirty_actors.push(id);
            }
            Event::Submit(t) => self.resolve_args(t),
            Event::ArgsReady(t) => {
                self.rt.stats.pending_args.fetch_sub(1, Ordering::Relaxed);
                self.rt.stats.pending_node.fetch_add(1, Ordering::Relaxed);
                note(&self.rt, &t, "PENDING_NODE_ASSIGNMENT", At::default());
                dirty.push(t.key.clone());
                self.keys
                    .entry(t.key.clone())
                    .or_default()
                    .queue
                    .push_back(t);
            }
            Event::Granted(key, lease) => {
                let id = self.open(key.clone(), lease);
                self.keys.entry(key.clone()).or_default().conns.push(id);
                dirty.push(key);
            }
            Event::LeaseDone(key) => {
                if let Some(ks) = self.keys.get_mut(&key) {
                    ks.requests.retain(|h| !h.is_finished());
                }
                dirty.push(key);
            }
            Event::LeaseFailed(key, why) => {
                let Some(ks) = self.keys.get_mut(&key) else {
                    return;
                };
                ks.requests.retain(|h| !h.is_finished());
                let tasks: Vec<Task> = ks.queue.drain(..).collect();
                for t in tasks {
                    self.rt.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
                    let e = task_error(
                        &t,
                        "SCHEDULING",
                        format!("no worker could be leased: {why}"),
                        "",
                        "",
                    );
                    self.finish_failed(&t, e);
                }
            }
            Event::Replies(conn, replies) => {
                if let Some(c) = self.conns.get(&conn) {
                    dirty.push(c.key.clone());
                }
                for r in replies {
                    self.reply(conn, r);
                }
            }
            Event::Broken(conn, why) => {
                if let Some(c) = self.conns.get(&conn) {
                    dirty.push(c.key.clone());
                }
                self.broken(conn, why);
            }
        }
    }

    /// Queues the task once every `ObjectRef` argument is ready.
    fn resolve_args(&self, t: Task) {
        let pending: Vec<ObjectId> = t
            .args
            .iter()
            .filter_map(|a| match a {
                ArgOut::Ref(h) if matches!(self.rt.owner.state(h.id), Some(State::Pending)) => {
                    Some(h.id)
                }
                _ => None,
            })
            .collect();
        if pending.is_empty() {
            let _ = self.tx.send(Event::ArgsReady(t));
            return;
        }
        let (rt, tx) = (self.rt.clone(), self.tx.clone());
        self.rt.spawn(async move {
            for id in pending {
                rt.owner.ready(id, None).await;
            }
            let _ = tx.send(Event::ArgsReady(t));
        });
    }

    /// Builds the wire spec; an argument whose task failed fails this task (DEPENDENCY).
    #[allow(clippy::result_large_err)]
    fn spec(&self, t: &Task) -> Result<pb::TaskSpec, TaskError> {
        let mut args = Vec::with_capacity(t.args.len());
        for a in &t.args {
            args.push(match a {
                ArgOut::Inline(v) => v.clone(),
                ArgOut::Ref(h) => match self.rt.owner.state(h.id) {
                    Some(State::Inline { bytes, tag }) => pb::Value {
                        kind: Some(pb::value::Kind::Inline(bytes)),
                        type_tag: tag,
                        object_id: Vec::new(),
                    },
                    Some(State::Stored { tag, locs }) => {
                        let l = locs.first().cloned().unwrap_or_else(|| self.rt.node.loc());
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
                            "DEPENDENCY",
                            format!("argument {} failed: {e}", h.id),
                            "",
                            "",
                        ));
                    }
                    Some(State::Pending) | None => {
                        return Err(task_error(
                            t,
                            "DEPENDENCY",
                            format!("argument {} is not available", h.id),
                            "",
                            "",
                        ));
                    }
                },
                ArgOut::Failed(e) => return Err(task_error(t, "ARGUMENT", e.clone(), "", "")),
            });
        }
        Ok(pb::TaskSpec {
            task_id: t.id.as_bytes().to_vec(),
            function: t.function.to_owned(),
            args,
            attempt: t.attempt,
        })
    }

    fn dispatch(&mut self, key: &Arc<Key>) {
        let depth = key.depth();
        let Some(ks) = self.keys.get_mut(key) else {
            return;
        };
        let mut queue = std::mem::take(&mut ks.queue);
        let conns = ks.conns.clone();
        let mut out: HashMap<u64, Vec<pb::TaskSpec>> = HashMap::new();
        let mut failed = Vec::new();
        while !queue.is_empty() {
            let free = conns
                .iter()
                .filter(|c| self.conns[c].in_flight.len() < depth)
                .min_by_key(|c| self.conns[c].in_flight.len());
            let Some(&cid) = free else { break };
            let t = queue.pop_front().expect("not empty");
            self.rt.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
            match self.spec(&t) {
                Ok(spec) => {
                    self.rt.stats.submitted.fetch_add(1, Ordering::Relaxed);
                    let c = self.conns.get_mut(&cid).expect("listed conns exist");
                    c.idle_since = None;
                    note(
                        &self.rt,
                        &t,
                        "SUBMITTED_TO_WORKER",
                        At {
                            node: &c.lease.node_id,
                            worker: &c.lease.worker_id,
                            ..At::default()
                        },
                    );
                    c.in_flight.insert(t.id, t);
                    out.entry(cid).or_default().push(spec);
                }
                Err(e) => failed.push((t, e)),
            }
        }
        for (t, e) in failed {
            self.finish_failed(&t, e);
        }
        for (cid, tasks) in out {
            if let Some(c) = self.conns.get(&cid) {
                let _ = c.tx.send(pb::PushTasksRequest {
                    tasks,
                    ..Default::default()
                });
            }
        }
        let ks = self.keys.get_mut(key).expect("taken above");
        ks.backlog
            .store(queue.len().min(u32::MAX as usize) as u32, Ordering::Relaxed);
        ks.running.store(
            ks.conns.len().min(u32::MAX as usize) as u32,
            Ordering::Relaxed,
        );
        ks.queue = queue;
        ks.requests.retain(|h| !h.is_finished());
        if !ks.queue.is_empty() {
            let want = ks.queue.len().div_ceil(depth).min(MAX_PENDING_LEASES);
            while ks.requests.len() < want {
                let h = self.rt.spawn(request_lease(
                    self.rt.clone(),
                    key.clone(),
                    ks.backlog.clone(),
                    ks.running.clone(),
                    self.tx.clone(),
                ));
                ks.requests.push(h.abort_handle());
            }
        } else {
            // Nothing waits: cancel lease requests still queued at nodes.
            for h in ks.requests.drain(..) {
                h.abort();
            }
        }
    }

    fn open(&mut self, key: Arc<Key>, lease: Lease) -> u64 {
        self.next_conn += 1;
        let id = self.next_conn;
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(pb::PushTasksRequest {
            lease_id: lease.lease_id.clone(),
            owner_node: self.rt.output_node(),
            ..Default::default()
        });
        self.stream(id, lease.worker_address.clone(), rx, false);
        self.conns.insert(
            id,
            Conn {
                key,
                lease,
                tx,
                in_flight: HashMap::new(),
                idle_since: Some(Instant::now()),
            },
        );
        id
    }

    /// Runs a PushTasks stream to the worker at `address`: replies and the break come back as
    /// events for connection `id`.
    fn stream(
        &self,
        id: u64,
        address: String,
        rx: mpsc::UnboundedReceiver<pb::PushTasksRequest>,
        direct: bool,
    ) {
        let events = self.tx.clone();
        let rt = self.rt.clone();
        let opts = protocol::client::ClientOptions {
            rpc_timeout: Duration::from_secs(24 * 3600),
            ..Default::default()
        };
        let client = protocol::client::channel(&address, &opts).map(|ch| {
            pb::core_worker_client::CoreWorkerClient::with_interceptor(
                ch,
                protocol::auth::ClientAuth(self.rt.token.clone()),
            )
            .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(protocol::MAX_MESSAGE_BYTES)
        });
        self.rt.spawn(async move {
            let mut client = match client {
                Ok(c) => c,
                Err(e) => {
                    let _ = events.send(Event::Broken(id, e.to_string()));
                    return;
                }
            };
            let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            let why = match client.push_tasks(outbound).await {
                Err(e) => e.message().to_owned(),
                Ok(resp) => {
                    let mut s = resp.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(r)) => {
                                // An actor's results complete here, a hop sooner for the
                                // caller waiting on them; the submitter only does the books.
                                if direct {
                                    for reply in &r.replies {
                                        if let Ok(oid) = ObjectId::from_slice(&reply.task_id) {
                                            rt.owner.complete(oid, reply_state(reply));
                                        }
                                    }
                                }
                                if events.send(Event::Replies(id, r.replies)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break "the worker closed the stream".to_owned(),
                            Err(e) => break e.message().to_owned(),
                        }
                    }
                }
            };
            let _ = events.send(Event::Broken(id, why));
        });
    }

    fn reply(&mut self, cid: u64, r: pb::TaskReply) {
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
            c.idle_since = Some(Instant::now());
        }
        let exec_loc = Loc {
            node_id: c.lease.node_id.clone(),
            om: String::new(),
            nm: c.lease.node_address.clone(),
        };
        self.rt.stats.submitted.fetch_sub(1, Ordering::Relaxed);
        match r.result {
            Some(pb::task_reply::Result::Value(v)) => {
                // Arguments the worker pulled now have a copy on its node too.
                for a in &t.args {
                    if let ArgOut::Ref(h) = a
                        && let Some(State::Stored { locs, .. }) = self.rt.owner.state(h.id)
                        && !locs.iter().any(|l| l.node_id == exec_loc.node_id)
                    {
                        // Known for freeing; pulls use locations with an address.
                        self.rt.owner.add_location(h.id, exec_loc.clone());
                    }
                }
                let state = value_state(&v).unwrap_or_else(|| {
                    State::Failed(task_error(
                        &t,
                        "STORE",
                        "the worker sent an empty value".into(),
                        &c.lease.node_id,
                        &c.lease.worker_id,
                    ))
                });
                self.rt.stats.finished.fetch_add(1, Ordering::Relaxed);
                note(&self.rt, &t, "FINISHED", At::default());
                self.rt.owner.complete(id, state);
            }
            Some(pb::task_reply::Result::Error(e)) if e.kind == "ARG_LOST" => {
                // An argument's copies are gone (its node died): rebuild it, then run this
                // task again once it is back.
                let lost = ObjectId::from_slice(&e.lost_object_id).ok();
                match lost.map(|l| (l, self.rt.owner.rebuild(l, &e.message))) {
                    Some((l, Rebuild::Run(lineage, n))) => {
                        tracing::info!(object = %l, "rebuilding a lost argument (rebuild {n})");
                        self.rt
                            .stats
                            .reconstructions
                            .fetch_add(1, Ordering::Relaxed);
                        self.rt.stats.pending_args.fetch_add(1, Ordering::Relaxed);
                        self.resolve_args(lineage.task(l, n));
                        self.rt.stats.pending_args.fetch_add(1, Ordering::Relaxed);
                        self.resolve_args(t);
                    }
                    Some((_, Rebuild::InProgress)) => {
                        self.rt.stats.pending_args.fetch_add(1, Ordering::Relaxed);
                        self.resolve_args(t);
                    }
                    Some((l, Rebuild::Lost(why))) => {
                        let e = task_error(
                            &t,
                            "OBJECT_LOST",
                            format!("argument {l} is lost: {why}"),
                            &e.node_id,
                            &e.worker_id,
                        );
                        self.finish_failed(&t, e);
                    }
                    None => self.finish_failed(&t, e.into()),
                }
            }
            Some(pb::task_reply::Result::Error(e)) => {
                self.rt.stats.failed.fetch_add(1, Ordering::Relaxed);
                note_failed(&self.rt, &t, format!("{}: {}", e.kind, e.message), None);
                self.rt.owner.complete(id, State::Failed(e.into()));
            }
            None => {
                let e = task_error(
                    &t,
                    "STORE",
                    "the worker sent an empty reply".into(),
                    &c.lease.node_id,
                    &c.lease.worker_id,
                );
                self.finish_failed(&t, e);
            }
        }
    }

    fn finish_failed(&self, t: &Task, e: TaskError) {
        self.rt.stats.failed.fetch_add(1, Ordering::Relaxed);
        note_failed(&self.rt, t, format!("{}: {}", e.kind, e.message), None);
        self.rt.owner.complete(t.id, State::Failed(e));
    }

    fn broken(&mut self, cid: u64, why: String) {
        let Some(c) = self.conns.remove(&cid) else {
            return;
        };
        if let Some(ks) = self.keys.get_mut(&c.key) {
            ks.conns.retain(|x| *x != cid);
        }
        if c.in_flight.is_empty() {
            return;
        }
        tracing::warn!(worker = %c.lease.worker_id, node = %c.lease.node_id, tasks = c.in_flight.len(), "lost the worker: {why}");
        let mut retry = Vec::new();
        for (_, mut t) in c.in_flight {
            self.rt.stats.submitted.fetch_sub(1, Ordering::Relaxed);
            if t.attempt < t.max_retries {
                t.attempt += 1;
                self.rt.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.rt.stats.pending_node.fetch_add(1, Ordering::Relaxed);
                note(&self.rt, &t, "PENDING_NODE_ASSIGNMENT", At::default());
                retry.push(t);
            } else {
                let msg = format!(
                    "the worker died while running it ({why}); {} attempt(s) made, max_retries={}",
                    t.attempt + 1,
                    t.max_retries
                );
                let e = task_error(&t, "WORKER_DIED", msg, &c.lease.node_id, &c.lease.worker_id);
                self.finish_failed(&t, e);
            }
        }
        retry.sort_by_key(|t| t.id);
        let ks = self.keys.entry(c.key.clone()).or_default();
        for t in retry.into_iter().rev() {
            ks.queue.push_front(t);
        }
    }

    /// Closes streams idle for longer than `LINGER` (the worker then returns the lease).
    fn close_idle(&mut self) {
        let now = Instant::now();
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
        }
    }
}

impl Submitter {
    /// Sends the actor's queued calls in order while their arguments are ready; connects
    /// first if needed. A dead actor fails them.
    fn dispatch_actor(&mut self, id: &str) {
        let Some(q) = self.actors.get_mut(id) else {
            return;
        };
        if let Some(why) = q.dead.clone() {
            let tasks: Vec<Task> = q.queue.drain(..).collect();
            let actor = q.actor.clone();
            for t in tasks {
                self.rt.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
                self.fail_actor_task(
                    &actor,
                    &t,
                    "ACTOR_DIED",
                    format!("the actor is dead: {why}"),
                    "",
                    "",
                );
            }
            return;
        }
        let Some(cid) = q.conn else {
            if !q.resolving && !q.queue.is_empty() {
                q.resolving = true;
                self.rt.spawn(resolve_actor(
                    self.rt.clone(),
                    id.to_owned(),
                    q.min_restarts,
                    self.tx.clone(),
                ));
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
            wait_for = t
                .args
                .iter()
                .filter_map(|a| match a {
                    ArgOut::Ref(h) if matches!(self.rt.owner.state(h.id), Some(State::Pending)) => {
                        Some(h.id)
                    }
                    _ => None,
                })
                .collect();
            if !wait_for.is_empty() {
                // Later calls wait behind this one: the order is the caller's.
                break;
            }
            let t = queue.pop_front().expect("front exists");
            self.rt.stats.pending_node.fetch_sub(1, Ordering::Relaxed);
            match self.spec(&t) {
                Ok(spec) => {
                    self.rt.stats.submitted.fetch_add(1, Ordering::Relaxed);
                    out.push(spec);
                    if let Some(c) = self.actor_conns.get_mut(&cid) {
                        note(
                            &self.rt,
                            &t,
                            "SUBMITTED_TO_WORKER",
                            At {
                                node: &c.node_id,
                                worker: &c.worker_id,
                                actor: Some(&c.actor_id),
                            },
                        );
                        c.in_flight.insert(t.id, t);
                    }
                }
                Err(e) => self.finish_failed(&t, e),
            }
        }
        let q = self.actors.get_mut(id).expect("looked up above");
        q.queue = queue;
        if !wait_for.is_empty() {
            q.waiting_args = true;
            let (rt, tx, id) = (self.rt.clone(), self.tx.clone(), id.to_owned());
            self.rt.spawn(async move {
                for p in wait_for {
                    rt.owner.ready(p, None).await;
                }
                let _ = tx.send(Event::ActorArgsReady(id));
            });
        }
        self.send_actor(cid, out);
    }

    /// Kills an actor no handle keeps alive once no call to it is left (queued, waiting for
    /// arguments, in flight, or failed and waiting for the actor's fate).
    fn end_if_out_of_scope(&mut self, id: &str) {
        let Some(q) = self.actors.get(id) else {
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
        let Some(q) = self.actors.remove(id) else {
            return;
        };
        if let Some(c) = q.conn {
            // Closing the stream is all the worker needs to hear from this caller.
            self.actor_conns.remove(&c);
        }
        if q.dead.is_none() {
            self.end_actor(id.to_owned());
        }
    }

    /// Kills an actor for good because no handle to it is left (as Ray does).
    fn end_actor(&self, id: String) {
        let rt = self.rt.clone();
        self.rt.spawn(async move {
            let req = pb::KillActorRequest {
                actor_id: id.clone(),
                no_restart: true,
                reason: "every handle to it was dropped (it was not named or detached)".into(),
            };
            let r = match rt.head() {
                Ok(h) => h
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.kill_actor(req).await }
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = r {
                tracing::warn!(
                    actor = id,
                    "could not end an actor no handle refers to: {e}"
                );
            }
        });
    }

    fn send_actor(&mut self, cid: u64, tasks: Vec<pb::TaskSpec>) {
        if tasks.is_empty() {
            return;
        }
        if let Some(c) = self.actor_conns.get(&cid) {
            let _ = c.tx.send(pb::PushTasksRequest {
                tasks,
                ..Default::default()
            });
        }
    }

    fn fail_actor_task(
        &self,
        actor: &ActorRef,
        t: &Task,
        kind: &str,
        message: String,
        node: &str,
        worker: &str,
    ) {
        let mut e = crate::actor::actor_error(actor, kind, message);
        e.task_id = t.id.to_string();
        e.function = t.function.to_owned();
        e.node_id = node.to_owned();
        e.worker_id = worker.to_owned();
        self.finish_failed(t, e);
    }

    fn actor_resolved(&mut self, id: &str, r: Result<pb::ActorInfo, String>) {
        let Some(q) = self.actors.get_mut(id) else {
            return;
        };
        q.resolving = false;
        let orphans = std::mem::take(&mut q.orphans);
        let actor = q.actor.clone();
        match r {
            Err(why) => {
                q.dead = Some(why.clone());
                for t in orphans {
                    self.fail_actor_task(
                        &actor,
                        &t,
                        "ACTOR_DIED",
                        format!("the actor died while running this call: {why}"),
                        "",
                        "",
                    );
                }
            }
            Ok(info) => {
                q.min_restarts = info.num_restarts;
                let n = orphans.len();
                for t in orphans {
                    let msg = format!(
                        "the actor's worker died while running this call; the actor restarted ({} restart(s) so far) but the call was not retried (max_task_retries={})",
                        info.num_restarts, actor.max_task_retries
                    );
                    self.fail_actor_task(&actor, &t, "ACTOR_UNAVAILABLE", msg, "", "");
                }
                let _ = n;
                let cid = self.open_actor(id, &info);
                if let Some(q) = self.actors.get_mut(id) {
                    q.conn = Some(cid);
                }
            }
        }
    }

    fn open_actor(&mut self, id: &str, info: &pb::ActorInfo) -> u64 {
        self.next_conn += 1;
        let cid = self.next_conn;
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(pb::PushTasksRequest {
            actor_id: id.to_owned(),
            actor_restarts: info.num_restarts,
            owner_node: self.rt.output_node(),
            ..Default::default()
        });
        self.stream(cid, info.worker_address.clone(), rx, true);
        self.actor_conns.insert(
            cid,
            ActorConn {
                actor_id: id.to_owned(),
                tx,
                in_flight: HashMap::new(),
                restarts: info.num_restarts,
                node_id: info.node_id.clone(),
                worker_id: info.worker_id.clone(),
            },
        );
        cid
    }

    /// Books an actor's reply (the stream task already completed its object).
    fn actor_reply(&mut self, cid: u64, r: pb::TaskReply) {
        let Ok(id) = ObjectId::from_slice(&r.task_id) else {
            return;
        };
        let Some(c) = self.actor_conns.get_mut(&cid) else {
            return;
        };
        let Some(t) = c.in_flight.remove(&id) else {
            return;
        };
        self.rt.stats.submitted.fetch_sub(1, Ordering::Relaxed);
        match &r.result {
            Some(pb::task_reply::Result::Value(_)) => {
                self.rt.stats.finished.fetch_add(1, Ordering::Relaxed);
                note(
                    &self.rt,
                    &t,
                    "FINISHED",
                    At {
                        actor: Some(&c.actor_id),
                        ..At::default()
                    },
                );
            }
            other => {
                self.rt.stats.failed.fetch_add(1, Ordering::Relaxed);
                let error = match other {
                    Some(pb::task_reply::Result::Error(e)) => format!("{}: {}", e.kind, e.message),
                    _ => "STORE: an empty reply".into(),
                };
                note_failed(&self.rt, &t, error, Some(&c.actor_id));
            }
        }
    }

    /// The stream to the actor broke (its worker or node died, or it restarted): retry what
    /// may be retried, in order, on the next incarnation. Returns the actor to dispatch.
    fn actor_broken(&mut self, cid: u64, why: String) -> Option<String> {
        let c = self.actor_conns.remove(&cid)?;
        let q = self.actors.get_mut(&c.actor_id)?;
        q.conn = None;
        q.min_restarts = q.min_restarts.max(c.restarts + 1);
        let mut tasks: Vec<Task> = c.in_flight.into_values().collect();
        if !tasks.is_empty() {
            tracing::warn!(
                actor = c.actor_id,
                calls = tasks.len(),
                "lost the actor's worker: {why}"
            );
        }
        tasks.sort_by_key(|t| t.id);
        let retries = q.actor.max_task_retries;
        for mut t in tasks.into_iter().rev() {
            self.rt.stats.submitted.fetch_sub(1, Ordering::Relaxed);
            if retries < 0 || i64::from(t.attempt) < retries {
                t.attempt += 1;
                self.rt.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.rt.stats.pending_node.fetch_add(1, Ordering::Relaxed);
                note(
                    &self.rt,
                    &t,
                    "PENDING_NODE_ASSIGNMENT",
                    At {
                        actor: Some(&q.actor.id),
                        ..At::default()
                    },
                );
                q.queue.push_front(t);
            } else {
                q.orphans.push(t);
            }
        }
        if !q.orphans.is_empty() && !q.resolving {
            // Learn the actor's fate even if nothing else waits for it.
            q.resolving = true;
            self.rt.spawn(resolve_actor(
                self.rt.clone(),
                c.actor_id.clone(),
                q.min_restarts,
                self.tx.clone(),
            ));
        }
        Some(c.actor_id)
    }
}

/// Waits until the actor is alive at incarnation `min_restarts` or later (or dead). If it
/// stays alive at an older incarnation (the stream broke for another reason) it is used
/// again after a while.
async fn resolve_actor(
    rt: Arc<Runtime>,
    id: String,
    min_restarts: u64,
    events: mpsc::UnboundedSender<Event>,
) {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        match crate::actor::get_info(&rt, &id, 5_000, min_restarts).await {
            Ok(i) if i.state == pb::ActorState::Dead as i32 => {
                let _ = events.send(Event::ActorResolved(id, Box::new(Err(i.message))));
                return;
            }
            Ok(i)
                if i.state == pb::ActorState::Alive as i32
                    && (i.num_restarts >= min_restarts
                        || start.elapsed() > Duration::from_secs(10)) =>
            {
                let _ = events.send(Event::ActorResolved(id, Box::new(Ok(i))));
                return;
            }
            Ok(i) => {
                if start.elapsed() > ACTOR_WAIT_WARNING {
                    user_warning(
                        &format!("actor {id}"),
                        &format!(
                            "actor {} ({id}) has not started after {}s: {}",
                            i.class_name,
                            start.elapsed().as_secs(),
                            if i.message.is_empty() {
                                "waiting for a node"
                            } else {
                                &i.message
                            }
                        ),
                    );
                }
            }
            Err(e) => {
                tracing::warn!(actor = id, "cannot look the actor up: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What an actor's reply makes of its object.
fn reply_state(r: &pb::TaskReply) -> State {
    let empty = |what: &str| {
        State::Failed(TaskError {
            kind: "STORE".into(),
            message: format!("the worker sent an empty {what}"),
            task_id: ObjectId::from_slice(&r.task_id)
                .map(|i| i.to_string())
                .unwrap_or_default(),
            function: String::new(),
            node_id: String::new(),
            worker_id: String::new(),
        })
    };
    match &r.result {
        Some(pb::task_reply::Result::Value(v)) => value_state(v).unwrap_or_else(|| empty("value")),
        Some(pb::task_reply::Result::Error(e)) => State::Failed(e.clone().into()),
        None => empty("reply"),
    }
}

/// The object state a returned value gives (None: an empty value).
fn value_state(v: &pb::Value) -> Option<State> {
    Some(match &v.kind {
        Some(pb::value::Kind::Inline(bytes)) => State::Inline {
            bytes: bytes.clone(),
            tag: v.type_tag.clone(),
        },
        Some(pb::value::Kind::Stored(l)) => State::Stored {
            tag: v.type_tag.clone(),
            locs: vec![Loc {
                node_id: l.node_id.clone(),
                om: l.object_manager_address.clone(),
                nm: l.node_address.clone(),
            }],
        },
        None => return None,
    })
}

/// Where a task's state changed (for its task event).
#[derive(Default, Clone, Copy)]
struct At<'a> {
    node: &'a str,
    worker: &'a str,
    actor: Option<&'a str>,
}

/// Records a task's new state for `rayctl list tasks`.
fn note(rt: &Runtime, t: &Task, state: &'static str, at: At<'_>) {
    rt.task_event(
        t.id,
        t.function,
        state,
        at.node,
        at.worker,
        t.attempt,
        String::new(),
        at.actor,
    );
}

fn note_failed(rt: &Runtime, t: &Task, error: String, actor: Option<&str>) {
    rt.task_event(t.id, t.function, "FAILED", "", "", t.attempt, error, actor);
}

fn task_error(t: &Task, kind: &str, message: String, node: &str, worker: &str) -> TaskError {
    TaskError {
        kind: kind.into(),
        message,
        task_id: t.id.to_string(),
        function: t.function.into(),
        node_id: node.into(),
        worker_id: worker.into(),
    }
}

/// Asks this process's node for a lease, following spillbacks; retries while it is
/// infeasible or timed out (the nodes report the waiting demand).
async fn request_lease(
    rt: Arc<Runtime>,
    key: Arc<Key>,
    backlog: Arc<std::sync::atomic::AtomicU32>,
    running: Arc<std::sync::atomic::AtomicU32>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0;
    'outer: loop {
        let mut addr = rt.node.address.clone();
        let mut hops = 0;
        loop {
            let req = pb::LeaseRequest {
                resources: key
                    .shape
                    .iter()
                    .map(|(k, v)| (k.clone(), *v as f64 / 10_000.0))
                    .collect(),
                strategy: key.strategy,
                affinity_node_id: key.affinity.clone(),
                affinity_soft: key.soft,
                spillback_count: hops,
                queue_timeout_ms: LEASE_QUEUE_TIMEOUT.as_millis() as u64,
                binary_sha256: rt.binary.0.clone(),
                binary_source: rt.binary.1.clone(),
                job_id: rt.job_id.clone(),
                backlog: backlog.load(Ordering::Relaxed),
                owner_prefix: rt.prefix.to_vec(),
            };
            // Bounded: queueing, a worker's start and a binary fetch fit well inside; a node
            // stuck longer is treated as a failed request (retried, then the tasks fail).
            let mut call = tonic::Request::new(req);
            call.set_timeout(LEASE_RPC_TIMEOUT);
            let r = match rt.nm(&addr).request_worker_lease(call).await {
                Ok(r) => {
                    failures = 0;
                    r.into_inner()
                }
                Err(e) => {
                    tracing::warn!("lease request to {addr} failed: {}", e.message());
                    failures += 1;
                    // A node that cannot start a worker (a missing binary, a worker that
                    // crashes at start) will not start to: give up after a while.
                    if failures >= MAX_LEASE_FAILURES {
                        let why = format!(
                            "{failures} lease requests failed, the last at {addr}: {}",
                            e.message()
                        );
                        let _ = events.send(Event::LeaseFailed(key.clone(), why));
                        let _ = events.send(Event::LeaseDone(key));
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue 'outer;
                }
            };
            match pb::LeaseOutcome::try_from(r.outcome) {
                Ok(pb::LeaseOutcome::Granted) => {
                    let lease = Lease {
                        lease_id: r.lease_id,
                        node_id: r.node_id,
                        node_address: addr,
                        worker_id: r.worker_id,
                        worker_address: r.worker_address,
                    };
                    let _ = events.send(Event::Granted(key.clone(), lease));
                    let _ = events.send(Event::LeaseDone(key));
                    return;
                }
                Ok(pb::LeaseOutcome::Spillback) if !r.address.is_empty() => {
                    addr = r.address;
                    hops += 1;
                }
                Ok(pb::LeaseOutcome::Infeasible) => {
                    user_warning(
                        &format!("infeasible {}", key.describe()),
                        &format!(
                            "tasks needing {} cannot be scheduled: {}. They wait until a node that can run them joins the cluster (the autoscaler adds one if a node type fits).",
                            key.describe(),
                            r.message
                        ),
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue 'outer;
                }
                Ok(pb::LeaseOutcome::TimedOut) if running.load(Ordering::Relaxed) == 0 => {
                    // None of these tasks runs anywhere: say why they wait. (With some running
                    // it is an ordinary backlog.)
                    user_warning(
                        &format!("busy {}", key.describe()),
                        &format!(
                            "tasks needing {} have waited {}s for a worker: every node that can run them is busy{}. They run as resources free up.",
                            key.describe(),
                            LEASE_QUEUE_TIMEOUT.as_secs(),
                            if r.message.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", r.message)
                            }
                        ),
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'outer;
                }
                _ => {
                    // Timed out while others of this shape run (a backlog), or a spillback
                    // without an address: ask again.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'outer;
                }
            }
        }
    }
}
