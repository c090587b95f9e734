//! Where a log is, from what a user names: a node and a file glob, an actor, a task, a worker
//! or a job. `rayctl logs` and the heads' `/api/v0/logs…` both find logs here, through any
//! head (the cluster API) and then the node that has the file (`ListLogs`, `ReadLog`).
//!
//! A worker's log is `worker-<id>.log` on its node (worker ids start with their node's id),
//! a job driver's `job-driver-<id>.log` on the job's driver node; an actor's and a task's log
//! is their worker's.

use std::time::Duration;

use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient, NmClient};
use protocol::pb;

/// What a user asks the log of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A file on a node (by node id, or its IP when unique).
    File {
        node: String,
        filename: String,
    },
    Actor(String),
    Task(String),
    Worker(String),
    Job(String),
}

/// A log file on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub node_id: String,
    /// The node manager (`ReadLog` goes there).
    pub node_address: String,
    pub filename: String,
}

/// A node's log files.
#[derive(Debug, Clone)]
pub struct NodeLogs {
    pub node_id: String,
    pub node_address: String,
    pub files: Vec<pb::LogFile>,
}

/// Why a log could not be found or read; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
}

pub struct Logs {
    client: HeadClient,
    token: Option<AuthToken>,
    timeout: Duration,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {e}"))
}

impl Logs {
    pub fn new(client: HeadClient, token: Option<AuthToken>, timeout: Duration) -> Self {
        Self {
            client,
            token,
            timeout,
        }
    }

    fn node(&self, addr: &str) -> Result<NmClient, LogError> {
        let opts = ClientOptions {
            rpc_timeout: self.timeout,
            ..Default::default()
        };
        protocol::client::node_manager(addr, self.token.clone(), &opts)
            .map_err(|e| unavailable(&format!("node {addr}"), e))
    }

    async fn live_nodes(&self) -> Result<Vec<pb::NodeInfo>, LogError> {
        let s = crate::cluster_view::status(&self.client)
            .await
            .map_err(LogError::Unavailable)?;
        Ok(s.nodes
            .into_iter()
            .filter(|n| n.state == pb::NodeState::Alive as i32)
            .collect())
    }

    /// The live nodes `node` names (an id, an id prefix, or an IP), or every live node.
    async fn nodes(&self, node: Option<&str>) -> Result<Vec<pb::NodeInfo>, LogError> {
        let all = self.live_nodes().await?;
        let Some(want) = node.filter(|n| !n.is_empty()) else {
            return Ok(all);
        };
        let hit: Vec<pb::NodeInfo> = all
            .iter()
            .filter(|n| {
                n.node_id.starts_with(want) || crate::cluster_view::host(&n.address) == want
            })
            .cloned()
            .collect();
        if hit.is_empty() {
            return Err(LogError::NotFound(format!(
                "no live node is {want:?} (live: {})",
                all.iter()
                    .map(|n| n.node_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(hit)
    }

    /// The log files of `node` (or of every live node) matching `glob`.
    pub async fn list(&self, node: Option<&str>, glob: &str) -> Result<Vec<NodeLogs>, LogError> {
        let mut out = Vec::new();
        for n in self.nodes(node).await? {
            let mut c = self.node(&n.address)?;
            let r = c
                .list_logs(pb::ListLogsRequest { glob: glob.into() })
                .await
                .map_err(|e| match e.code() {
                    tonic::Code::InvalidArgument => LogError::BadRequest(e.message().into()),
                    _ => unavailable(&format!("node {}", n.node_id), e.message()),
                })?
                .into_inner();
            out.push(NodeLogs {
                node_id: n.node_id,
                node_address: n.address,
                files: r.files,
            });
        }
        Ok(out)
    }

    /// Finds the one file a target names.
    pub async fn locate(&self, t: &Target) -> Result<Located, LogError> {
        match t {
            Target::File { node, filename } => {
                let nodes = self.nodes(Some(node)).await?;
                let [n] = nodes.as_slice() else {
                    return Err(LogError::BadRequest(format!(
                        "{node:?} names {} nodes: give a node id",
                        nodes.len()
                    )));
                };
                Ok(Located {
                    node_id: n.node_id.clone(),
                    node_address: n.address.clone(),
                    filename: filename.clone(),
                })
            }
            Target::Worker(id) => self.worker_log(id, None).await,
            Target::Actor(id) => {
                let req = pb::GetActorRequest {
                    actor_id: id.clone(),
                    ..Default::default()
                };
                let a = self
                    .client
                    .call(|mut c| {
                        let r = req.clone();
                        async move { c.get_actor(r).await }
                    })
                    .await
                    .map_err(|e| LogError::NotFound(format!("actor {id}: {e}")))?;
                if a.worker_id.is_empty() || a.node_id.is_empty() {
                    return Err(LogError::NotFound(format!(
                        "actor {id} has no worker now ({}); `rayctl logs cluster 'worker-*' --node-id NODE` lists the logs of past workers",
                        if a.message.is_empty() {
                            "not running"
                        } else {
                            &a.message
                        }
                    )));
                }
                self.worker_log(&a.worker_id, Some(&a.node_id)).await
            }
            Target::Task(id) => {
                for n in self.live_nodes().await? {
                    let Ok(mut c) = self.node(&n.address) else {
                        continue;
                    };
                    let Ok(r) = c.list_tasks(pb::ListTasksRequest {}).await else {
                        continue;
                    };
                    if let Some(t) = r
                        .into_inner()
                        .tasks
                        .into_iter()
                        .filter(|t| t.task_id.starts_with(id.as_str()))
                        .max_by_key(|t| t.attempt)
                    {
                        if t.worker_id.is_empty() {
                            return Err(LogError::NotFound(format!(
                                "task {id} has not run on a worker yet ({})",
                                t.state
                            )));
                        }
                        return self.worker_log(&t.worker_id, Some(&t.node_id)).await;
                    }
                }
                Err(LogError::NotFound(format!(
                    "no live node knows task {id} (`rayctl list tasks` shows the tasks)"
                )))
            }
            Target::Job(id) => {
                let req = pb::GetJobRequest { job_id: id.clone() };
                let j = self
                    .client
                    .call(|mut c| {
                        let r = req.clone();
                        async move { c.get_job(r).await }
                    })
                    .await
                    .map_err(|e| LogError::NotFound(format!("job {id}: {e}")))?;
                if j.driver_node_address.is_empty() {
                    return Err(LogError::NotFound(format!(
                        "job {id} has not started on a node yet"
                    )));
                }
                Ok(Located {
                    node_id: j.driver_node_id,
                    node_address: j.driver_node_address,
                    filename: format!("job-driver-{}.log", j.job_id),
                })
            }
        }
    }

    /// A worker's log: on `node` when known, else on the live node its id starts with.
    async fn worker_log(&self, worker: &str, node: Option<&str>) -> Result<Located, LogError> {
        let prefix = node.unwrap_or_else(|| worker.split('-').next().unwrap_or(worker));
        let nodes = self.nodes(Some(prefix)).await.map_err(|_| {
            LogError::NotFound(format!(
                "worker {worker}'s node is not alive (worker ids start with their node's id)"
            ))
        })?;
        let n = nodes
            .first()
            .ok_or_else(|| LogError::NotFound(format!("worker {worker}'s node is not alive")))?;
        Ok(Located {
            node_id: n.node_id.clone(),
            node_address: n.address.clone(),
            filename: format!("worker-{worker}.log"),
        })
    }

    /// A job's status now (`None` if it cannot be had).
    pub async fn job_status(&self, id: &str) -> Option<i32> {
        let req = pb::GetJobRequest { job_id: id.into() };
        self.client
            .call(|mut c| {
                let r = req.clone();
                async move { c.get_job(r).await }
            })
            .await
            .ok()
            .map(|j| j.status)
    }

    /// A piece of a located file (see `ReadLogRequest`).
    pub async fn read(
        &self,
        at: &Located,
        offset: u64,
        tail_lines: u32,
    ) -> Result<pb::ReadLogReply, LogError> {
        let mut c = self.node(&at.node_address)?;
        Ok(c.read_log(pb::ReadLogRequest {
            filename: at.filename.clone(),
            offset,
            max_bytes: 0,
            tail_lines,
        })
        .await
        .map_err(|e| match e.code() {
            tonic::Code::NotFound => {
                LogError::NotFound(format!("node {}: {}", at.node_id, e.message()))
            }
            tonic::Code::InvalidArgument => LogError::BadRequest(e.message().into()),
            _ => unavailable(&format!("node {}", at.node_id), e.message()),
        })?
        .into_inner())
    }
}
