//! The owner's task submitter (DESIGN §3). Its decisions are a sans-IO core (`engine::Engine`,
//! its state in `state`, how it changes split by noun into `tasks`, `leases`,
//! `actors` and `cancel`): state changes only through
//! `handle(event)`, and `flush` returns the effects (lease RPCs, pushes, timers, task
//! events) that one tokio task, the executor (`exec`), runs. No lock is held across an
//! await, and the control plane is called only to find or end actors.
//!
//! The core is tested without sockets in `tests`: events in, effects and object states
//! out.

mod actors;
mod cancel;
mod engine;
mod exec;
mod leases;
mod state;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::ObjectId;

pub(crate) use self::engine::{Event, value_state};
pub(crate) use self::exec::run;
pub(crate) use self::state::Key;
use crate::__private::ArgOut;

/// Tasks in flight per lease (SPREAD: one).
const PIPELINE: usize = 16;
/// Lease requests of one key under way at once.
const MAX_PENDING_LEASES: usize = 8;
/// How long a lease with nothing to do is kept for the next call.
const LINGER: Duration = Duration::from_millis(200);
/// How long a lease request may wait in a node's queue.
const LEASE_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run a task again (kept by the owner while its result is referenced).
pub(crate) struct Lineage {
    pub(crate) function: &'static str,
    pub(crate) args: Vec<ArgOut>,
    pub(crate) key: Arc<Key>,
    pub(crate) max_retries: u32,
    pub(crate) retry_exceptions: bool,
    pub(crate) num_returns: u8,
    /// Whether its task events are recorded.
    pub(crate) events: bool,
}

impl Lineage {
    pub(crate) fn task(&self, id: ObjectId, attempt: u32) -> Task {
        Task {
            id,
            function: self.function,
            args: self.args.clone(),
            key: self.key.clone(),
            attempt,
            max_retries: self.max_retries,
            retry_exceptions: self.retry_exceptions,
            num_returns: self.num_returns,
            streaming: false,
            parent: None,
            ev: crate::events::Slot::new(self.events),
        }
    }
}

pub(crate) struct Task {
    pub(crate) id: ObjectId,
    pub(crate) function: &'static str,
    pub(crate) args: Vec<ArgOut>,
    pub(crate) key: Arc<Key>,
    pub(crate) attempt: u32,
    pub(crate) max_retries: u32,
    /// A panic is retried too (within `max_retries`).
    pub(crate) retry_exceptions: bool,
    /// Values it returns (1, or `num_returns`); their ids are `id.return_id(i)`.
    pub(crate) num_returns: u8,
    /// A generator whose items come as it makes them (never retried).
    pub(crate) streaming: bool,
    /// The task of this process that submitted it (its children are cancelled with it).
    pub(crate) parent: Option<ObjectId>,
    /// Its task event record (`events`).
    pub(crate) ev: crate::events::Slot,
}

/// What `sdk::cancel` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CancelOptions {
    /// Kill the worker running the task (its worker exits), not only tell the task.
    pub force: bool,
    /// Cancel the tasks the task submitted too, and theirs.
    pub recursive: bool,
}

/// How often the same warning may be printed again.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A warning the user must see without having installed a logger (Ray prints these too): on
/// stderr, at most once a minute per `key`.
pub(crate) fn user_warning(key: &str, msg: &str) {
    static LAST: std::sync::Mutex<Option<HashMap<String, Instant>>> = std::sync::Mutex::new(None);
    let now = Instant::now();
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let last = last.get_or_insert_with(HashMap::new);
        if last
            .get(key)
            .is_some_and(|t| now.duration_since(*t) < WARN_EVERY)
        {
            return;
        }
        if last.len() > 10_000 {
            last.clear();
        }
        last.insert(key.to_owned(), now);
    }
    tracing::warn!("{msg}");
    eprintln!("(rayctl) warning: {msg}");
}
