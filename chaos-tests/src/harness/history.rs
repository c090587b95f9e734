//! The recorded history of one run: every client operation with when it was invoked and
//! when it completed (seconds since the run began, one clock for every client), what it
//! answered, and the faults the scenario injected. Written as JSONL (`{op, args, invoke,
//! complete, result | error | timeout}`) for a failing run.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The server answered OK; the value read, if the op reads one (None: not found).
    Ok(Option<String>),
    /// The server answered an error (the write may still have been applied, unless the
    /// error says it was refused before that, which `definite` records).
    Error { message: String, definite: bool },
    /// No answer within the client's timeout: the op may or may not have taken effect.
    Timeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Overwrites `key` with `value` (KvPut, overwrite).
    Put,
    /// Reads `key` (KvGet, linearizable).
    Get,
    /// Submits the job `key` (a submission id), retried with the same client token.
    Submit,
}

/// One client operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub client: u32,
    pub op: Kind,
    pub key: String,
    /// What a put wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The head the op was sent to.
    pub head: String,
    pub invoke: f64,
    pub complete: f64,
    pub outcome: Outcome,
}

impl Op {
    pub fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok(_))
    }

    /// Whether the op may have taken effect although it did not answer OK.
    pub fn indeterminate(&self) -> bool {
        match &self.outcome {
            Outcome::Ok(_) => false,
            Outcome::Timeout => true,
            Outcome::Error { definite, .. } => !definite,
        }
    }

    /// The JSONL shape: `{op, args, invoke, complete, result | error | timeout}`.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "op": self.op,
            "client": self.client,
            "head": self.head,
            "args": {"key": self.key, "value": self.value},
            "invoke": self.invoke,
            "complete": self.complete,
        });
        match &self.outcome {
            Outcome::Ok(r) => v["result"] = serde_json::json!({ "ok": true, "value": r }),
            Outcome::Error { message, definite } => {
                v["error"] = serde_json::json!({ "message": message, "definite": definite });
            }
            Outcome::Timeout => v["timeout"] = true.into(),
        }
        v
    }
}

/// What a head said of itself at one moment (the sampler asks every head every ~200 ms).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadSample {
    pub at: f64,
    pub head: usize,
    pub role: String,
    pub term: u64,
    pub last_log_index: u64,
    pub last_applied: u64,
}

/// A job's status as the leader reported it at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSample {
    pub at: f64,
    pub submission_id: String,
    pub status: String,
}

/// A node's state as the leader reported it at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSample {
    pub at: f64,
    pub node_id: String,
    pub state: String,
}

/// A fault injected or healed, or another scenario step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub at: f64,
    pub what: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Recorded {
    pub ops: Vec<Op>,
    pub heads: Vec<HeadSample>,
    pub jobs: Vec<JobSample>,
    pub nodes: Vec<NodeSample>,
    pub events: Vec<Event>,
}

/// The shared recorder: every client thread and the sampler append here.
#[derive(Clone)]
pub struct History {
    t0: Instant,
    inner: Arc<Mutex<Recorded>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> Self {
        Self {
            t0: Instant::now(),
            inner: Arc::default(),
        }
    }

    /// Seconds since the run began.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn op(&self, op: Op) {
        self.lock().ops.push(op);
    }

    pub fn head(&self, s: HeadSample) {
        self.lock().heads.push(s);
    }

    pub fn job(&self, s: JobSample) {
        self.lock().jobs.push(s);
    }

    pub fn node(&self, s: NodeSample) {
        self.lock().nodes.push(s);
    }

    /// Records a scenario step (and prints it, so a run's log reads as a timeline).
    pub fn event(&self, what: impl Into<String>) {
        let e = Event {
            at: self.now(),
            what: what.into(),
        };
        eprintln!("  [{:7.2}s] {}", e.at, e.what);
        self.lock().events.push(e);
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Recorded {
        let g = self.lock();
        Recorded {
            ops: g.ops.clone(),
            heads: g.heads.clone(),
            jobs: g.jobs.clone(),
            nodes: g.nodes.clone(),
            events: g.events.clone(),
        }
    }
}

impl Recorded {
    /// Writes the history as JSONL: the events, then the ops in invocation order, then the
    /// samples.
    pub fn write_jsonl(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for e in &self.events {
            writeln!(f, "{}", serde_json::json!({ "event": e.what, "at": e.at }))?;
        }
        let mut ops: Vec<&Op> = self.ops.iter().collect();
        ops.sort_by(|a, b| a.invoke.total_cmp(&b.invoke));
        for o in ops {
            writeln!(f, "{}", o.to_json())?;
        }
        for s in &self.heads {
            writeln!(f, "{}", serde_json::json!({ "head_sample": s }))?;
        }
        for s in &self.jobs {
            writeln!(f, "{}", serde_json::json!({ "job_sample": s }))?;
        }
        for s in &self.nodes {
            writeln!(f, "{}", serde_json::json!({ "node_sample": s }))?;
        }
        f.flush()
    }

    /// When the first event whose text starts with `prefix` happened.
    pub fn event_at(&self, prefix: &str) -> Option<f64> {
        self.events
            .iter()
            .find(|e| e.what.starts_with(prefix))
            .map(|e| e.at)
    }
}
