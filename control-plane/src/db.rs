//! `RaftDb`: the narrow storage contract the snapshot store needs, and `SledRaftDb`, its
//! sled implementation. sled stays behind this trait so it can be replaced (it is
//! unmaintained since 2021) without touching the Raft code. The Raft log itself is in a
//! write-ahead log beside it (`log_store`); up to format 2 it was in sled too, and
//! `SledRaftDb` still reads such a log once, for `LogStore::open` to move it
//! (`legacy_log`, `drop_legacy_log`).
//!
//! # Correctness requirements
//! - Writes (`set_meta`) are visible to reads at once but durable only after a later `flush`
//!   completes; `flush` makes every earlier write durable.
//! - After a crash, the durable state is a prefix of the writes in the order they were made.
//!
//! Opening checks the data dir's format stamp (`format`) before anything else is read, and
//! stamps a fresh data dir; see `SledRaftDb::open`.

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;

use sled::Transactional;

use crate::format::{self, DB_FORMAT, FORMAT_KEY};

pub trait RaftDb: Clone + Send + Sync + 'static {
    fn meta(&self, key: &str) -> io::Result<Option<Vec<u8>>>;
    fn set_meta(&self, key: &str, value: &[u8]) -> io::Result<()>;
    /// Makes every earlier write durable (fsync).
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send + 'static;
}

/// The Raft log as a format-2 store held it in sled, read once to be moved into the WAL.
#[derive(Debug, Default)]
pub struct LegacyLog {
    pub vote: Option<openraft::Vote<u64>>,
    pub committed: Option<crate::types::LogId>,
    pub last_purged: Option<crate::types::LogId>,
    /// Each entry's stored bytes (`format::encode_entry`), in index order.
    pub entries: Vec<Vec<u8>>,
}

/// The meta keys of the log as format 2 kept it.
const LEGACY_META: [&str; 3] = ["vote", "committed", "last_purged"];

/// sled 0.34 with two trees, `meta` and `logs` (the Raft log up to format 2, big-endian
/// index keys; empty from format 3 on).
#[derive(Clone)]
pub struct SledRaftDb {
    db: sled::Db,
    logs: sled::Tree,
    meta: sled::Tree,
    dir: Arc<Path>,
}

/// A sled error as an I/O error that names the store's directory, keeping the OS error's
/// kind and text (an operator reading "No space left on device" needs to know where).
fn io_in(dir: &Path, e: sled::Error) -> io::Error {
    let (kind, msg) = match e {
        sled::Error::Io(e) => (e.kind(), e.to_string()),
        other => (io::ErrorKind::Other, other.to_string()),
    };
    io::Error::new(kind, format!("{}: {msg}", dir.display()))
}

impl SledRaftDb {
    /// Opens (or creates) the store in `dir`. The format stamp is read first: an unknown
    /// format is refused (`InvalidData`, the message naming the version) before anything
    /// else is read. A fresh db is stamped with [`DB_FORMAT`]; an unstamped db with data is
    /// format 1 and is migrated to format 2 in one sled transaction over both trees (every
    /// log entry gains its version, and the stamp is written), flushed before `open`
    /// returns: sled seals a transaction as one batch and recovery drops a torn batch, so a
    /// crash leaves the db all format 1 (migrated again on the next open) or all format 2.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let io = |e| io_in(dir, e);
        // A small cache: sled's memory otherwise grows toward the db size (sled#1410).
        // flush_every_ms(None): we flush explicitly before acknowledging anything.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 * 1024 * 1024)
            .flush_every_ms(None)
            .open()
            .map_err(io)?;
        let meta = db.open_tree("meta").map_err(io)?;
        let stamp = meta.get(FORMAT_KEY).map_err(io)?;
        let found = match &stamp {
            Some(b) => Some(format::decode_db_format(b).map_err(invalid_data)?),
            None => None,
        };
        let logs = db.open_tree("logs").map_err(io)?;
        let this = Self {
            db,
            logs,
            meta,
            dir: dir.into(),
        };
        match found {
            // Format 2 holds its log in sled: `LogStore::open` moves it and stamps 3.
            Some(DB_FORMAT) | Some(2) => {}
            None if this.logs.is_empty() && this.meta.is_empty() => {
                this.meta
                    .insert(FORMAT_KEY, &format::encode_db_format(DB_FORMAT))
                    .map_err(io)?;
                this.db.flush().map_err(io)?;
            }
            // Unstamped with data, or stamped 1 (no build stamps 1, but it means the same).
            None | Some(_) => this.migrate_from_format1(dir)?,
        }
        Ok(this)
    }

    fn io(&self, e: sled::Error) -> io::Error {
        io_in(&self.dir, e)
    }

    /// The store's directory (the WAL lives in it, see `log_store::WAL_DIR`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn format(&self) -> io::Result<u32> {
        match self.meta.get(FORMAT_KEY).map_err(|e| self.io(e))? {
            Some(b) => format::decode_db_format(&b).map_err(invalid_data),
            None => Ok(1),
        }
    }

    /// The Raft log a format-2 store holds in sled, or `None` once it has been moved
    /// (format 3).
    pub fn legacy_log(&self) -> io::Result<Option<LegacyLog>> {
        if self.format()? >= 3 {
            return Ok(None);
        }
        fn decode<T: serde::de::DeserializeOwned>(b: Option<sled::IVec>) -> io::Result<Option<T>> {
            b.map(|b| {
                postcard::from_bytes(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            })
            .transpose()
        }
        let get = |k: &str| self.meta.get(k).map_err(|e| self.io(e));
        let mut entries = Vec::new();
        for r in self.logs.iter() {
            entries.push(r.map_err(|e| self.io(e))?.1.to_vec());
        }
        Ok(Some(LegacyLog {
            vote: decode(get(LEGACY_META[0])?)?,
            committed: decode::<Option<crate::types::LogId>>(get(LEGACY_META[1])?)?.flatten(),
            last_purged: decode(get(LEGACY_META[2])?)?,
            entries,
        }))
    }

    /// Empties the format-2 log and stamps format 3, in one sled transaction, flushed before
    /// it returns; called once the WAL holds the log durably.
    pub fn drop_legacy_log(&self) -> io::Result<()> {
        let keys: Vec<sled::IVec> = self
            .logs
            .iter()
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.io(e))?;
        (&self.logs, &self.meta)
            .transaction(|(logs, meta)| {
                for k in &keys {
                    logs.remove(k)?;
                }
                for k in LEGACY_META {
                    meta.remove(k)?;
                }
                meta.insert(FORMAT_KEY, &format::encode_db_format(DB_FORMAT))?;
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(e) => self.io(e),
                sled::transaction::TransactionError::Abort(()) => {
                    io::Error::other("dropping the moved raft log aborted")
                }
            })?;
        self.db.flush().map_err(|e| self.io(e))?;
        Ok(())
    }

    /// Test support: writes `entries` into the format-2 log, as builds before format 3 did.
    #[doc(hidden)]
    pub fn put_legacy_logs(&self, entries: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for (i, v) in entries {
            batch.insert(&i.to_be_bytes(), v);
        }
        self.logs.apply_batch(batch).map_err(|e| self.io(e))
    }

    /// Format 1 → 2: prefixes every log entry with its version and stamps the db, atomically.
    fn migrate_from_format1(&self, dir: &Path) -> io::Result<()> {
        let io = |e| io_in(dir, e);
        let mut entries = Vec::new();
        for r in self.logs.iter() {
            let (k, v) = r.map_err(io)?;
            entries.push((k, format::migrate_entry_from_format1(&v)));
        }
        (&self.logs, &self.meta)
            .transaction(|(logs, meta)| {
                for (k, v) in &entries {
                    logs.insert(k, v.as_slice())?;
                }
                meta.insert(FORMAT_KEY, &format::encode_db_format(2))?;
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(e) => io(e),
                sled::transaction::TransactionError::Abort(()) => {
                    io::Error::other("the format migration aborted")
                }
            })?;
        self.db.flush().map_err(io)?;
        tracing::info!(
            dir = %dir.display(),
            entries = entries.len(),
            "migrated the raft store from format 1 to 2"
        );
        Ok(())
    }
}

fn invalid_data(e: format::FormatError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl RaftDb for SledRaftDb {
    fn meta(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self
            .meta
            .get(key)
            .map_err(|e| self.io(e))?
            .map(|v| v.to_vec()))
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> io::Result<()> {
        self.meta.insert(key, value).map_err(|e| self.io(e))?;
        Ok(())
    }

    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send + 'static {
        let db = self.db.clone();
        let dir = self.dir.clone();
        // fsync on a blocking thread: the async runtime's workers never wait on the disk.
        async move {
            match tokio::task::spawn_blocking(move || db.flush()).await {
                Ok(r) => r.map(|_| ()).map_err(|e| io_in(&dir, e)),
                Err(e) => Err(io::Error::other(format!("flush task failed: {e}"))),
            }
        }
    }
}
