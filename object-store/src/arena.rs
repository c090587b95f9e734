//! The shared-memory arena: one anonymous file on a tmpfs (`O_TMPFILE` in the plasma
//! directory, `/dev/shm` by default), sized to the store's capacity but sparse, mapped once by
//! the node and once by every local client (the fd travels over the store's Unix socket).
//!
//! Invariant: no byte of the mapping is touched before [`ShmArena::reserve_to`] has
//! `fallocate`d it. Touching a sparse page of a full tmpfs raises SIGBUS; `fallocate` on a
//! full tmpfs returns a clean ENOSPC instead, so a full `/dev/shm` becomes an error, never a
//! crash. Memory is reserved in chunks as the store fills, so several nodes with default
//! settings fit side by side on one machine.
//!
//! This file, `client.rs` and the transfer writer hold the crate's `unsafe`: raw access to the
//! shared mapping, whose safety rests on the store's pin protocol (a block is freed only when
//! no one holds a pin on it, and a sealed object is never written).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Advice, MmapRaw};

/// Granularity of reservation. Small enough that an idle node holds little, large enough
/// that the `fallocate` calls do not show in put throughput.
pub const DEFAULT_CHUNK: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("cannot create the object store arena in {dir}: {source}")]
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} has no room for {requested} more bytes of object store memory (ENOSPC)")]
    NoSpace { dir: PathBuf, requested: u64 },
    #[error("cannot reserve object store memory in {dir}: {source}")]
    Reserve {
        dir: PathBuf,
        source: std::io::Error,
    },
}

pub struct ShmArena {
    file: File,
    map: MmapRaw,
    dir: PathBuf,
    capacity: u64,
    chunk: u64,
    /// Grows only; changed by `reserve_to`, which the store calls under its lock.
    reserved: AtomicU64,
}

impl ShmArena {
    /// Creates a sparse arena of `capacity` bytes in `dir` (a tmpfs). Nothing is reserved yet.
    pub fn create(dir: &Path, capacity: u64, chunk: u64) -> Result<Self, ArenaError> {
        let err = |source| ArenaError::Create {
            dir: dir.to_owned(),
            source,
        };
        // O_TMPFILE: the file has no name, so a crashed node leaves nothing behind in /dev/shm.
        let file = tempfile::tempfile_in(dir).map_err(err)?;
        file.set_len(capacity).map_err(err)?;
        let map = MmapRaw::map_raw(&file).map_err(err)?;
        Ok(Self {
            file,
            map,
            dir: dir.to_owned(),
            capacity,
            chunk: chunk.max(1 << 20),
            reserved: AtomicU64::new(0),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    /// Reservation granularity: the reserved size is always a multiple of it, or the capacity.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }
    /// Bytes reserved so far (`0..reserved` is backed by memory).
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
    pub fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Reserves memory so that `0..end` is backed, rounding up to whole chunks (capped at the
    /// capacity), and pre-faults the new range in this process. Returns the new reserved size.
    /// Callers serialize calls (the store calls it under its lock).
    pub fn reserve_to(&self, end: u64) -> Result<u64, ArenaError> {
        let reserved = self.reserved();
        if end <= reserved {
            return Ok(reserved);
        }
        let target = end
            .div_ceil(self.chunk)
            .saturating_mul(self.chunk)
            .min(self.capacity)
            .max(end.min(self.capacity));
        let len = target - reserved;
        match nix::fcntl::posix_fallocate(self.file.as_fd(), reserved as i64, len as i64) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOSPC) => {
                return Err(ArenaError::NoSpace {
                    dir: self.dir.clone(),
                    requested: len,
                });
            }
            Err(e) => {
                return Err(ArenaError::Reserve {
                    dir: self.dir.clone(),
                    source: e.into(),
                });
            }
        }
        // Best effort: populating page tables now keeps first-touch faults off the hot path.
        let _ = self
            .map
            .advise_range(Advice::PopulateWrite, reserved as usize, len as usize);
        self.reserved.store(target, Ordering::Release);
        Ok(target)
    }

    /// Copies `src` into the arena at `offset`.
    ///
    /// The caller must own the block `offset..offset + src.len()` (created, unsealed, pinned by
    /// the caller) inside the reserved range.
    pub fn write(&self, offset: u64, src: &[u8]) {
        assert!(
            offset + src.len() as u64 <= self.reserved(),
            "write outside the reserved arena"
        );
        // SAFETY: in bounds of the mapping (checked above); the block is owned by the caller,
        // so no other process reads or writes it concurrently (pin protocol, module doc).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base().add(offset as usize), src.len())
        }
    }

    /// The directory holding the arena's (nameless) file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A writable view of `len` bytes at `offset`.
    ///
    /// # Safety
    /// The caller must own the block (freshly allocated or created and unsealed by it) and
    /// hand out no other view of it while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> &mut [u8] {
        assert!(
            offset + len <= self.reserved(),
            "write outside the reserved arena"
        );
        // SAFETY: in bounds (checked); exclusive per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.base().add(offset as usize), len as usize) }
    }

    /// A view of `len` bytes at `offset`.
    ///
    /// The caller must hold a pin on a sealed object covering the range for as long as the
    /// slice lives, so the bytes are neither freed nor written.
    pub fn slice(&self, offset: u64, len: u64) -> &[u8] {
        assert!(
            offset + len <= self.reserved(),
            "read outside the reserved arena"
        );
        // SAFETY: in bounds (checked); immutable while pinned (pin protocol, module doc).
        unsafe { std::slice::from_raw_parts(self.base().add(offset as usize), len as usize) }
    }
}

// SAFETY: the mapping is shared memory addressed through raw pointers; every access goes
// through `write`/`slice`, whose callers uphold the pin protocol.
unsafe impl Send for ShmArena {}
unsafe impl Sync for ShmArena {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_in_chunks_up_to_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let a = ShmArena::create(dir.path(), 5 << 20, 2 << 20).unwrap();
        assert_eq!(a.reserved(), 0);
        assert_eq!(a.reserve_to(1).unwrap(), 2 << 20);
        assert_eq!(a.reserve_to(3 << 20).unwrap(), 4 << 20);
        assert_eq!(a.reserve_to(5 << 20).unwrap(), 5 << 20);
        a.write(100, b"hello");
        assert_eq!(a.slice(100, 5), b"hello");
        // The O_TMPFILE has no name in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
