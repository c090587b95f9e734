//! The allocator inside the arena: best-fit over an address-ordered free list, 64-byte
//! aligned, coalescing on free, with a managed size that only grows (the arena reserves
//! memory in chunks and hands each new chunk to the allocator with [`Allocator::grow`]).
//!
//! Invariants (checked by [`Allocator::check`] in the property tests):
//! - every block's offset and length are multiples of [`ALIGN`];
//! - free and used blocks never overlap and together cover `0..size` exactly;
//! - no two free blocks touch (a free is always coalesced with its neighbours).
//!
//! Best fit keeps large holes whole, and among equal holes the lowest address wins, so the
//! arena fills from the bottom and recently freed (already faulted-in) pages are reused first.

use std::collections::{BTreeMap, BTreeSet};

/// Alignment of every allocation, and so of every object's data: a cache line, and enough for
/// rkyv's archived roots.
pub const ALIGN: u64 = 64;

/// Rounds `n` up to a multiple of [`ALIGN`]; a zero-byte request still takes one unit so every
/// object has a distinct offset.
pub fn round_up(n: u64) -> Option<u64> {
    Some(n.max(1).checked_add(ALIGN - 1)? & !(ALIGN - 1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free block of {requested} bytes (free {free} bytes, largest hole {largest} bytes)")]
    NoSpace {
        requested: u64,
        free: u64,
        largest: u64,
    },
    #[error("offset {0} is not the start of an allocated block")]
    NotAllocated(u64),
    #[error("request of {0} bytes overflows")]
    Overflow(u64),
}

#[derive(Debug, Default, Clone)]
pub struct Allocator {
    size: u64,
    /// offset → length of each free block.
    free_by_offset: BTreeMap<u64, u64>,
    /// (length, offset) of each free block, for best fit.
    free_by_len: BTreeSet<(u64, u64)>,
    /// offset → length of each allocated block.
    used: BTreeMap<u64, u64>,
    used_bytes: u64,
}

impl Allocator {
    /// An allocator managing `0..size` (`size` rounded down to [`ALIGN`]).
    pub fn new(size: u64) -> Self {
        let mut a = Self::default();
        a.grow(size);
        a
    }

    /// Bytes under management (the arena's reserved part).
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }
    pub fn free_bytes(&self) -> u64 {
        self.size - self.used_bytes
    }
    pub fn largest_free(&self) -> u64 {
        self.free_by_len.last().map_or(0, |&(len, _)| len)
    }
    /// The length of the allocated block at `offset`.
    pub fn block_len(&self, offset: u64) -> Option<u64> {
        self.used.get(&offset).copied()
    }
    /// Length of the free block that ends at `size`, 0 if the top block is in use.
    pub fn free_tail(&self) -> u64 {
        match self.free_by_offset.last_key_value() {
            Some((&off, &len)) if off + len == self.size => len,
            _ => 0,
        }
    }

    /// Extends the managed range to `new_size` (rounded down to [`ALIGN`]); never shrinks.
    pub fn grow(&mut self, new_size: u64) {
        let new_size = new_size & !(ALIGN - 1);
        if new_size <= self.size {
            return;
        }
        let (start, len) = (self.size, new_size - self.size);
        self.size = new_size;
        self.insert_free(start, len);
    }

    /// Allocates `len` bytes (rounded up to [`ALIGN`]) and returns the block's offset.
    pub fn alloc(&mut self, len: u64) -> Result<u64, AllocError> {
        let need = round_up(len).ok_or(AllocError::Overflow(len))?;
        let Some(&(hole, off)) = self.free_by_len.range((need, 0)..).next() else {
            return Err(AllocError::NoSpace {
                requested: need,
                free: self.free_bytes(),
                largest: self.largest_free(),
            });
        };
        self.free_by_len.remove(&(hole, off));
        self.free_by_offset.remove(&off);
        if hole > need {
            self.free_by_offset.insert(off + need, hole - need);
            self.free_by_len.insert((hole - need, off + need));
        }
        self.used.insert(off, need);
        self.used_bytes += need;
        Ok(off)
    }

    /// Frees the block at `offset`, merging it with free neighbours. Returns its length.
    pub fn free(&mut self, offset: u64) -> Result<u64, AllocError> {
        let len = self
            .used
            .remove(&offset)
            .ok_or(AllocError::NotAllocated(offset))?;
        self.used_bytes -= len;
        self.insert_free(offset, len);
        Ok(len)
    }

    fn insert_free(&mut self, mut off: u64, mut len: u64) {
        if let Some((&prev, &plen)) = self.free_by_offset.range(..off).next_back()
            && prev + plen == off
        {
            self.free_by_offset.remove(&prev);
            self.free_by_len.remove(&(plen, prev));
            off = prev;
            len += plen;
        }
        if let Some(&nlen) = self.free_by_offset.get(&(off + len)) {
            self.free_by_offset.remove(&(off + len));
            self.free_by_len.remove(&(nlen, off + len));
            len += nlen;
        }
        self.free_by_offset.insert(off, len);
        self.free_by_len.insert((len, off));
    }

    /// Checks every invariant in the module doc; returns the first violation.
    pub fn check(&self) -> Result<(), String> {
        let mut blocks: Vec<(u64, u64, bool)> =
            self.used.iter().map(|(&o, &l)| (o, l, true)).collect();
        blocks.extend(self.free_by_offset.iter().map(|(&o, &l)| (o, l, false)));
        blocks.sort_unstable();
        let mut at = 0;
        let mut prev_free = false;
        for &(off, len, used) in &blocks {
            if off % ALIGN != 0 || len % ALIGN != 0 || len == 0 {
                return Err(format!("misaligned or empty block {off}+{len}"));
            }
            if off != at {
                return Err(format!(
                    "gap or overlap at {at}: next block starts at {off}"
                ));
            }
            if !used && prev_free {
                return Err(format!("uncoalesced free block at {off}"));
            }
            prev_free = !used;
            at = off + len;
        }
        if at != self.size {
            return Err(format!("blocks cover 0..{at}, size is {}", self.size));
        }
        let used: u64 = self.used.values().sum();
        if used != self.used_bytes {
            return Err(format!("used bytes {used} != counter {}", self.used_bytes));
        }
        if self.free_by_len.len() != self.free_by_offset.len()
            || self
                .free_by_offset
                .iter()
                .any(|(&o, &l)| !self.free_by_len.contains(&(l, o)))
        {
            return Err("free indexes disagree".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn best_fit_low_address_and_coalescing() {
        let mut a = Allocator::new(1024);
        let x = a.alloc(1).unwrap();
        let y = a.alloc(100).unwrap();
        let z = a.alloc(64).unwrap();
        assert_eq!((x, y, z), (0, 64, 192));
        assert_eq!(a.used_bytes(), 256);
        a.free(y).unwrap();
        // The 128-byte hole is the best fit for 100 bytes, not the 768-byte tail.
        assert_eq!(a.alloc(65).unwrap(), 64);
        a.free(64).unwrap();
        a.free(x).unwrap();
        a.free(z).unwrap();
        assert_eq!(a.largest_free(), 1024);
        assert_eq!(a.free(z), Err(AllocError::NotAllocated(z)));
        a.check().unwrap();
    }

    #[test]
    fn no_space_names_the_sizes_and_grow_extends() {
        let mut a = Allocator::new(256);
        a.alloc(128).unwrap();
        assert_eq!(
            a.alloc(200),
            Err(AllocError::NoSpace {
                requested: 256,
                free: 128,
                largest: 128
            })
        );
        a.grow(512);
        assert_eq!(a.free_tail(), 384);
        assert_eq!(a.alloc(200).unwrap(), 128);
        assert_eq!(a.alloc(u64::MAX), Err(AllocError::Overflow(u64::MAX)));
        a.check().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64),
        Free(usize),
        Grow(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..5000).prop_map(Op::Alloc),
            3 => any::<usize>().prop_map(Op::Free),
            1 => (0u64..4096).prop_map(Op::Grow),
        ]
    }

    proptest! {
        /// No overlap, no leak, every byte accounted, after any sequence of operations; an
        /// allocation fails only when no free block is large enough.
        #[test]
        fn allocator_invariants(ops in proptest::collection::vec(op(), 1..300)) {
            let mut a = Allocator::new(16 * 1024);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(n) => match a.alloc(n) {
                        Ok(off) => {
                            let len = round_up(n).unwrap();
                            prop_assert!(live.iter().all(|&(o, l)| off + len <= o || o + l <= off));
                            prop_assert!(off + len <= a.size());
                            live.push((off, len));
                        }
                        Err(AllocError::NoSpace { requested, largest, .. }) => prop_assert!(largest < requested),
                        Err(e) => prop_assert!(false, "{e}"),
                    },
                    Op::Free(i) if !live.is_empty() => {
                        let (off, len) = live.swap_remove(i % live.len());
                        prop_assert_eq!(a.free(off), Ok(len));
                    }
                    Op::Free(_) => {}
                    Op::Grow(n) => a.grow(a.size() + n),
                }
                prop_assert_eq!(a.check(), Ok(()));
                prop_assert_eq!(a.used_bytes(), live.iter().map(|l| l.1).sum::<u64>());
            }
            for (off, _) in live.drain(..) {
                a.free(off).unwrap();
            }
            prop_assert_eq!(a.largest_free(), a.size());
        }
    }
}
