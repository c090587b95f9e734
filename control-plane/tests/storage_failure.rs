//! A head whose log flush fails (a full disk) acknowledges nothing it could not persist,
//! counts and logs the failure, and says so through `raft_failure` (which the `rayctl` head
//! turns into an exit). One in-process single-head Raft over a store whose flush can be made
//! to fail with ENOSPC. The multi-process version, on a real full tmpfs, is
//! `chaos-tests/tests/disk_full.rs`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use control_plane::db::{RaftDb, SledRaftDb};
use control_plane::log_store::LogStore;
use control_plane::network::GrpcRaftNetworkFactory;
use control_plane::sm_store::StateMachineStore;
use control_plane::state::Command;
use control_plane::types::Raft;
use openraft::error::RaftError;
use openraft::{BasicNode, Config, ServerState};

/// `SledRaftDb` whose `flush` fails with ENOSPC once told to (and then flushes nothing).
#[derive(Clone)]
struct FullDiskDb {
    inner: SledRaftDb,
    full: Arc<AtomicBool>,
}

impl RaftDb for FullDiskDb {
    fn meta(&self, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.inner.meta(key)
    }
    fn set_meta(&self, key: &str, value: &[u8]) -> std::io::Result<()> {
        self.inner.set_meta(key, value)
    }
    fn put_logs(&self, entries: Vec<(u64, Vec<u8>)>) -> std::io::Result<()> {
        self.inner.put_logs(entries)
    }
    fn logs(&self, from: u64, to_exclusive: u64) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        self.inner.logs(from, to_exclusive)
    }
    fn last_log(&self) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        self.inner.last_log()
    }
    fn remove_logs(&self, from: u64, to_exclusive: u64) -> std::io::Result<()> {
        self.inner.remove_logs(from, to_exclusive)
    }
    fn flush(&self) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
        let full = self.full.load(Ordering::SeqCst);
        let flush = self.inner.flush();
        async move {
            if full {
                // ENOSPC, as the kernel reports a write to a full filesystem.
                return Err(std::io::Error::from_raw_os_error(28));
            }
            flush.await
        }
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

/// A one-head group, leading, over `db`; and the reader of its applied state.
async fn one_head(db: FullDiskDb) -> (Raft, control_plane::sm_store::StateReader) {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Default::default()
    }
    .validate()
    .unwrap();
    let sm = StateMachineStore::open(db.clone()).unwrap();
    let reader = sm.reader();
    let raft = Raft::new(
        1,
        Arc::new(config),
        GrpcRaftNetworkFactory::new(None),
        LogStore::new(db),
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
    let db = FullDiskDb {
        inner: SledRaftDb::open(dir.path()).unwrap(),
        full: Arc::default(),
    };
    let (raft, state) = one_head(db.clone()).await;
    raft.client_write(put("before")).await.unwrap();
    let failure = tokio::spawn(control_plane::raft_failure(raft.metrics()));

    db.full.store(true, Ordering::SeqCst);
    let r = raft.client_write(put("after")).await;
    assert!(
        matches!(r, Err(RaftError::Fatal(_))),
        "a write whose log flush failed was answered {r:?}"
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
    assert!(kv.contains_key(&("n".to_string(), b"before".to_vec())));
    assert!(!kv.contains_key(&("n".to_string(), b"after".to_vec())));
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
    let db = FullDiskDb {
        inner: SledRaftDb::open(dir.path()).unwrap(),
        full: Arc::default(),
    };
    let (raft, _) = one_head(db).await;
    let failure = control_plane::raft_failure(raft.metrics());
    raft.shutdown().await.unwrap();
    assert_eq!(raft.metrics().borrow().state, ServerState::Shutdown);
    if let Ok(why) = tokio::time::timeout(Duration::from_millis(500), failure).await {
        panic!("a shutdown was reported as a failure: {why}");
    }
}
