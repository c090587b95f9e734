//! Control-plane figures on a 3-head cluster of real processes with fsync on:
//! write throughput (1 and 16 clients) beside the disk's own fsync rate, leader failover
//! time (kill -9 → first acknowledged write), and `rayctl start --head` → first status.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb;

use crate::{emit, percentile};

fn fsync_per_s(dir: &std::path::Path, d: Duration) -> Result<f64> {
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

async fn writes_per_s(client: &HeadClient, clients: usize, d: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, done, stop) = (client.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = pb::KvPutRequest {
                    namespace: "bench".into(),
                    key: format!("{c}-{i}").into_bytes(),
                    value: vec![1; 64],
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
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / secs
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
    let fsync = fsync_per_s(
        c.path(),
        if smoke {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        },
    )?;
    emit("fsync_per_s", fsync, "1/s");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = {
        let _g = rt.enter();
        c.client()
    };
    // Warm the connections and the leader hint.
    rt.block_on(writes_per_s(&client, 1, Duration::from_millis(100)));
    let w1 = rt.block_on(writes_per_s(&client, 1, d));
    emit("cp_writes_per_s_1client", w1, "1/s");
    let w16 = rt.block_on(writes_per_s(&client, 16, d));
    emit("cp_writes_per_s_16clients", w16, "1/s");
    emit("cp_writes_16clients_over_fsync", w16 / fsync, "ratio");

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
