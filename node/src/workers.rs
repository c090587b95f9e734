//! The worker pool (DESIGN §1, §3, §8): worker processes are the driver's own binary, re-run
//! in worker mode. A lease with a binary hash comes with a worker: an idle one running that
//! binary for that job, or a new one. A node that lacks the binary fetches it by content hash
//! from the node named in the lease request and checks the hash before running it.
//!
//! Every worker and driver on this node keeps a `WorkerChannel` stream open: the worker says
//! hello with its CoreWorker address, hears which lease it was given, and says when the owner
//! closed the lease's stream; both send their task counters every second (the node exports
//! them). A worker's stream ending or its process exiting ends its lease.
//!
//! Invariants: a worker holds at most one lease; a lease's resources are given back exactly
//! once, whichever of lease end, worker exit or start failure comes first; idle workers exit
//! after `idle_timeout`; every worker dies with the node (PDEATHSIG and kill on drop).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::auth::AuthToken;
use protocol::pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::leases::Leases;

/// A binary fetch that receives nothing for this long fails.
const FETCH_STALL: Duration = Duration::from_secs(30);

/// How a node runs workers.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// An idle worker exits after this long.
    pub idle_timeout: Duration,
    /// A new worker must say hello within this long.
    pub start_timeout: Duration,
    /// Cached binaries, by sha256.
    pub binary_dir: PathBuf,
    /// Idle workers started for a driver's binary as soon as the driver registers it here.
    pub prestart: u32,
}

pub(crate) struct PoolConfig {
    pub(crate) opts: WorkerOptions,
    pub(crate) node_id: String,
    pub(crate) node_address: String,
    pub(crate) object_manager_address: String,
    pub(crate) store_socket: PathBuf,
    pub(crate) heads: Vec<String>,
    pub(crate) token: Option<AuthToken>,
    pub(crate) log_dir: PathBuf,
    pub(crate) job_dir: PathBuf,
    pub(crate) advertise_host: String,
    pub(crate) store: Arc<object_store::Store>,
}

#[derive(Debug, PartialEq)]
enum WState {
    /// Started (for this lease, or prestarted), not yet said hello.
    Starting(Option<String>),
    Idle(Instant),
    Leased(String),
}

/// A worker that is (becoming) an actor.
struct ActorBinding {
    actor_id: String,
    restarts: u64,
    start: pb::ActorStart,
    /// Answered when the constructor returned.
    ready: Option<oneshot::Sender<Result<(), pb::TaskError>>>,
}

struct Worker {
    /// Set when this node kills it (so its exit is not counted as a failure).
    killed: std::sync::atomic::AtomicBool,
    key: (String, String),
    actor: Option<ActorBinding>,
    pid: u32,
    address: String,
    state: WState,
    tx: Option<mpsc::UnboundedSender<pb::NodeToWorker>>,
    ready: Option<oneshot::Sender<Result<(), String>>>,
    log: PathBuf,
    /// It owns objects (its last stats said so): other processes may hold refs to them, so
    /// it is not reaped while idle (its death would be their owner's death).
    owns_objects: bool,
}

#[derive(Default)]
struct PoolState {
    workers: HashMap<String, Worker>,
    next: u64,
    fetches: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Live stats per channel, and the sums of channels that ended (counters stay monotonic).
    stats: HashMap<u64, pb::WorkerStats>,
    departed: pb::WorkerStats,
    next_channel: u64,
    starts: u64,
    /// Owner prefixes of processes here that went away, for the next heartbeat.
    dead_owners: Vec<Vec<u8>>,
    /// Owner prefixes already freed here (prefix → when), so a repeated report costs nothing.
    freed_owners: HashMap<Vec<u8>, Instant>,
    /// Actor workers that exited, for the next heartbeat.
    dead_actors: Vec<pb::ActorIncarnation>,
    /// The processes on this channel: (pid, worker id, job id, owner prefix).
    processes: HashMap<u64, (u32, String, String, Vec<u8>)>,
    /// Each channel's owner prefix and a way to send it news of its objects (weak: the
    /// channel's own end still decides when it closes).
    owners: HashMap<u64, (Vec<u8>, mpsc::WeakUnboundedSender<pb::NodeToWorker>)>,
    /// Binaries drivers here registered: sha → (their jobs, when last registered). Advertised
    /// in heartbeats while a process of one of those jobs runs here (or for a minute after
    /// the registration, before the driver's channel is up).
    registered: HashMap<String, (std::collections::BTreeSet<String>, Instant)>,
    /// Prefetches started: sha → when (one attempt per `PREFETCH_RETRY`).
    prefetched: HashMap<String, Instant>,
}

/// How long a registered binary is advertised without a live process of its job.
const REGISTRATION_GRACE: Duration = Duration::from_secs(60);
/// How soon a failed prefetch of a binary is tried again.
const PREFETCH_RETRY: Duration = Duration::from_secs(30);
/// Most binaries one heartbeat advertises.
const MAX_ADVERTISED: usize = 16;
/// How long after its start a node prefetches the binaries other nodes advertise. A new
/// node (the autoscaler's) gets them before its first task; a node that has run for a while
/// fetches a new driver's binary with that driver's first task there, so a driver's start
/// does not send its binary to every node at once.
const PREFETCH_WINDOW: Duration = Duration::from_secs(120);

/// The latest state of the tasks the owners on this node reported, bounded.
#[derive(Default)]
struct TaskTable {
    by_id: HashMap<protocol::ObjectId, pb::TaskEvent>,
    /// Tasks that ended, by (FINISHED or FAILED, function, whether a retry): counted as they
    /// end, so eviction from `by_id` does not lower them.
    ended: HashMap<(String, String, bool), u64>,
    /// Insertion order, for eviction.
    order: std::collections::VecDeque<protocol::ObjectId>,
    dropped: u64,
}

/// Tasks kept per node for `rayctl list tasks`.
const MAX_TASKS: usize = 100_000;

impl TaskTable {
    fn record(&mut self, events: pb::TaskEvents) {
        self.dropped += events.dropped;
        for mut e in events.events {
            // The times of the states a timeline needs: owners send those they saw (one
            // event per task and report); else the event's own time gives its state's.
            use pb::TaskState as S;
            let ends = matches!(e.state(), S::Finished | S::Failed);
            let start = match e.start_ms {
                0 if e.state() == S::SubmittedToWorker => e.time_ms,
                t => t,
            };
            let end = match e.end_ms {
                0 if ends => e.time_ms,
                t => t,
            };
            let Ok(id) = e.task_id.parse::<protocol::ObjectId>() else {
                self.dropped += 1;
                continue;
            };
            match self.by_id.get_mut(&id) {
                Some(t) => {
                    if ends && t.state != e.state {
                        let name = protocol::task_state_name(e.state()).to_owned();
                        *self
                            .ended
                            .entry((name, t.function.clone(), t.attempt.max(e.attempt) > 0))
                            .or_default() += 1;
                    }
                    if start != 0 {
                        // A retry starts again.
                        t.start_ms = start;
                        t.end_ms = 0;
                    }
                    if end != 0 {
                        t.end_ms = end;
                    }
                    // Later events name only what changed.
                    t.state = e.state;
                    t.time_ms = e.time_ms;
                    t.attempt = t.attempt.max(e.attempt);
                    for (old, new) in [
                        (&mut t.node_id, e.node_id),
                        (&mut t.worker_id, e.worker_id),
                        (&mut t.error, e.error),
                    ] {
                        if !new.is_empty() {
                            *old = new;
                        }
                    }
                }
                None => {
                    if ends {
                        let name = protocol::task_state_name(e.state()).to_owned();
                        *self
                            .ended
                            .entry((name, e.function.clone(), e.attempt > 0))
                            .or_default() += 1;
                    }
                    if e.created_ms == 0 {
                        e.created_ms = e.time_ms;
                    }
                    e.start_ms = start;
                    e.end_ms = end;
                    self.order.push_back(id);
                    self.by_id.insert(id, e);
                }
            }
        }
        while self.order.len() > MAX_TASKS {
            if let Some(id) = self.order.pop_front() {
                self.by_id.remove(&id);
                self.dropped += 1;
            }
        }
    }
}

pub(crate) struct WorkerPool {
    cfg: PoolConfig,
    /// Worker output for callers on other nodes.
    output: crate::output::Forwarder,
    leases: Arc<Leases>,
    st: Mutex<PoolState>,
    /// The task table has its own lock: a report of many events, or a listing, does not
    /// hold up leases and workers.
    tasks: Mutex<TaskTable>,
    /// Calls for owner processes here, relayed down their channels (borrowing protocol).
    pub(crate) relay: crate::relay::Relay,
    /// Node managers a missing binary may be fetched from (the live nodes); none until the
    /// first heartbeat reply, when only this node itself is a source.
    binary_sources: std::sync::RwLock<std::collections::HashSet<String>>,
    /// When this node started: it prefetches binaries only while it is new.
    started: Instant,
}

impl Worker {
    /// Kills the process, remembering that its death was asked for.
    fn kill(&self) -> nix::Result<()> {
        self.killed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
    }
}

fn bad_hash(s: &str) -> Status {
    Status::invalid_argument(format!(
        "binary hash {:?} is not 64 lowercase hex characters",
        s.chars().take(80).collect::<String>()
    ))
}

pub(crate) use protocol::sha256_file;

impl WorkerPool {
    pub(crate) fn new(cfg: PoolConfig, leases: Arc<Leases>) -> Self {
        Self {
            output: crate::output::Forwarder::new(cfg.token.clone()),
            cfg,
            leases,
            binary_sources: std::sync::RwLock::default(),
            started: Instant::now(),
            st: Mutex::default(),
            tasks: Mutex::default(),
            relay: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn task_table(&self) -> std::sync::MutexGuard<'_, TaskTable> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn binary_path(&self, sha: &str) -> PathBuf {
        self.cfg.opts.binary_dir.join(sha)
    }

    /// Puts a checked file into the cache: `tmp` is renamed to its hash if it matches.
    fn install(&self, tmp: &Path, sha: &str) -> Result<u64, Status> {
        let got = sha256_file(tmp)
            .map_err(|e| Status::internal(format!("cannot hash {}: {e}", tmp.display())))?;
        self.install_hashed(tmp, sha, &got)
    }

    /// Installs `tmp`, whose content hashes to `got`, as binary `sha` (if they are equal).
    fn install_hashed(&self, tmp: &Path, sha: &str, got: &str) -> Result<u64, Status> {
        use std::os::unix::fs::PermissionsExt;
        if got != sha {
            let _ = std::fs::remove_file(tmp);
            return Err(Status::data_loss(format!(
                "binary content hashes to {got}, expected {sha}"
            )));
        }
        let size = std::fs::metadata(tmp).map(|m| m.len()).unwrap_or(0);
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Status::internal(e.to_string()))?;
        std::fs::rename(tmp, self.binary_path(sha))
            .map_err(|e| Status::internal(format!("cannot install binary {sha}: {e}")))?;
        Ok(size)
    }

    fn tmp_path(&self, sha: &str) -> Result<PathBuf, Status> {
        std::fs::create_dir_all(&self.cfg.opts.binary_dir).map_err(|e| {
            Status::internal(format!(
                "cannot create {}: {e}",
                self.cfg.opts.binary_dir.display()
            ))
        })?;
        let n = {
            let mut st = self.lock();
            st.next += 1;
            st.next
        };
        Ok(self
            .cfg
            .opts
            .binary_dir
            .join(format!(".{sha}.{}.{n}.tmp", std::process::id())))
    }

    /// `RegisterBinary`: copies a local file into the cache after checking its hash.
    pub(crate) async fn register_local(
        self: &Arc<Self>,
        sha: String,
        path: String,
    ) -> Result<pb::RegisterBinaryReply, Status> {
        if !protocol::is_sha256_hex(&sha) {
            return Err(bad_hash(&sha));
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let dst = me.binary_path(&sha);
            if let Ok(m) = std::fs::metadata(&dst) {
                return Ok(pb::RegisterBinaryReply {
                    sha256: sha,
                    size: m.len(),
                });
            }
            let tmp = me.tmp_path(&sha)?;
            std::fs::copy(&path, &tmp).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Status::invalid_argument(format!("cannot read binary {path}: {e}"))
            })?;
            let size = me.install(&tmp, &sha)?;
            Ok(pb::RegisterBinaryReply { sha256: sha, size })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    /// Starts idle workers for `(sha, job)` up to the prestart count.
    pub(crate) fn prestart(self: &Arc<Self>, sha: &str, job: &str) {
        let want = self.cfg.opts.prestart as usize;
        if want == 0 {
            return;
        }
        let key = (sha.to_owned(), job.to_owned());
        let have = self
            .lock()
            .workers
            .values()
            .filter(|w| w.key == key && !matches!(w.state, WState::Leased(_)))
            .count();
        let path = self.binary_path(sha);
        for _ in have..want {
            if let Err(e) = self.spawn(&path, key.clone(), None, None) {
                tracing::warn!("cannot prestart a worker: {e}");
                return;
            }
        }
    }

    /// `UploadBinary`: a binary sent in chunks by a driver that is not on this machine.
    pub(crate) async fn upload(
        self: &Arc<Self>,
        mut s: tonic::Streaming<pb::BinaryChunk>,
    ) -> Result<(pb::RegisterBinaryReply, String), Status> {
        use tokio::io::AsyncWriteExt;
        let first = s
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload"))?;
        let sha = first.sha256.clone();
        let job = first.job_id.clone();
        if !protocol::is_sha256_hex(&sha) {
            return Err(bad_hash(&sha));
        }
        if let Ok(m) = std::fs::metadata(self.binary_path(&sha)) {
            return Ok((
                pb::RegisterBinaryReply {
                    sha256: sha,
                    size: m.len(),
                },
                job,
            ));
        }
        let tmp = self.tmp_path(&sha)?;
        let res: Result<(), Status> = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            f.write_all(&first.data)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            while let Some(c) = s.message().await? {
                f.write_all(&c.data)
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
            f.flush().await.map_err(|e| Status::internal(e.to_string()))
        }
        .await;
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let me = self.clone();
        let sha2 = sha.clone();
        let size = tokio::task::spawn_blocking(move || me.install(&tmp, &sha2))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok((pb::RegisterBinaryReply { sha256: sha, size }, job))
    }

    /// `ReadBinary`: streams a cached binary in 1 MiB chunks.
    pub(crate) fn read(
        &self,
        sha: &str,
    ) -> Result<mpsc::Receiver<Result<pb::BinaryChunk, Status>>, Status> {
        if !protocol::is_sha256_hex(sha) {
            return Err(bad_hash(sha));
        }
        let path = self.binary_path(sha);
        let file = std::fs::File::open(&path)
            .map_err(|_| Status::not_found(format!("binary {sha} is not on this node")))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = file;
            loop {
                let mut buf = vec![0u8; 1 << 20];
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx
                            .blocking_send(Ok(pb::BinaryChunk {
                                sha256: String::new(),
                                data: buf.into(),
                                job_id: String::new(),
                            }))
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                        break;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// The path of binary `sha`, fetched from `source` (a node manager address) if missing.
    async fn ensure_binary(&self, sha: &str, source: &str) -> Result<PathBuf, Status> {
        if !protocol::is_sha256_hex(sha) {
            return Err(bad_hash(sha));
        }
        let path = self.binary_path(sha);
        if path.exists() {
            return Ok(path);
        }
        let lock = self
            .lock()
            .fetches
            .entry(sha.to_owned())
            .or_default()
            .clone();
        let _one_fetch = lock.lock().await;
        if path.exists() {
            return Ok(path);
        }
        if source.is_empty() || source == self.cfg.node_address {
            return Err(Status::failed_precondition(format!(
                "binary {sha} is not on this node and the lease names no node to fetch it from"
            )));
        }
        let tmp = self.tmp_path(sha)?;
        let got = match self.fetch(sha, source, &tmp).await {
            Ok(got) => got,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        tokio::task::block_in_place(|| self.install_hashed(&tmp, sha, &got))?;
        tracing::info!(sha, source, "fetched worker binary");
        Ok(path)
    }

    /// A driver of `job` registered binary `sha` here (it is advertised to new nodes).
    pub(crate) fn note_registered(&self, sha: &str, job: &str) {
        if !protocol::is_sha256_hex(sha) {
            return;
        }
        let mut st = self.lock();
        let e = st
            .registered
            .entry(sha.to_owned())
            .or_insert_with(|| (Default::default(), Instant::now()));
        if !job.is_empty() {
            e.0.insert(job.to_owned());
        }
        e.1 = Instant::now();
    }

    /// The binaries to advertise in the next heartbeat: those registered here whose job
    /// still has a process on this node (or registered less than a minute ago), newest
    /// first. The others are forgotten.
    pub(crate) fn advertised_binaries(&self) -> Vec<String> {
        let mut st = self.lock();
        let live: std::collections::HashSet<String> =
            st.processes.values().map(|p| p.2.clone()).collect();
        st.registered.retain(|_, (jobs, at)| {
            at.elapsed() < REGISTRATION_GRACE || jobs.iter().any(|j| live.contains(j))
        });
        let mut out: Vec<(Instant, String)> = st
            .registered
            .iter()
            .map(|(sha, (_, at))| (*at, sha.clone()))
            .collect();
        out.sort_by_key(|o| std::cmp::Reverse(o.0));
        out.into_iter()
            .take(MAX_ADVERTISED)
            .map(|(_, sha)| sha)
            .collect()
    }

    /// Fetches, in the background, the binaries other nodes advertise that this node lacks,
    /// while this node is new (`PREFETCH_WINDOW`): a node that joins has the running jobs'
    /// programs before their first task reaches it. A task that arrives meanwhile waits for
    /// the same fetch (one per binary).
    pub(crate) fn prefetch(self: &Arc<Self>, view: &[pb::NodeResources]) {
        if self.started.elapsed() > PREFETCH_WINDOW {
            return;
        }
        // The binaries other nodes advertise that this one lacks (looked at on disk before
        // the pool's lock is taken).
        let mut todo: Vec<(String, String)> = view
            .iter()
            .filter(|n| n.address != self.cfg.node_address)
            .flat_map(|n| {
                n.binaries
                    .iter()
                    .take(MAX_ADVERTISED)
                    .filter(|sha| protocol::is_sha256_hex(sha) && !self.binary_path(sha).exists())
                    .map(|sha| (sha.clone(), n.address.clone()))
            })
            .collect();
        {
            // One attempt per binary per `PREFETCH_RETRY`.
            let mut st = self.lock();
            todo.retain(|(sha, _)| {
                if st
                    .prefetched
                    .get(sha)
                    .is_some_and(|t| t.elapsed() < PREFETCH_RETRY)
                {
                    return false;
                }
                st.prefetched.insert(sha.clone(), Instant::now());
                true
            });
        }
        for (sha, source) in todo {
            let me = self.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                match me.ensure_binary(&sha, &source).await {
                    Ok(_) => tracing::info!(
                        sha,
                        source,
                        ms = started.elapsed().as_millis() as u64,
                        "prefetched a worker binary another node's driver uses"
                    ),
                    Err(e) => tracing::warn!(
                        sha,
                        source,
                        "prefetching a worker binary failed: {}",
                        e.message()
                    ),
                }
            });
        }
    }

    /// Where binaries may come from from now on: the node managers of the live nodes.
    pub(crate) fn set_binary_sources(&self, sources: std::collections::HashSet<String>) {
        *self
            .binary_sources
            .write()
            .unwrap_or_else(|p| p.into_inner()) = sources;
    }

    /// Streams binary `sha` from `source` into `tmp`; returns the sha256 of what came,
    /// hashed as it arrives (no second pass over the file).
    async fn fetch(&self, sha: &str, source: &str, tmp: &Path) -> Result<String, Status> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        let member = source == self.cfg.node_address
            || self
                .binary_sources
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(source);
        if !member {
            // A lease request names its source; it must never make this node dial anywhere.
            return Err(Status::invalid_argument(format!(
                "binary source {source:?} is not a live node of this cluster"
            )));
        }
        let opts = protocol::client::ClientOptions {
            rpc_timeout: Duration::from_secs(300),
            ..Default::default()
        };
        let mut c = protocol::client::node_manager(source, self.cfg.token.clone(), &opts)
            .map_err(Status::from)?;
        let mut s = c
            .read_binary(pb::ReadBinaryRequest {
                sha256: sha.to_owned(),
            })
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot fetch binary {sha} from {source}: {}",
                    e.message()
                ))
            })?
            .into_inner();
        let mut hash = sha2::Sha256::new();
        let mut f = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        // A source that stops sending fails the fetch (the lease request is retried) rather
        // than holding every lease for this binary behind it.
        loop {
            let next = tokio::time::timeout(FETCH_STALL, s.message())
                .await
                .map_err(|_| {
                    Status::unavailable(format!(
                        "fetching binary {sha} from {source}: no data for {FETCH_STALL:?}"
                    ))
                })?;
            let Some(c) = next.map_err(|e| {
                Status::unavailable(format!(
                    "fetching binary {sha} from {source}: {}",
                    e.message()
                ))
            })?
            else {
                break;
            };
            hash.update(&c.data);
            f.write_all(&c.data)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        f.flush()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(protocol::sha256_hex(hash))
    }

    /// Gives lease `lease_id` a worker running binary `sha` for job `job`: an idle one, or a
    /// new one. Returns the worker's id and CoreWorker address.
    pub(crate) async fn attach(
        self: &Arc<Self>,
        lease_id: &str,
        sha: &str,
        source: &str,
        job: &str,
    ) -> Result<(String, String), Status> {
        let path = self.ensure_binary(sha, source).await?;
        let key = (sha.to_owned(), job.to_owned());
        {
            let mut st = self.lock();
            let idle = st
                .workers
                .iter_mut()
                .filter(|(_, w)| {
                    w.key == key && matches!(w.state, WState::Idle(_)) && w.tx.is_some()
                })
                .max_by_key(|(_, w)| match w.state {
                    WState::Idle(t) => Some(t),
                    _ => None,
                });
            if let Some((id, w)) = idle {
                w.state = WState::Leased(lease_id.to_owned());
                let sent = w.tx.as_ref().is_some_and(|tx| {
                    tx.send(pb::NodeToWorker {
                        kind: Some(pb::node_to_worker::Kind::Leased(lease_id.to_owned())),
                    })
                    .is_ok()
                });
                if sent {
                    return Ok((id.clone(), w.address.clone()));
                }
                w.state = WState::Idle(Instant::now());
            }
        }
        let (id, ready) = self.spawn(&path, key, Some(lease_id.to_owned()), None)?;
        self.registered(id, ready).await
    }

    /// Waits for a new worker's hello; kills it if it does not come.
    async fn registered(
        &self,
        id: String,
        ready: oneshot::Receiver<Result<(), String>>,
    ) -> Result<(String, String), Status> {
        let outcome = tokio::time::timeout(self.cfg.opts.start_timeout, ready).await;
        let fail = |msg: String| {
            // The worker is of no use to anyone: make sure it is gone.
            if let Some(w) = self.lock().workers.get_mut(&id) {
                w.state = WState::Idle(Instant::now() - self.cfg.opts.idle_timeout);
                let _ = w.kill();
            }
            Err(Status::unavailable(msg))
        };
        match outcome {
            Ok(Ok(Ok(()))) => {
                let st = self.lock();
                let addr = st
                    .workers
                    .get(&id)
                    .map(|w| w.address.clone())
                    .unwrap_or_default();
                Ok((id, addr))
            }
            Ok(Ok(Err(e))) => fail(e),
            Ok(Err(_)) => fail(format!("worker {id} went away before it registered")),
            Err(_) => fail(format!(
                "worker {id} did not register within {:?}",
                self.cfg.opts.start_timeout
            )),
        }
    }

    /// Starts actor `start.actor_id` under lease `lease_id` on a worker of its own (an idle
    /// one for its binary and job, or a new one) and waits for its constructor. Returns the
    /// worker's id, address and pid, or the constructor's error.
    pub(crate) async fn start_actor(
        self: &Arc<Self>,
        sha: &str,
        source: &str,
        job: &str,
        start: pb::ActorStart,
        timeout: Duration,
    ) -> Result<Result<(String, String, u32), pb::TaskError>, Status> {
        let path = self.ensure_binary(sha, source).await?;
        let key = (sha.to_owned(), job.to_owned());
        let (tx, rx) = oneshot::channel();
        let binding = ActorBinding {
            actor_id: start.actor_id.clone(),
            restarts: start.num_restarts,
            start: start.clone(),
            ready: Some(tx),
        };
        let lease_id = start.lease_id.clone();
        let reused = {
            let mut st = self.lock();
            let idle = st.workers.iter_mut().find(|(_, w)| {
                w.key == key
                    && matches!(w.state, WState::Idle(_))
                    && w.tx.is_some()
                    && w.actor.is_none()
            });
            match idle {
                Some((id, w)) => {
                    let msg = pb::NodeToWorker {
                        kind: Some(pb::node_to_worker::Kind::StartActor(start.clone())),
                    };
                    if w.tx.as_ref().is_some_and(|tx| tx.send(msg).is_ok()) {
                        w.state = WState::Leased(lease_id.clone());
                        w.actor = Some(binding);
                        Some(id.clone())
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        let (id, binding) = match reused {
            Some(id) => (id, None),
            None => {
                let (tx2, rx2) = oneshot::channel();
                let b = ActorBinding {
                    actor_id: start.actor_id.clone(),
                    restarts: start.num_restarts,
                    start,
                    ready: Some(tx2),
                };
                let (id, ready) = self.spawn(&path, key, Some(lease_id), Some(b))?;
                self.registered(id.clone(), ready).await?;
                (id, Some(rx2))
            }
        };
        let rx = binding.unwrap_or(rx);
        let fail = |msg: String| {
            if let Some(w) = self.lock().workers.get(&id) {
                let _ = w.kill();
            }
            Err(Status::unavailable(msg))
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => {
                let st = self.lock();
                let w = st.workers.get(&id).ok_or_else(|| {
                    Status::unavailable(format!(
                        "actor worker {id} exited right after its constructor"
                    ))
                })?;
                Ok(Ok((id.clone(), w.address.clone(), w.pid)))
            }
            Ok(Ok(Err(e))) => {
                // The constructor failed: the worker is of no use.
                let _ = fail(String::new());
                Ok(Err(e))
            }
            Ok(Err(_)) => fail(format!(
                "actor worker {id} exited before its constructor returned"
            )),
            Err(_) => fail(format!(
                "the actor's constructor did not return within {timeout:?}"
            )),
        }
    }

    fn spawn(
        self: &Arc<Self>,
        path: &Path,
        key: (String, String),
        lease_id: Option<String>,
        actor: Option<ActorBinding>,
    ) -> Result<(String, oneshot::Receiver<Result<(), String>>), Status> {
        let id = {
            let mut st = self.lock();
            st.next += 1;
            st.starts += 1;
            format!(
                "{}-{}",
                &self.cfg.node_id[..8.min(self.cfg.node_id.len())],
                st.next
            )
        };
        std::fs::create_dir_all(&self.cfg.log_dir).map_err(|e| {
            Status::internal(format!("cannot create {}: {e}", self.cfg.log_dir.display()))
        })?;
        let log = self.cfg.log_dir.join(format!("worker-{id}.log"));
        let out = std::fs::File::create(&log)
            .map_err(|e| Status::internal(format!("cannot create {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| Status::internal(e.to_string()))?;
        let job_dir = self.cfg.job_dir.join(&key.1);
        let cwd = if !key.1.is_empty() && job_dir.is_dir() {
            job_dir
        } else {
            self.cfg.log_dir.clone()
        };
        let mut cmd = tokio::process::Command::new(path);
        cmd.current_dir(cwd)
            .env(protocol::env::WORKER_ID, &id)
            .env(protocol::env::NODE_ID, &self.cfg.node_id)
            .env(protocol::env::NODE_ADDRESS, &self.cfg.node_address)
            .env(protocol::env::OBJECT_STORE_SOCKET, &self.cfg.store_socket)
            .env(
                protocol::env::OBJECT_MANAGER_ADDRESS,
                &self.cfg.object_manager_address,
            )
            .env(protocol::env::NODE_IP_ADDRESS, &self.cfg.advertise_host)
            .env(protocol::ADDRESS_ENV, self.cfg.heads.join(","))
            .env(protocol::env::JOB_ID, &key.1)
            .env(protocol::env::BINARY_SHA256, &key.0)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        // The token in the environment, never on the command line (`ps` shows those); the
        // heads' peer secret never.
        match &self.cfg.token {
            Some(t) => cmd.env(protocol::AUTH_TOKEN_ENV, t.as_str()),
            None => cmd.env_remove(protocol::AUTH_TOKEN_ENV),
        };
        cmd.env_remove(protocol::auth::PEER_SECRET_PATH_ENV);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. A
        // worker dies with its node.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        // Hold the table while starting it: its hello can come before `spawn` returns, and
        // must find it there.
        let mut table = self.lock();
        let mut child = cmd.spawn().map_err(|e| {
            Status::internal(format!("cannot start worker {}: {e}", path.display()))
        })?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = oneshot::channel();
        table.workers.insert(
            id.clone(),
            Worker {
                killed: std::sync::atomic::AtomicBool::new(false),
                key,
                actor,
                pid,
                address: String::new(),
                state: WState::Starting(lease_id),
                tx: None,
                ready: Some(tx),
                log,
                owns_objects: false,
            },
        );
        drop(table);
        crate::metrics::worker_started();
        let me = self.clone();
        let wid = id.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            me.exited(
                &wid,
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
            );
        });
        Ok((id, rx))
    }

    fn exited(&self, id: &str, status: String) {
        let Some(mut w) = self.lock().workers.remove(id) else {
            return;
        };
        let working = match &w.state {
            WState::Leased(l) | WState::Starting(Some(l)) => {
                self.leases.give_back(l);
                true
            }
            WState::Idle(_) | WState::Starting(None) => false,
        };
        // Not asked to die and not a clean exit of its own (an actor's exit_actor).
        if (working || w.actor.is_some())
            && !w.killed.load(std::sync::atomic::Ordering::Relaxed)
            && status != "exit status: 0"
        {
            let name = w
                .actor
                .as_ref()
                .map(|a| a.start.class_name.clone())
                .unwrap_or_default();
            crate::host_metrics::worker_failed(name);
        }
        if let Some(r) = w.ready.take() {
            let _ = r.send(Err(format!(
                "worker {id} exited ({status}) before it registered; see {}",
                w.log.display()
            )));
        }
        if let Some(a) = w.actor.take() {
            tracing::info!(
                worker = id,
                actor = a.actor_id,
                restarts = a.restarts,
                "actor worker exited"
            );
            self.lock().dead_actors.push(pb::ActorIncarnation {
                actor_id: a.actor_id,
                num_restarts: a.restarts,
                reason: format!(
                    "worker {id} (pid {}) exited ({status}); see {}",
                    w.pid,
                    w.log.display()
                ),
            });
        }
        tracing::info!(worker = id, pid = w.pid, %status, "worker exited");
    }

    /// Serves one `WorkerChannel` stream until it ends.
    pub(crate) fn channel(
        self: &Arc<Self>,
        mut s: tonic::Streaming<pb::WorkerMessage>,
    ) -> mpsc::UnboundedReceiver<pb::NodeToWorker> {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        tokio::spawn(async move {
            let conn = {
                let mut st = me.lock();
                st.next_channel += 1;
                st.next_channel
            };
            let mut worker: Option<String> = None;
            let mut owner_prefix: Option<Vec<u8>> = None;
            let mut tx = Some(tx);
            while let Ok(Some(m)) = s.message().await {
                match m.kind {
                    Some(pb::worker_message::Kind::Hello(h)) => {
                        if !h.owner_prefix.is_empty() && h.owner_prefix.len() <= 32 {
                            owner_prefix = Some(h.owner_prefix.clone());
                            if let Some(t) = &tx {
                                me.lock()
                                    .owners
                                    .insert(conn, (h.owner_prefix.clone(), t.downgrade()));
                            }
                        }
                        me.lock().processes.insert(
                            conn,
                            (
                                h.pid,
                                h.worker_id.clone(),
                                h.job_id.clone(),
                                h.owner_prefix.clone(),
                            ),
                        );
                        if h.worker_id.is_empty() {
                            continue;
                        }
                        let mut st = me.lock();
                        let Some(w) = st.workers.get_mut(&h.worker_id) else {
                            break;
                        };
                        let Some(tx) = tx.take() else { continue };
                        w.address = h.address;
                        match &w.state {
                            WState::Starting(Some(l)) => {
                                let l = l.clone();
                                let kind = match &w.actor {
                                    Some(a) => {
                                        pb::node_to_worker::Kind::StartActor(a.start.clone())
                                    }
                                    None => pb::node_to_worker::Kind::Leased(l.clone()),
                                };
                                let _ = tx.send(pb::NodeToWorker { kind: Some(kind) });
                                w.state = WState::Leased(l);
                            }
                            WState::Starting(None) => w.state = WState::Idle(Instant::now()),
                            _ => {}
                        }
                        w.tx = Some(tx);
                        if let Some(r) = w.ready.take() {
                            let _ = r.send(Ok(()));
                        }
                        worker = Some(h.worker_id);
                    }
                    Some(pb::worker_message::Kind::LeaseStarted(_)) => {}
                    Some(pb::worker_message::Kind::LeaseEnded(l)) => {
                        let Some(id) = &worker else { continue };
                        let mut st = me.lock();
                        if let Some(w) = st.workers.get_mut(id)
                            && w.state == WState::Leased(l.clone())
                        {
                            w.state = WState::Idle(Instant::now());
                            drop(st);
                            me.leases.give_back(&l);
                        }
                    }
                    Some(pb::worker_message::Kind::ActorStarted(a)) => {
                        let Some(id) = &worker else { continue };
                        if let Some(w) = me.lock().workers.get_mut(id)
                            && let Some(b) = w.actor.as_mut()
                            && b.actor_id == a.actor_id
                            && let Some(r) = b.ready.take()
                        {
                            let _ = r.send(match a.error {
                                Some(e) => Err(e),
                                None => Ok(()),
                            });
                        }
                    }
                    Some(pb::worker_message::Kind::TaskEvents(ev)) => me.task_table().record(ev),
                    Some(pb::worker_message::Kind::Blocked(l)) => me.leases.lend(&l),
                    Some(pb::worker_message::Kind::Unblocked(l)) => me.leases.reclaim(&l),
                    Some(pb::worker_message::Kind::Output(o)) => me.route_output(o),
                    Some(pb::worker_message::Kind::OwnerReply(r)) => me.relay.answered(conn, r),
                    Some(pb::worker_message::Kind::Stats(stats)) => {
                        let mut st = me.lock();
                        if let Some(w) = worker.as_ref().and_then(|id| st.workers.get_mut(id)) {
                            w.owns_objects = stats.objects_owned > 0;
                        }
                        st.stats.insert(conn, stats);
                    }
                    None => {}
                }
            }
            me.relay.channel_ended(conn);
            let mut st = me.lock();
            st.processes.remove(&conn);
            st.owners.remove(&conn);
            if let Some(last) = st.stats.remove(&conn) {
                add_totals(&mut st.departed, &last);
            }
            // Its objects are of no use to anyone now, here and on every other node.
            if let Some(p) = owner_prefix {
                st.dead_owners.push(p.clone());
                drop(st);
                me.free_owner(&p);
                st = me.lock();
            }
            // A worker whose channel ended is of no use: end it (its exit frees its lease).
            // Its channel ending is its failure (usually its death), not this node's choice:
            // not marked as killed.
            if let Some(w) = worker.and_then(|id| st.workers.get(&id)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(w.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        rx
    }

    /// Hands each move to the owner of its object if that owner is connected here; returns
    /// the objects whose owner got it.
    pub(crate) fn objects_moved(&self, req: &pb::ObjectsMovedRequest) -> Vec<protocol::ObjectId> {
        let owners: Vec<_> = self.lock().owners.values().cloned().collect();
        let mut delivered = Vec::new();
        for (prefix, tx) in owners {
            let moves: Vec<pb::ObjectMove> = req
                .moves
                .iter()
                .filter(|m| m.object_id.starts_with(&prefix))
                .cloned()
                .collect();
            if moves.is_empty() {
                continue;
            }
            let ids: Vec<protocol::ObjectId> = moves
                .iter()
                .filter_map(|m| protocol::ObjectId::from_slice(&m.object_id).ok())
                .collect();
            let msg = pb::NodeToWorker {
                kind: Some(pb::node_to_worker::Kind::ObjectsMoved(
                    pb::ObjectsMovedRequest { moves },
                )),
            };
            if tx.upgrade().is_some_and(|tx| tx.send(msg).is_ok()) {
                delivered.extend(ids);
            }
        }
        delivered
    }

    /// Worker output: to the caller's channel if it is here, else on to its node.
    pub(crate) fn route_output(&self, o: pb::WorkerOutput) {
        if o.owner_node == self.cfg.node_address {
            self.deliver_output(o);
        } else if !o.owner_node.is_empty() {
            self.output.send(o);
        }
    }

    /// Hands worker output to the process here whose owner prefix it names.
    pub(crate) fn deliver_output(&self, o: pb::WorkerOutput) -> bool {
        let tx = self
            .lock()
            .owners
            .values()
            .find(|(prefix, _)| *prefix == o.owner_prefix)
            .and_then(|(_, tx)| tx.upgrade());
        tx.is_some_and(|tx| {
            tx.send(pb::NodeToWorker {
                kind: Some(pb::node_to_worker::Kind::Output(o)),
            })
            .is_ok()
        })
    }

    /// The channel of the process here whose owner prefix is `prefix`, if it is connected.
    pub(crate) fn owner_channel(
        &self,
        prefix: &[u8],
    ) -> Option<(u64, mpsc::UnboundedSender<pb::NodeToWorker>)> {
        self.lock()
            .owners
            .iter()
            .find(|(_, (p, _))| p == prefix)
            .and_then(|(conn, (_, tx))| Some((*conn, tx.upgrade()?)))
    }

    /// Frees the objects of an owner that went away (once per owner).
    pub(crate) fn free_owner(&self, prefix: &[u8]) {
        let now = Instant::now();
        {
            let mut st = self.lock();
            st.freed_owners
                .retain(|_, at| now.duration_since(*at) < Duration::from_secs(300));
            if st.freed_owners.insert(prefix.to_vec(), now).is_some() {
                return;
            }
        }
        let n = self.cfg.store.delete_with_prefix(prefix);
        if n > 0 {
            tracing::info!(objects = n, "freed the objects of an owner that went away");
        }
    }

    /// The actors whose workers run here (or are starting), for the heartbeat.
    pub(crate) fn running_actors(&self) -> Vec<pb::ActorIncarnation> {
        let st = self.lock();
        st.workers
            .values()
            .filter_map(|w| w.actor.as_ref())
            .map(|a| pb::ActorIncarnation {
                actor_id: a.actor_id.clone(),
                num_restarts: a.restarts,
                reason: String::new(),
            })
            .collect()
    }

    /// Actor workers that exited, for the next heartbeat.
    pub(crate) fn take_dead_actors(&self) -> Vec<pb::ActorIncarnation> {
        std::mem::take(&mut self.lock().dead_actors)
    }

    /// Puts back what a failed heartbeat did not deliver.
    pub(crate) fn return_dead_actors(&self, mut v: Vec<pb::ActorIncarnation>) {
        self.lock().dead_actors.append(&mut v);
    }

    /// Lets the actor workers here serve for `left` more.
    pub(crate) fn renew_actors(&self, left: Duration) {
        let st = self.lock();
        for w in st.workers.values().filter(|w| w.actor.is_some()) {
            if let Some(tx) = &w.tx {
                let _ = tx.send(pb::NodeToWorker {
                    kind: Some(pb::node_to_worker::Kind::ServeMs(left.as_millis() as u64)),
                });
            }
        }
    }

    /// Kills the workers of actors that must not run here (the leader said so).
    pub(crate) fn kill_actors(&self, ids: &[String]) {
        let st = self.lock();
        for w in st.workers.values() {
            if let Some(a) = &w.actor
                && ids.contains(&a.actor_id)
            {
                tracing::warn!(
                    actor = a.actor_id,
                    restarts = a.restarts,
                    pid = w.pid,
                    "killing an actor worker the control plane says must not run here"
                );
                let _ = w.kill();
            }
        }
    }

    /// Kills the worker of this incarnation of the actor, if it runs here.
    pub(crate) fn kill_actor(&self, actor_id: &str, restarts: u64) -> bool {
        let st = self.lock();
        let w = st.workers.values().find(|w| {
            w.actor
                .as_ref()
                .is_some_and(|a| a.actor_id == actor_id && a.restarts == restarts)
        });
        match w {
            Some(w) => {
                tracing::info!(
                    actor = actor_id,
                    restarts,
                    pid = w.pid,
                    "killing the actor's worker"
                );
                w.kill().is_ok()
            }
            None => false,
        }
    }

    /// Whether a worker here runs (or starts) this incarnation of the actor: its id, address
    /// and pid once its constructor returned.
    pub(crate) fn actor_worker(
        &self,
        actor_id: &str,
        restarts: u64,
    ) -> Option<Option<(String, String, u32)>> {
        let st = self.lock();
        st.workers.iter().find_map(|(id, w)| {
            let a = w.actor.as_ref()?;
            (a.actor_id == actor_id && a.restarts == restarts).then(|| {
                a.ready
                    .is_none()
                    .then(|| (id.clone(), w.address.clone(), w.pid))
            })
        })
    }

    /// The tasks the owners here reported (latest state each), and how many were dropped.
    /// Tasks of the task table by (state, function, whether a retry): Ray's `ray_tasks`.
    pub(crate) fn task_counts(&self) -> HashMap<(String, String, bool), u64> {
        let tasks = self.task_table();
        let mut out = tasks.ended.clone();
        for t in tasks.by_id.values() {
            if !matches!(t.state(), pb::TaskState::Finished | pb::TaskState::Failed) {
                let state = protocol::task_state_name(t.state()).to_owned();
                *out.entry((state, t.function.clone(), t.attempt > 0))
                    .or_default() += 1;
            }
        }
        out
    }

    /// Actors hosted by this node's workers by (state, class): ALIVE once the constructor
    /// returned, PENDING_CREATION before.
    pub(crate) fn actor_counts(&self) -> HashMap<(&'static str, String), u64> {
        let st = self.lock();
        let mut out: HashMap<(&'static str, String), u64> = HashMap::new();
        for w in st.workers.values() {
            if let Some(a) = &w.actor {
                let state = if a.ready.is_none() {
                    "ALIVE"
                } else {
                    "PENDING_CREATION"
                };
                *out.entry((state, a.start.class_name.clone())).or_default() += 1;
            }
        }
        out
    }

    pub(crate) fn list_tasks(&self) -> pb::ListTasksReply {
        let tasks = self.task_table();
        pb::ListTasksReply {
            tasks: tasks.by_id.values().cloned().collect(),
            dropped: tasks.dropped,
        }
    }

    /// The drivers and workers connected here and what they own.
    pub(crate) fn processes(&self) -> Vec<pb::ProcessRefs> {
        let st = self.lock();
        st.processes
            .iter()
            .map(|(conn, (pid, worker, job, prefix))| {
                let stats = st.stats.get(conn);
                pb::ProcessRefs {
                    pid: *pid,
                    worker_id: worker.clone(),
                    job_id: job.clone(),
                    owner_prefix: protocol::hex::encode(prefix),
                    objects_owned: stats.map_or(0, |s| s.objects_owned),
                    tasks_running: stats.map_or(0, |s| s.tasks_running),
                }
            })
            .collect()
    }

    /// Dead owners to report with the next heartbeat.
    pub(crate) fn take_dead_owners(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.lock().dead_owners)
    }

    /// Puts back what a failed heartbeat did not deliver.
    pub(crate) fn return_dead_owners(&self, mut v: Vec<Vec<u8>>) {
        self.lock().dead_owners.append(&mut v);
    }

    /// The owner returned the lease by RPC instead of closing its stream: its worker is idle.
    pub(crate) fn lease_returned(&self, lease_id: &str) {
        for w in self.lock().workers.values_mut() {
            if w.state == WState::Leased(lease_id.to_owned()) {
                w.state = WState::Idle(Instant::now());
            }
        }
    }

    /// Tells idle workers past the idle timeout to exit, but not those that own objects;
    /// returns how many.
    pub(crate) fn reap_idle(&self) -> usize {
        let now = Instant::now();
        let st = self.lock();
        let mut n = 0;
        for w in st.workers.values() {
            if let WState::Idle(since) = w.state
                && now.duration_since(since) >= self.cfg.opts.idle_timeout
                && !w.owns_objects
            {
                n += 1;
                let sent = w.tx.as_ref().is_some_and(|tx| {
                    tx.send(pb::NodeToWorker {
                        kind: Some(pb::node_to_worker::Kind::Exit(true)),
                    })
                    .is_ok()
                });
                if !sent
                    || now.duration_since(since)
                        >= self.cfg.opts.idle_timeout + Duration::from_secs(5)
                {
                    let _ = w.kill();
                }
            }
        }
        n
    }

    /// Workers by state, and the task counters of every process that reported (live + gone).
    pub(crate) fn snapshot(&self) -> (HashMap<&'static str, u64>, pb::WorkerStats) {
        let st = self.lock();
        let mut by_state: HashMap<&'static str, u64> =
            [("starting", 0), ("idle", 0), ("leased", 0)]
                .into_iter()
                .collect();
        for w in st.workers.values() {
            let k = match w.state {
                WState::Starting(_) => "starting",
                WState::Idle(_) => "idle",
                WState::Leased(_) => "leased",
            };
            *by_state.entry(k).or_default() += 1;
        }
        let mut sum = st.departed.clone();
        sum.owned_by_state.clear();
        sum.tasks_running = 0;
        for s in st.stats.values() {
            add_totals(&mut sum, s);
            sum.tasks_running += s.tasks_running;
            for (k, v) in &s.owned_by_state {
                *sum.owned_by_state.entry(k.clone()).or_default() += v;
            }
        }
        (by_state, sum)
    }

    /// Kills every worker (the node is shutting down).
    pub(crate) fn kill_all(&self) {
        for w in self.lock().workers.values() {
            let _ = w.kill();
        }
    }
}

fn add_totals(into: &mut pb::WorkerStats, s: &pb::WorkerStats) {
    into.tasks_finished_total += s.tasks_finished_total;
    into.tasks_failed_total += s.tasks_failed_total;
    into.task_retries_total += s.task_retries_total;
    into.tasks_executed_total += s.tasks_executed_total;
    into.reconstructions_total += s.reconstructions_total;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_table_keeps_when_each_task_started_and_ended() {
        let id = |c: u8| protocol::ObjectId::from_bytes([c; 20]);
        let ev = |c: u8, state: &str, t: u64| pb::TaskEvent {
            task_id: id(c).to_string(),
            state: protocol::task_state_from_name(state) as i32,
            time_ms: t,
            ..Default::default()
        };
        let mut table = TaskTable::default();
        table.record(pb::TaskEvents {
            events: vec![
                ev(1, "PENDING_NODE_ASSIGNMENT", 100),
                ev(1, "SUBMITTED_TO_WORKER", 120),
                ev(2, "SUBMITTED_TO_WORKER", 130),
            ],
            dropped: 0,
        });
        table.record(pb::TaskEvents {
            events: vec![ev(1, "FINISHED", 170), ev(2, "FAILED", 150)],
            dropped: 0,
        });
        let a = &table.by_id[&id(1)];
        assert_eq!((a.created_ms, a.start_ms, a.end_ms), (100, 120, 170));
        let b = &table.by_id[&id(2)];
        assert_eq!((b.created_ms, b.start_ms, b.end_ms), (130, 130, 150));
        // A retry starts the clock again.
        table.record(pb::TaskEvents {
            events: vec![ev(2, "SUBMITTED_TO_WORKER", 200)],
            dropped: 0,
        });
        let b = &table.by_id[&id(2)];
        assert_eq!((b.start_ms, b.end_ms), (200, 0));
        // An owner's merged event (a whole life in one report) carries its times; a task
        // id that is not one is dropped, not kept.
        table.record(pb::TaskEvents {
            events: vec![
                pb::TaskEvent {
                    created_ms: 300,
                    start_ms: 310,
                    end_ms: 320,
                    ..ev(3, "FINISHED", 320)
                },
                pb::TaskEvent {
                    task_id: "not-an-id".into(),
                    ..ev(4, "FINISHED", 1)
                },
            ],
            dropped: 0,
        });
        let c = &table.by_id[&id(3)];
        assert_eq!((c.created_ms, c.start_ms, c.end_ms), (300, 310, 320));
        assert_eq!((table.by_id.len(), table.dropped), (3, 1));
        let ended = table
            .ended
            .get(&("FINISHED".to_owned(), String::new(), false));
        assert_eq!(ended, Some(&2), "tasks 1 and 3 finished");
    }

    fn pool(dir: &Path) -> Arc<WorkerPool> {
        let node = protocol::NodeId::from_bytes([7; 16]);
        let leases = Arc::new(Leases::new(
            node,
            scheduler::ResourceSet::from_map([("CPU", 1.0)]).unwrap(),
        ));
        let cfg = PoolConfig {
            opts: WorkerOptions {
                idle_timeout: Duration::from_secs(60),
                start_timeout: Duration::from_secs(5),
                binary_dir: dir.join("binaries"),
                prestart: 0,
            },
            node_id: node.to_string(),
            node_address: "127.0.0.1:1".into(),
            object_manager_address: "127.0.0.1:2".into(),
            store_socket: dir.join("sock"),
            heads: vec![],
            token: None,
            log_dir: dir.join("logs"),
            job_dir: dir.join("jobs"),
            advertise_host: "127.0.0.1".into(),
            store: Arc::new(
                object_store::Store::open(&object_store::StoreConfig {
                    capacity: 4 << 20,
                    plasma_dir: "/dev/shm".into(),
                    spill_dir: dir.join("spill"),
                    chunk: object_store::arena::DEFAULT_CHUNK,
                })
                .unwrap(),
            ),
        };
        Arc::new(WorkerPool::new(cfg, leases))
    }

    #[tokio::test]
    async fn binaries_are_installed_only_with_the_right_hash_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let file = dir.path().join("prog");
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&file, &content).unwrap();
        let sha = sha256_file(&file).unwrap();

        let e = p
            .register_local("ab".repeat(32), file.display().to_string())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::DataLoss, "{e}");
        assert!(!p.binary_path(&"ab".repeat(32)).exists());
        let e = p
            .register_local("not-a-hash".into(), file.display().to_string())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let e = p
            .register_local(sha.clone(), "/no/such/file".into())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

        let r = p
            .register_local(sha.clone(), file.display().to_string())
            .await
            .unwrap();
        assert_eq!(r.size, content.len() as u64);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(p.binary_path(&sha))
                .unwrap()
                .permissions()
                .mode()
                & 0o111,
            0o111
        );
        // No temporary files are left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("binaries"))
                .unwrap()
                .count(),
            1
        );

        let mut rx = p.read(&sha).unwrap();
        let mut back = Vec::new();
        while let Some(c) = rx.recv().await {
            back.extend_from_slice(&c.unwrap().data);
        }
        assert_eq!(back, content);
        assert_eq!(
            p.read(&"cd".repeat(32)).unwrap_err().code(),
            tonic::Code::NotFound
        );
    }

    #[tokio::test]
    async fn a_gone_owner_s_objects_are_freed_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let id = |first: u8, n: u8| {
            protocol::ObjectId::from_bytes(
                [[first; 11].as_slice(), &[n; 9]]
                    .concat()
                    .try_into()
                    .unwrap(),
            )
        };
        for n in 0..3 {
            p.cfg.store.put(id(1, n), b"data", b"", true).unwrap();
            p.cfg.store.put(id(2, n), b"data", b"", true).unwrap();
        }
        p.free_owner(&[1; 11]);
        assert!(
            (0..3).all(|n| !p.cfg.store.contains(&id(1, n)) && p.cfg.store.contains(&id(2, n)))
        );
        // A second report of the same owner does not scan again; a new object survives it.
        p.cfg.store.put(id(1, 9), b"data", b"", true).unwrap();
        p.free_owner(&[1; 11]);
        assert!(p.cfg.store.contains(&id(1, 9)));
    }

    #[tokio::test]
    async fn a_lease_for_a_missing_binary_without_a_source_is_refused_and_frees_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let e = p
            .attach("lease-1", &"ef".repeat(32), "", "job")
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("not on this node"), "{e}");
        let (by_state, _) = p.snapshot();
        assert_eq!(by_state.values().sum::<u64>(), 0);
    }
}
