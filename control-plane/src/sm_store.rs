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
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta};
use serde::{Deserialize, Serialize};

use crate::db::RaftDb;
use crate::state::{ClusterState, Response};
use crate::types::{Entry, LogId, StorageError, StoredMembership, TypeConfig, storage_err};

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
}

impl<D: RaftDb> StateMachineStore<D> {
    /// Opens the store, restoring the state from the last durable snapshot.
    pub fn open(db: D) -> Result<Self, StorageError> {
        let store = Self {
            applied: Arc::default(),
            db,
            snapshot_seq: Arc::default(),
        };
        if let Some(s) = store.stored_snapshot()? {
            let restored = decode_snapshot(&s.data)?;
            *store.write() = restored;
        }
        Ok(store)
    }

    /// A read handle on the applied state, for the services.
    pub fn reader(&self) -> StateReader {
        StateReader(self.applied.clone())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|p| p.into_inner())
    }

    fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        match self.db.meta(SNAPSHOT).map_err(|e| storage_err(false, e))? {
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
            .map_err(|e| storage_err(true, e))?;
        self.db.flush().await.map_err(|e| storage_err(true, e))
    }
}

/// Read-only view of the applied state, cheap to clone.
#[derive(Clone)]
pub struct StateReader(Arc<RwLock<Applied>>);

impl StateReader {
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
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
