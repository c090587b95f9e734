//! `RaftDb`: the narrow storage contract the Raft log and snapshot stores need, and
//! `SledRaftDb`, its sled implementation. sled stays behind this trait so it can be replaced
//! (it is unmaintained since 2021) without touching the Raft code.
//!
//! # Correctness requirements
//! - Writes (`set_meta`, `put_logs`, `remove_logs`) are visible to reads at once but durable
//!   only after a later `flush` completes; `flush` makes every earlier write durable.
//! - After a crash, the durable state is a prefix of the writes in the order they were made.
//! - Log keys are log indexes; `logs(a, b)` returns the entries in `a..b` in index order.
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
    fn put_logs(&self, entries: Vec<(u64, Vec<u8>)>) -> io::Result<()>;
    fn logs(&self, from: u64, to_exclusive: u64) -> io::Result<Vec<(u64, Vec<u8>)>>;
    fn last_log(&self) -> io::Result<Option<(u64, Vec<u8>)>>;
    fn remove_logs(&self, from: u64, to_exclusive: u64) -> io::Result<()>;
    /// Makes every earlier write durable (fsync).
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send + 'static;
}

/// sled 0.34 with two trees, `logs` (big-endian index keys) and `meta`.
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
            Some(DB_FORMAT) => {}
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
                meta.insert(FORMAT_KEY, &format::encode_db_format(DB_FORMAT))?;
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
            "migrated the raft store from format 1 to {DB_FORMAT}"
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

    fn put_logs(&self, entries: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for (i, v) in entries {
            batch.insert(&i.to_be_bytes(), v);
        }
        self.logs.apply_batch(batch).map_err(|e| self.io(e))
    }

    fn logs(&self, from: u64, to_exclusive: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        if from >= to_exclusive {
            return Ok(Vec::new());
        }
        self.logs
            .range(from.to_be_bytes()..to_exclusive.to_be_bytes())
            .map(|r| {
                let (k, v) = r.map_err(|e| self.io(e))?;
                Ok((key_index(&k)?, v.to_vec()))
            })
            .collect()
    }

    fn last_log(&self) -> io::Result<Option<(u64, Vec<u8>)>> {
        match self.logs.last().map_err(|e| self.io(e))? {
            Some((k, v)) => Ok(Some((key_index(&k)?, v.to_vec()))),
            None => Ok(None),
        }
    }

    fn remove_logs(&self, from: u64, to_exclusive: u64) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for r in self
            .logs
            .range(from.to_be_bytes()..to_exclusive.to_be_bytes())
            .keys()
        {
            batch.remove(r.map_err(|e| self.io(e))?);
        }
        self.logs.apply_batch(batch).map_err(|e| self.io(e))
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

fn key_index(k: &[u8]) -> io::Result<u64> {
    let arr: [u8; 8] = k
        .try_into()
        .map_err(|_| io::Error::other(format!("corrupt log key of {} bytes", k.len())))?;
    Ok(u64::from_be_bytes(arr))
}
