//! The Raft log and vote in an append-only write-ahead log (`raft-log`, the log store of
//! databend's meta service, by openraft's author), in `<raft store>/wal/`.
//!
//! One append is one record written to the open chunk file; a flush worker thread writes
//! what is queued and fsyncs once for everything queued meanwhile (group commit), then calls
//! the callbacks in order. sled, which held the log before (format 2), did a tree update and
//! two fsyncs per flush; the log now costs one `fdatasync` per batch (see
//! `docs/decisions.md`). Snapshots stay in sled (`sm_store`).
//!
//! Invariants:
//! - `save_vote` returns only after the vote is durable.
//! - An append's `LogFlushed` callback fires only after an fsync that covers its records.
//! - `truncate` and `purge` are durable when they return; the WAL removes a purged chunk
//!   file only after the purge record is synced, and the log is never purged past the state
//!   machine's durable snapshot (`SnapshotFloor`).
//! - `save_committed` is written but not synced (openraft makes persisting it optional); it
//!   is synced by the next append's fsync, and it is never durable ahead of the entries it
//!   covers (one file, written in order).
//! - A data dir whose log is still in sled (format 2) has it moved here on open, before
//!   anything is served; a crash during the move leaves format 2, and the move starts over.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, Vote};
use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::codeq::{Decode, Encode};
use raft_log::{FlushMetrics, RaftLog};

use crate::db::SledRaftDb;
use crate::metrics::StorageOp;
use crate::sm_store::SnapshotFloor;
use crate::types::{Entry, LogId, StorageError, TypeConfig, io_err, storage_err};

/// The WAL's directory inside the Raft store's (sled's) directory: one directory holds a
/// head's whole Raft state, so moving or backing it up keeps the two together.
pub const WAL_DIR: &str = "wal";
/// A chunk file is closed at this size; purged entries leave the disk a chunk at a time.
const CHUNK_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Entries kept decoded in memory for readers (replication, apply); older ones are read
/// from the chunk files.
const CACHE_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The types the WAL stores: openraft's log id and vote, and each entry as the versioned
/// bytes of `format::encode_entry`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WalTypes;

impl raft_log::Types for WalTypes {
    type LogId = WalLogId;
    type LogPayload = Vec<u8>;
    type Vote = WalVote;
    type Callback = Done;
    type UserData = ();

    fn log_index(log_id: &WalLogId) -> u64 {
        log_id.0.index
    }

    fn payload_size(payload: &Vec<u8>) -> u64 {
        payload.len() as u64
    }
}

/// A log id in the WAL: openraft's, postcard-encoded (length-prefixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WalLogId(pub LogId);

/// A vote in the WAL. Ordered by its leader id alone: the WAL refuses a vote lower than the
/// stored one, and a restarted head stores its committed vote again as not committed
/// (`forget_leadership`), which openraft's own order ranks lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalVote(pub Vote<u64>);

impl PartialOrd for WalVote {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.0.leader_id.partial_cmp(&other.0.leader_id)
    }
}

fn encode_postcard<T: serde::Serialize, W: io::Write>(v: &T, w: W) -> io::Result<usize> {
    postcard::to_allocvec(v)
        .map_err(io::Error::other)?
        .encode(w)
}

fn decode_postcard<T: serde::de::DeserializeOwned, R: io::Read>(r: R) -> io::Result<T> {
    let b = Vec::<u8>::decode(r)?;
    postcard::from_bytes(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The WAL's codec for a newtype over a serde value: postcard, length-prefixed.
macro_rules! postcard_codec {
    ($($t:ident),*) => {$(
        impl Encode for $t {
            fn encode<W: io::Write>(&self, w: W) -> io::Result<usize> {
                encode_postcard(&self.0, w)
            }
        }

        impl Decode for $t {
            fn decode<R: io::Read>(r: R) -> io::Result<Self> {
                decode_postcard(r).map(Self)
            }
        }
    )*};
}

postcard_codec!(WalLogId, WalVote);

/// What the flush worker calls when a flush is done: who waits, and the WAL's directory and
/// first failure (for the errors).
pub struct Done(Waiter, Arc<Where>);

/// The WAL's directory, and why its flush worker stopped (the first failed flush): the
/// worker ends at its first error, and every later request fails with "sending on a closed
/// channel", which alone would hide the cause (a full disk, say).
struct Where {
    dir: PathBuf,
    failed: OnceLock<String>,
}

impl Where {
    /// `e` naming the directory, and the worker's first failure when there was one.
    fn err(&self, e: io::Error) -> io::Error {
        match self.failed.get() {
            Some(why) => io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (the log's flush worker stopped: {why})",
                    self.dir.display()
                ),
            ),
            None => in_dir(&self.dir, e),
        }
    }
}

enum Waiter {
    /// An append: openraft's callback, and when the append was made.
    Append(LogFlushed<TypeConfig>, Instant),
    /// A caller waiting for a sync (`save_vote`, `truncate`, `purge`, the migration).
    Wait(std::sync::mpsc::SyncSender<io::Result<()>>),
    /// Nobody waits (`save_committed`), but a failure must still be recorded.
    Nobody,
}

impl raft_log::Callback for Done {
    fn send(self, res: io::Result<()>) {
        let Done(waiter, at) = self;
        let res = res.map_err(|e| {
            let e = in_dir(&at.dir, e);
            let _ = at.failed.set(e.to_string());
            e
        });
        if let Err(e) = &res {
            // The callbacks carry the error to openraft, whose core then stops (Fatal)
            // without counting these entries as stored here: this head answers no write
            // they hold, and exits (`RunningHead::failed`).
            crate::metrics::record_storage_error(StorageOp::Flush);
            tracing::error!(op = "flush", "raft log flush failed: {e}");
        }
        match waiter {
            Waiter::Append(cb, started) => {
                if res.is_ok() {
                    fail::fail_point!("raft-log-flush-after");
                }
                crate::metrics::record_append_latency(started.elapsed());
                cb.log_io_completed(res);
            }
            Waiter::Wait(tx) => {
                // A waiter that went away needs no answer.
                raft_log::Callback::send(tx, res);
            }
            Waiter::Nobody => {}
        }
    }
}

/// The Raft log store. Clones share the one WAL.
#[derive(Clone)]
pub struct LogStore {
    wal: Arc<Mutex<RaftLog<WalTypes>>>,
    at: Arc<Where>,
    /// When set, `purge` never goes past the durable snapshot (see `SnapshotFloor`).
    floor: Option<SnapshotFloor>,
    /// A purge the floor held back: the highest log id openraft asked to purge beyond it.
    /// openraft counts it purged; the WAL holds no gap, so the purge happens before an
    /// append that starts right after it (once the snapshot covering it is durable).
    held_back: Arc<Mutex<Option<LogId>>>,
}

impl LogStore {
    /// Opens the log of the Raft store `db` (its WAL in `<db dir>/wal`), first moving a log
    /// that an older build kept in sled (format 2) into the WAL.
    pub fn open(db: &SledRaftDb) -> io::Result<Self> {
        let dir = db.dir().join(WAL_DIR);
        if let Some(legacy) = db.legacy_log()? {
            // Every entry is decoded before anything is touched: a log this build cannot
            // read is refused with the WAL as it was.
            let entries = legacy
                .entries
                .iter()
                .map(|b| {
                    crate::format::decode_entry(b)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
                })
                .collect::<io::Result<Vec<Entry>>>()?;
            // Whatever a crashed earlier move left is redone from the start.
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| in_dir(&dir, e))?;
            }
            let store = Self::open_dir(&dir)?;
            store.restore(legacy, entries)?;
            db.drop_legacy_log()?;
            return Ok(store);
        }
        Self::open_dir(&dir)
    }

    /// Opens (or creates) a WAL in `dir` alone, with no sled store beside it.
    pub fn open_dir(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| in_dir(dir, e))?;
        let mut wal = raft_log::chunked_wal::Config::new(dir.display());
        wal.chunk_max_size = Some(CHUNK_MAX_BYTES);
        // Sync at once: appends that arrive during an fsync share the next one anyway, and
        // waiting for more would only add latency to every commit.
        wal.flush_batch_wait = Some(Duration::ZERO);
        let config = raft_log::Config {
            wal,
            log_cache_capacity: Some(CACHE_MAX_BYTES),
            ..Default::default()
        };
        let log = RaftLog::open(Arc::new(config)).map_err(|e| in_dir(dir, e))?;
        Ok(Self {
            wal: Arc::new(Mutex::new(log)),
            at: Arc::new(Where {
                dir: dir.into(),
                failed: OnceLock::new(),
            }),
            floor: None,
            held_back: Arc::default(),
        })
    }

    /// This store, whose `purge` stops at what the state machine's durable snapshot covers:
    /// the entries past it stay (and are purged later) until the snapshot holding them is
    /// stored.
    pub fn with_snapshot_floor(self, floor: SnapshotFloor) -> Self {
        Self {
            floor: Some(floor),
            ..self
        }
    }

    /// The WAL's fsync counters since it opened (for the metrics and the benches).
    pub fn flush_metrics(&self) -> FlushMetrics {
        self.lock().stat().flush_metrics
    }

    fn lock(&self) -> MutexGuard<'_, RaftLog<WalTypes>> {
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, e: io::Error) -> io::Error {
        self.at.err(e)
    }

    /// Queues a sync behind everything written so far and waits for it (on a blocking
    /// thread when inside the runtime).
    async fn sync(&self) -> io::Result<()> {
        let rx = self.start_sync()?;
        match tokio::task::spawn_blocking(move || rx.recv()).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.err(io::Error::other("the log's flush worker stopped"))),
            Err(e) => Err(io::Error::other(format!("sync task failed: {e}"))),
        }
    }

    fn start_sync(&self) -> io::Result<std::sync::mpsc::Receiver<io::Result<()>>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.lock()
            .flush(true, Some(Done(Waiter::Wait(tx), self.at.clone())))
            .map_err(|e| self.err(e))?;
        Ok(rx)
    }

    fn sync_blocking(&self) -> io::Result<()> {
        let rx = self.start_sync()?;
        rx.recv()
            .map_err(|_| self.err(io::Error::other("the log's flush worker stopped")))?
    }

    fn write_entries(&self, entries: impl IntoIterator<Item = Entry>) -> Result<(), StorageError> {
        let mut batch = Vec::new();
        for e in entries {
            batch.push((
                WalLogId(e.log_id),
                crate::format::encode_entry(&e).map_err(|e| storage_err(true, e))?,
            ));
        }
        self.lock()
            .append(batch)
            .map_err(|e| io_err(StorageOp::Write, self.err(e)))?;
        Ok(())
    }

    /// Appends `entries` and returns once they are durable: the migration's and the tests'
    /// way in (openraft's own appends go through `RaftLogStorage::append`).
    pub async fn append_durable(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        if let Some(first) = entries.first() {
            self.purge_held_back_before(first.log_id.index).await?;
        }
        self.write_entries(entries)?;
        self.sync().await.map_err(|e| io_err(StorageOp::Flush, e))
    }

    /// Writes what sled held into this (empty) WAL and syncs it.
    fn restore(&self, legacy: crate::db::LegacyLog, entries: Vec<Entry>) -> io::Result<()> {
        let n = entries.len();
        {
            let mut wal = self.lock();
            if let Some(v) = legacy.vote {
                wal.save_vote(WalVote(v)).map_err(|e| self.err(e))?;
            }
            if let Some(p) = legacy.last_purged {
                wal.purge(WalLogId(p)).map_err(|e| self.err(e))?;
            }
        }
        let last = entries.last().map(|e| e.log_id).or(legacy.last_purged);
        self.write_entries(entries)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if let Some(c) = legacy.committed.filter(|c| Some(*c) <= last) {
            self.lock().commit(WalLogId(c)).map_err(|e| self.err(e))?;
        }
        self.sync_blocking()?;
        tracing::info!(
            dir = %self.at.dir.display(),
            entries = n,
            "moved the raft log from sled into the write-ahead log"
        );
        Ok(())
    }
}

impl LogStore {
    fn hold_back(&self, log_id: LogId) {
        let mut h = self.held_back.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_none_or(|h| h < log_id) {
            *h = Some(log_id);
        }
    }

    /// Before an append that starts at `first` while the WAL ends earlier: the purge the
    /// floor held back must end right before `first` (openraft appends after a snapshot it
    /// installed); it is done once the snapshot is durable (the state machine stores it
    /// before openraft answers the leader, so this waits at most for that write). Anything
    /// else is a gap, and the WAL refuses it.
    async fn purge_held_back_before(&self, first: u64) -> Result<(), StorageError> {
        let next = self.lock().log_state().last().map_or(0, |l| l.0.index + 1);
        if first <= next {
            return Ok(());
        }
        let held = *self.held_back.lock().unwrap_or_else(|p| p.into_inner());
        let Some(held) = held.filter(|h| h.index + 1 == first) else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let floor = self.floor.as_ref().and_then(SnapshotFloor::get);
            if floor.is_some_and(|f| f >= held) {
                break;
            }
            if Instant::now() > deadline {
                return Err(io_err(
                    StorageOp::Write,
                    self.err(io::Error::other(format!(
                        "an append at {first} follows a purge up to {held} that no durable \
                         snapshot covers after 30 s"
                    ))),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.lock()
            .purge(WalLogId(held))
            .map_err(|e| io_err(StorageOp::Write, self.err(e)))?;
        Ok(())
    }
}

/// An I/O error naming the directory it happened in (an operator reading "No space left on
/// device" needs to know where).
fn in_dir(dir: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", dir.display()))
}

fn decode(b: &[u8]) -> Result<Entry, StorageError> {
    crate::format::decode_entry(b).map_err(|e| storage_err(false, e))
}

impl RaftLogReader<TypeConfig> for LogStore {
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
        if from >= to {
            return Ok(Vec::new());
        }
        let wal = self.lock();
        wal.read(from, to)
            .map(|r| match r {
                Ok((_, b)) => decode(&b),
                Err(e) => Err(io_err(StorageOp::Read, self.at.err(e))),
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let wal = self.lock();
        let st = wal.log_state();
        let last_purged = st.purged().map(|l| l.0);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: st.last().map(|l| l.0).or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.lock()
            .save_vote(WalVote(*vote))
            .map_err(|e| io_err(StorageOp::Write, self.err(e)))?;
        self.sync().await.map_err(|e| io_err(StorageOp::Flush, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(self.lock().log_state().vote().map(|v| v.0))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Written, not synced: losing it only delays re-applying committed entries after a
        // restart, until the leader names the commit index again. The WAL refuses a commit
        // index behind the stored one or past the last entry; neither is worth failing for
        // (it is a hint), so such a call is dropped.
        let Some(c) = committed else {
            return Ok(());
        };
        let mut wal = self.lock();
        let st = wal.log_state();
        let stale = st.committed().is_some_and(|s| s.0 >= c) || st.last().is_none_or(|l| l.0 < c);
        if stale {
            return Ok(());
        }
        wal.commit(WalLogId(c))
            .and_then(|_| wal.flush(false, Some(Done(Waiter::Nobody, self.at.clone()))))
            .map_err(|e| io_err(StorageOp::Write, self.at.err(e)))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().log_state().committed().map(|l| l.0))
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(first) = entries.first() {
            self.purge_held_back_before(first.log_id.index).await?;
        }
        self.write_entries(entries)?;
        fail::fail_point!("raft-log-flush-before");
        self.lock()
            .flush(
                true,
                Some(Done(Waiter::Append(callback, started), self.at.clone())),
            )
            .map_err(|e| io_err(StorageOp::Flush, self.err(e)))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()
            .truncate(log_id.index)
            .map_err(|e| io_err(StorageOp::Write, self.err(e)))?;
        self.sync().await.map_err(|e| io_err(StorageOp::Flush, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let wanted = log_id;
        let log_id = match &self.floor {
            None => log_id,
            Some(f) => match f.get() {
                Some(floor) if floor.index < log_id.index => floor,
                Some(_) => log_id,
                // No durable snapshot yet: nothing may go.
                None => {
                    self.hold_back(wanted);
                    return Ok(());
                }
            },
        };
        if log_id != wanted {
            self.hold_back(wanted);
        }
        self.lock()
            .purge(WalLogId(log_id))
            .map_err(|e| io_err(StorageOp::Write, self.err(e)))?;
        self.sync().await.map_err(|e| io_err(StorageOp::Flush, e))
    }
}
