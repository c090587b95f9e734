//! A head whose disk fills up stops: it acknowledges no write it could not persist, logs the
//! OS error with its store's directory and exits non-zero (so a supervisor restarts it),
//! while the majority keeps taking writes. With space freed, the same head restarted on the
//! same data dir rejoins and catches up to the same state.
//!
//! The head's Raft store (`<data-dir>/raft`) is moved onto a small tmpfs (the head is killed
//! and restarted around the move), which a filler file then fills. Needs root (it mounts);
//! the mount is lazily unmounted when the guard drops, also when the test fails.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos_tests::disk::{Tmpfs, copy_dir};
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use protocol::client::ClientOptions;
use protocol::pb;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Head `i`'s own HeadInfo (asked of it alone).
fn head_info(c: &Cluster, i: usize) -> Option<pb::HeadInfoReply> {
    let client = c.client_for(
        &[c.head_addrs[i].clone()],
        ClientOptions {
            deadline: Duration::from_secs(2),
            ..Default::default()
        },
    );
    rt().block_on(client.call(|mut h| async move { h.head_info(pb::HeadInfoRequest {}).await }))
        .ok()
}

/// Kills head `i`, moves its Raft store onto a fresh tmpfs and starts it again there.
fn move_store_to_tmpfs(c: &mut Cluster, i: usize) -> Result<Tmpfs> {
    c.heads[i].kill9();
    let store = c.path().join(format!("head-{i}")).join("raft");
    let aside = store.with_extension("before-tmpfs");
    std::fs::rename(&store, &aside)?;
    let fs = Tmpfs::mount(&store, "8m")?;
    copy_dir(&aside, &store)?;
    c.restart_head(i)?;
    Ok(fs)
}

/// KV puts of keys 0, 1, 2, … through every head until stopped; the keys acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(c: &Cluster) -> Self {
        let client = c.client();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            rt().block_on(async move {
                let mut key = 0u64;
                while !s.load(Ordering::SeqCst) {
                    let req = pb::KvPutRequest {
                        namespace: "disk-full".into(),
                        key: key.to_be_bytes().to_vec(),
                        value: key.to_string().into_bytes(),
                        overwrite: true,
                    };
                    let r = client
                        .call(|mut h| {
                            let req = req.clone();
                            async move { h.kv_put(req).await }
                        })
                        .await;
                    if r.is_ok() {
                        a.lock().unwrap().push(key);
                    }
                    key += 1;
                }
            })
        });
        Self {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The exit status of head `i` once it has exited (peeked with `WNOWAIT`, then reaped).
fn wait_exit(c: &mut Cluster, i: usize, timeout: Duration) -> Result<WaitStatus> {
    let pid = c.heads[i].pid().context("the head is not running")?;
    let status = wait_for(&format!("head-{i} to exit"), timeout, || {
        match waitid(
            Id::Pid(Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::StillAlive) | Err(_) => None,
            Ok(st) => Some(st),
        }
    })?;
    assert!(c.heads[i].exited(), "head-{i} exited but was not reaped");
    Ok(status)
}

/// Three heads, each with its store on its own tmpfs (moved one at a time, so a quorum
/// always runs); the leader's or a follower's fills up while a writer keeps writing.
fn run(full_is_leader: bool) -> Result<()> {
    let started = Instant::now();
    let mut c = Cluster::start(ClusterOptions {
        heads: 3,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let mut mounts = Vec::new();
    for i in 0..3 {
        mounts.push(move_store_to_tmpfs(&mut c, i)?);
        wait_for(
            &format!("head-{i} back in the group"),
            Duration::from_secs(30),
            || head_info(&c, i).filter(|h| h.last_applied > 0 && !h.leader.is_empty()),
        )?;
    }
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let victim = if full_is_leader {
        leader
    } else {
        (leader + 1) % 3
    };
    // Locals drop in reverse: the mounts go (lazily) before the cluster removes its dir.
    let fs = &mounts[victim];
    let writer = Writer::start(&c);
    wait_for(
        "writes before the disk fills",
        Duration::from_secs(20),
        || (writer.acked() >= 20).then_some(()),
    )?;
    fs.fill()?;
    let status = wait_exit(&mut c, victim, Duration::from_secs(60))?;
    let log = std::fs::read_to_string(c.path().join(format!("head-{victim}.log")))?;
    assert!(
        matches!(status, WaitStatus::Exited(_, code) if code != 0),
        "head-{victim} ended with {status:?}, expected a non-zero exit:\n{}",
        c.heads[victim].log_tail()
    );
    for want in [
        "No space left on device",
        "a head that cannot persist must not keep running",
        &format!("head-{victim}/raft"),
    ] {
        assert!(
            log.contains(want),
            "head-{victim}'s log lacks {want:?}:\n{}",
            c.heads[victim].log_tail()
        );
    }

    // The majority keeps taking writes.
    let at_exit = writer.acked();
    wait_for(
        "writes through the two heads left",
        Duration::from_secs(20),
        || (writer.acked() >= at_exit + 30).then_some(()),
    )?;
    let acked = writer.stop();

    // Freed, restarted on the same data dir: it rejoins and catches up.
    fs.free()?;
    c.restart_head(victim)?;
    let others: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let (ours, theirs) = wait_for(
        &format!("head-{victim} to catch up to the same state"),
        Duration::from_secs(30),
        || {
            let ours = head_info(&c, victim)?;
            let theirs = others
                .iter()
                .filter_map(|i| head_info(&c, *i))
                .find(|h| h.role == "leader")?;
            (ours.state_hash_index == theirs.state_hash_index
                && ours.last_applied >= theirs.last_applied
                && ours.state_hash_index > 0)
                .then_some((ours, theirs))
        },
    )?;
    assert_eq!(
        ours.state_hash, theirs.state_hash,
        "head-{victim} and the leader differ at index {}",
        ours.state_hash_index
    );

    // No acknowledged write is missing (some were acknowledged by the head that filled up).
    let client = c.client();
    let found: BTreeMap<u64, Vec<u8>> = rt().block_on(async {
        let mut out = BTreeMap::new();
        for k in &acked {
            let req = pb::KvGetRequest {
                namespace: "disk-full".into(),
                key: k.to_be_bytes().to_vec(),
            };
            if let Ok(r) = client
                .call(|mut h| {
                    let req = req.clone();
                    async move { h.kv_get(req).await }
                })
                .await
            {
                out.insert(*k, r.value);
            }
        }
        out
    });
    let missing: Vec<&u64> = acked
        .iter()
        .filter(|k| found.get(k) != Some(&k.to_string().into_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing: {missing:?}"
    );
    eprintln!(
        "{} writes acknowledged, head-{victim} caught up at index {}, in {:?}",
        acked.len(),
        ours.state_hash_index,
        started.elapsed()
    );
    Ok(())
}

#[test]
fn a_follower_whose_disk_fills_exits_and_catches_up_after_restart() -> Result<()> {
    run(false)
}

#[test]
fn a_leader_whose_disk_fills_exits_and_catches_up_after_restart() -> Result<()> {
    run(true)
}
