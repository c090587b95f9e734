//! Pure placement logic: no I/O, no tokio, no clock, no RNG of its own (randomness comes in
//! as a `pick` closure). `resources`: fixed-point resource arithmetic; `policy`: where a lease
//! request goes (hybrid, SPREAD, node affinity, queueing, infeasibility). Placement-group
//! bundles and the autoscaler's bin-packing come with later issues.
//!
//! Invariant: `scheduler` builds without tokio (checked by `protocol/tests/no_tokio.rs`).

pub mod policy;
pub mod resources;

pub use policy::{decide, ClusterView, Decision, NodeView, PolicyConfig, SchedulingStrategy};
pub use resources::{ResourceError, ResourceSet};
