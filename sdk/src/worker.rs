//! Worker mode (DESIGN §8): a node runs this same binary with `RAYCTL_WORKER_ID` set; `init`
//! comes here and never returns. The worker serves `CoreWorker.PushTasks` for the owner that
//! holds its lease and runs the tasks one at a time on the main thread, in arrival order,
//! replying as each finishes (replies are batched per stream message).
//!
//! Also here: argument decoding for `#[remote]` functions, result encoding (inline up to
//! `INLINE_MAX`, else sealed in this node's store under the task's id), and the one-node
//! cluster `init` starts when there is no cluster.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use prost::bytes::Bytes;
use protocol::{ObjectId, pb};
use rkyv::util::AlignedVec;
use tokio::sync::mpsc;

use crate::Error;
use crate::runtime::Runtime;
use crate::value::{self, Source, Value, View};

/// A task argument as the worker received it.
pub enum ArgIn {
    Inline(Bytes, String),
    Stored(object_store::ObjectView),
}

/// Why an argument or result could not be handled.
#[derive(Debug)]
pub struct ArgError(pub(crate) String);

/// A result ready to send: inline bytes, or stored under the task's id.
pub enum Encoded {
    Inline(AlignedVec, String),
    Stored(String),
}

/// The arguments of one call, in order, and where to put its result.
pub struct Args<'a> {
    items: std::vec::IntoIter<ArgIn>,
    n: usize,
    task_id: ObjectId,
    rt: &'a Runtime,
    /// The refs inside the result (its caller becomes their borrower).
    contained: Vec<Arc<crate::owner::Handle>>,
    /// With `num_returns` > 1: returns 1, 2, … as encoded (`encode_return_at`).
    more: Vec<pb::Value>,
    /// For a streaming task: where its items go, and whether its caller went away.
    stream: Option<(mpsc::UnboundedSender<pb::TaskReply>, Arc<AtomicBool>)>,
}

/// How far each streaming task's caller has read (`PushTasksRequest.consumed`).
static CONSUMED: std::sync::LazyLock<(Mutex<HashMap<ObjectId, u64>>, std::sync::Condvar)> =
    std::sync::LazyLock::new(Default::default);

fn consumed(c: &pb::StreamConsumed) {
    let Ok(id) = ObjectId::from_slice(&c.task_id) else {
        return;
    };
    let (m, cv) = &*CONSUMED;
    let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
    let e = m.entry(id).or_insert(0);
    *e = (*e).max(c.next);
    cv.notify_all();
}

/// Waits until item `j` of `task` is within the window of what its caller read; false if
/// the caller went away or cancelled the task first.
fn wait_window(task: ObjectId, j: u64, closed: &AtomicBool) -> bool {
    let (m, cv) = &*CONSUMED;
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if closed.load(Ordering::Acquire) || crate::calls::is_cancelled() {
            return false;
        }
        if j < g.get(&task).copied().unwrap_or(0) + crate::stream::WINDOW {
            return true;
        }
        g = cv
            .wait_timeout(g, Duration::from_millis(100))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Runs a streaming function's iterator: each item is stored (inline or in this node's
/// store under its item id) and reported to the caller at once, staying within the
/// back-pressure window; the result is the number of items.
pub fn stream_items<T: Value, I: IntoIterator<Item = T>>(
    args: &mut Args<'_>,
    items: I,
) -> Result<Encoded, ArgError> {
    let (tx, closed) = args
        .stream
        .clone()
        .ok_or_else(|| ArgError("a streaming function was called as a plain task".into()))?;
    let task = args.task_id;
    let mut n: u32 = 0;
    for item in items {
        if !wait_window(task, n.into(), &closed) {
            break;
        }
        let id = task.stream_item_id(n);
        let value = encode_as(args, id, &item)?.into_value(args.rt, id);
        let _ = tx.send(pb::TaskReply {
            task_id: task.as_bytes().to_vec(),
            item: Some(pb::StreamItem {
                index: n.into(),
                value: Some(value),
            }),
            ..Default::default()
        });
        n = n
            .checked_add(1)
            .ok_or_else(|| ArgError("a stream has at most 2^32 items".into()))?;
    }
    CONSUMED
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&task);
    encode_return(args, &u64::from(n))
}

impl Args<'_> {
    pub fn expect(&self, n: usize) -> Result<(), ArgError> {
        if self.n != n {
            return Err(ArgError(format!(
                "the function takes {n} argument(s), the call passed {}",
                self.n
            )));
        }
        Ok(())
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<ArgIn, ArgError> {
        self.items
            .next()
            .ok_or_else(|| ArgError("missing argument".into()))
    }
}

/// A parameter type of a remote function.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a parameter of a remote function or actor method",
    label = "not a value the cluster can carry",
    note = "mark the type `#[sdk::value]` (it derives rkyv's Archive, Serialize and Deserialize through the SDK)"
)]
pub trait FromArg: Sized {
    fn from_arg(a: ArgIn) -> Result<Self, ArgError>;
}

impl<T: Value> FromArg for T {
    fn from_arg(a: ArgIn) -> Result<Self, ArgError> {
        match a {
            ArgIn::Inline(b, tag) => value::decode(&b, &tag),
            ArgIn::Stored(v) => {
                let tag = String::from_utf8_lossy(v.metadata()).into_owned();
                value::decode(v.data(), &tag)
            }
        }
        .map_err(|e| ArgError(format!("argument {e}")))
    }
}

impl<T: Value> FromArg for View<T> {
    fn from_arg(a: ArgIn) -> Result<Self, ArgError> {
        match a {
            ArgIn::Inline(b, tag) => View::from_inline(&b, &tag),
            ArgIn::Stored(v) => {
                let tag = String::from_utf8_lossy(v.metadata()).into_owned();
                View::new(Source::Store(v), &tag)
            }
        }
        .map_err(|e| ArgError(format!("argument {e}")))
    }
}

/// Encodes return `i` (> 0) of a function with `num_returns` > 1, under its return id.
pub fn encode_return_at<T: Value>(args: &mut Args<'_>, i: u8, v: &T) -> Result<(), ArgError> {
    let id = args.task_id.return_id(i);
    let value = encode_as(args, id, v)?.into_value(args.rt, id);
    args.more.push(value);
    Ok(())
}

impl Encoded {
    /// The wire value of object `id` encoded this way: its bytes, or where it is stored.
    fn into_value(self, rt: &Runtime, id: ObjectId) -> pb::Value {
        match self {
            Encoded::Inline(b, tag) => pb::Value {
                kind: Some(pb::value::Kind::Inline(Bytes::copy_from_slice(&b))),
                type_tag: tag,
                object_id: Vec::new(),
            },
            Encoded::Stored(tag) => pb::Value {
                kind: Some(pb::value::Kind::Stored(pb::ObjectLocation {
                    node_id: rt.node.node_id.clone(),
                    object_manager_address: rt.node.om.clone(),
                    node_address: rt.node.address.clone(),
                })),
                type_tag: tag,
                object_id: id.as_bytes().to_vec(),
            },
        }
    }
}

/// Encodes a return value: inline when small, else sealed in this node's store as the
/// primary copy under the task's id (the owner frees it).
pub fn encode_return<T: Value>(args: &mut Args<'_>, v: &T) -> Result<Encoded, ArgError> {
    let id = args.task_id;
    encode_as(args, id, v)
}

fn encode_as<T: Value>(args: &mut Args<'_>, id: ObjectId, v: &T) -> Result<Encoded, ArgError> {
    let tag = value::type_tag::<T>();
    let n =
        value::archived_size(v).map_err(|e| ArgError(format!("cannot encode the result: {e}")))?;
    if n <= value::INLINE_MAX {
        let (r, refs) = crate::borrow::sending(|| value::archive(v));
        args.contained.extend(refs);
        return r
            .map(|b| Encoded::Inline(b, tag))
            .map_err(|e| ArgError(format!("cannot encode the result: {e}")));
    }
    let store = args
        .rt
        .store
        .as_ref()
        .ok_or_else(|| ArgError("no object store on this worker".into()))?;
    match store.create(id, n as u64, tag.len() as u64) {
        Ok(mut w) => {
            let (r, refs) = crate::borrow::sending(|| value::archive_into(v, w.data_mut()));
            args.contained.extend(refs);
            r.map_err(|e| ArgError(format!("cannot encode the result: {e}")))?;
            w.meta_mut().copy_from_slice(tag.as_bytes());
            w.seal()
                .map_err(|e| ArgError(format!("cannot seal the result: {e}")))?;
        }
        // A retried task whose first attempt already stored the result.
        Err(e) if e.kind() == Some("AlreadyExists") => {}
        Err(e) => {
            return Err(ArgError(format!(
                "cannot store the result of {n} bytes: {e}"
            )));
        }
    }
    Ok(Encoded::Stored(tag))
}

type Invoke = fn(&mut Args<'_>) -> Result<Encoded, ArgError>;
type ActorInvoke = fn(&crate::__private::ActorCell, &mut Args<'_>) -> Result<Encoded, ArgError>;

enum Work {
    Run {
        spec: pb::TaskSpec,
        /// The caller's node manager (`PushTasksRequest.caller_node`).
        caller_node: Arc<str>,
        lease: Arc<str>,
        reply: mpsc::UnboundedSender<pb::TaskReply>,
        closed: Arc<AtomicBool>,
        actor: bool,
    },
    End(String),
    StartActor(pb::ActorStart),
}

/// The actor this worker hosts, once its constructor returned.
pub(crate) struct ActorHost {
    actor_id: String,
    restarts: u64,
    cell: crate::__private::ActorCell,
    /// With max_concurrency > 1: the queue the actor's threads take calls from.
    pool: Option<std_mpsc::Sender<Work>>,
}

impl ActorHost {
    pub(crate) fn actor_id(&self) -> &str {
        &self.actor_id
    }
}

#[derive(Clone)]
struct CoreWorker {
    rt: Arc<Runtime>,
    exec: std_mpsc::Sender<Work>,
    node_tx: mpsc::UnboundedSender<pb::WorkerMessage>,
    leases: Arc<Mutex<Leases>>,
}

/// How long a granted lease waits for its owner's stream before the worker gives it back
/// (the owner died, or gave up on the request, after the node granted it).
const ORPHAN_LEASE: Duration = Duration::from_secs(10);

/// How long a new actor may serve before its node's first renewal (they come every 200 ms).
const ACTOR_FIRST_LEASE: Duration = Duration::from_secs(3);

/// The leases the node gave this worker: granted and not yet claimed by a stream, or given
/// back unclaimed (a late stream for one of those is refused).
#[derive(Default)]
struct Leases {
    unclaimed: std::collections::HashSet<String>,
    given_back: std::collections::HashSet<String>,
}

type ReplyStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::PushTasksReply, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::core_worker_server::CoreWorker for CoreWorker {
    type PushTasksStream = ReplyStream;

    async fn push_tasks(
        &self,
        req: tonic::Request<tonic::Streaming<pb::PushTasksRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| tonic::Status::invalid_argument("empty PushTasks stream"))?;
        if !first.actor_id.is_empty() {
            return self.actor_calls(first, input);
        }
        let lease = first.lease_id.clone();
        if lease.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "the first PushTasks message must name the lease",
            ));
        }
        {
            let mut l = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            if l.given_back.contains(&lease) {
                return Err(tonic::Status::failed_precondition(format!(
                    "lease {lease} was not claimed in time and is over"
                )));
            }
            l.unclaimed.remove(&lease);
        }
        let _ = self
            .node_tx
            .send(msg(pb::worker_message::Kind::LeaseStarted(lease.clone())));
        let exec = self.exec.clone();
        let lease_name: Arc<str> = lease.as_str().into();
        // When the owner closes the lease (or dies), the node hears the worker is free once
        // the queue is through.
        let replies = forward(
            first.tasks,
            first.owner_node,
            first.caller_node.as_str().into(),
            input,
            exec.clone(),
            lease_name,
            false,
            move || {
                let _ = exec.send(Work::End(lease));
            },
        );
        Ok(tonic::Response::new(replies))
    }
}

/// Hands the calls of one stream to `exec` in arrival order and returns the stream of their
/// replies. When the caller closes its stream (or dies), calls still queued are skipped, and
/// `then` runs.
#[allow(clippy::too_many_arguments)]
fn forward(
    first: Vec<pb::TaskSpec>,
    owner_node: String,
    caller_node: Arc<str>,
    mut input: tonic::Streaming<pb::PushTasksRequest>,
    exec: std_mpsc::Sender<Work>,
    lease: Arc<str>,
    actor: bool,
    then: impl FnOnce() + Send + 'static,
) -> ReplyStream {
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<pb::TaskReply>();
    let closed = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        let mut batch = first;
        loop {
            for spec in batch.drain(..) {
                crate::output::caller_node(&spec.task_id, &owner_node);
                let _ = exec.send(Work::Run {
                    spec,
                    caller_node: caller_node.clone(),
                    lease: lease.clone(),
                    reply: reply_tx.clone(),
                    closed: closed.clone(),
                    actor,
                });
            }
            match input.message().await {
                Ok(Some(m)) => {
                    for c in &m.cancel {
                        cancel_here(c, &reply_tx);
                    }
                    for c in &m.consumed {
                        consumed(c);
                    }
                    batch = m.tasks;
                }
                _ => break,
            }
        }
        closed.store(true, Ordering::Release);
        then();
    });
    reply_stream(reply_rx)
}

/// Replies as they come, batched per stream message.
fn reply_stream(reply_rx: mpsc::UnboundedReceiver<pb::TaskReply>) -> ReplyStream {
    let s = futures_util::stream::unfold(reply_rx, |mut rx| async move {
        let first = rx.recv().await?;
        let mut replies = vec![first];
        while replies.len() < 1024 {
            match rx.try_recv() {
                Ok(r) => replies.push(r),
                Err(_) => break,
            }
        }
        Some((Ok(pb::PushTasksReply { replies }), rx))
    });
    Box::pin(s)
}

impl CoreWorker {
    /// A caller's stream of calls to the actor this worker hosts: run in arrival order (or
    /// by the actor's threads with max_concurrency > 1).
    #[allow(clippy::result_large_err)]
    fn actor_calls(
        &self,
        first: pb::PushTasksRequest,
        input: tonic::Streaming<pb::PushTasksRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let host = match self.rt.actor.get() {
            Some(h) if h.actor_id == first.actor_id && h.restarts == first.actor_restarts => {
                h.clone()
            }
            Some(h) => {
                return Err(tonic::Status::failed_precondition(format!(
                    "this worker hosts incarnation {} of actor {}, not incarnation {} of actor {}",
                    h.restarts, h.actor_id, first.actor_restarts, first.actor_id
                )));
            }
            None => {
                return Err(tonic::Status::failed_precondition(format!(
                    "this worker does not host actor {}",
                    first.actor_id
                )));
            }
        };
        let exec = host.pool.clone().unwrap_or_else(|| self.exec.clone());
        let lease: Arc<str> = self.rt.running_lease_of_actor();
        Ok(tonic::Response::new(forward(
            first.tasks,
            first.owner_node,
            first.caller_node.as_str().into(),
            input,
            exec,
            lease,
            true,
            || {},
        )))
    }
}

fn msg(kind: pb::worker_message::Kind) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}

thread_local! {
    static PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs the worker until its node tells it to exit or goes away; never returns.
pub(crate) fn serve(rt: Arc<Runtime>) -> ! {
    let registry: HashMap<&'static str, Invoke> =
        inventory::iter::<crate::__private::RemoteFunction>()
            .map(|f| (f.name, f.invoke))
            .collect();
    if registry.is_empty() {
        // The linker can drop registrations in a module nothing references (FIELD-NOTES).
        eprintln!("rayctl worker: no #[remote] function is registered in this binary");
    }
    // Keep the panic message (with its location) for the task error; still print it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
        default_hook(info);
    }));
    let (exec_tx, exec_rx) = std_mpsc::channel::<Work>();
    let (node_tx, node_rx) = mpsc::unbounded_channel::<pb::WorkerMessage>();
    let host = std::env::var(protocol::env::NODE_IP_ADDRESS).unwrap_or_else(|_| "127.0.0.1".into());
    match crate::output::capture(host.clone()) {
        Ok(c) => {
            rt.spawn(crate::output::flush_loop(c, node_tx.clone()));
        }
        Err(e) => eprintln!("rayctl worker: what tasks print stays in this log only: {e}"),
    }
    let started = rt.block_on(start_server(
        rt.clone(),
        host,
        exec_tx,
        node_tx.clone(),
        node_rx,
    ));
    if let Err(e) = started {
        eprintln!("rayctl worker: {e}");
        std::process::exit(1);
    }
    let methods: Arc<HashMap<&'static str, ActorInvoke>> = Arc::new(
        inventory::iter::<crate::__private::ActorMethod>()
            .map(|m| (m.name, m.invoke))
            .collect(),
    );
    for w in exec_rx {
        match w {
            Work::End(lease) => {
                let _ = node_tx.send(msg(pb::worker_message::Kind::LeaseEnded(lease)));
            }
            Work::StartActor(start) => {
                let actor_id = start.actor_id.clone();
                let error = start_actor(&rt, start, &methods).err();
                let _ = node_tx.send(msg(pb::worker_message::Kind::ActorStarted(
                    pb::ActorStarted { actor_id, error },
                )));
            }
            w @ Work::Run { .. } => run_one(&rt, &registry, &methods, w),
        }
    }
    std::process::exit(0)
}

/// Runs one call (a task, or a method of the hosted actor) and sends its reply.
fn run_one(
    rt: &Arc<Runtime>,
    registry: &HashMap<&'static str, Invoke>,
    methods: &HashMap<&'static str, ActorInvoke>,
    w: Work,
) {
    let Work::Run {
        spec,
        caller_node,
        lease,
        reply,
        closed,
        actor,
    } = w
    else {
        return;
    };
    if closed.load(Ordering::Acquire) {
        return;
    }
    // Marks the call running on this thread; none if its caller cancelled it before it
    // started (it was answered then).
    let _running = match ObjectId::from_slice(&spec.task_id) {
        Ok(id) => match crate::calls::start(id, spec.attempt) {
            Some(g) => Some(g),
            None => return,
        },
        Err(_) => None,
    };
    rt.stats.running.fetch_add(1, Ordering::Relaxed);
    crate::output::running(&spec.task_id, &spec.function);
    *rt.running_lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
    let stream = spec.streaming.then(|| (reply.clone(), closed.clone()));
    let r = if actor {
        let host = rt.actor.get().cloned();
        execute(rt, spec, &caller_node, stream, &|name, args| {
            let host = host.as_ref()?;
            methods.get(name).map(|f| f(&host.cell, args))
        })
    } else {
        execute(rt, spec, &caller_node, stream, &|name, args| {
            registry.get(name).map(|f| f(args))
        })
    };
    if !actor {
        *rt.running_lease.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    rt.stats.running.fetch_sub(1, Ordering::Relaxed);
    rt.stats.executed.fetch_add(1, Ordering::Relaxed);
    let _ = reply.send(r);
}

/// Runs the actor's constructor here and becomes its host; with max_concurrency > 1 starts
/// the threads its calls run on.
#[allow(clippy::result_large_err)]
fn start_actor(
    rt: &Arc<Runtime>,
    start: pb::ActorStart,
    methods: &Arc<HashMap<&'static str, ActorInvoke>>,
) -> Result<(), pb::TaskError> {
    let classes: HashMap<&'static str, _> = inventory::iter::<crate::__private::ActorClass>()
        .map(|c| (c.name, c.construct))
        .collect();
    let err = |kind: pb::TaskErrorKind, message: String| pb::TaskError {
        kind: kind as i32,
        message,
        task_id: String::new(),
        function: start.class_name.clone(),
        node_id: rt.node.node_id.clone(),
        worker_id: rt.worker().to_owned(),
        lost_object_id: Vec::new(),
    };
    if rt.actor.get().is_some() {
        return Err(err(
            pb::TaskErrorKind::Argument,
            "this worker already hosts an actor".into(),
        ));
    }
    let Some(construct) = classes.get(start.class_name.as_str()) else {
        return Err(err(
            pb::TaskErrorKind::UnknownFunction,
            format!("no #[actor] class {:?} in this binary", start.class_name),
        ));
    };
    let ctor = start.constructor.clone().unwrap_or_default();
    let mut items = Vec::with_capacity(ctor.args.len());
    for (i, a) in ctor.args.into_iter().enumerate() {
        items.push(resolve(rt, a).map_err(|e| {
            err(
                pb::TaskErrorKind::Argument,
                format!("constructor argument {i}: {e}"),
            )
        })?);
    }
    let n = items.len();
    let mut args = Args {
        items: items.into_iter(),
        n,
        task_id: ObjectId::from_bytes([0; 20]),
        rt,
        contained: Vec::new(),
        more: Vec::new(),
        stream: None,
    };
    *rt.running_lease.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(start.lease_id.as_str().into());
    PANIC.with(|p| p.borrow_mut().take());
    let out = std::panic::catch_unwind(AssertUnwindSafe(|| construct(&mut args)));
    drop(args);
    let state = match out {
        Ok(Ok(state)) => state,
        Ok(Err(ArgError(e))) => return Err(err(pb::TaskErrorKind::Argument, e)),
        Err(payload) => return Err(err(pb::TaskErrorKind::Panic, panic_message(payload))),
    };
    let pool = (start.max_concurrency > 1).then(|| {
        let (tx, rx) = std_mpsc::channel::<Work>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..start.max_concurrency {
            let (rt, rx, methods) = (rt.clone(), rx.clone(), methods.clone());
            let registry = HashMap::new();
            std::thread::Builder::new()
                .name(format!("actor-{i}"))
                .spawn(move || {
                    loop {
                        let w = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(w) => w,
                            Err(_) => return,
                        };
                        run_one(&rt, &registry, &methods, w);
                    }
                })
                .expect("cannot start an actor thread");
        }
        tx
    });
    // From now on this worker serves only while its node renews its lease: a node cut off
    // from the cluster stops renewing before the leader declares it dead and restarts the
    // actor elsewhere, and this copy exits.
    *rt.serve_until.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(std::time::Instant::now() + ACTOR_FIRST_LEASE);
    let watched = rt.clone();
    std::thread::Builder::new()
        .name("actor-lease".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(50));
            let until = *watched.serve_until.lock().unwrap_or_else(|p| p.into_inner());
            if until.is_some_and(|u| std::time::Instant::now() > u) {
                eprintln!("rayctl worker: the node stopped renewing this actor's lease (it lost touch with the cluster); exiting so no second copy serves");
                std::process::exit(3);
            }
        })
        .expect("cannot start the actor lease watchdog");
    let host = ActorHost {
        actor_id: start.actor_id.clone(),
        restarts: start.num_restarts,
        cell: std::sync::RwLock::new(state),
        pool,
    };
    let _ = rt.actor.set(Arc::new(host));
    Ok(())
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-string payload".into())
    })
}

async fn start_server(
    rt: Arc<Runtime>,
    host: String,
    exec: std_mpsc::Sender<Work>,
    node_tx: mpsc::UnboundedSender<pb::WorkerMessage>,
    node_rx: mpsc::UnboundedReceiver<pb::WorkerMessage>,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind((host.as_str(), 0))
        .await
        .map_err(|e| Error::Init(format!("cannot bind {host}:0: {e}")))?;
    let address = format!(
        "{host}:{}",
        listener
            .local_addr()
            .map_err(|e| Error::Init(e.to_string()))?
            .port()
    );
    let leases: Arc<Mutex<Leases>> = Arc::default();
    let svc = CoreWorker {
        rt: rt.clone(),
        exec: exec.clone(),
        node_tx: node_tx.clone(),
        leases: leases.clone(),
    };
    let routes = tonic::service::Routes::new(
        pb::core_worker_server::CoreWorkerServer::new(svc)
            .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(protocol::MAX_MESSAGE_BYTES),
    );
    let router =
        protocol::server::grpc_router(routes, protocol::server::Access::token(rt.token.clone()));
    tokio::spawn(async move {
        if let Err(e) = protocol::server::serve(listener, router, std::future::pending()).await {
            eprintln!("rayctl worker: server stopped: {e}");
            std::process::exit(1);
        }
    });
    let _ = rt.channel.set(node_tx.clone());
    let _ = node_tx.send(msg(pb::worker_message::Kind::Hello(pb::WorkerHello {
        worker_id: rt.worker().to_owned(),
        address,
        pid: std::process::id(),
        job_id: rt.job().to_owned(),
        owner_prefix: rt.prefix.to_vec(),
    })));
    let outbound =
        futures_util::stream::unfold(
            node_rx,
            |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
        );
    let mut inbound = rt
        .nm(&rt.node.address)?
        .worker_channel(outbound)
        .await
        .map_err(|e| {
            Error::Init(format!(
                "cannot reach node {}: {}",
                rt.node.address,
                e.message()
            ))
        })?
        .into_inner();
    let r = rt.clone();
    let lease_rt = rt.clone();
    let give_back = node_tx.clone();
    tokio::spawn(async move {
        loop {
            match inbound.message().await {
                Ok(Some(pb::NodeToWorker {
                    kind: Some(pb::node_to_worker::Kind::Exit(_)),
                })) => std::process::exit(0),
                Ok(Some(pb::NodeToWorker {
                    kind: Some(pb::node_to_worker::Kind::ServeMs(ms)),
                })) => {
                    *lease_rt
                        .serve_until
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) =
                        Some(std::time::Instant::now() + Duration::from_millis(ms));
                }
                Ok(Some(pb::NodeToWorker {
                    kind: Some(pb::node_to_worker::Kind::ObjectsMoved(moved)),
                })) => lease_rt.objects_moved(moved),
                Ok(Some(pb::NodeToWorker {
                    kind: Some(pb::node_to_worker::Kind::OwnerCall(call)),
                })) => lease_rt.serve_owner_call(call),
                // What this worker's own calls printed: on up to its caller.
                Ok(Some(pb::NodeToWorker {
                    kind: Some(pb::node_to_worker::Kind::Output(o)),
                })) => crate::output::received(o),
                Ok(Some(pb::NodeToWorker {
                    kind: Some(pb::node_to_worker::Kind::StartActor(start)),
                })) => {
                    let _ = exec.send(Work::StartActor(start));
                }
                Ok(Some(pb::NodeToWorker {
                    kind: Some(pb::node_to_worker::Kind::Leased(lease)),
                })) => {
                    leases
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .unclaimed
                        .insert(lease.clone());
                    let (leases, give_back) = (leases.clone(), give_back.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(ORPHAN_LEASE).await;
                        let orphan = {
                            let mut l = leases.lock().unwrap_or_else(|p| p.into_inner());
                            let orphan = l.unclaimed.remove(&lease);
                            if orphan {
                                l.given_back.insert(lease.clone());
                            }
                            orphan
                        };
                        if orphan {
                            let _ =
                                give_back.send(msg(pb::worker_message::Kind::LeaseEnded(lease)));
                        }
                    });
                }
                Ok(Some(_)) => {}
                // The node is gone: so is this worker.
                _ => std::process::exit(1),
            }
        }
    });
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !r.report(&node_tx) {
                return;
            }
        }
    });
    Ok(())
}

/// Runs the named function or method on the arguments; None when there is none.
type Call<'a> = dyn Fn(&str, &mut Args<'_>) -> Option<Result<Encoded, ArgError>> + 'a;

/// Runs one call through `call`.
/// The answer to a call cancelled before it started (its function is not known here: the
/// caller has it).
fn cancelled_reply(id: ObjectId) -> pb::TaskReply {
    let (node_id, worker_id) = crate::runtime::current()
        .map(|rt| (rt.node.node_id.clone(), rt.worker().to_owned()))
        .unwrap_or_default();
    pb::TaskReply {
        task_id: id.as_bytes().to_vec(),
        result: Some(pb::task_reply::Result::Error(pb::TaskError {
            kind: pb::TaskErrorKind::Cancelled as i32,
            message: "cancelled by its caller (sdk::cancel) before it started".into(),
            task_id: id.to_string(),
            function: String::new(),
            node_id,
            worker_id,
            lost_object_id: Vec::new(),
        })),
        contained: Vec::new(),
        more_returns: Vec::new(),
        item: None,
    }
}

/// How long a worker cancelled with `force` and `recursive` waits for the cancels of its
/// task's children to leave before it exits.
const CHILD_CANCELS_GRACE: Duration = Duration::from_millis(300);

/// A caller cancelled one of the calls it sent on this stream (see `CancelTask`): one not
/// started is answered now (and skipped when its turn comes), a running one is flagged, and
/// with `force` this worker exits.
fn cancel_here(c: &pb::CancelTask, replies: &mpsc::UnboundedSender<pb::TaskReply>) {
    let Ok(id) = ObjectId::from_slice(&c.task_id) else {
        return;
    };
    let running = crate::calls::cancel_requested(id);
    if !running {
        let _ = replies.send(cancelled_reply(id));
    }
    if c.recursive
        && let Ok(rt) = crate::runtime::current()
    {
        let _ = rt.submit_tx.send(crate::submit::Event::CancelChildren {
            parent: id,
            force: c.force,
        });
    }
    if c.force && running {
        tracing::warn!(task = %id, "cancelled with force: this worker exits");
        eprintln!("(rayctl) task {id} was cancelled with force: this worker exits");
        if c.recursive {
            std::thread::sleep(CHILD_CANCELS_GRACE);
        }
        std::process::exit(1);
    }
}

fn execute(
    rt: &Arc<Runtime>,
    spec: pb::TaskSpec,
    caller_node: &str,
    stream: Option<(mpsc::UnboundedSender<pb::TaskReply>, Arc<AtomicBool>)>,
    call: &Call<'_>,
) -> pb::TaskReply {
    let (node_id, worker_id) = (rt.node.node_id.as_str(), rt.worker());
    let task_id = spec.task_id.clone();
    let err = |kind: pb::TaskErrorKind, message: String| pb::TaskReply {
        task_id: task_id.clone(),
        result: Some(pb::task_reply::Result::Error(pb::TaskError {
            kind: kind as i32,
            message,
            task_id: ObjectId::from_slice(&task_id)
                .map(|i| i.to_string())
                .unwrap_or_default(),
            function: spec.function.clone(),
            node_id: node_id.into(),
            worker_id: worker_id.into(),
            lost_object_id: Vec::new(),
        })),
        contained: Vec::new(),
        more_returns: Vec::new(),
        item: None,
    };
    let Ok(id) = ObjectId::from_slice(&spec.task_id) else {
        return err(pb::TaskErrorKind::Argument, "bad task id".into());
    };
    let mut items = Vec::with_capacity(spec.args.len());
    for (i, a) in spec.args.into_iter().enumerate() {
        let stored = ObjectId::from_slice(&a.object_id).ok();
        let borrowed = matches!(a.kind, Some(pb::value::Kind::OwnerNode(_)));
        match resolve(rt, a) {
            Ok(x) => items.push(x),
            Err(e) => {
                let kind = match &e {
                    Error::OwnerDied(..) => pb::TaskErrorKind::OwnerDied,
                    Error::Task(_) | Error::TaskCancelled(_) | Error::ActorDied(_) => {
                        pb::TaskErrorKind::Dependency
                    }
                    _ if stored.is_some() && !borrowed => pb::TaskErrorKind::ArgLost,
                    _ if borrowed => pb::TaskErrorKind::ObjectLost,
                    _ => pb::TaskErrorKind::Argument,
                };
                let mut reply = err(kind, format!("argument {i}: {e}"));
                if let (Some(pb::task_reply::Result::Error(te)), Some(l)) =
                    (&mut reply.result, stored)
                {
                    te.lost_object_id = l.as_bytes().to_vec();
                }
                return reply;
            }
        }
    }
    let n = items.len();
    let mut args = Args {
        items: items.into_iter(),
        n,
        task_id: id,
        rt,
        contained: Vec::new(),
        more: Vec::new(),
        stream,
    };
    PANIC.with(|p| p.borrow_mut().take());
    let out = std::panic::catch_unwind(AssertUnwindSafe(|| call(&spec.function, &mut args)));
    // Cancelled while it ran: whatever it returned, its caller gets CANCELLED.
    let cancelled = crate::calls::is_cancelled();
    let contained = std::mem::take(&mut args.contained);
    let more_returns = std::mem::take(&mut args.more);
    drop(args);
    let contained = borrows_at_end(rt, contained, id, caller_node);
    if cancelled {
        return err(
            pb::TaskErrorKind::Cancelled,
            "cancelled by its caller (sdk::cancel) while it ran".into(),
        );
    }
    let out = match out {
        Ok(None) => {
            return err(
                pb::TaskErrorKind::UnknownFunction,
                format!(
                    "no remote function or actor method {:?} in this binary",
                    spec.function
                ),
            );
        }
        Ok(Some(r)) => Ok(r),
        Err(p) => Err(p),
    };
    match out {
        Ok(Ok(encoded)) => pb::TaskReply {
            task_id,
            result: Some(pb::task_reply::Result::Value(encoded.into_value(rt, id))),
            contained,
            more_returns,
            item: None,
        },
        Ok(Err(ArgError(e))) => err(pb::TaskErrorKind::Argument, e),
        Err(payload) => err(pb::TaskErrorKind::Panic, panic_message(payload)),
    }
}

/// At the end of a call, before its reply: the refs this process still holds that arrived
/// in arguments (their caller kept them alive until now) become its own borrows, and the
/// caller is registered as a borrower of the refs inside the result. Returns those refs.
fn borrows_at_end(
    rt: &Arc<Runtime>,
    contained: Vec<Arc<crate::owner::Handle>>,
    task_id: ObjectId,
    caller_node: &str,
) -> Vec<pb::RefAddress> {
    let held = rt.borrows.unregistered();
    if held.is_empty() && contained.is_empty() {
        return Vec::new();
    }
    let caller = crate::owner::Borrower {
        prefix: task_id.as_bytes()[..crate::borrow::PREFIX].to_vec(),
        node: caller_node.to_owned(),
    };
    let registered = rt.block_on(async {
        crate::borrow::register_self(rt, held).await;
        if caller_node.is_empty() {
            return Vec::new();
        }
        crate::borrow::register(rt, &contained, &caller).await
    });
    registered
        .iter()
        .map(|h| pb::RefAddress {
            object_id: h.id.as_bytes().to_vec(),
            owner_node: match h.borrowed() {
                Some(b) => b.owner_node.clone(),
                None => rt.node.address.clone(),
            },
        })
        .collect()
}

/// Makes an argument readable here: inline bytes as they came, stored objects pinned in
/// this node's store (pulled from their node first if needed), borrowed ones asked of their
/// owner first.
fn resolve(rt: &Arc<Runtime>, v: pb::Value) -> Result<ArgIn, Error> {
    if let Some(pb::value::Kind::OwnerNode(node)) = &v.kind {
        let id = ObjectId::from_slice(&v.object_id).map_err(|e| Error::Decode(e.to_string()))?;
        let r = rt.block_on(rt.clone().resolve_borrowed(id, node.clone()))?;
        return Ok(match r {
            crate::runtime::Resolved::Inline(b, tag) => ArgIn::Inline(b, tag),
            crate::runtime::Resolved::Stored(Source::Store(v), _) => ArgIn::Stored(v),
            crate::runtime::Resolved::Stored(Source::Heap(v), tag) => {
                ArgIn::Inline(Bytes::from(v.into_vec()), tag)
            }
        });
    }
    resolve_value(rt, v).map_err(Error::Store)
}

fn resolve_value(rt: &Runtime, v: pb::Value) -> Result<ArgIn, String> {
    match v.kind {
        Some(pb::value::Kind::Inline(b)) => Ok(ArgIn::Inline(b, v.type_tag)),
        Some(pb::value::Kind::Stored(loc)) => {
            let id = ObjectId::from_slice(&v.object_id).map_err(|e| e.to_string())?;
            let store = rt.store.as_ref().ok_or("no object store on this worker")?;
            if loc.node_id != rt.node.node_id {
                store
                    .pull(
                        id,
                        &loc.object_manager_address,
                        Some(Duration::from_secs(600)),
                    )
                    .map_err(|e| {
                        format!("cannot fetch object {id} from node {}: {e}", loc.node_id)
                    })?;
            }
            store
                .get_one(id, Some(Duration::from_secs(60)))
                .map(ArgIn::Stored)
                .map_err(|e| format!("object {id}: {e}"))
        }
        Some(pb::value::Kind::OwnerNode(_)) => Err("a borrowed value here".into()),
        None => Err("empty value".into()),
    }
}

/// A one-node cluster started by `init` when no cluster was found, stopped with the session.
pub(crate) struct LocalCluster {
    pub(crate) heads: Vec<String>,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl LocalCluster {
    pub(crate) fn start(num_cpus: Option<f64>) -> Result<Self, Error> {
        let rayctl = find_rayctl().ok_or_else(|| {
            Error::Init("no cluster to connect to (RAYCTL_ADDRESS is unset) and no `rayctl` binary to start one: put rayctl on PATH or set RAYCTL_BIN".into())
        })?;
        let dir = std::env::temp_dir().join(format!("rayctl-sdk-{}", std::process::id()));
        protocol::session::ensure_private_dir(&dir).map_err(|e| Error::Init(e.to_string()))?;
        let ready = dir.join("ready.json");
        let mut cmd = std::process::Command::new(&rayctl);
        cmd.args([
            "start",
            "--head",
            "--block",
            "--port=0",
            "--dashboard-port=0",
        ])
        .arg(format!("--ready-file={}", ready.display()))
        .env("RAYCTL_TMPDIR", &dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::File::create(dir.join("rayctl.log"))
                .map_err(|e| Error::Init(e.to_string()))?,
        );
        if let Some(n) = num_cpus {
            cmd.arg(format!("--num-cpus={n}"));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Init(format!("cannot run {}: {e}", rayctl.display())))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read(&ready)
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text)
            {
                let heads: Vec<String> = v["heads"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|h| h.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if !heads.is_empty() {
                    return Ok(Self { heads, child, dir });
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("rayctl.log")).unwrap_or_default();
                return Err(Error::Init(format!(
                    "the local cluster exited ({status}) before it was ready: {}",
                    log.trim()
                )));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return Err(Error::Init(
                    "the local cluster was not ready within 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `RAYCTL_BIN`, then `rayctl` next to this program (or its parent dir, for cargo examples),
/// then `PATH`.
fn find_rayctl() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("RAYCTL_BIN") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("rayctl");
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("rayctl"))
            .find(|p| p.is_file())
    })
}
