//! The owner's object table (DESIGN §4): for every object this process owns, its state
//! (pending, an inline value, sealed in node stores, or failed) and the nodes holding copies.
//! An entry lives while any handle (`ObjectRef`, or a pending task using it) lives; when the
//! last handle drops, the entry goes and every stored copy is freed on its node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prost::bytes::Bytes;
use protocol::{ObjectId, pb};
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

impl From<pb::ObjectLocation> for Loc {
    fn from(l: pb::ObjectLocation) -> Self {
        Self {
            node_id: l.node_id,
            om: l.object_manager_address,
            nm: l.node_address,
        }
    }
}

impl From<Loc> for pb::ObjectLocation {
    fn from(l: Loc) -> Self {
        Self {
            node_id: l.node_id,
            object_manager_address: l.om,
            node_address: l.nm,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum State {
    Pending,
    Inline {
        bytes: Bytes,
        tag: String,
    },
    Stored {
        tag: String,
        locs: Vec<Loc>,
    },
    /// Boxed: failures are rare and the table's entries stay small (every lookup on the
    /// hot path touches them).
    Failed(Box<TaskError>),
}

/// The table: keyed by ids this process made (its prefix and a counter), so a fast hash
/// does (no need for SipHash's flood resistance).
pub(crate) type IdMap<V> = HashMap<ObjectId, V, foldhash::fast::RandomState>;

struct Entry {
    state: State,
    notify: Option<Arc<Notify>>,
    /// How to make the object again (tasks only; `put` objects have none).
    lineage: Option<Arc<crate::submit::Lineage>>,
    /// Times it was rebuilt after its copies were lost.
    rebuilds: u32,
    /// This process's handle (what its `ObjectRef`s share), while one lives.
    handle: Weak<Handle>,
    /// What few objects have (borrows, refs inside, a scope's end), out of line.
    more: Option<Box<More>>,
}

#[derive(Default)]
struct More {
    /// Borrows other processes registered (worker.proto, "Borrowed refs"), per borrower.
    borrowers: HashMap<Borrower, u32>,
    /// The refs inside the value, kept alive while it lives.
    contained: Vec<Arc<Handle>>,
    /// Run when the entry goes (an actor's scope object ends the actor).
    on_free: Option<Box<dyn FnOnce() + Send>>,
}

impl Entry {
    fn unreferenced(&self) -> bool {
        self.handle.strong_count() == 0 && !self.borrowed()
    }

    fn borrowed(&self) -> bool {
        self.more.as_ref().is_some_and(|m| !m.borrowers.is_empty())
    }

    fn more(&mut self) -> &mut More {
        self.more.get_or_insert_with(Default::default)
    }
}

/// A process that borrows objects: its owner prefix and its node manager.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Borrower {
    pub(crate) prefix: Vec<u8>,
    pub(crate) node: String,
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

/// What a process's `ObjectRef`s to one object share: one per object and process. An owned
/// object's entry goes when its handle drops and no borrow is registered; a borrowed one's
/// borrows are removed at its owner when it drops.
#[doc(hidden)]
#[allow(unreachable_pub)]
pub struct Handle {
    pub(crate) id: ObjectId,
    pub(crate) kind: Kind,
}

pub(crate) enum Kind {
    Owned(Weak<Owner>),
    Borrowed(crate::borrow::Borrowed),
}

impl Handle {
    /// The borrowed side, when this process does not own the object.
    pub(crate) fn borrowed(&self) -> Option<&crate::borrow::Borrowed> {
        match &self.kind {
            Kind::Borrowed(b) => Some(b),
            Kind::Owned(_) => None,
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let me = self as *const Handle;
        match &self.kind {
            Kind::Owned(o) => {
                if let Some(o) = o.upgrade() {
                    o.release(self.id, me);
                }
            }
            Kind::Borrowed(b) => b.dropped(self.id, me),
        }
    }
}

pub(crate) struct Owner {
    objects: Mutex<IdMap<Entry>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, IdMap<Entry>> {
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
        let h = Arc::new(Handle {
            id,
            kind: Kind::Owned(Arc::downgrade(self)),
        });
        let old = self.lock().insert(
            id,
            Entry {
                state,
                notify: None,
                lineage,
                rebuilds: 0,
                handle: Arc::downgrade(&h),
                more: None,
            },
        );
        drop(old);
        h
    }

    /// An object that stands for something else's lifetime (an actor's scope): `on_free`
    /// runs when no handle or borrow of it is left anywhere.
    pub(crate) fn add_scope(
        self: &Arc<Self>,
        id: ObjectId,
        on_free: Box<dyn FnOnce() + Send>,
    ) -> Arc<Handle> {
        let h = self.add(
            id,
            State::Inline {
                bytes: Bytes::new(),
                tag: "scope".into(),
            },
        );
        if let Some(e) = self.lock().get_mut(&id) {
            e.more().on_free = Some(on_free);
        }
        h
    }

    /// This process's handle to an object it owns (a ref to it came back in a value): the
    /// live one, or a new one if the entry is kept only by borrows. An object no longer
    /// owned gets a handle whose reads say so.
    pub(crate) fn handle(self: &Arc<Self>, id: ObjectId) -> Arc<Handle> {
        let mut objects = self.lock();
        let e = objects.get_mut(&id);
        if let Some(h) = e.as_ref().and_then(|e| e.handle.upgrade()) {
            return h;
        }
        let h = Arc::new(Handle {
            id,
            kind: Kind::Owned(Arc::downgrade(self)),
        });
        if let Some(e) = e {
            e.handle = Arc::downgrade(&h);
        }
        h
    }

    /// Adds (or, negative, removes) borrows of `id` by `b`; false if the object is not owned
    /// here any more. An object left with no handle and no borrow is freed.
    pub(crate) fn borrow(&self, id: ObjectId, b: &Borrower, delta: i32) -> bool {
        let mut objects = self.lock();
        let Some(e) = objects.get_mut(&id) else {
            return false;
        };
        let borrowers = &mut e.more().borrowers;
        let n = borrowers.get(b).copied().unwrap_or(0) as i64 + delta as i64;
        if n > 0 {
            borrowers.insert(b.clone(), n.min(u32::MAX as i64) as u32);
        } else {
            borrowers.remove(b);
        }
        if e.unreferenced() {
            let e = objects.remove(&id);
            drop(objects);
            if let Some(e) = e {
                self.forget(id, e);
            }
        }
        true
    }

    /// `b` is gone: its borrows end.
    pub(crate) fn borrower_gone(&self, b: &Borrower) {
        let gone: Vec<(ObjectId, Entry)> = {
            let mut objects = self.lock();
            let ids: Vec<ObjectId> = objects
                .iter_mut()
                .filter_map(|(id, e)| {
                    let had = e.more.as_mut().and_then(|m| m.borrowers.remove(b));
                    (had.is_some() && e.unreferenced()).then_some(*id)
                })
                .collect();
            ids.into_iter()
                .filter_map(|id| Some((id, objects.remove(&id)?)))
                .collect()
        };
        for (id, e) in gone {
            self.forget(id, e);
        }
    }

    /// Whether `b` borrows anything of this process's.
    pub(crate) fn has_borrower(&self, b: &Borrower) -> bool {
        self.lock()
            .values()
            .any(|e| e.more.as_ref().is_some_and(|m| m.borrowers.contains_key(b)))
    }

    /// The refs inside `id`'s value: kept alive while it lives (dropped at once if it is
    /// gone already).
    pub(crate) fn contain(&self, id: ObjectId, refs: Vec<Arc<Handle>>) {
        if refs.is_empty() {
            return;
        }
        let mut objects = self.lock();
        match objects.get_mut(&id) {
            Some(e) => e.more().contained.extend(refs),
            None => {
                drop(objects);
                drop(refs);
            }
        }
    }

    /// Wakes the waiters of a removed entry, frees its copies and lets go of its refs (out
    /// of the lock: dropping a handle may come back here).
    fn forget(&self, id: ObjectId, mut e: Entry) {
        if let Some(n) = &e.notify {
            n.notify_waiters();
        }
        self.free_copies(id, &e.state);
        let on_free = e.more.as_mut().and_then(|m| m.on_free.take());
        drop(e);
        if let Some(f) = on_free {
            f();
        }
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

    /// Whether `id` is owned here and still pending (cheap: no clone of its state).
    pub(crate) fn is_pending(&self, id: ObjectId) -> bool {
        self.lock()
            .get(&id)
            .is_some_and(|e| matches!(e.state, State::Pending))
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
                let lineage = settle(e, state);
                drop(objects);
                drop(lineage);
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
                let lineage = settle(e, state);
                drop(objects);
                drop(lineage);
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

    /// Handle `h` of `id` dropped: the entry goes unless a newer handle or a borrow keeps it.
    fn release(&self, id: ObjectId, h: *const Handle) {
        let mut objects = self.lock();
        let Some(e) = objects.get_mut(&id) else {
            return;
        };
        // A newer handle was made after this one's count reached zero: it owns the entry.
        if !std::ptr::eq(e.handle.as_ptr(), h) && e.handle.strong_count() > 0 {
            return;
        }
        if e.borrowed() {
            return;
        }
        let e = objects.remove(&id);
        drop(objects);
        if let Some(e) = e {
            self.forget(id, e);
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

/// Sets a pending object's final state and wakes its waiters. A value that cannot be lost
/// (inline) or a failure needs no lineage: it is returned, to be dropped out of the lock
/// (its arguments' refs go with it).
fn settle(e: &mut Entry, state: State) -> Option<Arc<crate::submit::Lineage>> {
    let done = matches!(state, State::Inline { .. } | State::Failed(_));
    e.state = state;
    if let Some(n) = e.notify.take() {
        n.notify_waiters();
    }
    if done { e.lineage.take() } else { None }
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
            retry_exceptions: false,
            num_returns: 1,
            events: true,
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

    fn borrower(n: u8) -> Borrower {
        Borrower {
            prefix: vec![n; 11],
            node: format!("node{n}:1"),
        }
    }

    fn stored_at(n: &str) -> State {
        State::Stored {
            tag: "t".into(),
            locs: vec![loc(n)],
        }
    }

    #[test]
    fn borrows_keep_an_object_after_its_last_handle_and_the_last_one_frees_it() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let id = ObjectId::from_bytes([8; 20]);
        let h = o.add(id, stored_at("a"));
        let (b1, b2) = (borrower(1), borrower(2));
        assert!(o.borrow(id, &b1, 2));
        assert!(o.borrow(id, &b2, 1));
        drop(h);
        assert!(rx.try_recv().is_err(), "freed while borrowed");
        assert!(o.has_borrower(&b1));
        // A ref to it comes back here: the same entry, a new handle.
        let h = o.handle(id);
        assert!(
            Arc::ptr_eq(&h, &o.handle(id)),
            "one handle per object while it lives"
        );
        assert!(o.borrow(id, &b1, -2));
        assert!(!o.has_borrower(&b1));
        drop(h);
        assert!(rx.try_recv().is_err(), "b2 still borrows it");
        assert!(o.borrow(id, &b2, -1));
        assert_eq!(rx.try_recv().ok(), Some(("a:nm".to_string(), id)));
        assert_eq!(o.len(), 0);
        // Borrows of an object no longer owned are refused.
        assert!(!o.borrow(id, &b2, 1));
    }

    #[test]
    fn a_dead_borrower_s_borrows_end_and_what_it_alone_kept_is_freed() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let (a, b) = (
            ObjectId::from_bytes([9; 20]),
            ObjectId::from_bytes([10; 20]),
        );
        let ha = o.add(a, stored_at("a"));
        let hb = o.add(b, stored_at("b"));
        let (dead, alive) = (borrower(1), borrower(2));
        o.borrow(a, &dead, 1);
        o.borrow(b, &dead, 1);
        o.borrow(b, &alive, 1);
        drop((ha, hb));
        o.borrower_gone(&dead);
        assert_eq!(rx.try_recv().ok(), Some(("a:nm".to_string(), a)));
        assert!(
            rx.try_recv().is_err(),
            "b is still borrowed by a live process"
        );
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn the_refs_inside_a_value_live_as_long_as_it() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let (outer, inner) = (
            ObjectId::from_bytes([11; 20]),
            ObjectId::from_bytes([12; 20]),
        );
        let hi = o.add(inner, stored_at("i"));
        let ho = o.add(
            outer,
            State::Inline {
                bytes: Bytes::from_static(b"x"),
                tag: "t".into(),
            },
        );
        o.contain(outer, vec![hi]);
        assert!(
            rx.try_recv().is_err(),
            "the outer value holds the inner ref"
        );
        drop(ho);
        assert_eq!(rx.try_recv().ok(), Some(("i:nm".to_string(), inner)));
        assert_eq!(o.len(), 0);
        // Refs for a value already gone are let go at once.
        let hi = o.add(inner, stored_at("j"));
        o.contain(outer, vec![hi]);
        assert_eq!(rx.try_recv().ok(), Some(("j:nm".to_string(), inner)));
    }

    #[test]
    fn an_inline_result_lets_go_of_its_lineage_and_so_its_arguments() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let o = Arc::new(Owner::new(tx));
        let (arg, res) = (
            ObjectId::from_bytes([13; 20]),
            ObjectId::from_bytes([14; 20]),
        );
        let ha = o.add(arg, stored_at("a"));
        let key = crate::submit::Key::new(Default::default(), &crate::Strategy::Default);
        let lineage = Arc::new(crate::submit::Lineage {
            function: "m::f",
            args: vec![crate::__private::ArgOut::Ref(ha)],
            key,
            max_retries: 3,
            retry_exceptions: false,
            num_returns: 1,
            events: true,
        });
        let _hr = o.add_with_lineage(res, State::Pending, Some(lineage));
        assert!(rx.try_recv().is_err());
        o.complete(
            res,
            State::Inline {
                bytes: Bytes::from_static(b"x"),
                tag: "t".into(),
            },
        );
        assert_eq!(rx.try_recv().ok(), Some(("a:nm".to_string(), arg)));
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
