//! Pure placement logic: no I/O, no tokio, no clock, no RNG of its own (randomness comes in
//! as a `pick` closure). `resources`: fixed-point resource arithmetic; `policy`: where a lease
//! request goes (hybrid, SPREAD, node affinity, queueing, infeasibility); `bundles`: where
//! the bundles of a placement group go (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD);
//! `autoscale`: which worker nodes the autoscaler launches and removes.
//!
//! Invariant: `scheduler` builds without tokio (checked by `protocol/tests/no_tokio.rs`).

pub mod autoscale;
pub mod bundles;
pub mod policy;
pub mod resources;

pub use bundles::{BundlePlacement, BundleStrategy, place_bundles};
pub use policy::{ClusterView, Decision, NodeView, PolicyConfig, SchedulingStrategy, decide};
pub use resources::{ResourceError, ResourceSet};
