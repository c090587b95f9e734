//! Task events: the owner's record of its tasks' state changes, for `rayctl list tasks`,
//! the dashboard and `ray_tasks`, sent to the node with each report (about once a second).
//!
//! Changes of one task within a report period merge into one record (as Ray's task event
//! buffer keeps one per task attempt): its latest state, the times it was created, pushed
//! to a worker and ended, and where. A task submitted, run and finished between two reports
//! costs one wire event instead of four, and one update of the node's table.
//!
//! A task carries the place of its record (`Slot`: the period and the index), so a change
//! costs no lookup; a slot of an earlier period starts a new record.
//!
//! Invariant: at most `MAX_TASKS` records wait; changes of other tasks beyond that are
//! counted as dropped (the node adds them to what `list tasks` says it lost).

use std::cell::Cell;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use protocol::pb::{self, TaskState};
use protocol::{ActorId, NodeId, ObjectId, WorkerId};

/// A change of a task's state, for its task event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note {
    /// When the change happened (the submitter's clock for the event it handles).
    pub(crate) time: Instant,
    pub(crate) id: ObjectId,
    pub(crate) function: &'static str,
    pub(crate) state: TaskState,
    /// Where it was pushed (none before).
    pub(crate) node: Option<NodeId>,
    pub(crate) worker: Option<WorkerId>,
    pub(crate) attempt: u32,
    pub(crate) error: String,
    pub(crate) actor: Option<ActorId>,
}

/// Tasks kept between two reports; beyond, their changes are counted as dropped.
const MAX_TASKS: usize = 200_000;

/// One task's state in this report period.
struct Rec {
    note: Note,
    /// Unix ms of the first change seen in this period (the node keeps the first it saw).
    created_ms: u64,
    /// When it was last pushed to a worker, and when it ended (0: not in this period).
    start_ms: u64,
    end_ms: u64,
    time_ms: u64,
}

struct Buf {
    recs: Vec<Rec>,
    dropped: u64,
    /// Counts the reports taken, so slots of earlier periods are told apart.
    period: u32,
    /// The wall clock at an instant of this period: a change's `Instant` becomes Unix ms
    /// without reading the clock again (read once per period, so it follows adjustments).
    epoch: (Instant, u64),
}

impl Buf {
    fn new(period: u32) -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            recs: Vec::new(),
            dropped: 0,
            period,
            epoch: (Instant::now(), ms),
        }
    }

    /// Unix ms of `t`.
    fn unix_ms(&self, t: Instant) -> u64 {
        let (at, ms) = self.epoch;
        match t.checked_duration_since(at) {
            Some(d) => ms + d.as_millis() as u64,
            None => ms.saturating_sub(at.duration_since(t).as_millis() as u64),
        }
    }
}

/// Where a task's record of the current period is (none yet: 0). Kept in the task; only
/// the thread holding the task touches it.
#[derive(Debug, Default)]
pub(crate) struct Slot(Cell<u64>);

impl Slot {
    /// The slot of a new task: none yet, or off if its events are not recorded
    /// (`enable_task_events = false`).
    pub(crate) fn new(record: bool) -> Self {
        Self(Cell::new(if record { 0 } else { u64::MAX }))
    }

    fn is_off(&self) -> bool {
        self.0.get() == u64::MAX
    }

    fn get(&self, period: u32) -> Option<usize> {
        let v = self.0.get();
        (v != 0 && (v >> 32) as u32 == period).then(|| (v & 0xffff_ffff) as usize - 1)
    }

    fn set(&self, period: u32, i: usize) {
        self.0.set(u64::from(period) << 32 | (i as u64 + 1));
    }
}

/// The buffer the submitter records into, and the report takes.
pub(crate) struct TaskLog(Mutex<Buf>);

impl Default for TaskLog {
    fn default() -> Self {
        Self(Mutex::new(Buf::new(0)))
    }
}

impl TaskLog {
    /// Records a change of the state of the task whose record `slot` places.
    pub(crate) fn record(&self, slot: &Slot, n: Note) {
        self.record_at(slot, n, None);
    }

    /// `record`, at Unix ms `at` instead of the note's time (tests).
    fn record_at(&self, slot: &Slot, n: Note, at: Option<u64>) {
        if slot.is_off() {
            return; // before the lock
        }
        let mut b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = at.unwrap_or_else(|| b.unix_ms(n.time));
        let (start, end) = match n.state {
            TaskState::SubmittedToWorker => (now, 0),
            TaskState::Finished | TaskState::Failed => (0, now),
            _ => (0, 0),
        };
        let period = b.period;
        if let Some(r) = slot
            .get(period)
            .and_then(|i| b.recs.get_mut(i))
            .filter(|r| r.note.id == n.id)
        {
            if start != 0 {
                // Pushed again (a retry): its earlier end no longer holds.
                r.start_ms = start;
                r.end_ms = 0;
            }
            if end != 0 {
                r.end_ms = end;
            }
            r.time_ms = now;
            let old = &mut r.note;
            old.state = n.state;
            old.attempt = old.attempt.max(n.attempt);
            if n.node.is_some() {
                old.node = n.node;
            }
            if n.worker.is_some() {
                old.worker = n.worker;
            }
            if n.actor.is_some() {
                old.actor = n.actor;
            }
            if !n.error.is_empty() {
                old.error = n.error;
            }
            return;
        }
        if b.recs.len() >= MAX_TASKS {
            b.dropped += 1;
            return;
        }
        slot.set(period, b.recs.len());
        b.recs.push(Rec {
            note: n,
            created_ms: now,
            start_ms: start,
            end_ms: end,
            time_ms: now,
        });
    }

    /// The records of this period as wire events (and how many changes were dropped), or
    /// `None` if there is nothing to report.
    pub(crate) fn take(&self, job_id: &str) -> Option<pb::TaskEvents> {
        let b = {
            let mut b = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let next = Buf::new(b.period.wrapping_add(1));
            std::mem::replace(&mut *b, next)
        };
        if b.recs.is_empty() && b.dropped == 0 {
            return None;
        }
        let pid = std::process::id();
        let events = b
            .recs
            .into_iter()
            .map(|r| pb::TaskEvent {
                task_id: r.note.id.to_string(),
                function: r.note.function.to_owned(),
                state: r.note.state as i32,
                node_id: r.note.node.map(|n| n.to_string()).unwrap_or_default(),
                worker_id: r
                    .note
                    .worker
                    .map(|w| w.as_str().to_owned())
                    .unwrap_or_default(),
                attempt: r.note.attempt,
                error: r.note.error,
                actor_id: r.note.actor.map(|a| a.to_string()).unwrap_or_default(),
                job_id: job_id.to_owned(),
                time_ms: r.time_ms,
                owner_pid: pid,
                created_ms: r.created_ms,
                start_ms: r.start_ms,
                end_ms: r.end_ms,
            })
            .collect();
        Some(pb::TaskEvents {
            events,
            dropped: b.dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(id: u8, state: TaskState, attempt: u32) -> Note {
        Note {
            time: Instant::now(),
            id: ObjectId::from_bytes([id; 20]),
            function: "f",
            state,
            node: None,
            worker: None,
            attempt,
            error: String::new(),
            actor: None,
        }
    }

    #[test]
    fn a_task_s_changes_in_one_period_are_one_event_with_every_time() {
        let log = TaskLog::default();
        let (s1, s2) = (Slot::default(), Slot::default());
        assert!(log.take("j").is_none(), "nothing to report");
        log.record_at(&s1, note(1, TaskState::PendingArgsAvail, 0), Some(100));
        log.record_at(&s2, note(2, TaskState::PendingArgsAvail, 0), Some(101));
        log.record_at(&s1, note(1, TaskState::PendingNodeAssignment, 0), Some(102));
        let at = Note {
            node: Some(protocol::NodeId::from_bytes([0xaa; 16])),
            worker: Some("w1".parse().expect("worker id")),
            ..note(1, TaskState::SubmittedToWorker, 0)
        };
        log.record_at(&s1, at, Some(103));
        log.record_at(&s1, note(1, TaskState::Finished, 0), Some(110));
        let ev = log.take("j").expect("events");
        assert_eq!(ev.events.len(), 2);
        let e = &ev.events[0];
        assert_eq!(e.task_id, ObjectId::from_bytes([1; 20]).to_string());
        assert_eq!(e.state(), TaskState::Finished);
        // Where it ran stays known after the later change that does not name it.
        assert_eq!(e.node_id, "aa".repeat(16));
        assert_eq!(e.worker_id, "w1");
        assert_eq!(
            (e.created_ms, e.start_ms, e.end_ms, e.time_ms),
            (100, 103, 110, 110)
        );
        assert_eq!((e.job_id.as_str(), e.function.as_str()), ("j", "f"));
        let e = &ev.events[1];
        assert_eq!(e.state(), TaskState::PendingArgsAvail);
        assert_eq!((e.created_ms, e.start_ms, e.end_ms), (101, 0, 0));
        assert!(log.take("j").is_none(), "taken");
        // The next period: the task's slot is stale, so its next change is a new record.
        log.record_at(&s2, note(2, TaskState::Finished, 0), Some(120));
        let ev = log.take("j").expect("events");
        assert_eq!(ev.events.len(), 1);
        let e = &ev.events[0];
        assert_eq!(e.state(), TaskState::Finished);
        assert_eq!((e.created_ms, e.end_ms), (120, 120));
    }

    #[test]
    fn a_change_is_stamped_with_the_wall_time_of_its_instant() {
        let log = TaskLog::default();
        let wall = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_millis() as u64
        };
        let before = wall(SystemTime::now());
        let s = Slot::default();
        let then = Instant::now() - std::time::Duration::from_millis(500);
        log.record(
            &s,
            Note {
                time: then,
                ..note(1, TaskState::SubmittedToWorker, 0)
            },
        );
        log.record(
            &s,
            Note {
                time: Instant::now(),
                ..note(1, TaskState::Finished, 0)
            },
        );
        let after = wall(SystemTime::now());
        let e = &log.take("j").expect("events").events[0];
        // Half a second before the first change, then now (the clock is read once per period,
        // so allow for a few milliseconds either way).
        assert!(
            e.start_ms + 500 + 20 >= before && e.start_ms + 500 <= after + 20,
            "{e:?} {before} {after}"
        );
        assert!(e.end_ms + 20 >= before && e.end_ms <= after + 20, "{e:?}");
        assert!(e.end_ms - e.start_ms >= 480, "{e:?}");
    }

    #[test]
    fn a_task_with_events_off_records_nothing() {
        let log = TaskLog::default();
        let off = Slot::new(false);
        log.record_at(&off, note(1, TaskState::PendingNodeAssignment, 0), Some(1));
        log.record_at(&off, note(1, TaskState::Finished, 0), Some(2));
        assert!(log.take("j").is_none());
        assert!(off.is_off(), "a later period does not turn it on");
    }

    #[test]
    fn a_retry_clears_the_end_and_keeps_the_failure_message() {
        let log = TaskLog::default();
        let s = Slot::default();
        log.record_at(&s, note(1, TaskState::SubmittedToWorker, 0), Some(10));
        let failed = Note {
            error: "WORKER_DIED: gone".into(),
            ..note(1, TaskState::Failed, 0)
        };
        log.record_at(&s, failed, Some(20));
        log.record_at(&s, note(1, TaskState::SubmittedToWorker, 1), Some(30));
        let ev = log.take("j").expect("events");
        let e = &ev.events[0];
        assert_eq!((e.state(), e.attempt), (TaskState::SubmittedToWorker, 1));
        assert_eq!((e.start_ms, e.end_ms), (30, 0));
        assert_eq!(e.error, "WORKER_DIED: gone");
    }

    #[test]
    fn beyond_the_bound_new_tasks_are_counted_as_dropped_but_known_ones_still_change() {
        let log = TaskLog::default();
        {
            let mut b = log.0.lock().expect("lock");
            for i in 0..MAX_TASKS as u64 {
                let mut id = [0u8; 20];
                id[..8].copy_from_slice(&i.to_be_bytes());
                let n = Note {
                    id: ObjectId::from_bytes(id),
                    ..note(0, TaskState::PendingArgsAvail, 0)
                };
                b.recs.push(Rec {
                    note: n,
                    created_ms: 1,
                    start_ms: 0,
                    end_ms: 0,
                    time_ms: 1,
                });
            }
        }
        let late = Slot::default();
        log.record_at(&late, note(0xff, TaskState::PendingArgsAvail, 0), Some(2));
        log.record_at(&late, note(0xff, TaskState::Finished, 0), Some(3));
        // A task already recorded (its slot says where) still changes.
        let first = Slot::default();
        first.set(0, 0);
        let id = ObjectId::from_bytes([0; 20]);
        log.record_at(
            &first,
            Note {
                id,
                ..note(0, TaskState::Finished, 0)
            },
            Some(4),
        );
        let ev = log.take("j").expect("events");
        assert_eq!(ev.events.len(), MAX_TASKS);
        assert_eq!(ev.dropped, 2);
        assert_eq!(ev.events[0].state(), TaskState::Finished);
    }
}
