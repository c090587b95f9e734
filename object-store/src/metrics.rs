//! Every metric the object store records. Names follow Ray's where the meaning is the same
//! (`ray_object_store_memory`, …) so existing Ray dashboards work; the rest are ours.
//! Gauges are refreshed from [`crate::Store::stats`] by [`record`], which the hosting node
//! calls periodically; transfer counters are recorded as bytes move.

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};

use crate::store::StoreStats;

pub const MEMORY: &str = "ray_object_store_memory";
pub const USED: &str = "ray_object_store_used_memory";
pub const AVAILABLE: &str = "ray_object_store_available_memory";
pub const OBJECTS: &str = "ray_object_store_num_local_objects";
pub const CAPACITY: &str = "rayctl_object_store_capacity_bytes";
pub const RESERVED: &str = "rayctl_object_store_reserved_bytes";
pub const PINNED: &str = "rayctl_object_store_pinned_bytes";
pub const SPILLED_OBJECTS: &str = "rayctl_object_store_spilled_objects";
pub const EVICTIONS: &str = "rayctl_object_store_evictions_total";
pub const SPILLED_BYTES: &str = "rayctl_object_store_spilled_bytes_total";
pub const RESTORED_BYTES: &str = "rayctl_object_store_restored_bytes_total";
pub const TRANSFER_BYTES: &str = "rayctl_object_transfer_bytes_total";

pub fn describe() {
    describe_gauge!(
        MEMORY,
        Unit::Bytes,
        "object bytes by location: MMAP_SHM (shared memory) or SPILLED (disk only)"
    );
    describe_gauge!(USED, Unit::Bytes, "bytes of the arena allocated to objects");
    describe_gauge!(AVAILABLE, Unit::Bytes, "capacity minus used bytes");
    describe_gauge!(OBJECTS, "objects held in shared memory");
    describe_gauge!(
        CAPACITY,
        Unit::Bytes,
        "the store's capacity (--object-store-memory)"
    );
    describe_gauge!(
        RESERVED,
        Unit::Bytes,
        "shared memory reserved with fallocate so far"
    );
    describe_gauge!(
        PINNED,
        Unit::Bytes,
        "bytes pinned by readers and writers (never evicted or spilled)"
    );
    describe_gauge!(SPILLED_OBJECTS, "objects held only in the spill directory");
    describe_counter!(EVICTIONS, "secondary copies evicted under memory pressure");
    describe_counter!(
        SPILLED_BYTES,
        Unit::Bytes,
        "bytes written to the spill directory"
    );
    describe_counter!(
        RESTORED_BYTES,
        Unit::Bytes,
        "bytes restored from the spill directory"
    );
    describe_counter!(
        TRANSFER_BYTES,
        Unit::Bytes,
        "object bytes moved between nodes, by direction (sent, received)"
    );
}

/// Publishes a snapshot of the store.
pub fn record(s: &StoreStats) {
    gauge!(MEMORY, "Location" => "MMAP_SHM").set(s.used as f64);
    gauge!(MEMORY, "Location" => "SPILLED").set(s.spilled as f64);
    gauge!(USED).set(s.used as f64);
    gauge!(AVAILABLE).set(s.capacity.saturating_sub(s.used) as f64);
    gauge!(OBJECTS).set(s.objects_in_memory as f64);
    gauge!(CAPACITY).set(s.capacity as f64);
    gauge!(RESERVED).set(s.reserved as f64);
    gauge!(PINNED).set(s.pinned as f64);
    gauge!(SPILLED_OBJECTS).set(s.objects_spilled as f64);
    counter!(EVICTIONS).absolute(s.evictions_total);
    counter!(SPILLED_BYTES).absolute(s.spilled_bytes_total);
    counter!(RESTORED_BYTES).absolute(s.restored_bytes_total);
}

pub(crate) fn record_sent(bytes: u64) {
    counter!(TRANSFER_BYTES, "direction" => "sent").increment(bytes);
}

pub(crate) fn record_pulled(bytes: u64) {
    counter!(TRANSFER_BYTES, "direction" => "received").increment(bytes);
}
