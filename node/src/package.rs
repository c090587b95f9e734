//! `working_dir` packages on the node: fetched from the replicated KV (`protocol::package`),
//! checked against their manifest's SHA-256, and unpacked into the job's directory.
//!
//! Invariant: nothing is written outside the destination. Entries with `..`, absolute paths,
//! symlinks whose target leaves the destination, and archives that expand beyond the limits
//! (a zip bomb) are refused with an error naming the entry; the bytes actually inflated are
//! counted, the sizes the archive claims are not trusted.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use protocol::client::HeadClient;
use protocol::package::{self, Manifest};
use protocol::pb;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_total: u64,
    pub(crate) max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_total: 1024 * 1024 * 1024, max_entries: 100_000 }
    }
}

async fn kv_get(c: &HeadClient, key: Vec<u8>) -> Result<Vec<u8>, String> {
    let req = pb::KvGetRequest { namespace: package::KV_NAMESPACE.into(), key };
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
    let manifest = kv_get(c, package::manifest_key(name)).await.map_err(|e| format!("package {name} is not in the cluster: {e}"))?;
    let m: Manifest = serde_json::from_slice(&manifest).map_err(|e| format!("package {name} has a bad manifest: {e}"))?;
    if m.size > package::DEFAULT_MAX_BYTES || m.chunks > m.size.div_ceil(package::CHUNK as u64).max(1) {
        return Err(format!("package {name} manifest is out of bounds: {m:?}"));
    }
    let mut bytes = Vec::with_capacity(m.size as usize);
    for i in 0..m.chunks {
        bytes.extend(kv_get(c, package::chunk_key(name, i)).await.map_err(|e| format!("package {name} chunk {i}: {e}"))?);
    }
    let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    if bytes.len() as u64 != m.size || sha != m.sha256 {
        return Err(format!("package {name} is corrupt: {} bytes with sha256 {sha}, manifest says {} and {}", bytes.len(), m.size, m.sha256));
    }
    Ok(bytes)
}

/// `path` made of normal components only (no root, no `..`).
fn relative_inside(path: &Path) -> bool {
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Resolves `target` lexically against `link_dir` (both relative to the destination);
/// `None` if it climbs out.
fn resolve_inside(link_dir: &Path, target: &Path) -> Option<PathBuf> {
    if target.is_absolute() {
        return None;
    }
    let mut out: Vec<&std::ffi::OsStr> = link_dir.components().filter_map(|c| match c {
        Component::Normal(s) => Some(s),
        _ => None,
    }).collect();
    for c in target.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            _ => return None,
        }
    }
    Some(out.iter().collect())
}

/// Unpacks `zip_bytes` into `dest` (created if missing) within `limits`.
pub(crate) fn unpack(zip_bytes: &[u8], dest: &Path, limits: Limits) -> Result<(), String> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes)).map_err(|e| format!("not a zip archive: {e}"))?;
    if z.len() > limits.max_entries {
        return Err(format!("archive has {} entries, over the limit of {}", z.len(), limits.max_entries));
    }
    std::fs::create_dir_all(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let root = dest.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", dest.display()))?;
    let mut total = 0u64;
    for i in 0..z.len() {
        let mut f = z.by_index(i).map_err(|e| format!("entry {i}: {e}"))?;
        let raw = f.name().map_err(|e| format!("entry {i} has a bad name: {e}"))?.into_owned();
        let rel = PathBuf::from(&raw);
        if !relative_inside(&rel) || raw.contains('\\') {
            return Err(format!("entry {raw:?} points outside the working dir (absolute or ..)"));
        }
        let out = root.join(&rel);
        // Parents must resolve inside the destination (a link may not redirect a write).
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("entry {raw:?}: {e}"))?;
            let real = parent.canonicalize().map_err(|e| format!("entry {raw:?}: {e}"))?;
            if !real.starts_with(&root) {
                return Err(format!("entry {raw:?} would be written outside the working dir through a link"));
            }
        }
        if f.is_dir() {
            std::fs::create_dir_all(&out).map_err(|e| format!("entry {raw:?}: {e}"))?;
            continue;
        }
        if f.is_symlink() {
            let mut target = String::new();
            f.by_ref().take(4096).read_to_string(&mut target).map_err(|e| format!("link {raw:?}: {e}"))?;
            let link_dir = rel.parent().unwrap_or(Path::new(""));
            if resolve_inside(link_dir, Path::new(&target)).is_none() {
                return Err(format!("link {raw:?} -> {target:?} points outside the working dir"));
            }
            std::os::unix::fs::symlink(&target, &out).map_err(|e| format!("link {raw:?}: {e}"))?;
            continue;
        }
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&out)
            .map_err(|e| format!("entry {raw:?}: {e}"))?;
        // Count what inflates, not what the header claims.
        let room = limits.max_total - total;
        let n = std::io::copy(&mut f.by_ref().take(room + 1), &mut w).map_err(|e| format!("entry {raw:?}: {e}"))?;
        total += n;
        if total > limits.max_total {
            drop(w);
            let _ = std::fs::remove_dir_all(dest);
            return Err(format!("archive expands beyond {} bytes (a zip bomb?); refused at entry {raw:?}", limits.max_total));
        }
        if let Some(mode) = f.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode & 0o755));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn archive(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let o = zip::write::SimpleFileOptions::default();
        for (n, d) in entries {
            z.start_file(*n, o).unwrap();
            z.write_all(d).unwrap();
        }
        for (n, t) in links {
            z.add_symlink(*n, *t, o).unwrap();
        }
        z.finish().unwrap().into_inner()
    }

    #[test]
    fn unpacks_a_good_archive() {
        let d = tempfile::tempdir().unwrap();
        let a = archive(&[("a.txt", b"A"), ("sub/b.txt", b"B")], &[("sub/link", "../a.txt")]);
        unpack(&a, &d.path().join("out"), Limits::default()).unwrap();
        assert_eq!(std::fs::read(d.path().join("out/sub/b.txt")).unwrap(), b"B");
        assert_eq!(std::fs::read(d.path().join("out/sub/link")).unwrap(), b"A");
    }

    #[test]
    fn refuses_traversal_absolute_paths_outward_links_and_bombs() {
        let d = tempfile::tempdir().unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (archive(&[("../evil", b"x")], &[]), "outside"),
            (archive(&[("/etc/evil", b"x")], &[]), "outside"),
            (archive(&[], &[("l", "../../etc/passwd")]), "points outside"),
            (archive(&[], &[("l", "/etc/passwd")]), "points outside"),
            (archive(&[("big", &vec![0u8; 4 << 20])], &[]), "zip bomb"),
        ];
        for (i, (a, want)) in cases.into_iter().enumerate() {
            let dest = d.path().join(format!("case{i}"));
            let e = unpack(&a, &dest, Limits { max_total: 1 << 20, max_entries: 10 }).unwrap_err();
            assert!(e.contains(want), "case {i}: {e}");
        }
        // A link to a directory outside, then a write through it.
        let a = archive(&[("d/x", b"x")], &[("d", "..")]);
        assert!(unpack(&a, &d.path().join("linked"), Limits::default()).is_err());
        assert!(!d.path().join("x").exists(), "nothing was written outside");
        assert!(!d.path().join("evil").exists());
        assert!(unpack(b"not a zip", &d.path().join("junk"), Limits::default()).unwrap_err().contains("not a zip"));
    }
}
