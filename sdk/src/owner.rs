//! The owner's object table (DESIGN §4): for every object this process owns, its state
//! (pending, an inline value, sealed in node stores, or failed) and the nodes holding copies.
//! An entry lives while any handle (`ObjectRef`, or a pending task using it) lives; when the
//! last handle drops, the entry goes and every stored copy is freed on its node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prost::bytes::Bytes;
use protocol::ObjectId;
use tokio::sync::{mpsc, Notify};

use crate::TaskError;

/// A node holding a sealed copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) node_id: String,
    /// Object manager (pulls).
    pub(crate) om: String,
    /// Node manager (FreeObjects).
    pub(crate) nm: String,
}

#[derive(Clone, Debug)]
pub(crate) enum State {
    Pending,
    Inline { bytes: Bytes, tag: String },
    Stored { tag: String, locs: Vec<Loc> },
    Failed(TaskError),
}

struct Entry {
    state: State,
    notify: Option<Arc<Notify>>,
}

/// One owned reference; the entry goes when the last `Arc<Handle>` drops.
#[doc(hidden)]
#[allow(unreachable_pub)]
pub struct Handle {
    pub(crate) id: ObjectId,
    owner: Weak<Owner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(o) = self.owner.upgrade() {
            o.release(self.id);
        }
    }
}

pub(crate) struct Owner {
    objects: Mutex<HashMap<ObjectId, Entry>>,
    /// (node manager address, object) to free.
    free_tx: mpsc::UnboundedSender<(String, ObjectId)>,
}

impl Owner {
    pub(crate) fn new(free_tx: mpsc::UnboundedSender<(String, ObjectId)>) -> Self {
        Self { objects: Mutex::default(), free_tx }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectId, Entry>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry and returns its first handle.
    pub(crate) fn add(self: &Arc<Self>, id: ObjectId, state: State) -> Arc<Handle> {
        self.lock().insert(id, Entry { state, notify: None });
        Arc::new(Handle { id, owner: Arc::downgrade(self) })
    }

    pub(crate) fn state(&self, id: ObjectId) -> Option<State> {
        self.lock().get(&id).map(|e| e.state.clone())
    }

    /// Sets the final state of a pending object and wakes its waiters. If nobody references
    /// the object any more, stored copies are freed at once.
    pub(crate) fn complete(&self, id: ObjectId, state: State) {
        let mut objects = self.lock();
        match objects.get_mut(&id) {
            Some(e) => {
                e.state = state;
                if let Some(n) = e.notify.take() {
                    n.notify_waiters();
                }
            }
            None => {
                drop(objects);
                self.free_copies(id, &state);
            }
        }
    }

    /// Records one more node holding a copy (a pulled secondary copy).
    pub(crate) fn add_location(&self, id: ObjectId, loc: Loc) {
        if let Some(Entry { state: State::Stored { locs, .. }, .. }) = self.lock().get_mut(&id)
            && !locs.contains(&loc)
        {
            locs.push(loc);
        }
    }

    fn release(&self, id: ObjectId) {
        let e = self.lock().remove(&id);
        if let Some(e) = e {
            if let Some(n) = e.notify {
                n.notify_waiters();
            }
            self.free_copies(id, &e.state);
        }
    }

    fn free_copies(&self, id: ObjectId, state: &State) {
        if let State::Stored { locs, .. } = state {
            for l in locs {
                let _ = self.free_tx.send((l.nm.clone(), id));
            }
        }
    }

    /// Waits until the object is no longer pending; `None` if the timeout passed first.
    pub(crate) async fn ready(&self, id: ObjectId, timeout: Option<Duration>) -> Option<State> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let notified = {
                let mut objects = self.lock();
                let e = objects.get_mut(&id)?;
                if !matches!(e.state, State::Pending) {
                    return Some(e.state.clone());
                }
                // Registered at creation, so a completion between here and the await is seen.
                e.notify.get_or_insert_with(Default::default).clone().notified_owned()
            };
            match deadline {
                Some(d) => tokio::time::timeout_at(d, notified).await.ok()?,
                None => notified.await,
            }
        }
    }

    /// For `wait`: which of `ids` are ready once `n` are, or the timeout passed.
    pub(crate) async fn wait(&self, ids: &[ObjectId], n: usize, timeout: Option<Duration>) -> Vec<bool> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let mut waits = Vec::new();
            let ready: Vec<bool> = {
                let mut objects = self.lock();
                ids.iter()
                    .map(|id| match objects.get_mut(id) {
                        Some(e) if matches!(e.state, State::Pending) => {
                            waits.push(e.notify.get_or_insert_with(Default::default).clone().notified_owned());
                            false
                        }
                        _ => true,
                    })
                    .collect()
            };
            if ready.iter().filter(|r| **r).count() >= n || waits.is_empty() {
                return ready;
            }
            let any = futures_util::future::select_all(waits.into_iter().map(Box::pin));
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, any).await.is_err() {
                        return ready_now(self, ids);
                    }
                }
                None => {
                    any.await;
                }
            }
        }
    }

    /// Objects currently owned (for tests and metrics).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

fn ready_now(o: &Owner, ids: &[ObjectId]) -> Vec<bool> {
    let objects = o.lock();
    ids.iter().map(|id| objects.get(id).is_none_or(|e| !matches!(e.state, State::Pending))).collect()
}
