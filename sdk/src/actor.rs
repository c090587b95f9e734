//! Actors (DESIGN §4): a stateful worker created through the control plane and called
//! straight from the caller's process.
//!
//! ```ignore
//! struct Counter { n: i64 }
//!
//! #[sdk::actor]
//! impl Counter {
//!     fn new(start: i64) -> Self { Counter { n: start } }
//!     fn incr(&mut self, by: i64) -> i64 { self.n += by; self.n }
//!     fn get(&self) -> i64 { self.n }
//! }
//!
//! let c = Counter::remote(0i64)?;          // a CounterHandle
//! let r = c.incr(5i64);                    // ObjectRef<i64>
//! assert_eq!(sdk::get(&r)?, 5);
//! ```
//!
//! - The actor table is in Raft; the leader's actor manager places the actor on a node,
//!   which gives it a worker of its own and runs the constructor there.
//! - Calls from one caller run in the order it made them: they travel on one stream per
//!   (caller, actor) and the actor runs them one at a time (`max_concurrency` 1, the
//!   default). With `max_concurrency` N, up to N calls run at once: methods taking `&self`
//!   in parallel, methods taking `&mut self` alone.
//! - Restarts: `max_restarts` (default 0, -1 unlimited) as in Ray. A call in flight when the
//!   worker died is retried on the restarted actor up to `max_task_retries` times (default
//!   0); else it fails with `ActorUnavailable` (the actor restarted) or `ActorDied`.
//! - Lifetime: an actor dies with the process that created it unless it is `detached`.
//!   Named actors are found with `get_actor` in their namespace (default `"default"`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use protocol::{ActorId, NodeId, pb};

use crate::__private::ArgOut;
use crate::runtime::{self, Runtime};
use crate::{Error, ObjectRef, Value};

/// How an actor is created.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorOptions {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// With a name: return the live actor of that name instead of failing.
    pub get_if_exists: bool,
    /// Outlives the process that created it (killed only by `kill` or its node's death).
    pub detached: bool,
    /// -1: unlimited.
    pub max_restarts: i64,
    /// -1: unlimited.
    pub max_task_retries: i64,
    pub max_concurrency: u32,
    /// Held for the actor's lifetime (default none, as Ray's actors hold 0 CPU).
    pub num_cpus: f64,
    pub num_gpus: f64,
    pub memory: f64,
    pub resources: BTreeMap<String, f64>,
    /// Run on this node only.
    pub node: Option<NodeId>,
    /// Run in this placement group's bundle (None: any of its bundles); the actor's
    /// resources come out of the bundle's reservation.
    pub placement_group: Option<(crate::PlacementGroup, Option<usize>)>,
}

impl Default for ActorOptions {
    fn default() -> Self {
        Self {
            name: None,
            namespace: None,
            get_if_exists: false,
            detached: false,
            max_restarts: 0,
            max_task_retries: 0,
            max_concurrency: 1,
            num_cpus: 0.0,
            num_gpus: 0.0,
            memory: 0.0,
            resources: BTreeMap::new(),
            node: None,
            placement_group: None,
        }
    }
}

impl ActorOptions {
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = Some(ns.to_owned());
        self
    }
    pub fn get_if_exists(mut self, yes: bool) -> Self {
        self.get_if_exists = yes;
        self
    }
    pub fn detached(mut self, yes: bool) -> Self {
        self.detached = yes;
        self
    }
    pub fn max_restarts(mut self, n: i64) -> Self {
        self.max_restarts = n;
        self
    }
    pub fn max_task_retries(mut self, n: i64) -> Self {
        self.max_task_retries = n;
        self
    }
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = n;
        self
    }
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
    pub fn node(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }
    pub fn placement_group(mut self, pg: &crate::PlacementGroup, bundle: Option<usize>) -> Self {
        self.placement_group = Some((pg.clone(), bundle));
        self
    }

    fn shape(&self) -> Result<scheduler::ResourceSet, String> {
        crate::TaskOptions {
            num_cpus: self.num_cpus,
            num_gpus: self.num_gpus,
            memory: self.memory,
            resources: self.resources.clone(),
            strategy: match &self.placement_group {
                Some((pg, bundle)) => crate::Strategy::PlacementGroup {
                    pg: pg.clone(),
                    bundle: *bundle,
                },
                None => crate::Strategy::Default,
            },
            ..Default::default()
        }
        .shape()
    }
}

/// An actor's state, as the control plane has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorState {
    PendingCreation,
    Alive,
    Restarting,
    Dead,
}

/// What the control plane knows about an actor.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorInfo {
    pub actor_id: String,
    pub class_name: String,
    pub name: Option<String>,
    pub namespace: String,
    pub state: ActorState,
    pub num_restarts: u64,
    /// While alive: its node and its worker's pid.
    pub node_id: Option<NodeId>,
    pub pid: u32,
    /// Why it is restarting or dead.
    pub message: String,
}

impl From<&pb::ActorInfo> for ActorInfo {
    fn from(i: &pb::ActorInfo) -> Self {
        let state = match pb::ActorState::try_from(i.state) {
            Ok(pb::ActorState::Alive) => ActorState::Alive,
            Ok(pb::ActorState::Restarting) => ActorState::Restarting,
            Ok(pb::ActorState::Dead) => ActorState::Dead,
            _ => ActorState::PendingCreation,
        };
        Self {
            actor_id: i.actor_id.clone(),
            class_name: i.class_name.clone(),
            name: (!i.name.is_empty()).then(|| i.name.clone()),
            namespace: i.namespace.clone(),
            state,
            num_restarts: i.num_restarts,
            node_id: i.node_id.parse().ok(),
            pid: i.pid,
            message: i.message.clone(),
        }
    }
}

/// An untyped handle; `#[actor]` types wrap it in a typed one with a method per method.
///
/// A handle is a value: it can be passed to tasks and actors, returned from them and kept in
/// them; calls from every holder reach the same actor, in order per caller. An unnamed,
/// non-detached actor lives while any handle to it exists anywhere (as in Ray: the handles
/// are counted like object refs, through a *scope* object its creator owns), and the calls
/// made through them have returned; then it is killed. Named actors can be looked up by
/// anyone, so they live until killed, until their owner exits or until their job ends;
/// detached actors until killed.
#[derive(Clone)]
pub struct ActorHandle {
    pub(crate) inner: Arc<ActorRef>,
    _scope: Option<Arc<Scope>>,
}

/// Shared by this process's handles to a counted actor: when the last one drops, this
/// process's submitter lets go of the actor once its calls have returned.
struct Scope {
    id: ActorId,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Ok(rt) = runtime::current() {
            let _ = rt
                .submit_tx
                .send(crate::submit::Event::ActorOutOfScope(self.id));
        }
    }
}

/// What the submitter needs to call an actor. Its queue in the submitter holds one while
/// calls are queued or in flight, so the scope ref lives until they have returned.
#[derive(Debug)]
pub(crate) struct ActorRef {
    pub(crate) id: ActorId,
    pub(crate) class_name: String,
    pub(crate) max_task_retries: i64,
    /// For a counted actor: a ref to its scope object (the actor ends when it is freed).
    pub(crate) scope: Option<ObjectRef<()>>,
}

/// An `ActorHandle` as it is archived inside a value.
#[doc(hidden)]
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ActorWire {
    id: [u8; 16],
    class_name: String,
    max_task_retries: i64,
    scope: Option<ObjectRef<()>>,
}

impl ActorHandle {
    fn wire(&self) -> ActorWire {
        ActorWire {
            id: *self.inner.id.as_bytes(),
            class_name: self.inner.class_name.clone(),
            max_task_retries: self.inner.max_task_retries,
            scope: self.inner.scope.clone(),
        }
    }
}

impl rkyv::Archive for ActorHandle {
    type Archived = ArchivedActorWire;
    type Resolver = ActorWireResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        self.wire().resolve(resolver, out);
    }
}

impl<S> rkyv::Serialize<S> for ActorHandle
where
    S: rkyv::rancor::Fallible + ?Sized,
    ActorWire: rkyv::Serialize<S>,
{
    fn serialize(&self, s: &mut S) -> Result<Self::Resolver, S::Error> {
        self.wire().serialize(s)
    }
}

impl<D> rkyv::Deserialize<ActorHandle, D> for ArchivedActorWire
where
    D: rkyv::rancor::Fallible + ?Sized,
    D::Error: rkyv::rancor::Source,
{
    fn deserialize(&self, d: &mut D) -> Result<ActorHandle, D::Error> {
        let w: ActorWire = rkyv::Deserialize::deserialize(self, d)?;
        let id = ActorId::from_bytes(w.id);
        let scope = w.scope.as_ref().map(|_| Arc::new(Scope { id }));
        Ok(ActorHandle {
            inner: Arc::new(ActorRef {
                id,
                class_name: w.class_name,
                max_task_retries: w.max_task_retries,
                scope: w.scope,
            }),
            _scope: scope,
        })
    }
}

impl std::fmt::Debug for ActorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ActorHandle({} {})",
            self.inner.class_name, self.inner.id
        )
    }
}

impl ActorHandle {
    pub fn actor_id(&self) -> ActorId {
        self.inner.id
    }

    pub fn class_name(&self) -> &str {
        &self.inner.class_name
    }

    /// Calls `method` (its registered name) with `args`; the result comes back through the ref.
    #[doc(hidden)]
    pub fn call<R: Value>(&self, method: &'static str, args: Vec<ArgOut>) -> ObjectRef<R> {
        let rt = runtime::current()
            .unwrap_or_else(|e| panic!("{method}() needs sdk::init() first: {e}"));
        ObjectRef::new(rt.submit_actor(self.inner.clone(), method, args))
    }

    /// The actor as the control plane has it now.
    pub fn info(&self) -> Result<ActorInfo, Error> {
        let rt = runtime::current()?;
        rt.block_on(get_info(&rt, &self.inner.id, 0, 0))
            .map(|i| ActorInfo::from(&i))
    }

    /// Waits until the actor is alive (its constructor returned); `ActorDied` if it died.
    pub fn ready(&self, timeout: Duration) -> Result<ActorInfo, Error> {
        let rt = runtime::current()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let i = rt.block_on(get_info(
                &rt,
                &self.inner.id,
                left.min(Duration::from_secs(5)).as_millis() as u64,
                0,
            ))?;
            let info = ActorInfo::from(&i);
            match info.state {
                ActorState::Alive => return Ok(info),
                ActorState::Dead => {
                    return Err(Error::ActorDied(Box::new(actor_error(
                        &self.inner,
                        crate::TaskErrorKind::ActorDied,
                        info.message,
                    ))));
                }
                _ if left.is_zero() => {
                    return Err(Error::Timeout(
                        timeout,
                        format!("actor {} to be alive ({:?})", self.inner.id, info.state),
                    ));
                }
                _ => {}
            }
        }
    }

    /// Kills the actor's worker. With `no_restart` it is dead for good; else it restarts if
    /// it has restarts left (as Ray's `ray.kill(actor, no_restart=False)`).
    pub fn kill(&self, no_restart: bool) -> Result<(), Error> {
        let rt = runtime::current()?;
        let req = pb::KillActorRequest {
            actor_id: self.inner.id.to_string(),
            no_restart,
            reason: String::new(),
        };
        rt.block_on(rt.head()?.call(|mut c| {
            let req = req.clone();
            async move { c.kill_actor(req).await }
        }))
        .map_err(Error::Rpc)?;
        Ok(())
    }
}

pub(crate) fn actor_error(
    a: &ActorRef,
    kind: crate::TaskErrorKind,
    message: String,
) -> crate::TaskError {
    crate::TaskError {
        kind,
        message: format!("actor {} ({}): {message}", a.id, a.class_name),
        task_id: String::new(),
        function: a.class_name.clone(),
        node_id: String::new(),
        worker_id: String::new(),
    }
}

pub(crate) async fn get_info(
    rt: &Runtime,
    id: &ActorId,
    wait_ms: u64,
    min_restarts: u64,
) -> Result<pb::ActorInfo, Error> {
    let req = pb::GetActorRequest {
        actor_id: id.to_string(),
        wait_ms,
        min_restarts,
        ..Default::default()
    };
    rt.head()?
        .call(|mut c| {
            let req = req.clone();
            async move { c.get_actor(req).await }
        })
        .await
        .map_err(Error::Rpc)
}

/// Finds a live named actor (namespace `None`: "default").
pub fn get_actor(name: &str, namespace: Option<&str>) -> Result<ActorHandle, Error> {
    let rt = runtime::current()?;
    let req = pb::GetActorRequest {
        name: name.to_owned(),
        namespace: namespace.unwrap_or_default().to_owned(),
        ..Default::default()
    };
    let i = rt
        .block_on(rt.head()?.call(|mut c| {
            let req = req.clone();
            async move { c.get_actor(req).await }
        }))
        .map_err(|e| match e.rpc() {
            Some(protocol::RpcError::NotFound(m)) => Error::Actor(m.clone()),
            _ => Error::Rpc(e),
        })?;
    if i.state == pb::ActorState::Dead as i32 {
        return Err(Error::Actor(format!(
            "the actor named {name:?} is dead: {}",
            i.message
        )));
    }
    Ok(ActorHandle {
        inner: Arc::new(ActorRef {
            id: answered_id(&i)?,
            class_name: i.class_name,
            max_task_retries: i.max_task_retries,
            scope: None,
        }),
        _scope: None,
    })
}

/// The id of the actor the control plane answered about.
fn answered_id(i: &pb::ActorInfo) -> Result<ActorId, Error> {
    i.actor_id.parse().map_err(|e| {
        Error::Actor(format!(
            "the control plane answered with a bad actor id: {e}"
        ))
    })
}

/// Creates an actor of `class` (what `Type::remote_with` calls).
pub(crate) fn create(
    class: &'static str,
    opts: &ActorOptions,
    args: Vec<ArgOut>,
) -> Result<ActorHandle, Error> {
    let rt = runtime::current()?;
    let shape = opts
        .shape()
        .map_err(|e| Error::Actor(format!("bad resources: {e}")))?;
    let mut ctor_args = Vec::with_capacity(args.len());
    for (i, a) in args.into_iter().enumerate() {
        ctor_args.push(match a {
            ArgOut::Inline(v) => v,
            ArgOut::InlineRefs(..) => return Err(Error::Actor(format!("constructor argument {i}: holds object refs, which constructor arguments cannot (they are kept in the actor table for restarts); pass them to a method instead"))),
            ArgOut::Ref(h) => match rt.owner.state(h.id) {
                Some(crate::owner::State::Inline { bytes, tag }) => pb::Value { kind: Some(pb::value::Kind::Inline(bytes)), type_tag: tag, object_id: Vec::new() },
                _ => return Err(Error::Actor(format!("constructor argument {i}: pass a value of at most {} bytes (object refs that are not small and ready cannot be kept in the actor table)", crate::INLINE_MAX))),
            },
            ArgOut::Failed(e) => return Err(Error::Actor(format!("constructor argument {i}: {e}"))),
        });
    }
    let id = rt.new_actor_id();
    let spec = pb::ActorSpec {
        class_name: class.to_owned(),
        constructor: Some(pb::TaskSpec {
            task_id: vec![0; 20],
            function: class.to_owned(),
            args: ctor_args,
            attempt: 0,
            num_returns: 1,
            streaming: false,
        }),
        resources: shape.iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        binary_sha256: rt.binary.0.clone(),
        binary_source: rt.binary.1.clone(),
        max_concurrency: opts.max_concurrency.max(1),
        max_restarts: opts.max_restarts,
        max_task_retries: opts.max_task_retries,
        detached: opts.detached,
        owner_prefix: rt.prefix.to_vec(),
        node_id: opts.node.map(|n| n.to_string()).unwrap_or_default(),
    };
    let req = pb::CreateActorRequest {
        actor_id: id.to_string(),
        job_id: rt.job().to_owned(),
        name: opts.name.clone().unwrap_or_default(),
        namespace: opts.namespace.clone().unwrap_or_default(),
        get_if_exists: opts.get_if_exists,
        spec: Some(spec),
    };
    let i = rt
        .block_on(rt.head()?.call(|mut c| {
            let req = req.clone();
            async move { c.create_actor(req).await }
        }))
        .map_err(|e| match e.rpc() {
            Some(protocol::RpcError::AlreadyExists(m) | protocol::RpcError::InvalidArgument(m)) => {
                Error::Actor(m.clone())
            }
            _ => Error::Rpc(e),
        })?;
    if i.class_name != class {
        return Err(Error::Actor(format!(
            "the actor named {:?} is a {}, not a {class}",
            opts.name.as_deref().unwrap_or(""),
            i.class_name
        )));
    }
    // Only the handles of an actor made here, unnamed and not detached, end it when dropped.
    let answered = answered_id(&i)?;
    let scoped = answered == id && opts.name.as_deref().is_none_or(str::is_empty) && !opts.detached;
    // The scope object: while any process holds a ref to it (a handle, or calls not yet
    // returned), the actor lives; when it is freed, the actor is killed.
    let scope_ref = scoped.then(|| {
        let tx = rt.submit_tx.clone();
        ObjectRef::new(rt.owner.add_scope(
            rt.new_id(2),
            Box::new(move || {
                let _ = tx.send(crate::submit::Event::ActorUnreferenced(answered));
            }),
        ))
    });
    let scope = scoped.then(|| Arc::new(Scope { id: answered }));
    Ok(ActorHandle {
        inner: Arc::new(ActorRef {
            id: answered,
            class_name: i.class_name,
            max_task_retries: i.max_task_retries,
            scope: scope_ref,
        }),
        _scope: scope,
    })
}
