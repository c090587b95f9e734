//! The wire contract of the cluster: generated protobuf messages (and, with the `grpc`
//! feature, the tonic clients and servers), the id newtypes, the error-code mapping, the
//! cluster-token check and `HeadClient`, the retrying client every process uses to reach the
//! heads.
//!
//! Invariant: with default features this crate has no tokio in its dependency tree
//! (`tests/no_tokio.rs`), so pure crates such as `scheduler` may depend on it.

pub mod error;
pub mod ids;

#[cfg(feature = "grpc")]
pub mod auth;
#[cfg(feature = "grpc")]
pub mod client;
#[cfg(feature = "grpc")]
pub mod server;

/// Generated protobuf types of package `rayctl.v1`.
#[allow(unreachable_pub, clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/rayctl.v1.rs"));
}

pub use error::RpcError;
pub use ids::{NodeId, ObjectId, RaftId};

/// Largest gRPC message any of our servers or clients accepts. Larger ones are answered with
/// RESOURCE_EXHAUSTED.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Environment variable holding the cluster token (alternative to `--auth-token-file`).
pub const AUTH_TOKEN_ENV: &str = "RAYCTL_AUTH_TOKEN";
/// Environment variable holding the head addresses, comma separated.
pub const ADDRESS_ENV: &str = "RAYCTL_ADDRESS";

/// `working_dir` packages: zip archives stored content-addressed in the replicated KV (so
/// they survive the loss of a head), named and addressed as Ray names them
/// (`gcs://_ray_pkg_<hash>.zip`) so Ray's job clients can upload them too.
///
/// Layout in the KV namespace [`package::KV_NAMESPACE`]: the archive in chunks of
/// [`package::CHUNK`] bytes under `<name>/chunk/<i>`, then `<name>/manifest` (JSON: size,
/// chunks, sha256), written last, so a package is visible only once complete.
pub mod package {
    pub const KV_NAMESPACE: &str = "packages";
    /// One KV value; the control plane's KV limit.
    pub const CHUNK: usize = 1024 * 1024;
    /// Default cap on an archive's size.
    pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;

    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct Manifest {
        pub size: u64,
        pub chunks: u64,
        pub sha256: String,
    }

    /// `_ray_pkg_<hex>.zip`, the hex part 16 to 64 lowercase hex characters.
    pub fn check_name(name: &str) -> Result<(), String> {
        let hex = name.strip_prefix("_ray_pkg_").and_then(|r| r.strip_suffix(".zip"));
        match hex {
            Some(h) if (16..=64).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => Ok(()),
            _ => Err(format!("package name {:?} is not of the form _ray_pkg_<16 to 64 hex chars>.zip", name.chars().take(100).collect::<String>())),
        }
    }

    /// The package name inside a `gcs://` URI.
    pub fn name_from_uri(uri: &str) -> Result<&str, String> {
        let name = uri.strip_prefix("gcs://").ok_or_else(|| format!("working_dir {uri:?} is not a package URI (gcs://_ray_pkg_….zip)"))?;
        check_name(name)?;
        Ok(name)
    }

    pub fn uri(name: &str) -> String {
        format!("gcs://{name}")
    }

    pub fn chunk_key(name: &str, i: u64) -> Vec<u8> {
        format!("{name}/chunk/{i:06}").into_bytes()
    }

    pub fn manifest_key(name: &str) -> Vec<u8> {
        format!("{name}/manifest").into_bytes()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn names_and_uris() {
            let n = "_ray_pkg_0123456789abcdef.zip";
            assert_eq!(super::name_from_uri(&super::uri(n)), Ok(n));
            for bad in ["gcs://_ray_pkg_x.zip", "s3://_ray_pkg_0123456789abcdef.zip", "gcs://../../etc", "gcs://_ray_pkg_0123456789ABCDEF.zip"] {
                assert!(super::name_from_uri(bad).is_err(), "{bad}");
            }
        }
    }
}
