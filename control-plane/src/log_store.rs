//! The Raft log and vote on a `RaftDb`, with group commit.
//!
//! Invariants:
//! - `save_vote` returns only after the vote is durable.
//! - An append's `LogFlushed` callback fires only after a `flush` that started after the
//!   entries were written, so an entry is never reported durable early. One flusher task
//!   serves callbacks in order and lets every append queued during a flush share the next
//!   one: concurrent clients share fsyncs.
//! - `last_purged` is written before the purged entries are removed, so a crash between the
//!   two leaves no hole.
//! - Every mutating call is durable when it returns (`append`: when its callback fires),
//!   except `save_committed` (see there). `truncate` and `purge` flush although a crash
//!   undoing them is harmless today (the append after a truncation flushes both; purged
//!   entries are covered by a durable snapshot): they are rare (a conflicting follower, a
//!   snapshot), and a contract without exceptions needs no such argument per call.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, Vote};
use tokio::sync::mpsc;

use crate::db::RaftDb;
use crate::metrics::StorageOp;
use crate::sm_store::SnapshotFloor;
use crate::types::{Entry, LogId, StorageError, TypeConfig, io_err, storage_err};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

#[derive(Clone)]
pub struct LogStore<D: RaftDb> {
    db: D,
    flusher: mpsc::UnboundedSender<(LogFlushed<TypeConfig>, Instant)>,
    /// When set, `purge` never goes past the durable snapshot (see `SnapshotFloor`).
    floor: Option<SnapshotFloor>,
}

impl<D: RaftDb> LogStore<D> {
    /// Must be called inside a tokio runtime: it spawns the flusher task, which ends when the
    /// last clone of the store is dropped.
    pub fn new(db: D) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(LogFlushed<TypeConfig>, Instant)>();
        let fdb = db.clone();
        tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some(first) = rx.recv().await {
                pending.push(first);
                while let Ok(more) = rx.try_recv() {
                    pending.push(more);
                }
                fail::fail_point!("raft-log-flush-before");
                let result = fdb.flush().await;
                fail::fail_point!("raft-log-flush-after");
                crate::metrics::record_log_flush(pending.len());
                if let Err(e) = &result {
                    // The callbacks carry the error to openraft, whose core then stops (Fatal)
                    // without counting these entries as stored here: this head answers no
                    // write they hold, and exits (`RunningHead::failed`).
                    crate::metrics::record_storage_error(StorageOp::Flush);
                    tracing::error!(op = "flush", "raft store flush failed: {e}");
                }
                for (cb, started) in pending.drain(..) {
                    crate::metrics::record_append_latency(started.elapsed());
                    cb.log_io_completed(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    });
                }
            }
        });
        Self {
            db,
            flusher: tx,
            floor: None,
        }
    }

    /// A store whose `purge` stops at what the state machine's durable snapshot covers: the
    /// entries past it stay (and are purged later) until the snapshot holding them is stored.
    pub fn with_snapshot_floor(db: D, floor: SnapshotFloor) -> Self {
        Self {
            floor: Some(floor),
            ..Self::new(db)
        }
    }

    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        match self.db.meta(key).map_err(|e| io_err(StorageOp::Read, e))? {
            Some(b) => Ok(Some(
                postcard::from_bytes(&b).map_err(|e| storage_err(false, e))?,
            )),
            None => Ok(None),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, key: &str, v: &T) -> Result<(), StorageError> {
        let b = postcard::to_allocvec(v).map_err(|e| storage_err(true, e))?;
        self.db
            .set_meta(key, &b)
            .map_err(|e| io_err(StorageOp::Write, e))
    }
}

/// An entry's bytes are versioned (`format::encode_entry`): an entry another build wrote in
/// a format this one does not know is an error naming its version, never a misread command.
fn decode(b: &[u8]) -> Result<Entry, StorageError> {
    crate::format::decode_entry(b).map_err(|e| storage_err(false, e))
}

impl<D: RaftDb> RaftLogReader<TypeConfig> for LogStore<D> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let from = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self
            .db
            .logs(from, to)
            .map_err(|e| io_err(StorageOp::Read, e))?;
        raw.iter().map(|(_, b)| decode(b)).collect()
    }
}

impl<D: RaftDb> RaftLogStorage<TypeConfig> for LogStore<D> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.read_json(LAST_PURGED)?;
        let last = match self.db.last_log().map_err(|e| io_err(StorageOp::Read, e))? {
            Some((_, b)) => Some(decode(&b)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote)?;
        self.db
            .flush()
            .await
            .map_err(|e| io_err(StorageOp::Flush, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_json(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on its own (openraft makes persisting it optional): losing it only
        // delays re-applying committed entries after a restart, until the leader names the
        // commit index again. It is never durable ahead of the entries it covers: those were
        // written before it, and a crash keeps a prefix of the writes (`RaftDb`).
        self.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_json::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = Instant::now();
        let mut batch = Vec::new();
        for e in entries {
            batch.push((
                e.log_id.index,
                crate::format::encode_entry(&e).map_err(|e| storage_err(true, e))?,
            ));
        }
        self.db
            .put_logs(batch)
            .map_err(|e| io_err(StorageOp::Write, e))?;
        self.flusher
            .send((callback, started))
            .map_err(|_| storage_err(true, std::io::Error::other("log flusher stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db
            .remove_logs(log_id.index, u64::MAX)
            .map_err(|e| io_err(StorageOp::Write, e))?;
        self.db
            .flush()
            .await
            .map_err(|e| io_err(StorageOp::Flush, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let log_id = match &self.floor {
            None => log_id,
            Some(f) => match f.get() {
                Some(floor) if floor.index < log_id.index => floor,
                Some(_) => log_id,
                // No durable snapshot yet: nothing may go.
                None => return Ok(()),
            },
        };
        self.write_meta(LAST_PURGED, &log_id)?;
        self.db
            .remove_logs(0, log_id.index.saturating_add(1))
            .map_err(|e| io_err(StorageOp::Write, e))?;
        self.db
            .flush()
            .await
            .map_err(|e| io_err(StorageOp::Flush, e))
    }
}
