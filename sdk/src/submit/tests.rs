//! The submitter core's table tests: events in, effects and object states out, no sockets
//! and no clock (time is passed in).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use protocol::{ObjectId, pb};
use scheduler::ResourceSet;
use tokio::sync::mpsc;

use super::engine::{Effect, Engine, Event, Identity, Note, TimerEvent, Waiting};
use super::leases::{BUSY_RETRY, INFEASIBLE_RETRY, MAX_LEASE_FAILURES};
use super::state::Key;
use super::{ArgOut, LINGER, Lineage, MAX_PENDING_LEASES, PIPELINE, Task};
use crate::actor::ActorRef;
use crate::owner::{Handle, Loc, Owner, State};
use crate::runtime::Stats;
use crate::{Strategy, TaskErrorKind};

const HOME: &str = "home:1";

fn loc(n: &str) -> Loc {
    Loc {
        node_id: n.into(),
        om: format!("{n}:om"),
        nm: format!("{n}:nm"),
    }
}

struct T {
    core: Engine,
    /// The task events of the last `run`, each with whether its result was still pending.
    notes: Arc<Mutex<Vec<(Note, bool)>>>,
    owner: Arc<Owner>,
    stats: Arc<Stats>,
    now: Instant,
    next: u64,
    _freed: mpsc::UnboundedReceiver<(String, ObjectId)>,
    /// Handles of the tasks' results (the caller's `ObjectRef`s).
    results: Vec<Arc<Handle>>,
}

impl T {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let owner = Arc::new(Owner::new(tx));
        let stats = Arc::new(Stats::default());
        let home = Loc {
            node_id: "home".into(),
            om: "home:om".into(),
            nm: HOME.into(),
        };
        let notes: Arc<Mutex<Vec<(Note, bool)>>> = Arc::default();
        let (log, o) = (notes.clone(), owner.clone());
        let core = Engine::new(
            owner.clone(),
            stats.clone(),
            // Each event with whether its task's result was still pending when recorded.
            Arc::new(move |_slot: &crate::events::Slot, n: Note| {
                let pending = matches!(o.state(n.id), Some(State::Pending));
                log.lock().expect("notes").push((n, pending));
            }),
            home,
            Identity {
                binary: ("sha".into(), "src".into()),
                job_id: "job".into(),
                prefix: vec![9; 11],
            },
        );
        Self {
            core,
            notes,
            owner,
            stats,
            now: Instant::now(),
            next: 0,
            _freed: rx,
            results: Vec::new(),
        }
    }

    fn id(&mut self) -> ObjectId {
        self.next += 1;
        let mut b = [0u8; 20];
        b[12..].copy_from_slice(&self.next.to_be_bytes());
        ObjectId::from_bytes(b)
    }

    /// A task of `key` (its result registered as pending, with lineage, as `Runtime::submit`
    /// does).
    fn task(&mut self, key: &Arc<Key>, max_retries: u32, args: Vec<ArgOut>) -> Task {
        let id = self.id();
        let lineage = Arc::new(Lineage {
            function: "f",
            args: args.clone(),
            key: key.clone(),
            max_retries,
            retry_exceptions: false,
            num_returns: 1,
            events: true,
        });
        let h = self
            .owner
            .add_with_lineage(id, State::Pending, Some(lineage.clone()));
        self.results.push(h);
        lineage.task(id, 0)
    }

    /// Events in, then a flush: its effects.
    fn run(&mut self, evs: impl IntoIterator<Item = Event>) -> Vec<Effect> {
        self.notes.lock().expect("notes").clear();
        for e in evs {
            if matches!(e, Event::Submit(_)) {
                self.stats.pending_args.fetch_add(1, Ordering::Relaxed);
            }
            self.core.handle(e, self.now);
        }
        self.core.flush(self.now)
    }

    fn submit(&mut self, tasks: Vec<Task>) -> Vec<Effect> {
        self.run(tasks.into_iter().map(Event::Submit))
    }

    fn later(&mut self, d: Duration) -> Vec<Effect> {
        self.now += d;
        self.core.flush(self.now)
    }

    fn state(&self, id: ObjectId) -> State {
        self.owner.state(id).expect("known object")
    }

    fn failed(&self, id: ObjectId) -> crate::TaskError {
        match self.state(id) {
            State::Failed(e) => *e,
            s => panic!("{id} is not failed: {s:?}"),
        }
    }
}

const ACTOR_1: protocol::ActorId = protocol::ActorId::from_bytes([1; 16]);
const ACTOR_2: protocol::ActorId = protocol::ActorId::from_bytes([2; 16]);

fn cpu_shape() -> ResourceSet {
    ResourceSet::from_map([("CPU", 1.0)]).expect("valid")
}

fn cpu() -> Arc<Key> {
    Key::new(cpu_shape(), &Strategy::Default)
}

/// What `f` picks out of the effects, in order.
fn pick<T>(fx: &[Effect], f: impl Fn(&Effect) -> Option<T>) -> Vec<T> {
    fx.iter().filter_map(f).collect()
}

/// (request id, node asked, hops, backlog told) of every lease request.
fn lease_requests(fx: &[Effect]) -> Vec<(u64, String, u32, u32)> {
    pick(fx, |e| match e {
        Effect::RequestLease {
            req, addr, request, ..
        } => Some((*req, addr.clone(), request.spillback_count, request.backlog)),
        _ => None,
    })
}

fn reqs(fx: &[Effect]) -> Vec<u64> {
    lease_requests(fx).into_iter().map(|r| r.0).collect()
}

/// (connection, task ids, attempts) of every push.
fn pushes(fx: &[Effect]) -> Vec<(u64, Vec<ObjectId>, Vec<u32>)> {
    pick(fx, |e| match e {
        Effect::Push { conn, tasks } => Some((
            *conn,
            tasks
                .iter()
                .map(|t| ObjectId::from_slice(&t.task_id).expect("id"))
                .collect(),
            tasks.iter().map(|t| t.attempt).collect(),
        )),
        _ => None,
    })
}

fn pushed(fx: &[Effect]) -> Vec<ObjectId> {
    pushes(fx).into_iter().flat_map(|p| p.1).collect()
}

/// (connection, address, first message) of every stream opened.
fn opens(fx: &[Effect]) -> Vec<(u64, String, pb::PushTasksRequest, bool)> {
    pick(fx, |e| match e {
        Effect::Open {
            conn,
            address,
            first,
            direct,
        } => Some((*conn, address.clone(), first.clone(), *direct)),
        _ => None,
    })
}

fn closes(fx: &[Effect]) -> Vec<u64> {
    pick(fx, |e| match e {
        Effect::Close(c) => Some(*c),
        _ => None,
    })
}

fn cancels(fx: &[Effect]) -> Vec<u64> {
    pick(fx, |e| match e {
        Effect::CancelLease(r) => Some(*r),
        _ => None,
    })
}

/// (delay, request) of every timer.
fn timers(fx: &[Effect]) -> Vec<(Duration, u64)> {
    pick(fx, |e| match e {
        Effect::Timer {
            after,
            event: TimerEvent::LeaseRetry(r),
        } => Some((*after, *r)),
        _ => None,
    })
}

fn warnings(fx: &[Effect]) -> Vec<String> {
    pick(fx, |e| match e {
        Effect::Warn { key, .. } => Some(key.clone()),
        _ => None,
    })
}

/// (task, state, attempt) of every task event of the last `run`, in order.
fn notes(t: &T) -> Vec<(ObjectId, &'static str, u32)> {
    let n = t.notes.lock().expect("notes");
    n.iter()
        .map(|(n, _)| (n.id, protocol::task_state_name(n.state), n.attempt))
        .collect()
}

fn outcome(o: pb::LeaseOutcome) -> pb::LeaseReply {
    pb::LeaseReply {
        outcome: o as i32,
        ..Default::default()
    }
}

/// The node id of a node named `name` in these tests (its name's bytes, zero-padded).
fn nid(name: &str) -> String {
    let mut b = [0u8; 16];
    b[..name.len()].copy_from_slice(name.as_bytes());
    protocol::NodeId::from_bytes(b).to_string()
}

fn granted(req: u64, key: &Arc<Key>, node: &str) -> Event {
    Event::LeaseReply {
        req,
        key: key.clone(),
        addr: format!("{node}:nm"),
        reply: Ok(pb::LeaseReply {
            outcome: pb::LeaseOutcome::Granted as i32,
            lease_id: format!("lease-{req}"),
            node_id: nid(node),
            worker_id: format!("worker-{req}"),
            worker_address: format!("{node}:worker-{req}"),
            ..Default::default()
        }),
    }
}

fn answer(req: u64, key: &Arc<Key>, addr: &str, r: Result<pb::LeaseReply, String>) -> Event {
    Event::LeaseReply {
        req,
        key: key.clone(),
        addr: addr.into(),
        reply: r,
    }
}

fn value(id: ObjectId) -> pb::TaskReply {
    pb::TaskReply {
        task_id: id.as_bytes().to_vec(),
        result: Some(pb::task_reply::Result::Value(pb::Value {
            kind: Some(pb::value::Kind::Inline(Bytes::from_static(b"v"))),
            type_tag: "u64".into(),
            object_id: Vec::new(),
        })),
        contained: Vec::new(),
        more_returns: Vec::new(),
        item: None,
    }
}

fn error(id: ObjectId, kind: TaskErrorKind, lost: Option<ObjectId>) -> pb::TaskReply {
    pb::TaskReply {
        task_id: id.as_bytes().to_vec(),
        result: Some(pb::task_reply::Result::Error(pb::TaskError {
            kind: kind as i32,
            message: format!("{} happened", protocol::task_error_kind_name(kind)),
            task_id: id.to_string(),
            lost_object_id: lost.map(|l| l.as_bytes().to_vec()).unwrap_or_default(),
            ..Default::default()
        })),
        contained: Vec::new(),
        more_returns: Vec::new(),
        item: None,
    }
}

#[test]
fn a_lease_is_reused_by_the_next_task_and_returned_after_linger() {
    let mut t = T::new();
    let k = cpu();
    let a = t.task(&k, 0, vec![]);
    let a_id = a.id;
    let fx = t.submit(vec![a]);
    assert_eq!(notes(&t), vec![(a_id, "PENDING_NODE_ASSIGNMENT", 0)]);
    assert_eq!(lease_requests(&fx), vec![(1, HOME.to_string(), 0, 1)]);
    let fx = t.run([granted(1, &k, "n1")]);
    let (conn, address, first, direct) = opens(&fx).remove(0);
    assert_eq!(
        (address.as_str(), first.lease_id.as_str(), direct),
        ("n1:worker-1", "lease-1", false)
    );
    assert_eq!(pushes(&fx), vec![(conn, vec![a_id], vec![0])]);
    assert_eq!(t.stats.submitted.load(Ordering::Relaxed), 1);
    let fx = t.run([Event::Replies(conn, vec![value(a_id)])]);
    assert!(matches!(t.state(a_id), State::Inline { .. }));
    assert_eq!(notes(&t), vec![(a_id, "FINISHED", 0)]);
    assert!(
        t.notes.lock().expect("notes")[0].1,
        "the event is recorded before the result is visible (a driver may exit right after)"
    );
    assert!(closes(&fx).is_empty(), "kept for the next call");
    // The next task goes to the same worker without a lease request.
    t.now += LINGER / 2;
    let b = t.task(&k, 0, vec![]);
    let b_id = b.id;
    let fx = t.submit(vec![b]);
    assert!(reqs(&fx).is_empty(), "{fx:?}");
    assert_eq!(pushed(&fx), vec![b_id]);
    t.run([Event::Replies(conn, vec![value(b_id)])]);
    assert!(t.later(LINGER / 2).is_empty(), "idle for less than LINGER");
    assert_eq!(closes(&t.later(LINGER / 2)), vec![conn]);
    assert!(!t.core.has_idle());
    // With the lease returned, the next task asks for one again.
    let c = t.task(&k, 0, vec![]);
    assert_eq!(reqs(&t.submit(vec![c])).len(), 1);
    assert_eq!(t.stats.finished.load(Ordering::Relaxed), 2);
    assert_eq!(t.stats.submitted.load(Ordering::Relaxed), 0);
}

#[test]
fn tasks_pipeline_up_to_the_depth_per_lease_and_ask_for_the_leases_they_need() {
    let mut t = T::new();
    let k = cpu();
    let tasks: Vec<Task> = (0..40).map(|_| t.task(&k, 0, vec![])).collect();
    let ids: Vec<ObjectId> = tasks.iter().map(|t| t.id).collect();
    let fx = t.submit(tasks);
    // ceil(40 / 16) requests, each telling the nodes all 40 wait.
    assert_eq!(
        lease_requests(&fx)
            .iter()
            .map(|r| (r.1.as_str(), r.3))
            .collect::<Vec<_>>(),
        vec![(HOME, 40); 3]
    );
    let r = reqs(&fx);
    let fx = t.run([granted(r[0], &k, "n1")]);
    assert_eq!(pushed(&fx), ids[..PIPELINE].to_vec(), "in submission order");
    assert!(reqs(&fx).is_empty(), "24 wait and 2 requests are under way");
    // More tasks: more requests, at most MAX_PENDING_LEASES under way.
    let more: Vec<Task> = (0..200).map(|_| t.task(&k, 0, vec![])).collect();
    let fx = t.submit(more);
    assert_eq!(reqs(&fx).len(), MAX_PENDING_LEASES - 2);
    // A second lease fills to the depth too; a finished task makes room for one more.
    let fx = t.run([granted(r[1], &k, "n2")]);
    assert_eq!(pushes(&fx)[0].1, ids[PIPELINE..2 * PIPELINE].to_vec());
    let conn1 = *t.core.keys[&k].conns.first().expect("a lease");
    let fx = t.run([Event::Replies(conn1, vec![value(ids[0])])]);
    assert_eq!(pushes(&fx), vec![(conn1, vec![ids[2 * PIPELINE]], vec![0])]);
    // SPREAD: one task per lease.
    let spread = Key::new(cpu_shape(), &Strategy::Spread);
    let s: Vec<Task> = (0..3).map(|_| t.task(&spread, 0, vec![])).collect();
    let fx = t.submit(s);
    let r = reqs(&fx);
    assert_eq!(r.len(), 3);
    let fx = t.run([granted(r[0], &spread, "n3")]);
    assert_eq!(pushed(&fx).len(), 1);
}

#[test]
fn a_spillback_is_followed_and_counted_and_refusals_ask_again_from_home() {
    let mut t = T::new();
    let k = cpu();
    let a = t.task(&k, 0, vec![]);
    let fx = t.submit(vec![a]);
    let r = reqs(&fx)[0];
    let spill = pb::LeaseReply {
        outcome: pb::LeaseOutcome::Spillback as i32,
        address: "n2:nm".into(),
        ..Default::default()
    };
    let fx = t.run([answer(r, &k, HOME, Ok(spill.clone()))]);
    assert_eq!(lease_requests(&fx), vec![(r, "n2:nm".into(), 1, 1)]);
    let fx = t.run([answer(r, &k, "n2:nm", Ok(spill))]);
    assert_eq!(lease_requests(&fx)[0].2, 2, "hops counted");
    // Infeasible: the user is told, and it asks again from this node a second later.
    let fx = t.run([answer(
        r,
        &k,
        "n2:nm",
        Ok(outcome(pb::LeaseOutcome::Infeasible)),
    )]);
    assert_eq!(warnings(&fx), vec!["infeasible {CPU: 1}".to_string()]);
    assert_eq!(timers(&fx), vec![(INFEASIBLE_RETRY, r)]);
    assert!(reqs(&fx).is_empty());
    let fx = t.run([Event::LeaseRetry(r)]);
    assert_eq!(lease_requests(&fx), vec![(r, HOME.into(), 0, 1)]);
    // Timed out while none of these tasks runs: a warning; a spillback without an
    // address: just again.
    let fx = t.run([answer(r, &k, HOME, Ok(outcome(pb::LeaseOutcome::TimedOut)))]);
    assert_eq!(warnings(&fx), vec!["busy {CPU: 1}".to_string()]);
    assert_eq!(timers(&fx), vec![(BUSY_RETRY, r)]);
    let fx = t.run([answer(
        r,
        &k,
        HOME,
        Ok(outcome(pb::LeaseOutcome::Spillback)),
    )]);
    assert!(warnings(&fx).is_empty());
    assert_eq!(timers(&fx), vec![(BUSY_RETRY, r)]);
    // Granted at the node it spilled to: the lease names that node.
    let fx = t.run([granted(r, &k, "n2")]);
    let conn = opens(&fx)[0].0;
    assert_eq!(t.core.conns[&conn].lease.node_address, "n2:nm".into());
    assert!(t.core.leases.is_empty());
}

#[test]
fn failing_lease_rpcs_back_off_then_fail_the_waiting_tasks() {
    let mut t = T::new();
    let k = cpu();
    let a = t.task(&k, 0, vec![]);
    let a_id = a.id;
    let r = reqs(&t.submit(vec![a]))[0];
    let mut delays = Vec::new();
    for i in 0..MAX_LEASE_FAILURES {
        let fx = t.run([answer(r, &k, HOME, Err("connection refused".into()))]);
        if i + 1 < MAX_LEASE_FAILURES {
            let tm = timers(&fx);
            assert_eq!(tm.len(), 1, "{fx:?}");
            delays.push(tm[0].0.as_millis());
            t.run([Event::LeaseRetry(r)]);
        } else {
            assert!(timers(&fx).is_empty());
            assert!(reqs(&fx).is_empty(), "nothing waits any more");
        }
    }
    assert_eq!(
        delays,
        vec![100, 200, 400, 800, 1600, 2000, 2000, 2000, 2000]
    );
    let e = t.failed(a_id);
    assert_eq!(e.kind, TaskErrorKind::Scheduling);
    assert!(
        e.message
            .contains("10 lease requests failed, the last at home:1: connection refused"),
        "{}",
        e.message
    );
    // A success in between resets the count.
    let b = t.task(&k, 0, vec![]);
    let b_id = b.id;
    let r = reqs(&t.submit(vec![b]))[0];
    for _ in 0..MAX_LEASE_FAILURES - 1 {
        t.run([
            answer(r, &k, HOME, Err("refused".into())),
            Event::LeaseRetry(r),
        ]);
    }
    t.run([
        answer(r, &k, HOME, Ok(outcome(pb::LeaseOutcome::TimedOut))),
        Event::LeaseRetry(r),
    ]);
    t.run([answer(r, &k, HOME, Err("refused".into()))]);
    assert!(matches!(t.state(b_id), State::Pending));
}

#[test]
fn a_panic_is_retried_only_with_retry_exceptions_and_within_max_retries() {
    let mut t = T::new();
    let k = cpu();
    let mut a = t.task(&k, 1, vec![]);
    a.retry_exceptions = true;
    let b = t.task(&k, 1, vec![]);
    let (a_id, b_id) = (a.id, b.id);
    let r = reqs(&t.submit(vec![a, b]))[0];
    let fx = t.run([granted(r, &k, "n1")]);
    let conn = opens(&fx)[0].0;
    assert_eq!(pushed(&fx), vec![a_id, b_id]);
    let fx = t.run([Event::Replies(
        conn,
        vec![
            error(a_id, TaskErrorKind::Panic, None),
            error(b_id, TaskErrorKind::Panic, None),
        ],
    )]);
    // b did not ask for it: failed; a runs again (attempt 1) on the same lease.
    assert_eq!(t.failed(b_id).kind, TaskErrorKind::Panic);
    assert!(matches!(t.state(a_id), State::Pending));
    assert_eq!(pushes(&fx), vec![(conn, vec![a_id], vec![1])]);
    // Its second panic uses up max_retries=1.
    t.run([Event::Replies(
        conn,
        vec![error(a_id, TaskErrorKind::Panic, None)],
    )]);
    assert_eq!(t.failed(a_id).kind, TaskErrorKind::Panic);
    assert_eq!(t.stats.retries.load(Ordering::Relaxed), 1);
    assert_eq!(t.stats.pending_node.load(Ordering::Relaxed), 0);
}

#[test]
fn every_return_of_a_multi_return_task_completes_or_fails_with_it() {
    let mut t = T::new();
    let k = cpu();
    let mut a = t.task(&k, 0, vec![]);
    a.num_returns = 3;
    let mut b = t.task(&k, 0, vec![]);
    b.num_returns = 2;
    let (a_id, b_id) = (a.id, b.id);
    let (a1, a2, b1) = (a_id.return_id(1), a_id.return_id(2), b_id.return_id(1));
    assert!(a1 != a_id && a2 != a1 && b1 != a1);
    for id in [a1, a2, b1] {
        t.results.push(t.owner.add(id, State::Pending));
    }
    let r = reqs(&t.submit(vec![a, b]))[0];
    let fx = t.run([granted(r, &k, "n1")]);
    let conn = opens(&fx)[0].0;
    let mut ok = value(a_id);
    let v = |x: &'static [u8]| pb::Value {
        kind: Some(pb::value::Kind::Inline(Bytes::from_static(x))),
        type_tag: "u64".into(),
        object_id: Vec::new(),
    };
    ok.more_returns = vec![v(b"1"), v(b"2")];
    t.run([Event::Replies(
        conn,
        vec![ok, error(b_id, TaskErrorKind::Panic, None)],
    )]);
    for (id, want) in [(a_id, &b"v"[..]), (a1, b"1"), (a2, b"2")] {
        match t.state(id) {
            State::Inline { bytes, .. } => assert_eq!(&bytes[..], want),
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(t.failed(b_id).kind, TaskErrorKind::Panic);
    assert_eq!(t.failed(b1).kind, TaskErrorKind::Panic);
}

#[test]
fn a_dead_workers_tasks_are_retried_within_max_retries_and_the_rest_fail() {
    let mut t = T::new();
    let k = cpu();
    let a = t.task(&k, 1, vec![]);
    let b = t.task(&k, 0, vec![]);
    let (a_id, b_id) = (a.id, b.id);
    let r = reqs(&t.submit(vec![a, b]))[0];
    let fx = t.run([granted(r, &k, "n1")]);
    let conn = opens(&fx)[0].0;
    let fx = t.run([Event::Broken(conn, "node n1 died".into())]);
    // a again, attempt 1, on a new lease; b failed naming what happened.
    assert!(
        notes(&t).contains(&(a_id, "PENDING_NODE_ASSIGNMENT", 1)),
        "{fx:?}"
    );
    assert_eq!(reqs(&fx).len(), 1);
    let e = t.failed(b_id);
    assert_eq!(e.kind, TaskErrorKind::WorkerDied);
    assert!(
        e.message
            .contains("(node n1 died); 1 attempt(s) made, max_retries=0")
            && e.node_id == nid("n1")
            && e.worker_id == format!("worker-{r}"),
        "{e:?}"
    );
    assert!(matches!(t.state(a_id), State::Pending));
    let r2 = reqs(&fx)[0];
    let fx = t.run([granted(r2, &k, "n2")]);
    assert_eq!(pushes(&fx)[0].1, vec![a_id]);
    assert_eq!(pushes(&fx)[0].2, vec![1], "the attempt is sent");
    let conn2 = opens(&fx)[0].0;
    // Dead again: no retries left.
    t.run([Event::Broken(conn2, "gone".into())]);
    assert!(
        t.failed(a_id)
            .message
            .contains("2 attempt(s) made, max_retries=1")
    );
    assert_eq!(t.stats.retries.load(Ordering::Relaxed), 1);
    assert_eq!(t.stats.failed.load(Ordering::Relaxed), 2);
    assert_eq!(t.stats.submitted.load(Ordering::Relaxed), 0);
    assert_eq!(t.stats.pending_node.load(Ordering::Relaxed), 0);
}

#[test]
fn tasks_wait_for_pending_arguments_and_a_failed_one_fails_them() {
    let mut t = T::new();
    let k = cpu();
    let dep = t.id();
    let h = t.owner.add(dep, State::Pending);
    let a = t.task(&k, 0, vec![ArgOut::Ref(h.clone())]);
    let a_id = a.id;
    let fx = t.submit(vec![a]);
    assert!(reqs(&fx).is_empty());
    let waited = fx
        .into_iter()
        .find_map(|e| match e {
            Effect::WaitArgs {
                ids,
                then: Waiting::Task(t),
            } => Some((ids, t)),
            _ => None,
        })
        .expect("waits");
    assert_eq!(waited.0, vec![dep]);
    assert_eq!(t.stats.pending_args.load(Ordering::Relaxed), 1);
    // It failed meanwhile: the task fails with DEPENDENCY when it would be pushed.
    t.owner.complete(
        dep,
        State::Failed(Box::new(crate::TaskError {
            kind: TaskErrorKind::Panic,
            message: "boom".into(),
            task_id: dep.to_string(),
            function: "g".into(),
            node_id: String::new(),
            worker_id: String::new(),
        })),
    );
    let fx = t.run([Event::ArgsReady(waited.1)]);
    let r = reqs(&fx)[0];
    let fx = t.run([granted(r, &k, "n1")]);
    assert!(pushed(&fx).is_empty());
    let e = t.failed(a_id);
    assert_eq!(e.kind, TaskErrorKind::Dependency);
    assert!(e.message.contains("boom"), "{}", e.message);
    assert_eq!(t.stats.pending_args.load(Ordering::Relaxed), 0);
}

#[test]
fn a_lost_argument_is_rebuilt_from_its_lineage_and_the_task_runs_again() {
    let mut t = T::new();
    let k = cpu();
    // The argument: made by a task (lineage, max_retries 2), stored on n9.
    let made = t.task(&k, 2, vec![]);
    let arg = made.id;
    let h = t.results[0].clone();
    t.owner.complete(
        arg,
        State::Stored {
            tag: "u64".into(),
            locs: vec![loc("n9")],
        },
    );
    // And one made by put: no lineage.
    let put = t.id();
    let ph = t.owner.add(
        put,
        State::Stored {
            tag: "u64".into(),
            locs: vec![loc("n9")],
        },
    );
    let a = t.task(&k, 0, vec![ArgOut::Ref(h)]);
    let b = t.task(&k, 0, vec![ArgOut::Ref(ph)]);
    let (a_id, b_id) = (a.id, b.id);
    let r = reqs(&t.submit(vec![a, b]))[0];
    let fx = t.run([granted(r, &k, "n1")]);
    let conn = opens(&fx)[0].0;
    assert_eq!(pushed(&fx), vec![a_id, b_id]);
    let fx = t.run([Event::Replies(
        conn,
        vec![
            error(a_id, TaskErrorKind::ArgLost, Some(arg)),
            error(b_id, TaskErrorKind::ArgLost, Some(put)),
        ],
    )]);
    // The argument's task runs again (rebuild 1) on the lease that is there, and `a` waits
    // for it.
    assert!(matches!(t.state(arg), State::Pending));
    assert_eq!(pushes(&fx), vec![(conn, vec![arg], vec![1])]);
    let waiting = fx
        .into_iter()
        .find_map(|e| match e {
            Effect::WaitArgs {
                ids,
                then: Waiting::Task(t),
            } => Some((ids, t)),
            _ => None,
        })
        .expect("a waits for its argument");
    assert_eq!((waiting.0.clone(), waiting.1), (vec![arg], a_id));
    assert_eq!(t.stats.reconstructions.load(Ordering::Relaxed), 1);
    let e = t.failed(b_id);
    assert_eq!(e.kind, TaskErrorKind::ObjectLost);
    assert!(e.message.contains("made by put"), "{}", e.message);
    // Rebuilt: `a` runs again.
    t.run([Event::Replies(conn, vec![value(arg)])]);
    let fx = t.run([Event::ArgsReady(waiting.1)]);
    assert_eq!(pushed(&fx), vec![a_id]);
}

#[test]
fn abandoned_lease_requests_are_cancelled_and_a_late_grant_is_returned_after_linger() {
    let mut t = T::new();
    let k = cpu();
    let tasks: Vec<Task> = (0..20).map(|_| t.task(&k, 0, vec![])).collect();
    let ids: Vec<ObjectId> = tasks.iter().map(|t| t.id).collect();
    let r = reqs(&t.submit(tasks));
    assert_eq!(r.len(), 2);
    let fx = t.run([granted(r[0], &k, "n1")]);
    let conn = opens(&fx)[0].0;
    // The first 16 finish; the last 4 go to the same lease, and nothing waits any more.
    let fx = t.run([Event::Replies(
        conn,
        ids[..PIPELINE].iter().map(|i| value(*i)).collect(),
    )]);
    assert_eq!(pushed(&fx), ids[PIPELINE..].to_vec());
    assert_eq!(cancels(&fx), vec![r[1]]);
    // Its grant arrives anyway (it was under way): opened, given nothing, returned.
    let fx = t.run([granted(r[1], &k, "n2")]);
    let late = opens(&fx)[0].0;
    assert!(pushed(&fx).is_empty());
    t.run([Event::Replies(
        conn,
        ids[PIPELINE..].iter().map(|i| value(*i)).collect(),
    )]);
    let mut closed = closes(&t.later(LINGER));
    closed.sort();
    assert_eq!(closed, vec![conn, late]);
    // A refusal of an abandoned request changes nothing.
    let fx = t.run([answer(
        r[1],
        &k,
        HOME,
        Ok(outcome(pb::LeaseOutcome::Infeasible)),
    )]);
    assert!(fx.is_empty(), "{fx:?}");
}

fn actor(retries: i64) -> Arc<ActorRef> {
    Arc::new(ActorRef {
        id: ACTOR_1,
        class_name: "Counter".into(),
        max_task_retries: retries,
        scope: None,
    })
}

fn alive(restarts: u64) -> Event {
    Event::ActorResolved(
        ACTOR_1,
        Box::new(Ok(pb::ActorInfo {
            actor_id: ACTOR_1.to_string(),
            worker_address: format!("a:worker-{restarts}"),
            num_restarts: restarts,
            node_id: nid("n1"),
            worker_id: format!("w{restarts}"),
            state: pb::ActorState::Alive as i32,
            ..Default::default()
        })),
    )
}

fn actor_call(t: &mut T, a: &Arc<ActorRef>, args: Vec<ArgOut>) -> (Event, ObjectId) {
    let id = t.id();
    let h = t.owner.add(id, State::Pending);
    t.results.push(h);
    t.stats.pending_node.fetch_add(1, Ordering::Relaxed);
    let task = Task {
        id,
        function: "incr",
        args,
        key: Key::new(ResourceSet::new(), &Strategy::Default),
        attempt: 0,
        max_retries: 0,
        retry_exceptions: false,
        num_returns: 1,
        streaming: false,
        parent: None,
        ev: Default::default(),
    };
    (Event::ActorCall(a.clone(), Box::new(task)), id)
}

fn resolves(fx: &[Effect]) -> Vec<u64> {
    pick(fx, |e| match e {
        Effect::ResolveActor { min_restarts, .. } => Some(*min_restarts),
        _ => None,
    })
}

#[test]
fn actor_calls_go_in_order_on_one_stream_and_retry_on_the_next_incarnation() {
    let mut t = T::new();
    let a = actor(1);
    let calls: Vec<(Event, ObjectId)> = (0..3).map(|_| actor_call(&mut t, &a, vec![])).collect();
    let ids: Vec<ObjectId> = calls.iter().map(|c| c.1).collect();
    let fx = t.run(calls.into_iter().map(|c| c.0));
    assert_eq!(resolves(&fx), vec![0], "looked up once");
    let fx = t.run([alive(0)]);
    let (conn, address, first, direct) = opens(&fx).remove(0);
    assert_eq!(
        (
            address.as_str(),
            first.actor_id.as_str(),
            first.actor_restarts,
            direct
        ),
        ("a:worker-0", "01".repeat(16).as_str(), 0, true)
    );
    assert_eq!(pushes(&fx), vec![(conn, ids.clone(), vec![0, 0, 0])]);
    // The first call returns; the worker dies with two in flight: both go, in order, to
    // the next incarnation.
    t.run([Event::Replies(conn, vec![value(ids[0])])]);
    let fx = t.run([Event::Broken(conn, "worker died".into())]);
    assert_eq!(resolves(&fx), vec![1], "only a newer incarnation will do");
    let fx = t.run([alive(1)]);
    let conn2 = opens(&fx)[0].0;
    assert_eq!(pushes(&fx), vec![(conn2, ids[1..].to_vec(), vec![1, 1])]);
    // Again: no retries left. They fail once the actor's fate is known.
    let fx = t.run([Event::Broken(conn2, "worker died".into())]);
    assert_eq!(resolves(&fx), vec![2]);
    assert!(matches!(t.state(ids[1]), State::Pending));
    t.run([alive(2)]);
    let e = t.failed(ids[1]);
    assert_eq!(e.kind, TaskErrorKind::ActorUnavailable);
    assert!(e.message.contains("max_task_retries=1"), "{}", e.message);
    // A dead actor fails what is queued and what comes later.
    let (call, late) = actor_call(&mut t, &a, vec![]);
    let conn3 = *t.core.actor_conns.keys().next().expect("connected");
    t.run([Event::Broken(conn3, "gone".into())]);
    t.run([
        call,
        Event::ActorResolved(ACTOR_1, Box::new(Err("killed by the user".into()))),
    ]);
    let e = t.failed(late);
    assert_eq!(e.kind, TaskErrorKind::ActorDied);
    assert!(e.message.contains("killed by the user"), "{}", e.message);
}

#[test]
fn an_actor_call_waiting_for_an_argument_holds_back_the_calls_behind_it() {
    let mut t = T::new();
    let a = actor(0);
    let dep = t.id();
    let h = t.owner.add(dep, State::Pending);
    let (c0, id0) = actor_call(&mut t, &a, vec![]);
    let (c1, id1) = actor_call(&mut t, &a, vec![ArgOut::Ref(h)]);
    let (c2, id2) = actor_call(&mut t, &a, vec![]);
    t.run([c0, c1, c2]);
    let fx = t.run([alive(0)]);
    assert_eq!(pushed(&fx), vec![id0]);
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::WaitArgs {
            then: Waiting::Actor(_),
            ..
        }
    )));
    t.owner.complete(
        dep,
        State::Inline {
            bytes: Bytes::from_static(b"x"),
            tag: "u64".into(),
        },
    );
    let fx = t.run([Event::ActorArgsReady(ACTOR_1)]);
    assert_eq!(pushed(&fx), vec![id1, id2]);
}

#[test]
fn an_actor_out_of_scope_lets_go_of_its_scope_once_its_calls_have_returned() {
    let mut t = T::new();
    // A counted actor: its scope object says when no ref to it is left.
    let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = freed.clone();
    let scope_id = t.id();
    let scope = t.owner.add_scope(
        scope_id,
        Box::new(move || f.store(true, std::sync::atomic::Ordering::SeqCst)),
    );
    let a = Arc::new(ActorRef {
        scope: Some(crate::ObjectRef::new(scope)),
        ..Arc::try_unwrap(actor(0)).expect("one ref")
    });
    let (c0, id0) = actor_call(&mut t, &a, vec![]);
    // The last handle here goes; the call in flight keeps the scope.
    drop(a);
    t.run([c0]);
    let fx = t.run([alive(0)]);
    let conn = opens(&fx)[0].0;
    let fx = t.run([Event::ActorOutOfScope(ACTOR_1)]);
    assert!(closes(&fx).is_empty(), "a call is in flight");
    assert!(!freed.load(std::sync::atomic::Ordering::SeqCst));
    let fx = t.run([Event::Replies(conn, vec![value(id0)])]);
    assert_eq!(closes(&fx), vec![conn]);
    assert!(t.core.actors.is_empty() && t.core.actor_conns.is_empty());
    assert!(
        freed.load(std::sync::atomic::Ordering::SeqCst),
        "the queue's ref to the scope went with it"
    );
    // The engine does not kill on its own; the creator's scope being freed does.
    assert!(!fx.iter().any(|e| matches!(e, Effect::KillActor(_))));
    let fx = t.run([Event::ActorUnreferenced(ACTOR_1)]);
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::KillActor(id) if *id == ACTOR_1))
    );
    // An actor never called from here: nothing to let go of.
    assert!(t.run([Event::ActorOutOfScope(ACTOR_2)]).is_empty());
}

fn remote_cancels(fx: &[Effect]) -> Vec<(u64, ObjectId, bool, bool)> {
    pick(fx, |e| match e {
        Effect::CancelRemote {
            conn,
            task_id,
            force,
            recursive,
        } => Some((*conn, *task_id, *force, *recursive)),
        _ => None,
    })
}

fn cancel(id: ObjectId, force: bool, recursive: bool) -> Event {
    Event::Cancel(id, super::CancelOptions { force, recursive })
}

#[test]
fn a_task_cancelled_before_it_reaches_a_worker_never_runs() {
    let mut t = T::new();
    let k = cpu();
    // Waiting for an argument.
    let dep = t.id();
    let h = t.owner.add(dep, State::Pending);
    let a = t.task(&k, 3, vec![ArgOut::Ref(h)]);
    let a_id = a.id;
    t.submit(vec![a]);
    t.run([cancel(a_id, false, false)]);
    assert_eq!(t.failed(a_id).kind, TaskErrorKind::Cancelled);
    // Its argument arrives later: nothing happens.
    t.owner.complete(
        dep,
        State::Inline {
            bytes: Bytes::from_static(b"x"),
            tag: "u64".into(),
        },
    );
    let fx = t.run([Event::ArgsReady(a_id)]);
    assert!(reqs(&fx).is_empty() && pushed(&fx).is_empty(), "{fx:?}");
    assert_eq!(t.stats.pending_args.load(Ordering::Relaxed), 0);
    // Queued for a lease: dropped, and the lease request with it.
    let b = t.task(&k, 3, vec![]);
    let b_id = b.id;
    let r = reqs(&t.submit(vec![b]));
    let fx = t.run([cancel(b_id, false, false)]);
    assert_eq!(t.failed(b_id).kind, TaskErrorKind::Cancelled);
    assert_eq!(cancels(&fx), r);
    let fx = t.run([granted(r[0], &k, "n1")]);
    assert!(pushed(&fx).is_empty());
    assert_eq!(t.stats.pending_node.load(Ordering::Relaxed), 0);
}

#[test]
fn a_task_at_a_worker_is_told_and_a_forced_one_is_not_retried() {
    let mut t = T::new();
    let k = cpu();
    let a = t.task(&k, 3, vec![]);
    let b = t.task(&k, 3, vec![]);
    let c = t.task(&k, 3, vec![]);
    let (a_id, b_id, c_id) = (a.id, b.id, c.id);
    let r = reqs(&t.submit(vec![a, b, c]))[0];
    let conn = opens(&t.run([granted(r, &k, "n1")]))[0].0;
    let fx = t.run([cancel(a_id, true, false), cancel(b_id, false, true)]);
    assert_eq!(
        remote_cancels(&fx),
        vec![(conn, a_id, true, false), (conn, b_id, false, true)]
    );
    // b finished before its cancel got there: its result stands.
    t.run([Event::Replies(conn, vec![value(b_id)])]);
    assert!(matches!(t.state(b_id), State::Inline { .. }));
    // a's worker exits (forced): a fails CANCELLED although it had retries; c, which was
    // not cancelled, is retried.
    let fx = t.run([Event::Broken(conn, "the worker exited".into())]);
    let e = t.failed(a_id);
    assert_eq!(e.kind, TaskErrorKind::Cancelled);
    assert_eq!(e.node_id, nid("n1"));
    assert!(matches!(t.state(c_id), State::Pending));
    assert_eq!(reqs(&fx).len(), 1, "c asks for a new lease");
    // A cancel after the end changes nothing.
    let fx = t.run([cancel(b_id, true, true)]);
    assert!(fx.is_empty(), "{fx:?}");
}

#[test]
fn a_cancelled_parent_cancels_what_it_submitted_wherever_it_is() {
    let mut t = T::new();
    let k = cpu();
    let parent = t.id();
    let other = t.id();
    let child = |t: &mut T, p: ObjectId, args: Vec<ArgOut>| {
        let mut task = t.task(&k, 0, args);
        task.parent = Some(p);
        task
    };
    // One child at a worker, one queued, one waiting for an argument; one of another
    // parent.
    let at_worker = child(&mut t, parent, vec![]);
    let at_worker_id = at_worker.id;
    let r = reqs(&t.submit(vec![at_worker]))[0];
    let conn = opens(&t.run([granted(r, &k, "n1")]))[0].0;
    let queued: Vec<Task> = (0..PIPELINE)
        .map(|_| child(&mut t, parent, vec![]))
        .collect();
    let queued_ids: Vec<ObjectId> = queued.iter().map(|t| t.id).collect();
    t.submit(queued);
    let dep = t.id();
    let h = t.owner.add(dep, State::Pending);
    let waiting = child(&mut t, parent, vec![ArgOut::Ref(h)]);
    let waiting_id = waiting.id;
    let stranger = child(&mut t, other, vec![]);
    let stranger_id = stranger.id;
    t.submit(vec![waiting, stranger]);
    let fx = t.run([Event::CancelChildren {
        parent,
        force: true,
    }]);
    let told = remote_cancels(&fx);
    assert!(told.contains(&(conn, at_worker_id, true, true)), "{told:?}");
    assert_eq!(told.len(), PIPELINE, "every child at the worker is told");
    assert_eq!(t.failed(waiting_id).kind, TaskErrorKind::Cancelled);
    // 15 of the queued ones went to the worker behind at_worker and the last one waited:
    // every child is cancelled wherever it was; the stranger is not.
    for id in &queued_ids {
        match t.state(*id) {
            State::Failed(e) => assert_eq!(e.kind, TaskErrorKind::Cancelled),
            State::Pending => assert!(
                remote_cancels(&fx).iter().any(|c| c.1 == *id),
                "{id} pushed and told"
            ),
            s => panic!("{s:?}"),
        }
    }
    assert!(matches!(t.state(stranger_id), State::Pending));
}

#[test]
fn a_queued_actor_call_is_dropped_and_a_sent_one_only_told() {
    let mut t = T::new();
    let a = actor(0);
    let (c0, id0) = actor_call(&mut t, &a, vec![]);
    let (c1, id1) = actor_call(&mut t, &a, vec![]);
    t.run([c0, c1]);
    // Not connected yet: both queued; cancel the second.
    t.run([cancel(id1, true, false)]);
    assert_eq!(t.failed(id1).kind, TaskErrorKind::Cancelled);
    let fx = t.run([alive(0)]);
    let conn = opens(&fx)[0].0;
    assert_eq!(pushed(&fx), vec![id0]);
    let fx = t.run([cancel(id0, true, false)]);
    assert_eq!(
        remote_cancels(&fx),
        vec![(conn, id0, false, false)],
        "never forced"
    );
}

#[test]
fn keys_built_apart_from_equal_options_share_one_queue_and_others_do_not() {
    use std::collections::HashMap;
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    let (a, b) = (
        Key::new(cpu_shape(), &Strategy::Default),
        Key::new(cpu_shape(), &Strategy::Default),
    );
    assert!(!Arc::ptr_eq(&a, &b));
    assert_eq!(a, b);
    let s = RandomState::new();
    assert_eq!(s.hash_one(&a), s.hash_one(&b));
    assert_ne!(a, Key::new(cpu_shape(), &Strategy::Spread));
    assert_ne!(a, Key::new(ResourceSet::new(), &Strategy::Default));
    let mut keys: HashMap<Arc<Key>, u32> = HashMap::new();
    *keys.entry(a).or_default() += 1;
    *keys.entry(b).or_default() += 1;
    assert_eq!(keys.values().copied().collect::<Vec<_>>(), vec![2]);
}

#[test]
fn a_grant_naming_bad_ids_is_not_used_and_the_request_is_retried() {
    let mut t = T::new();
    let k = cpu();
    let a = t.task(&k, 0, vec![]);
    let a_id = a.id;
    t.submit(vec![a]);
    let mut bad = granted(1, &k, "n1");
    if let Event::LeaseReply { reply: Ok(r), .. } = &mut bad {
        r.worker_id = "worker/1".into();
    }
    let fx = t.run([bad]);
    assert!(opens(&fx).is_empty() && pushes(&fx).is_empty(), "{fx:?}");
    assert_eq!(timers(&fx).len(), 1, "asked again later: {fx:?}");
    assert!(matches!(t.state(a_id), State::Pending));
    // The retry's grant is used.
    let fx = t.run([Event::LeaseRetry(1)]);
    assert_eq!(reqs(&fx), vec![1]);
    let fx = t.run([granted(1, &k, "n1")]);
    assert_eq!(pushed(&fx), vec![a_id]);
}
