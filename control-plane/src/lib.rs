//! The control plane: one replica of the Raft-replicated cluster state per head.
//!
//! - `state`: the closed `Command` enum and the deterministic `apply` (pure).
//! - `db`, `log_store`, `sm_store`: openraft's log and state machine on sled, behind `RaftDb`.
//! - `format`: the versions of the data dir, log entries and snapshots, checked first.
//! - `network`: openraft's transport over gRPC.
//! - `service`: the `ControlPlane` and `Raft` gRPC services.
//! - `leader`: the leader-only singleton services (node health).
//!
//! Entry point: [`start`] binds the ports, opens the store, joins or forms the Raft group and
//! serves until [`RunningHead::shutdown`].

// openraft's storage traits fix `StorageError` (224 bytes) as the error type of the store.
#![allow(clippy::result_large_err)]

mod actors;
pub mod autoscaler;
pub mod cluster_view;
mod dashboard;
pub mod db;
pub mod failpoints;
pub mod format;
mod head;
pub mod instances;
pub mod jobs;
mod jobs_api;
mod leader;
mod leader_loop;
mod lease;
pub mod log_store;
pub mod logs;
pub mod metrics;
pub mod network;
mod pgs;
pub mod prevote;
mod prom_sd;
pub mod raft_transport;
mod ray_gcs;
mod rejection;
pub mod service;
pub mod sm_store;
pub mod state;
mod state_api;
pub mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use openraft::{BasicNode, Config, SnapshotPolicy};
use protocol::RaftId;
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb;
use protocol::server::Listeners;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use leader::HealthConfig;

use crate::db::SledRaftDb;
use crate::head::HeadShared;
use crate::log_store::LogStore;
use crate::network::GrpcRaftNetworkFactory;
use crate::raft_transport::RaftTransportService;
use crate::service::ControlPlaneService;
use crate::sm_store::StateMachineStore;

pub use protocol::server::MetricsRender;

#[derive(Clone)]
pub struct HeadOptions {
    /// Raft log, vote and snapshots live in `<data_dir>/raft`.
    pub data_dir: PathBuf,
    /// Interface to bind (127.0.0.1 unless told otherwise).
    pub bind_host: String,
    /// Host other processes reach this head at (never guessed).
    pub advertise_host: String,
    /// gRPC port (cluster API and Raft transport); 0 picks a free port.
    pub port: u16,
    /// HTTP port (`/metrics`; the Jobs API later); 0 picks a free port.
    pub dashboard_port: u16,
    /// Every head's advertised `host:port`, this one included, to bootstrap a group. Empty
    /// means a one-head cluster (unless `join` is set).
    pub peers: Vec<String>,
    /// Existing heads to ask to add this one (instead of bootstrapping).
    pub join: Vec<String>,
    /// The cluster token; none means auth is disabled (the operator said so).
    pub token: Option<AuthToken>,
    /// The heads' peer secret (Raft transport, membership changes); none: found as
    /// `protocol::auth::load_peer_secret` finds it.
    pub peer_secret: Option<AuthToken>,
    /// Origins a browser may call the dashboard port from, besides its own.
    pub allowed_origins: Vec<String>,
    pub health: HealthConfig,
    pub jobs: jobs::JobConfig,
    pub raft_heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot (and purge the log) every this many applied entries.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot, so a follower that lags by fewer catches up from
    /// the log instead of a snapshot install.
    pub logs_to_keep: u64,
    pub metrics: Option<MetricsRender>,
    /// How the autoscaler's providers start things (the local provider runs `rayctl`).
    pub provider_env: autoscaler::provider::ProviderEnv,
    /// Where to write Ray's Prometheus service discovery file every 5 s (none: nowhere).
    pub service_discovery_file: Option<PathBuf>,
    /// Grafana for the dashboard's metrics page (Ray's RAY_GRAFANA_HOST), and the address
    /// browsers reach it at if different (RAY_GRAFANA_IFRAME_HOST).
    pub grafana_host: Option<String>,
    pub grafana_iframe_host: Option<String>,
}

impl HeadOptions {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            bind_host: "127.0.0.1".into(),
            advertise_host: "127.0.0.1".into(),
            port: 6379,
            dashboard_port: 8265,
            peers: Vec::new(),
            join: Vec::new(),
            token: None,
            peer_secret: None,
            allowed_origins: Vec::new(),
            health: HealthConfig::default(),
            jobs: jobs::JobConfig::default(),
            raft_heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(250), Duration::from_millis(500)),
            snapshot_every: 5000,
            logs_to_keep: 1000,
            metrics: None,
            provider_env: autoscaler::provider::ProviderEnv::default(),
            service_discovery_file: None,
            grafana_host: None,
            grafana_iframe_host: None,
        }
    }
}

/// A started head. Dropping it does not stop it; call `shutdown`.
pub struct RunningHead {
    pub address: String,
    pub raft_id: u64,
    pub port: u16,
    pub dashboard_port: u16,
    pub raft: types::Raft,
    data_dir: PathBuf,
    listeners: Listeners,
    tasks: Vec<JoinHandle<()>>,
}

/// Resolves with why Raft stopped when it stops on its own: a storage error (a full disk: the
/// log's flush failed, which openraft makes fatal), or its core panicked. Never after a
/// shutdown asked for (`Fatal::Stopped`). Watches the metrics, where openraft's core leaves
/// `running_state = Err(fatal)` (and `state = Shutdown`) as it quits.
pub async fn raft_failure(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, BasicNode>>,
) -> String {
    loop {
        let running = metrics.borrow_and_update().running_state.clone();
        match running {
            Ok(()) => {}
            Err(openraft::error::Fatal::Stopped) => std::future::pending::<()>().await,
            Err(fatal) => return fatal.to_string(),
        }
        if metrics.changed().await.is_err() {
            return "its core ended without a word".into();
        }
    }
}

impl RunningHead {
    /// Resolves when this head can no longer serve: its Raft stopped on its own (see
    /// [`raft_failure`]). Such a head answers "raft stopped" forever and cannot recover in
    /// the process (sled refuses every write after a failed one), so the caller should exit
    /// non-zero: restarted on the same data dir once the cause is fixed, the head rejoins
    /// the group and catches up (as etcd does, a member that cannot persist stops).
    pub fn failed(&self) -> impl std::future::Future<Output = anyhow::Error> + Send + 'static {
        let metrics = self.raft.metrics();
        let store = self.data_dir.join("raft");
        async move {
            let why = raft_failure(metrics).await;
            anyhow::anyhow!(
                "this head's raft stopped ({why}); its store is {}: a head that cannot persist must not keep running, so it exits (restart it once the cause, e.g. a full disk, is fixed: it rejoins the group and catches up)",
                store.display()
            )
        }
    }

    /// Stops serving and stops Raft.
    pub async fn shutdown(self) {
        self.listeners.stop();
        let _ = self.raft.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn bind(host: &str, port: u16, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot bind {what} port {host}:{port}"))
}

/// Starts a head: binds its ports, opens (or creates) its Raft store, forms or joins the group
/// and serves. Returns once the servers are listening.
pub async fn start(opts: HeadOptions) -> anyhow::Result<RunningHead> {
    metrics::describe();
    let grpc = bind(&opts.bind_host, opts.port, "gRPC").await?;
    let http = bind(&opts.bind_host, opts.dashboard_port, "dashboard").await?;
    let port = grpc.local_addr()?.port();
    let dashboard_port = http.local_addr()?.port();
    let address = format!("{}:{port}", opts.advertise_host);
    protocol::ids::validate_address(&address)?;
    let raft_id = RaftId::from_address(&address).0;

    let mut peers = opts.peers.clone();
    if !peers.is_empty() && !peers.contains(&address) {
        bail!(
            "this head's address {address} is not in --peers {}; every head must be given the same list, itself included",
            peers.join(",")
        );
    }
    if peers.is_empty() && opts.join.is_empty() {
        peers.push(address.clone());
    }
    for p in &peers {
        protocol::ids::validate_address(p).with_context(|| format!("bad --peers entry {p:?}"))?;
    }

    let config = Config {
        cluster_name: "rayctl".into(),
        heartbeat_interval: opts.raft_heartbeat.as_millis() as u64,
        election_timeout_min: opts.election_timeout.0.as_millis() as u64,
        election_timeout_max: opts.election_timeout.1.as_millis() as u64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every),
        max_in_snapshot_log_to_keep: opts.logs_to_keep,
        install_snapshot_timeout: 10_000,
        // Elections only after a pre-vote round wins (`prevote::gate` switches them on).
        enable_elect: false,
        ..Default::default()
    }
    .validate()
    .context("invalid raft config")?;

    let peer_secret = match opts.peer_secret.clone() {
        Some(p) => p,
        None => protocol::auth::load_peer_secret(None, true)?,
    };
    let db = SledRaftDb::open(&opts.data_dir.join("raft"))
        .with_context(|| format!("cannot open the raft store in {}", opts.data_dir.display()))?;
    let sm = StateMachineStore::open(db.clone())
        .map_err(|e| anyhow::anyhow!("cannot restore the state machine: {e}"))?;
    let mut log_store = LogStore::open(&db)
        .with_context(|| format!("cannot open the raft log in {}", opts.data_dir.display()))?
        .with_snapshot_floor(sm.snapshot_floor());
    let wal = log_store.clone();
    forget_leadership(&mut log_store)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the raft vote: {e}"))?;
    let reader = sm.reader();
    let raft = types::Raft::new(
        raft_id,
        Arc::new(config),
        GrpcRaftNetworkFactory::new(Some(peer_secret.clone())),
        log_store,
        sm,
    )
    .await
    .context("cannot start raft")?;

    let (proposals, proposal_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(HeadShared {
        raft: raft.clone(),
        state: reader,
        soft: Mutex::default(),
        raft_id,
        address: address.clone(),
        ports: pb::HeadPorts {
            port: port.into(),
            dashboard_port: dashboard_port.into(),
        },
        heartbeat_period: opts.health.period,
        node_timeout: opts.health.period * opts.health.failure_threshold.max(1),
        token: opts.token.clone(),
        proposals,
        job_kick: tokio::sync::Notify::new(),
        node_clients: Mutex::default(),
        actor_kick: tokio::sync::Notify::new(),
        actor_changed: tokio::sync::Notify::new(),
        actor_node_clients: Mutex::default(),
        pg_kick: tokio::sync::Notify::new(),
        pg_changed: tokio::sync::Notify::new(),
        lease: Arc::new(lease::LeaderLease::new(
            opts.health.period * opts.health.failure_threshold.max(1),
            opts.election_timeout.1,
        )),
        leader_contact: Arc::default(),
        election_max: opts.election_timeout.1,
        autoscaler_kick: tokio::sync::Notify::new(),
        autoscaler_status: Mutex::default(),
    });

    let routes = tonic::service::Routes::new(
        pb::control_plane_server::ControlPlaneServer::new(ControlPlaneService(shared.clone()))
            .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(protocol::MAX_MESSAGE_BYTES),
    )
    .add_service(
        pb::raft_server::RaftServer::new(RaftTransportService(shared.clone()))
            .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(protocol::MAX_MESSAGE_BYTES),
    );
    // The GCS calls Ray's own tools make to find the dashboard (`ray logs`).
    let ray_gcs = {
        let mut key: Vec<&String> = peers.iter().chain(&opts.join).collect();
        key.sort();
        key.dedup();
        let key: Vec<&str> = key.iter().map(|s| s.as_str()).collect();
        ray_gcs::RayGcs::new(
            format!("{}:{dashboard_port}", opts.advertise_host),
            &key.join(","),
        )
    };
    let routes = routes
        .add_service(
            protocol::ray_rpc::node_info_gcs_service_server::NodeInfoGcsServiceServer::new(
                ray_gcs.clone(),
            ),
        )
        .add_service(
            protocol::ray_rpc::internal_kv_gcs_service_server::InternalKvGcsServiceServer::new(
                ray_gcs,
            ),
        );
    let api_heads = {
        let mut h = vec![address.clone()];
        h.extend(
            opts.peers
                .iter()
                .chain(&opts.join)
                .filter(|a| **a != address)
                .cloned(),
        );
        h
    };
    let sd_client = protocol::client::HeadClient::new(
        &api_heads,
        opts.token.clone(),
        protocol::client::ClientOptions {
            deadline: Duration::from_secs(10),
            ..Default::default()
        },
    )?;
    // The dashboard port: the web dashboard, the Jobs API, Ray's State API and Prometheus
    // discovery, each over the cluster API (so any head serves them).
    let api = jobs_api::router(api_heads, opts.token.clone())?
        .merge(state_api::router(sd_client.clone(), opts.token.clone()))
        .merge(prom_sd::router(sd_client.clone()))
        .merge(dashboard::router(
            opts.token.clone(),
            opts.grafana_host.clone(),
            opts.grafana_iframe_host.clone(),
        ));
    let served = [opts.advertise_host.clone(), opts.bind_host.clone()];
    let listeners = Listeners::spawn(
        grpc,
        routes,
        http,
        api,
        opts.metrics.clone(),
        protocol::server::Access {
            token: opts.token.clone(),
            peer: Some(peer_secret.clone()),
            hosts: Arc::new(protocol::server::HostPolicy::new(
                &served,
                &opts.allowed_origins,
            )),
        },
    );
    let mut tasks = vec![
        tokio::spawn(match opts.service_discovery_file.clone() {
            Some(path) => futures_util::future::Either::Left(prom_sd::write_loop(sd_client, path)),
            None => futures_util::future::Either::Right(std::future::ready(())),
        }),
        tokio::spawn(head::run_proposer(shared.clone(), proposal_rx)),
        tokio::spawn(leader::supervise(
            shared.clone(),
            opts.health,
            opts.jobs,
            opts.provider_env.clone(),
        )),
        tokio::spawn(commit_index_metric(raft.clone(), wal)),
        tokio::spawn(lease::keep_confirmed(raft.clone(), shared.lease.clone())),
        tokio::spawn(prevote::gate(
            raft.clone(),
            shared.raft_id,
            shared.leader_contact.clone(),
            peer_secret.clone(),
            opts.election_timeout.1,
        )),
    ];

    if opts.join.is_empty() {
        if !raft.is_initialized().await.unwrap_or(true) {
            let members: BTreeMap<u64, BasicNode> = peers
                .iter()
                .map(|p| (RaftId::from_address(p).0, BasicNode { addr: p.clone() }))
                .collect();
            // Every head of a new group initializes with the same list; openraft accepts the
            // identical membership from each and the election picks one leader.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!("initialize: {e}");
            }
        }
    } else {
        // Membership changes take the peer secret, not the cluster token.
        tasks.push(tokio::spawn(join_group(
            opts.join.clone(),
            address.clone(),
            Some(peer_secret.clone()),
        )));
    }

    tracing::info!(%address, raft_id, port, dashboard_port, "head started");
    Ok(RunningHead {
        address,
        raft_id,
        port,
        dashboard_port,
        raft,
        data_dir: opts.data_dir.clone(),
        listeners,
        tasks,
    })
}

/// Asks an existing group to add this head, until it does.
async fn join_group(heads: Vec<String>, address: String, token: Option<AuthToken>) {
    let opts = ClientOptions {
        deadline: Duration::from_secs(30),
        rpc_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let Ok(client) = HeadClient::new(&heads, token, opts) else {
        tracing::error!("bad --join addresses {heads:?}");
        return;
    };
    loop {
        let req = pb::RaftAddPeerRequest {
            address: address.clone(),
            learner_only: false,
        };
        match client
            .call(|mut c| {
                let req = req.clone();
                async move { c.raft_add_peer(req).await }
            })
            .await
        {
            Ok(_) => {
                tracing::info!("joined the raft group");
                return;
            }
            Err(e) => {
                tracing::warn!("joining the raft group failed, retrying: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Publishes the commit index, read from the Raft core once a second, and the log's fsync
/// counters.
async fn commit_index_metric(raft: types::Raft, wal: LogStore) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        metrics::record_wal(&wal.flush_metrics());
        let Ok(committed) = raft
            .with_raft_state(|st| st.committed.map(|l| l.index))
            .await
        else {
            return;
        };
        if let Some(c) = committed {
            ::metrics::gauge!(metrics::RAFT_COMMIT_INDEX).set(c as f64);
        }
    }
}

/// A head never resumes as leader of its old term after a restart: its vote is stored again
/// as not committed, so it starts as a follower and a leader is elected in a new term.
///
/// openraft 0.9 restores a restarted leader whose vote is committed at once, in the same
/// term, without a new no-op entry. Its commit index then comes from the store, where it is
/// not flushed, so a linearizable read could be served from a state missing writes that were
/// acknowledged before the crash (the chaos runner's `crash-at-failpoints` saw it); and a
/// leader whose unflushed log tail died with it would propose new entries under log ids its
/// followers already hold. An election costs about a second after a whole-group restart.
async fn forget_leadership<S: openraft::storage::RaftLogStorage<types::TypeConfig>>(
    log: &mut S,
) -> Result<(), types::StorageError> {
    if let Some(mut vote) = log.read_vote().await?
        && vote.committed
    {
        vote.committed = false;
        log.save_vote(&vote).await?;
    }
    Ok(())
}

#[cfg(test)]
mod restart_tests {
    use openraft::Vote;
    use openraft::storage::RaftLogStorage;

    use super::*;

    #[tokio::test]
    async fn a_restarted_head_holds_its_vote_but_not_its_leadership() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(&SledRaftDb::open(dir.path()).unwrap()).unwrap();
        let mut vote = Vote::new(7, 3);
        vote.commit();
        log.save_vote(&vote).await.unwrap();
        forget_leadership(&mut log).await.unwrap();
        let back = log.read_vote().await.unwrap().unwrap();
        assert!(!back.committed, "a committed vote would restore leadership");
        assert_eq!(back.leader_id(), vote.leader_id(), "the vote itself stays");
        // An uncommitted vote (and none at all) is left as it is.
        forget_leadership(&mut log).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(back));
        let dir2 = tempfile::tempdir().unwrap();
        let mut empty = LogStore::open(&SledRaftDb::open(dir2.path()).unwrap()).unwrap();
        forget_leadership(&mut empty).await.unwrap();
        assert_eq!(empty.read_vote().await.unwrap(), None);
    }
}
