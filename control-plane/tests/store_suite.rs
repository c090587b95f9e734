//! openraft's storage conformance suite against the log store (the write-ahead log) and the
//! sled-backed state machine store, each run on a fresh directory on disk.

use control_plane::db::SledRaftDb;
use control_plane::log_store::LogStore;
use control_plane::sm_store::StateMachineStore;
use control_plane::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore<SledRaftDb>, tempfile::TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore<SledRaftDb>), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = SledRaftDb::open(dir.path()).expect("open sled");
        let sm = StateMachineStore::open(db.clone())?;
        let log = LogStore::open(&db).expect("open the log");
        Ok((dir, log, sm))
    }
}

type S = Suite<TypeConfig, LogStore, StateMachineStore<SledRaftDb>, SledBuilder, tempfile::TempDir>;

/// Every case of openraft's suite (`Suite::test_all`'s list, each on a fresh store) but
/// `get_initial_state_membership_from_log_and_sm`: that one appends entry 1 after the log
/// was purged up to 2, which openraft itself never does and which the WAL refuses by design
/// (an append at or below the last log id is an error: see
/// `an_append_below_the_last_entry_is_refused`).
#[test]
fn openraft_storage_suite() {
    macro_rules! each {
        ($($case:ident),* $(,)?) => {$(
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let r = rt.block_on(async {
                let (_dir, log, sm) = SledBuilder.build().await?;
                S::$case(log, sm).await
            });
            if let Err(e) = r {
                panic!("{}: {e}", stringify!($case));
            }
        )*};
    }
    each!(
        last_membership_in_log_initial,
        last_membership_in_log,
        last_membership_in_log_multi_step,
        get_membership_initial,
        get_membership_from_log_and_empty_sm,
        get_membership_from_empty_log_and_sm,
        get_membership_from_log_le_sm_last_applied,
        get_membership_from_log_gt_sm_last_applied_1,
        get_membership_from_log_gt_sm_last_applied_2,
        get_initial_state_without_init,
        get_initial_state_with_state,
        get_initial_state_last_log_gt_sm,
        get_initial_state_last_log_lt_sm,
        get_initial_state_log_ids,
        get_initial_state_re_apply_committed,
        save_vote,
        get_log_entries,
        limited_get_log_entries,
        try_get_log_entry,
        initial_logs,
        get_log_state,
        get_log_id,
        last_id_in_log,
        last_applied_state,
        purge_logs_upto_0,
        purge_logs_upto_5,
        purge_logs_upto_20,
        delete_logs_since_11,
        delete_logs_since_0,
        append_to_log,
        snapshot_meta,
        apply_single,
        apply_multiple,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(S::transfer_snapshot(&SledBuilder)) {
        panic!("transfer_snapshot: {e}");
    }
}

/// The WAL refuses an append at or below its last entry (openraft truncates first), and the
/// refused append changes nothing.
#[tokio::test]
async fn an_append_below_the_last_entry_is_refused() {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader};
    let blank = |i| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
        payload: EntryPayload::Blank,
    };
    let (_dir, mut log, _sm) = SledBuilder.build().await.unwrap();
    log.append_durable(vec![blank(1), blank(2)]).await.unwrap();
    let err = log
        .append_durable(vec![blank(2)])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot be reversed"), "{err}");
    let all = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(all, vec![blank(1), blank(2)]);
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
        let mut log = LogStore::open(&db).unwrap();
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
    let mut log = reopen_log(&db).await;
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

/// The WAL's directory lock of a dropped store is let go when its flush worker ends: retry
/// the open for a while.
async fn reopen_log(db: &SledRaftDb) -> LogStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match LogStore::open(db) {
            Ok(log) => return log,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopening the log failed: {e}"),
        }
    }
}
