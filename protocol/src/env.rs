//! The environment a node gives the processes it starts (workers and job drivers), named
//! once: the node sets these and the SDK reads them.

/// The worker's id; set only in workers (its presence is how the SDK knows it is one).
pub const WORKER_ID: &str = "RAYCTL_WORKER_ID";
/// The node's id (hex).
pub const NODE_ID: &str = "RAYCTL_NODE_ID";
/// The node manager's address (host:port): the process's node.
pub const NODE_ADDRESS: &str = "RAYCTL_NODE_ADDRESS";
/// The host the node advertises (what worker output is tagged with, `ip=`).
pub const NODE_IP_ADDRESS: &str = "RAYCTL_NODE_IP_ADDRESS";
/// The node's object store socket (zero-copy reads and writes).
pub const OBJECT_STORE_SOCKET: &str = "RAYCTL_OBJECT_STORE_SOCKET";
/// The node's object manager (pulls between nodes).
pub const OBJECT_MANAGER_ADDRESS: &str = "RAYCTL_OBJECT_MANAGER_ADDRESS";
/// The job the process belongs to.
pub const JOB_ID: &str = "RAYCTL_JOB_ID";
/// A worker's binary, by sha256 (the lease shape's binary).
pub const BINARY_SHA256: &str = "RAYCTL_BINARY_SHA256";
/// Set (not "0") for a driver that connects to the cluster from outside any node.
pub const REMOTE: &str = "RAYCTL_REMOTE";
