//! Tasks through the SDK over a real two-node cluster (a head and a worker node): this
//! benchmark process is the driver, and the nodes run it again as workers.
//!
//! Figures (issue 5): `tasks_async_per_s` (submit N no-op tasks, then get all), beside
//! `tasks_async_no_events_per_s` (the same with `enable_task_events = false`) and
//! `task_events_overhead` (the fraction of throughput task events cost),
//! `borrowed_ref_task_per_s` (the same, each task given a `Vec` of 10 refs it borrows),
//! `task_roundtrip_ms` (sequential submit + get, median), `large_arg_task_ms` (a 256 MiB
//! argument to a task that sums it), `sdk_put_gbps_512MiB` (with memcpy measured in the same
//! run as the baseline), `transfer_task_gbps` (a 256 MiB object consumed on the other node).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos_tests::{Cluster, ClusterOptions};
use sdk::{Strategy, TaskOptions, View};

use crate::{emit, percentile};

#[sdk::remote]
fn noop() -> u8 {
    0
}

/// Receives 10 borrowed refs (the caller owns them) and drops them.
#[sdk::remote]
fn count_refs(refs: Vec<sdk::ObjectRef<u64>>) -> u64 {
    refs.len() as u64
}

#[sdk::remote]
fn sum_bytes(data: View<Vec<u8>>) -> u64 {
    sum(&data)
}

fn sum(b: &[u8]) -> u64 {
    // Chunks of u64 lanes: fast enough to be far from the memory bandwidth limit.
    b.chunks(4096)
        .map(|c| c.iter().map(|x| *x as u64).sum::<u64>())
        .sum()
}

fn memcpy_gbps(n: usize) -> f64 {
    let src = vec![7u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src); // fault the pages in first
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    n as f64 / best / 1e9
}

/// Runs the tasks figures and/or the actors figures (`crate::actors`) in one cluster: the SDK
/// starts once per process.
pub(crate) fn run(smoke: bool, tasks: bool, actors: bool) -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        head_cpus: 2.0,
        node_cpus: 2.0,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    c.wait_alive(2)?;
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: set before the SDK starts any thread that reads the environment.
    unsafe {
        std::env::set_var("RAYCTL_TMPDIR", c.path());
        std::env::set_var(
            protocol::AUTH_TOKEN_ENV,
            c.token.as_deref().unwrap_or_default(),
        );
    }
    let session = sdk::init_with(sdk::Config {
        address: Some(c.head_addrs.join(",")),
        ..Default::default()
    })?;
    let other: sdk::NodeId = c.nodes[0].ready["node_id"]
        .as_str()
        .context("node id")?
        .parse()?;
    eprintln!(
        "driver on node {} ({:?} mode)",
        session.node_address(),
        session.mode()
    );

    if tasks {
        task_figures(smoke, other)?;
    }
    if actors {
        crate::actors::run(smoke)?;
    }
    drop(session);
    Ok(())
}

fn task_figures(smoke: bool, other: sdk::NodeId) -> Result<()> {
    // Warm up: start the workers.
    sdk::get_all(&(0..200).map(|_| noop::remote()).collect::<Vec<_>>())?;

    let n = if smoke { 1_000 } else { 10_000 };
    // Rounds alternate task events on (the default) and off (`enable_task_events =
    // false`) on the same warm cluster; the best of each.
    let quiet = noop::options().enable_task_events(false);
    let rate = |opts: &TaskOptions| -> Result<f64> {
        let t = Instant::now();
        let refs: Vec<_> = (0..n).map(|_| noop::remote_with(opts)).collect();
        sdk::get_all(&refs)?;
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    let (mut best, mut best_quiet) = (0f64, 0f64);
    rate(&quiet)?; // leases for a full round
    for _ in 0..if smoke { 1 } else { 3 } {
        best = best.max(rate(&noop::options())?);
        best_quiet = best_quiet.max(rate(&quiet)?);
    }
    emit("tasks_async_per_s", best, "tasks/s");
    emit("tasks_async_vs_ray_2_60", best / 1255.0, "x");
    emit("tasks_async_no_events_per_s", best_quiet, "tasks/s");
    // The throughput task events cost, as a fraction of the throughput without them.
    emit("task_events_overhead", 1.0 - best / best_quiet, "fraction");
    let plain = best;

    // The same, each task receiving a Vec of 10 refs it borrows (the borrowing protocol's
    // cost on the hot path: the caller pins them until the reply, nothing is registered).
    let refs10 = (0..10u64)
        .map(|i| sdk::put(&i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut best = 0f64;
    for _ in 0..if smoke { 1 } else { 3 } {
        let t = Instant::now();
        let refs: Vec<_> = (0..n).map(|_| count_refs::remote(refs10.clone())).collect();
        let got = sdk::get_all(&refs)?;
        anyhow::ensure!(got.iter().all(|c| *c == 10), "a task saw the wrong refs");
        best = best.max(n as f64 / t.elapsed().as_secs_f64());
    }
    emit("borrowed_ref_task_per_s", best, "tasks/s");
    emit("borrowed_ref_task_vs_plain", best / plain, "x");

    let iters = if smoke { 100 } else { 1_000 };
    let mut lat = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        sdk::get(&noop::remote())?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    emit("task_roundtrip_ms", percentile(&lat, 0.5), "ms");
    emit("task_roundtrip_p99_ms", percentile(&lat, 0.99), "ms");
    emit(
        "task_roundtrip_vs_ray_2_60",
        percentile(&lat, 0.5) / 2.3,
        "x",
    );

    let big = if smoke { 16 << 20 } else { 256 << 20 };
    let data: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    let local = sum(&data);
    emit(
        "large_arg_sum_in_process_ms",
        t.elapsed().as_secs_f64() * 1e3,
        "ms",
    );
    // The first run also pays for growing the store's shared memory (page faults in the
    // node and in this process); later runs reuse it.
    let mut runs = Vec::new();
    for _ in 0..3 {
        let arg = data.clone();
        let t = Instant::now();
        let got = sdk::get(&sum_bytes::remote(arg))?;
        runs.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(got == local, "the task summed {got}, expected {local}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(data);
    emit("large_arg_task_cold_ms", runs[0], "ms");
    emit(
        "large_arg_task_ms",
        runs[1..].iter().copied().fold(f64::MAX, f64::min),
        "ms",
    );

    let put_n = if smoke { 32 << 20 } else { 512 << 20 };
    let base = memcpy_gbps(put_n);
    let v = vec![3u8; put_n];
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let r = sdk::put(&v)?;
        best = best.max(put_n as f64 / t.elapsed().as_secs_f64() / 1e9);
        drop(r);
        // Let the free reach the store before the next put.
        std::thread::sleep(Duration::from_millis(200));
    }
    emit("memcpy_gbps", base, "GB/s");
    emit("sdk_put_gbps_512MiB", best, "GB/s");
    emit("sdk_put_vs_memcpy", best / base, "x");
    drop(v);

    // A fresh object each run: the other node pulls it (5 MiB chunks), then sums it.
    let on_other = TaskOptions::default().strategy(Strategy::NodeAffinity {
        node: other,
        soft: false,
    });
    let mut runs = Vec::new();
    for i in 0..3u8 {
        let blob = vec![i; big];
        let r = sdk::put(&blob)?;
        let expect = sum(&blob);
        drop(blob);
        let t = Instant::now();
        let got = sdk::get(&sum_bytes::remote_with(&on_other, &r))?;
        runs.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            got == expect,
            "the remote task summed {got}, expected {expect}"
        );
        drop(r);
        std::thread::sleep(Duration::from_millis(200));
    }
    let warm = runs[1..].iter().copied().fold(f64::MAX, f64::min);
    emit(
        "transfer_task_cold_gbps",
        big as f64 / runs[0] / 1e9,
        "GB/s",
    );
    emit("transfer_task_gbps", big as f64 / warm / 1e9, "GB/s");
    emit(
        "transfer_task_vs_memcpy",
        big as f64 / warm / 1e9 / base,
        "x",
    );
    Ok(())
}
