//! The node daemon: one per machine (heads run one too). Today it owns the node's identity,
//! registers with the control plane, heartbeats its available resources (soft state, never
//! in the Raft log), re-registers when fenced, serves the `NodeManager` gRPC service and
//! `/metrics`, and hosts the node's object store: the shared-memory store on a Unix socket
//! for local clients and the `ObjectManager` transfer service on the object manager port.
//! Later issues add the worker pool, leases, spillback and the job agent here.
//!
//! API Boundary: `node` and `control-plane` never depend on each other; they meet only
//! through `protocol`.

mod drain;
mod host_metrics;
pub mod identity;
mod jobs;
mod leases;
mod logs;
pub mod metrics;
mod output;
mod package;
mod registration;
mod relay;
mod workers;

pub use workers::WorkerOptions;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use protocol::NodeId;
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb::{self, node_manager_server::NodeManager};
use protocol::server::Listeners;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use protocol::server::MetricsRender;

#[derive(Clone)]
pub struct NodeOptions {
    /// Head addresses (`host:port`), all of them if known.
    pub heads: Vec<String>,
    /// Holds the node id (`node_id`) and the lock that keeps two daemons off one identity.
    pub data_dir: PathBuf,
    pub bind_host: String,
    /// The address this node advertises (`--node-ip-address`), never guessed.
    pub advertise_host: String,
    pub node_manager_port: u16,
    pub metrics_export_port: u16,
    pub resources: BTreeMap<String, f64>,
    pub labels: BTreeMap<String, String>,
    pub is_head: bool,
    pub token: Option<AuthToken>,
    pub metrics: Option<MetricsRender>,
    pub object_store: ObjectStoreOptions,
    /// Job driver logs (`job-driver-<id>.log`).
    pub log_dir: PathBuf,
    /// Each job's working directory is `<job_dir>/<job id>`.
    pub job_dir: PathBuf,
    pub workers: WorkerOptions,
}

/// How the node hosts its object store.
#[derive(Clone, Debug)]
pub struct ObjectStoreOptions {
    /// Capacity in bytes; `None`: 30 % of RAM capped by the free space of `plasma_dir`.
    pub memory: Option<u64>,
    /// The tmpfs holding the arena (`/dev/shm`).
    pub plasma_dir: PathBuf,
    /// Spill files go to a per-process directory under this one, removed on shutdown.
    pub spill_root: PathBuf,
    /// The store's Unix socket.
    pub socket_path: PathBuf,
    pub object_manager_port: u16,
    /// The bulk transfer port (objects' bytes over plain TCP, `object_store::bulk`); 0 picks
    /// a free one. Pullers learn it from the object manager.
    pub object_transfer_port: u16,
    pub transfer_chunk_bytes: u64,
    pub max_bytes_in_flight: u64,
}

impl ObjectStoreOptions {
    /// Defaults for a node whose session directory is `session_dir`.
    pub fn in_session(session_dir: &std::path::Path) -> Self {
        Self {
            memory: None,
            plasma_dir: PathBuf::from("/dev/shm"),
            spill_root: session_dir.join("spill"),
            socket_path: session_dir
                .join("sockets")
                .join(format!("object_store.{}.sock", std::process::id())),
            object_manager_port: 0,
            object_transfer_port: 0,
            transfer_chunk_bytes: object_store::transfer::DEFAULT_CHUNK_BYTES,
            max_bytes_in_flight: object_store::transfer::DEFAULT_MAX_BYTES_IN_FLIGHT,
        }
    }
}

impl NodeOptions {
    pub fn new(heads: Vec<String>, data_dir: PathBuf) -> Self {
        Self {
            heads,
            object_store: ObjectStoreOptions::in_session(&data_dir),
            log_dir: data_dir.join("logs"),
            job_dir: data_dir.join("jobs"),
            workers: WorkerOptions {
                idle_timeout: Duration::from_secs(60),
                start_timeout: Duration::from_secs(60),
                binary_dir: data_dir.join("binaries"),
                prestart: 0,
            },
            data_dir,
            bind_host: "127.0.0.1".into(),
            advertise_host: "127.0.0.1".into(),
            node_manager_port: 0,
            metrics_export_port: 0,
            resources: BTreeMap::new(),
            labels: BTreeMap::new(),
            is_head: false,
            token: None,
            metrics: None,
        }
    }
}

/// What a running node shares between its tasks and services.
pub(crate) struct NodeShared {
    pub(crate) node_id: NodeId,
    pub(crate) address: String,
    pub(crate) ports: pb::NodePorts,
    /// 0 until registered.
    pub(crate) incarnation: AtomicU64,
    pub(crate) object_store_socket: PathBuf,
    pub(crate) object_store_capacity: u64,
    /// The leader's resource view from the last heartbeat reply (soft state): the live
    /// nodes that take work (draining ones left out).
    pub(crate) cluster_view: std::sync::Mutex<Vec<pb::NodeResources>>,
    /// Every live node of that reply, draining ones too (a drain tells them all where
    /// objects went).
    pub(crate) peers: std::sync::Mutex<Vec<pb::NodeResources>>,
    pub(crate) token: Option<AuthToken>,
    /// The session's logs directory (daemons, workers, job drivers).
    pub(crate) log_dir: PathBuf,
    /// Until when this node's actor workers may serve: renewed by each heartbeat that gets
    /// through, to before the leader could declare this node dead (see `NodeToWorker.serve_ms`).
    pub(crate) serve_until: std::sync::Mutex<Option<std::time::Instant>>,
    pub(crate) leases: Arc<leases::Leases>,
    pub(crate) workers: Arc<workers::WorkerPool>,
    /// Pulls objects for local clients; told the live nodes' object managers with each
    /// heartbeat reply, the only places it may pull from.
    pub(crate) puller: Arc<object_store::Puller>,
    /// Actor incarnations whose `StartActor` is under way here (waiting for their lease or
    /// worker), so that a second ask waits instead of starting a second copy.
    pub(crate) actors_starting: std::sync::Mutex<std::collections::HashSet<(String, u64)>>,
    pub(crate) store: Arc<object_store::Store>,
    /// Set once the job agent exists (it needs this struct).
    pub(crate) agent: std::sync::OnceLock<Arc<jobs::JobAgent>>,
    /// Since when nothing holds this node (see `busy_reasons`).
    pub(crate) idle_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// The reason, once a drain was accepted: the node leaves with it.
    pub(crate) drained: tokio::sync::watch::Sender<Option<String>>,
    /// A head's own node: never drained (stop the head instead).
    pub(crate) is_head: bool,
}

impl NodeShared {
    /// What keeps this node busy (empty: idle): leases (tasks, actors), placement-group
    /// bundles, job drivers, driver processes. Objects do not: a drain moves the primary
    /// copies to other nodes (see `drain`), and secondary copies can be pulled again from
    /// their primary. So a node is never kept only because it holds objects (Ray's
    /// ray#21870).
    pub(crate) fn busy_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        let (leases, bundles) = self.leases.held();
        if leases > 0 {
            why.push(format!("{leases} lease(s)"));
        }
        if bundles > 0 {
            why.push(format!("bundles of {bundles} placement group(s)"));
        }
        let jobs = self.agent.get().map_or(0, |a| a.running());
        if jobs > 0 {
            why.push(format!("{jobs} job driver(s)"));
        }
        let drivers = self
            .workers
            .processes()
            .iter()
            .filter(|p| p.worker_id.is_empty())
            .count();
        if drivers > 0 {
            why.push(format!("{drivers} driver(s)"));
        }
        why
    }

    /// How long the node has been idle, `None` while busy (reported with every heartbeat).
    pub(crate) fn idle_ms(&self) -> Option<u64> {
        let busy = !self.busy_reasons().is_empty();
        let mut since = self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        if busy {
            *since = None;
            return None;
        }
        let at = *since.get_or_insert_with(std::time::Instant::now);
        Some(at.elapsed().as_millis() as u64)
    }
}

pub struct RunningNode {
    pub node_id: NodeId,
    pub address: String,
    pub node_manager_port: u16,
    pub metrics_export_port: u16,
    pub object_manager_port: u16,
    pub object_transfer_port: u16,
    pub object_store_socket: PathBuf,
    pub store: Arc<object_store::Store>,
    pub puller: Arc<object_store::Puller>,
    store_server: object_store::StoreServer,
    spill_dir: PathBuf,
    agent: Arc<jobs::JobAgent>,
    shared: Arc<NodeShared>,
    client: HeadClient,
    listeners: Listeners,
    tasks: Vec<JoinHandle<()>>,
    _lock: identity::IdentityLock,
}

impl RunningNode {
    /// The incarnation the control plane gave this node, 0 before the first registration.
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation.load(Ordering::Acquire)
    }

    /// Waits until this node accepted a drain; returns its reason. The daemon then shuts the
    /// node down (`shutdown` leaves the cluster with that reason).
    pub async fn drained(&self) -> String {
        let mut rx = self.shared.drained.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops serving; tells the control plane this node is going away (best effort, 2 s),
    /// with the drain's reason if it was drained.
    pub async fn shutdown(self) {
        // Heartbeats stop first: a heartbeat answered "fenced" after the unregister below
        // would register this node anew.
        for t in &self.tasks {
            t.abort();
        }
        let incarnation = self.incarnation();
        if incarnation > 0 {
            let c = self.client.with_options(ClientOptions {
                deadline: Duration::from_secs(2),
                ..Default::default()
            });
            let req = pb::UnregisterNodeRequest {
                node_id: self.node_id.to_string(),
                incarnation,
                reason: self
                    .shared
                    .drained
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| "stopped by rayctl stop".into()),
            };
            if let Err(e) = c
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.unregister_node(req).await }
                })
                .await
            {
                tracing::warn!("could not unregister: {e}");
            }
        }
        self.listeners.stop();
        for t in self.tasks {
            t.abort();
        }
        self.agent.kill_all();
        self.shared.workers.kill_all();
        self.store_server.stop();
        let _ = std::fs::remove_dir_all(&self.spill_dir);
    }
}

#[derive(Clone)]
struct NodeManagerService {
    shared: Arc<NodeShared>,
    agent: Arc<jobs::JobAgent>,
    store: Arc<object_store::Store>,
}

#[tonic::async_trait]
impl NodeManager for NodeManagerService {
    async fn health_check(
        &self,
        _: tonic::Request<pb::NodeHealthCheckRequest>,
    ) -> Result<tonic::Response<pb::NodeHealthCheckReply>, tonic::Status> {
        Ok(tonic::Response::new(pb::NodeHealthCheckReply {
            node_id: self.shared.node_id.to_string(),
            incarnation: self.shared.incarnation.load(Ordering::Acquire),
            ports: Some(self.shared.ports),
            object_store_socket: self.shared.object_store_socket.display().to_string(),
            object_store_capacity: self.shared.object_store_capacity,
        }))
    }

    async fn get_cluster_view(
        &self,
        _: tonic::Request<pb::GetClusterViewRequest>,
    ) -> Result<tonic::Response<pb::HeartbeatReply>, tonic::Status> {
        let cluster_view = self
            .shared
            .cluster_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(tonic::Response::new(pb::HeartbeatReply {
            cluster_view,
            ..Default::default()
        }))
    }

    async fn request_worker_lease(
        &self,
        req: tonic::Request<pb::LeaseRequest>,
    ) -> Result<tonic::Response<pb::LeaseReply>, tonic::Status> {
        let start = std::time::Instant::now();
        let r = req.into_inner();
        let (sha, source, job) = (
            r.binary_sha256.clone(),
            r.binary_source.clone(),
            r.job_id.clone(),
        );
        let view = self
            .shared
            .cluster_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut reply = match self.shared.leases.request(r, &view).await {
            Ok(r) => r,
            Err(e) => {
                metrics::lease("error", None);
                return Err(e);
            }
        };
        if reply.outcome == pb::LeaseOutcome::Granted as i32 && !sha.is_empty() {
            // If the caller goes away (it cancels requests it no longer needs) while the
            // worker is being found, the lease is given back, not leaked.
            let guard = leases::GrantGuard::new(&self.shared.leases, &reply.lease_id);
            match self
                .shared
                .workers
                .attach(&reply.lease_id, &sha, &source, &job)
                .await
            {
                Ok((worker_id, address)) => {
                    // The worker now holds it: it gives it back if nobody claims it.
                    guard.disarm();
                    reply.worker_id = worker_id;
                    reply.worker_address = address;
                }
                Err(e) => {
                    drop(guard);
                    metrics::lease("error", None);
                    return Err(e);
                }
            }
        }
        let outcome = match pb::LeaseOutcome::try_from(reply.outcome) {
            Ok(pb::LeaseOutcome::Granted) => "granted",
            Ok(pb::LeaseOutcome::Spillback) => "spillback",
            Ok(pb::LeaseOutcome::Infeasible) => "infeasible",
            Ok(pb::LeaseOutcome::TimedOut) => "timed_out",
            _ => "error",
        };
        metrics::lease(
            outcome,
            (outcome == "granted").then(|| start.elapsed().as_secs_f64()),
        );
        Ok(tonic::Response::new(reply))
    }

    async fn start_actor(
        &self,
        req: tonic::Request<pb::StartActorRequest>,
    ) -> Result<tonic::Response<pb::StartActorReply>, tonic::Status> {
        let mut r = req.into_inner();
        let incarnation = self.shared.incarnation.load(Ordering::Acquire);
        if r.node_incarnation != incarnation {
            return Err(tonic::Status::failed_precondition(format!(
                "actor {} was assigned to incarnation {} of this node, which is now incarnation {incarnation}",
                r.actor_id, r.node_incarnation
            )));
        }
        let spec = r
            .spec
            .take()
            .ok_or_else(|| tonic::Status::invalid_argument("the actor spec is missing"))?;
        // Asked again (a new leader, a lost reply): the same incarnation starts once.
        match self
            .shared
            .workers
            .actor_worker(&r.actor_id, r.num_restarts)
        {
            Some(Some((worker_id, worker_address, pid))) => {
                return Ok(tonic::Response::new(pb::StartActorReply {
                    worker_id,
                    worker_address,
                    pid,
                    creation_error: None,
                }));
            }
            Some(None) => {
                return Err(tonic::Status::unavailable(format!(
                    "actor {} is still starting here",
                    r.actor_id
                )));
            }
            None => {}
        }
        let key = (r.actor_id.clone(), r.num_restarts);
        if !self
            .shared
            .actors_starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return Err(tonic::Status::unavailable(format!(
                "actor {} is still starting here",
                r.actor_id
            )));
        }
        // In a task of its own: if the caller goes away (a leader that died), the start
        // still ends with the lease held by the actor's worker or given back, never stranded.
        let shared = self.shared.clone();
        let reply = tokio::spawn(async move {
            let out = start_actor_here(shared.clone(), r, spec).await;
            shared
                .actors_starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            out
        })
        .await
        .map_err(|e| tonic::Status::internal(format!("starting the actor failed: {e}")))??;
        Ok(tonic::Response::new(reply))
    }

    async fn kill_actor_worker(
        &self,
        req: tonic::Request<pb::KillActorWorkerRequest>,
    ) -> Result<tonic::Response<pb::KillActorWorkerReply>, tonic::Status> {
        let r = req.into_inner();
        let killed = self.shared.workers.kill_actor(&r.actor_id, r.num_restarts);
        Ok(tonic::Response::new(pb::KillActorWorkerReply { killed }))
    }

    async fn prepare_bundles(
        &self,
        req: tonic::Request<pb::PrepareBundlesRequest>,
    ) -> Result<tonic::Response<pb::BundlesReply>, tonic::Status> {
        let r = req.into_inner();
        let incarnation = self.shared.incarnation.load(Ordering::Acquire);
        if r.node_incarnation != incarnation {
            return Err(tonic::Status::failed_precondition(format!(
                "placement group {} was placed on incarnation {} of this node, which is now incarnation {incarnation}",
                r.pg_id, r.node_incarnation
            )));
        }
        let mut bundles = Vec::with_capacity(r.bundles.len());
        for b in &r.bundles {
            let set =
                scheduler::ResourceSet::from_map(b.resources.iter().map(|(k, v)| (k.as_str(), *v)))
                    .map_err(|e| {
                        tonic::Status::invalid_argument(format!("bundle {}: {e}", b.index))
                    })?;
            bundles.push((b.index, set));
        }
        self.shared.leases.prepare_bundles(&r.pg_id, &bundles)?;
        Ok(tonic::Response::new(pb::BundlesReply { done: true }))
    }

    async fn commit_bundles(
        &self,
        req: tonic::Request<pb::BundlesRequest>,
    ) -> Result<tonic::Response<pb::BundlesReply>, tonic::Status> {
        self.shared.leases.commit_bundles(&req.into_inner().pg_id)?;
        Ok(tonic::Response::new(pb::BundlesReply { done: true }))
    }

    async fn cancel_bundles(
        &self,
        req: tonic::Request<pb::BundlesRequest>,
    ) -> Result<tonic::Response<pb::BundlesReply>, tonic::Status> {
        let done = self.shared.leases.cancel_bundles(&req.into_inner().pg_id);
        Ok(tonic::Response::new(pb::BundlesReply { done }))
    }

    async fn list_tasks(
        &self,
        _: tonic::Request<pb::ListTasksRequest>,
    ) -> Result<tonic::Response<pb::ListTasksReply>, tonic::Status> {
        Ok(tonic::Response::new(self.shared.workers.list_tasks()))
    }

    async fn drain_node(
        &self,
        req: tonic::Request<pb::DrainNodeRequest>,
    ) -> Result<tonic::Response<pb::DrainNodeReply>, tonic::Status> {
        let r = req.into_inner();
        if r.reason.len() > 256 {
            return Err(tonic::Status::invalid_argument(
                "a drain reason is at most 256 bytes",
            ));
        }
        let reason = if r.reason.is_empty() {
            "drained".to_owned()
        } else {
            r.reason
        };
        let reply = match self.shared.drain(reason.clone()).await {
            Ok(()) => {
                tracing::info!(reason, "drain accepted: leaving the cluster");
                pb::DrainNodeReply {
                    accepted: true,
                    rejected_because: String::new(),
                }
            }
            Err(why) => {
                tracing::info!(reason, "drain refused: {why}");
                pb::DrainNodeReply {
                    accepted: false,
                    rejected_because: why,
                }
            }
        };
        Ok(tonic::Response::new(reply))
    }

    async fn take_objects(
        &self,
        req: tonic::Request<pb::TakeObjectsRequest>,
    ) -> Result<tonic::Response<pb::TakeObjectsReply>, tonic::Status> {
        let r = req.into_inner();
        if self.shared.leases.draining() {
            return Err(tonic::Status::unavailable(
                "this node is draining: it takes no objects",
            ));
        }
        if r.object_ids.len() > 100_000 {
            return Err(tonic::Status::invalid_argument(format!(
                "{} objects in one TakeObjects: at most 100000",
                r.object_ids.len()
            )));
        }
        let ids = r
            .object_ids
            .iter()
            .map(|b| protocol::ObjectId::from_slice(b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        // The puller bounds the bytes in flight; each object is checksummed before it counts.
        let pulls = ids.iter().map(|&id| {
            let (puller, store, source) = (
                self.shared.puller.clone(),
                self.store.clone(),
                r.source.clone(),
            );
            async move {
                puller
                    .pull(id, &source)
                    .await
                    .map_err(|e| format!("{id}: {e}"))?;
                if store.set_primary(id, true) {
                    Ok(id)
                } else {
                    Err(format!("{id}: evicted before it could be kept"))
                }
            }
        });
        let mut reply = pb::TakeObjectsReply::default();
        for r in futures_util::future::join_all(pulls).await {
            match r {
                Ok(id) => reply.taken.push(id.as_bytes().to_vec()),
                Err(e) => reply.errors.push(e),
            }
        }
        if !reply.taken.is_empty() {
            tracing::info!(
                objects = reply.taken.len(),
                from = r.source,
                "took primary copies from a draining node"
            );
        }
        Ok(tonic::Response::new(reply))
    }

    async fn list_logs(
        &self,
        req: tonic::Request<pb::ListLogsRequest>,
    ) -> Result<tonic::Response<pb::ListLogsReply>, tonic::Status> {
        let glob = req.into_inner().glob;
        let dir = self.shared.log_dir.clone();
        let files = tokio::task::spawn_blocking(move || logs::list(&dir, &glob))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))??;
        Ok(tonic::Response::new(pb::ListLogsReply {
            node_id: self.shared.node_id.to_string(),
            files,
        }))
    }

    async fn read_log(
        &self,
        req: tonic::Request<pb::ReadLogRequest>,
    ) -> Result<tonic::Response<pb::ReadLogReply>, tonic::Status> {
        let r = req.into_inner();
        let dir = self.shared.log_dir.clone();
        let reply = tokio::task::spawn_blocking(move || logs::read(&dir, &r))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))??;
        Ok(tonic::Response::new(reply))
    }

    async fn deliver_output(
        &self,
        req: tonic::Request<pb::WorkerOutput>,
    ) -> Result<tonic::Response<pb::DeliverOutputReply>, tonic::Status> {
        let o = req.into_inner();
        if o.lines.len() > 100_000 {
            return Err(tonic::Status::invalid_argument(
                "at most 100000 lines of worker output at once",
            ));
        }
        let delivered = self.shared.workers.deliver_output(o);
        Ok(tonic::Response::new(pb::DeliverOutputReply { delivered }))
    }

    async fn owner_call(
        &self,
        req: tonic::Request<pb::OwnerCallRequest>,
    ) -> Result<tonic::Response<pb::OwnerCallReply>, tonic::Status> {
        let r = req.into_inner();
        if r.owner_prefix.is_empty() || r.owner_prefix.len() > 32 {
            return Err(tonic::Status::invalid_argument(
                "owner_prefix must be 1 to 32 bytes",
            ));
        }
        match &r.kind {
            None => {
                return Err(tonic::Status::invalid_argument(
                    "an owner call needs a kind",
                ));
            }
            Some(pb::owner_call_request::Kind::Borrows(b)) if b.changes.len() > 100_000 => {
                return Err(tonic::Status::invalid_argument(
                    "at most 100000 borrow changes at once",
                ));
            }
            _ => {}
        }
        let w = &self.shared.workers;
        let owner = w.owner_channel(&r.owner_prefix);
        Ok(tonic::Response::new(w.relay.call(owner, r).await))
    }

    async fn watch_process(
        &self,
        req: tonic::Request<pb::WatchProcessRequest>,
    ) -> Result<tonic::Response<pb::WatchProcessReply>, tonic::Status> {
        let r = req.into_inner();
        let tx = self
            .shared
            .workers
            .owner_channel(&r.prefix)
            .map(|(_, tx)| tx);
        let gone = relay::watch(tx, std::time::Duration::from_millis(r.wait_ms)).await;
        Ok(tonic::Response::new(pb::WatchProcessReply { gone }))
    }

    async fn objects_moved(
        &self,
        req: tonic::Request<pb::ObjectsMovedRequest>,
    ) -> Result<tonic::Response<pb::ObjectsMovedReply>, tonic::Status> {
        let delivered = self
            .shared
            .workers
            .objects_moved(&req.into_inner())
            .into_iter()
            .map(|id| id.as_bytes().to_vec())
            .collect();
        Ok(tonic::Response::new(pb::ObjectsMovedReply { delivered }))
    }

    async fn list_objects(
        &self,
        _: tonic::Request<pb::ListObjectsRequest>,
    ) -> Result<tonic::Response<pb::ListObjectsReply>, tonic::Status> {
        let stats = self.store.stats();
        let objects = self
            .store
            .list()
            .into_iter()
            .map(
                |(id, size, primary, pins, in_memory, spilled, sealed)| pb::StoredObject {
                    object_id: id.to_string(),
                    size,
                    primary,
                    pins,
                    in_memory,
                    spilled,
                    sealed,
                },
            )
            .collect();
        Ok(tonic::Response::new(pb::ListObjectsReply {
            node_id: self.shared.node_id.to_string(),
            objects,
            processes: self.shared.workers.processes(),
            used_bytes: stats.used,
            capacity_bytes: stats.capacity,
            pinned_bytes: stats.pinned,
            spilled_bytes: stats.spilled,
        }))
    }

    type WorkerChannelStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::NodeToWorker, tonic::Status>> + Send>,
    >;

    async fn worker_channel(
        &self,
        req: tonic::Request<tonic::Streaming<pb::WorkerMessage>>,
    ) -> Result<tonic::Response<Self::WorkerChannelStream>, tonic::Status> {
        let rx = self.shared.workers.channel(req.into_inner());
        let s = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (Ok(m), rx))
        });
        Ok(tonic::Response::new(Box::pin(s)))
    }

    async fn register_binary(
        &self,
        req: tonic::Request<pb::RegisterBinaryRequest>,
    ) -> Result<tonic::Response<pb::RegisterBinaryReply>, tonic::Status> {
        let r = req.into_inner();
        let reply = self
            .shared
            .workers
            .register_local(r.sha256.clone(), r.path)
            .await?;
        self.shared.workers.note_registered(&r.sha256, &r.job_id);
        self.shared.workers.prestart(&r.sha256, &r.job_id);
        Ok(tonic::Response::new(reply))
    }

    async fn upload_binary(
        &self,
        req: tonic::Request<tonic::Streaming<pb::BinaryChunk>>,
    ) -> Result<tonic::Response<pb::RegisterBinaryReply>, tonic::Status> {
        let (reply, job) = self.shared.workers.upload(req.into_inner()).await?;
        self.shared.workers.note_registered(&reply.sha256, &job);
        self.shared.workers.prestart(&reply.sha256, &job);
        Ok(tonic::Response::new(reply))
    }

    type ReadBinaryStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::BinaryChunk, tonic::Status>> + Send>,
    >;

    async fn read_binary(
        &self,
        req: tonic::Request<pb::ReadBinaryRequest>,
    ) -> Result<tonic::Response<Self::ReadBinaryStream>, tonic::Status> {
        let rx = self.shared.workers.read(&req.into_inner().sha256)?;
        let s =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        Ok(tonic::Response::new(Box::pin(s)))
    }

    async fn free_objects(
        &self,
        req: tonic::Request<pb::FreeObjectsRequest>,
    ) -> Result<tonic::Response<pb::FreeObjectsReply>, tonic::Status> {
        let ids = req
            .into_inner()
            .object_ids
            .iter()
            .map(|b| protocol::ObjectId::from_slice(b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let freed = self.store.delete(&ids) as u32;
        Ok(tonic::Response::new(pb::FreeObjectsReply { freed }))
    }

    async fn return_worker_lease(
        &self,
        req: tonic::Request<pb::ReturnLeaseRequest>,
    ) -> Result<tonic::Response<pb::ReturnLeaseReply>, tonic::Status> {
        let lease_id = req.into_inner().lease_id;
        self.shared.workers.lease_returned(&lease_id);
        let returned = self.shared.leases.give_back(&lease_id);
        Ok(tonic::Response::new(pb::ReturnLeaseReply { returned }))
    }

    async fn start_job(
        &self,
        req: tonic::Request<pb::StartJobRequest>,
    ) -> Result<tonic::Response<pb::StartJobReply>, tonic::Status> {
        let started = self.agent.start(req.into_inner())?;
        Ok(tonic::Response::new(pb::StartJobReply { started }))
    }

    async fn stop_job_process(
        &self,
        req: tonic::Request<pb::StopJobProcessRequest>,
    ) -> Result<tonic::Response<pb::StopJobProcessReply>, tonic::Status> {
        let was_running = self.agent.stop(&req.into_inner());
        Ok(tonic::Response::new(pb::StopJobProcessReply {
            was_running,
        }))
    }

    async fn read_job_log(
        &self,
        req: tonic::Request<pb::GetJobLogsRequest>,
    ) -> Result<tonic::Response<pb::JobLogs>, tonic::Status> {
        let agent = self.agent.clone();
        let r = req.into_inner();
        tokio::task::spawn_blocking(move || agent.read_log(&r))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map(tonic::Response::new)
    }
}

/// `host:port` of the object manager on port `port` of the node whose node manager is
/// `nm` (`host:port`; both listen on the node's advertised host).
pub(crate) fn om_address(nm: &str, port: impl std::fmt::Display) -> String {
    let host = nm.rsplit_once(':').map_or(nm, |(h, _)| h);
    format!("{host}:{port}")
}

impl NodeShared {
    /// This node's object manager, as other nodes reach it.
    pub(crate) fn my_om(&self) -> String {
        om_address(&self.address, self.ports.object_manager_port)
    }

    /// Takes the leader's view of the live nodes: it is soft state for scheduling, and the
    /// list of the only peers this node fetches binaries and pulls objects from.
    pub(crate) fn set_cluster_view(&self, view: Vec<pb::NodeResources>) {
        let mut nms = std::collections::HashSet::new();
        let mut oms = vec![self.my_om()];
        for n in &view {
            nms.insert(n.address.clone());
            if n.object_manager_port != 0 {
                oms.push(om_address(&n.address, n.object_manager_port));
            }
        }
        self.workers.set_binary_sources(nms);
        self.workers.prefetch(&view);
        self.puller.set_sources(oms);
        // Scheduling never sends work to a node that is leaving.
        let work = view.iter().filter(|n| !n.draining).cloned().collect();
        *self.cluster_view.lock().unwrap_or_else(|p| p.into_inner()) = work;
        *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }
}

/// Validates a node's resources (names and amounts) with the scheduler's rules.
pub fn check_resources(r: &BTreeMap<String, f64>) -> Result<(), scheduler::ResourceError> {
    scheduler::ResourceSet::from_map(r.iter().map(|(k, v)| (k.as_str(), *v))).map(|_| ())
}

/// Starts the node daemon: takes the identity in `data_dir`, binds its ports, serves, and
/// keeps itself registered with the control plane.
pub async fn start(opts: NodeOptions) -> anyhow::Result<RunningNode> {
    metrics::describe();
    metrics::describe_workers();
    host_metrics::describe();
    let (lock, node_id) = identity::acquire(&opts.data_dir)?;
    check_resources(&opts.resources)?;
    let client = HeadClient::new(&opts.heads, opts.token.clone(), ClientOptions::default())
        .context("bad head addresses")?;
    let nm = TcpListener::bind((opts.bind_host.as_str(), opts.node_manager_port))
        .await
        .with_context(|| {
            format!(
                "cannot bind node manager port {}:{}",
                opts.bind_host, opts.node_manager_port
            )
        })?;
    let mx = TcpListener::bind((opts.bind_host.as_str(), opts.metrics_export_port))
        .await
        .with_context(|| {
            format!(
                "cannot bind metrics export port {}:{}",
                opts.bind_host, opts.metrics_export_port
            )
        })?;
    let om = TcpListener::bind((
        opts.bind_host.as_str(),
        opts.object_store.object_manager_port,
    ))
    .await
    .with_context(|| {
        format!(
            "cannot bind object manager port {}:{}",
            opts.bind_host, opts.object_store.object_manager_port
        )
    })?;
    let bulk = TcpListener::bind((
        opts.bind_host.as_str(),
        opts.object_store.object_transfer_port,
    ))
    .await
    .with_context(|| {
        format!(
            "cannot bind object transfer port {}:{}",
            opts.bind_host, opts.object_store.object_transfer_port
        )
    })?;
    let object_transfer_port = bulk.local_addr()?.port();
    let node_manager_port = nm.local_addr()?.port();
    let metrics_export_port = mx.local_addr()?.port();
    let object_manager_port = om.local_addr()?.port();
    let address = format!("{}:{node_manager_port}", opts.advertise_host);
    let (store, store_server, spill_dir, puller) =
        start_object_store(&opts.object_store, opts.token.clone())?;
    let leases = Arc::new(leases::Leases::new(
        node_id,
        scheduler::ResourceSet::from_map(opts.resources.iter().map(|(k, v)| (k.as_str(), *v)))?,
    ));
    let pool = Arc::new(workers::WorkerPool::new(
        workers::PoolConfig {
            opts: opts.workers.clone(),
            node_id: node_id.to_string(),
            node_address: address.clone(),
            object_manager_address: format!("{}:{object_manager_port}", opts.advertise_host),
            store_socket: store_server.path().to_owned(),
            heads: opts.heads.clone(),
            token: opts.token.clone(),
            log_dir: opts.log_dir.clone(),
            job_dir: opts.job_dir.clone(),
            advertise_host: opts.advertise_host.clone(),
            store: store.clone(),
        },
        leases.clone(),
    ));
    let shared = Arc::new(NodeShared {
        node_id,
        address: address.clone(),
        ports: pb::NodePorts {
            node_manager_port: node_manager_port.into(),
            object_manager_port: object_manager_port.into(),
            metrics_export_port: metrics_export_port.into(),
        },
        incarnation: AtomicU64::new(0),
        object_store_socket: store_server.path().to_owned(),
        object_store_capacity: store.arena().capacity(),
        cluster_view: std::sync::Mutex::default(),
        peers: std::sync::Mutex::default(),
        token: opts.token.clone(),
        log_dir: opts.log_dir.clone(),
        serve_until: std::sync::Mutex::default(),
        leases,
        workers: pool,
        puller: puller.clone(),
        actors_starting: std::sync::Mutex::default(),
        store: store.clone(),
        agent: std::sync::OnceLock::new(),
        idle_since: std::sync::Mutex::default(),
        drained: tokio::sync::watch::Sender::new(None),
        is_head: opts.is_head,
    });
    // Until the first heartbeat reply names the live nodes, this node is the only peer.
    shared.set_cluster_view(Vec::new());

    let agent = Arc::new(jobs::JobAgent::new(
        shared.clone(),
        opts.log_dir.clone(),
        opts.job_dir.clone(),
        client.clone(),
        opts.token.clone(),
    ));
    let _ = shared.agent.set(agent.clone());
    let routes = tonic::service::Routes::new(
        pb::node_manager_server::NodeManagerServer::new(NodeManagerService {
            shared: shared.clone(),
            agent: agent.clone(),
            store: store.clone(),
        })
        .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES),
    );
    let listeners = Listeners::spawn(
        nm,
        routes,
        mx,
        axum::Router::new(),
        opts.metrics.clone(),
        protocol::server::Access {
            token: opts.token.clone(),
            peer: None,
            hosts: std::sync::Arc::new(protocol::server::HostPolicy::new(
                std::slice::from_ref(&opts.advertise_host),
                &[],
            )),
        },
    );
    let mut tasks = Vec::new();
    let om_routes = tonic::service::Routes::new(
        object_store::ObjectManagerService::new(store.clone())
            .with_bulk_port(object_transfer_port)
            .into_server(),
    );
    tasks.push(tokio::spawn(object_store::bulk::serve(
        bulk,
        store.clone(),
        opts.token.clone(),
    )));
    let om_router = protocol::server::grpc_router(
        om_routes,
        protocol::server::Access::token(opts.token.clone()),
    );
    tasks.push(tokio::spawn(async move {
        if let Err(e) = protocol::server::serve(om, om_router, std::future::pending()).await {
            tracing::error!("object manager server stopped: {e}");
        }
    }));
    let s = store.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            object_store::metrics::record(&s.stats());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }));
    let sh = shared.clone();
    tasks.push(tokio::spawn(async move {
        // Renew the actor workers' serving lease while the cluster hears from this node.
        loop {
            let until = *sh.serve_until.lock().unwrap_or_else(|p| p.into_inner());
            let left = until.map_or(Duration::ZERO, |u| {
                u.saturating_duration_since(std::time::Instant::now())
            });
            if !left.is_zero() {
                sh.workers.renew_actors(left);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }));
    let sh = shared.clone();
    tasks.push(tokio::spawn(async move {
        let host = sh
            .address
            .rsplit_once(':')
            .map_or("", |(h, _)| h)
            .to_owned();
        let mut m = host_metrics::HostMetrics::new(sh.is_head, &host);
        loop {
            // sysinfo reads /proc: off the async threads.
            let s = sh.clone();
            m = match tokio::task::spawn_blocking(move || {
                m.record(&s);
                m.tasks(s.workers.task_counts());
                m.actors(s.workers.actor_counts());
                m
            })
            .await
            {
                Ok(m) => m,
                Err(_) => return,
            };
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }));
    let sh = shared.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            sh.workers.reap_idle();
            let (by_state, stats) = sh.workers.snapshot();
            metrics::workers(&by_state, &stats);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }));
    tasks.push(tokio::spawn(registration::run(
        client.clone(),
        shared.clone(),
        opts.resources.clone(),
        opts.labels.clone(),
        opts.is_head,
    )));
    tracing::info!(%node_id, %address, metrics_export_port, object_manager_port, object_transfer_port, socket = %store_server.path().display(), "node started");
    Ok(RunningNode {
        node_id,
        address,
        node_manager_port,
        metrics_export_port,
        object_manager_port,
        object_transfer_port,
        object_store_socket: store_server.path().to_owned(),
        store,
        puller,
        store_server,
        spill_dir,
        agent,
        shared,
        client,
        listeners,
        tasks,
        _lock: lock,
    })
}

type ObjectStoreParts = (
    Arc<object_store::Store>,
    object_store::StoreServer,
    PathBuf,
    Arc<object_store::Puller>,
);

/// Opens the node's store, its socket server and its puller (which serves the socket's `Pull`
/// requests on this runtime).
fn start_object_store(
    o: &ObjectStoreOptions,
    token: Option<AuthToken>,
) -> anyhow::Result<ObjectStoreParts> {
    object_store::metrics::describe();
    let capacity = o
        .memory
        .unwrap_or_else(|| object_store::default_capacity(&o.plasma_dir));
    anyhow::ensure!(
        capacity >= 1 << 20,
        "object store memory of {capacity} bytes is too small: at least 1 MiB (1048576) is needed"
    );
    let spill_dir = o.spill_root.join(format!("node-{}", std::process::id()));
    remove_stale(&o.spill_root, "node-", "");
    if let Some(dir) = o.socket_path.parent() {
        remove_stale(dir, "object_store.", ".sock");
    }
    let cfg = object_store::StoreConfig {
        capacity,
        plasma_dir: o.plasma_dir.clone(),
        spill_dir: spill_dir.clone(),
        chunk: object_store::arena::DEFAULT_CHUNK,
    };
    let store = Arc::new(object_store::Store::open(&cfg).context("cannot open the object store")?);
    store.start_spiller(
        object_store::store::DEFAULT_SPILL_THRESHOLD,
        Duration::from_secs(1),
    )?;
    let puller = Arc::new(object_store::Puller::new(
        store.clone(),
        object_store::PullerConfig {
            chunk_bytes: o.transfer_chunk_bytes,
            max_bytes_in_flight: o.max_bytes_in_flight,
            bulk_streams: object_store::transfer::DEFAULT_BULK_STREAMS,
            partial_ttl: object_store::transfer::PARTIAL_TTL,
            token,
        },
    ));
    let server = object_store::StoreServer::start(
        store.clone(),
        &o.socket_path,
        Some(puller.hook(tokio::runtime::Handle::current())),
    )
    .with_context(|| {
        format!(
            "cannot serve the object store on {}",
            o.socket_path.display()
        )
    })?;
    Ok((store, server, spill_dir, puller))
}

/// Removes `<prefix><pid><suffix>` entries of `dir` left by node daemons that died without
/// cleaning up (their pid no longer runs).
fn remove_stale(dir: &std::path::Path, prefix: &str, suffix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let path = e.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// Leases the actor's resources here and starts its worker (the rest of `StartActor`).
async fn start_actor_here(
    shared: Arc<NodeShared>,
    r: pb::StartActorRequest,
    spec: pb::ActorSpec,
) -> Result<pb::StartActorReply, tonic::Status> {
    let timeout = std::time::Duration::from_secs(600);
    let lease_id = shared.leases.request_here(&spec.resources, timeout).await?;
    let start = pb::ActorStart {
        actor_id: r.actor_id.clone(),
        num_restarts: r.num_restarts,
        lease_id: lease_id.clone(),
        class_name: spec.class_name.clone(),
        constructor: spec.constructor.clone(),
        max_concurrency: spec.max_concurrency.max(1),
    };
    let out = shared
        .workers
        .start_actor(
            &spec.binary_sha256,
            &spec.binary_source,
            &r.job_id,
            start,
            timeout,
        )
        .await;
    let reply = match out {
        Ok(Ok((worker_id, worker_address, pid))) => {
            tracing::info!(
                actor = r.actor_id,
                restarts = r.num_restarts,
                worker = worker_id,
                "actor started"
            );
            pb::StartActorReply {
                worker_id,
                worker_address,
                pid,
                creation_error: None,
            }
        }
        Ok(Err(e)) => pb::StartActorReply {
            creation_error: Some(e),
            ..Default::default()
        },
        Err(e) => {
            tracing::warn!(
                actor = r.actor_id,
                restarts = r.num_restarts,
                "could not start the actor: {}",
                e.message()
            );
            // Nothing holds the lease if no worker took it (a worker that did frees it
            // when it exits).
            if shared
                .workers
                .actor_worker(&r.actor_id, r.num_restarts)
                .is_none()
            {
                shared.leases.give_back(&lease_id);
            }
            return Err(e);
        }
    };
    Ok(reply)
}
