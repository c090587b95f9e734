//! Object lifecycle: create → write → seal → get/release → delete, with pin counts, LRU
//! eviction of secondary copies, spilling of primary copies to disk and transparent restore.
//!
//! Invariants:
//! - a sealed object is immutable; `create` of an existing id is `AlreadyExists`;
//! - a pinned object (held by a `get`, or by its creator until sealed and released) is never
//!   evicted, spilled out of memory or freed: its bytes stay where the pin holder reads them;
//! - a block is returned to the allocator only when its object has no pin;
//! - `ObjectStoreFull` is returned only when eviction and spilling cannot make room;
//! - a failed spill (full disk) leaves the object in memory and removes its partial file.
//!
//! Primary copies are the ones created on this node (puts and task returns); secondary copies
//! were pulled from another node and can be dropped, since the primary lives elsewhere.
//! Spilling ahead: above a usage threshold (80 % by default, as Ray) a background thread
//! writes spill copies of the least recently used primaries without holding the lock, and
//! keeps them in memory; when room is needed they are dropped with no I/O. Only when that has
//! not kept up does `create` spill synchronously, under the lock (docs/decisions.md).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocol::ObjectId;

use crate::alloc::{self, Allocator};
use crate::arena::{ArenaError, ShmArena};

/// Identifies a connection to the store, for pin accounting. [`NODE_CLIENT`] is the node itself.
pub type ClientId = u64;
pub const NODE_CLIENT: ClientId = 0;
/// Holds the pin of an object while the spill-ahead thread writes it.
const SPILLER: ClientId = u64::MAX;
/// Usage above which primaries are spilled ahead, as Ray's `object_spilling_threshold`.
pub const DEFAULT_SPILL_THRESHOLD: f64 = 0.8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} already exists")]
    AlreadyExists(ObjectId),
    #[error("object {0} not found in this node's store")]
    NotFound(ObjectId),
    #[error("object {0} is already sealed")]
    AlreadySealed(ObjectId),
    #[error("object {0} is not sealed")]
    NotSealed(ObjectId),
    #[error("object {0} was created by another client")]
    NotCreator(ObjectId),
    #[error("object {0} is not pinned by this client")]
    NotPinned(ObjectId),
    #[error(
        "object {id} needs {requested} bytes, more than the store's capacity of {capacity} bytes"
    )]
    TooLarge {
        id: ObjectId,
        requested: u64,
        capacity: u64,
    },
    #[error(
        "ObjectStoreFull: object {id} needs {requested} bytes; {available} of {capacity} bytes could be \
         freed but {pinned} bytes are pinned by readers or writers"
    )]
    ObjectStoreFull {
        id: ObjectId,
        requested: u64,
        available: u64,
        pinned: u64,
        capacity: u64,
    },
    #[error(
        "object {id} needs {requested} bytes but {dir} is full: {reserved} bytes of object store memory could be reserved there"
    )]
    ShmFull {
        id: ObjectId,
        requested: u64,
        dir: PathBuf,
        reserved: u64,
    },
    #[error(
        "OutOfDisk: cannot spill {requested} bytes to {dir}: no space left on the spill device"
    )]
    OutOfDisk { dir: PathBuf, requested: u64 },
    #[error("spill file {path} of object {id} is corrupt: {reason}")]
    CorruptSpill {
        id: ObjectId,
        path: PathBuf,
        reason: String,
    },
    #[error("object store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Arena(#[from] ArenaError),
}

impl StoreError {
    /// The short machine-readable kind, sent to clients on the socket.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AlreadyExists(_) => "AlreadyExists",
            Self::NotFound(_) => "NotFound",
            Self::AlreadySealed(_) => "AlreadySealed",
            Self::NotSealed(_) => "NotSealed",
            Self::NotCreator(_) => "NotCreator",
            Self::NotPinned(_) => "NotPinned",
            Self::TooLarge { .. } => "TooLarge",
            Self::ObjectStoreFull { .. } | Self::ShmFull { .. } => "ObjectStoreFull",
            Self::OutOfDisk { .. } => "OutOfDisk",
            Self::CorruptSpill { .. } => "CorruptSpill",
            Self::Io { .. } | Self::Arena(_) => "Io",
        }
    }
}

/// Where a readable or writable object sits in the arena: data at `offset`, metadata right
/// after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Block {
    pub offset: u64,
    pub data_size: u64,
    pub meta_size: u64,
}

impl Block {
    pub fn total(&self) -> u64 {
        self.data_size + self.meta_size
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Most bytes of shared memory the store may use.
    pub capacity: u64,
    /// Directory of the arena's file, a tmpfs (`/dev/shm`).
    pub plasma_dir: PathBuf,
    pub spill_dir: PathBuf,
    /// Reservation granularity, see `arena.rs`.
    pub chunk: u64,
}

/// A point-in-time view of the store, for metrics and `Stats` requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    pub capacity: u64,
    pub reserved: u64,
    pub used: u64,
    pub pinned: u64,
    /// Bytes of objects that live only on disk.
    pub spilled: u64,
    pub objects_in_memory: u64,
    pub objects_spilled: u64,
    pub evictions_total: u64,
    pub spilled_bytes_total: u64,
    pub restored_bytes_total: u64,
}

struct Entry {
    data_size: u64,
    meta_size: u64,
    /// The block's offset while the object is in memory.
    offset: Option<u64>,
    sealed: bool,
    /// Set while unsealed.
    creator: Option<ClientId>,
    pins: u32,
    primary: bool,
    /// Key in an LRU list while sealed, in memory and unpinned.
    tick: u64,
    /// A copy exists in the spill directory.
    spilled: bool,
    delete_pending: bool,
    crc: Option<u32>,
}

impl Entry {
    /// A new in-memory object: unsealed with its creator, or sealed when `creator` is `None`.
    fn new(
        data_size: u64,
        meta_size: u64,
        offset: u64,
        creator: Option<ClientId>,
        primary: bool,
    ) -> Self {
        Self {
            data_size,
            meta_size,
            offset: Some(offset),
            sealed: creator.is_none(),
            creator,
            pins: 0,
            primary,
            tick: 0,
            spilled: false,
            delete_pending: false,
            crc: None,
        }
    }

    fn block(&self) -> Option<Block> {
        self.offset.map(|offset| Block {
            offset,
            data_size: self.data_size,
            meta_size: self.meta_size,
        })
    }
    fn alloc_len(&self) -> u64 {
        alloc::round_up(self.data_size + self.meta_size).unwrap_or(u64::MAX)
    }
}

#[derive(Default)]
struct State {
    alloc: Allocator,
    objects: HashMap<ObjectId, Entry>,
    /// Evictable objects by last use: secondary copies are dropped first, then primaries.
    lru_secondary: BTreeMap<u64, ObjectId>,
    lru_primary: BTreeMap<u64, ObjectId>,
    tick: u64,
    pins: HashMap<ClientId, HashMap<ObjectId, u32>>,
    pinned_bytes: u64,
    spilled_only_bytes: u64,
    objects_spilled: u64,
    /// Bytes in memory that also have a spill copy (droppable without I/O).
    spilled_ahead_bytes: u64,
}

impl State {
    fn lru_remove(&mut self, id: &ObjectId) {
        if let Some(e) = self.objects.get(id) {
            let list = if e.primary {
                &mut self.lru_primary
            } else {
                &mut self.lru_secondary
            };
            list.remove(&e.tick);
        }
    }

    /// Puts an object that just became evictable (sealed, in memory, unpinned) at the young end.
    fn lru_touch(&mut self, id: ObjectId) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.objects.get_mut(&id)
            && e.sealed
            && e.pins == 0
            && e.offset.is_some()
            && !e.delete_pending
        {
            e.tick = tick;
            let list = if e.primary {
                &mut self.lru_primary
            } else {
                &mut self.lru_secondary
            };
            list.insert(tick, id);
        }
    }

    fn pin(&mut self, client: ClientId, id: ObjectId) {
        let e = self.objects.get_mut(&id).expect("pinning a known object");
        if e.pins == 0 {
            self.pinned_bytes += e.alloc_len();
        }
        e.pins += 1;
        self.lru_remove(&id);
        *self.pins.entry(client).or_default().entry(id).or_default() += 1;
    }

    /// Drops one pin; returns true if the object is now unpinned.
    fn unpin(&mut self, client: ClientId, id: ObjectId) -> Result<bool, StoreError> {
        let held = self
            .pins
            .get_mut(&client)
            .and_then(|m| m.get_mut(&id))
            .ok_or(StoreError::NotPinned(id))?;
        *held -= 1;
        if *held == 0 {
            self.pins.get_mut(&client).map(|m| m.remove(&id));
        }
        let e = self.objects.get_mut(&id).expect("a pinned object exists");
        e.pins -= 1;
        if e.pins > 0 {
            return Ok(false);
        }
        self.pinned_bytes -= e.alloc_len();
        self.lru_touch(id);
        Ok(true)
    }
}

pub struct Store {
    arena: ShmArena,
    state: Mutex<State>,
    sealed: Condvar,
    spill_dir: PathBuf,
    spill_wanted: Mutex<bool>,
    spill_kick: Condvar,
    next_client: AtomicU64,
    evictions: AtomicU64,
    spilled_bytes: AtomicU64,
    restored_bytes: AtomicU64,
}

impl Store {
    pub fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let arena = ShmArena::create(
            &cfg.plasma_dir,
            cfg.capacity & !(alloc::ALIGN - 1),
            cfg.chunk,
        )?;
        std::fs::create_dir_all(&cfg.spill_dir).map_err(|source| StoreError::Io {
            path: cfg.spill_dir.clone(),
            source,
        })?;
        Ok(Self {
            arena,
            state: Mutex::new(State::default()),
            sealed: Condvar::new(),
            spill_dir: cfg.spill_dir.clone(),
            spill_wanted: Mutex::new(false),
            spill_kick: Condvar::new(),
            next_client: AtomicU64::new(NODE_CLIENT + 1),
            evictions: AtomicU64::new(0),
            spilled_bytes: AtomicU64::new(0),
            restored_bytes: AtomicU64::new(0),
        })
    }

    pub fn arena(&self) -> &ShmArena {
        &self.arena
    }

    pub fn new_client(&self) -> ClientId {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still consistent enough to read.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates an unsealed object and pins it for `client`, making room if needed.
    pub fn create(
        &self,
        client: ClientId,
        id: ObjectId,
        data_size: u64,
        meta_size: u64,
        primary: bool,
    ) -> Result<Block, StoreError> {
        let need = self.check_size(id, data_size, meta_size)?;
        let mut st = self.lock();
        if st.objects.contains_key(&id) {
            return Err(StoreError::AlreadyExists(id));
        }
        let offset = self.make_room(&mut st, id, need)?;
        st.objects.insert(
            id,
            Entry::new(data_size, meta_size, offset, Some(client), primary),
        );
        st.pin(client, id);
        self.kick_spiller(&st);
        Ok(Block {
            offset,
            data_size,
            meta_size,
        })
    }

    /// Seals an object: from now on it is immutable and visible to `get`. The creator keeps its
    /// pin until it calls `release`.
    pub fn seal(&self, client: ClientId, id: ObjectId) -> Result<(), StoreError> {
        let mut st = self.lock();
        let e = st.objects.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        check_unsealed_by(e, client, id)?;
        e.sealed = true;
        e.creator = None;
        drop(st);
        self.sealed.notify_all();
        Ok(())
    }

    /// Seals an object whose checksum the caller already computed (a pulled copy).
    pub(crate) fn seal_with_crc(
        &self,
        client: ClientId,
        id: ObjectId,
        crc: u32,
    ) -> Result<(), StoreError> {
        self.seal(client, id)?;
        if let Some(e) = self.lock().objects.get_mut(&id) {
            e.crc = Some(crc);
        }
        Ok(())
    }

    /// Discards an unsealed object created by `client`.
    pub fn abort(&self, client: ClientId, id: ObjectId) -> Result<(), StoreError> {
        let mut st = self.lock();
        let e = st.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        check_unsealed_by(e, client, id)?;
        st.unpin(client, id)?;
        Self::remove(&mut st, &self.spill_dir, id);
        Ok(())
    }

    /// Create, copy, seal and release in one step, for small objects sent inline.
    pub fn put(
        &self,
        id: ObjectId,
        data: &[u8],
        meta: &[u8],
        primary: bool,
    ) -> Result<(), StoreError> {
        let (data_size, meta_size) = (data.len() as u64, meta.len() as u64);
        let need = self.check_size(id, data_size, meta_size)?;
        let mut st = self.lock();
        if st.objects.contains_key(&id) {
            return Err(StoreError::AlreadyExists(id));
        }
        let offset = self.make_room(&mut st, id, need)?;
        // Written under the lock: small objects only come this way, and no one can see the
        // block before the entry exists.
        self.arena.write(offset, data);
        self.arena.write(offset + data_size, meta);
        st.objects
            .insert(id, Entry::new(data_size, meta_size, offset, None, primary));
        st.lru_touch(id);
        self.kick_spiller(&st);
        drop(st);
        self.sealed.notify_all();
        Ok(())
    }

    /// Wakes the spill-ahead thread when usage passes the default threshold. Cheap: one
    /// comparison on the hot path.
    fn kick_spiller(&self, st: &State) {
        let limit = (self.arena.capacity() as f64 * DEFAULT_SPILL_THRESHOLD) as u64;
        if st.alloc.used_bytes().saturating_sub(st.spilled_ahead_bytes) > limit
            && let Ok(mut w) = self.spill_wanted.try_lock()
            && !*w
        {
            *w = true;
            self.spill_kick.notify_one();
        }
    }

    /// The allocation size of an object, or `TooLarge`.
    fn check_size(&self, id: ObjectId, data_size: u64, meta_size: u64) -> Result<u64, StoreError> {
        let capacity = self.arena.capacity();
        match data_size.checked_add(meta_size).and_then(alloc::round_up) {
            Some(n) if n <= capacity => Ok(n),
            _ => Err(StoreError::TooLarge {
                id,
                requested: data_size.saturating_add(meta_size),
                capacity,
            }),
        }
    }

    /// Waits until every id is sealed here, `timeout` passes, or `cancelled()` turns true;
    /// then pins and returns the sealed ones (restoring spilled ones), `None` for the others.
    /// `timeout` `None` waits without limit.
    pub fn get(
        &self,
        client: ClientId,
        ids: &[ObjectId],
        timeout: Option<Duration>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Option<Block>>, StoreError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            let ready = ids.iter().all(|id| {
                st.objects
                    .get(id)
                    .is_some_and(|e| e.sealed && !e.delete_pending)
            });
            let now = Instant::now();
            if ready || deadline.is_some_and(|d| now >= d) || cancelled() {
                break;
            }
            // Wake at least every 100 ms to notice a client that went away.
            let slice = deadline.map_or(Duration::from_millis(100), |d| {
                (d - now).min(Duration::from_millis(100))
            });
            st = self
                .sealed
                .wait_timeout(st, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            match self.pin_for_read(&mut st, client, id) {
                Ok(b) => out.push(b),
                Err(e) => {
                    for b in out.iter().zip(ids).filter_map(|(b, id)| b.map(|_| *id)) {
                        let _ = st.unpin(client, b);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn pin_for_read(
        &self,
        st: &mut State,
        client: ClientId,
        id: ObjectId,
    ) -> Result<Option<Block>, StoreError> {
        let Some(e) = st.objects.get(&id) else {
            return Ok(None);
        };
        if !e.sealed || e.delete_pending {
            return Ok(None);
        }
        if e.offset.is_none() {
            self.restore(st, id)?;
        }
        st.pin(client, id);
        Ok(st.objects[&id].block())
    }

    /// One more pin of `client` on an object it already holds pinned (the caller keeps its
    /// pin until this returns, so the object cannot go in between).
    pub(crate) fn pin_again(&self, client: ClientId, id: ObjectId) {
        let mut st = self.lock();
        if st.objects.contains_key(&id) {
            st.pin(client, id);
        }
    }

    /// Drops one of `client`'s pins; frees the object if a delete was waiting for it.
    /// The creator's pin on an unsealed object cannot be released (seal or abort it instead), so
    /// every unsealed object keeps a pin of its creator and dies with it.
    pub fn release(&self, client: ClientId, id: ObjectId) -> Result<(), StoreError> {
        let mut st = self.lock();
        if st.objects.get(&id).is_some_and(|e| !e.sealed) {
            return Err(StoreError::NotSealed(id));
        }
        if st.unpin(client, id)? && st.objects[&id].delete_pending {
            Self::remove(&mut st, &self.spill_dir, id);
        }
        Ok(())
    }

    /// Deletes objects: at once when unpinned, else when the last pin goes. Unknown ids are
    /// skipped. Returns how many were deleted at once.
    pub fn delete(&self, ids: &[ObjectId]) -> usize {
        let mut st = self.lock();
        let mut now = 0;
        for id in ids {
            let Some(e) = st.objects.get_mut(id) else {
                continue;
            };
            if e.pins > 0 {
                e.delete_pending = true;
            } else {
                Self::remove(&mut st, &self.spill_dir, *id);
                now += 1;
            }
        }
        now
    }

    /// Deletes every object whose id starts with `prefix` (the objects of an owner that went
    /// away); returns how many there were.
    pub fn delete_with_prefix(&self, prefix: &[u8]) -> usize {
        let ids: Vec<ObjectId> = self
            .lock()
            .objects
            .keys()
            .filter(|id| id.as_bytes().starts_with(prefix))
            .copied()
            .collect();
        self.delete(&ids);
        ids.len()
    }

    /// Primary copies here (in memory or spilled): what a node must not drop by leaving.
    pub fn primary_count(&self) -> usize {
        self.lock()
            .objects
            .values()
            .filter(|e| e.primary && !e.delete_pending)
            .count()
    }

    /// The sealed primary copies here (in memory or spilled), the ones a drain must move.
    pub fn primary_ids(&self) -> Vec<ObjectId> {
        self.lock()
            .objects
            .iter()
            .filter(|(_, e)| e.primary && e.sealed && !e.delete_pending)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Makes a sealed copy primary (kept: spilled, never evicted) or secondary (evictable:
    /// the primary lives elsewhere). False if no sealed copy is here.
    pub fn set_primary(&self, id: ObjectId, primary: bool) -> bool {
        let mut st = self.lock();
        match st.objects.get(&id) {
            Some(e) if e.sealed && !e.delete_pending => {
                if e.primary != primary {
                    // Off its LRU list under the old kind, back on under the new one.
                    st.lru_remove(&id);
                    if let Some(e) = st.objects.get_mut(&id) {
                        e.primary = primary;
                    }
                    st.lru_touch(id);
                }
                true
            }
            _ => false,
        }
    }

    /// Every object here: (id, data + metadata bytes, primary, pins, in memory, spilled,
    /// sealed), largest first.
    pub fn list(&self) -> Vec<(ObjectId, u64, bool, u32, bool, bool, bool)> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .objects
            .iter()
            .filter(|(_, e)| !e.delete_pending)
            .map(|(id, e)| {
                (
                    *id,
                    e.data_size + e.meta_size,
                    e.primary,
                    e.pins,
                    e.offset.is_some(),
                    e.spilled,
                    e.sealed,
                )
            })
            .collect();
        v.sort_by_key(|o| (std::cmp::Reverse(o.1), o.0));
        v
    }

    /// True if the object is sealed here, in memory or spilled.
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.lock()
            .objects
            .get(id)
            .is_some_and(|e| e.sealed && !e.delete_pending)
    }

    /// Releases every pin of a client that went away and aborts its unsealed objects.
    pub fn disconnect(&self, client: ClientId) {
        let mut st = self.lock();
        let held: Vec<(ObjectId, u32)> = st
            .pins
            .get(&client)
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        for (id, n) in held {
            for _ in 0..n {
                let _ = st.unpin(client, id);
            }
            let Some(e) = st.objects.get(&id) else {
                continue;
            };
            if e.pins == 0 && (!e.sealed || e.delete_pending) {
                Self::remove(&mut st, &self.spill_dir, id);
            }
        }
        st.pins.remove(&client);
    }

    /// The object's CRC-32 (data then metadata), computed once and cached. The caller must
    /// hold a pin on it.
    /// The object's CRC-32 if it is already known (sealed with one, or computed before).
    pub fn cached_checksum(&self, id: ObjectId) -> Option<u32> {
        self.lock().objects.get(&id).and_then(|e| e.crc)
    }

    pub fn checksum(&self, id: ObjectId, block: Block) -> u32 {
        if let Some(c) = self.lock().objects.get(&id).and_then(|e| e.crc) {
            return c;
        }
        let crc = crc32fast::hash(self.arena.slice(block.offset, block.total()));
        if let Some(e) = self.lock().objects.get_mut(&id) {
            e.crc = Some(crc);
        }
        crc
    }

    pub fn stats(&self) -> StoreStats {
        let st = self.lock();
        StoreStats {
            capacity: self.arena.capacity(),
            reserved: self.arena.reserved(),
            used: st.alloc.used_bytes(),
            pinned: st.pinned_bytes,
            spilled: st.spilled_only_bytes,
            objects_in_memory: st.objects.values().filter(|e| e.offset.is_some()).count() as u64,
            objects_spilled: st.objects_spilled,
            evictions_total: self.evictions.load(Ordering::Relaxed),
            spilled_bytes_total: self.spilled_bytes.load(Ordering::Relaxed),
            restored_bytes_total: self.restored_bytes.load(Ordering::Relaxed),
        }
    }

    /// Finds `need` bytes: grow the arena, then drop LRU secondary copies, then spill LRU
    /// primary copies, until the allocation fits.
    fn make_room(&self, st: &mut State, id: ObjectId, need: u64) -> Result<u64, StoreError> {
        let mut shm_full = false;
        loop {
            if let Ok(off) = st.alloc.alloc(need) {
                return Ok(off);
            }
            if !shm_full && self.arena.reserved() < self.arena.capacity() {
                let want = st.alloc.size() + (need - st.alloc.free_tail().min(need));
                match self.arena.reserve_to(want) {
                    Ok(reserved) => {
                        st.alloc.grow(reserved);
                        continue;
                    }
                    Err(ArenaError::NoSpace { .. }) => shm_full = true,
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some((_, victim)) = st.lru_secondary.pop_first() {
                Self::remove(st, &self.spill_dir, victim);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some((_, victim)) = st.lru_primary.first_key_value().map(|(k, v)| (*k, *v)) {
                self.spill(st, victim)?;
                continue;
            }
            let capacity = self.arena.capacity();
            return Err(if shm_full {
                StoreError::ShmFull {
                    id,
                    requested: need,
                    dir: self.arena_dir(),
                    reserved: self.arena.reserved(),
                }
            } else {
                StoreError::ObjectStoreFull {
                    id,
                    requested: need,
                    available: capacity - st.pinned_bytes,
                    pinned: st.pinned_bytes,
                    capacity,
                }
            });
        }
    }

    fn arena_dir(&self) -> PathBuf {
        self.arena.dir().to_owned()
    }

    /// Moves an unpinned primary copy out of memory, writing it to the spill directory first
    /// unless a spilled copy already exists.
    fn spill(&self, st: &mut State, id: ObjectId) -> Result<(), StoreError> {
        let e = &st.objects[&id];
        let b = e.block().expect("an LRU object is in memory");
        if !e.spilled {
            let crc = write_spill_file(
                &self.spill_dir,
                id,
                self.arena.slice(b.offset, b.total()),
                b.data_size,
            )?;
            self.spilled_bytes.fetch_add(b.total(), Ordering::Relaxed);
            let e = st.objects.get_mut(&id).expect("exists");
            e.spilled = true;
            e.crc.get_or_insert(crc);
            st.spilled_ahead_bytes += b.total();
        }
        st.lru_remove(&id);
        let e = st.objects.get_mut(&id).expect("exists");
        let off = e.offset.take().expect("in memory");
        st.alloc.free(off).expect("the block was allocated");
        st.spilled_ahead_bytes -= b.total();
        st.spilled_only_bytes += b.total();
        st.objects_spilled += 1;
        Ok(())
    }

    /// Writes spill copies of least recently used primaries, without holding the lock while
    /// writing, until the bytes in memory that have no copy on disk fall below `threshold` of
    /// the capacity. The objects stay in memory; `make_room` can then drop them without I/O.
    /// Returns the bytes written.
    pub fn spill_ahead(&self, threshold: f64) -> Result<u64, StoreError> {
        let limit = (self.arena.capacity() as f64 * threshold) as u64;
        let mut written = 0;
        loop {
            let (id, block, tick) = {
                let mut st = self.lock();
                if st.alloc.used_bytes().saturating_sub(st.spilled_ahead_bytes) <= limit {
                    return Ok(written);
                }
                let Some((tick, id)) = st
                    .lru_primary
                    .iter()
                    .map(|(t, id)| (*t, *id))
                    .find(|(_, id)| !st.objects[id].spilled)
                else {
                    return Ok(written);
                };
                st.pin(SPILLER, id);
                (
                    id,
                    st.objects[&id].block().expect("an LRU object is in memory"),
                    tick,
                )
            };
            // The pin keeps the block in place and the sealed bytes never change.
            let res = write_spill_file(
                &self.spill_dir,
                id,
                self.arena.slice(block.offset, block.total()),
                block.data_size,
            );
            let mut st = self.lock();
            if let Ok(crc) = &res {
                let e = st.objects.get_mut(&id).expect("a pinned object exists");
                e.spilled = true;
                e.crc.get_or_insert(*crc);
                st.spilled_ahead_bytes += block.total();
                written += block.total();
                self.spilled_bytes
                    .fetch_add(block.total(), Ordering::Relaxed);
            }
            if st.unpin(SPILLER, id).expect("the spiller holds a pin") {
                if st.objects[&id].delete_pending {
                    Self::remove(&mut st, &self.spill_dir, id);
                } else {
                    // Back to its old place in the LRU order: writing it was not a use.
                    st.lru_remove(&id);
                    let e = st.objects.get_mut(&id).expect("exists");
                    e.tick = tick;
                    st.lru_primary.insert(tick, id);
                }
            }
            res?;
        }
    }

    /// Runs [`spill_ahead`](Self::spill_ahead) in a background thread every `period` (and
    /// when a create finds the store above the threshold) until the store is dropped.
    pub fn start_spiller(
        self: &std::sync::Arc<Self>,
        threshold: f64,
        period: Duration,
    ) -> std::io::Result<()> {
        let weak = std::sync::Arc::downgrade(self);
        std::thread::Builder::new()
            .name("object-store-spiller".into())
            .spawn(move || {
                while let Some(store) = weak.upgrade() {
                    if let Err(e) = store.spill_ahead(threshold) {
                        tracing::warn!("spilling ahead failed: {e}");
                    }
                    let wanted = store.spill_wanted.lock().unwrap_or_else(|p| p.into_inner());
                    let mut wanted = store
                        .spill_kick
                        .wait_timeout(wanted, period)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    *wanted = false;
                }
            })?;
        Ok(())
    }

    /// Brings a spilled object back into memory (it stays spilled on disk too, so evicting it
    /// again is free).
    fn restore(&self, st: &mut State, id: ObjectId) -> Result<(), StoreError> {
        let (data_size, meta_size) = {
            let e = &st.objects[&id];
            (e.data_size, e.meta_size)
        };
        let total = data_size + meta_size;
        let off = self.make_room(st, id, alloc::round_up(total).expect("fit once"))?;
        // SAFETY: the block was just allocated under the lock and no one knows its offset yet.
        let dst = unsafe { self.arena.slice_mut(off, total) };
        if let Err(e) = read_spill_file(&self.spill_dir, id, dst, data_size, st.objects[&id].crc) {
            st.alloc.free(off).expect("just allocated");
            return Err(e);
        }
        self.restored_bytes.fetch_add(total, Ordering::Relaxed);
        let e = st.objects.get_mut(&id).expect("exists");
        e.offset = Some(off);
        st.spilled_ahead_bytes += total;
        st.spilled_only_bytes -= total;
        st.objects_spilled -= 1;
        st.lru_touch(id);
        Ok(())
    }

    /// Forgets an object: frees its block and removes its spill file. Never called on a pinned
    /// object.
    fn remove(st: &mut State, spill_dir: &Path, id: ObjectId) {
        st.lru_remove(&id);
        let Some(e) = st.objects.remove(&id) else {
            return;
        };
        debug_assert_eq!(e.pins, 0);
        match e.offset {
            Some(off) => {
                st.alloc.free(off).expect("the block was allocated");
                if e.spilled {
                    st.spilled_ahead_bytes -= e.data_size + e.meta_size;
                }
            }
            None => {
                st.spilled_only_bytes -= e.data_size + e.meta_size;
                st.objects_spilled -= 1;
            }
        }
        if e.spilled {
            let _ = std::fs::remove_file(spill_path(spill_dir, id));
        }
    }
}

/// Seal and abort are for the creator of an unsealed object only.
fn check_unsealed_by(e: &Entry, client: ClientId, id: ObjectId) -> Result<(), StoreError> {
    if e.sealed {
        return Err(StoreError::AlreadySealed(id));
    }
    if e.creator != Some(client) {
        return Err(StoreError::NotCreator(id));
    }
    Ok(())
}

const SPILL_MAGIC: &[u8; 8] = b"RYOBJv1\0";
const SPILL_HEADER: usize = 8 + 8 + 4;

fn spill_path(dir: &Path, id: ObjectId) -> PathBuf {
    dir.join(id.to_string())
}

/// Writes `<dir>/<id>` as header (magic, data size, crc) + bytes, through a temporary file so
/// a reader never sees a partial one. On any error the temporary file is removed.
fn write_spill_file(
    dir: &Path,
    id: ObjectId,
    bytes: &[u8],
    data_size: u64,
) -> Result<u32, StoreError> {
    let path = spill_path(dir, id);
    let tmp = dir.join(format!("{id}.tmp"));
    let crc = crc32fast::hash(bytes);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        let mut header = [0u8; SPILL_HEADER];
        header[..8].copy_from_slice(SPILL_MAGIC);
        header[8..16].copy_from_slice(&data_size.to_le_bytes());
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        f.write_all(&header)?;
        f.write_all(bytes)?;
        std::fs::rename(&tmp, &path)
    })();
    match res {
        Ok(()) => Ok(crc),
        Err(source) => {
            let _ = std::fs::remove_file(&tmp);
            if source.raw_os_error() == Some(nix::libc::ENOSPC)
                || source.raw_os_error() == Some(nix::libc::EDQUOT)
            {
                Err(StoreError::OutOfDisk {
                    dir: dir.to_owned(),
                    requested: (bytes.len() + SPILL_HEADER) as u64,
                })
            } else {
                Err(StoreError::Io { path: tmp, source })
            }
        }
    }
}

fn read_spill_file(
    dir: &Path,
    id: ObjectId,
    dst: &mut [u8],
    data_size: u64,
    crc: Option<u32>,
) -> Result<(), StoreError> {
    let path = spill_path(dir, id);
    let corrupt = |reason: String| StoreError::CorruptSpill {
        id,
        path: path.clone(),
        reason,
    };
    let mut f = File::open(&path).map_err(|source| StoreError::Io {
        path: path.clone(),
        source,
    })?;
    let mut header = [0u8; SPILL_HEADER];
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    f.read_exact(&mut header).map_err(io)?;
    if &header[..8] != SPILL_MAGIC || header[8..16] != data_size.to_le_bytes() {
        return Err(corrupt("bad header".into()));
    }
    f.read_exact(dst).map_err(|source| StoreError::Io {
        path: path.clone(),
        source,
    })?;
    let want = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    let got = crc32fast::hash(dst);
    if got != want || crc.is_some_and(|c| c != got) {
        return Err(corrupt(format!("checksum {got:08x}, expected {want:08x}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn store(capacity: u64) -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            capacity,
            plasma_dir: dir.path().to_owned(),
            spill_dir: dir.path().join("spill"),
            chunk: 1 << 20,
        };
        (Store::open(&cfg).unwrap(), dir)
    }

    fn oid(n: u8) -> ObjectId {
        ObjectId::from_bytes([n; 20])
    }

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn read(s: &Store, b: Block) -> Vec<u8> {
        s.arena().slice(b.offset, b.total()).to_vec()
    }

    #[test]
    fn lifecycle_errors_are_precise() {
        let (s, _d) = store(1 << 20);
        let (a, b) = (s.new_client(), s.new_client());
        let blk = s.create(a, oid(1), 10, 2, true).unwrap();
        assert!(matches!(
            s.create(b, oid(1), 1, 0, true),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(s.seal(b, oid(1)), Err(StoreError::NotCreator(_))));
        // Unsealed objects are invisible to get.
        assert_eq!(
            s.get(b, &[oid(1)], Some(Duration::ZERO), &|| false)
                .unwrap(),
            vec![None]
        );
        s.arena().write(blk.offset, &bytes(1, 12));
        s.seal(a, oid(1)).unwrap();
        assert!(matches!(
            s.seal(a, oid(1)),
            Err(StoreError::AlreadySealed(_))
        ));
        assert!(matches!(
            s.abort(a, oid(1)),
            Err(StoreError::AlreadySealed(_))
        ));
        let got = s
            .get(b, &[oid(1), oid(2)], Some(Duration::ZERO), &|| false)
            .unwrap();
        assert_eq!(got[1], None);
        assert_eq!(read(&s, got[0].unwrap()), bytes(1, 12));
        assert!(matches!(
            s.release(b, oid(2)),
            Err(StoreError::NotPinned(_))
        ));
        // Deleting a pinned object waits for its pins.
        s.release(a, oid(1)).unwrap();
        assert_eq!(s.delete(&[oid(1)]), 0);
        assert!(!s.contains(&oid(1)));
        s.release(b, oid(1)).unwrap();
        assert_eq!(s.stats().used, 0);
        let e = s.create(a, oid(3), 2 << 20, 0, true).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::TooLarge {
                    requested: 2097152,
                    capacity: 1048576,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn get_waits_for_seal_and_times_out() {
        let (s, _d) = store(1 << 20);
        let s = std::sync::Arc::new(s);
        let c = s.new_client();
        s.create(c, oid(1), 8, 0, true).unwrap();
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || {
            let r = s2.new_client();
            s2.get(r, &[oid(1)], Some(Duration::from_secs(30)), &|| false)
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(50));
        s.seal(c, oid(1)).unwrap();
        assert!(waiter.join().unwrap()[0].is_some());
        let t = Instant::now();
        assert_eq!(
            s.get(c, &[oid(9)], Some(Duration::from_millis(200)), &|| false)
                .unwrap(),
            vec![None]
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
        // A cancelled wait returns early.
        assert_eq!(s.get(c, &[oid(9)], None, &|| true).unwrap(), vec![None]);
    }

    #[test]
    fn disconnect_releases_pins_and_aborts_unsealed() {
        let (s, _d) = store(1 << 20);
        let (w, r) = (s.new_client(), s.new_client());
        s.put(oid(1), &bytes(1, 1000), b"m", true).unwrap();
        s.create(w, oid(2), 500, 0, true).unwrap();
        s.get(r, &[oid(1)], None, &|| false).unwrap();
        s.get(r, &[oid(1)], None, &|| false).unwrap();
        assert_eq!(s.stats().pinned, 1024 + 512);
        s.disconnect(r);
        s.disconnect(w);
        let st = s.stats();
        assert_eq!((st.pinned, st.used), (0, 1024));
        assert!(s.contains(&oid(1)) && !s.contains(&oid(2)));
    }

    #[test]
    fn pressure_evicts_secondaries_first_then_spills_and_restores() {
        let (s, d) = store(256 * 1024);
        let c = s.new_client();
        let chunk = 64 * 1024;
        s.put(oid(1), &bytes(1, chunk), b"", false).unwrap(); // secondary
        s.put(oid(2), &bytes(2, chunk), b"", true).unwrap();
        s.put(oid(3), &bytes(3, chunk), b"", true).unwrap();
        s.put(oid(4), &bytes(4, chunk), b"", true).unwrap();
        // Full: the secondary copy goes first.
        s.put(oid(5), &bytes(5, chunk), b"", true).unwrap();
        assert!(!s.contains(&oid(1)));
        assert_eq!(s.stats().evictions_total, 1);
        // Then the least recently used primary is spilled, not lost.
        s.put(oid(6), &bytes(6, chunk), b"", true).unwrap();
        let st = s.stats();
        assert_eq!((st.objects_spilled, st.spilled), (1, chunk as u64));
        assert!(d.path().join("spill").join(oid(2).to_string()).exists());
        assert!(s.contains(&oid(2)));
        let b = s
            .get(c, &[oid(2)], Some(Duration::ZERO), &|| false)
            .unwrap()[0]
            .unwrap();
        assert_eq!(read(&s, b), bytes(2, chunk));
        assert_eq!(s.stats().restored_bytes_total, chunk as u64);
        // Everything pinned: now, and only now, the store is full.
        for i in 3..=5 {
            s.get(c, &[oid(i)], Some(Duration::ZERO), &|| false)
                .unwrap();
        }
        match s.create(c, oid(7), 1, 0, true).unwrap_err() {
            StoreError::ObjectStoreFull {
                requested: 64,
                pinned,
                capacity: 262144,
                ..
            } => assert_eq!(pinned, 4 * chunk as u64),
            other => panic!("unexpected {other}"),
        }
        // Delete removes the spill file too.
        s.disconnect(c);
        s.delete(&[oid(2)]);
        assert!(!d.path().join("spill").join(oid(2).to_string()).exists());
    }

    #[test]
    fn a_copy_made_primary_is_kept_and_one_made_secondary_is_evicted() {
        let (s, _d) = store(256 * 1024);
        let chunk = 64 * 1024;
        s.put(oid(1), &bytes(1, chunk), b"", false).unwrap(); // pulled: secondary
        s.put(oid(2), &bytes(2, chunk), b"", true).unwrap();
        assert_eq!(s.primary_ids(), vec![oid(2)]);
        // A drain hands oid(1) to this node (primary), and oid(2) moves away (secondary).
        assert!(s.set_primary(oid(1), true));
        assert!(s.set_primary(oid(2), false));
        assert!(!s.set_primary(oid(9), true), "not here");
        assert_eq!(s.primary_ids(), vec![oid(1)]);
        assert_eq!(s.primary_count(), 1);
        for i in 3..=5 {
            s.put(oid(i), &bytes(i, chunk), b"", true).unwrap();
        }
        // Full: the demoted copy is evicted, the promoted one is not.
        assert!(!s.contains(&oid(2)));
        assert!(s.contains(&oid(1)));
        assert_eq!(s.stats().evictions_total, 1);
    }

    #[test]
    fn spilling_ahead_takes_disk_writes_off_the_create_path() {
        let (s, d) = store(256 * 1024);
        let chunk = 64 * 1024;
        for i in 1..=4 {
            s.put(oid(i), &bytes(i, chunk), b"", true).unwrap();
        }
        // Above 50 %: the two oldest get disk copies and stay in memory.
        assert_eq!(s.spill_ahead(0.5).unwrap(), 2 * chunk as u64);
        let st = s.stats();
        assert_eq!(
            (
                st.objects_in_memory,
                st.objects_spilled,
                st.spilled_bytes_total
            ),
            (4, 0, 2 * chunk as u64)
        );
        assert!(d.path().join("spill").join(oid(1).to_string()).exists());
        // Room for two more is made by dropping those copies: no new writes.
        s.put(oid(5), &bytes(5, chunk), b"", true).unwrap();
        s.put(oid(6), &bytes(6, chunk), b"", true).unwrap();
        let st = s.stats();
        assert_eq!(
            (st.objects_spilled, st.spilled_bytes_total),
            (2, 2 * chunk as u64)
        );
        let b = s
            .get(1, &[oid(1)], Some(Duration::ZERO), &|| false)
            .unwrap()[0]
            .unwrap();
        assert_eq!(read(&s, b), bytes(1, chunk));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put { id: u8, len: u16, primary: bool },
        CreateUnsealed { client: u8, id: u8, len: u16 },
        Seal { id: u8 },
        Get { client: u8, id: u8 },
        Release { client: u8, id: u8 },
        Delete { id: u8 },
        Disconnect { client: u8 },
        SpillAhead,
    }

    fn op() -> impl Strategy<Value = Op> {
        let (c, i) = (0u8..3, 0u8..10);
        prop_oneof![
            4 => (i.clone(), 0u16..20_000, any::<bool>()).prop_map(|(id, len, primary)| Op::Put { id, len, primary }),
            1 => (c.clone(), i.clone(), 0u16..20_000).prop_map(|(client, id, len)| Op::CreateUnsealed { client, id, len }),
            1 => i.clone().prop_map(|id| Op::Seal { id }),
            3 => (c.clone(), i.clone()).prop_map(|(client, id)| Op::Get { client, id }),
            3 => (c.clone(), i.clone()).prop_map(|(client, id)| Op::Release { client, id }),
            1 => i.clone().prop_map(|id| Op::Delete { id }),
            1 => c.prop_map(|client| Op::Disconnect { client }),
            1 => Just(Op::SpillAhead),
        ]
    }

    #[derive(Default, Debug)]
    struct Model {
        /// id → (content, sealed, creator while unsealed)
        objects: HashMap<u8, (Vec<u8>, bool, Option<u8>)>,
        /// sealed secondary copies: the store may evict them whenever they are unpinned
        secondary: std::collections::HashSet<u8>,
        /// (client, id) → pins
        pins: HashMap<(u8, u8), u32>,
        /// ids whose delete waits for pins
        doomed: std::collections::HashSet<u8>,
        /// blocks pinned by someone, with their content: must never change
        views: HashMap<u8, Block>,
    }

    impl Model {
        fn pinned(&self, id: u8) -> bool {
            self.pins.iter().any(|(&(_, i), &n)| i == id && n > 0)
        }
        /// Forgets a secondary copy the store evicted; false if the store lost anything else.
        fn evicted(&mut self, id: u8) -> bool {
            if self.secondary.contains(&id) && !self.pinned(id) {
                self.objects.remove(&id);
                self.secondary.remove(&id);
                self.doomed.remove(&id);
                true
            } else {
                false
            }
        }
        fn forget_if_free(&mut self, id: u8) {
            if !self.pinned(id) {
                self.views.remove(&id);
                if self.doomed.remove(&id) {
                    self.objects.remove(&id);
                    self.secondary.remove(&id);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a model: contents survive eviction, spilling and restore; pinned bytes never
        /// move or change; pins, deletes and disconnects behave as specified; `ObjectStoreFull`
        /// happens only when the pinned bytes leave no room; the allocator stays consistent.
        #[test]
        fn lifecycle_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
            let (s, _d) = store(64 * 1024);
            let clients: Vec<ClientId> = (0..3).map(|_| s.new_client()).collect();
            let mut m = Model::default();
            for op in ops {
                match op {
                    Op::Put { id, len, primary } => {
                        let data = bytes(id ^ len as u8, len as usize);
                        let visible = m.objects.get(&id).is_some_and(|o| o.1) && !m.doomed.contains(&id);
                        if visible && !s.contains(&oid(id)) {
                            prop_assert!(m.evicted(id), "object {} lost", id);
                        }
                        match s.put(oid(id), &data, &[], primary) {
                            Ok(()) => {
                                prop_assert!(!m.objects.contains_key(&id));
                                m.objects.insert(id, (data, true, None));
                                if !primary {
                                    m.secondary.insert(id);
                                }
                            }
                            Err(StoreError::AlreadyExists(_)) => prop_assert!(m.objects.contains_key(&id)),
                            Err(StoreError::ObjectStoreFull { .. }) => {
                                prop_assert!(!m.objects.contains_key(&id));
                                let st = s.stats();
                                prop_assert_eq!(st.used, st.pinned, "full while unpinned bytes remain");
                            }
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::CreateUnsealed { client, id, len } => {
                        match s.create(clients[client as usize], oid(id), len as u64, 0, true) {
                            Ok(b) => {
                                prop_assert!(!m.objects.contains_key(&id) || m.evicted(id));
                                let data = bytes(id, len as usize);
                                s.arena().write(b.offset, &data);
                                m.objects.insert(id, (data, false, Some(client)));
                                *m.pins.entry((client, id)).or_default() += 1;
                                m.views.insert(id, b);
                            }
                            Err(StoreError::AlreadyExists(_)) => prop_assert!(m.objects.contains_key(&id)),
                            Err(StoreError::ObjectStoreFull { .. }) => {
                                let st = s.stats();
                                prop_assert_eq!(st.used, st.pinned);
                            }
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Seal { id } => {
                        let creator = m.objects.get(&id).and_then(|o| o.2);
                        let res = creator.map(|c| s.seal(clients[c as usize], oid(id)));
                        match res {
                            Some(r) => {
                                prop_assert!(r.is_ok());
                                let o = m.objects.get_mut(&id).unwrap();
                                o.1 = true;
                                o.2 = None;
                            }
                            None => prop_assert!(s.seal(clients[0], oid(id)).is_err()),
                        }
                    }
                    Op::Get { client, id } => {
                        match s.get(clients[client as usize], &[oid(id)], Some(Duration::ZERO), &|| false) {
                            Ok(got) => {
                                let visible = m.objects.get(&id).is_some_and(|o| o.1) && !m.doomed.contains(&id);
                                prop_assert!(got[0].is_some() == visible || (visible && m.evicted(id)), "object {} visible {}", id, visible);
                                if let Some(b) = got[0] {
                                    prop_assert_eq!(&read(&s, b), &m.objects[&id].0);
                                    *m.pins.entry((client, id)).or_default() += 1;
                                    m.views.insert(id, b);
                                }
                            }
                            Err(StoreError::ObjectStoreFull { .. }) => {
                                // Restoring a spilled object needs room the pins do not leave.
                                let st = s.stats();
                                prop_assert_eq!(st.used, st.pinned);
                            }
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Release { client, id } => {
                        let held = m.pins.get(&(client, id)).copied().unwrap_or(0);
                        let sealed = m.objects.get(&id).is_some_and(|o| o.1);
                        let r = s.release(clients[client as usize], oid(id));
                        prop_assert_eq!(r.is_ok(), held > 0 && sealed);
                        if held > 0 && sealed {
                            *m.pins.get_mut(&(client, id)).unwrap() -= 1;
                            m.forget_if_free(id);
                        }
                    }
                    Op::Delete { id } => {
                        s.delete(&[oid(id)]);
                        if m.objects.contains_key(&id) {
                            m.doomed.insert(id);
                            m.forget_if_free(id);
                        }
                    }
                    Op::SpillAhead => {
                        s.spill_ahead(0.25).unwrap();
                    }
                    Op::Disconnect { client } => {
                        s.disconnect(clients[client as usize]);
                        let ids: Vec<u8> = m.pins.keys().filter(|k| k.0 == client).map(|k| k.1).collect();
                        for id in ids {
                            m.pins.remove(&(client, id));
                            if m.objects.get(&id).is_some_and(|o| o.2 == Some(client)) {
                                m.objects.remove(&id);
                                m.views.remove(&id);
                            }
                            m.forget_if_free(id);
                        }
                    }
                }
                // Pinned bytes never move or change.
                for (id, b) in &m.views {
                    prop_assert_eq!(&read(&s, *b), &m.objects[id].0, "pinned object {} changed", id);
                }
                let pinned: u64 = m.views.values().map(|b| alloc::round_up(b.total()).unwrap()).sum();
                prop_assert_eq!(s.stats().pinned, pinned);
                let st = s.lock();
                prop_assert_eq!(st.alloc.check(), Ok(()));
            }
            // Every visible object reads back intact, restored from disk if it was spilled.
            let reader = s.new_client();
            for (id, (data, sealed, _)) in &m.objects {
                if *sealed && !m.doomed.contains(id) {
                    match s.get(reader, &[oid(*id)], Some(Duration::ZERO), &|| false) {
                        Ok(got) => match got[0] {
                            Some(b) => {
                                prop_assert_eq!(&read(&s, b), data);
                                s.release(reader, oid(*id)).unwrap();
                            }
                            None => prop_assert!(m.secondary.contains(id) && !m.pinned(*id), "lost object {}", id),
                        },
                        Err(StoreError::ObjectStoreFull { .. }) => {}
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
            }
        }
    }
}
