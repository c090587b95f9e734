//! The wire contract of the cluster: generated protobuf messages (and, with the `grpc`
//! feature, the tonic clients and servers), the id newtypes, the error-code mapping, the
//! cluster-token check and `HeadClient`, the retrying client every process uses to reach the
//! heads.
//!
//! Invariant: with default features this crate has no tokio in its dependency tree
//! (`tests/no_tokio.rs`), so pure crates such as `scheduler` may depend on it.

pub mod env;
pub mod error;
pub mod ids;
/// Lowercase hex (ids, digests), re-exported so every crate writes it the same way.
pub use hex;
pub mod session;

#[cfg(feature = "grpc")]
pub mod auth;
#[cfg(feature = "grpc")]
pub mod client;
#[cfg(feature = "grpc")]
pub mod codec;
#[cfg(feature = "grpc")]
pub mod server;

/// Generated protobuf types of package `rayctl.v1`.
#[allow(unreachable_pub, clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/rayctl.v1.rs"));
}

/// The GCS calls of Ray's own tools we answer (package `ray.rpc`, Ray's wire format).
#[allow(unreachable_pub, clippy::all, missing_docs)]
pub mod ray_rpc {
    include!(concat!(env!("OUT_DIR"), "/ray.rpc.rs"));
}

pub use error::RpcError;

/// A task error kind as our messages spell it (`PANIC`, `WORKER_DIED`, …; `UNKNOWN` for
/// other values).
pub fn task_error_kind_name(kind: pb::TaskErrorKind) -> &'static str {
    use pb::TaskErrorKind as K;
    match kind {
        K::Panic => "PANIC",
        K::WorkerDied => "WORKER_DIED",
        K::Argument => "ARGUMENT",
        K::ArgLost => "ARG_LOST",
        K::UnknownFunction => "UNKNOWN_FUNCTION",
        K::Store => "STORE",
        K::Dependency => "DEPENDENCY",
        K::Scheduling => "SCHEDULING",
        K::ObjectLost => "OBJECT_LOST",
        K::ActorDied => "ACTOR_DIED",
        K::ActorUnavailable => "ACTOR_UNAVAILABLE",
        K::Cancelled => "CANCELLED",
        K::OwnerDied => "OWNER_DIED",
        K::Unspecified => "UNKNOWN",
    }
}

/// A task state as Ray spells it (`PENDING_ARGS_AVAIL`, …, `FINISHED`, `FAILED`; `NIL`
/// for an unset one).
pub fn task_state_name(state: pb::TaskState) -> &'static str {
    use pb::TaskState as S;
    match state {
        S::PendingArgsAvail => "PENDING_ARGS_AVAIL",
        S::PendingNodeAssignment => "PENDING_NODE_ASSIGNMENT",
        S::SubmittedToWorker => "SUBMITTED_TO_WORKER",
        S::Finished => "FINISHED",
        S::Failed => "FAILED",
        S::Unspecified => "NIL",
    }
}

/// The task state Ray's name `name` spells (Unspecified for another name).
pub fn task_state_from_name(name: &str) -> pb::TaskState {
    use pb::TaskState as S;
    [
        S::PendingArgsAvail,
        S::PendingNodeAssignment,
        S::SubmittedToWorker,
        S::Finished,
        S::Failed,
    ]
    .into_iter()
    .find(|s| task_state_name(*s) == name)
    .unwrap_or(S::Unspecified)
}

/// A job status as Ray spells it (`PENDING`, `RUNNING`, …; `UNKNOWN` for other values).
pub fn job_status_name(status: i32) -> &'static str {
    match pb::JobStatus::try_from(status).unwrap_or(pb::JobStatus::Unspecified) {
        pb::JobStatus::Pending => "PENDING",
        pb::JobStatus::Running => "RUNNING",
        pb::JobStatus::Succeeded => "SUCCEEDED",
        pb::JobStatus::Failed => "FAILED",
        pb::JobStatus::Stopped => "STOPPED",
        pb::JobStatus::Unspecified => "UNKNOWN",
    }
}
pub use ids::{ActorId, JobId, LeaseId, NodeId, ObjectId, RaftId, WorkerId};

/// Largest gRPC message any of our servers or clients accepts. Larger ones are answered with
/// RESOURCE_EXHAUSTED.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Environment variable holding the cluster token (alternative to `--auth-token-file`).
pub const AUTH_TOKEN_ENV: &str = "RAYCTL_AUTH_TOKEN";
/// Environment variable holding the head addresses, comma separated.
pub const ADDRESS_ENV: &str = "RAYCTL_ADDRESS";

/// sha256 of a file in lowercase hex: how worker binaries are named between nodes
/// (`LeaseRequest.binary_sha256`, `ReadBinary`).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => h.update(&buf[..n]),
        }
    }
    Ok(sha256_hex(h))
}

/// The lowercase hex digest of `h` (how binaries are named).
pub fn sha256_hex(h: sha2::Sha256) -> String {
    use sha2::Digest;
    hex::encode(h.finalize())
}

/// Whether `s` is a sha256 digest as `sha256_hex` writes it: 64 lowercase hex characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// `working_dir` packages: names, KV layout and (with the `package` feature) safe unpacking.
pub mod package;

#[cfg(test)]
mod tests {
    #[test]
    fn a_sha256_name_is_64_lowercase_hex_characters() {
        use sha2::Digest;
        let name = super::sha256_hex(sha2::Sha256::new_with_prefix(b"abc"));
        assert_eq!(
            name,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(super::is_sha256_hex(&name));
        for bad in [
            &name[..63],
            &name.to_uppercase(),
            &format!("{}g", &name[..63]),
            "",
        ] {
            assert!(!super::is_sha256_hex(bad), "{bad}");
        }
    }
}
