//! Pure placement logic: no I/O, no tokio, no clock, no RNG of its own. This issue brings the
//! resource arithmetic every later policy builds on; the policies (hybrid, SPREAD, affinity,
//! placement-group bundles) and the autoscaler's bin-packing land with the tasks issue.
//!
//! Invariant: `scheduler` builds without tokio (checked by `protocol/tests/no_tokio.rs`).

pub mod resources;

pub use resources::{ResourceError, ResourceSet};
