//! A driver for the actor tests: each subcommand exercises one behaviour of actors against
//! the cluster named by `RAYCTL_ADDRESS` and prints `RESULT <json>` lines the tests read; a
//! line on stdin moves an interactive subcommand to its next step. Workers are this binary
//! re-executed by the nodes.

use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sdk::{ActorOptions, Error, PlacementGroupOptions, PlacementStrategy, Strategy, TaskOptions};

pub struct Counter {
    n: i64,
    log: Vec<i64>,
}

#[sdk::actor]
impl Counter {
    fn new(start: i64) -> Self {
        Counter {
            n: start,
            log: Vec::new(),
        }
    }

    fn incr(&mut self, by: i64) -> i64 {
        self.n += by;
        self.log.push(by);
        self.n
    }

    fn get(&self) -> i64 {
        self.n
    }

    fn slow_incr(&mut self, ms: u64) -> i64 {
        std::thread::sleep(Duration::from_millis(ms));
        self.n += 1;
        self.n
    }

    fn calls(&self) -> u64 {
        self.log.len() as u64
    }

    fn node(&self) -> String {
        std::env::var("RAYCTL_NODE_ID").unwrap_or_default()
    }

    /// `incr`, answering "<value> <node id>" so a caller knows which copy answered.
    fn incr_at(&mut self, by: i64) -> String {
        self.n += by;
        self.log.push(by);
        format!(
            "{} {}",
            self.n,
            std::env::var("RAYCTL_NODE_ID").unwrap_or_default()
        )
    }

    fn fail(&self, msg: String) -> i64 {
        panic!("{msg}")
    }
}

pub struct Sleeper {
    now: AtomicUsize,
    max: AtomicUsize,
}

#[sdk::actor]
impl Sleeper {
    fn new() -> Self {
        Sleeper {
            now: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
        }
    }

    /// Sleeps; returns how many calls ran at once at most so far.
    fn nap(&self, ms: u64) -> u64 {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(ms));
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.max.load(Ordering::SeqCst) as u64
    }
}

pub struct Broken;

#[sdk::actor]
impl Broken {
    fn new(msg: String) -> Self {
        panic!("{msg}")
    }

    fn never(&self) -> i64 {
        0
    }
}

#[sdk::remote]
fn where_am_i() -> String {
    std::env::var("RAYCTL_NODE_ID").unwrap_or_default()
}

#[sdk::remote]
fn slow_one(ms: u64) -> i64 {
    std::thread::sleep(Duration::from_millis(ms));
    1
}

/// Calls an actor from inside a task: the task's worker is a caller too.
#[sdk::remote]
fn call_from_task(name: String) -> i64 {
    let c = CounterHandle::get_actor(&name, None).expect("find the actor by name");
    sdk::get(&c.incr(100i64)).expect("call from a task")
}

/// Increments a counter it was handed `n` times; answers the last value and where it ran.
#[sdk::remote]
fn bump(c: CounterHandle, n: u64) -> (i64, String) {
    let mut last = 0;
    for _ in 0..n {
        last = sdk::get(&c.incr(1i64)).expect("incr through a passed handle");
    }
    (last, std::env::var("RAYCTL_NODE_ID").unwrap_or_default())
}

static KEPT: std::sync::Mutex<Vec<CounterHandle>> = std::sync::Mutex::new(Vec::new());

/// Keeps the handle in this worker past the call and writes the worker's pid to `path`.
#[sdk::remote]
fn keep_counter(c: CounterHandle, path: String) -> i64 {
    let v = sdk::get(&c.incr(1i64)).expect("incr");
    KEPT.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, std::process::id().to_string()).expect("write pid");
    std::fs::rename(&tmp, &path).expect("rename pid file");
    v
}

/// Makes a counter and returns its handle (the actor's creator is this worker).
#[sdk::remote]
fn make_counter(start: i64) -> CounterHandle {
    Counter::remote(start).expect("create a counter in a task")
}

fn result(v: serde_json::Value) {
    println!("RESULT {v}");
}

fn stdin_line() {
    let _ = std::io::stdin().lock().lines().next();
}

fn kind(e: &Error) -> String {
    match e {
        Error::ActorDied(_) => "ActorDied".into(),
        Error::ActorUnavailable(_) => "ActorUnavailable".into(),
        Error::Actor(_) => "Actor".into(),
        Error::Task(t) => format!("Task:{}", t.kind_name()),
        other => format!("{other:?}"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _session = sdk::init()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(0).as_str() {
        "counter" => {
            // N calls from one caller keep their order and the actor keeps its state; every
            // 1000th call waits for a slow task's result, and the calls behind it wait too.
            let n: i64 = arg(1).parse()?;
            let c = Counter::remote(0i64)?;
            let refs: Vec<_> = (0..n)
                .map(|i| {
                    if i % 1000 == 500 {
                        c.incr(slow_one::remote(200u64))
                    } else {
                        c.incr(1i64)
                    }
                })
                .collect();
            let got = sdk::get_all(&refs)?;
            let ordered = got.iter().enumerate().all(|(i, v)| *v == i as i64 + 1);
            result(serde_json::json!({
                "ordered": ordered, "last": got.last(), "get": sdk::get(&c.get())?, "calls": sdk::get(&c.calls())?,
            }));
        }
        "restart" => {
            // Placed on a node with the `slot` resource; the test kills that node twice.
            let opts = ActorOptions::default()
                .max_restarts(1)
                .resource("slot", 1.0);
            let c = Counter::remote_with(&opts, 0i64)?;
            for _ in 0..10 {
                c.incr(1i64);
            }
            let v = sdk::get(&c.get())?;
            let info = c.handle().ready(Duration::from_secs(60))?;
            result(
                serde_json::json!({"value": v, "node": sdk::get(&c.node())?, "restarts": info.num_restarts}),
            );
            stdin_line();
            // The node died: the actor restarts on the other one, from its constructor. (A
            // call made before the restart, while the old worker was dying, could fail with
            // ActorUnavailable: max_task_retries is 0.)
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !c
                .handle()
                .info()
                .is_ok_and(|i| i.num_restarts >= 1 && i.state == sdk::ActorState::Alive)
            {
                if std::time::Instant::now() > deadline {
                    return Err("the actor did not restart within 120 s".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let v = sdk::get_timeout(&c.incr(1i64), Some(Duration::from_secs(120)))?;
            let info = c.handle().info()?;
            result(
                serde_json::json!({"value": v, "node": sdk::get(&c.node())?, "restarts": info.num_restarts}),
            );
            stdin_line();
            // No restart left.
            let r = sdk::get_timeout(&c.incr(1i64), Some(Duration::from_secs(120)));
            let info = c.handle().info()?;
            match r {
                Err(e) => result(
                    serde_json::json!({"error": kind(&e), "message": e.to_string(), "state": format!("{:?}", info.state)}),
                ),
                Ok(v) => result(serde_json::json!({"unexpected_value": v})),
            }
        }
        "named" => {
            let opts = ActorOptions::default().name("counter-a").namespace("ns1");
            let a = Counter::remote_with(&opts, 5i64)?;
            let found = CounterHandle::get_actor("counter-a", Some("ns1"))?;
            let same_state = sdk::get(&found.get())?;
            let other_ns = CounterHandle::get_actor("counter-a", None)
                .err()
                .map(|e| kind(&e));
            let dup = Counter::remote_with(&opts, 0i64)
                .err()
                .map(|e| e.to_string());
            let again = Counter::remote_with(&opts.clone().get_if_exists(true), 0i64)?;
            let wrong_class = SleeperHandle::get_actor("counter-a", Some("ns1"))
                .err()
                .map(|e| e.to_string());
            // A task finds it by name too (namespace "default": make one there).
            let d = Counter::remote_with(&ActorOptions::default().name("counter-d"), 1i64)?;
            let from_task = sdk::get(&call_from_task::remote("counter-d".to_string()))?;
            // A panicking method is an error for that call only.
            let panicked = sdk::get(&a.fail("method boom".to_string()))
                .err()
                .map(|e| e.to_string());
            let after_panic = sdk::get(&a.incr(1i64))?;
            // Killed for good: calls fail with ActorDied, the name is free.
            a.handle().kill(true)?;
            let after_kill = sdk::get_timeout(&a.incr(1i64), Some(Duration::from_secs(60)))
                .err()
                .map(|e| kind(&e));
            let lookup_after_kill = CounterHandle::get_actor("counter-a", Some("ns1"))
                .err()
                .map(|e| kind(&e));
            // A constructor that panics: the actor is dead and says why.
            let b = Broken::remote("ctor boom".to_string())?;
            let ctor = sdk::get_timeout(&b.never(), Some(Duration::from_secs(60)))
                .err()
                .map(|e| (kind(&e), e.to_string()));
            result(serde_json::json!({
                "same_state": same_state, "same_id": again.handle().actor_id() == a.handle().actor_id(),
                "found_id": found.handle().actor_id() == a.handle().actor_id(),
                "other_ns": other_ns, "dup": dup, "wrong_class": wrong_class,
                "from_task": from_task, "d_after": sdk::get(&d.get())?,
                "panicked": panicked, "after_panic": after_panic,
                "after_kill": after_kill, "lookup_after_kill": lookup_after_kill, "ctor": ctor,
            }));
        }
        "concurrency" => {
            let par = Sleeper::remote_with(&ActorOptions::default().max_concurrency(4))?;
            let refs: Vec<_> = (0..4).map(|_| par.nap(400u64)).collect();
            let par_max = sdk::get_all(&refs)?.into_iter().max();
            let ser = Sleeper::remote()?;
            let refs: Vec<_> = (0..4).map(|_| ser.nap(100u64)).collect();
            let ser_max = sdk::get_all(&refs)?.into_iter().max();
            result(serde_json::json!({"parallel_max": par_max, "serial_max": ser_max}));
        }
        "lifetime" => {
            // One actor that dies with this driver, one detached that outlives it.
            let owned = Counter::remote(0i64)?;
            let detached =
                Counter::remote_with(&ActorOptions::default().detached(true).name("keeper"), 0i64)?;
            sdk::get(&owned.incr(1i64))?;
            sdk::get(&detached.incr(1i64))?;
            result(
                serde_json::json!({"owned": owned.handle().actor_id(), "detached": detached.handle().actor_id()}),
            );
            // Exit holding the handles, as a driver that dies would: the owned actor must die
            // because its owner did (dropping the handle would end it first).
            std::mem::forget(owned);
        }
        "many" => {
            // Many actors at once, each in its own worker process.
            let n: usize = arg(1).parse()?;
            let actors: Vec<CounterHandle> = (0..n)
                .map(|i| Counter::remote(i as i64))
                .collect::<Result<_, _>>()?;
            let refs: Vec<_> = actors.iter().map(|a| a.incr(1i64)).collect();
            let got = sdk::get_all(&refs)?;
            let ok = got.iter().enumerate().all(|(i, v)| *v == i as i64 + 1);
            result(serde_json::json!({"ok": ok, "n": got.len()}));
        }
        "create-many" => {
            // Creates N detached actors (on nodes with `slot`) one by one; says so after the
            // first few so the test can kill the leader head while the rest are created.
            let n: i64 = arg(1).parse()?;
            let opts = ActorOptions::default()
                .detached(true)
                .resource("slot", 0.01);
            let mut actors = Vec::new();
            for i in 0..n {
                actors.push(Counter::remote_with(&opts, i * 1000)?);
                if i == 2 {
                    result(serde_json::json!({"phase": "creating"}));
                }
                if i >= 2 {
                    // Spread the rest over a second or so: the kill lands among them.
                    std::thread::sleep(Duration::from_millis(60));
                }
            }
            let mut values = Vec::new();
            for (i, a) in actors.iter().enumerate() {
                a.handle().ready(Duration::from_secs(180))?;
                values.push(
                    sdk::get_timeout(&a.incr(1i64), Some(Duration::from_secs(120)))?
                        == i as i64 * 1000 + 1,
                );
            }
            let ids: Vec<sdk::ActorId> = actors.iter().map(|a| a.handle().actor_id()).collect();
            result(serde_json::json!({"ok": values.iter().all(|v| *v), "ids": ids}));
        }
        "pg" => {
            // One bundle per node; tasks and an actor run in their bundles; a group that
            // cannot fit waits and says why; the group is placed again when a node dies.
            let cpu = |n: f64| {
                [("CPU".to_string(), n)]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>()
            };
            let pg = sdk::placement_group(
                vec![cpu(1.0); 3],
                &PlacementGroupOptions::new(PlacementStrategy::StrictSpread),
            )?;
            let nodes: Vec<String> = pg
                .ready(Duration::from_secs(120))?
                .iter()
                .map(|n| n.to_string())
                .collect();
            let in_bundle = |i| {
                TaskOptions::default().strategy(Strategy::PlacementGroup {
                    pg: pg.clone(),
                    bundle: Some(i),
                })
            };
            let refs: Vec<_> = (0..3)
                .map(|i| where_am_i::remote_with(&in_bundle(i)))
                .collect();
            let task_nodes = sdk::get_all(&refs)?;
            let any = TaskOptions::default().strategy(Strategy::PlacementGroup {
                pg: pg.clone(),
                bundle: None,
            });
            let any_node = sdk::get(&where_am_i::remote_with(&any))?;
            let a =
                Counter::remote_with(&ActorOptions::default().placement_group(&pg, Some(1)), 0i64)?;
            let actor_node = sdk::get(&a.node())?;
            let big = sdk::placement_group(
                vec![cpu(1.0); 9],
                &PlacementGroupOptions::new(PlacementStrategy::StrictSpread),
            )?;
            let waiting = big
                .ready(Duration::from_secs(3))
                .err()
                .map(|e| e.to_string());
            let big_info = big.info()?;
            result(serde_json::json!({
                "nodes": nodes, "task_nodes": task_nodes, "any_node": any_node, "actor_node": actor_node,
                "waiting": waiting, "big_state": big_info.state, "big_message": big_info.message,
            }));
            // The test kills the node of a bundle and says which.
            let mut killed = String::new();
            std::io::stdin().lock().read_line(&mut killed)?;
            let killed = killed.trim().to_owned();
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            let again = loop {
                let i = pg.info()?;
                let placed: Vec<String> = i
                    .bundle_nodes
                    .iter()
                    .flatten()
                    .map(|n| n.to_string())
                    .collect();
                if i.state == "CREATED" && placed.len() == 3 && !placed.contains(&killed) {
                    break placed;
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!("not placed again: {i:?}").into());
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let moved = sdk::get_all(
                &(0..3)
                    .map(|i| where_am_i::remote_with(&in_bundle(i)))
                    .collect::<Vec<_>>(),
            )?;
            pg.remove()?;
            big.remove()?;
            result(
                serde_json::json!({"nodes": again, "task_nodes": moved, "removed": pg.info()?.state}),
            );
        }
        "introspect" => {
            // Something of each kind for `rayctl list`, `summary` and `memory` to show.
            // First outlive the driver's first report (after one second), so the test sees
            // that reporting goes on past it (it once stopped there).
            std::thread::sleep(Duration::from_millis(1500));
            let c = Counter::remote_with(&ActorOptions::default().name("intro"), 0i64)?;
            for _ in 0..3 {
                sdk::get(&c.incr(1i64))?;
            }
            let failed = sdk::get(&c.fail("for the list".to_string())).is_err();
            let tasks: Vec<_> = (0..5).map(|_| where_am_i::remote()).collect();
            sdk::get_all(&tasks)?;
            let big = sdk::put(&vec![7u8; 1 << 20])?;
            let _stuck =
                Counter::remote_with(&ActorOptions::default().resource("unobtainium", 1.0), 0i64)?;
            let cpu = [("CPU".to_string(), 0.5)]
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>();
            let pg = sdk::placement_group(
                vec![cpu],
                &PlacementGroupOptions::new(PlacementStrategy::Pack).name("intro-pg"),
            )?;
            pg.ready(Duration::from_secs(60))?;
            // A group no node can hold waits (its bundles are reported as demand).
            let rare = [("unobtainium".to_string(), 1.0)]
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>();
            let _stuck_pg = sdk::placement_group(
                vec![rare.clone(), rare],
                &PlacementGroupOptions::new(PlacementStrategy::StrictSpread).name("intro-stuck"),
            )?;
            // Let the task events reach the node (reported every second).
            std::thread::sleep(Duration::from_millis(2500));
            result(
                serde_json::json!({"actor": c.handle().actor_id(), "object": big.id().to_string(), "pg": pg.id(), "failed": failed, "pid": std::process::id()}),
            );
            stdin_line();
            drop(big);
        }
        "stuck" => {
            // An actor no node can host, and a call that waits for it.
            let c =
                Counter::remote_with(&ActorOptions::default().resource("unobtainium", 1.0), 0i64)?;
            let call = c.incr(1i64);
            result(serde_json::json!({"actor": c.handle().actor_id()}));
            stdin_line();
            drop(call);
        }
        "zombie" => {
            let opts = ActorOptions::default()
                .max_restarts(1)
                .resource("slot", 1.0);
            let c = Counter::remote_with(&opts, 0i64)?;
            for _ in 0..5 {
                c.incr(1i64);
            }
            let v = sdk::get(&c.get())?;
            let info = c.handle().ready(Duration::from_secs(60))?;
            result(
                serde_json::json!({"value": v, "pid": info.pid, "node": info.node_id.map(|n| n.to_string())}),
            );
            stdin_line();
            // Its node was frozen and declared dead: the copy restarted elsewhere answers.
            let v = sdk::get_timeout(&c.incr(1i64), Some(Duration::from_secs(120)))?;
            let info = c.handle().info()?;
            result(
                serde_json::json!({"value": v, "pid": info.pid, "restarts": info.num_restarts, "node": info.node_id.map(|n| n.to_string())}),
            );
            stdin_line();
            let v = sdk::get_timeout(&c.incr(1i64), Some(Duration::from_secs(60)))?;
            let info = c.handle().info()?;
            result(serde_json::json!({"value": v, "pid": info.pid, "restarts": info.num_restarts}));
        }
        "retries" => {
            // A call in flight when the actor's worker is killed: retried on the restarted
            // actor with max_task_retries=1, ActorUnavailable with 0; later calls go on.
            let mut out = serde_json::Map::new();
            for retries in [1i64, 0] {
                let opts = ActorOptions::default()
                    .max_restarts(2)
                    .max_task_retries(retries);
                let c = Counter::remote_with(&opts, 100i64)?;
                c.handle().ready(Duration::from_secs(60))?;
                let r = c.slow_incr(3000u64);
                std::thread::sleep(Duration::from_millis(700));
                c.handle().kill(false)?;
                let first = match sdk::get_timeout(&r, Some(Duration::from_secs(120))) {
                    Ok(v) => serde_json::json!({"value": v}),
                    Err(e) => serde_json::json!({"error": kind(&e), "message": e.to_string()}),
                };
                let next = sdk::get_timeout(&c.incr(1i64), Some(Duration::from_secs(120)))?;
                let info = c.handle().info()?;
                out.insert(format!("retries_{retries}"), serde_json::json!({"first": first, "next": next, "restarts": info.num_restarts}));
            }
            result(serde_json::Value::Object(out));
        }
        "scope" => {
            // An unnamed actor ends when its last handle here is dropped, after the calls
            // made through it; a handle's clone keeps it; a named actor outlives its handle.
            let c = Counter::remote(0i64)?;
            let gone = c.handle().actor_id().to_owned();
            let r = c.incr(1i64);
            drop(c);
            let first = sdk::get_timeout(&r, Some(Duration::from_secs(60)))?;
            let kept = Counter::remote(10i64)?;
            let copy = kept.clone();
            let kept_id = kept.handle().actor_id().to_owned();
            drop(kept);
            copy.handle().ready(Duration::from_secs(60))?;
            let named = Counter::remote_with(&ActorOptions::default().name("scoped"), 0i64)?;
            let named_id = named.handle().actor_id().to_owned();
            sdk::get(&named.incr(1i64))?;
            drop(named);
            result(
                serde_json::json!({"first": first, "gone": gone, "kept": kept_id, "named": named_id}),
            );
            stdin_line();
            let v = sdk::get_timeout(&copy.incr(5i64), Some(Duration::from_secs(60)))?;
            result(serde_json::json!({"copy": v}));
        }
        "shared" => {
            // One handle passed to 20 tasks spread over the nodes; the driver drops its own
            // at once. Then a handle kept by a worker past its call; then one returned by a
            // task that created the actor.
            let c = Counter::remote(0i64)?;
            let shared = c.handle().actor_id().to_owned();
            // Half on the driver's node, half on the worker node.
            let here = TaskOptions::default().strategy(Strategy::NodeAffinity {
                node: sdk::node_id()?,
                soft: false,
            });
            let there = TaskOptions::default().resource("node0", 0.1);
            let refs: Vec<_> = (0..20)
                .map(|i| {
                    bump::remote_with(if i % 2 == 0 { &here } else { &there }, c.clone(), 5u64)
                })
                .collect();
            drop(c);
            let got = sdk::get_all(&refs)?;
            drop(refs);
            let max = got.iter().map(|(v, _)| *v).max().unwrap_or(0);
            let mut values: Vec<i64> = got.iter().map(|(v, _)| *v).collect();
            values.sort();
            values.dedup();
            let mut nodes: Vec<String> = got.into_iter().map(|(_, n)| n).collect();
            nodes.sort();
            nodes.dedup();
            // The keeper on the worker node and the maker on the driver's, so killing the
            // keeper does not kill the made actor's owner.
            let k = Counter::remote(0i64)?;
            let kept = k.handle().actor_id().to_owned();
            let first = sdk::get(&keep_counter::remote_with(&there, k, arg(1)))?;
            let made = sdk::get(&make_counter::remote_with(&here, 40i64))?;
            let made_id = made.handle().actor_id().to_owned();
            let v = sdk::get(&made.incr(2i64))?;
            result(serde_json::json!({
                "shared": shared, "max": max, "distinct": values.len(), "nodes": nodes,
                "kept": kept, "kept_first": first, "made": made_id, "made_value": v,
            }));
            stdin_line();
            drop(made);
            result(serde_json::json!({"dropped": true}));
            stdin_line();
        }
        "detached" => {
            // A detached actor on a node with a `slot`, restartable once.
            let opts = ActorOptions::default()
                .name(&arg(1))
                .detached(true)
                .max_restarts(1)
                .max_task_retries(0)
                .resource("slot", 1.0);
            let c = Counter::remote_with(&opts, 0i64)?;
            result(serde_json::json!({"node": sdk::get(&c.node())?}));
        }
        "caller" => {
            // Calls the named actor until stdin closes, one call at a time, printing which
            // copy acknowledged which value (or why a call failed), with the wall time.
            let c = CounterHandle::get_actor(&arg(1), None)?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s = stop.clone();
            std::thread::spawn(move || {
                stdin_line();
                s.store(true, std::sync::atomic::Ordering::Release);
            });
            let ms = || {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            };
            result(serde_json::json!({"calling": arg(1)}));
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let sent = ms();
                match sdk::get_timeout(&c.incr_at(1i64), Some(Duration::from_secs(1))) {
                    Ok(s) => println!("ACK {sent} {} {s}", ms()),
                    Err(e) => {
                        println!("ERR {sent} {} {}", ms(), kind(&e));
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            result(serde_json::json!({"stopped": true}));
        }
        "value" => {
            let c = CounterHandle::get_actor(&arg(1), None)?;
            result(
                serde_json::json!({"value": sdk::get_timeout(&c.get(), Some(Duration::from_secs(30)))?}),
            );
        }
        "hold" => {
            // An actor whose worker the test can probe; it lives until stdin says go.
            let c = Counter::remote(1i64)?;
            result(serde_json::json!({"value": sdk::get(&c.incr(1i64))?}));
            stdin_line();
        }
        "find" => {
            let c = CounterHandle::get_actor(&arg(1), None)?;
            result(serde_json::json!({"value": sdk::get(&c.incr(1i64))?}));
        }
        other => return Err(format!("unknown subcommand {other:?}").into()),
    }
    Ok(())
}
