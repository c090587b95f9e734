//! Borrowed refs: Ray's ownership protocol (worker.proto, "Borrowed refs").
//!
//! An `ObjectRef` inside a value is archived as its id and its owner's node manager. A
//! process that reads one it does not own gets a *borrowed* handle; the owner counts the
//! borrows each process registered and frees the object only when it holds no ref itself and
//! no borrow is left. Who keeps a ref alive while it travels, so a borrow can be registered
//! after the fact:
//! - a task argument: the caller (its task holds the refs until the reply); the worker
//!   registers what it still holds when the call ends, before it replies;
//! - a returned value: the worker registers the caller as a borrower before it replies, and
//!   the caller's result entry holds those borrows while it lives;
//! - a `put` value: its entry holds the refs in it;
//! - a value read with `get`: its object holds them; the reader registers before `get` returns.
//!
//! Owners watch their borrowers (`NodeManager.WatchProcess`): a dead borrower's borrows end.
//! A borrower asks the owner for the object (`NodeManager.OwnerCall` at the owner's node);
//! when the owner is gone it gets `Error::OwnerDied`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use protocol::{ObjectId, pb};
use rkyv::rancor::{Fallible, Source};
use rkyv::{Archive, Deserialize, Place, Serialize};
use tokio::sync::mpsc;

use crate::owner::{Borrower, Handle, Kind, Loc, State};
use crate::runtime::Runtime;
use crate::{Error, ObjectRef};

/// Bytes of an owner prefix: the first bytes of every object id the owner makes.
pub(crate) const PREFIX: usize = 11;

/// How long a borrower keeps asking an owner's node that does not answer before it calls
/// the owner dead, and an owner keeps watching a borrower's node that does not answer.
const UNANSWERED: Duration = Duration::from_secs(30);

/// How long one `WatchProcess` call waits.
const WATCH_MS: u64 = 60_000;

/// An `ObjectRef` as it is archived inside a value.
#[doc(hidden)]
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RefWire {
    pub(crate) id: [u8; 20],
    /// The owner's node manager (host:port).
    pub(crate) owner_node: String,
}

/// The borrowed side of a handle.
pub(crate) struct Borrowed {
    pub(crate) owner_node: String,
    /// Borrows registered with the owner for this process and this handle's life.
    registered: AtomicU32,
    table: Weak<Borrows>,
}

impl Borrowed {
    pub(crate) fn registered(&self) -> u32 {
        self.registered.load(Ordering::Acquire)
    }

    /// The handle dropped: its borrows are removed at the owner.
    pub(crate) fn dropped(&self, id: ObjectId, h: *const Handle) {
        let Some(t) = self.table.upgrade() else {
            return;
        };
        {
            let mut m = t.lock();
            if m.get(&id).is_some_and(|w| std::ptr::eq(w.as_ptr(), h)) {
                m.remove(&id);
            }
        }
        let n = self.registered();
        if n > 0 {
            let _ = t.releases.send((self.owner_node.clone(), id, n));
        }
    }
}

fn wire(h: &Handle) -> RefWire {
    let owner_node = match &h.kind {
        Kind::Borrowed(b) => b.owner_node.clone(),
        Kind::Owned(_) => crate::runtime::current()
            .map(|rt| rt.node.address.clone())
            .unwrap_or_default(),
    };
    RefWire {
        id: *h.id.as_bytes(),
        owner_node,
    }
}

thread_local! {
    /// While `sending` runs: the handles of the refs archived.
    static SENT: RefCell<Option<Vec<Arc<Handle>>>> = const { RefCell::new(None) };
    /// While `receiving` runs: the handles made by reading refs.
    static FRESH: RefCell<Option<Vec<Arc<Handle>>>> = const { RefCell::new(None) };
}

fn collecting<R>(
    cell: &'static std::thread::LocalKey<RefCell<Option<Vec<Arc<Handle>>>>>,
    f: impl FnOnce() -> R,
) -> (R, Vec<Arc<Handle>>) {
    let outer = cell.with(|c| c.borrow_mut().replace(Vec::new()));
    let r = f();
    let got = cell.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
    (r, got.unwrap_or_default())
}

/// Runs `f` (which archives a value) and returns the handles of the refs it archived, for
/// whoever must keep them alive while the value travels.
pub(crate) fn sending<R>(f: impl FnOnce() -> R) -> (R, Vec<Arc<Handle>>) {
    collecting(&SENT, f)
}

/// Runs `f` (which reads a value) and returns the handles of the refs it read.
pub(crate) fn receiving<R>(f: impl FnOnce() -> R) -> (R, Vec<Arc<Handle>>) {
    collecting(&FRESH, f)
}

impl<T> Archive for ObjectRef<T> {
    type Archived = ArchivedRefWire;
    type Resolver = RefWireResolver;

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        wire(&self.h).resolve(resolver, out);
    }
}

impl<T, S> Serialize<S> for ObjectRef<T>
where
    S: Fallible + ?Sized,
    RefWire: Serialize<S>,
{
    fn serialize(&self, s: &mut S) -> Result<Self::Resolver, S::Error> {
        SENT.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.push(self.h.clone());
            }
        });
        wire(&self.h).serialize(s)
    }
}

impl<T, D> Deserialize<ObjectRef<T>, D> for ArchivedRefWire
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize(&self, _: &mut D) -> Result<ObjectRef<T>, D::Error> {
        let rt = crate::runtime::current().map_err(D::Error::new)?;
        let h = rt
            .borrows
            .handle(&rt, ObjectId::from_bytes(self.id), self.owner_node.as_str());
        FRESH.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.push(h.clone());
            }
        });
        Ok(ObjectRef::new(h))
    }
}

/// This process's borrowed handles, and the owner-side state of its borrowers.
pub(crate) struct Borrows {
    me: Weak<Borrows>,
    handles: Mutex<HashMap<ObjectId, Weak<Handle>>>,
    /// (owner node, object, borrows) to remove at the owner.
    releases: mpsc::UnboundedSender<(String, ObjectId, u32)>,
    /// Borrowers of this process's objects being watched.
    watching: Mutex<HashSet<Borrower>>,
}

impl Borrows {
    pub(crate) fn new(releases: mpsc::UnboundedSender<(String, ObjectId, u32)>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            handles: Mutex::default(),
            releases,
            watching: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectId, Weak<Handle>>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This process's handle to `id`: its own if it owns the object, else the live borrowed
    /// one or a new, unregistered one.
    pub(crate) fn handle(&self, rt: &Runtime, id: ObjectId, owner_node: &str) -> Arc<Handle> {
        if id.as_bytes()[..PREFIX] == rt.prefix {
            return rt.owner.handle(id);
        }
        let mut m = self.lock();
        if let Some(h) = m.get(&id).and_then(Weak::upgrade) {
            return h;
        }
        let h = Arc::new(Handle {
            id,
            kind: Kind::Borrowed(Borrowed {
                owner_node: owner_node.to_owned(),
                registered: AtomicU32::new(0),
                table: self.me.clone(),
            }),
        });
        m.insert(id, Arc::downgrade(&h));
        h
    }

    /// The owner node of a borrowed object this process holds a ref to.
    pub(crate) fn owner_node(&self, id: ObjectId) -> Option<String> {
        let h = self.lock().get(&id)?.upgrade()?;
        h.borrowed().map(|b| b.owner_node.clone())
    }

    /// Live borrowed handles no borrow is registered for yet.
    pub(crate) fn unregistered(&self) -> Vec<Arc<Handle>> {
        // Upgraded under the lock, filtered out of it: a handle whose last other ref went
        // meanwhile is dropped here, and its drop takes this lock.
        let live: Vec<Arc<Handle>> = {
            let m = self.lock();
            if m.is_empty() {
                return Vec::new();
            }
            m.values().filter_map(Weak::upgrade).collect()
        };
        live.into_iter()
            .filter(|h| h.borrowed().is_some_and(|b| b.registered() == 0))
            .collect()
    }

    /// Borrowed handles live in this process (for tests and metrics).
    pub(crate) fn len(&self) -> usize {
        self.lock()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// This process as a borrower.
pub(crate) fn me(rt: &Runtime) -> Borrower {
    Borrower {
        prefix: rt.prefix.to_vec(),
        node: rt.node.address.clone(),
    }
}

fn prefix_of(id: ObjectId) -> Vec<u8> {
    id.as_bytes()[..PREFIX].to_vec()
}

fn borrower_pb(b: &Borrower) -> pb::Borrower {
    pb::Borrower {
        prefix: b.prefix.clone(),
        node: b.node.clone(),
    }
}

/// One call to the owner whose prefix `prefix` is, at its node `node`.
pub(crate) async fn owner_call(
    rt: &Runtime,
    node: &str,
    prefix: Vec<u8>,
    kind: pb::owner_call_request::Kind,
) -> Result<pb::OwnerCallReply, Error> {
    let mut c = rt.nm(node)?;
    let r = c
        .owner_call(pb::OwnerCallRequest {
            owner_prefix: prefix,
            kind: Some(kind),
        })
        .await
        .map_err(|s| Error::from(protocol::RpcError::from(s)))?;
    Ok(r.into_inner())
}

fn owner_died(id: ObjectId, node: &str, why: &str) -> Error {
    Error::OwnerDied(
        id,
        format!(
            "its owner (process {} on node {node}) {why}",
            protocol::hex::encode(&id.as_bytes()[..PREFIX])
        ),
    )
}

/// Registers borrows with their owners: `handles` for `borrower`, each once. A handle this
/// process owns is registered here. Returns the handles registered (an owner that is gone
/// registers nothing: reading the ref will say so).
pub(crate) async fn register(
    rt: &Arc<Runtime>,
    handles: &[Arc<Handle>],
    borrower: &Borrower,
) -> Vec<Arc<Handle>> {
    let mut done = Vec::new();
    let mut by_owner: HashMap<(String, Vec<u8>), Vec<Arc<Handle>>> = HashMap::new();
    for h in handles {
        match &h.kind {
            Kind::Owned(_) => {
                if rt.owner.borrow(h.id, borrower, 1) {
                    if *borrower != me(rt) {
                        watch(rt, borrower.clone());
                    }
                    done.push(h.clone());
                }
            }
            Kind::Borrowed(b) => by_owner
                .entry((b.owner_node.clone(), prefix_of(h.id)))
                .or_default()
                .push(h.clone()),
        }
    }
    let calls = by_owner.into_iter().map(|((node, prefix), hs)| async move {
        let changes = pb::BorrowChanges {
            changes: hs
                .iter()
                .map(|h| pb::BorrowChange {
                    object_id: h.id.as_bytes().to_vec(),
                    borrower: Some(borrower_pb(borrower)),
                    delta: 1,
                })
                .collect(),
        };
        let kind = pb::owner_call_request::Kind::Borrows(changes);
        match with_retries(|| owner_call(rt, &node, prefix.clone(), kind.clone())).await {
            Ok(r) if r.owner_found => hs,
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::warn!(node, "cannot register borrows with their owner: {e}");
                Vec::new()
            }
        }
    });
    for hs in futures_util::future::join_all(calls).await {
        done.extend(hs);
    }
    done
}

/// Registers this process's own borrows for the unregistered handles among `handles`.
pub(crate) async fn register_self(rt: &Arc<Runtime>, handles: Vec<Arc<Handle>>) {
    let todo: Vec<Arc<Handle>> = handles
        .into_iter()
        .filter(|h| h.borrowed().is_some_and(|b| b.registered() == 0))
        .collect();
    if todo.is_empty() {
        return;
    }
    for h in register(rt, &todo, &me(rt)).await {
        if let Some(b) = h.borrowed() {
            b.registered.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// The refs of a result a worker registered this process as a borrower of
/// (`TaskReply.contained`): handles holding those borrows, for the result's entry.
pub(crate) fn adopt(rt: &Runtime, contained: Vec<pb::RefAddress>) -> Vec<Arc<Handle>> {
    let me = me(rt);
    contained
        .into_iter()
        .filter_map(|r| {
            let id = ObjectId::from_slice(&r.object_id).ok()?;
            let h = rt.borrows.handle(rt, id, &r.owner_node);
            match &h.kind {
                // The worker registered this process as a borrower of its own object: the
                // handle keeps it now.
                Kind::Owned(_) => {
                    rt.owner.borrow(id, &me, -1);
                }
                Kind::Borrowed(b) => {
                    b.registered.fetch_add(1, Ordering::AcqRel);
                }
            }
            Some(h)
        })
        .collect()
}

/// Tries a call to a node up to three times over about two seconds while it does not
/// answer.
async fn with_retries<F, Fut>(mut f: F) -> Result<pb::OwnerCallReply, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<pb::OwnerCallReply, Error>>,
{
    let mut last = None;
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        match f().await {
            Ok(r) => return Ok(r),
            Err(e) if e.is_retryable() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::Internal("no attempt made".into())))
}

/// Removes released borrows at their owners, batched per owner.
pub(crate) async fn release_loop(
    rt: Arc<Runtime>,
    mut rx: mpsc::UnboundedReceiver<(String, ObjectId, u32)>,
) {
    let me = me(&rt);
    while let Some(first) = rx.recv().await {
        let mut batch: HashMap<(String, Vec<u8>), Vec<pb::BorrowChange>> = HashMap::new();
        let mut add = |(node, id, n): (String, ObjectId, u32)| {
            batch
                .entry((node, prefix_of(id)))
                .or_default()
                .push(pb::BorrowChange {
                    object_id: id.as_bytes().to_vec(),
                    borrower: Some(borrower_pb(&me)),
                    delta: -(n.min(i32::MAX as u32) as i32),
                });
        };
        add(first);
        while let Ok(x) = rx.try_recv() {
            add(x);
        }
        for ((node, prefix), changes) in batch {
            let rt = rt.clone();
            rt.clone().spawn(async move {
                let kind = pb::owner_call_request::Kind::Borrows(pb::BorrowChanges { changes });
                if let Err(e) =
                    with_retries(|| owner_call(&rt, &node, prefix.clone(), kind.clone())).await
                {
                    tracing::debug!(node, "cannot remove borrows at their owner: {e}");
                }
            });
        }
    }
}

/// Asks the owner for a borrowed object: once it is not pending, its state. `OwnerDied`
/// when the owner is gone (or its node did not answer for `UNANSWERED`).
pub(crate) async fn status(rt: &Runtime, id: ObjectId, node: &str) -> Result<State, Error> {
    let started = tokio::time::Instant::now();
    let reply = loop {
        let kind = pb::owner_call_request::Kind::Status(id.as_bytes().to_vec());
        match owner_call(rt, node, prefix_of(id), kind).await {
            Ok(r) => break r,
            Err(e) if e.is_retryable() && started.elapsed() < UNANSWERED => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) if e.is_retryable() => {
                return Err(owner_died(id, node, &format!("does not answer: {e}")));
            }
            Err(e) => return Err(e),
        }
    };
    if !reply.owner_found {
        return Err(owner_died(id, node, "is gone"));
    }
    let s = reply
        .status
        .ok_or_else(|| Error::Internal(format!("the owner of {id} sent no status")))?;
    let tag = s.type_tag;
    Ok(match s.state {
        Some(pb::object_status::State::Inline(bytes)) => State::Inline { bytes, tag },
        Some(pb::object_status::State::Stored(at)) => State::Stored {
            tag,
            locs: at.locations.into_iter().map(Loc::from).collect(),
        },
        Some(pb::object_status::State::Failed(e)) => State::Failed(Box::new(e.into())),
        Some(pb::object_status::State::Unknown(why)) => {
            return Err(Error::ObjectLost(id, why));
        }
        None => return Err(Error::Internal(format!("the owner of {id} sent no state"))),
    })
}

/// Tells the owner of a borrowed object that this node now holds a copy (freed with it).
pub(crate) fn copied(rt: &Arc<Runtime>, id: ObjectId, node: String) {
    let rt2 = rt.clone();
    rt.spawn(async move {
        let kind = pb::owner_call_request::Kind::Copy(pb::ObjectCopy {
            object_id: id.as_bytes().to_vec(),
            location: Some(rt2.node.loc().into()),
        });
        let _ = with_retries(|| owner_call(&rt2, &node, prefix_of(id), kind.clone())).await;
    });
}

/// Answers a call for this process as an owner (relayed by its node).
pub(crate) async fn serve(rt: Arc<Runtime>, call: pb::RelayedOwnerCall) -> pb::RelayedOwnerReply {
    let mut reply = pb::OwnerCallReply {
        owner_found: true,
        status: None,
    };
    match call.request.and_then(|r| r.kind) {
        Some(pb::owner_call_request::Kind::Borrows(b)) => {
            let me = me(&rt);
            for c in b.changes {
                let (Ok(id), Some(who)) = (ObjectId::from_slice(&c.object_id), c.borrower) else {
                    continue;
                };
                let who = Borrower {
                    prefix: who.prefix,
                    node: who.node,
                };
                if rt.owner.borrow(id, &who, c.delta) && c.delta > 0 && who != me {
                    watch(&rt, who);
                }
            }
        }
        Some(pb::owner_call_request::Kind::Status(id)) => {
            reply.status = Some(match ObjectId::from_slice(&id) {
                Err(e) => unknown(e.to_string()),
                Ok(id) => match rt.owner.ready(id, None).await {
                    None => unknown(format!("its owner no longer has object {id} (freed)")),
                    Some(s) => status_pb(s),
                },
            });
        }
        Some(pb::owner_call_request::Kind::Copy(c)) => {
            if let (Ok(id), Some(l)) = (ObjectId::from_slice(&c.object_id), c.location) {
                rt.owner.add_location(id, l.into());
            }
        }
        None => {}
    }
    pb::RelayedOwnerReply {
        call_id: call.call_id,
        reply: Some(reply),
    }
}

fn unknown(why: String) -> pb::ObjectStatus {
    pb::ObjectStatus {
        state: Some(pb::object_status::State::Unknown(why)),
        type_tag: String::new(),
    }
}

fn status_pb(s: State) -> pb::ObjectStatus {
    match s {
        State::Inline { bytes, tag } => pb::ObjectStatus {
            state: Some(pb::object_status::State::Inline(bytes)),
            type_tag: tag,
        },
        State::Stored { tag, locs } => pb::ObjectStatus {
            state: Some(pb::object_status::State::Stored(pb::StoredAt {
                locations: locs.into_iter().map(Into::into).collect(),
            })),
            type_tag: tag,
        },
        State::Failed(e) => pb::ObjectStatus {
            state: Some(pb::object_status::State::Failed((&*e).into())),
            type_tag: String::new(),
        },
        State::Pending => unknown("still pending".into()),
    }
}

/// Watches borrower `b` until it holds no borrow of this process's or is gone (then its
/// borrows end). One watch per borrower.
fn watch(rt: &Arc<Runtime>, b: Borrower) {
    if !rt
        .borrows
        .watching
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(b.clone())
    {
        return;
    }
    let rt2 = rt.clone();
    rt.spawn(async move {
        let rt = rt2;
        let mut unanswered_since: Option<tokio::time::Instant> = None;
        loop {
            let r = match rt.nm(&b.node) {
                Ok(mut c) => c
                    .watch_process(pb::WatchProcessRequest {
                        prefix: b.prefix.clone(),
                        wait_ms: WATCH_MS,
                    })
                    .await
                    .map(|r| r.into_inner().gone)
                    .map_err(|s| s.message().to_owned()),
                Err(e) => Err(e.to_string()),
            };
            let gone = match r {
                Ok(gone) => {
                    unanswered_since = None;
                    gone
                }
                Err(e) => {
                    let since = *unanswered_since.get_or_insert_with(tokio::time::Instant::now);
                    tracing::debug!(node = b.node, "watching a borrower: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    since.elapsed() >= UNANSWERED
                }
            };
            if gone {
                tracing::info!(node = b.node, "a borrower is gone: its borrows end");
                rt.owner.borrower_gone(&b);
            }
            let mut w = rt
                .borrows
                .watching
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if gone || !rt.owner.has_borrower(&b) {
                w.remove(&b);
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_nest_and_restore() {
        let ((inner, outer_seen), got) = sending(|| {
            let (_, inner) = sending(|| ());
            let seen = SENT.with(|c| c.borrow().is_some());
            (inner, seen)
        });
        assert!(inner.is_empty() && got.is_empty());
        assert!(
            outer_seen,
            "the outer scope is restored after the inner one"
        );
        assert!(SENT.with(|c| c.borrow().is_none()));
    }
}
