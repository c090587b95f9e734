//! A head whose log flush fails (a full disk) acknowledges nothing it could not persist,
//! counts and logs the failure, and says so through `raft_failure` (which the `rayctl` head
//! turns into an exit). One in-process single-head Raft whose log (the WAL) is on a small
//! tmpfs that the test fills: the kernel's own ENOSPC. Needs root (it mounts); the mount is
//! lazily unmounted when the guard drops, also when the test fails. The multi-process
//! version is `chaos-tests/tests/disk_full.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use control_plane::db::SledRaftDb;
use control_plane::log_store::LogStore;
use control_plane::network::GrpcRaftNetworkFactory;
use control_plane::sm_store::StateMachineStore;
use control_plane::state::Command;
use control_plane::types::Raft;
use openraft::error::RaftError;
use openraft::{BasicNode, Config, ServerState};

/// A tmpfs of `size` mounted on `dir`, unmounted (lazily) on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs (a disk that fills up), which needs root"
        );
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "rayctl-wal-full",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mount -t tmpfs on {} failed: {st}",
            dir.display()
        );
        Self(dir.into())
    }

    /// Fills the filesystem until the kernel says ENOSPC.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        for chunk in [64 * 1024, 4096, 512, 1] {
            let buf = vec![0u8; chunk];
            loop {
                match f.write_all(&buf) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(28) => break,
                    Err(e) => panic!("filling the tmpfs: {e}"),
                }
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn put(key: &str) -> Command {
    Command::KvPut {
        namespace: "n".into(),
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        overwrite: true,
    }
}

/// A one-head group, leading, over the snapshot store `db` and the log `log`; and the reader
/// of its applied state.
async fn one_head(db: SledRaftDb, log: LogStore) -> (Raft, control_plane::sm_store::StateReader) {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Default::default()
    }
    .validate()
    .unwrap();
    let sm = StateMachineStore::open(db).unwrap();
    let reader = sm.reader();
    let raft = Raft::new(
        1,
        Arc::new(config),
        GrpcRaftNetworkFactory::new(None),
        log,
        sm,
    )
    .await
    .unwrap();
    raft.initialize(BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]))
        .await
        .unwrap();
    raft.wait(Some(Duration::from_secs(10)))
        .state(ServerState::Leader, "leader")
        .await
        .unwrap();
    (raft, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_flush_acknowledges_nothing_and_stops_raft() {
    // Only this test in this binary installs a recorder.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder");

    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("wal"), "1m");
    let log = LogStore::open_dir(&dir.path().join("wal")).unwrap();
    let (raft, state) = one_head(SledRaftDb::open(&dir.path().join("sled")).unwrap(), log).await;
    raft.client_write(put("before")).await.unwrap();
    let failure = tokio::spawn(control_plane::raft_failure(raft.metrics()));

    fs.fill();
    // What is left of the WAL file's last page still takes a few records; a write that
    // needs a new page fails.
    let mut acked = Vec::new();
    let failed = loop {
        let key = format!("after-{}", acked.len());
        match raft.client_write(put(&key)).await {
            Ok(_) => acked.push(key),
            Err(e) => break (key, e),
        }
        assert!(
            acked.len() < 1000,
            "1000 writes acknowledged on a full disk"
        );
    };
    assert!(
        matches!(failed.1, RaftError::Fatal(_)),
        "a write whose log flush failed was answered {:?}",
        failed.1
    );
    let why = tokio::time::timeout(Duration::from_secs(10), failure)
        .await
        .expect("raft_failure resolves")
        .unwrap();
    eprintln!("raft_failure: {why}");
    assert!(why.contains("No space left on device"), "{why}");
    assert_eq!(raft.metrics().borrow().state, ServerState::Shutdown);
    // Nothing of the failed write was applied (nothing could have been read back as OK).
    let kv = state.read().state.kv.clone();
    for k in std::iter::once("before").chain(acked.iter().map(String::as_str)) {
        assert!(
            kv.contains_key(&("n".to_string(), k.as_bytes().to_vec())),
            "{k}"
        );
    }
    assert!(!kv.contains_key(&("n".to_string(), failed.0.into_bytes())));
    // Later writes fail too: the core is gone.
    assert!(raft.client_write(put("later")).await.is_err());

    let text = prometheus.render();
    let flush_errors = text
        .lines()
        .find(|l| l.starts_with("rayctl_raft_storage_errors_total{op=\"flush\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(flush_errors >= Some(1.0), "{text}");
}

/// A shutdown asked for is not a failure: `raft_failure` stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_is_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let db = SledRaftDb::open(dir.path()).unwrap();
    let log = LogStore::open(&db).unwrap();
    let (raft, _) = one_head(db, log).await;
    let failure = control_plane::raft_failure(raft.metrics());
    raft.shutdown().await.unwrap();
    assert_eq!(raft.metrics().borrow().state, ServerState::Shutdown);
    if let Ok(why) = tokio::time::timeout(Duration::from_millis(500), failure).await {
        panic!("a shutdown was reported as a failure: {why}");
    }
}
