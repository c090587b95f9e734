//! The on-disk format: what today's data dirs hold stays readable, and bytes of a format this
//! build does not know are refused with an error naming the version, before anything else of
//! them is decoded.
//!
//! The fixtures in `tests/fixtures/` were written by the code before the format stamp
//! (format 1): `format1-entry-*.bin` are postcard-encoded log entries, `format1-snapshot-v3.bin`
//! a snapshot's bytes, `format1-db/` a sled data dir (entries 1..=4, a vote, a snapshot at 3).
//! Formats 1 and 2 kept the Raft log in sled; format 3 keeps it in the write-ahead log
//! (`wal/`), and opening the log moves an older store's log there.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use control_plane::db::{RaftDb, SledRaftDb};
use control_plane::log_store::LogStore;
use control_plane::sm_store::StateMachineStore;
use control_plane::state::Command;
use control_plane::types::TypeConfig;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, Vote,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn lid(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(3, 7), index)
}

/// The entries the fixtures hold (as the code that wrote them built them).
fn fixture_entries() -> Vec<Entry<TypeConfig>> {
    let nodes: std::collections::BTreeMap<u64, BasicNode> = [(
        7u64,
        BasicNode {
            addr: "127.0.0.1:6379".into(),
        },
    )]
    .into();
    vec![
        Entry {
            log_id: lid(1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: lid(2),
            payload: EntryPayload::Membership(Membership::new(
                vec![std::collections::BTreeSet::from([7u64])],
                nodes,
            )),
        },
        Entry {
            log_id: lid(3),
            payload: EntryPayload::Normal(Command::Batch(vec![
                Command::KvPut {
                    namespace: "ns".into(),
                    key: b"k1".to_vec(),
                    value: b"v1".to_vec(),
                    overwrite: true,
                },
                Command::SubmitJob {
                    job_id: "02000000".into(),
                    submission_id: Some("raysubmit_fixture".into()),
                    entrypoint: "python -c 'print(1)'".into(),
                    runtime_env_json: "{}".into(),
                    metadata: [("owner".to_string(), "fixture".to_string())].into(),
                    resources: [("CPU".to_string(), 1.0)].into(),
                    max_retries: 2,
                    priority: 5,
                    client_token: "tok".into(),
                    time_ms: 1_700_000_000_000,
                },
            ])),
        },
        Entry {
            log_id: lid(4),
            payload: EntryPayload::Normal(Command::KvPut {
                namespace: "ns".into(),
                key: b"k2".to_vec(),
                value: b"v2".to_vec(),
                overwrite: false,
            }),
        },
    ]
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// sled lets go of a dropped db's files asynchronously: retry the open for a while.
async fn reopen(dir: &Path) -> std::io::Result<SledRaftDb> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledRaftDb::open(dir) {
            Err(e)
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("lock"))
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

const FORMAT_KEY: &str = "format";

fn stamp(db: &SledRaftDb) -> Option<u32> {
    db.meta(FORMAT_KEY)
        .unwrap()
        .map(|b| u32::from_be_bytes(b.as_slice().try_into().expect("a 4-byte stamp")))
}

/// The store's log (moved into the WAL if it was still in sled). A dropped store's WAL lets
/// go of its directory lock when its flush worker ends: retry for a while.
async fn open_log(db: &SledRaftDb) -> LogStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match LogStore::open(db) {
            Ok(log) => return log,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("opening the log failed: {e}"),
        }
    }
}

async fn all_entries(log: &LogStore) -> Vec<Entry<TypeConfig>> {
    log.clone().try_get_log_entries(0..u64::MAX).await.unwrap()
}

/// A format-2 store (the log in sled) holding `entries`, a vote, a commit index and a purge
/// point, as builds before format 3 wrote it.
fn format2_store(
    dir: &Path,
    entries: &[Entry<TypeConfig>],
    purged: Option<LogId<u64>>,
) -> SledRaftDb {
    let db = SledRaftDb::open(dir).unwrap();
    db.set_meta(FORMAT_KEY, &2u32.to_be_bytes()).unwrap();
    db.set_meta(
        "vote",
        &postcard::to_allocvec(&Vote::<u64>::new_committed(3, 7)).unwrap(),
    )
    .unwrap();
    let committed = entries.last().map(|e| e.log_id).or(purged);
    db.set_meta("committed", &postcard::to_allocvec(&committed).unwrap())
        .unwrap();
    if let Some(p) = purged {
        db.set_meta("last_purged", &postcard::to_allocvec(&p).unwrap())
            .unwrap();
    }
    db.put_legacy_logs(
        entries
            .iter()
            .map(|e| {
                (
                    e.log_id.index,
                    control_plane::format::encode_entry(e).unwrap(),
                )
            })
            .collect(),
    )
    .unwrap();
    db
}

/// A data dir the code before the format stamp wrote opens, is stamped with today's format,
/// and reads the same entries, vote and snapshot, also when opened again (the migration does
/// not run twice).
#[tokio::test]
async fn format1_data_dir_opens_is_stamped_and_reads_its_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("raft");
    copy_dir(&fixture("format1-db"), &dir);
    for round in 0..2 {
        let db = reopen(&dir).await.unwrap();
        let mut log = open_log(&db).await;
        assert_eq!(stamp(&db), Some(3), "round {round}: the stamp");
        assert_eq!(all_entries(&log).await, fixture_entries(), "round {round}");
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(3, 7))
        );
        assert_eq!(log.read_committed().await.unwrap(), Some(lid(4)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(lid(4)));
        let sm = StateMachineStore::open(db.clone()).unwrap();
        let applied = sm.reader().read().clone();
        assert_eq!(applied.last_applied, Some(lid(3)));
        assert_eq!(
            applied.state.kv.get(&("ns".to_string(), b"k1".to_vec())),
            Some(&b"v1".to_vec())
        );
        assert!(applied.state.jobs.contains_key("02000000"));
        drop((db, log, sm));
    }
}

/// The single-entry fixtures, written into an unstamped sled db in today's layout (trees
/// `logs` with big-endian index keys and `meta`), read back as the entries they were.
#[tokio::test]
async fn format1_entry_fixtures_in_an_unstamped_db_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let raw = sled::open(tmp.path()).unwrap();
        let logs = raw.open_tree("logs").unwrap();
        for (i, name) in [
            (2u64, "format1-entry-membership.bin"),
            (3, "format1-entry-normal.bin"),
        ] {
            logs.insert(i.to_be_bytes(), std::fs::read(fixture(name)).unwrap())
                .unwrap();
        }
        raw.flush().unwrap();
    }
    let db = reopen(tmp.path()).await.unwrap();
    assert_eq!(stamp(&db), Some(2));
    let log = open_log(&db).await;
    assert_eq!(stamp(&db), Some(3));
    assert_eq!(all_entries(&log).await, fixture_entries()[1..3].to_vec());
}

/// A format-2 store's log (entries, vote, commit index, purge point) is moved into the WAL
/// on open and sled's copy dropped; reopened, it reads the same from the WAL alone.
#[tokio::test]
async fn a_format2_log_moves_into_the_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = fixture_entries()[2..].to_vec();
    let db = format2_store(tmp.path(), &entries, Some(lid(2)));
    for round in 0..2 {
        let mut log = open_log(&db).await;
        assert_eq!(stamp(&db), Some(3), "round {round}");
        assert!(db.legacy_log().unwrap().is_none(), "round {round}");
        assert_eq!(all_entries(&log).await, entries, "round {round}");
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(3, 7)),
            "round {round}"
        );
        assert_eq!(
            log.read_committed().await.unwrap(),
            Some(lid(4)),
            "round {round}"
        );
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(lid(2)), "round {round}");
        assert_eq!(state.last_log_id, Some(lid(4)), "round {round}");
        drop(log);
    }
}

/// A move that crashed after writing the WAL but before sled's copy was dropped (the stamp
/// still says 2) starts over: whatever the WAL held is replaced by sled's log.
#[tokio::test]
async fn a_crashed_move_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = fixture_entries();
    let db = format2_store(tmp.path(), &entries, None);
    {
        // A half-written WAL: other entries than sled's.
        let stray = LogStore::open_dir(&tmp.path().join("wal")).unwrap();
        let mut other = fixture_entries()[..1].to_vec();
        other[0].log_id = LogId::new(CommittedLeaderId::new(9, 9), 1);
        stray.append_durable(other).await.unwrap();
    }
    let log = open_log(&db).await;
    assert_eq!(all_entries(&log).await, entries);
    assert_eq!(stamp(&db), Some(3));
}

/// Today's snapshot bytes install, and a snapshot built from them is the same bytes (so a
/// build before the stamp also reads what this one sends).
#[tokio::test]
async fn format1_snapshot_fixture_installs_and_is_rebuilt_byte_for_byte() {
    let bytes = std::fs::read(fixture("format1-snapshot-v3.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let db = SledRaftDb::open(tmp.path()).unwrap();
    let mut sm = StateMachineStore::open(db).unwrap();
    let meta = SnapshotMeta {
        last_log_id: Some(lid(4)),
        last_membership: Default::default(),
        snapshot_id: "fixture".into(),
    };
    sm.install_snapshot(&meta, Box::new(Cursor::new(bytes.clone())))
        .await
        .unwrap();
    let applied = sm.reader().read().clone();
    assert_eq!(applied.last_applied, Some(lid(4)));
    assert_eq!(
        applied.state.kv.get(&("ns".to_string(), b"k2".to_vec())),
        Some(&b"v2".to_vec())
    );
    let rebuilt = sm.build_snapshot().await.unwrap();
    assert_eq!(rebuilt.snapshot.into_inner(), bytes);
}

/// A fresh data dir carries this build's format stamp as soon as it is opened.
#[tokio::test]
async fn a_fresh_data_dir_is_stamped() {
    let tmp = tempfile::tempdir().unwrap();
    let db = SledRaftDb::open(tmp.path()).unwrap();
    assert_eq!(stamp(&db), Some(3));
}

/// A data dir stamped with a format this build does not know is refused on open with the
/// version named, before anything else in it (here: entries that are not even postcard) is
/// read.
#[tokio::test]
async fn a_data_dir_of_an_unknown_format_is_refused_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let db = SledRaftDb::open(tmp.path()).unwrap();
        db.set_meta(FORMAT_KEY, &9u32.to_be_bytes()).unwrap();
        db.put_legacy_logs(vec![(1, vec![0xff; 16])]).unwrap();
        db.flush().await.unwrap();
    }
    let err = match reopen(tmp.path()).await {
        Ok(_) => panic!("a data dir of format 9 opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "this data dir was written by format version 9; this build reads versions 1..=3"
        ),
        "{err}"
    );
}

/// A log entry whose version this build does not know is refused with the version named
/// (postcard is not self-describing: decoding it as today's entry could yield another
/// command): here in a format-2 log, whose move into the WAL decodes every entry, so the
/// log does not open, and sled's copy stays as it was.
#[tokio::test]
async fn a_log_entry_of_an_unknown_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let db = format2_store(tmp.path(), &[], None);
    // A WAL already there (as a crashed earlier move would leave one) stays as it was.
    let kept = fixture_entries()[..1].to_vec();
    LogStore::open_dir(&tmp.path().join("wal"))
        .unwrap()
        .append_durable(kept.clone())
        .await
        .unwrap();
    // Version 9, then bytes that today's decoder would otherwise take for an entry.
    let mut bytes = vec![9u8];
    bytes.extend(std::fs::read(fixture("format1-entry-normal.bin")).unwrap());
    db.put_legacy_logs(vec![(3, bytes)]).unwrap();
    let err = match LogStore::open(&db) {
        Ok(_) => panic!("a log holding an entry of version 9 opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "this log entry was written by format version 9; this build reads versions 1..=1"
        ),
        "{err}"
    );
    assert_eq!(stamp(&db), Some(2));
    assert_eq!(db.legacy_log().unwrap().map(|l| l.entries.len()), Some(1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let wal = loop {
        match LogStore::open_dir(&tmp.path().join("wal")) {
            Ok(w) => break w,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopening the WAL: {e}"),
        }
    };
    assert_eq!(all_entries(&wal).await, kept);
}

/// A snapshot of a version this build does not know, sent by another head or found on disk,
/// is refused with the version named before the rest of it is decoded.
#[tokio::test]
async fn a_snapshot_of_an_unknown_version_is_refused_before_decoding() {
    let tmp = tempfile::tempdir().unwrap();
    let db = SledRaftDb::open(tmp.path()).unwrap();
    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    let meta = SnapshotMeta {
        last_log_id: Some(lid(4)),
        last_membership: Default::default(),
        snapshot_id: "from-the-future".into(),
    };
    // Version 4, then bytes today's layout cannot decode.
    let future = vec![4u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    let err = sm
        .install_snapshot(&meta, Box::new(Cursor::new(future.clone())))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "this snapshot was written by format version 4; this build reads versions 2..=3"
        ),
        "{err}"
    );
    // Nothing was installed.
    assert_eq!(sm.reader().read().last_applied, None);

    // A version-4 snapshot on disk (as a newer build would have left it) is refused on open.
    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    sm.apply(fixture_entries()).await.unwrap();
    let data = sm.build_snapshot().await.unwrap().snapshot.into_inner();
    assert_eq!(data[0], 3, "today's snapshots are version 3");
    let mut stored = db.meta("snapshot").unwrap().unwrap();
    // The record ends with the snapshot's bytes (postcard: length, then the bytes).
    assert!(stored.ends_with(&data));
    let at = stored.len() - data.len();
    stored[at] = 4;
    db.set_meta("snapshot", &stored).unwrap();
    let err = match StateMachineStore::open(db) {
        Ok(_) => panic!("a stored version-4 snapshot opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "this snapshot was written by format version 4; this build reads versions 2..=3"
        ),
        "{err}"
    );
}
