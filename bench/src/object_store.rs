//! Object store figures: put bandwidth beside memcpy bandwidth measured in the same run, get
//! latency of a tiny and a huge object from a second process, and small-object rates from one
//! client. The store runs in this process behind its real Unix socket; clients talk to it
//! exactly as workers do.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use object_store::{Store, StoreClient, StoreConfig, StoreServer};
use protocol::ObjectId;

use crate::{emit, percentile};

const MIB: u64 = 1 << 20;

fn oid(n: u64) -> ObjectId {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8] = 0xbe;
    ObjectId::from_bytes(b)
}

fn size_name(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{}GiB", b >> 30),
        b if b >= MIB => format!("{}MiB", b >> 20),
        b => format!("{}KiB", b >> 10),
    }
}

/// memcpy between two warm buffers: the ceiling any put into shared memory can reach.
fn memcpy_gbps(size: u64, reps: usize) -> f64 {
    let src = vec![7u8; size as usize];
    let mut dst = vec![1u8; size as usize];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    for i in 0..reps {
        dst[i % 64] = i as u8;
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    std::hint::black_box(&dst);
    (size as f64 * reps as f64) / start.elapsed().as_secs_f64() / 1e9
}

/// One put through the client: create, copy in, seal. Deleted afterwards (not timed) so the
/// next put reuses the same, already faulted-in, pages, as a long-running node does.
fn put_once(c: &StoreClient, id: ObjectId, src: &[u8]) -> Result<Duration> {
    let start = Instant::now();
    let mut w = c.create(id, src.len() as u64, 0)?;
    w.data_mut().copy_from_slice(src);
    w.seal()?;
    let took = start.elapsed();
    c.delete(&[id])?;
    Ok(took)
}

fn put_gbps(c: &StoreClient, size: u64, reps: usize, next: &mut u64) -> Result<f64> {
    let src = vec![9u8; size as usize];
    let mut total = Duration::ZERO;
    for _ in 0..reps {
        *next += 1;
        total += put_once(c, oid(*next), &src)?;
    }
    Ok(size as f64 * reps as f64 / total.as_secs_f64() / 1e9)
}

/// Runs this binary as a second process that gets `id` `iters` times and prints the median
/// microseconds of one get (view made, pin released).
fn get_us_from_child(socket: &std::path::Path, id: ObjectId, iters: usize) -> Result<f64> {
    let out = Command::new(std::env::current_exe()?)
        .args(["get-child", "--socket"])
        .arg(socket)
        .args(["--id", &id.to_string(), "--iters", &iters.to_string()])
        .output()
        .context("cannot start the reader process")?;
    if !out.status.success() {
        bail!(
            "reader process failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("reader output")
}

/// The reader process's body (hidden `get-child` subcommand).
pub(crate) fn get_child(socket: &std::path::Path, id: ObjectId, iters: usize) -> Result<()> {
    let c = StoreClient::connect(socket)?;
    let mut us = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        let v = c.get_one(id, Some(Duration::ZERO))?;
        std::hint::black_box(v.data().as_ptr());
        drop(v);
        us.push(start.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    println!("{}", percentile(&us, 0.5));
    Ok(())
}

pub(crate) fn run(smoke: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let big = if smoke { 64 * MIB } else { 1 << 30 };
    let sizes: &[(u64, usize, usize)] = if smoke {
        &[(MIB, 20, 20), (64 * MIB, 3, 3)]
    } else {
        &[(MIB, 3000, 3000), (64 * MIB, 60, 60), (512 * MIB, 8, 8)]
    };
    let capacity = big + 256 * MIB;
    let store = Arc::new(Store::open(&StoreConfig {
        capacity,
        plasma_dir: "/dev/shm".into(),
        spill_dir: dir.path().join("spill"),
        chunk: object_store::arena::DEFAULT_CHUNK,
    })?);
    let server = StoreServer::start(store.clone(), &dir.path().join("store.sock"), None)?;
    let c = StoreClient::connect(server.path())?;
    let mut next = 0;

    // The first put of a size lands on fresh arena memory: fallocate plus page faults.
    let largest = sizes.last().expect("sizes").0;
    let src = vec![3u8; largest as usize];
    next += 1;
    let first = put_once(&c, oid(next), &src)?;
    emit(
        &format!("put_first_touch_gbps_{}", size_name(largest)),
        largest as f64 / first.as_secs_f64() / 1e9,
        "GB/s",
    );
    drop(src);

    for &(size, memcpy_reps, put_reps) in sizes {
        let name = size_name(size);
        let m = memcpy_gbps(size, memcpy_reps);
        let p = put_gbps(&c, size, put_reps, &mut next)?;
        emit(&format!("memcpy_gbps_{name}"), m, "GB/s");
        emit(&format!("put_gbps_{name}"), p, "GB/s");
        emit(&format!("put_vs_memcpy_{name}"), p / m, "ratio");
    }

    // Get latency from a second process: a tiny object and a huge one.
    let tiny = oid(1_000_001);
    let huge = oid(1_000_002);
    c.put(tiny, &[5u8; 1024], b"")?;
    let mut w = c.create(huge, big, 0)?;
    w.data_mut().fill(6);
    w.seal()?;
    let iters = if smoke { 200 } else { 20_000 };
    let tiny_us = get_us_from_child(server.path(), tiny, iters)?;
    let huge_us = get_us_from_child(server.path(), huge, iters)?;
    emit("get_us_1KiB", tiny_us, "us");
    emit(&format!("get_us_{}", size_name(big)), huge_us, "us");
    emit(
        &format!("get_ratio_{}_vs_1KiB", size_name(big)),
        huge_us / tiny_us,
        "ratio",
    );
    c.delete(&[tiny, huge])?;

    // Small objects from one client, one request each.
    let n: u64 = if smoke { 2_000 } else { 200_000 };
    let payload = [4u8; 100];
    let base = 2_000_000;
    let start = Instant::now();
    for i in 0..n {
        c.put(oid(base + i), &payload, b"")?;
    }
    emit(
        "put_small_per_s",
        n as f64 / start.elapsed().as_secs_f64(),
        "ops/s",
    );
    let start = Instant::now();
    for i in 0..n {
        let v = c.get_one(oid(base + i), Some(Duration::ZERO))?;
        std::hint::black_box(v.data()[0]);
    }
    emit(
        "get_small_per_s",
        n as f64 / start.elapsed().as_secs_f64(),
        "ops/s",
    );

    // The same from one client in batches of 100 per request (`put_many`, `get` of many ids):
    // how a program that makes many small objects at once should use the store.
    let base = 3_000_000;
    let ids: Vec<ObjectId> = (0..n).map(|i| oid(base + i)).collect();
    let start = Instant::now();
    for batch in ids.chunks(100) {
        let items: Vec<(ObjectId, &[u8], &[u8])> = batch
            .iter()
            .map(|id| (*id, &payload[..], &b""[..]))
            .collect();
        for r in c.put_many(&items)? {
            r?;
        }
    }
    emit(
        "put_small_batched_per_s",
        n as f64 / start.elapsed().as_secs_f64(),
        "ops/s",
    );
    let start = Instant::now();
    for batch in ids.chunks(100) {
        for v in c.get(batch, Some(Duration::ZERO))? {
            std::hint::black_box(v.context("missing object")?.data()[0]);
        }
    }
    emit(
        "get_small_batched_per_s",
        n as f64 / start.elapsed().as_secs_f64(),
        "ops/s",
    );
    // A request on the same connection runs after every release sent before it.
    let st = c.stats()?;
    if st.pinned != 0 {
        bail!("{} bytes still pinned after the benchmark", st.pinned);
    }
    server.stop();
    Ok(())
}
