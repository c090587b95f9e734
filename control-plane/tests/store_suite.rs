//! openraft's storage conformance suite against the sled-backed log and state machine
//! stores, each run on a fresh sled directory on disk.

use control_plane::db::SledRaftDb;
use control_plane::log_store::LogStore;
use control_plane::sm_store::StateMachineStore;
use control_plane::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl
    StoreBuilder<TypeConfig, LogStore<SledRaftDb>, StateMachineStore<SledRaftDb>, tempfile::TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            tempfile::TempDir,
            LogStore<SledRaftDb>,
            StateMachineStore<SledRaftDb>,
        ),
        StorageError,
    > {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = SledRaftDb::open(dir.path()).expect("open sled");
        let sm = StateMachineStore::open(db.clone())?;
        Ok((dir, LogStore::new(db), sm))
    }
}

#[test]
#[allow(clippy::result_large_err)] // openraft's own error type
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(SledBuilder)
}

/// What is acknowledged survives reopening the files (the process-level kill -9 test lives
/// in chaos-tests).
#[tokio::test]
async fn vote_and_snapshot_survive_reopen() {
    use control_plane::state::Command;
    use openraft::storage::{RaftLogStorage, RaftStateMachine};
    use openraft::{Entry, EntryPayload, LogId, RaftSnapshotBuilder, Vote};

    let dir = tempfile::tempdir().unwrap();
    {
        let db = SledRaftDb::open(dir.path()).unwrap();
        let mut log = LogStore::new(db.clone());
        log.save_vote(&Vote::new(3, 7)).await.unwrap();
        let mut sm = StateMachineStore::open(db).unwrap();
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 7), 1),
            payload: EntryPayload::Normal(Command::KvPut {
                namespace: "n".into(),
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                overwrite: true,
            }),
        };
        sm.apply([entry]).await.unwrap();
        sm.build_snapshot().await.unwrap();
    }
    // The dropped store's flusher task lets go of the files asynchronously.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let db = loop {
        match SledRaftDb::open(dir.path()) {
            Ok(db) => break db,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen failed: {e}"),
        }
    };
    let mut log = LogStore::new(db.clone());
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 7)));
    let sm = StateMachineStore::open(db).unwrap();
    let st = sm.reader();
    let g = st.read();
    assert_eq!(g.last_applied.map(|l| l.index), Some(1));
    assert_eq!(
        g.state
            .kv
            .get(&("n".to_string(), b"k".to_vec()))
            .map(Vec::as_slice),
        Some(&b"v"[..])
    );
}
