//! `working_dir` packages on the node: fetched from the replicated KV (`protocol::package`),
//! checked against their manifest's SHA-256; `protocol::package::unpack` extracts them.

use protocol::client::HeadClient;
use protocol::package::{self, Manifest};
use protocol::pb;
use sha2::{Digest, Sha256};

async fn kv_get(c: &HeadClient, key: Vec<u8>) -> Result<Vec<u8>, String> {
    let req = pb::KvGetRequest {
        namespace: package::KV_NAMESPACE.into(),
        key,
    };
    c.call(|mut c| {
        let r = req.clone();
        async move { c.kv_get(r).await }
    })
    .await
    .map(|r| r.value)
    .map_err(|e| e.to_string())
}

/// Fetches a package by URI and checks it against its manifest.
pub(crate) async fn fetch(c: &HeadClient, uri: &str) -> Result<Vec<u8>, String> {
    let name = package::name_from_uri(uri)?;
    let manifest = kv_get(c, package::manifest_key(name))
        .await
        .map_err(|e| format!("package {name} is not in the cluster: {e}"))?;
    let m: Manifest = serde_json::from_slice(&manifest)
        .map_err(|e| format!("package {name} has a bad manifest: {e}"))?;
    if m.size > package::DEFAULT_MAX_BYTES
        || m.chunks > m.size.div_ceil(package::CHUNK as u64).max(1)
    {
        return Err(format!("package {name} manifest is out of bounds: {m:?}"));
    }
    let mut bytes = Vec::with_capacity(m.size as usize);
    for i in 0..m.chunks {
        bytes.extend(
            kv_get(c, package::chunk_key(name, i))
                .await
                .map_err(|e| format!("package {name} chunk {i}: {e}"))?,
        );
    }
    let sha = protocol::hex::encode(Sha256::digest(&bytes));
    if bytes.len() as u64 != m.size || sha != m.sha256 {
        return Err(format!(
            "package {name} is corrupt: {} bytes with sha256 {sha}, manifest says {} and {}",
            bytes.len(),
            m.size,
            m.sha256
        ));
    }
    Ok(bytes)
}
