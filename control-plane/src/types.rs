//! openraft's type configuration for the control plane.
//!
//! Head Raft ids are `RaftId::from_address(advertised address)`; `BasicNode.addr` is that
//! address.

use std::io::Cursor;

use crate::state::{Command, Response};

openraft::declare_raft_types!(
    /// The control plane's Raft types.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<u64>;
pub type LogId = openraft::LogId<u64>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;

/// Wraps an I/O or codec error as openraft's storage error.
pub(crate) fn storage_err(verb_write: bool, e: impl std::error::Error + 'static) -> StorageError {
    let any = openraft::AnyError::new(&e);
    let io = if verb_write {
        openraft::StorageIOError::write(any)
    } else {
        openraft::StorageIOError::read(any)
    };
    io.into()
}

/// A failed Raft store I/O call as openraft's storage error, counted
/// (`rayctl_raft_storage_errors_total{op}`) and logged with what the store said (its data
/// dir and the OS error, e.g. "No space left on device"). Every such error is fatal to
/// openraft; the head then exits (`RunningHead::failed`).
pub(crate) fn io_err(op: crate::metrics::StorageOp, e: std::io::Error) -> StorageError {
    crate::metrics::record_storage_error(op);
    tracing::error!(op = op.label(), "raft store {} failed: {e}", op.label());
    storage_err(op != crate::metrics::StorageOp::Read, e)
}
