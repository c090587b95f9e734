//! A driver for the task tests: each subcommand exercises one behaviour of the SDK against
//! the cluster named by `RAYCTL_ADDRESS` and prints `RESULT <json>` lines the tests read.
//! Workers are this binary re-executed by the nodes.

use std::io::BufRead;
use std::time::Duration;

use sdk::{Strategy, TaskOptions, View};

#[sdk::remote]
fn where_am_i() -> String {
    std::env::var("RAYCTL_NODE_ID").unwrap_or_default()
}

#[sdk::remote]
fn sleep_where(ms: u64) -> String {
    std::thread::sleep(Duration::from_millis(ms));
    std::env::var("RAYCTL_NODE_ID").unwrap_or_default()
}

#[sdk::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[sdk::remote]
fn fail(msg: String) -> i64 {
    panic!("{msg}")
}

/// `n` bytes from a seeded generator.
#[sdk::remote]
fn make_blob(seed: u64, n: u64) -> Vec<u8> {
    blob(seed, n)
}

#[sdk::remote]
fn checksum(data: View<Vec<u8>>) -> (u32, String) {
    (
        crc(&data),
        std::env::var("RAYCTL_NODE_ID").unwrap_or_default(),
    )
}

/// One step of a chain: every byte moves one place left and is xored with the step.
#[sdk::remote]
fn next_blob(prev: View<Vec<u8>>, step: u64) -> Vec<u8> {
    step_blob(&prev, step)
}

fn step_blob(prev: &[u8], step: u64) -> Vec<u8> {
    let n = prev.len();
    (0..n).map(|i| prev[(i + 1) % n] ^ (step as u8)).collect()
}

/// Writes its pid to `path` (so a test can kill it), then sleeps and answers.
#[sdk::remote]
fn victim(path: String, ms: u64) -> u64 {
    write_pid(&path);
    std::thread::sleep(Duration::from_millis(ms));
    42
}

/// Dies on its first attempt (its worker exits), then says who and where it is.
#[sdk::remote]
fn ctx_task() -> (String, u32, bool, String) {
    let c = sdk::context().expect("context");
    if c.attempt == 0 {
        std::process::exit(3);
    }
    (
        c.task_id.map(|t| t.to_string()).unwrap_or_default(),
        c.attempt,
        c.is_worker,
        c.node_id,
    )
}

/// Runs for `ms` unless cancelled (it looks every 10 ms).
#[sdk::remote]
fn spin(ms: u64) -> u64 {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(ms) {
        if sdk::is_cancelled() {
            return 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    0
}

/// Sleeps `ms` without looking whether it was cancelled.
#[sdk::remote]
fn hang(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    0
}

/// Waits for a minute-long child.
#[sdk::remote]
fn spin_parent() -> u64 {
    let c = spin::remote(60_000u64);
    sdk::get(&c).unwrap_or(7)
}

/// Submits two tasks from inside a task (the worker is their owner) and adds their results.
#[sdk::remote]
fn nested(a: i64, b: i64) -> i64 {
    let x = add::remote(a, 1i64);
    let y = add::remote(b, 1i64);
    sdk::get(&x).expect("nested x") + sdk::get(&y).expect("nested y")
}

/// Prints a line on stdout and one on stderr; answers where it ran.
#[sdk::remote]
fn chatty(i: u64) -> String {
    println!("stdout line from task {i}");
    eprintln!("stderr line from task {i}");
    std::env::var("RAYCTL_NODE_ID").unwrap_or_default()
}

/// Its state changes are not recorded (Ray's `enable_task_events=False`).
#[sdk::remote(enable_task_events = false)]
fn unlisted() -> u64 {
    7
}

/// Prints, and calls `chatty` (whose output reaches the driver through this worker).
#[sdk::remote]
fn chatty_parent() -> u64 {
    println!("parent before");
    let r = chatty::remote(99u64);
    sdk::get(&r).expect("nested chatty");
    println!("parent after");
    1
}

/// Declares its resources where it is defined.
#[sdk::remote(num_cpus = 2)]
fn two_cpus() -> String {
    std::env::var("RAYCTL_NODE_ID").unwrap_or_default()
}

/// Two returns: a small one (inline) and a large one (stored under its own return id).
#[sdk::remote(num_returns = 2)]
fn sum_and_blob(v: Vec<i64>, seed: u64) -> (i64, Vec<u8>) {
    (v.iter().sum(), blob(seed, 300 << 10))
}

/// An async remote function: awaits a timer and the refs it was handed.
#[sdk::remote]
async fn async_sum(refs: Vec<sdk::ObjectRef<u64>>, ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let mut total = 0;
    for r in refs {
        total += r.await.expect("await a borrowed ref");
    }
    total
}

/// An async actor: its calls sleep without holding a thread's work up.
pub struct AsyncNapper {
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

#[sdk::actor(max_concurrency = 8)]
impl AsyncNapper {
    fn new() -> Self {
        AsyncNapper {
            now: Default::default(),
            max: Default::default(),
        }
    }

    async fn nap(&self, ms: u64) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.now.fetch_sub(1, SeqCst);
        self.max.load(SeqCst) as u64
    }
}

/// Yields 0..n, each after `ms` milliseconds.
#[sdk::remote(num_returns = "streaming")]
fn count_up(n: u64, ms: u64) -> impl Iterator<Item = u64> {
    (0..n).inspect(move |_| std::thread::sleep(Duration::from_millis(ms)))
}

/// Yields `n` blobs of 200 KiB (stored, not inline), then panics if `fail`.
#[sdk::remote(num_returns = "streaming")]
fn blobs(n: u64, fail: bool) -> impl Iterator<Item = Vec<u8>> {
    (0..n)
        .map(|i| blob(5000 + i, 200 << 10))
        .chain(std::iter::from_fn(move || {
            if fail {
                panic!("no more blobs");
            }
            None
        }))
}

/// Panics on its first two attempts; retried because it says so.
#[sdk::remote(max_retries = 2, retry_exceptions = true)]
fn flaky() -> u32 {
    let attempt = sdk::context().expect("context").attempt;
    if attempt < 2 {
        panic!("flaky on attempt {attempt}");
    }
    attempt
}

/// Concurrency declared on the attribute.
pub struct Napper {
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

#[sdk::actor(max_concurrency = 4)]
impl Napper {
    fn new() -> Self {
        Napper {
            now: Default::default(),
            max: Default::default(),
        }
    }

    /// Sleeps; answers the most calls seen running at once so far.
    fn nap(&self, ms: u64) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        std::thread::sleep(Duration::from_millis(ms));
        self.now.fetch_sub(1, SeqCst);
        self.max.load(SeqCst) as u64
    }
}

/// The sum of the checksums of the objects behind `refs` (borrowed: the caller owns them).
#[sdk::remote]
fn crc_sum(refs: Vec<sdk::ObjectRef<Vec<u8>>>) -> u64 {
    refs.iter()
        .map(|r| crc(&sdk::get_view(r).expect("read a borrowed ref")) as u64)
        .sum()
}

/// Passes the first half of `refs` to a nested task on another node and returns a ref to
/// its result (which this worker owns) and the other half.
#[sdk::remote]
fn split(
    mut refs: Vec<sdk::ObjectRef<Vec<u8>>>,
) -> (sdk::ObjectRef<u64>, Vec<sdk::ObjectRef<Vec<u8>>>) {
    let rest = refs.split_off(refs.len() / 2);
    let here = sdk::context().expect("context").node_id;
    let other = sdk::nodes()
        .expect("nodes")
        .into_iter()
        .find(|n| n.alive && n.node_id.to_string() != here)
        .expect("another node");
    let opts = TaskOptions::default().strategy(Strategy::NodeAffinity {
        node: other.node_id,
        soft: false,
    });
    (crc_sum::remote_with(&opts, refs), rest)
}

static KEPT: std::sync::Mutex<Vec<sdk::ObjectRef<Vec<u8>>>> = std::sync::Mutex::new(Vec::new());

/// Keeps `refs` in this worker past the call's end and writes its pid to `path`.
#[sdk::remote]
fn keep(refs: Vec<sdk::ObjectRef<Vec<u8>>>, path: String) -> u64 {
    let n = refs.len() as u64;
    KEPT.lock().unwrap_or_else(|p| p.into_inner()).extend(refs);
    write_pid(&path);
    n
}

/// Puts a blob (this worker owns it), writes its pid to `path` and returns a ref to it.
#[sdk::remote]
fn own_blob(seed: u64, n: u64, path: String) -> sdk::ObjectRef<Vec<u8>> {
    let r = sdk::put(&blob(seed, n)).expect("put");
    write_pid(&path);
    r
}

fn write_pid(path: &str) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, std::process::id().to_string()).expect("write pid");
    std::fs::rename(&tmp, path).expect("rename pid file");
}

fn blob(seed: u64, n: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

fn crc(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

fn result(v: serde_json::Value) {
    println!("RESULT {v}");
}

fn stdin_line() {
    let _ = std::io::stdin().lock().lines().next();
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let session = if args.first().is_some_and(|a| a == "quiet") {
        sdk::init_with(sdk::Config::default().log_to_driver(false))?
    } else {
        sdk::init()?
    };
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(0).as_str() {
        "mode" => {
            let r = add::remote(2i64, 40i64);
            result(
                serde_json::json!({"mode": format!("{:?}", session.mode()), "sum": sdk::get(&r)?, "node": sdk::node_id()?.to_string()}),
            );
        }
        "context" => {
            let me = sdk::context()?;
            let r = ctx_task::remote_with(&TaskOptions::default().max_retries(1));
            let (task_id, attempt, is_worker, node) = sdk::get(&r)?;
            let nodes: Vec<serde_json::Value> = sdk::nodes()?
                .iter()
                .map(|n| {
                    serde_json::json!({"id": n.node_id.to_string(), "alive": n.alive,
                        "head": n.is_head, "cpus": n.resources.get("CPU")})
                })
                .collect();
            result(serde_json::json!({
                "driver_is_worker": me.is_worker,
                "driver_task": me.task_id.map(|t| t.to_string()),
                "driver_node": me.node_id,
                "ref_id": r.id().to_string(), "task_id": task_id, "attempt": attempt,
                "task_is_worker": is_worker, "task_node": node,
                "cluster": sdk::cluster_resources()?,
                "available": sdk::available_resources()?,
                "nodes": nodes,
            }));
        }
        "cancel" => {
            // How each cancel ends: the error kind and how long `get` took after it.
            let outcome = |r: &sdk::ObjectRef<u64>, opts: sdk::CancelOptions| {
                let start = std::time::Instant::now();
                sdk::cancel(r, opts).expect("cancel");
                let kind = match sdk::get_timeout(r, Some(Duration::from_secs(40))) {
                    Err(sdk::Error::TaskCancelled(e)) => e.kind_name().to_string(),
                    Err(e) => format!("error: {e}"),
                    Ok(v) => format!("value {v}"),
                };
                serde_json::json!({"kind": kind, "ms": start.elapsed().as_millis() as u64})
            };
            // The only CPU is taken by a running task; a second one waits in the queue.
            let running = spin::remote(60_000u64);
            std::thread::sleep(Duration::from_secs(2));
            let queued = spin::remote(10u64);
            std::thread::sleep(Duration::from_millis(500));
            let q = outcome(&queued, sdk::CancelOptions::default());
            let coop = outcome(&running, sdk::CancelOptions::default());
            let stubborn = hang::remote(60_000u64);
            std::thread::sleep(Duration::from_secs(2));
            let forced = outcome(
                &stubborn,
                sdk::CancelOptions {
                    force: true,
                    recursive: false,
                },
            );
            let parent = spin_parent::remote();
            std::thread::sleep(Duration::from_secs(3));
            let recursive = outcome(
                &parent,
                sdk::CancelOptions {
                    force: false,
                    recursive: true,
                },
            );
            // And the CPU is free again: a short task runs.
            let after = sdk::get_timeout(&spin::remote(10u64), Some(Duration::from_secs(60)))?;
            result(serde_json::json!({
                "queued": q, "running": coop, "forced": forced, "recursive": recursive,
                "after": after,
            }));
        }
        "print" | "quiet" => {
            // Done before the listed tasks start, so a listing that has them would have it.
            if sdk::get(&unlisted::remote())? != 7 {
                return Err("unlisted: wrong value".into());
            }
            let refs: Vec<_> = (0..4u64).map(chatty::remote).collect();
            let nodes: Vec<String> = sdk::get_all(&refs)?;
            let parent = sdk::get(&chatty_parent::remote())?;
            result(serde_json::json!({"nodes": nodes, "parent": parent}));
            stdin_line();
        }
        "resource" => {
            let opts = TaskOptions::default().resource(&arg(1), 1.0);
            let r = where_am_i::remote_with(&opts);
            result(serde_json::json!({"node": sdk::get(&r)?}));
        }
        "spread" => {
            let n: usize = arg(1).parse()?;
            let opts = TaskOptions::default().strategy(Strategy::Spread);
            let refs: Vec<_> = (0..n)
                .map(|_| sleep_where::remote_with(&opts, 500u64))
                .collect();
            let nodes: Vec<String> = sdk::get_all(&refs)?;
            result(serde_json::json!({"nodes": nodes}));
        }
        "affinity" => {
            let node = arg(1).parse()?;
            let opts =
                TaskOptions::default().strategy(Strategy::NodeAffinity { node, soft: false });
            let refs: Vec<_> = (0..4)
                .map(|_| sleep_where::remote_with(&opts, 50u64))
                .collect();
            result(serde_json::json!({"nodes": sdk::get_all(&refs)?}));
        }
        "busy" => {
            // This node's view has the worker node first (a probe ran there): before it does,
            // the long task looks infeasible, and once the node shows up both tasks race for
            // its CPU; if the short one wins, nothing waits.
            sdk::get(&where_am_i::remote())?;
            // The only CPU held for a while by one shape; another shape then waits for it.
            let long = sleep_where::remote(20_000u64);
            std::thread::sleep(Duration::from_secs(1));
            let opts = TaskOptions::default().resource("slot", 1.0);
            let waiting = sleep_where::remote_with(&opts, 10u64);
            sdk::get(&long)?;
            sdk::get(&waiting)?;
            result(serde_json::json!({"done": true}));
        }
        "infeasible" => {
            let opts = TaskOptions::default().resource("unobtainium", 1.0);
            let r = where_am_i::remote_with(&opts);
            let (ready, _) = sdk::wait(std::slice::from_ref(&r), 1, Some(Duration::from_secs(2)))?;
            result(serde_json::json!({"ready_after_2s": ready.len()}));
            // Stay until the test has seen the demand reported.
            stdin_line();
        }
        "transfer" => {
            // A 100 MiB object made on node A and consumed on node B.
            let (a, b) = (arg(1).parse()?, arg(2).parse()?);
            let n = 100 << 20;
            let on = |node| {
                TaskOptions::default().strategy(Strategy::NodeAffinity { node, soft: false })
            };
            let blob_ref = make_blob::remote_with(&on(a), 7u64, n);
            let (sum, node) = sdk::get(&checksum::remote_with(&on(b), &blob_ref))?;
            let expected = crc(&blob(7, n));
            // And one put by this driver, consumed on B.
            let put = sdk::put(&blob(9, n))?;
            let (sum2, node2) = sdk::get(&checksum::remote_with(&on(b), &put))?;
            let here = sdk::get_view(&blob_ref)?;
            result(serde_json::json!({
                "task_crc": sum, "expected": expected, "node": node,
                "put_crc": sum2, "put_expected": crc(&blob(9, n)), "put_node": node2,
                "driver_crc": crc(&here), "driver_view_shared": here.is_shared_memory(),
            }));
        }
        "victim" => {
            let opts = TaskOptions::default().max_retries(arg(2).parse()?);
            let r = victim::remote_with(&opts, arg(1), 4000u64);
            match sdk::get(&r) {
                Ok(v) => result(serde_json::json!({"value": v})),
                Err(sdk::Error::Task(e)) => {
                    result(serde_json::json!({"error_kind": e.kind_name(), "error": e.to_string()}))
                }
                Err(e) => return Err(e.into()),
            }
        }
        "panic" => {
            let r = fail::remote("boom from the test".to_string());
            match sdk::get(&r) {
                Err(sdk::Error::Task(e)) => result(
                    serde_json::json!({"kind": e.kind_name(), "message": e.message, "task_id": e.task_id, "node": e.node_id, "text": e.to_string()}),
                ),
                other => result(serde_json::json!({"unexpected": format!("{other:?}")})),
            }
        }
        "refcount" => {
            // Objects in the stores of both nodes while held; freed when the refs drop.
            let (a, b) = (arg(1).parse()?, arg(2).parse()?);
            let on = |node| {
                TaskOptions::default().strategy(Strategy::NodeAffinity { node, soft: false })
            };
            let mut held = Vec::new();
            for i in 0..4u64 {
                held.push(make_blob::remote_with(&on(a), i, 8 << 20));
            }
            let puts: Vec<_> = (0..4u64)
                .map(|i| sdk::put(&blob(100 + i, 8 << 20)))
                .collect::<Result<_, _>>()?;
            // Consumed on B: B pulls copies of A's results and of the puts.
            let sums: Vec<_> = held
                .iter()
                .chain(puts.iter())
                .map(|r| checksum::remote_with(&on(b), r))
                .collect();
            sdk::get_all(&sums)?;
            result(
                serde_json::json!({"holding": held.len() + puts.len(), "owned": session.owned_objects()}),
            );
            stdin_line();
            drop((held, puts, sums));
            std::thread::sleep(Duration::from_millis(100));
            result(serde_json::json!({"dropped": true, "owned": session.owned_objects()}));
            stdin_line();
        }
        "dag" => {
            // 100 producers whose results (stored, not inline) live on node A, then, after
            // the test killed A, 100 consumers of them: the lost ones are rebuilt.
            let a: sdk::NodeId = arg(1).parse()?;
            let on_a = TaskOptions::default().strategy(Strategy::NodeAffinity {
                node: a,
                soft: true,
            });
            let size = 200 * 1024;
            let stage1: Vec<_> = (0..100u64)
                .map(|i| make_blob::remote_with(&on_a, i, size))
                .collect();
            let (done, _) = sdk::wait(&stage1, stage1.len(), None)?;
            let where1: Vec<String> = sdk::get_all(
                &(0..1)
                    .map(|_| where_am_i::remote_with(&on_a))
                    .collect::<Vec<_>>(),
            )?;
            result(serde_json::json!({"stage1": done.len(), "on": where1}));
            stdin_line();
            let stage2: Vec<_> = stage1.iter().map(checksum::remote).collect();
            let sums: Vec<(u32, String)> = sdk::get_all(&stage2)?;
            let expected: Vec<u32> = (0..100u64).map(|i| crc(&blob(i, size))).collect();
            let got: Vec<u32> = sums.iter().map(|s| s.0).collect();
            // The driver's own get of a lost object rebuilds it too.
            let direct = crc(&sdk::get(&stage1[0])?);
            result(
                serde_json::json!({"equal": got == expected, "direct_equal": direct == expected[0], "tasks": stage1.len() + stage2.len()}),
            );
        }
        "chain" => {
            // The chaos runner's DAG: `chains` chains of `steps` tasks, each consuming the
            // previous step's stored object, spread over the nodes, with retries; and one
            // object put per chain whose checksum is recorded at put time. A line
            // `PROGRESS <tasks done>` after each step lets the runner strike mid-DAG.
            let chains: u64 = arg(1).parse()?;
            let steps: u64 = arg(2).parse()?;
            let size = 64 * 1024;
            let opts = TaskOptions::default()
                .strategy(Strategy::Spread)
                .max_retries(3);
            let mut put_crcs = Vec::new();
            let mut puts = Vec::new();
            for i in 0..chains {
                let b = blob(1000 + i, size);
                put_crcs.push(crc(&b));
                puts.push(sdk::put(&b)?);
            }
            let mut heads: Vec<sdk::ObjectRef<Vec<u8>>> = (0..chains)
                .map(|i| make_blob::remote_with(&opts, i, size))
                .collect();
            let mut errors = Vec::new();
            for step in 0..steps {
                heads = heads
                    .iter()
                    .map(|prev| next_blob::remote_with(&opts, prev, step))
                    .collect();
                if let Err(e) = sdk::wait(&heads, heads.len(), None) {
                    errors.push(format!("step {step}: {e}"));
                }
                println!("PROGRESS {}", (step + 1) * chains);
            }
            let mut mismatches = 0;
            for (i, r) in heads.iter().enumerate() {
                let mut want = blob(i as u64, size);
                for step in 0..steps {
                    want = step_blob(&want, step);
                }
                match sdk::get(r) {
                    Ok(got) if crc(&got) == crc(&want) => {}
                    Ok(_) => mismatches += 1,
                    Err(e) => errors.push(format!("chain {i}: {e}")),
                }
            }
            // Every put read back on a worker, against the checksum taken at put time.
            let reads: Vec<_> = puts
                .iter()
                .map(|p| checksum::remote_with(&opts, p))
                .collect();
            let mut put_mismatches = 0;
            for (r, want) in reads.iter().zip(&put_crcs) {
                match sdk::get(r) {
                    Ok((got, _)) if got == *want => {}
                    Ok(_) => put_mismatches += 1,
                    Err(e) => errors.push(format!("put read: {e}")),
                }
            }
            result(serde_json::json!({
                "tasks": chains * (steps + 1) + chains,
                "mismatches": mismatches,
                "put_mismatches": put_mismatches,
                "errors": errors,
            }));
        }
        "pressure" => {
            // The chaos runner's store exhaustion: 4 objects read zero-copy and held (their
            // views pin them), then `n` puts of `mib` MiB while every ref is kept, so the
            // store must spill or refuse, never evict or reuse what is held. Then every
            // object is read back against the checksum taken at put time.
            let seed: u64 = arg(1).parse()?;
            let n: u64 = arg(2).parse()?;
            let size = arg(3).parse::<u64>()? << 20;
            let mut pinned = Vec::new();
            for i in 0..4 {
                let b = blob(seed * 1000 + i, size);
                let r = sdk::put(&b)?;
                pinned.push((sdk::get_view(&r)?, crc(&b), r));
            }
            let (mut kept, mut full, mut other) = (Vec::new(), 0u64, Vec::new());
            for i in 0..n {
                let b = blob(seed * 1000 + 100 + i, size);
                match sdk::put(&b) {
                    Ok(r) => kept.push((r, crc(&b))),
                    Err(e) if e.to_string().contains("ObjectStoreFull") => full += 1,
                    Err(e) => other.push(e.to_string()),
                }
            }
            let pinned_bad = pinned.iter().filter(|(v, c, _)| crc(v) != *c).count();
            let mut read_bad = 0;
            for (r, c) in &kept {
                match sdk::get(r) {
                    Ok(b) if crc(&b) == *c => {}
                    Ok(_) => read_bad += 1,
                    Err(e) => other.push(format!("read back: {e}")),
                }
            }
            result(serde_json::json!({
                "puts_ok": kept.len(), "store_full": full, "other_errors": other,
                "pinned_bad": pinned_bad, "read_bad": read_bad,
            }));
        }
        "read-when-full" => {
            // A 32 MiB store: `a` is put and left unread (so it may be spilled), then 15
            // objects of 2 MiB are put and held through zero-copy views, which spills `a`
            // and leaves less than 2 MiB free. Reading `a` back needs that room.
            let size = 2u64 << 20;
            let a_bytes = blob(1, size);
            let a = sdk::put(&a_bytes)?;
            let mut views = Vec::new();
            let mut refs = Vec::new();
            for i in 0..15 {
                let r = sdk::put(&blob(100 + i, size))?;
                views.push(sdk::get_view(&r)?);
                refs.push(r);
            }
            let read = |a: &sdk::ObjectRef<Vec<u8>>| match sdk::get(a) {
                Ok(b) if crc(&b) == crc(&a_bytes) => "read".to_string(),
                Ok(_) => "wrong bytes".to_string(),
                Err(e) => e.to_string(),
            };
            // Nothing lets go: a store-full error after the wait, not a lost object.
            let t = std::time::Instant::now();
            let held = read(&a);
            let held_ms = t.elapsed().as_millis() as u64;
            // A view let go a second into the read: the read waits for it and succeeds.
            let t = std::time::Instant::now();
            let reader = {
                let a = a.clone();
                std::thread::spawn(move || {
                    let r = sdk::get(&a);
                    (r.map(|b| crc(&b)), t.elapsed().as_millis() as u64)
                })
            };
            std::thread::sleep(Duration::from_secs(1));
            drop(views.pop());
            let (got, freed_ms) = reader.join().map_err(|_| "the reader panicked")?;
            let freed = match got {
                Ok(c) if c == crc(&a_bytes) => "read".to_string(),
                Ok(_) => "wrong bytes".to_string(),
                Err(e) => e.to_string(),
            };
            result(serde_json::json!({
                "held": held, "held_ms": held_ms, "freed": freed, "freed_ms": freed_ms,
            }));
        }
        "borrow" => {
            // 100 objects of 150 KiB (stored, not inline); the driver keeps no ref of its
            // own once they are passed on.
            const N: u64 = 100;
            let sums: Vec<u32> = (0..N).map(|i| crc(&blob(1000 + i, 150 << 10))).collect();
            let refs = (0..N)
                .map(|i| sdk::put(&blob(1000 + i, 150 << 10)))
                .collect::<Result<Vec<_>, _>>()?;
            let r = split::remote(refs);
            let (inner, rest) = sdk::get(&r)?;
            drop(r);
            let first: u64 = sums[..50].iter().map(|c| *c as u64).sum();
            let got = sdk::get(&inner)?;
            let rest_ok = rest
                .iter()
                .zip(&sums[50..])
                .all(|(r, c)| sdk::get(r).map(|b| crc(&b)).ok() == Some(*c));
            result(serde_json::json!({
                "sum_ok": got == first, "rest_ok": rest_ok, "rest": rest.len(),
                "split_node": sdk::get(&where_am_i::remote())?,
                "owned": session.owned_objects(), "borrowed": session.borrowed_objects(),
            }));
            stdin_line();
            // The first half and the worker's result go; the other half stays readable.
            drop(inner);
            let rest_ok = rest
                .iter()
                .zip(&sums[50..])
                .all(|(r, c)| sdk::get(r).map(|b| crc(&b)).ok() == Some(*c));
            result(serde_json::json!({"rest_ok": rest_ok, "borrowed": session.borrowed_objects()}));
            stdin_line();
            drop(rest);
            result(serde_json::json!({
                "owned": session.owned_objects(), "borrowed": session.borrowed_objects(),
            }));
            stdin_line();
        }
        "borrower-dies" => {
            // A worker keeps 10 refs past its call; the driver drops its own.
            let path = arg(1);
            let refs = (0..10u64)
                .map(|i| sdk::put(&blob(2000 + i, 150 << 10)))
                .collect::<Result<Vec<_>, _>>()?;
            let kept = sdk::get(&keep::remote(refs, path))?;
            result(serde_json::json!({"kept": kept, "owned": session.owned_objects()}));
            stdin_line();
            result(serde_json::json!({"owned": session.owned_objects()}));
            stdin_line();
        }
        "owner-dies" => {
            let path = arg(1);
            let r = own_blob::remote(3000u64, 150u64 << 10, path);
            let inner = sdk::get(&r)?;
            let first = sdk::get(&inner).map(|b| crc(&b) == crc(&blob(3000, 150 << 10)));
            result(serde_json::json!({"read": first.map_err(|e| e.to_string())?}));
            stdin_line();
            let after = match sdk::get_timeout(&inner, Some(Duration::from_secs(60))) {
                Ok(_) => "read".to_string(),
                Err(e @ sdk::Error::OwnerDied(..)) => format!("OwnerDied: {e}"),
                Err(e) => format!("other: {e}"),
            };
            result(serde_json::json!({"after": after}));
        }
        "attr-options" => {
            // Retried on panics as declared; the same with the call site turning it off.
            let retried = sdk::get(&flaky::remote()).map_err(|e| e.to_string());
            let off = flaky::options().retry_exceptions(false);
            let not_retried = match sdk::get(&flaky::remote_with(&off)) {
                Ok(a) => format!("ran: attempt {a}"),
                Err(sdk::Error::Task(e)) => format!("{}: {}", e.kind_name(), e.message),
                Err(e) => e.to_string(),
            };
            let n = Napper::remote()?;
            let naps: Vec<_> = (0..8).map(|_| n.nap(500u64)).collect();
            let most = sdk::get_all(&naps)?.into_iter().max().unwrap_or(0);
            let (sum, big) = sum_and_blob::remote(vec![1i64, 2, 39], 77u64);
            let big_ok = sdk::get(&big)? == blob(77, 300 << 10);
            let ids_differ = sum.id() != big.id();
            result(serde_json::json!({
                "sum": sdk::get(&sum)?, "big_ok": big_ok, "ids_differ": ids_differ,
                "retried": retried?, "not_retried": not_retried, "concurrent": most,
                "declared_cpus": two_cpus::options().num_cpus,
                "max_concurrency": Napper::actor_options().max_concurrency,
            }));
        }
        "async" => {
            let refs = (1..=10u64)
                .map(|i| sdk::put(&i))
                .collect::<Result<Vec<_>, _>>()?;
            let sum = sdk::get(&async_sum::remote(refs, 50u64))?;
            let a = AsyncNapper::remote()?;
            let t = std::time::Instant::now();
            let naps: Vec<_> = (0..8).map(|_| a.nap(1000u64)).collect();
            // Awaited from the caller's own executor (ObjectRef is IntoFuture).
            let caller = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let most = caller.block_on(async {
                let mut most = 0;
                for n in naps {
                    most = most.max(n.await?);
                }
                Ok::<u64, sdk::Error>(most)
            })?;
            result(serde_json::json!({
                "sum": sum, "concurrent": most, "naps_ms": t.elapsed().as_millis() as u64,
            }));
        }
        "stream" => {
            // 1,000 items, one every millisecond, read as they are made.
            let t = std::time::Instant::now();
            let mut g = count_up::remote(1000u64, 1u64);
            let (mut first_ms, mut most, mut in_order) = (0u128, 0usize, true);
            let mut i = 0u64;
            while let Some(r) = g.next() {
                if i == 0 {
                    first_ms = t.elapsed().as_millis();
                }
                in_order &= sdk::get(&r?)? == i;
                most = most.max(g.buffered());
                i += 1;
            }
            in_order &= i == 1000;
            let total_ms = t.elapsed().as_millis();
            drop(g);
            // Read slowly: the worker waits (back-pressure), at most 16 ahead.
            let mut g = count_up::remote(100u64, 0u64);
            let mut slow_most = 0usize;
            let mut slow_n = 0u64;
            while let Some(r) = g.next() {
                sdk::get(&r?)?;
                slow_n += 1;
                std::thread::sleep(Duration::from_millis(20));
                slow_most = slow_most.max(g.buffered());
            }
            drop(g);
            // Stored items, then the generator panics: the items, then the error.
            let mut ok = 0;
            let mut error = String::new();
            for r in blobs::remote(5u64, true) {
                match r.and_then(|r| sdk::get(&r)) {
                    Ok(b) if b == blob(5000 + ok, 200 << 10) => ok += 1,
                    Ok(_) => error = "wrong bytes".into(),
                    Err(sdk::Error::Task(e)) => error = format!("{}: {}", e.kind_name(), e.message),
                    Err(e) => error = e.to_string(),
                }
            }
            result(serde_json::json!({
                "first_ms": first_ms, "total_ms": total_ms, "in_order": in_order,
                "most_buffered": most, "slow_most": slow_most, "slow_n": slow_n,
                "blobs_ok": ok, "blobs_error": error, "owned": session.owned_objects(),
            }));
        }
        "two-cpus" => {
            // Declared num_cpus = 2: waits while no node has 2 CPUs, runs once one comes.
            let r = two_cpus::remote();
            let (ready, _) = sdk::wait(std::slice::from_ref(&r), 1, Some(Duration::from_secs(3)))?;
            result(serde_json::json!({"ready_early": !ready.is_empty()}));
            stdin_line();
            result(
                serde_json::json!({"node": sdk::get_timeout(&r, Some(Duration::from_secs(120)))?}),
            );
        }
        "idle" => {
            // Connected, no task yet: what the node started on its own.
            result(serde_json::json!({"connected": true}));
            stdin_line();
        }
        "wait" => {
            // Five tasks of 0.2 to 1 s on a cluster of three one-CPU nodes.
            let refs: Vec<_> = (1..=5u64).map(|i| sleep_where::remote(i * 200)).collect();
            let t = std::time::Instant::now();
            let (ready, rest) = sdk::wait(&refs, 2, Some(Duration::from_secs(60)))?;
            let first = (ready.len(), rest.len(), t.elapsed().as_millis() as u64);
            let (ready0, _) = sdk::wait(&rest, rest.len(), Some(Duration::from_millis(1)))?;
            let (all, none) = sdk::wait(&refs, 5, None)?;
            result(
                serde_json::json!({"first": first, "early": ready0.len(), "all": all.len(), "left": none.len()}),
            );
        }
        "nested" => {
            let r = nested::remote(10i64, 20i64);
            result(serde_json::json!({"value": sdk::get(&r)?}));
        }
        "many" => {
            let n: i64 = arg(1).parse()?;
            let refs: Vec<_> = (0..n).map(|i| add::remote(i, 1i64)).collect();
            let total: i64 = sdk::get_all(&refs)?.into_iter().sum();
            // Chained: each result feeds the next task.
            let mut r = add::remote(0i64, 1i64);
            for _ in 0..20 {
                r = add::remote(&r, 1i64);
            }
            // The async get, from a caller's own runtime.
            let caller = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let chain = caller.block_on(sdk::get_async(&r))?;
            result(serde_json::json!({"total": total, "chain": chain}));
        }
        "burst" => {
            // N tasks of MS milliseconds, each asking for CPUS CPUs (the autoscaler's input).
            let (n, ms, cpus): (usize, u64, f64) =
                (arg(1).parse()?, arg(2).parse()?, arg(3).parse()?);
            let opts = TaskOptions::default().num_cpus(cpus);
            let refs: Vec<_> = (0..n)
                .map(|_| sleep_where::remote_with(&opts, ms))
                .collect();
            let mut nodes = Vec::new();
            let mut failed = Vec::new();
            for r in &refs {
                match sdk::get(r) {
                    Ok(node) => nodes.push(node),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            result(serde_json::json!({"nodes": nodes, "failed": failed}));
        }
        "request_resources" => {
            // Ray's request_resources(num_cpus=N); the next line clears it.
            sdk::request_resources(Some(arg(1).parse()?), Vec::new())?;
            result(serde_json::json!({"requested": arg(1)}));
            stdin_line();
            sdk::request_resources(None, Vec::new())?;
            result(serde_json::json!({"cleared": true}));
        }
        "pg_spread" => {
            let n: usize = arg(1).parse()?;
            let bundles = (0..n)
                .map(|_| std::collections::BTreeMap::from([("CPU".to_owned(), 1.0)]))
                .collect();
            let pg = sdk::placement_group(
                bundles,
                &sdk::PlacementGroupOptions::new(sdk::PlacementStrategy::StrictSpread),
            )?;
            let nodes = pg.ready(Duration::from_secs(120))?;
            let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
            result(serde_json::json!({"nodes": nodes}));
            stdin_line();
            pg.remove()?;
            result(serde_json::json!({"removed": true}));
        }
        "hold_object" => {
            // A 1 MiB object made by a one-CPU task (so on a worker node), held until told.
            let opts = TaskOptions::default().num_cpus(1.0);
            let r = make_blob::remote_with(&opts, 7u64, 1u64 << 20);
            let (ready, _) =
                sdk::wait(std::slice::from_ref(&r), 1, Some(Duration::from_secs(120)))?;
            // `ready` holds refs too: only `r` may keep the object from here on.
            let made = ready.len();
            drop(ready);
            let node = sdk::get(&where_am_i::remote_with(&opts))?;
            result(serde_json::json!({"made": made, "node": node}));
            stdin_line();
            let got: Vec<u8> = sdk::get(&r)?;
            result(serde_json::json!({"equal": got == blob(7, 1 << 20)}));
            drop(r);
            stdin_line();
        }
        other => return Err(format!("unknown subcommand {other:?}").into()),
    }
    Ok(())
}
