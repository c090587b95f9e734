//! Every mutating storage call of the log and state machine stores is durable when it returns:
//! a `RaftDb` wrapper counts the writes and which of them a completed flush covers.
//! (`append` is durable when its callback fires, a callback only openraft can construct: the
//! tests of a failing flush check that it acknowledges nothing. `save_committed` is the one
//! documented exception: see `LogStore::save_committed`.)

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
    fn put_logs(&self, entries: Vec<(u64, Vec<u8>)>) -> std::io::Result<()> {
        self.wrote();
        self.inner.put_logs(entries)
    }
    fn logs(&self, from: u64, to_exclusive: u64) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        self.inner.logs(from, to_exclusive)
    }
    fn last_log(&self) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        self.inner.last_log()
    }
    fn remove_logs(&self, from: u64, to_exclusive: u64) -> std::io::Result<()> {
        self.wrote();
        self.inner.remove_logs(from, to_exclusive)
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

/// Ten entries in the log, in the store's encoding, made durable so only the call under test
/// counts.
async fn ten_entries(db: &CountingDb) {
    let raw = (1..=10)
        .map(|i| (i, control_plane::format::encode_entry(&entry(i)).unwrap()))
        .collect();
    db.put_logs(raw).unwrap();
    db.flush().await.unwrap();
    assert_eq!(db.unflushed(), 0);
}

#[tokio::test]
async fn truncate_is_durable_when_it_returns() {
    let (_dir, db) = open();
    ten_entries(&db).await;
    let mut log = LogStore::new(db.clone());
    log.truncate(lid(6)).await.unwrap();
    assert_eq!(db.unflushed(), 0, "truncate returned before a flush");
    let left = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(left.last().map(|e| e.log_id), Some(lid(5)));
}

#[tokio::test]
async fn purge_is_durable_when_it_returns() {
    let (_dir, db) = open();
    ten_entries(&db).await;
    let mut log = LogStore::new(db.clone());
    log.purge(lid(4)).await.unwrap();
    assert_eq!(db.unflushed(), 0, "purge returned before a flush");
    let left = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    assert_eq!(left.first().map(|e| e.log_id), Some(lid(5)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(lid(4)));
}

#[tokio::test]
async fn vote_and_snapshots_are_durable_when_they_return() {
    let (_dir, db) = open();
    let mut log = LogStore::new(db.clone());
    log.save_vote(&Vote::new(2, 1)).await.unwrap();
    assert_eq!(db.unflushed(), 0, "save_vote");

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
    ten_entries(&db).await;
    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    let mut log = LogStore::with_snapshot_floor(db.clone(), sm.snapshot_floor());
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
    drop((sm, log));
    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    let mut log = LogStore::with_snapshot_floor(db.clone(), sm.snapshot_floor());
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
