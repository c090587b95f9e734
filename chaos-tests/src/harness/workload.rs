//! The traffic of a run, recorded op by op: KV clients (overwrites of unique values and
//! linearizable reads over a few keys) and a job submitter, all in the clients' network
//! namespace; and a sampler in the observer's (root) namespace that asks every head who it
//! is and the leader for jobs and nodes.
//!
//! Each op is one attempt against one head, never retried inside: a retry of a write whose
//! reply was lost could apply it twice, which would blur the history the checkers read. The
//! clients follow NOT_LEADER hints between ops.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use protocol::RpcError;
use protocol::auth::{AuthToken, ClientAuth};
use protocol::client::{ClientOptions, CpClient, HeadClient};
use protocol::pb;
use protocol::pb::control_plane_client::ControlPlaneClient;

use super::history::{HeadSample, History, JobSample, Kind, NodeSample, Op, Outcome};
use super::rng::Rng;

/// The KV namespace every run writes in (keys carry the run's tag).
pub const KV_NAMESPACE: &str = "chaos";

/// Where and how to send traffic.
#[derive(Clone)]
pub struct Target {
    pub heads: Vec<String>,
    pub token: String,
    /// The network namespace the clients run in (None: the caller's).
    pub client_ns: Option<String>,
    /// Unique to the run: prefixes keys and submission ids.
    pub tag: String,
    /// Jobs append a line to `<jobs_dir>/<submission id>` each time they run.
    pub jobs_dir: std::path::PathBuf,
}

#[derive(Clone, Debug)]
pub struct Load {
    pub kv_clients: u32,
    pub keys: u32,
    /// Pause between one client's ops.
    pub think: Duration,
    /// One job submitted this often (None: no jobs).
    pub job_every: Option<Duration>,
    /// How long each job's entrypoint sleeps after it has left its mark.
    pub job_seconds: f64,
    /// What each job's entrypoint needs on its node (a scarce one makes jobs queue).
    pub job_resources: Vec<(String, f64)>,
    pub op_timeout: Duration,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            kv_clients: 4,
            keys: 5,
            think: Duration::from_millis(25),
            job_every: Some(Duration::from_millis(1500)),
            job_seconds: 0.0,
            job_resources: Vec::new(),
            op_timeout: Duration::from_secs(2),
        }
    }
}

/// Running traffic; `stop` ends it and waits.
pub struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn key(tag: &str, k: u32) -> String {
    format!("{tag}-k{k}")
}

pub fn submission_id(tag: &str, n: u32) -> String {
    format!("{tag}-job{n}")
}

/// A tokio runtime on this thread, after moving the thread into network namespace `ns`
/// (sockets it opens then live there).
fn runtime_in(ns: Option<&str>) -> Result<tokio::runtime::Runtime> {
    if let Some(ns) = ns {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))
            .with_context(|| format!("open namespace {ns}"))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {ns}"))?;
    }
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn token(t: &Target) -> Option<AuthToken> {
    AuthToken::new(&t.token, "chaos").ok()
}

/// One-attempt clients, one per head address, made on first use.
struct Clients {
    target: Target,
    opts: ClientOptions,
    by_addr: HashMap<String, CpClient>,
}

impl Clients {
    fn new(target: Target, timeout: Duration) -> Self {
        Self {
            target,
            opts: ClientOptions {
                deadline: timeout,
                rpc_timeout: timeout,
                connect_timeout: timeout.min(Duration::from_secs(1)),
                ..Default::default()
            },
            by_addr: HashMap::new(),
        }
    }

    fn get(&mut self, addr: &str) -> Result<CpClient, RpcError> {
        if let Some(c) = self.by_addr.get(addr) {
            return Ok(c.clone());
        }
        let ch = protocol::client::channel(addr, &self.opts)?;
        let c = ControlPlaneClient::with_interceptor(ch, ClientAuth(token(&self.target)));
        self.by_addr.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Forgets `addr`'s connection (after an error, so a restarted head is dialled afresh).
    fn reset(&mut self, addr: &str) {
        self.by_addr.remove(addr);
    }
}

/// What an error says about whether the op took effect.
fn outcome_of(e: &RpcError) -> Outcome {
    let definite = matches!(
        e,
        RpcError::InvalidArgument(_) | RpcError::Unauthenticated(_) | RpcError::NotFound(_)
    );
    Outcome::Error {
        message: e.to_string(),
        definite,
    }
}

/// Starts the clients and the sampler.
pub fn start(target: Target, load: Load, hist: History, seed: u64) -> Result<Running> {
    std::fs::create_dir_all(&target.jobs_dir)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    {
        let (target, load, hist, stop) = (target.clone(), load.clone(), hist.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("chaos-clients".into())
                .spawn(move || {
                    let rt = match runtime_in(target.client_ns.as_deref()) {
                        Ok(rt) => rt,
                        Err(e) => {
                            hist.event(format!("clients could not start: {e:#}"));
                            return;
                        }
                    };
                    rt.block_on(clients(target, load, hist, stop, seed));
                })?,
        );
    }
    {
        let (target, hist, stop) = (target.clone(), hist.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("chaos-sampler".into())
                .spawn(move || {
                    if let Ok(rt) = runtime_in(None) {
                        rt.block_on(sampler(target, hist, stop));
                    }
                })?,
        );
    }
    Ok(Running { stop, threads })
}

async fn clients(target: Target, load: Load, hist: History, stop: Arc<AtomicBool>, seed: u64) {
    let mut tasks = Vec::new();
    for c in 0..load.kv_clients {
        tasks.push(tokio::spawn(kv_client(
            c,
            target.clone(),
            load.clone(),
            hist.clone(),
            stop.clone(),
            seed.wrapping_add(u64::from(c) * 7919),
        )));
    }
    if let Some(every) = load.job_every {
        tasks.push(tokio::spawn(job_client(
            load.kv_clients,
            target.clone(),
            load.clone(),
            every,
            hist.clone(),
            stop.clone(),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn kv_client(
    id: u32,
    target: Target,
    load: Load,
    hist: History,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let mut clients = Clients::new(target.clone(), load.op_timeout);
    let heads = target.heads.clone();
    let mut guess = heads[rng.below(heads.len() as u64) as usize].clone();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let k = key(&target.tag, rng.below(u64::from(load.keys)) as u32);
        let put = rng.below(100) < 55;
        // Reads go to a random head a third of the time: a head that thinks it leads but was
        // deposed must refuse them, not answer from its stale state.
        let head = if !put && rng.below(3) == 0 {
            heads[rng.below(heads.len() as u64) as usize].clone()
        } else {
            guess.clone()
        };
        let value = put.then(|| {
            seq += 1;
            format!("c{id}-{seq}")
        });
        let invoke = hist.now();
        let result: Result<Option<String>, RpcError> = match clients.get(&head) {
            Err(e) => Err(e),
            Ok(mut c) => {
                let call = async {
                    if let Some(v) = &value {
                        c.kv_put(pb::KvPutRequest {
                            namespace: KV_NAMESPACE.into(),
                            key: k.clone().into_bytes(),
                            value: v.clone().into_bytes(),
                            overwrite: true,
                        })
                        .await
                        .map(|_| None)
                    } else {
                        c.kv_get(pb::KvGetRequest {
                            namespace: KV_NAMESPACE.into(),
                            key: k.clone().into_bytes(),
                        })
                        .await
                        .map(|r| Some(String::from_utf8_lossy(&r.into_inner().value).into()))
                    }
                };
                match tokio::time::timeout(load.op_timeout, call).await {
                    Err(_) => Err(RpcError::DeadlineExceeded("client timeout".into())),
                    Ok(r) => r.map_err(RpcError::from),
                }
            }
        };
        let complete = hist.now();
        let outcome = match &result {
            Ok(v) => Outcome::Ok(v.clone()),
            // A read of a missing key answered: it reads "absent".
            Err(RpcError::NotFound(_)) if !put => Outcome::Ok(None),
            Err(RpcError::DeadlineExceeded(_)) => Outcome::Timeout,
            Err(e) => outcome_of(e),
        };
        match &result {
            Err(RpcError::NotLeader { leader: Some(l) }) if heads.contains(l) => {
                guess = l.clone();
            }
            Err(RpcError::NotFound(_)) | Ok(_) => {}
            Err(_) => {
                clients.reset(&head);
                guess = heads[rng.below(heads.len() as u64) as usize].clone();
            }
        }
        hist.op(Op {
            client: id,
            op: if put { Kind::Put } else { Kind::Get },
            key: k,
            value,
            head,
            invoke,
            complete,
            outcome,
        });
        tokio::time::sleep(load.think).await;
    }
}

/// Submits a job every `every`; a submission whose answer was lost is retried with the same
/// submission id and client token until it is answered (the API makes that idempotent).
async fn job_client(
    id: u32,
    target: Target,
    load: Load,
    every: Duration,
    hist: History,
    stop: Arc<AtomicBool>,
) {
    let mut clients = Clients::new(target.clone(), load.op_timeout);
    let heads = target.heads.clone();
    let mut guess = heads[0].clone();
    let mut n = 0u32;
    let mut next = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let sid = submission_id(&target.tag, n);
        n += 1;
        let marker = target.jobs_dir.join(&sid);
        let req = pb::SubmitJobRequest {
            submission_id: sid.clone(),
            entrypoint: format!(
                "echo ran >> {} && sleep {}",
                marker.display(),
                load.job_seconds
            ),
            entrypoint_resources: load.job_resources.iter().cloned().collect(),
            client_token: format!("{sid}-token"),
            max_retries: 0,
            ..Default::default()
        };
        loop {
            let invoke = hist.now();
            let head = guess.clone();
            let result = match clients.get(&head) {
                Err(e) => Err(e),
                Ok(mut c) => {
                    match tokio::time::timeout(load.op_timeout, c.submit_job(req.clone())).await {
                        Err(_) => Err(RpcError::DeadlineExceeded("client timeout".into())),
                        Ok(r) => r.map(|_| ()).map_err(RpcError::from),
                    }
                }
            };
            let outcome = match &result {
                Ok(()) => Outcome::Ok(None),
                Err(RpcError::DeadlineExceeded(_)) => Outcome::Timeout,
                Err(e) => outcome_of(e),
            };
            let done = matches!(
                outcome,
                Outcome::Ok(_) | Outcome::Error { definite: true, .. }
            );
            match &result {
                Err(RpcError::NotLeader { leader: Some(l) }) if heads.contains(l) => {
                    guess = l.clone();
                }
                Ok(()) => {}
                Err(_) => {
                    clients.reset(&head);
                    next += 1;
                    guess = heads[next % heads.len()].clone();
                }
            }
            hist.op(Op {
                client: id,
                op: Kind::Submit,
                key: sid.clone(),
                value: None,
                head,
                invoke,
                complete: hist.now(),
                outcome,
            });
            if done || stop.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(every).await;
    }
}

pub fn job_status_name(s: i32) -> String {
    pb::JobStatus::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATUS_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("?{s}"))
}

fn node_state_name(s: i32) -> String {
    pb::NodeState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("NODE_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("?{s}"))
}

/// Asks every head about itself every 200 ms, and the leader for the run's jobs and the
/// nodes every second.
async fn sampler(target: Target, hist: History, stop: Arc<AtomicBool>) {
    let timeout = Duration::from_millis(400);
    let mut clients = Clients::new(target.clone(), timeout);
    let leader_client = HeadClient::new(
        &target.heads,
        token(&target),
        ClientOptions {
            deadline: Duration::from_secs(1),
            rpc_timeout: Duration::from_millis(500),
            ..Default::default()
        },
    );
    let mut tick = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let asks = target.heads.iter().enumerate().map(|(i, addr)| {
            let c = clients.get(addr);
            async move {
                let mut c = c.ok()?;
                let r = tokio::time::timeout(timeout, c.head_info(pb::HeadInfoRequest {}))
                    .await
                    .ok()?
                    .ok()?
                    .into_inner();
                Some((i, r))
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        for (i, a) in answers.iter().enumerate() {
            if a.is_none() {
                // Dial afresh next time: the head may have been restarted.
                clients.reset(&target.heads[i]);
            }
        }
        for (i, r) in answers.into_iter().flatten() {
            hist.head(HeadSample {
                at: hist.now(),
                head: i,
                role: r.role,
                term: r.term,
                last_log_index: r.last_log_index,
                last_applied: r.last_applied,
            });
        }
        if tick.is_multiple_of(5)
            && let Ok(lc) = &leader_client
        {
            if let Ok(jobs) = lc
                .call(|mut h| async move { h.list_jobs(pb::ListJobsRequest {}).await })
                .await
            {
                let at = hist.now();
                for j in jobs
                    .jobs
                    .iter()
                    .filter(|j| j.submission_id.starts_with(&target.tag))
                {
                    hist.job(JobSample {
                        at,
                        submission_id: j.submission_id.clone(),
                        status: job_status_name(j.status),
                    });
                }
            }
            if let Ok(st) =
                lc.call(|mut h| async move {
                    h.get_cluster_status(pb::GetClusterStatusRequest {}).await
                })
                .await
            {
                let at = hist.now();
                for n in &st.nodes {
                    hist.node(NodeSample {
                        at,
                        node_id: n.node_id.clone(),
                        state: node_state_name(n.state),
                    });
                }
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn leader_client(target: &Target, timeout: Duration) -> Result<HeadClient> {
    Ok(HeadClient::new(
        &target.heads,
        token(target),
        ClientOptions {
            deadline: timeout,
            rpc_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )?)
}

/// Every job of the run, through the leader (retrying until `timeout`).
pub fn final_reads_jobs(target: &Target, timeout: Duration) -> Result<Vec<pb::JobInfo>> {
    let rt = runtime_in(None)?;
    rt.block_on(async {
        let lc = leader_client(target, timeout)?;
        let jobs = lc
            .call(|mut h| async move { h.list_jobs(pb::ListJobsRequest {}).await })
            .await
            .context("final job list")?;
        Ok(jobs
            .jobs
            .into_iter()
            .filter(|j| j.submission_id.starts_with(&target.tag))
            .collect())
    })
}

/// Reads every key through the leader after the heal and records the reads in the history
/// (so an acknowledged write missing at the end fails the linearizability check).
pub fn final_kv_reads(target: &Target, keys: u32, hist: &History, timeout: Duration) -> Result<()> {
    let rt = runtime_in(None)?;
    rt.block_on(async {
        let lc = leader_client(target, timeout)?;
        for k in 0..keys {
            let key = key(&target.tag, k);
            let invoke = hist.now();
            let r = lc
                .call(|mut h| {
                    let key = key.clone();
                    async move {
                        h.kv_get(pb::KvGetRequest {
                            namespace: KV_NAMESPACE.into(),
                            key: key.into_bytes(),
                        })
                        .await
                    }
                })
                .await;
            let value = match r {
                Ok(v) => Some(String::from_utf8_lossy(&v.value).into_owned()),
                Err(e) if matches!(e.rpc(), Some(RpcError::NotFound(_))) => None,
                Err(e) => anyhow::bail!("final read of {key}: {e}"),
            };
            hist.op(Op {
                client: u32::MAX,
                op: Kind::Get,
                key,
                value: None,
                head: lc.leader_hint().unwrap_or_default(),
                invoke,
                complete: hist.now(),
                outcome: Outcome::Ok(value),
            });
        }
        Ok(())
    })
}

/// What every head says of itself (None: no answer within 1 s).
pub fn head_infos(target: &Target) -> Vec<Option<pb::HeadInfoReply>> {
    let Ok(rt) = runtime_in(None) else {
        return vec![None; target.heads.len()];
    };
    rt.block_on(async {
        let mut clients = Clients::new(target.clone(), Duration::from_secs(1));
        let mut out = Vec::new();
        for addr in &target.heads {
            let r = match clients.get(addr) {
                Ok(mut c) => tokio::time::timeout(
                    Duration::from_secs(1),
                    c.head_info(pb::HeadInfoRequest {}),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .map(tonic::Response::into_inner),
                Err(_) => None,
            };
            out.push(r);
        }
        out
    })
}

/// The actor named `name`, asked of heads `heads` only (e.g. the majority side of a cut).
pub fn actor_named(target: &Target, heads: &[String], name: &str) -> Option<pb::ActorInfo> {
    let rt = runtime_in(None).ok()?;
    rt.block_on(async {
        let c = HeadClient::new(
            heads,
            token(target),
            ClientOptions {
                deadline: Duration::from_secs(3),
                rpc_timeout: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .ok()?;
        let all = c
            .call(|mut h| async move { h.list_actors(pb::ListActorsRequest {}).await })
            .await
            .ok()?;
        all.actors.into_iter().find(|a| a.name == name)
    })
}

/// What the leader says of node `node_id` now (ALIVE, DEAD), None if it cannot be asked.
pub fn node_state(target: &Target, node_id: &str) -> Option<String> {
    let rt = runtime_in(None).ok()?;
    rt.block_on(async {
        let c = leader_client(target, Duration::from_secs(2)).ok()?;
        let st = c
            .call(|mut h| async move { h.get_cluster_status(pb::GetClusterStatusRequest {}).await })
            .await
            .ok()?;
        st.nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .map(|n| node_state_name(n.state))
    })
}
