//! The per-process runtime: how `init` finds its node, and the object operations (put, get,
//! fetch, free) every mode shares.
//!
//! Modes:
//! - **worker**: started by a node (`RAYCTL_WORKER_ID`); serves tasks, never returns from init.
//! - **local**: a driver on a node (a job's entrypoint, or started by hand on a node's
//!   machine): objects go through the node's shared-memory store.
//! - **remote**: a driver on a machine that is not a node: it talks to one node over gRPC
//!   and its objects travel over the network (`WriteObject`/`ReadChunk`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::StoreClient;
use prost::bytes::Bytes;
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient, NmClient, OmClient};
use protocol::{JobId, ObjectId, WorkerId, pb};
use tokio::sync::mpsc;

use crate::owner::{Handle, Loc, Owner, Rebuild, State};
use crate::value::{self, Source, Value, View};
use crate::{Error, TaskOptions, submit};

static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();

pub(crate) fn current() -> Result<Arc<Runtime>, Error> {
    RUNTIME
        .get()
        .cloned()
        .ok_or_else(|| Error::Init("sdk::init() has not been called in this process".into()))
}

pub(crate) struct Unblock<'a> {
    rt: &'a Runtime,
    lease: Arc<str>,
}

impl Drop for Unblock<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.rt.channel.get() {
            let _ = tx.send(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Unblocked(self.lease.to_string())),
            });
        }
    }
}

pub(crate) enum Resolved {
    Inline(Bytes, String),
    Stored(Source, String),
}

/// How `init` connects.
#[derive(Debug, Clone)]
pub struct Config {
    /// Head addresses (`host:port[,host:port…]`); default `RAYCTL_ADDRESS`, then the cluster
    /// `rayctl start` last started on this machine, else a new one-node cluster.
    pub address: Option<String>,
    /// Talk to the cluster over the network even on a node's machine (`RAYCTL_REMOTE=1`).
    pub remote: bool,
    /// CPUs of the one-node cluster started when there is none (default: all).
    pub local_num_cpus: Option<f64>,
    /// Print what this process's tasks and actors print, on this process's stderr, each line
    /// prefixed `(NAME pid=PID, ip=IP)` (Ray's `log_to_driver`; default true).
    pub log_to_driver: bool,
    /// How long a blocking `get` of a pending object keeps checking (yielding the CPU between
    /// checks) before it sleeps; default 200 µs, `RAYCTL_GET_SPIN_US` overrides it in every
    /// process of a job (workers too), 0 turns it off. A reply that lands within it is seen
    /// without a sleeping thread being woken, which on a virtual machine costs more than the
    /// call itself (`bench actors`: sync calls 7,000/s without, 12,500/s with).
    pub get_spin: Duration,
}

/// Names the variable that sets [`Config::get_spin`] in microseconds.
pub const GET_SPIN_ENV: &str = "RAYCTL_GET_SPIN_US";
const DEFAULT_GET_SPIN: Duration = Duration::from_micros(200);
const MAX_GET_SPIN: Duration = Duration::from_millis(10);

/// `cfg`'s spin, unless the environment sets one; a bad value is an init error.
fn get_spin(cfg: Duration) -> Result<Duration, Error> {
    parse_get_spin(std::env::var(GET_SPIN_ENV).ok().as_deref(), cfg)
}

fn parse_get_spin(env: Option<&str>, cfg: Duration) -> Result<Duration, Error> {
    let Some(v) = env.filter(|v| !v.is_empty()) else {
        return Ok(cfg.min(MAX_GET_SPIN));
    };
    v.trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_micros)
        .filter(|d| *d <= MAX_GET_SPIN)
        .ok_or_else(|| {
            Error::Init(format!(
                "{GET_SPIN_ENV}={v:?}: expected microseconds from 0 to {}",
                MAX_GET_SPIN.as_micros()
            ))
        })
}

impl Default for Config {
    fn default() -> Self {
        Self {
            address: None,
            remote: false,
            local_num_cpus: None,
            log_to_driver: true,
            get_spin: DEFAULT_GET_SPIN,
        }
    }
}

impl Config {
    /// Whether worker output reaches this process (see `log_to_driver`).
    pub fn log_to_driver(mut self, on: bool) -> Self {
        self.log_to_driver = on;
        self
    }
    /// How long a blocking `get` checks before it sleeps (see `get_spin`; at most 10 ms).
    pub fn get_spin(mut self, spin: Duration) -> Self {
        self.get_spin = spin;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Worker,
    Local,
    Remote,
}

/// The node this process leases from and stores into.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub(crate) node_id: String,
    pub(crate) address: String,
    pub(crate) om: String,
}

impl NodeInfo {
    pub(crate) fn loc(&self) -> Loc {
        Loc {
            node_id: self.node_id.clone(),
            om: self.om.clone(),
            nm: self.address.clone(),
        }
    }
}

/// Task counters, reported to the node every second.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) pending_args: AtomicU64,
    pub(crate) pending_node: AtomicU64,
    pub(crate) submitted: AtomicU64,
    pub(crate) running: AtomicU64,
    pub(crate) finished: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) executed: AtomicU64,
    pub(crate) reconstructions: AtomicU64,
}

impl Stats {
    pub(crate) fn to_pb(&self) -> pb::WorkerStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        pb::WorkerStats {
            owned_by_state: [
                ("PENDING_ARGS_AVAIL".to_string(), g(&self.pending_args)),
                ("PENDING_NODE_ASSIGNMENT".to_string(), g(&self.pending_node)),
                ("SUBMITTED_TO_WORKER".to_string(), g(&self.submitted)),
            ]
            .into_iter()
            .collect(),
            tasks_running: g(&self.running),
            tasks_finished_total: g(&self.finished),
            tasks_failed_total: g(&self.failed),
            task_retries_total: g(&self.retries),
            tasks_executed_total: g(&self.executed),
            reconstructions_total: g(&self.reconstructions),
            objects_owned: 0,
        }
    }
}

impl Runtime {
    /// Waits up to `get_spin` for `id` (owned here) to stop being pending, yielding the CPU
    /// between checks, so a reply that comes soon is taken without parking this thread.
    pub(crate) fn spin_until_ready(&self, id: ObjectId) {
        let spin = Duration::from_nanos(self.get_spin.load(Ordering::Relaxed));
        if spin.is_zero() || !self.owner.is_pending(id) {
            return;
        }
        let t = std::time::Instant::now();
        while t.elapsed() < spin && self.owner.is_pending(id) {
            std::thread::yield_now();
        }
    }
}

pub(crate) struct Runtime {
    rt: tokio::runtime::Runtime,
    /// Task events until the next report.
    pub(crate) task_log: crate::events::TaskLog,
    pub(crate) mode: Mode,
    pub(crate) node: NodeInfo,
    pub(crate) store: Option<StoreClient>,
    pub(crate) token: Option<AuthToken>,
    pub(crate) owner: Arc<Owner>,
    /// Refs this process borrows, and the watches on its own borrowers.
    pub(crate) borrows: Arc<crate::borrow::Borrows>,
    /// Items of the streaming tasks this process reads.
    pub(crate) streams: crate::stream::Streams,
    pub(crate) submit_tx: mpsc::UnboundedSender<submit::Event>,
    /// sha256 of the worker binary, and the node to fetch it from.
    pub(crate) binary: (String, String),
    /// The job this process belongs to (none: a driver started by hand).
    pub(crate) job_id: Option<JobId>,
    /// In a worker: its id.
    pub(crate) worker_id: Option<WorkerId>,
    pub(crate) prefix: [u8; 11],
    counter: AtomicU64,
    /// The options and key of the last task submitted: calls of one function mostly have
    /// the same options, so the key (and its lease queue) is found without rebuilding it.
    last_key: Mutex<Option<(TaskOptions, Arc<submit::Key>)>>,
    /// The key of actor calls (they run on the actor's lease, not one of their own).
    call_key: Arc<submit::Key>,
    pub(crate) stats: Arc<Stats>,
    nm_clients: Mutex<HashMap<String, NmClient>>,
    om_clients: Mutex<HashMap<String, OmClient>>,
    /// The stream to this process's node (stats; for workers also lease events).
    pub(crate) channel: OnceLock<mpsc::UnboundedSender<pb::WorkerMessage>>,
    /// In a worker: the lease of the task running now.
    pub(crate) running_lease: Mutex<Option<Arc<str>>>,
    /// The head addresses (for actor calls to the control plane).
    heads: Vec<String>,
    head: OnceLock<HeadClient>,
    /// In an actor's worker: the actor it hosts.
    pub(crate) actor: OnceLock<Arc<crate::worker::ActorHost>>,
    /// In an actor's worker: until when its node lets it serve (`NodeToWorker.serve_ms`).
    pub(crate) serve_until: Mutex<Option<std::time::Instant>>,
    /// Whether what this process's calls print is sent here (`Config::log_to_driver`).
    pub(crate) log_to_driver: std::sync::atomic::AtomicBool,
    /// `Config::get_spin` in nanoseconds.
    pub(crate) get_spin: AtomicU64,
}

/// Kept by the driver; dropping it stops the one-node cluster `init` may have started.
#[must_use = "dropping the Session at once stops the cluster init() may have started: keep it (`let _session = sdk::init()?;`) until main returns"]
pub struct Session {
    rt: Arc<Runtime>,
    cluster: Option<crate::worker::LocalCluster>,
}

impl Session {
    pub fn mode(&self) -> Mode {
        self.rt.mode
    }
    /// The node this driver uses.
    pub fn node_address(&self) -> &str {
        &self.rt.node.address
    }
    /// Objects of other processes this process holds refs to.
    pub fn borrowed_objects(&self) -> usize {
        self.rt.borrows.len()
    }

    /// Objects this process owns now (kept by its own refs or by borrowers).
    pub fn owned_objects(&self) -> usize {
        self.rt.owner.len()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Final counters, so even a driver shorter than one report period is counted.
        if let Some(tx) = self.rt.channel.get() {
            self.rt.report(tx);
        }
        // Let queued frees and the counters reach their nodes.
        self.rt
            .block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
        if let Some(c) = self.cluster.take() {
            c.stop();
        }
    }
}

/// Connects with the default [`Config`]. In a worker process it serves tasks and never returns.
pub fn init() -> Result<Session, Error> {
    init_with(Config::default())
}

pub fn init_with(cfg: Config) -> Result<Session, Error> {
    if RUNTIME.get().is_some() {
        return Err(Error::Init(
            "sdk::init() was already called in this process".into(),
        ));
    }
    let spin = get_spin(cfg.get_spin)?;
    let mut token = AuthToken::load(None).map_err(|e| Error::Init(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sdk")
        .enable_all()
        .build()
        .map_err(|e| Error::Init(format!("cannot start the tokio runtime: {e}")))?;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(worker_id) = env(protocol::env::WORKER_ID) {
        let worker_id = worker_id
            .parse::<WorkerId>()
            .map_err(|e| Error::Init(format!("{}: {e}", protocol::env::WORKER_ID)))?;
        let node = NodeInfo {
            node_id: env(protocol::env::NODE_ID).unwrap_or_default(),
            address: env(protocol::env::NODE_ADDRESS).ok_or_else(|| {
                Error::Init(format!("{} is not set", protocol::env::NODE_ADDRESS))
            })?,
            om: env(protocol::env::OBJECT_MANAGER_ADDRESS).unwrap_or_default(),
        };
        let store = connect_store(env(protocol::env::OBJECT_STORE_SOCKET))?;
        let binary = (
            env(protocol::env::BINARY_SHA256).unwrap_or_default(),
            node.address.clone(),
        );
        let heads = env(protocol::ADDRESS_ENV)
            .map(|a| HeadClient::parse_addresses(&a))
            .unwrap_or_default();
        let r = Runtime::start(
            rt,
            Mode::Worker,
            node,
            Some(store),
            token,
            binary,
            Some(worker_id),
            heads,
        )?;
        r.get_spin.store(spin.as_nanos() as u64, Ordering::Relaxed);
        crate::worker::serve(r);
    }
    let mut cluster = None;
    let mut heads = env(protocol::ADDRESS_ENV)
        .map(|a| HeadClient::parse_addresses(&a))
        .unwrap_or_default();
    let (mode, node, store) = if let Some(address) = env(protocol::env::NODE_ADDRESS)
        .filter(|_| !cfg.remote && env(protocol::env::REMOTE).is_none())
    {
        // A job's driver: the job agent named its node.
        let node = NodeInfo {
            node_id: env(protocol::env::NODE_ID).unwrap_or_default(),
            address,
            om: env(protocol::env::OBJECT_MANAGER_ADDRESS).unwrap_or_default(),
        };
        (
            Mode::Local,
            node,
            Some(connect_store(env(protocol::env::OBJECT_STORE_SOCKET))?),
        )
    } else {
        heads = match cfg.address.clone().or_else(|| env(protocol::ADDRESS_ENV)) {
            Some(a) => HeadClient::parse_addresses(&a),
            None => match latest_session_heads() {
                Some(h) => h,
                None => {
                    let c = crate::worker::LocalCluster::start(cfg.local_num_cpus)?;
                    // The cluster it started made a token if there was none.
                    token = AuthToken::load(None).map_err(|e| Error::Init(e.to_string()))?;
                    let heads = c.heads.clone();
                    cluster = Some(c);
                    heads
                }
            },
        };
        let remote = cfg.remote || env(protocol::env::REMOTE).is_some_and(|v| v != "0");
        rt.block_on(find_node(&heads, token.clone(), remote))?
    };
    let (sha, path) = rt.block_on(hash_self())?;
    let binary = (sha, node.address.clone());
    let r = Runtime::start(rt, mode, node, store, token, binary, None, heads)?;
    r.log_to_driver.store(cfg.log_to_driver, Ordering::Relaxed);
    r.get_spin.store(spin.as_nanos() as u64, Ordering::Relaxed);
    r.block_on(r.clone().register_binary(path))?;
    r.spawn(driver_channel(r.clone()));
    Ok(Session { rt: r, cluster })
}

fn connect_store(socket: Option<String>) -> Result<StoreClient, Error> {
    let socket = socket
        .ok_or_else(|| Error::Init(format!("{} is not set", protocol::env::OBJECT_STORE_SOCKET)))?;
    StoreClient::connect(&socket)
        .map_err(|e| Error::Init(format!("cannot connect to the node's object store: {e}")))
}

fn latest_session_heads() -> Option<Vec<String>> {
    // Only a session root that is this user's alone is trusted to say where the cluster is.
    let base = protocol::session::root().ok()?;
    let text = std::fs::read(base.join("session_latest").join("cluster.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    // `rayctl stop` stopped it: start our own instead of waiting for it.
    if v.get("stopped_at_ms").is_some_and(|t| !t.is_null()) {
        return None;
    }
    let heads: Vec<String> = v
        .get("heads")?
        .as_array()?
        .iter()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect();
    (!heads.is_empty()).then_some(heads)
}

/// The addresses of this process's network interfaces (in its network namespace).
fn local_ips() -> std::collections::HashSet<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Default::default();
    };
    addrs
        .filter_map(|a| {
            let s = a.address?;
            s.as_sockaddr_in()
                .map(|v4| std::net::IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
        })
        .collect()
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(|c| c == '[' || c == ']')
}

/// The nodes a driver here may attach to, best first: only nodes whose advertised address
/// is one of this machine's (this network namespace's) own, because the socket files of
/// other machines' nodes can be visible too (a shared session tree, network namespaces);
/// among those, a node on the host of a head this driver was pointed at, then heads.
fn local_candidates(
    nodes: &[pb::NodeInfo],
    heads: &[String],
    ips: &std::collections::HashSet<std::net::IpAddr>,
) -> Vec<pb::NodeInfo> {
    let mut local: Vec<pb::NodeInfo> = nodes
        .iter()
        .filter(|n| {
            let host = host_of(&n.address);
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ips.contains(&ip))
        })
        .cloned()
        .collect();
    let told: std::collections::HashSet<&str> = heads.iter().map(|h| host_of(h)).collect();
    local.sort_by_key(|n| (!told.contains(host_of(&n.address)), !n.is_head));
    local
}

/// Picks this process's node: one on this machine (see `local_candidates`) whose store
/// socket we can open (local mode), else a live node (remote mode).
async fn find_node(
    heads: &[String],
    token: Option<AuthToken>,
    remote: bool,
) -> Result<(Mode, NodeInfo, Option<StoreClient>), Error> {
    let client = HeadClient::new(
        heads,
        token.clone(),
        ClientOptions {
            deadline: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .map_err(|e| Error::Init(format!("bad cluster address: {e}")))?;
    let status = client
        .call(|mut c| async move { c.get_cluster_status(pb::GetClusterStatusRequest {}).await })
        .await
        .map_err(|e| {
            Error::Init(format!(
                "cannot reach the cluster at {}: {e}",
                heads.join(",")
            ))
        })?;
    let mut nodes: Vec<pb::NodeInfo> = status
        .nodes
        .into_iter()
        .filter(|n| n.state == pb::NodeState::Alive as i32)
        .collect();
    // Heads first: they are the nodes a driver on a head machine expects to use.
    nodes.sort_by_key(|n| !n.is_head);
    if nodes.is_empty() {
        return Err(Error::Init(format!(
            "the cluster at {} has no live node",
            heads.join(",")
        )));
    }
    let om_of = |n: &pb::NodeInfo| {
        let host = n.address.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
        format!("{host}:{}", n.ports.unwrap_or_default().object_manager_port)
    };
    if !remote {
        for n in &local_candidates(&nodes, heads, &local_ips()) {
            let Ok(mut c) = protocol::client::node_manager(
                &n.address,
                token.clone(),
                &ClientOptions::default(),
            ) else {
                continue;
            };
            let Ok(h) = c.health_check(pb::NodeHealthCheckRequest {}).await else {
                continue;
            };
            let h = h.into_inner();
            if h.object_store_socket.is_empty()
                || !std::path::Path::new(&h.object_store_socket).exists()
            {
                continue;
            }
            if h.node_id != n.node_id {
                continue;
            }
            if let Ok(store) = StoreClient::connect(&h.object_store_socket) {
                let info = NodeInfo {
                    node_id: n.node_id.clone(),
                    address: n.address.clone(),
                    om: om_of(n),
                };
                return Ok((Mode::Local, info, Some(store)));
            }
        }
    }
    let n = &nodes[0];
    Ok((
        Mode::Remote,
        NodeInfo {
            node_id: n.node_id.clone(),
            address: n.address.clone(),
            om: om_of(n),
        },
        None,
    ))
}

/// sha256 of this process's executable (what workers will run), and its path.
async fn hash_self() -> Result<(String, PathBuf), Error> {
    let path = std::env::current_exe()
        .map_err(|e| Error::Init(format!("cannot find this program's executable: {e}")))?;
    let p = path.clone();
    let sha = tokio::task::spawn_blocking(move || protocol::sha256_file(&p))
        .await
        .map_err(|e| Error::Init(e.to_string()))?
        .map_err(|e| Error::Init(format!("cannot read {}: {e}", path.display())))?;
    Ok((sha, path))
}

/// A driver's stream to its node: hello, then task counters every second.
async fn driver_channel(rt: Arc<Runtime>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let hello = pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(pb::WorkerHello {
            worker_id: String::new(),
            address: String::new(),
            pid: std::process::id(),
            job_id: rt.job().to_owned(),
            owner_prefix: rt.prefix.to_vec(),
        })),
    };
    let _ = tx.send(hello);
    let _ = rt.channel.set(tx.clone());
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut c = match rt.nm(&rt.node.address) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("no channel to this driver's node: {e}");
            return;
        }
    };
    // The call returns as soon as the node answers; the channel lasts until its reply
    // stream ends, so `r` finishes only when the channel is gone.
    let owner = rt.clone();
    let mut r = tokio::spawn(async move {
        let mut replies = c.worker_channel(stream).await?.into_inner();
        while let Some(m) = replies.message().await? {
            match m.kind {
                Some(pb::node_to_worker::Kind::ObjectsMoved(moved)) => owner.objects_moved(moved),
                Some(pb::node_to_worker::Kind::OwnerCall(call)) => owner.serve_owner_call(call),
                Some(pb::node_to_worker::Kind::Output(o))
                    if owner.log_to_driver.load(Ordering::Relaxed) =>
                {
                    crate::output::print(&o);
                }
                _ => {}
            }
        }
        Ok::<_, tonic::Status>(())
    });
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if !rt.report(&tx) {
                    return;
                }
            }
            end = &mut r => {
                let why = match end {
                    Ok(Ok(())) => "the node closed it".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    node = %rt.node.address,
                    "the channel to this driver's node ended ({why}): task events are no longer reported"
                );
                return;
            }
        }
    }
}

fn new_prefix() -> [u8; 11] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let a = h.finish().to_le_bytes();
    let mut out = [0u8; 11];
    out[..8].copy_from_slice(&a);
    out[8..].copy_from_slice(&std::process::id().to_le_bytes()[..3]);
    out
}

impl Runtime {
    #[allow(clippy::too_many_arguments)]
    fn start(
        rt: tokio::runtime::Runtime,
        mode: Mode,
        node: NodeInfo,
        store: Option<StoreClient>,
        token: Option<AuthToken>,
        binary: (String, String),
        worker_id: Option<WorkerId>,
        heads: Vec<String>,
    ) -> Result<Arc<Self>, Error> {
        let job_id = match std::env::var(protocol::env::JOB_ID) {
            Ok(j) if !j.is_empty() => Some(
                j.parse::<JobId>()
                    .map_err(|e| Error::Init(format!("{}: {e}", protocol::env::JOB_ID)))?,
            ),
            _ => None,
        };
        let (free_tx, free_rx) = mpsc::unbounded_channel();
        let (submit_tx, submit_rx) = mpsc::unbounded_channel();
        let (release_tx, release_rx) = mpsc::unbounded_channel();
        let r = Arc::new(Runtime {
            rt,
            task_log: Default::default(),
            mode,
            node,
            store,
            token,
            owner: Arc::new(Owner::new(free_tx)),
            borrows: crate::borrow::Borrows::new(release_tx),
            streams: Default::default(),
            submit_tx,
            binary,
            job_id,
            worker_id,
            prefix: new_prefix(),
            counter: AtomicU64::new(0),
            last_key: Mutex::new(None),
            call_key: submit::Key::new(Default::default(), &crate::Strategy::Default),
            stats: Arc::default(),
            nm_clients: Mutex::default(),
            om_clients: Mutex::default(),
            channel: OnceLock::new(),
            running_lease: Mutex::new(None),
            heads,
            head: OnceLock::new(),
            actor: OnceLock::new(),
            serve_until: Mutex::new(None),
            log_to_driver: std::sync::atomic::AtomicBool::new(true),
            get_spin: AtomicU64::new(DEFAULT_GET_SPIN.as_nanos() as u64),
        });
        RUNTIME
            .set(r.clone())
            .map_err(|_| Error::Init("sdk::init() was already called in this process".into()))?;
        r.spawn(free_loop(r.clone(), free_rx));
        r.spawn(crate::borrow::release_loop(r.clone(), release_rx));
        r.spawn(submit::run(r.clone(), submit_rx));
        Ok(r)
    }

    pub(crate) fn spawn<F: std::future::Future + Send + 'static>(
        &self,
        f: F,
    ) -> tokio::task::JoinHandle<F::Output>
    where
        F::Output: Send + 'static,
    {
        self.rt.spawn(f)
    }

    /// Runs `f` to completion from synchronous code (also from inside another runtime).
    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.rt.handle().block_on(f))
        } else {
            self.rt.handle().block_on(f)
        }
    }

    /// A new object id: 11 bytes unique to this process, a kind byte (0 put, 1 task), a counter.
    pub(crate) fn new_id(&self, kind: u8) -> ObjectId {
        let mut b = [0u8; 20];
        b[..11].copy_from_slice(&self.prefix);
        b[11] = kind;
        b[12..].copy_from_slice(&self.counter.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        ObjectId::from_bytes(b)
    }

    /// In an actor's worker: the lease holding the actor's resources (CPU lending while a
    /// call blocks).
    pub(crate) fn running_lease_of_actor(&self) -> Arc<str> {
        self.running_lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "".into())
    }

    /// Sends the counters and the task events gathered since the last report; false once
    /// the channel is closed.
    pub(crate) fn report(&self, tx: &mpsc::UnboundedSender<pb::WorkerMessage>) -> bool {
        let mut stats = self.stats.to_pb();
        stats.objects_owned = self.owner.len() as u64;
        if let Some(events) = self.task_log.take(self.job()) {
            let m = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::TaskEvents(events)),
            };
            if tx.send(m).is_err() {
                return false;
            }
        }
        tx.send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Stats(stats)),
        })
        .is_ok()
    }

    /// The control plane (actor creation and lookup).
    pub(crate) fn head(&self) -> Result<&HeadClient, Error> {
        if let Some(h) = self.head.get() {
            return Ok(h);
        }
        if self.heads.is_empty() {
            return Err(Error::Init(
                "this process does not know the cluster's head addresses (RAYCTL_ADDRESS)".into(),
            ));
        }
        // GetActor waits up to a few seconds per call: allow for it.
        let opts = ClientOptions {
            deadline: Duration::from_secs(60),
            rpc_timeout: Duration::from_secs(15),
            ..Default::default()
        };
        let c = HeadClient::new(&self.heads, self.token.clone(), opts)
            .map_err(|e| Error::Init(format!("bad head address: {e}")))?;
        Ok(self.head.get_or_init(|| c))
    }

    /// A client of the node manager at `addr` (an address from the cluster or from a
    /// peer's spillback reply: one that does not parse is an error, not a panic).
    pub(crate) fn nm(&self, addr: &str) -> Result<NmClient, Error> {
        let mut m = self.nm_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let opts = ClientOptions {
            rpc_timeout: Duration::from_secs(24 * 3600),
            ..Default::default()
        };
        let c =
            protocol::client::node_manager(addr, self.token.clone(), &opts).map_err(Error::from)?;
        m.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    pub(crate) fn om(&self, addr: &str) -> Result<OmClient, Error> {
        let mut m = self.om_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let opts = ClientOptions {
            rpc_timeout: Duration::from_secs(300),
            ..Default::default()
        };
        let c = protocol::client::object_manager(addr, self.token.clone(), &opts)
            .map_err(Error::from)?;
        m.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    async fn register_binary(self: Arc<Self>, path: PathBuf) -> Result<(), Error> {
        let sha = self.binary.0.clone();
        let mut c = self.nm(&self.node.address)?;
        let res = match self.mode {
            Mode::Remote => {
                let file = tokio::fs::read(&path)
                    .await
                    .map_err(|e| Error::Init(format!("cannot read {}: {e}", path.display())))?;
                let file = Bytes::from(file);
                let chunks: Vec<pb::BinaryChunk> = (0..file.len().div_ceil(4 << 20).max(1))
                    .map(|i| pb::BinaryChunk {
                        sha256: if i == 0 { sha.clone() } else { String::new() },
                        data: file.slice(i * (4 << 20)..((i + 1) * (4 << 20)).min(file.len())),
                        job_id: if i == 0 {
                            self.job().to_owned()
                        } else {
                            String::new()
                        },
                    })
                    .collect();
                c.upload_binary(futures_util::stream::iter(chunks)).await
            }
            _ => {
                c.register_binary(pb::RegisterBinaryRequest {
                    sha256: sha,
                    path: path.display().to_string(),
                    job_id: self.job().to_owned(),
                })
                .await
            }
        };
        res.map(|_| ()).map_err(|e| {
            Error::Init(format!(
                "cannot give this program to node {} for its workers: {}",
                self.node.address,
                e.message()
            ))
        })
    }

    // ---- objects ----

    pub(crate) fn put<T: Value>(self: &Arc<Self>, v: &T) -> Result<Arc<Handle>, Error> {
        let id = self.new_id(0);
        let tag = value::type_tag::<T>();
        let n = value::archived_size(v).map_err(Error::Decode)?;
        // The refs inside the value live as long as the object.
        if n <= value::INLINE_MAX {
            let (b, refs) = crate::borrow::sending(|| value::archive(v));
            let b = b.map_err(Error::Decode)?;
            let h = self.owner.add(
                id,
                State::Inline {
                    bytes: Bytes::copy_from_slice(&b),
                    tag,
                },
            );
            self.owner.contain(id, refs);
            return Ok(h);
        }
        let refs = match &self.store {
            Some(store) => {
                let mut w = store
                    .create(id, n as u64, tag.len() as u64)
                    .map_err(|e| Error::Store(e.to_string()))?;
                let (r, refs) = crate::borrow::sending(|| value::archive_into(v, w.data_mut()));
                r.map_err(Error::Decode)?;
                w.meta_mut().copy_from_slice(tag.as_bytes());
                w.seal().map_err(|e| Error::Store(e.to_string()))?;
                refs
            }
            None => {
                let (b, refs) = crate::borrow::sending(|| value::archive(v));
                let b = b.map_err(Error::Decode)?;
                self.block_on(self.write_remote(id, Bytes::from(b.into_vec()), tag.clone()))?;
                refs
            }
        };
        let h = self.owner.add(
            id,
            State::Stored {
                tag,
                locs: vec![self.node.loc()],
            },
        );
        self.owner.contain(id, refs);
        Ok(h)
    }

    /// Answers a call for this process as an owner, relayed by its node.
    pub(crate) fn serve_owner_call(self: &Arc<Self>, call: pb::RelayedOwnerCall) {
        let Some(tx) = self.channel.get().cloned() else {
            return;
        };
        let rt = self.clone();
        self.spawn(async move {
            let reply = crate::borrow::serve(rt, call).await;
            let _ = tx.send(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::OwnerReply(reply)),
            });
        });
    }

    /// Where the calls this process makes send what they print: its node, unless it asked
    /// for none (`Config::log_to_driver(false)`).
    pub(crate) fn output_node(&self) -> String {
        if self.log_to_driver.load(Ordering::Relaxed) {
            self.node.address.clone()
        } else {
            String::new()
        }
    }

    /// A draining node moved objects this process owns: record their new places.
    pub(crate) fn objects_moved(&self, req: pb::ObjectsMovedRequest) {
        for m in req.moves {
            let (Ok(id), Some(to)) = (ObjectId::from_slice(&m.object_id), m.to) else {
                continue;
            };
            tracing::debug!(object = %id, from = m.from_node_id, to = to.node_id, "object moved");
            self.owner.moved(id, &m.from_node_id, to.into());
        }
    }

    async fn write_remote(&self, id: ObjectId, data: Bytes, tag: String) -> Result<(), Error> {
        const CHUNK: usize = 4 << 20;
        let meta = Bytes::from(tag.into_bytes());
        let (ds, ms) = (data.len() as u64, meta.len() as u64);
        let mut chunks = Vec::new();
        let mut off = 0;
        while off < data.len() || chunks.is_empty() {
            let end = (off + CHUNK).min(data.len());
            chunks.push(pb::WriteObjectChunk {
                object_id: if chunks.is_empty() {
                    id.as_bytes().to_vec()
                } else {
                    Vec::new()
                },
                data_size: ds,
                metadata_size: ms,
                payload: data.slice(off..end),
            });
            off = end;
        }
        chunks.push(pb::WriteObjectChunk {
            payload: meta,
            ..Default::default()
        });
        self.om(&self.node.om)?
            .write_object(futures_util::stream::iter(chunks))
            .await
            .map_err(|e| {
                Error::Store(format!(
                    "cannot store object {id} on node {}: {}",
                    self.node.address,
                    e.message()
                ))
            })?;
        Ok(())
    }

    /// While a task of this worker waits for objects, its node may lend the task's CPU to
    /// other work (the guard takes it back).
    pub(crate) fn blocked(&self, pending: bool) -> Option<Unblock<'_>> {
        if !pending {
            return None;
        }
        let lease = self
            .running_lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let tx = self.channel.get()?;
        let _ = tx.send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Blocked(lease.to_string())),
        });
        Some(Unblock { rt: self, lease })
    }

    async fn ready(&self, id: ObjectId, timeout: Option<Duration>) -> Result<State, Error> {
        let _unblock = self.blocked(matches!(self.owner.state(id), Some(State::Pending)));
        match self.owner.ready(id, timeout).await {
            Some(s) => Ok(s),
            None if self.owner.state(id).is_none() => {
                Err(Error::ObjectLost(id, "this process does not own it".into()))
            }
            None => Err(Error::Timeout(
                timeout.unwrap_or_default(),
                format!("object {id}"),
            )),
        }
    }

    pub(crate) async fn get_value<T: Value>(
        self: Arc<Self>,
        id: ObjectId,
        timeout: Option<Duration>,
    ) -> Result<T, Error> {
        let resolved = self.clone().resolve(id, timeout).await?;
        // Refs read out of the value are this process's borrows from now on: registered
        // before the value is handed over (the object holds them until then).
        let (v, fresh) = crate::borrow::receiving(|| match resolved {
            Resolved::Inline(bytes, tag) => value::decode::<T>(&bytes, &tag),
            Resolved::Stored(src, tag) => {
                let bytes = match &src {
                    Source::Store(v) => v.data(),
                    Source::Heap(v) => &v[..],
                };
                value::decode::<T>(bytes, &tag)
            }
        });
        crate::borrow::register_self(&self, fresh).await;
        v.map_err(|e| Error::Decode(format!("object {id} {e}")))
    }

    pub(crate) async fn get_view<T: Value>(
        self: Arc<Self>,
        id: ObjectId,
        timeout: Option<Duration>,
    ) -> Result<View<T>, Error> {
        match self.clone().resolve(id, timeout).await? {
            Resolved::Inline(bytes, tag) => View::from_inline(&bytes, &tag),
            Resolved::Stored(src, tag) => View::new(src, &tag),
        }
        .map_err(|e| Error::Decode(format!("object {id} {e}")))
    }

    /// Waits for the object and makes its bytes readable here; an object whose every copy
    /// is lost is rebuilt from its lineage (the task runs again) when it can be.
    async fn resolve(
        self: Arc<Self>,
        id: ObjectId,
        timeout: Option<Duration>,
    ) -> Result<Resolved, Error> {
        if let Some(node) = self.borrows.owner_node(id) {
            let r = self.clone().resolve_borrowed(id, node);
            return match timeout {
                Some(t) => tokio::time::timeout(t, r)
                    .await
                    .map_err(|_| Error::Timeout(t, format!("object {id}")))?,
                None => r.await,
            };
        }
        loop {
            match self.ready(id, timeout).await? {
                State::Inline { bytes, tag } => return Ok(Resolved::Inline(bytes, tag)),
                State::Failed(e) => return Err(failed(*e)),
                State::Stored { tag, locs } => match self.fetch(id, locs.clone()).await {
                    Ok(src) => return Ok(Resolved::Stored(src, tag)),
                    // A drain moved it while we pulled from its old place: try the new one.
                    Err(Error::ObjectLost(..)) if self.owner.moved_since(id, &locs) => {}
                    Err(Error::ObjectLost(_, why)) => match self.owner.rebuild(id, &why) {
                        Rebuild::Run(lineage, n) => {
                            tracing::info!(object = %id, "rebuilding a lost object (rebuild {n})");
                            self.stats.reconstructions.fetch_add(1, Ordering::Relaxed);
                            self.stats.pending_args.fetch_add(1, Ordering::Relaxed);
                            let _ = self
                                .submit_tx
                                .send(submit::Event::Submit(lineage.task(id, n)));
                        }
                        Rebuild::InProgress => {}
                        Rebuild::Lost(why) => return Err(Error::ObjectLost(id, why)),
                    },
                    Err(e) => return Err(e),
                },
                State::Pending => unreachable!("ready() never returns Pending"),
            }
        }
    }

    /// Reads an object this process borrows: asks its owner (at `node`) for it once it is
    /// ready, then reads it from where it is (pulling a copy here, which the owner is told
    /// of and frees with the object).
    pub(crate) async fn resolve_borrowed(
        self: Arc<Self>,
        id: ObjectId,
        node: String,
    ) -> Result<Resolved, Error> {
        let state = {
            let _unblock = self.blocked(true);
            crate::borrow::status(&self, id, &node).await?
        };
        match state {
            State::Inline { bytes, tag } => Ok(Resolved::Inline(bytes, tag)),
            State::Failed(e) => Err(failed(*e)),
            State::Stored { tag, locs } => {
                let here = locs.iter().any(|l| l.node_id == self.node.node_id);
                let src = self.fetch(id, locs).await?;
                if !here && self.store.is_some() {
                    crate::borrow::copied(&self, id, node);
                }
                Ok(Resolved::Stored(src, tag))
            }
            State::Pending => Err(Error::Internal(format!(
                "the owner of {id} answered pending"
            ))),
        }
    }

    /// `wait` over refs some of which this process borrows: a borrowed one is ready when
    /// its owner says it is not pending (or cannot say: then reading it gives the error).
    pub(crate) async fn wait_borrowed<T>(
        self: Arc<Self>,
        refs: &[crate::ObjectRef<T>],
        n: usize,
        timeout: Option<Duration>,
    ) -> Vec<bool> {
        use futures_util::StreamExt;
        let mut ready = vec![false; refs.len()];
        let mut waits = futures_util::stream::FuturesUnordered::new();
        for (i, r) in refs.iter().enumerate() {
            let (rt, id) = (self.clone(), r.h.id);
            let node = r.h.borrowed().map(|b| b.owner_node.clone());
            waits.push(async move {
                match node {
                    Some(node) => {
                        let _ = crate::borrow::status(&rt, id, &node).await;
                    }
                    None => {
                        rt.owner.ready(id, None).await;
                    }
                }
                i
            });
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut done = 0;
        while done < n {
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, waits.next()).await {
                    Ok(x) => x,
                    Err(_) => break,
                },
                None => waits.next().await,
            };
            let Some(i) = next else { break };
            ready[i] = true;
            done += 1;
        }
        ready
    }

    /// The bytes of a sealed object: mapped from the local store (pulled there first if it
    /// is elsewhere), or, in remote mode, downloaded into this process.
    pub(crate) async fn fetch(
        self: &Arc<Self>,
        id: ObjectId,
        locs: Vec<Loc>,
    ) -> Result<Source, Error> {
        let Some(store) = self.store.clone() else {
            return self.download(id, &locs).await.map(Source::Heap);
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let here = locs.iter().any(|l| l.node_id == me.node.node_id);
            if !here {
                let mut last = String::from("no node holds a copy");
                let mut pulled = false;
                for l in locs.iter().filter(|l| !l.om.is_empty()) {
                    match waiting_for_space(|| {
                        store.pull(id, &l.om, Some(Duration::from_secs(600)))
                    }) {
                        Ok(()) => {
                            pulled = true;
                            break;
                        }
                        Err(e) if store_full(&e) => return Err(full(id, &e)),
                        Err(e) => last = format!("pull from node {}: {e}", l.node_id),
                    }
                }
                if !pulled {
                    return Err(Error::ObjectLost(id, last));
                }
                me.owner.add_location(id, me.node.loc());
            }
            // A spilled copy is restored into the store first, which needs room.
            match waiting_for_space(|| store.get_one(id, Some(Duration::from_secs(60)))) {
                Ok(v) => Ok(Source::Store(v)),
                Err(e) if store_full(&e) => Err(full(id, &e)),
                Err(e) => Err(Error::ObjectLost(id, e.to_string())),
            }
        })
        .await
        .map_err(|e| Error::Store(e.to_string()))?
    }

    async fn download(&self, id: ObjectId, locs: &[Loc]) -> Result<rkyv::util::AlignedVec, Error> {
        const CHUNK: u64 = 4 << 20;
        let mut last = String::from("no node holds a copy");
        for l in locs.iter().filter(|l| !l.om.is_empty()) {
            let mut c = self.om(&l.om)?;
            let info = match c
                .get_object_info(pb::GetObjectInfoRequest {
                    object_id: id.as_bytes().to_vec(),
                    omit_crc: false,
                })
                .await
            {
                Ok(i) => i.into_inner(),
                Err(e) => {
                    last = format!("node {}: {}", l.node_id, e.message());
                    continue;
                }
            };
            let mut out = rkyv::util::AlignedVec::<16>::with_capacity(info.data_size as usize);
            let mut off = 0;
            let mut ok = true;
            while off < info.data_size {
                let len = CHUNK.min(info.data_size - off);
                match c
                    .read_chunk(pb::ReadChunkRequest {
                        object_id: id.as_bytes().to_vec(),
                        offset: off,
                        length: len,
                    })
                    .await
                {
                    Ok(r) => out.extend_from_slice(&r.into_inner().data),
                    Err(e) => {
                        last = format!("node {}: {}", l.node_id, e.message());
                        ok = false;
                        break;
                    }
                }
                off += len;
            }
            if ok && out.len() as u64 == info.data_size {
                return Ok(out);
            }
        }
        Err(Error::ObjectLost(id, last))
    }

    // ---- tasks ----

    pub(crate) fn submit(
        self: &Arc<Self>,
        name: &'static str,
        opts: &TaskOptions,
        args: Vec<crate::__private::ArgOut>,
    ) -> Arc<Handle> {
        let mut hs = self.submit_n(name, opts, args, 1);
        hs.swap_remove(0)
    }

    /// Submits a task returning `n` values (`num_returns`): a handle per return, in order.
    /// Only return 0 keeps the lineage (the others are lost with their copies).
    pub(crate) fn submit_n(
        self: &Arc<Self>,
        name: &'static str,
        opts: &TaskOptions,
        args: Vec<crate::__private::ArgOut>,
        n: u8,
    ) -> Vec<Arc<Handle>> {
        self.submit_task(name, opts, args, n, false)
    }

    /// Submits a streaming task: the handle of its end (its value is the item count).
    pub(crate) fn submit_stream(
        self: &Arc<Self>,
        name: &'static str,
        opts: &TaskOptions,
        args: Vec<crate::__private::ArgOut>,
    ) -> Arc<Handle> {
        let mut hs = self.submit_task(name, opts, args, 1, true);
        hs.swap_remove(0)
    }

    /// The scheduling key of tasks with these options (the last one's again if the
    /// resources and strategy are the same).
    fn key(&self, opts: &TaskOptions) -> Result<Arc<submit::Key>, String> {
        let same = |o: &TaskOptions| {
            o.num_cpus == opts.num_cpus
                && o.num_gpus == opts.num_gpus
                && o.memory == opts.memory
                && o.resources == opts.resources
                && o.strategy == opts.strategy
        };
        let mut last = self.last_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((o, k)) = last.as_ref()
            && same(o)
        {
            return Ok(k.clone());
        }
        let k = submit::Key::new(opts.shape()?, &opts.strategy);
        *last = Some((opts.clone(), k.clone()));
        Ok(k)
    }

    fn submit_task(
        self: &Arc<Self>,
        name: &'static str,
        opts: &TaskOptions,
        args: Vec<crate::__private::ArgOut>,
        n: u8,
        streaming: bool,
    ) -> Vec<Arc<Handle>> {
        let n = n.clamp(1, 63);
        let id = self.new_id(1);
        let key = self.key(opts);
        let lineage = key.as_ref().ok().filter(|_| !streaming).map(|key| {
            Arc::new(submit::Lineage {
                function: name,
                args: args.clone(),
                key: key.clone(),
                max_retries: opts.max_retries,
                retry_exceptions: opts.retry_exceptions,
                num_returns: n,
                events: opts.enable_task_events,
            })
        });
        let mut h = vec![self.owner.add_with_lineage(id, State::Pending, lineage)];
        h.extend((1..n).map(|i| self.owner.add(id.return_id(i), State::Pending)));
        let fail = |kind: crate::TaskErrorKind, message: String| {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let e = crate::TaskError {
                kind,
                message,
                task_id: id.to_string(),
                function: name.into(),
                node_id: String::new(),
                worker_id: String::new(),
            };
            for i in 0..n {
                self.owner
                    .complete(id.return_id(i), State::Failed(Box::new(e.clone())));
            }
        };
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                fail(
                    crate::TaskErrorKind::Argument,
                    format!("bad resources: {e}"),
                );
                return h;
            }
        };
        if let Some(e) = args.iter().find_map(|a| match a {
            crate::__private::ArgOut::Failed(e) => Some(e.clone()),
            _ => None,
        }) {
            fail(
                crate::TaskErrorKind::Argument,
                format!("cannot encode an argument: {e}"),
            );
            return h;
        }
        let task = submit::Task {
            id,
            function: name,
            args,
            key,
            attempt: 0,
            max_retries: opts.max_retries,
            retry_exceptions: opts.retry_exceptions,
            num_returns: n,
            streaming,
            parent: crate::calls::current_task(),
            ev: crate::events::Slot::new(opts.enable_task_events),
        };
        self.stats.pending_args.fetch_add(1, Ordering::Relaxed);
        let _ = self.submit_tx.send(submit::Event::Submit(task));
        h
    }
}

impl Runtime {
    /// The job id as the wire has it ("" for a driver started by hand).
    pub(crate) fn job(&self) -> &str {
        self.job_id.as_deref().unwrap_or_default()
    }

    /// The worker id as the wire has it ("" in a driver).
    pub(crate) fn worker(&self) -> &str {
        self.worker_id.as_deref().unwrap_or_default()
    }

    /// A new actor (or placement group) id: this process's prefix and a counter.
    pub(crate) fn new_actor_id(&self) -> protocol::ActorId {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut b = [0u8; 16];
        b[..11].copy_from_slice(&self.prefix);
        b[11..].copy_from_slice(&n.to_be_bytes()[3..]);
        protocol::ActorId::from_bytes(b)
    }

    /// Submits a call to an actor; calls from this process run in submission order.
    pub(crate) fn submit_actor(
        self: &Arc<Self>,
        actor: Arc<crate::actor::ActorRef>,
        method: &'static str,
        args: Vec<crate::__private::ArgOut>,
    ) -> Arc<Handle> {
        let id = self.new_id(1);
        let h = self.owner.add(id, State::Pending);
        if let Some(e) = args.iter().find_map(|a| match a {
            crate::__private::ArgOut::Failed(e) => Some(e.clone()),
            _ => None,
        }) {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let mut te = crate::actor::actor_error(
                &actor,
                crate::TaskErrorKind::Argument,
                format!("cannot encode an argument of {method}: {e}"),
            );
            te.task_id = id.to_string();
            self.owner.complete(id, State::Failed(Box::new(te)));
            return h;
        }
        let key = self.call_key.clone();
        let task = submit::Task {
            id,
            function: method,
            args,
            key,
            attempt: 0,
            max_retries: 0,
            retry_exceptions: false,
            num_returns: 1,
            streaming: false,
            parent: crate::calls::current_task(),
            ev: Default::default(),
        };
        self.stats.pending_node.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .submit_tx
            .send(submit::Event::ActorCall(actor, Box::new(task)));
        h
    }
}

/// How long a read waits for room in a store that is full of pinned objects (readers and
/// writers holding them, which is usually brief) before it fails.
const STORE_FULL_WAIT: Duration = Duration::from_secs(10);

fn store_full(e: &object_store::ClientError) -> bool {
    matches!(e, object_store::ClientError::Store { kind, .. } if kind == "ObjectStoreFull")
}

/// A store full of pinned objects is not a lost object: it is said as what it is, and no
/// rebuild is tried.
fn full(id: ObjectId, e: &object_store::ClientError) -> Error {
    Error::Store(format!(
        "object {id} cannot be read here yet: {e} (waited {STORE_FULL_WAIT:?} for readers and writers to let go)"
    ))
}

/// Runs `f` again while the store says it is full (pins are usually held briefly), for at
/// most `STORE_FULL_WAIT`; then returns what it last said.
fn waiting_for_space<T>(
    mut f: impl FnMut() -> Result<T, object_store::ClientError>,
) -> Result<T, object_store::ClientError> {
    let deadline = std::time::Instant::now() + STORE_FULL_WAIT;
    let mut backoff = Duration::from_millis(5);
    loop {
        match f() {
            Err(e) if store_full(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

/// The error `get` gives for an object whose task failed.
pub(crate) fn failed(e: crate::TaskError) -> Error {
    match e.kind {
        crate::TaskErrorKind::ActorDied => Error::ActorDied(Box::new(e)),
        crate::TaskErrorKind::ActorUnavailable => Error::ActorUnavailable(Box::new(e)),
        crate::TaskErrorKind::Cancelled => Error::TaskCancelled(Box::new(e)),
        _ => Error::Task(Box::new(e)),
    }
}

/// Frees stored copies of released objects, batched per node.
async fn free_loop(rt: Arc<Runtime>, mut rx: mpsc::UnboundedReceiver<(String, ObjectId)>) {
    while let Some(first) = rx.recv().await {
        let mut batch: HashMap<String, Vec<ObjectId>> = HashMap::new();
        batch.entry(first.0).or_default().push(first.1);
        while let Ok((n, id)) = rx.try_recv() {
            batch.entry(n).or_default().push(id);
        }
        for (node, ids) in batch {
            if node == rt.node.address
                && let Some(store) = rt.store.clone()
            {
                let _ = tokio::task::spawn_blocking(move || store.delete(&ids)).await;
                continue;
            }
            let req = pb::FreeObjectsRequest {
                object_ids: ids.iter().map(|i| i.as_bytes().to_vec()).collect(),
            };
            let r = match rt.nm(&node) {
                Ok(mut c) => c
                    .free_objects(req)
                    .await
                    .map_err(|e| e.message().to_owned()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = r {
                tracing::debug!("cannot free {} objects on {node}: {e}", ids.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, addr: &str, head: bool) -> pb::NodeInfo {
        pb::NodeInfo {
            node_id: id.into(),
            address: addr.into(),
            is_head: head,
            ..Default::default()
        }
    }

    #[test]
    fn the_get_spin_comes_from_the_environment_else_the_config_and_is_bounded() {
        let cfg = Duration::from_micros(50);
        assert_eq!(parse_get_spin(None, cfg).unwrap(), cfg);
        assert_eq!(parse_get_spin(Some(""), cfg).unwrap(), cfg);
        assert_eq!(parse_get_spin(Some("0"), cfg).unwrap(), Duration::ZERO);
        assert_eq!(
            parse_get_spin(Some(" 300 "), cfg).unwrap(),
            Duration::from_micros(300)
        );
        assert_eq!(
            parse_get_spin(None, Duration::from_secs(5)).unwrap(),
            MAX_GET_SPIN,
            "a config beyond the bound is capped"
        );
        for bad in ["-1", "1ms", "abc", "10001"] {
            let e = parse_get_spin(Some(bad), cfg).unwrap_err().to_string();
            assert!(
                e.contains(GET_SPIN_ENV) && e.contains("0 to 10000"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_driver_attaches_only_to_nodes_of_its_own_addresses() {
        let nodes = [
            node("a", "10.9.0.1:7000", true),
            node("b", "10.9.0.2:7000", false),
            node("c", "10.9.0.3:7000", false),
            node("d", "127.0.0.1:7000", false),
        ];
        let ips: std::collections::HashSet<std::net::IpAddr> = ["10.9.0.2", "127.0.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let ids = |heads: &[String]| -> Vec<String> {
            local_candidates(&nodes, heads, &ips)
                .into_iter()
                .map(|n| n.node_id)
                .collect()
        };
        // Node a (a head, but on another address) and c are never candidates.
        assert_eq!(ids(&["10.9.0.1:6379".into()]), ["b", "d"]);
        // Among local nodes, the one on the host of the head this driver was told first.
        assert_eq!(ids(&["127.0.0.1:6379".into()]), ["d", "b"]);
        assert!(local_candidates(&nodes, &[], &Default::default()).is_empty());
    }
}
