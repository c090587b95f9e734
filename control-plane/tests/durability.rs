//! Every mutating storage call of the log and state machine stores is durable when it returns:
//! for the state machine a `RaftDb` wrapper counts the writes and which of them a completed
//! flush covers; for the log, the WAL's own counter of fsyncs shows one ran after the call's
//! record was queued. (`append` is durable when its callback fires, a callback only openraft
//! can construct: the tests of a failing flush check that it acknowledges nothing.
//! `save_committed` is the one documented exception: see `LogStore::save_committed`.)

use std::future::Future;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use control_plane::db::{RaftDb, SledRaftDb};
use control_plane::log_store::LogStore;
use control_plane::sm_store::StateMachineStore;
use control_plane::state::Command;
use control_plane::types::TypeConfig;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, Vote,
};

/// `SledRaftDb` that numbers its writes and remembers the highest write a completed flush
/// covers (a flush covers every write made before it was called).
#[derive(Clone)]
struct CountingDb {
    inner: SledRaftDb,
    writes: Arc<AtomicU64>,
    durable: Arc<AtomicU64>,
}

impl CountingDb {
    fn unflushed(&self) -> u64 {
        self.writes.load(Ordering::SeqCst) - self.durable.load(Ordering::SeqCst)
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
}

impl RaftDb for CountingDb {
    fn meta(&self, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.inner.meta(key)
    }
    fn set_meta(&self, key: &str, value: &[u8]) -> std::io::Result<()> {
        self.wrote();
        self.inner.set_meta(key, value)
    }
    fn flush(&self) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
        let upto = self.writes.load(Ordering::SeqCst);
        let durable = self.durable.clone();
        let flush = self.inner.flush();
        async move {
            flush.await?;
            durable.fetch_max(upto, Ordering::SeqCst);
            Ok(())
        }
    }
}

fn lid(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn entry(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: lid(index),
        payload: EntryPayload::Normal(Command::KvPut {
            namespace: "n".into(),
            key: index.to_be_bytes().to_vec(),
            value: b"v".to_vec(),
            overwrite: true,
        }),
    }
}

fn open() -> (tempfile::TempDir, CountingDb) {
    let dir = tempfile::tempdir().unwrap();
    let db = CountingDb {
        inner: SledRaftDb::open(dir.path()).unwrap(),
        writes: Arc::default(),
        durable: Arc::default(),
    };
    (dir, db)
}

/// The store's log, holding entries 1..=10 (durable).
async fn ten_entries(db: &CountingDb) -> LogStore {
    let log = LogStore::open(&db.inner).unwrap();
    log.append_durable((1..=10).map(entry).collect())
        .await
        .unwrap();
    log
}

/// The WAL's fsyncs so far.
fn syncs(log: &LogStore) -> u64 {
    log.flush_metrics().sync_batch_count
}

#[tokio::test]
async fn truncate_is_durable_when_it_returns() {
    let (_dir, db) = open();
    let mut log = ten_entries(&db).await;
    let before = syncs(&log);
    log.truncate(lid(6)).await.unwrap();
    assert!(syncs(&log) > before, "truncate returned before an fsync");
    let left = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(left.last().map(|e| e.log_id), Some(lid(5)));
}

#[tokio::test]
async fn purge_is_durable_when_it_returns() {
    let (_dir, db) = open();
    let mut log = ten_entries(&db).await;
    let before = syncs(&log);
    log.purge(lid(4)).await.unwrap();
    assert!(syncs(&log) > before, "purge returned before an fsync");
    let left = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(left.first().map(|e| e.log_id), Some(lid(5)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(lid(4)));
}

#[tokio::test]
async fn vote_and_snapshots_are_durable_when_they_return() {
    let (_dir, db) = open();
    let mut log = LogStore::open(&db.inner).unwrap();
    let before = syncs(&log);
    log.save_vote(&Vote::new(2, 1)).await.unwrap();
    assert!(syncs(&log) > before, "save_vote returned before an fsync");

    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    sm.apply((1..=3).map(entry)).await.unwrap();
    let snap = sm.build_snapshot().await.unwrap();
    assert_eq!(db.unflushed(), 0, "build_snapshot");

    let (_dir2, db2) = open();
    let mut sm2 = StateMachineStore::open(db2.clone()).unwrap();
    sm2.install_snapshot(
        &snap.meta,
        Box::new(Cursor::new(snap.snapshot.into_inner())),
    )
    .await
    .unwrap();
    assert_eq!(db2.unflushed(), 0, "install_snapshot");
}

/// The log is never purged past the durable snapshot: openraft 0.9 purges a follower's log
/// as soon as it hands a received snapshot to the state machine, and a crash before the
/// state machine stored it used to leave an old snapshot and a log purged past it.
#[tokio::test]
async fn the_log_is_purged_only_up_to_the_durable_snapshot() {
    let (_dir, db) = open();
    let log = ten_entries(&db).await;
    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    let mut log = log.with_snapshot_floor(sm.snapshot_floor());
    // No snapshot yet: nothing goes.
    log.purge(lid(8)).await.unwrap();
    let left = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(left.first().map(|e| e.log_id), Some(lid(1)));
    assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, None);
    // A snapshot of entries 1..=3 is stored: a purge up to 8 stops at 3.
    sm.apply((1..=3).map(entry)).await.unwrap();
    sm.build_snapshot().await.unwrap();
    log.purge(lid(8)).await.unwrap();
    let left = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(left.first().map(|e| e.log_id), Some(lid(4)));
    assert_eq!(
        log.get_log_state().await.unwrap().last_purged_log_id,
        Some(lid(3))
    );
    // Reopened, the floor is the stored snapshot's (3): a purge up to 8 still stops there,
    // and once a snapshot of 1..=6 is stored, one up to 6 goes all the way.
    drop(sm);
    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    let mut log = log.with_snapshot_floor(sm.snapshot_floor());
    log.purge(lid(8)).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_purged_log_id,
        Some(lid(3))
    );
    sm.apply((4..=6).map(entry)).await.unwrap();
    sm.build_snapshot().await.unwrap();
    log.purge(lid(6)).await.unwrap();
    let left = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(left.first().map(|e| e.log_id), Some(lid(7)));
}

/// openraft purges a follower's log up to a snapshot it received before the state machine
/// has stored it, and then appends right after the snapshot. The floor holds that purge back;
/// the WAL has no gaps, so the held-back purge is done before the append, once the snapshot
/// covering it is stored.
#[tokio::test]
async fn a_held_back_purge_is_done_before_the_append_after_the_snapshot() {
    let (_dir, db) = open();
    let log = ten_entries(&db).await;
    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    sm.apply((1..=3).map(entry)).await.unwrap();
    sm.build_snapshot().await.unwrap();
    let mut log = log.with_snapshot_floor(sm.snapshot_floor());
    // A snapshot up to 12 arrives: openraft purges up to 12; the stored snapshot covers 3.
    log.purge(lid(12)).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_purged_log_id,
        Some(lid(3))
    );
    // The state machine stores the snapshot up to 12; then entry 13 comes.
    sm.apply((4..=12).map(entry)).await.unwrap();
    sm.build_snapshot().await.unwrap();
    log.append_durable(vec![entry(13)]).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(lid(12)));
    assert_eq!(state.last_log_id, Some(lid(13)));
    let left = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(left, vec![entry(13)]);
}
