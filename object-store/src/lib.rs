//! The per-node plasma-like object store (shared-memory arena, allocator, lifecycle,
//! eviction, spilling, local socket protocol, chunked transfer).
//!
//! Empty until the object-store issue fills it; the node daemon already depends on it so the
//! crate graph of DESIGN §12 holds from the start.
