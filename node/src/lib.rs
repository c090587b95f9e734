//! The node daemon: one per machine (heads run one too). Today it owns the node's identity,
//! registers with the control plane, heartbeats its available resources (soft state, never
//! in the Raft log), re-registers when fenced, and serves the `NodeManager` gRPC service and
//! `/metrics`. Later issues add the worker pool, leases, spillback, the object store host and
//! the job agent here.
//!
//! API Boundary: `node` and `control-plane` never depend on each other; they meet only
//! through `protocol`.

pub mod identity;
pub mod metrics;
mod registration;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb::{self, node_manager_server::NodeManager};
use protocol::server::Listeners;
use protocol::NodeId;
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
}

impl NodeOptions {
    pub fn new(heads: Vec<String>, data_dir: PathBuf) -> Self {
        Self {
            heads,
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
}

pub struct RunningNode {
    pub node_id: NodeId,
    pub address: String,
    pub node_manager_port: u16,
    pub metrics_export_port: u16,
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

    /// Stops serving; tells the control plane this node is going away (best effort, 2 s).
    pub async fn shutdown(self) {
        let incarnation = self.incarnation();
        if incarnation > 0 {
            let c = self.client.with_options(ClientOptions { deadline: Duration::from_secs(2), ..Default::default() });
            let req = pb::UnregisterNodeRequest {
                node_id: self.node_id.to_string(),
                incarnation,
                reason: "stopped by rayctl stop".into(),
            };
            if let Err(e) = c.call(|mut c| { let req = req.clone(); async move { c.unregister_node(req).await } }).await {
                tracing::warn!("could not unregister: {e}");
            }
        }
        self.listeners.stop();
        for t in self.tasks {
            t.abort();
        }
    }
}

#[derive(Clone)]
struct NodeManagerService(Arc<NodeShared>);

#[tonic::async_trait]
impl NodeManager for NodeManagerService {
    async fn health_check(
        &self,
        _: tonic::Request<pb::NodeHealthCheckRequest>,
    ) -> Result<tonic::Response<pb::NodeHealthCheckReply>, tonic::Status> {
        Ok(tonic::Response::new(pb::NodeHealthCheckReply {
            node_id: self.0.node_id.to_string(),
            incarnation: self.0.incarnation.load(Ordering::Acquire),
            ports: Some(self.0.ports),
        }))
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
    let (lock, node_id) = identity::acquire(&opts.data_dir)?;
    check_resources(&opts.resources)?;
    let client = HeadClient::new(&opts.heads, opts.token.clone(), ClientOptions::default())
        .context("bad head addresses")?;
    let nm = TcpListener::bind((opts.bind_host.as_str(), opts.node_manager_port))
        .await
        .with_context(|| format!("cannot bind node manager port {}:{}", opts.bind_host, opts.node_manager_port))?;
    let mx = TcpListener::bind((opts.bind_host.as_str(), opts.metrics_export_port))
        .await
        .with_context(|| format!("cannot bind metrics export port {}:{}", opts.bind_host, opts.metrics_export_port))?;
    let node_manager_port = nm.local_addr()?.port();
    let metrics_export_port = mx.local_addr()?.port();
    let address = format!("{}:{node_manager_port}", opts.advertise_host);
    let shared = Arc::new(NodeShared {
        node_id,
        address: address.clone(),
        ports: pb::NodePorts {
            node_manager_port: node_manager_port.into(),
            object_manager_port: 0,
            metrics_export_port: metrics_export_port.into(),
        },
        incarnation: AtomicU64::new(0),
    });

    let routes = tonic::service::Routes::new(
        pb::node_manager_server::NodeManagerServer::new(NodeManagerService(shared.clone()))
            .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES),
    );
    let listeners = Listeners::spawn(nm, routes, mx, opts.metrics.clone(), opts.token.clone());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(registration::run(
        client.clone(),
        shared.clone(),
        opts.resources.clone(),
        opts.labels.clone(),
        opts.is_head,
    )));
    tracing::info!(%node_id, %address, metrics_export_port, "node started");
    Ok(RunningNode {
        node_id,
        address,
        node_manager_port,
        metrics_export_port,
        shared,
        client,
        listeners,
        tasks,
        _lock: lock,
    })
}
