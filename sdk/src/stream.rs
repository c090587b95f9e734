//! Streaming generators (`#[sdk::remote(num_returns = "streaming")]`, Ray's
//! `ObjectRefGenerator`): the worker reports each value the function yields as it is made
//! (`TaskReply.item`); the caller reads them as refs, in order, while the task still runs.
//! Back-pressure: the worker stays at most `WINDOW` items ahead of what the caller consumed
//! (`PushTasksRequest.consumed`), so an unread stream holds at most `WINDOW` objects.
//!
//! A streaming task is not retried (its items may have been read); a worker that dies ends
//! the stream with the error after the items already made.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use protocol::{ObjectId, pb};
use tokio::sync::Notify;

use crate::owner::{Handle, Owner, State};
use crate::runtime::Runtime;
use crate::{Error, ObjectRef};

/// How many items a worker may make ahead of what its caller consumed.
pub(crate) const WINDOW: u64 = 16;

/// The streams this process reads: items arrived and not yet taken.
#[derive(Default)]
pub(crate) struct Streams {
    st: Mutex<HashMap<ObjectId, Stream>>,
}

struct Stream {
    items: BTreeMap<u64, Arc<Handle>>,
    notify: Arc<Notify>,
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectId, Stream>> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, task: ObjectId) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.lock().insert(
            task,
            Stream {
                items: BTreeMap::new(),
                notify: notify.clone(),
            },
        );
        notify
    }

    /// An item arrived: it becomes an object this process owns, kept for the generator (or
    /// freed at once if the generator is gone).
    pub(crate) fn item(&self, owner: &Arc<Owner>, task: ObjectId, item: pb::StreamItem) {
        let Ok(j) = u32::try_from(item.index) else {
            return;
        };
        let state = item
            .value
            .as_ref()
            .and_then(crate::submit::value_state)
            .unwrap_or_else(|| State::Failed(Box::new(empty_item(task, j))));
        let h = owner.add(task.stream_item_id(j), state);
        let mut st = self.lock();
        if let Some(s) = st.get_mut(&task) {
            s.items.insert(item.index, h);
            s.notify.notify_waiters();
        }
    }

    fn take(&self, task: ObjectId, j: u64) -> Option<Arc<Handle>> {
        self.lock().get_mut(&task)?.items.remove(&j)
    }

    fn buffered(&self, task: ObjectId) -> usize {
        self.lock().get(&task).map_or(0, |s| s.items.len())
    }

    fn close(&self, task: ObjectId) {
        let s = self.lock().remove(&task);
        drop(s);
    }
}

fn empty_item(task: ObjectId, j: u32) -> crate::TaskError {
    crate::TaskError {
        kind: crate::TaskErrorKind::Store,
        message: format!("item {j} of streaming task {task} came without a value"),
        task_id: task.to_string(),
        function: String::new(),
        node_id: String::new(),
        worker_id: String::new(),
    }
}

/// The refs a streaming task yields, in order, as they are made (Ray's
/// `ObjectRefGenerator`). The iterator ends when the task has returned and every item was
/// read; a failure of the task comes as one `Err` after the items made before it.
pub struct ObjectRefGenerator<T> {
    end: ObjectRef<u64>,
    next: u64,
    notify: Arc<Notify>,
    rt: Arc<Runtime>,
    done: bool,
    _t: PhantomData<fn() -> T>,
}

impl<T> ObjectRefGenerator<T> {
    pub(crate) fn new(rt: Arc<Runtime>, end: ObjectRef<u64>) -> Self {
        let notify = rt.streams.open(end.id());
        Self {
            end,
            next: 0,
            notify,
            rt,
            done: false,
            _t: PhantomData,
        }
    }

    /// The task's id (its final value, the number of items, is under it).
    pub fn task_id(&self) -> ObjectId {
        self.end.id()
    }

    /// Items that arrived and were not read yet (at most the back-pressure window, 16).
    pub fn buffered(&self) -> usize {
        self.rt.streams.buffered(self.end.id())
    }
}

impl<T> Iterator for ObjectRefGenerator<T> {
    type Item = Result<ObjectRef<T>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let id = self.end.id();
        loop {
            // Registered before looking, so an item arriving in between wakes the wait.
            let notified = self.notify.clone().notified_owned();
            let mut notified = Box::pin(notified);
            notified.as_mut().enable();
            if let Some(h) = self.rt.streams.take(id, self.next) {
                self.next += 1;
                let _ = self
                    .rt
                    .submit_tx
                    .send(crate::submit::Event::StreamConsumed(id, self.next));
                return Some(Ok(ObjectRef::new(h)));
            }
            match self.rt.owner.state(id) {
                Some(State::Pending) => {}
                Some(State::Failed(e)) => {
                    self.done = true;
                    return Some(Err(crate::runtime::failed(*e)));
                }
                // Ended: every item came before the end, on the same stream.
                Some(_) => {
                    self.done = true;
                    return None;
                }
                None => {
                    self.done = true;
                    return Some(Err(Error::ObjectLost(
                        id,
                        "the stream's task is gone".into(),
                    )));
                }
            }
            let rt = self.rt.clone();
            let _unblock = rt.blocked(true);
            rt.block_on(async {
                let ready = Box::pin(rt.owner.ready(id, None));
                futures_util::future::select(notified, ready).await;
            });
        }
    }
}

impl<T> Drop for ObjectRefGenerator<T> {
    fn drop(&mut self) {
        self.rt.streams.close(self.end.id());
    }
}

impl<T> std::fmt::Debug for ObjectRefGenerator<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ObjectRefGenerator({}, next {})",
            self.end.id(),
            self.next
        )
    }
}
