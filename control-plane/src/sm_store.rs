//! The state machine store: `ClusterState` in memory, made durable through snapshots kept in
//! the `RaftDb` (entries after the snapshot are re-applied from the log at start-up).
//!
//! Invariants:
//! - A snapshot is durable before `build_snapshot`/`install_snapshot` return, so openraft may
//!   purge the log entries it covers.
//! - A snapshot's bytes start with its version (a postcard `u32`), read and checked before
//!   anything else of them is decoded (`decode_snapshot`), for the snapshots on disk and those
//!   another head sends alike; an unknown version is an error naming it, never a silent
//!   reset or a misread state.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta};
use serde::{Deserialize, Serialize};

use crate::db::RaftDb;
use crate::metrics::StorageOp;
use crate::state::{ClusterState, Response};
use crate::types::{Entry, LogId, StorageError, StoredMembership, TypeConfig, io_err, storage_err};

const SNAPSHOT: &str = "snapshot";
// 2: jobs gained attempts, retries, priority and stop requests (issue 4).
// 3: the autoscaler's state and the nodes' registration ids follow the version-2 layout (a
//    version-2 snapshot has neither).
const SNAPSHOT_VERSION: u32 = 3;
const SNAPSHOT_VERSIONS_READ: std::ops::RangeInclusive<u32> = 2..=SNAPSHOT_VERSION;

/// What is applied so far. Shared with the services, which read it under the lock.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: ClusterState,
}

/// A snapshot's bytes: the version (a postcard `u32`), this body, then (version 3) the
/// autoscaler's state and the registrations. The same bytes as the version-2 struct that
/// began with its `version` field, so older builds read what this one writes.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct StateMachineStore<D: RaftDb> {
    applied: Arc<RwLock<Applied>>,
    db: D,
    snapshot_seq: Arc<AtomicU64>,
    floor: SnapshotFloor,
}

/// The last log id the durable snapshot covers, shared with the log store: the log is never
/// purged past it. openraft 0.9 purges a follower's log as soon as it hands a received
/// snapshot to the state machine, before the state machine has stored it; a crash in
/// between left an old snapshot and a log purged past it, and the head could not start
/// ("Failed to get log entries"; found by the chaos runner's `raft-snapshot-install-mid`
/// fail point).
#[derive(Clone, Default, Debug)]
pub struct SnapshotFloor(Arc<std::sync::Mutex<Option<LogId>>>);

impl SnapshotFloor {
    pub fn get(&self) -> Option<LogId> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, l: Option<LogId>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = l;
    }
}

impl<D: RaftDb> StateMachineStore<D> {
    /// Opens the store, restoring the state from the last durable snapshot.
    pub fn open(db: D) -> Result<Self, StorageError> {
        let store = Self {
            applied: Arc::default(),
            db,
            snapshot_seq: Arc::default(),
            floor: SnapshotFloor::default(),
        };
        if let Some(s) = store.stored_snapshot()? {
            let restored = decode_snapshot(&s.data)?;
            *store.write() = restored;
            store.floor.set(s.meta.last_log_id);
        }
        Ok(store)
    }

    /// What the durable snapshot covers, for `LogStore::with_snapshot_floor`.
    pub fn snapshot_floor(&self) -> SnapshotFloor {
        self.floor.clone()
    }

    /// A read handle on the applied state, for the services.
    pub fn reader(&self) -> StateReader {
        StateReader {
            applied: self.applied.clone(),
            hash_cache: Arc::default(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|p| p.into_inner())
    }

    fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        match self
            .db
            .meta(SNAPSHOT)
            .map_err(|e| io_err(StorageOp::Read, e))?
        {
            Some(b) => Ok(Some(
                postcard::from_bytes(&b).map_err(|e| storage_err(false, e))?,
            )),
            None => Ok(None),
        }
    }

    async fn persist_snapshot(&self, s: &StoredSnapshot) -> Result<(), StorageError> {
        let b = postcard::to_allocvec(s).map_err(|e| storage_err(true, e))?;
        self.db
            .set_meta(SNAPSHOT, &b)
            .map_err(|e| io_err(StorageOp::Write, e))?;
        self.db
            .flush()
            .await
            .map_err(|e| io_err(StorageOp::Flush, e))?;
        // Durable now: the log may be purged up to it.
        self.floor.set(s.meta.last_log_id);
        Ok(())
    }
}

/// Read-only view of the applied state, cheap to clone.
#[derive(Clone)]
pub struct StateReader {
    applied: Arc<RwLock<Applied>>,
    hash_cache: Arc<Mutex<Option<HashAt>>>,
}

/// The last `state_hash` and the applied log id it was taken at.
type HashAt = (Option<LogId>, u64);

impl StateReader {
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }

    /// (last applied index, `Applied::state_hash` at it), read under one lock. Cached per
    /// applied log id: the state changes only with it (apply and install_snapshot both move
    /// it, and Raft makes the state at one log id the same everywhere).
    pub fn state_hash(&self) -> Option<(u64, u64)> {
        let a = self.read();
        let index = a.last_applied.map_or(0, |l| l.index);
        let mut cache = self.hash_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, hash)) = *cache
            && at == a.last_applied
        {
            return Some((index, hash));
        }
        let hash = a.state_hash()?;
        *cache = Some((a.last_applied, hash));
        Some((index, hash))
    }
}

impl Applied {
    /// A stable hash of the replicated state and the membership (not of `last_applied`):
    /// the first 8 bytes, big-endian, of the SHA-256 of their postcard encoding. Stable
    /// across builds and heads: every table is a `BTreeMap` (encoded in key order; no
    /// `HashMap` anywhere in `ClusterState`), and the fields snapshots keep apart
    /// (`autoscaler`, `registrations`: `serde(skip)` in `ClusterState`) are hashed
    /// explicitly. None only if encoding fails, which these types never do.
    pub fn state_hash(&self) -> Option<u64> {
        use sha2::Digest;
        struct HashWriter(sha2::Sha256);
        impl std::io::Write for HashWriter {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.update(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = HashWriter(sha2::Sha256::new());
        let all = (
            &self.membership,
            &self.state,
            &self.state.autoscaler,
            &self.state.registrations,
        );
        postcard::to_io(&all, &mut w).ok()?;
        let digest = w.0.finalize();
        let first: [u8; 8] = digest.get(..8)?.try_into().ok()?;
        Some(u64::from_be_bytes(first))
    }
}

fn decode_snapshot(data: &[u8]) -> Result<Applied, StorageError> {
    let (version, rest) = crate::format::split_version("snapshot", data, &SNAPSHOT_VERSIONS_READ)
        .map_err(|e| storage_err(false, e))?;
    let undecodable = |e: postcard::Error| {
        storage_err(
            false,
            crate::format::FormatError::Decode {
                what: "snapshot",
                version,
                reason: e.to_string(),
            },
        )
    };
    let (body, rest): (SnapshotBody, &[u8]) =
        postcard::take_from_bytes(rest).map_err(undecodable)?;
    let mut state = body.state;
    if version >= 3 {
        (state.autoscaler, state.registrations) =
            postcard::from_bytes(rest).map_err(undecodable)?;
    }
    Ok(Applied {
        last_applied: body.last_applied,
        membership: body.membership,
        state,
    })
}

/// A snapshot's bytes: the version, the body, then the autoscaler's state.
fn encode_snapshot(a: &Applied) -> Result<Vec<u8>, StorageError> {
    let body = SnapshotBody {
        last_applied: a.last_applied,
        membership: a.membership.clone(),
        state: a.state.clone(),
    };
    let out = crate::format::version_prefix(SNAPSHOT_VERSION);
    let out = postcard::to_extend(&body, out).map_err(|e| storage_err(true, e))?;
    postcard::to_extend(&(&a.state.autoscaler, &a.state.registrations), out)
        .map_err(|e| storage_err(true, e))
}

impl<D: RaftDb> RaftSnapshotBuilder<TypeConfig> for StateMachineStore<D> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, membership) = {
            let a = self.applied.read().unwrap_or_else(|p| p.into_inner());
            (encode_snapshot(&a)?, a.last_applied, a.membership.clone())
        };
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!(
                "{}-{}-{}-{seq}",
                l.leader_id.term, l.leader_id.node_id, l.index
            ),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        fail::fail_point!("raft-snapshot-build-mid");
        self.persist_snapshot(&stored).await?;
        crate::metrics::record_snapshot(stored.data.len());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl<D: RaftDb> RaftStateMachine<TypeConfig> for StateMachineStore<D> {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = self.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        let mut a = self.write();
        for e in entries {
            a.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Response::Ok,
                EntryPayload::Normal(cmd) => a.state.apply(cmd),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(e.log_id), m);
                    Response::Ok
                }
            });
        }
        if let Some(l) = a.last_applied {
            crate::metrics::record_applied(l.index);
        }
        drop(a);
        fail::fail_point!("raft-apply-before-reply");
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let restored = decode_snapshot(&data)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        fail::fail_point!("raft-snapshot-install-mid");
        self.persist_snapshot(&stored).await?;
        *self.write() = restored;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.stored_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};

    use super::*;
    use crate::db::SledRaftDb;
    use crate::state::Command;

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), index),
            payload,
        }
    }

    fn put(index: u64, key: &str, value: &str) -> Entry {
        entry(
            index,
            EntryPayload::Normal(Command::KvPut {
                namespace: "n".into(),
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                overwrite: true,
            }),
        )
    }

    fn log() -> Vec<Entry> {
        let nodes: std::collections::BTreeMap<u64, openraft::BasicNode> =
            [(1, openraft::BasicNode::new("127.0.0.1:1"))].into();
        vec![
            entry(1, EntryPayload::Blank),
            entry(
                2,
                EntryPayload::Membership(Membership::new(
                    vec![std::collections::BTreeSet::from([1])],
                    nodes,
                )),
            ),
            put(3, "a", "1"),
            put(4, "b", "2"),
        ]
    }

    /// A state machine on its own fresh store that applied `entries`.
    async fn applied(entries: Vec<Entry>) -> (tempfile::TempDir, StateMachineStore<SledRaftDb>) {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachineStore::open(SledRaftDb::open(dir.path()).unwrap()).unwrap();
        sm.apply(entries).await.unwrap();
        (dir, sm)
    }

    #[tokio::test]
    async fn replicas_that_applied_the_same_entries_report_the_same_hash() {
        let (_a, a) = applied(log()).await;
        let (_b, b) = applied(log()).await;
        let (ha, hb) = (a.reader().state_hash(), b.reader().state_hash());
        assert_eq!(ha.map(|h| h.0), Some(4));
        assert_eq!(ha, hb);

        // One different entry at the same index: another hash.
        let mut other = log();
        other[3] = put(4, "b", "3");
        let (_c, c) = applied(other).await;
        let hc = c.reader().state_hash();
        assert_eq!(hc.map(|h| h.0), Some(4));
        assert_ne!(ha.map(|h| h.1), hc.map(|h| h.1));

        // The state a snapshot restores hashes the same (a head that restarted or installed
        // a snapshot agrees with those that applied the log).
        let mut a2 = a.clone();
        let snap = a2.build_snapshot().await.unwrap();
        let (_d, mut d) = applied(Vec::new()).await;
        d.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        assert_eq!(d.reader().state_hash(), ha);
    }

    /// The tables `ClusterState` leaves out of its own encoding (`serde(skip)`) are hashed too.
    #[tokio::test]
    async fn the_autoscaler_state_is_part_of_the_hash() {
        let (_a, mut a) = applied(log()).await;
        let before = a.reader().state_hash().map(|h| h.1);
        let (_b, mut b) = applied(log()).await;
        a.apply([entry(
            5,
            EntryPayload::Normal(Command::SetAutoscalerConfig {
                config_json: Some("{}".into()),
            }),
        )])
        .await
        .unwrap();
        b.apply([entry(5, EntryPayload::Blank)]).await.unwrap();
        let (ha, hb) = (a.reader().state_hash(), b.reader().state_hash());
        assert_eq!(ha.map(|h| h.0), Some(5));
        assert_eq!(hb.map(|h| h.0), Some(5));
        assert_ne!(ha.map(|h| h.1), hb.map(|h| h.1));
        // A blank entry moves the index, not the state.
        assert_eq!(hb.map(|h| h.1), before);
    }
}
