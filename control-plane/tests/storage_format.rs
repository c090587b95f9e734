//! The on-disk format: what today's data dirs hold stays readable, and bytes of a format this
//! build does not know are refused with an error naming the version, before anything else of
//! them is decoded.
//!
//! The fixtures in `tests/fixtures/` were written by the code before the format stamp
//! (format 1): `format1-entry-*.bin` are postcard-encoded log entries, `format1-snapshot-v3.bin`
//! a snapshot's bytes, `format1-db/` a sled data dir (entries 1..=4, a vote, a snapshot at 3).

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

async fn all_entries(db: &SledRaftDb) -> Vec<Entry<TypeConfig>> {
    let mut log = LogStore::new(db.clone());
    log.try_get_log_entries(0..u64::MAX).await.unwrap()
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
        assert_eq!(stamp(&db), Some(2), "round {round}: the stamp");
        assert_eq!(all_entries(&db).await, fixture_entries(), "round {round}");
        let mut log = LogStore::new(db.clone());
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
    assert_eq!(all_entries(&db).await, fixture_entries()[1..3].to_vec());
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
    assert_eq!(stamp(&db), Some(2));
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
        db.put_logs(vec![(1, vec![0xff; 16])]).unwrap();
        db.flush().await.unwrap();
    }
    let err = match reopen(tmp.path()).await {
        Ok(_) => panic!("a data dir of format 9 opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "this data dir was written by format version 9; this build reads versions 1..=2"
        ),
        "{err}"
    );
}

/// A log entry whose version this build does not know is refused with the version named
/// (postcard is not self-describing: decoding it as today's entry could yield another
/// command).
#[tokio::test]
async fn a_log_entry_of_an_unknown_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let db = SledRaftDb::open(tmp.path()).unwrap();
    // Version 9, then bytes that today's decoder would otherwise take for an entry.
    let mut bytes = vec![9u8];
    bytes.extend(std::fs::read(fixture("format1-entry-normal.bin")).unwrap());
    db.put_logs(vec![(3, bytes)]).unwrap();
    let mut log = LogStore::new(db);
    let err = log.try_get_log_entries(3..4).await.unwrap_err().to_string();
    assert!(
        err.contains(
            "this log entry was written by format version 9; this build reads versions 1..=1"
        ),
        "{err}"
    );
    let err = log.get_log_state().await.unwrap_err().to_string();
    assert!(err.contains("format version 9"), "{err}");
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
