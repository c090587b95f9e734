//! Control-plane figures on a 3-head cluster of real processes with fsync on:
//! write throughput (1 and 16 clients) beside the disk's own fsync rate, the CPU time a
//! write costs beside what a bare gRPC call costs (and the rates the vCPUs allow for each),
//! leader failover time (kill -9 → first acknowledged write), and `rayctl start --head` →
//! first status.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb;

use crate::{emit, percentile};

fn fdatasync_per_s(dir: &std::path::Path, d: Duration) -> Result<f64> {
    let mut f = std::fs::File::create(dir.join("fsync-probe"))?;
    let buf = [7u8; 256];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        f.write_all(&buf)?;
        f.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Calls per second with `clients` concurrent callers for `d`, and the machine's CPU
/// time per call meanwhile (every process: the client here and the heads), in seconds.
async fn calls_per_s<F, Fut>(clients: usize, d: Duration, call: F) -> Result<(f64, f64)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (call, done, stop) = (call.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if call(c, i).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let (start, busy) = (Instant::now(), crate::busy_seconds()?);
    tokio::time::sleep(d).await;
    let (n, cpu) = (done.load(Ordering::Relaxed), crate::busy_seconds()? - busy);
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Ok((n as f64 / secs, cpu / n.max(1) as f64))
}

/// KV puts (64-byte values) per second with `clients` concurrent writers, and the CPU
/// time per write.
async fn writes_per_s(client: &HeadClient, clients: usize, d: Duration) -> Result<(f64, f64)> {
    let client = client.clone();
    calls_per_s(clients, d, move |c, i| {
        let client = client.clone();
        async move {
            let req = pb::KvPutRequest {
                namespace: "bench".into(),
                key: format!("{c}-{i}").into_bytes(),
                value: vec![1; 64],
                overwrite: true,
            };
            client
                .call(|mut h| {
                    let r = req.clone();
                    async move { h.kv_put(r).await }
                })
                .await
                .is_ok()
        }
    })
    .await
}

/// `HeadInfo` calls (answered from the leader's memory: no Raft, no disk) per second with
/// `clients` concurrent callers, and the CPU time per call: what the gRPC layer alone costs.
async fn head_info_per_s(client: &HeadClient, clients: usize, d: Duration) -> Result<(f64, f64)> {
    let client = client.clone();
    calls_per_s(clients, d, move |_, _| {
        let client = client.clone();
        async move {
            client
                .call(|mut h| async move { h.head_info(pb::HeadInfoRequest {}).await })
                .await
                .is_ok()
        }
    })
    .await
}

/// The median of one client's sequential `HeadInfo` calls to the leader (answered from
/// memory: no Raft, no disk), in seconds.
async fn rpc_roundtrip_s(c: &Cluster, leader: usize, d: Duration) -> Result<f64> {
    let client = c.client_for(&[c.head_addrs[leader].clone()], ClientOptions::default());
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < d || samples.len() < 100 {
        let t = Instant::now();
        client
            .call(|mut h| async move { h.head_info(pb::HeadInfoRequest {}).await })
            .await?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(percentile(&samples, 0.5))
}

fn failover_trial(c: &mut Cluster, rt: &tokio::runtime::Runtime) -> Result<f64> {
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let opts = ClientOptions {
        deadline: Duration::from_secs(20),
        rpc_timeout: Duration::from_millis(500),
        max_backoff: Duration::from_millis(20),
        ..Default::default()
    };
    let client = c.client_for(&c.head_addrs, opts);
    let stop = Arc::new(AtomicBool::new(false));
    let last_ack = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let writer = {
        let (client, stop, acks) = (client.clone(), stop.clone(), last_ack.clone());
        rt.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = pb::KvPutRequest {
                    namespace: "failover".into(),
                    key: i.to_be_bytes().to_vec(),
                    value: vec![],
                    overwrite: true,
                };
                if client
                    .call(|mut c| {
                        let r = req.clone();
                        async move { c.kv_put(r).await }
                    })
                    .await
                    .is_ok()
                {
                    acks.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
                i += 1;
            }
        })
    };
    wait_for("writes flowing", Duration::from_secs(20), || {
        (last_ack.lock().ok()?.len() > 20).then_some(())
    })?;
    c.heads[leader].kill9();
    let killed = Instant::now();
    let first = wait_for("a write after failover", Duration::from_secs(30), || {
        last_ack.lock().ok()?.iter().find(|t| **t > killed).copied()
    })?;
    stop.store(true, Ordering::Relaxed);
    let _ = rt.block_on(writer);
    c.restart_head(leader)?;
    // Let the restarted head rejoin and catch up before the next trial: a failover with a
    // lagging follower measures the catch-up, not the election.
    wait_for("every head caught up", Duration::from_secs(30), || {
        let s = c.status(None).ok()?;
        let commit = s["commit_index"].as_u64()?;
        let heads = s["heads"].as_array()?;
        let healthy = heads.iter().all(|h| {
            (h["role"] == "leader" || h["role"] == "follower")
                && h["last_applied"].as_u64().unwrap_or(0) >= commit
        });
        (heads.len() == c.heads.len() && healthy).then_some(())
    })?;
    Ok((first - killed).as_secs_f64())
}

/// The leader's cumulative Raft figures (from its `/metrics`).
struct LeaderFigures {
    commit_sum: f64,
    commit_n: f64,
    append_sum: f64,
    append_n: f64,
    batch_sum: f64,
    batch_n: f64,
    wal_writes: f64,
    wal_syncs: f64,
}

impl LeaderFigures {
    fn read(c: &Cluster, leader: usize) -> Option<Self> {
        let port = c.heads[leader].ready["dashboard_port"].as_u64()?;
        let m = |name: &str| c.metric_sum(port, name);
        Some(Self {
            commit_sum: m("rayctl_raft_commit_latency_seconds_sum")?,
            commit_n: m("rayctl_raft_commit_latency_seconds_count")?,
            append_sum: m("rayctl_raft_append_latency_seconds_sum")?,
            append_n: m("rayctl_raft_append_latency_seconds_count")?,
            batch_sum: m("rayctl_raft_proposal_batch_size_sum")?,
            batch_n: m("rayctl_raft_proposal_batch_size_count")?,
            wal_writes: m("rayctl_raft_log_writes_total")?,
            wal_syncs: m("rayctl_raft_log_syncs_total")?,
        })
    }
}

fn head_start_s(smoke: bool) -> Result<f64> {
    let mut samples = Vec::new();
    for _ in 0..if smoke { 1 } else { 5 } {
        let tmp = tempfile::tempdir()?;
        let run = |args: &[&str]| -> Result<std::process::Output> {
            Ok(chaos_tests::rayctl_in(tmp.path())?.args(args).output()?)
        };
        let start = Instant::now();
        let out = run(&["start", "--head", "--port", "0", "--dashboard-port", "0"])?;
        anyhow::ensure!(
            out.status.success(),
            "rayctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for("first status", Duration::from_secs(30), || {
            run(&["status", "--timeout", "2s"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        })?;
        samples.push(start.elapsed().as_secs_f64());
        let _ = run(&["stop", "--grace", "5s"]);
    }
    samples.sort_by(f64::total_cmp);
    Ok(percentile(&samples, 0.5))
}

pub(crate) fn run(smoke: bool, heads: usize) -> Result<()> {
    let d = if smoke {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(5)
    };
    let mut c = Cluster::start(ClusterOptions {
        heads,
        ..Default::default()
    })
    .context("start the heads")?;
    c.wait_leader(Duration::from_secs(30))?;
    let fsync = fdatasync_per_s(
        c.path(),
        if smoke {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        },
    )?;
    emit("fdatasync_per_s", fsync, "1/s");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = {
        let _g = rt.enter();
        c.client()
    };
    // Warm the connections and the leader hint.
    rt.block_on(writes_per_s(&client, 1, Duration::from_millis(100)))?;
    // The floor under one write: a gRPC round trip to the leader (client → leader → client;
    // the leader → follower hop costs the same) and the disk's sync.
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let rpc = rt.block_on(rpc_roundtrip_s(&c, leader, d))?;
    emit("cp_rpc_roundtrip_ms", rpc * 1e3, "ms");
    let floor = 2.0 * rpc + 1.0 / fsync;
    emit("cp_write_floor_ms", floor * 1e3, "ms");
    emit("cp_writes_per_s_16clients_ceiling", 16.0 / floor, "1/s");
    let (w1, _) = rt.block_on(writes_per_s(&client, 1, d))?;
    emit("cp_writes_per_s_1client", w1, "1/s");
    let before = LeaderFigures::read(&c, leader);
    let (w16, cpu16) = rt.block_on(writes_per_s(&client, 16, d))?;
    emit("cp_writes_per_s_16clients", w16, "1/s");
    emit("cp_writes_16clients_over_fdatasync", w16 / fsync, "ratio");
    // What a write costs in CPU (all processes: this client and the heads), beside what a
    // bare gRPC call to the leader costs with as many callers; with the vCPUs here, each
    // bounds the rate the CPU allows (the machine runs nothing else meanwhile).
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    emit("cp_16clients_cpu_us_per_write", cpu16 * 1e6, "us");
    emit("cp_writes_per_s_cpu_ceiling", vcpus / cpu16, "1/s");
    // Where a write's time goes, from the leader's own histograms over the same run.
    if let (Some(a), Some(b)) = (before, LeaderFigures::read(&c, leader)) {
        let per = |sum: f64, n: f64| if n > 0.0 { sum / n } else { 0.0 };
        emit(
            "cp_16clients_commit_ms_mean",
            1e3 * per(b.commit_sum - a.commit_sum, b.commit_n - a.commit_n),
            "ms",
        );
        emit(
            "cp_16clients_leader_append_ms_mean",
            1e3 * per(b.append_sum - a.append_sum, b.append_n - a.append_n),
            "ms",
        );
        emit(
            "cp_16clients_writes_per_entry",
            per(b.batch_sum - a.batch_sum, b.batch_n - a.batch_n),
            "ratio",
        );
        emit(
            "cp_16clients_leader_log_records_per_fsync",
            per(b.wal_writes - a.wal_writes, b.wal_syncs - a.wal_syncs),
            "ratio",
        );
    }
    let (rpcs, rpc_cpu) = rt.block_on(head_info_per_s(&client, 16, d))?;
    emit("cp_rpc_per_s_16clients", rpcs, "1/s");
    emit("cp_rpc_16clients_cpu_us_per_call", rpc_cpu * 1e6, "us");
    emit("cp_rpc_per_s_cpu_ceiling", vcpus / rpc_cpu, "1/s");
    emit("cp_write_cpu_over_rpc_cpu", cpu16 / rpc_cpu, "ratio");

    let trials = if heads < 3 {
        0
    } else if smoke {
        1
    } else {
        12
    };
    let mut fo = Vec::new();
    for _ in 0..trials {
        fo.push(failover_trial(&mut c, &rt)?);
    }
    fo.sort_by(f64::total_cmp);
    if !fo.is_empty() {
        emit("cp_failover_s_p50", percentile(&fo, 0.5), "s");
        emit("cp_failover_s_p99", percentile(&fo, 0.99), "s");
    }
    drop(c);
    emit("head_start_s", head_start_s(smoke)?, "s");
    Ok(())
}
