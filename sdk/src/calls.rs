//! The calls running in this worker and the ones their callers cancelled: what
//! `sdk::context()` and `sdk::is_cancelled()` read, what tasks submitted from a call are
//! children of, and what a `CancelTask` from a caller finds.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use protocol::ObjectId;

thread_local! {
    /// The call running on this thread (set by the worker around each call).
    static RUNNING: RefCell<Option<(ObjectId, u32)>> = const { RefCell::new(None) };
}

/// The calls running now on any thread of this worker, the running ones its callers
/// cancelled, and the not yet started ones they cancelled (answered already: skipped).
#[derive(Default)]
struct Calls {
    running: Vec<ObjectId>,
    cancelled: HashSet<ObjectId>,
    skip: HashSet<ObjectId>,
}

static CALLS: LazyLock<Mutex<Calls>> = LazyLock::new(Mutex::default);

/// Cancels of calls that never came (or had just ended) are forgotten past this many.
const MAX_CANCELLED: usize = 100_000;

fn calls() -> std::sync::MutexGuard<'static, Calls> {
    CALLS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Call `task_id` starts on this thread: marked running until the guard drops. `None`:
/// its caller cancelled it before it started (and was answered then), so it must not run.
pub(crate) fn start(task_id: ObjectId, attempt: u32) -> Option<RunningGuard> {
    {
        let mut c = calls();
        if !c.skip.is_empty() && c.skip.remove(&task_id) {
            return None;
        }
        c.running.push(task_id);
    }
    RUNNING.with(|r| *r.borrow_mut() = Some((task_id, attempt)));
    Some(RunningGuard(task_id))
}

pub(crate) struct RunningGuard(ObjectId);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.with(|r| *r.borrow_mut() = None);
        let mut c = calls();
        if let Some(i) = c.running.iter().position(|x| *x == self.0) {
            c.running.swap_remove(i);
        }
        if !c.cancelled.is_empty() {
            c.cancelled.remove(&self.0);
        }
    }
}

/// The task running on this thread, if any (what tasks it submits are its children).
pub(crate) fn current_task() -> Option<ObjectId> {
    RUNNING.with(|r| r.borrow().map(|(id, _)| id))
}

/// A caller cancelled call `id`: if it runs, `is_cancelled` turns true for it and this
/// returns true; if not, it is skipped when it would start (the caller must be answered
/// now) and this returns false.
pub(crate) fn cancel_requested(id: ObjectId) -> bool {
    let mut c = calls();
    if c.running.contains(&id) {
        c.cancelled.insert(id);
        return true;
    }
    if c.skip.len() >= MAX_CANCELLED {
        c.skip.clear();
    }
    c.skip.insert(id);
    false
}

/// In a task or actor call: whether its caller cancelled it (`sdk::cancel`). A long task
/// should look now and then and return early; with `force` its worker is killed instead.
/// False outside a call.
pub fn is_cancelled() -> bool {
    current_task().is_some_and(|id| {
        let c = calls();
        !c.cancelled.is_empty() && c.cancelled.contains(&id)
    })
}

/// The call running on this thread and its attempt, if any.
pub(crate) fn current() -> Option<(ObjectId, u32)> {
    RUNNING.with(|r| *r.borrow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_call_is_per_thread_and_a_cancel_finds_it_or_skips_it() {
        let id = ObjectId::from_bytes([3; 20]);
        {
            let _g = start(id, 2).expect("not cancelled");
            assert_eq!(RUNNING.with(|r| *r.borrow()), Some((id, 2)));
            assert_eq!(current_task(), Some(id));
            assert!(!is_cancelled());
            assert!(cancel_requested(id), "running now");
            assert!(is_cancelled());
            std::thread::spawn(|| assert_eq!(RUNNING.with(|r| *r.borrow()), None))
                .join()
                .unwrap();
        }
        assert_eq!(
            RUNNING.with(|r| *r.borrow()),
            None,
            "cleared after the call"
        );
        assert!(!is_cancelled());
        // A cancel that comes before the call starts: it never starts, once.
        let next = ObjectId::from_bytes([4; 20]);
        assert!(!cancel_requested(next), "not running");
        assert!(start(next, 0).is_none());
        assert!(
            start(next, 0).is_some(),
            "a later call of the same id is not skipped"
        );
    }
}
