//! The Rust SDK: what user programs link to run work on a cluster (DESIGN §3, §4, §8).
//!
//! ```no_run
//! #[sdk::remote]
//! fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! fn main() -> Result<(), sdk::Error> {
//!     // In a worker process this never returns: it serves tasks instead.
//!     let _session = sdk::init()?;
//!     let r = add::remote(1i64, 2i64);
//!     assert_eq!(sdk::get(&r)?, 3);
//!     Ok(())
//! }
//! ```
//!
//! - [`init`] connects to the cluster named by `RAYCTL_ADDRESS` (or [`Config::address`]); with
//!   neither it starts a one-node cluster with `rayctl` and stops it when the [`Session`]
//!   drops. On a node it uses the node's shared-memory object store; elsewhere (remote
//!   mode) objects travel over gRPC.
//! - `#[remote]` functions register themselves at compile time. Workers are this same binary
//!   re-executed by a node in worker mode: `init()` sees `RAYCTL_WORKER_ID` and runs the
//!   worker loop. Nodes fetch the binary by content hash.
//! - The process that submits a task owns its result: it leases workers from nodes, pushes
//!   tasks to them directly (pipelined), keeps the reference counts and locations, and frees
//!   the copies when the last [`ObjectRef`] drops. The control plane is not on this path.
//!
//! Invariants: a value is validated once against its type tag before anyone reads it; an
//! object stays alive while any `ObjectRef` to it or any pending task using it exists.

mod actor;
mod borrow;
mod calls;
mod context;
mod events;
mod output;
mod owner;
mod pg;
mod runtime;
mod stream;
mod submit;
mod value;
mod worker;

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

pub use actor::{ActorHandle, ActorInfo, ActorOptions, ActorState, get_actor};
pub use calls::is_cancelled;
pub use context::{Context, Node, available_resources, cluster_resources, context, nodes};
pub use pg::{
    PlacementGroup, PlacementGroupInfo, PlacementGroupOptions, PlacementStrategy, placement_group,
    request_resources,
};
pub use protocol::client::ClientError;
pub use protocol::pb::TaskErrorKind;
pub use protocol::{ActorId, NodeId, ObjectId, RpcError};
/// The rkyv the SDK encodes values with; `#[sdk::value]` derives through it.
pub use rkyv;
pub use sdk_macros::{actor, remote, value};
pub use stream::ObjectRefGenerator;
pub use submit::CancelOptions;
pub use value::{INLINE_MAX, SliceWriter, Value, View};

pub use runtime::{Config, GET_SPIN_ENV, Mode, Session, init, init_with};

/// Why a remote function call failed, with where it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    /// What kind of failure it is (`kind_name` spells it as messages do).
    pub kind: TaskErrorKind,
    pub message: String,
    pub task_id: String,
    pub function: String,
    pub node_id: String,
    pub worker_id: String,
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} ({}) failed", self.function, self.task_id)?;
        if !self.node_id.is_empty() {
            write!(f, " on node {}", self.node_id)?;
        }
        if !self.worker_id.is_empty() {
            write!(f, " (worker {})", self.worker_id)?;
        }
        write!(f, ": {}: {}", self.kind_name(), self.message)
    }
}

impl TaskError {
    /// The kind as messages spell it: `PANIC`, `WORKER_DIED`, `ACTOR_DIED`, ….
    pub fn kind_name(&self) -> &'static str {
        protocol::task_error_kind_name(self.kind)
    }
}

impl From<protocol::pb::TaskError> for TaskError {
    fn from(e: protocol::pb::TaskError) -> Self {
        Self {
            kind: e.kind(),
            message: e.message,
            task_id: e.task_id,
            function: e.function,
            node_id: e.node_id,
            worker_id: e.worker_id,
        }
    }
}

impl From<&TaskError> for protocol::pb::TaskError {
    fn from(e: &TaskError) -> Self {
        Self {
            kind: e.kind as i32,
            message: e.message.clone(),
            task_id: e.task_id.clone(),
            function: e.function.clone(),
            node_id: e.node_id.clone(),
            worker_id: e.worker_id.clone(),
            lost_object_id: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Task(Box<TaskError>),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("object {0} is lost: {1}")]
    ObjectLost(ObjectId, String),
    #[error("object store: {0}")]
    Store(String),
    /// A call to the cluster failed: what the cluster answered (`ClientError::Rpc`, whose
    /// `RpcError` says what kind of failure it was) or that no head answered.
    #[error("cluster: {0}")]
    Rpc(#[from] ClientError),
    #[error("cannot decode the value: {0}")]
    Decode(String),
    #[error("cannot start the SDK: {0}")]
    Init(String),
    /// An actor could not be created or found.
    #[error("actor: {0}")]
    Actor(String),
    /// The actor is dead (no restart left, killed, its owner or constructor failed).
    #[error("{0}")]
    ActorDied(Box<TaskError>),
    /// The call was in flight when the actor's worker died; the actor restarted (or is
    /// restarting) but the call was not retried (`max_task_retries`).
    #[error("{0}")]
    ActorUnavailable(Box<TaskError>),
    /// The task was cancelled (`sdk::cancel`).
    #[error("{0}")]
    TaskCancelled(Box<TaskError>),
    /// A borrowed object cannot be read because the process that owns it died (its objects
    /// went with it): which owner, and how that was found.
    #[error("object {0} cannot be read: {1}")]
    OwnerDied(ObjectId, String),
    /// A failure inside the SDK itself (a task of its runtime panicked or was cancelled).
    #[error("internal: {0}")]
    Internal(String),
}

impl From<RpcError> for Error {
    fn from(e: RpcError) -> Self {
        Self::Rpc(ClientError::Rpc(e))
    }
}

impl Error {
    /// What the cluster answered, when a call to it failed with an answer.
    pub fn rpc(&self) -> Option<&RpcError> {
        match self {
            Self::Rpc(e) => e.rpc(),
            _ => None,
        }
    }

    /// Whether the same call may succeed if tried again: no head answered, the cluster
    /// was unavailable, busy or changing leaders, or a wait timed out.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(..) => true,
            Self::Rpc(ClientError::Unreachable { .. }) => true,
            Self::Rpc(ClientError::Rpc(e)) => matches!(
                e,
                RpcError::NotLeader { .. }
                    | RpcError::Unavailable(_)
                    | RpcError::DeadlineExceeded(_)
                    | RpcError::ResourceExhausted(_)
            ),
            _ => false,
        }
    }
}

/// Where the scheduler may place a task.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Strategy {
    /// Pack onto the submitting node until it is half used, then spread (Ray's default).
    #[default]
    Default,
    /// One task per lease, rotating over the nodes that fit.
    Spread,
    /// A given node; `soft` lets it run elsewhere when that node is dead or cannot fit it.
    NodeAffinity { node: NodeId, soft: bool },
    /// In a placement group's bundle (`bundle` None: any of its bundles). The task's
    /// resources come out of the bundle's reservation.
    PlacementGroup {
        pg: PlacementGroup,
        bundle: Option<usize>,
    },
}

/// Per-call options of a remote function (Ray's `.options(...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOptions {
    pub num_cpus: f64,
    pub num_gpus: f64,
    /// Bytes of the `memory` resource.
    pub memory: f64,
    /// Custom resources.
    pub resources: BTreeMap<String, f64>,
    /// Retries after system failures (the worker or its node died). Default 3.
    pub max_retries: u32,
    /// Also retry (within `max_retries`) when the function itself failed (panicked), as
    /// Ray's `retry_exceptions=True`. Default false.
    pub retry_exceptions: bool,
    pub strategy: Strategy,
    /// Record its state changes for `rayctl list tasks`, the dashboard and `ray_tasks`
    /// (Ray's `enable_task_events`). Default true; off saves their cost on hot paths.
    pub enable_task_events: bool,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            num_cpus: 1.0,
            num_gpus: 0.0,
            memory: 0.0,
            resources: BTreeMap::new(),
            max_retries: 3,
            retry_exceptions: false,
            strategy: Strategy::Default,
            enable_task_events: true,
        }
    }
}

impl TaskOptions {
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.num_cpus = n;
        self
    }
    pub fn num_gpus(mut self, n: f64) -> Self {
        self.num_gpus = n;
        self
    }
    pub fn memory(mut self, bytes: f64) -> Self {
        self.memory = bytes;
        self
    }
    pub fn resource(mut self, name: &str, amount: f64) -> Self {
        self.resources.insert(name.to_owned(), amount);
        self
    }
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }
    pub fn retry_exceptions(mut self, yes: bool) -> Self {
        self.retry_exceptions = yes;
        self
    }
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }
    pub fn enable_task_events(mut self, yes: bool) -> Self {
        self.enable_task_events = yes;
        self
    }

    /// The resource shape a lease asks for (amounts of zero left out), validated and in
    /// the scheduler's fixed point.
    pub(crate) fn shape(&self) -> Result<scheduler::ResourceSet, String> {
        let mut m = self.resources.clone();
        for (k, v) in [
            ("CPU", self.num_cpus),
            ("GPU", self.num_gpus),
            ("memory", self.memory),
        ] {
            if v != 0.0 {
                m.insert(k.to_owned(), v);
            }
        }
        m.retain(|_, v| *v != 0.0);
        scheduler::ResourceSet::from_map(m.iter().map(|(k, v)| (k.as_str(), *v)))
            .map_err(|e| e.to_string())?;
        let m = match &self.strategy {
            Strategy::PlacementGroup { pg, bundle } => pg::in_bundle(m, pg, *bundle),
            _ => m,
        };
        scheduler::ResourceSet::from_map(m.iter().map(|(k, v)| (k.as_str(), *v)))
            .map_err(|e| e.to_string())
    }
}

/// A reference to a value that exists, or will, somewhere in the cluster. Cloning is cheap;
/// the value is freed when the last clone (and every task using it) is gone.
pub struct ObjectRef<T> {
    pub(crate) h: Arc<owner::Handle>,
    _t: PhantomData<fn() -> T>,
}

impl<T> ObjectRef<T> {
    pub(crate) fn new(h: Arc<owner::Handle>) -> Self {
        Self { h, _t: PhantomData }
    }
    pub fn id(&self) -> ObjectId {
        self.h.id
    }
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        Self::new(self.h.clone())
    }
}

impl<T> std::fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ObjectRef<{}>({})",
            std::any::type_name::<T>(),
            self.h.id
        )
    }
}

impl<T: Value> ObjectRef<T> {
    /// Same as [`get`].
    pub fn get(&self) -> Result<T, Error> {
        get(self)
    }
}

/// `r.await` gets the value (as [`get_async`]), from any executor.
impl<T: Value> std::future::IntoFuture for ObjectRef<T> {
    type Output = Result<T, Error>;
    type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { get_async(&self).await })
    }
}

impl<T: Value> std::future::IntoFuture for &ObjectRef<T> {
    type Output = Result<T, Error>;
    type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        self.clone().into_future()
    }
}

/// Stores `value` in the cluster and returns a reference owned by this process. Small values
/// stay in this process; large ones go to the local node's store (over the network in
/// remote mode).
pub fn put<T: Value>(value: &T) -> Result<ObjectRef<T>, Error> {
    runtime::current()?.put(value).map(ObjectRef::new)
}

/// Waits for the value (as long as it takes) and returns an owned copy of it.
pub fn get<T: Value>(r: &ObjectRef<T>) -> Result<T, Error> {
    get_timeout(r, None)
}

/// [`get`] giving up after `timeout`.
pub fn get_timeout<T: Value>(r: &ObjectRef<T>, timeout: Option<Duration>) -> Result<T, Error> {
    let rt = runtime::current()?;
    rt.spin_until_ready(r.h.id);
    rt.block_on(rt.clone().get_value::<T>(r.h.id, timeout))
}

/// Gets many values in order; the first failure is returned.
pub fn get_all<T: Value>(refs: &[ObjectRef<T>]) -> Result<Vec<T>, Error> {
    let rt = runtime::current()?;
    rt.block_on(async {
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            out.push(rt.clone().get_value::<T>(r.h.id, None).await?);
        }
        Ok(out)
    })
}

/// [`get`] for async code.
pub async fn get_async<T: Value>(r: &ObjectRef<T>) -> Result<T, Error> {
    let rt = runtime::current()?;
    let id = r.h.id;
    let rt2 = rt.clone();
    // The fetch may block on the local store socket: run it off the caller's executor.
    rt.spawn(async move { rt2.get_value::<T>(id, None).await })
        .await
        .map_err(|e| Error::Internal(format!("the fetch of {id} ended: {e}")))?
}

/// A zero-copy view of the value: in the node's shared memory when the object is in the
/// local store (no copy, whatever its size).
pub fn get_view<T: Value>(r: &ObjectRef<T>) -> Result<View<T>, Error> {
    let rt = runtime::current()?;
    rt.block_on(rt.clone().get_view::<T>(r.h.id, None))
}

/// What [`wait`] returns: the ready refs and the others.
pub type WaitResult<T> = (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>);

/// Waits until `num_returns` of `refs` are ready (finished or failed) or `timeout` passes.
/// Returns (ready, not ready), each in the order given.
pub fn wait<T>(
    refs: &[ObjectRef<T>],
    num_returns: usize,
    timeout: Option<Duration>,
) -> Result<WaitResult<T>, Error> {
    let rt = runtime::current()?;
    let ids: Vec<ObjectId> = refs.iter().map(|r| r.h.id).collect();
    let n = num_returns.min(refs.len());
    let ready = if refs.iter().any(|r| r.h.borrowed().is_some()) {
        let _unblock = rt.blocked(true);
        rt.block_on(rt.clone().wait_borrowed(refs, n, timeout))
    } else {
        let pending = ids
            .iter()
            .any(|id| matches!(rt.owner.state(*id), Some(owner::State::Pending)));
        let _unblock = rt.blocked(pending);
        rt.block_on(rt.owner.wait(&ids, n, timeout))
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (r, ok) in refs.iter().zip(ready) {
        if ok {
            a.push(r.clone())
        } else {
            b.push(r.clone())
        }
    }
    Ok((a, b))
}

/// True in a worker process (started by a node). A program whose `main` does other things
/// before `init` should call `init` first when this is true.
pub fn is_worker() -> bool {
    std::env::var_os(protocol::env::WORKER_ID).is_some_and(|v| !v.is_empty())
}

/// Cancels the task or actor call whose result `r` is (Ray's `ray.cancel`). A task not yet
/// running never runs; a running one sees `is_cancelled()`, and with `opts.force` its worker
/// is killed; `opts.recursive` cancels what it submitted too. Then `get` on `r` gives
/// `Error::TaskCancelled`. A task that already finished keeps its result. An actor call
/// not yet sent is dropped; a running one is only told (an actor's worker is never killed
/// by a cancel).
pub fn cancel<T>(r: &ObjectRef<T>, opts: CancelOptions) -> Result<(), Error> {
    let rt = runtime::current()?;
    if r.h.borrowed().is_some() {
        return Err(Error::Internal(format!(
            "cannot cancel {}: only the process that submitted its task (its owner) can",
            r.h.id
        )));
    }
    rt.submit_tx
        .send(submit::Event::Cancel(r.h.id, opts))
        .map_err(|_| Error::Internal("the submitter has stopped".into()))
}

/// This process's node (the node it leases from; in remote mode, the node it talks to).
pub fn node_id() -> Result<NodeId, Error> {
    let rt = runtime::current()?;
    rt.node
        .node_id
        .parse()
        .map_err(|e: protocol::ids::IdError| Error::Init(e.to_string()))
}

/// An argument of a remote function: a value, or a reference to one.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be passed where the remote function takes `{P}`",
    label = "pass a `{P}` or an `ObjectRef<{P}>`",
    note = "a type of your own must be marked `#[sdk::value]`"
)]
pub trait IntoArg<P> {
    #[doc(hidden)]
    fn into_arg(self) -> __private::ArgOut;
}

impl<T: Value> IntoArg<T> for T {
    fn into_arg(self) -> __private::ArgOut {
        __private::ArgOut::encode(&self)
    }
}
impl<T: Value> IntoArg<T> for ObjectRef<T> {
    fn into_arg(self) -> __private::ArgOut {
        __private::ArgOut::Ref(self.h)
    }
}
impl<T: Value> IntoArg<T> for &ObjectRef<T> {
    fn into_arg(self) -> __private::ArgOut {
        __private::ArgOut::Ref(self.h.clone())
    }
}
impl<T: Value> IntoArg<View<T>> for ObjectRef<T> {
    fn into_arg(self) -> __private::ArgOut {
        __private::ArgOut::Ref(self.h)
    }
}
impl<T: Value> IntoArg<View<T>> for &ObjectRef<T> {
    fn into_arg(self) -> __private::ArgOut {
        __private::ArgOut::Ref(self.h.clone())
    }
}
impl<T: Value> IntoArg<View<T>> for T {
    fn into_arg(self) -> __private::ArgOut {
        __private::ArgOut::encode(&self)
    }
}
/// `"text"` for a `String` parameter.
impl IntoArg<String> for &str {
    fn into_arg(self) -> __private::ArgOut {
        __private::ArgOut::encode(&self.to_owned())
    }
}
impl IntoArg<View<String>> for &str {
    fn into_arg(self) -> __private::ArgOut {
        __private::ArgOut::encode(&self.to_owned())
    }
}

/// What `#[remote]` expands to uses these; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use inventory;

    use std::sync::Arc;

    use crate::value::{self, Value};
    use crate::{ObjectRef, TaskOptions};

    pub use crate::worker::{
        ArgError, ArgIn, Args, Encoded, FromArg, encode_return, encode_return_at, stream_items,
    };

    /// A registered remote function.
    pub struct RemoteFunction {
        pub name: &'static str,
        pub invoke: fn(&mut Args<'_>) -> Result<Encoded, ArgError>,
    }

    inventory::collect!(RemoteFunction);

    /// An actor's state in its worker: `&self` methods take it shared, `&mut self` ones alone.
    pub type ActorCell = std::sync::RwLock<Box<dyn std::any::Any + Send + Sync>>;

    /// An `#[actor]` type: its constructor, by class name.
    pub struct ActorClass {
        pub name: &'static str,
        pub construct: fn(&mut Args<'_>) -> Result<Box<dyn std::any::Any + Send + Sync>, ArgError>,
    }

    inventory::collect!(ActorClass);

    /// A method of an `#[actor]` type, by `class::method`.
    pub struct ActorMethod {
        pub name: &'static str,
        pub invoke: fn(&ActorCell, &mut Args<'_>) -> Result<Encoded, ArgError>,
    }

    inventory::collect!(ActorMethod);

    pub fn create_actor(
        class: &'static str,
        opts: &crate::ActorOptions,
        args: Vec<ArgOut>,
    ) -> Result<crate::ActorHandle, crate::Error> {
        crate::actor::create(class, opts, args)
    }

    pub fn downcast_error(class: &str) -> ArgError {
        ArgError(format!("the actor's state is not a {class}"))
    }

    /// An argument on the submitting side.
    #[derive(Clone)]
    pub enum ArgOut {
        /// A small value, sent inline.
        Inline(protocol::pb::Value),
        /// A small value with object refs inside: the refs are kept alive with the task.
        InlineRefs(protocol::pb::Value, Arc<[Arc<crate::owner::Handle>]>),
        /// An object (resolved before the task is pushed).
        Ref(Arc<crate::owner::Handle>),
        /// The value could not be encoded or stored.
        Failed(String),
    }

    impl ArgOut {
        pub(crate) fn encode<T: Value>(v: &T) -> Self {
            let rt = match crate::runtime::current() {
                Ok(rt) => rt,
                Err(e) => return ArgOut::Failed(e.to_string()),
            };
            match value::archived_size(v) {
                Err(e) => ArgOut::Failed(e),
                Ok(n) if n <= value::INLINE_MAX => {
                    match crate::borrow::sending(|| value::archive(v)) {
                        (Ok(b), refs) => {
                            let v = protocol::pb::Value {
                                kind: Some(protocol::pb::value::Kind::Inline(
                                    prost::bytes::Bytes::copy_from_slice(&b),
                                )),
                                type_tag: value::type_tag::<T>(),
                                object_id: Default::default(),
                            };
                            if refs.is_empty() {
                                ArgOut::Inline(v)
                            } else {
                                ArgOut::InlineRefs(v, refs.into())
                            }
                        }
                        (Err(e), _) => ArgOut::Failed(e),
                    }
                }
                // Large arguments go through the object store, passed by reference.
                Ok(_) => match rt.put(v) {
                    Ok(h) => ArgOut::Ref(h),
                    Err(e) => ArgOut::Failed(e.to_string()),
                },
            }
        }
    }

    /// Submits a call of the registered function `name`.
    pub fn submit<R: Value>(
        name: &'static str,
        opts: &TaskOptions,
        args: Vec<ArgOut>,
    ) -> ObjectRef<R> {
        let rt = crate::runtime::current()
            .unwrap_or_else(|e| panic!("{name}::remote() needs sdk::init() first: {e}"));
        ObjectRef::new(rt.submit(name, opts, args))
    }

    /// Submits a call of a function with `n` returns (`num_returns = n`): one untyped ref
    /// per return, which the generated stub types.
    pub fn submit_n(
        name: &'static str,
        opts: &TaskOptions,
        args: Vec<ArgOut>,
        n: u8,
    ) -> Vec<ObjectRef<()>> {
        let rt = crate::runtime::current()
            .unwrap_or_else(|e| panic!("{name}::remote() needs sdk::init() first: {e}"));
        rt.submit_n(name, opts, args, n)
            .into_iter()
            .map(ObjectRef::new)
            .collect()
    }

    /// Submits a call of a streaming function (`num_returns = "streaming"`).
    pub fn submit_stream<R>(
        name: &'static str,
        opts: &TaskOptions,
        args: Vec<ArgOut>,
    ) -> crate::ObjectRefGenerator<R> {
        let rt = crate::runtime::current()
            .unwrap_or_else(|e| panic!("{name}::remote() needs sdk::init() first: {e}"));
        let end = ObjectRef::new(rt.submit_stream(name, opts, args));
        crate::ObjectRefGenerator::new(rt, end)
    }

    /// Runs an `async fn` remote function or actor method to completion on the SDK's
    /// runtime (the calling thread waits; an actor runs `max_concurrency` of them at once).
    pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
        let rt = crate::runtime::current()
            .unwrap_or_else(|e| panic!("an async remote function needs sdk::init() first: {e}"));
        rt.block_on(f)
    }

    /// Gives an untyped ref its type (the generated stub knows it).
    pub fn typed<R>(r: ObjectRef<()>) -> ObjectRef<R> {
        ObjectRef::new(r.h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_make_the_lease_shape_and_reject_bad_amounts() {
        let s = TaskOptions::default()
            .num_gpus(1.0)
            .resource("accel", 0.5)
            .shape()
            .unwrap();
        assert_eq!(
            s.iter().map(|(k, v)| (k.to_owned(), v)).collect::<Vec<_>>(),
            [
                ("CPU".to_string(), 1.0),
                ("GPU".to_string(), 1.0),
                ("accel".to_string(), 0.5)
            ]
        );
        // Zero CPUs: a lease of nothing, placeable anywhere.
        assert!(
            TaskOptions::default()
                .num_cpus(0.0)
                .shape()
                .unwrap()
                .is_empty()
        );
        let e = TaskOptions::default().num_cpus(-1.0).shape().unwrap_err();
        assert!(e.contains("CPU"), "{e}");
        assert!(TaskOptions::default().resource("", 1.0).shape().is_err());
    }

    #[test]
    fn calls_before_init_are_clear_errors() {
        let e = current_or_error();
        assert!(e.contains("sdk::init()"), "{e}");
    }

    fn current_or_error() -> String {
        match runtime::current() {
            Ok(_) => "initialised".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn task_errors_name_the_function_task_node_and_worker() {
        let e = TaskError {
            kind: TaskErrorKind::Panic,
            message: "boom".into(),
            task_id: "ab".repeat(20),
            function: "m::f".into(),
            node_id: "n1".into(),
            worker_id: "w1".into(),
        };
        let s = Error::Task(Box::new(e)).to_string();
        assert_eq!(
            s,
            format!(
                "task m::f ({}) failed on node n1 (worker w1): PANIC: boom",
                "ab".repeat(20)
            )
        );
    }
}
