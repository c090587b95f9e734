//! The per-node plasma-like object store.
//!
//! - [`arena`]: one shared-memory file per node, reserved with `fallocate` in chunks (a full
//!   tmpfs is an error, never SIGBUS), mapped by the node and every local client;
//! - [`alloc`]: the allocator inside it (64-byte aligned, best fit, coalescing);
//! - [`store`]: the lifecycle (create → seal → get/release → delete, pins), LRU eviction of
//!   secondary copies, spilling of primary copies and transparent restore;
//! - [`server`] / [`client`] / [`ipc`]: the node's Unix socket; clients receive the arena fd
//!   and read objects in place (no copy, get cost independent of size);
//! - [`typed`]: rkyv-archived values read in place;
//! - [`transfer`]: the `ObjectManager` gRPC service and the chunked, checksummed [`Puller`];
//! - [`bulk`]: the bulk transfer path (plain TCP from arena to arena) the puller prefers.
//!
//! API Boundary: the node daemon hosts a [`Store`], its [`StoreServer`] and the transfer
//! service; workers and drivers use only [`StoreClient`].

pub mod alloc;
pub mod arena;
pub mod bulk;
pub mod client;
pub mod ipc;
pub mod metrics;
pub mod server;
pub mod store;
pub mod transfer;
pub mod typed;

pub use client::{ClientError, ObjectView, ObjectWriter, StoreClient};
pub use server::StoreServer;
pub use store::{Block, Store, StoreConfig, StoreError, StoreStats};
pub use transfer::{ObjectManagerService, PullError, Puller, PullerConfig};
pub use typed::Typed;

/// The default capacity, as in Ray: 30 % of physical memory, capped by what `plasma_dir`
/// (normally `/dev/shm`) has free.
pub fn default_capacity(plasma_dir: &std::path::Path) -> u64 {
    let ram = nix::unistd::sysconf(nix::unistd::SysconfVar::_PHYS_PAGES)
        .ok()
        .flatten()
        .zip(
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                .ok()
                .flatten(),
        )
        .map_or(2 << 30, |(pages, size)| pages as u64 * size as u64);
    let free = nix::sys::statvfs::statvfs(plasma_dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(u64::MAX);
    (ram * 3 / 10).min(free) & !(alloc::ALIGN - 1)
}
