//! The owner's object table (DESIGN §4): for every object this process owns, its state
//! (pending, an inline value, sealed in node stores, or failed) and the nodes holding copies.
//! An entry lives while any handle (`ObjectRef`, or a pending task using it) lives; when the
//! last handle drops, the entry goes and every stored copy is freed on its node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prost::bytes::Bytes;
use protocol::ObjectId;
use tokio::sync::{Notify, mpsc};

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
    /// How to make the object again (tasks only; `put` objects have none).
    lineage: Option<Arc<crate::submit::Lineage>>,
    /// Times it was rebuilt after its copies were lost.
    rebuilds: u32,
}

/// What `rebuild` decided.
pub(crate) enum Rebuild {
    /// Resubmit this lineage (the object is pending again).
    Run(Arc<crate::submit::Lineage>, u32),
    /// Someone else is already rebuilding it: wait for it.
    InProgress,
    /// It cannot be made again: why.
    Lost(String),
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
        Self {
            objects: Mutex::default(),
            free_tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectId, Entry>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry and returns its first handle.
    pub(crate) fn add(self: &Arc<Self>, id: ObjectId, state: State) -> Arc<Handle> {
        self.add_with_lineage(id, state, None)
    }

    pub(crate) fn add_with_lineage(
        self: &Arc<Self>,
        id: ObjectId,
        state: State,
        lineage: Option<Arc<crate::submit::Lineage>>,
    ) -> Arc<Handle> {
        self.lock().insert(
            id,
            Entry {
                state,
                notify: None,
                lineage,
                rebuilds: 0,
            },
        );
        Arc::new(Handle {
            id,
            owner: Arc::downgrade(self),
        })
    }

    /// Every stored copy of `id` is gone: makes it pending again if its task can run again
    /// (within the task's `max_retries`), for the caller to resubmit.
    pub(crate) fn rebuild(&self, id: ObjectId, why: &str) -> Rebuild {
        let mut objects = self.lock();
        let Some(e) = objects.get_mut(&id) else {
            return Rebuild::Lost(format!("{why}; this process no longer references it"));
        };
        match &e.state {
            State::Pending => return Rebuild::InProgress,
            State::Stored { .. } => {}
            _ => return Rebuild::Lost(why.to_owned()),
        }
        let Some(lineage) = e.lineage.clone() else {
            return Rebuild::Lost(format!(
                "{why}; it was made by put, so there is no task to run again"
            ));
        };
        if e.rebuilds >= lineage.max_retries {
            return Rebuild::Lost(format!(
                "{why}; already rebuilt {} time(s), max_retries={}",
                e.rebuilds, lineage.max_retries
            ));
        }
        e.rebuilds += 1;
        e.state = State::Pending;
        Rebuild::Run(lineage, e.rebuilds)
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

    /// Like `complete`, but only for an object still pending: a late answer (a call
    /// answered CANCELLED that finished anyway) does not overwrite the first, and a copy it
    /// stored is freed.
    pub(crate) fn complete_pending(&self, id: ObjectId, state: State) {
        let mut objects = self.lock();
        match objects.get_mut(&id) {
            Some(e) if matches!(e.state, State::Pending) => {
                e.state = state;
                if let Some(n) = e.notify.take() {
                    n.notify_waiters();
                }
            }
            _ => {
                drop(objects);
                self.free_copies(id, &state);
            }
        }
    }

    /// Records one more node holding a copy (a pulled secondary copy).
    pub(crate) fn add_location(&self, id: ObjectId, loc: Loc) {
        if let Some(Entry {
            state: State::Stored { locs, .. },
            ..
        }) = self.lock().get_mut(&id)
            && !locs.contains(&loc)
        {
            locs.push(loc);
        }
    }

    /// A draining node moved the copy of `id` it held to `to`: the copy is now there, not on
    /// `from`. An object no longer owned (or not stored) gets its new copy freed, since no
    /// release will ever name that place.
    pub(crate) fn moved(&self, id: ObjectId, from: &str, to: Loc) {
        let mut objects = self.lock();
        if let Some(Entry {
            state: State::Stored { locs, .. },
            ..
        }) = objects.get_mut(&id)
        {
            locs.retain(|l| l.node_id != from);
            if !locs.contains(&to) {
                locs.push(to);
            }
            return;
        }
        drop(objects);
        let _ = self.free_tx.send((to.nm, id));
    }

    /// Whether `id` is stored somewhere not in `tried` (it moved while they were tried).
    pub(crate) fn moved_since(&self, id: ObjectId, tried: &[Loc]) -> bool {
        matches!(
            self.lock().get(&id),
            Some(Entry { state: State::Stored { locs, .. }, .. })
                if locs.iter().any(|l| !tried.contains(l))
        )
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
                e.notify
                    .get_or_insert_with(Default::default)
                    .clone()
                    .notified_owned()
            };
            match deadline {
                Some(d) => tokio::time::timeout_at(d, notified).await.ok()?,
                None => notified.await,
            }
        }
    }

    /// For `wait`: which of `ids` are ready once `n` are, or the timeout passed.
    pub(crate) async fn wait(
        &self,
        ids: &[ObjectId],
        n: usize,
        timeout: Option<Duration>,
    ) -> Vec<bool> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let mut waits = Vec::new();
            let ready: Vec<bool> = {
                let mut objects = self.lock();
                ids.iter()
                    .map(|id| match objects.get_mut(id) {
                        Some(e) if matches!(e.state, State::Pending) => {
                            waits.push(
                                e.notify
                                    .get_or_insert_with(Default::default)
                                    .clone()
                                    .notified_owned(),
                            );
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
    ids.iter()
        .map(|id| {
            objects
                .get(id)
                .is_none_or(|e| !matches!(e.state, State::Pending))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(n: &str) -> Loc {
        Loc {
            node_id: n.into(),
            om: format!("{n}:om"),
            nm: format!("{n}:nm"),
        }
    }

    #[test]
    fn the_last_handle_frees_every_stored_copy_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let id = ObjectId::from_bytes([1; 20]);
        let h = o.add(
            id,
            State::Stored {
                tag: "t".into(),
                locs: vec![loc("a")],
            },
        );
        o.add_location(id, loc("b"));
        o.add_location(id, loc("b"));
        let h2 = h.clone();
        drop(h);
        assert!(rx.try_recv().is_err(), "freed while a handle lives");
        drop(h2);
        let mut freed: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|(n, i)| {
                assert_eq!(i, id);
                n
            })
            .collect();
        freed.sort();
        assert_eq!(freed, ["a:nm", "b:nm"]);
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn a_moved_copy_replaces_the_old_place_and_an_unowned_one_is_freed() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let id = ObjectId::from_bytes([7; 20]);
        let h = o.add(
            id,
            State::Stored {
                tag: "t".into(),
                locs: vec![loc("a"), loc("b")],
            },
        );
        let tried = vec![loc("a"), loc("b")];
        assert!(!o.moved_since(id, &tried));
        o.moved(id, "a", loc("c"));
        // Twice (a drain retried): still one entry for c.
        o.moved(id, "a", loc("c"));
        match o.state(id) {
            Some(State::Stored { locs, .. }) => assert_eq!(locs, [loc("b"), loc("c")]),
            other => panic!("unexpected {other:?}"),
        }
        assert!(o.moved_since(id, &tried));
        assert!(rx.try_recv().is_err(), "nothing freed while referenced");
        // Released: the copy at its new place is the one freed.
        drop(h);
        let mut freed: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|(n, _)| n)
            .collect();
        freed.sort();
        assert_eq!(freed, ["b:nm", "c:nm"]);
        // News of an object this process no longer owns: its new copy is freed.
        o.moved(id, "b", loc("d"));
        assert_eq!(rx.try_recv().ok(), Some(("d:nm".to_string(), id)));
        assert!(!o.moved_since(id, &[]));
    }

    #[test]
    fn a_result_nobody_references_is_freed_when_it_arrives() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let id = ObjectId::from_bytes([2; 20]);
        drop(o.add(id, State::Pending));
        o.complete(
            id,
            State::Stored {
                tag: "t".into(),
                locs: vec![loc("a")],
            },
        );
        assert_eq!(rx.try_recv().ok(), Some(("a:nm".to_string(), id)));
        // Inline values need no free.
        drop(o.add(
            id,
            State::Inline {
                bytes: Bytes::from_static(b"x"),
                tag: "t".into(),
            },
        ));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn lost_objects_are_rebuilt_within_max_retries_and_puts_are_lost() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let stored = || State::Stored {
            tag: "t".into(),
            locs: vec![loc("a")],
        };
        let put = ObjectId::from_bytes([5; 20]);
        let _hp = o.add(put, stored());
        assert!(matches!(o.rebuild(put, "gone"), Rebuild::Lost(w) if w.contains("put")));

        let id = ObjectId::from_bytes([6; 20]);
        let key = crate::submit::Key::new(Default::default(), &crate::Strategy::Default);
        let lineage = Arc::new(crate::submit::Lineage {
            function: "m::f",
            args: vec![],
            key,
            max_retries: 1,
        });
        let _h = o.add_with_lineage(id, stored(), Some(lineage));
        assert!(matches!(o.rebuild(id, "gone"), Rebuild::Run(_, 1)));
        // While it runs again, others wait for it instead of starting a second run.
        assert!(matches!(o.rebuild(id, "gone"), Rebuild::InProgress));
        o.complete(id, stored());
        assert!(
            matches!(o.rebuild(id, "gone again"), Rebuild::Lost(w) if w.contains("max_retries=1"))
        );
    }

    #[tokio::test]
    async fn waiters_wake_on_completion_and_time_out_otherwise() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let (a, b) = (ObjectId::from_bytes([3; 20]), ObjectId::from_bytes([4; 20]));
        let _ha = o.add(a, State::Pending);
        let _hb = o.add(b, State::Pending);
        assert!(o.ready(a, Some(Duration::from_millis(20))).await.is_none());
        let o2 = o.clone();
        let w = tokio::spawn(async move { o2.wait(&[a, b], 1, None).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        o.complete(
            b,
            State::Inline {
                bytes: Bytes::from_static(b"x"),
                tag: "t".into(),
            },
        );
        assert_eq!(w.await.unwrap(), [false, true]);
        assert_eq!(
            o.wait(&[a, b], 2, Some(Duration::from_millis(20))).await,
            [false, true]
        );
        assert!(matches!(o.ready(b, None).await, Some(State::Inline { .. })));
    }
}
