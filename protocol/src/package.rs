//! `working_dir` packages: zip archives stored content-addressed in the replicated KV (so
//! they survive the loss of a head), named and addressed as Ray names them
//! (`gcs://_ray_pkg_<hash>.zip`) so Ray's job clients can upload them too.
//!
//! Layout in the KV namespace [`KV_NAMESPACE`]: the archive in chunks of [`CHUNK`] bytes under
//! `<name>/chunk/<i>`, then `<name>/manifest` (JSON: size, chunks, sha256), written last, so a
//! package is visible only once complete.
//!
//! With the `package` feature, [`unpack`] extracts an archive. Invariant: nothing is written
//! outside the destination. Entries with `..`, absolute paths, symlinks whose target leaves the
//! destination, and archives that expand beyond the limits (a zip bomb) are refused with an
//! error naming the entry; the bytes actually inflated are counted, the sizes the archive
//! claims are not trusted.
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
    let hex = name
        .strip_prefix("_ray_pkg_")
        .and_then(|r| r.strip_suffix(".zip"));
    match hex {
        Some(h)
            if (16..=64).contains(&h.len())
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "package name {:?} is not of the form _ray_pkg_<16 to 64 hex chars>.zip",
            name.chars().take(100).collect::<String>()
        )),
    }
}

/// The package name inside a `gcs://` URI.
pub fn name_from_uri(uri: &str) -> Result<&str, String> {
    let name = uri.strip_prefix("gcs://").ok_or_else(|| {
        format!("working_dir {uri:?} is not a package URI (gcs://_ray_pkg_….zip)")
    })?;
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
        for bad in [
            "gcs://_ray_pkg_x.zip",
            "s3://_ray_pkg_0123456789abcdef.zip",
            "gcs://../../etc",
            "gcs://_ray_pkg_0123456789ABCDEF.zip",
        ] {
            assert!(super::name_from_uri(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(feature = "package")]
mod unpacking {
    use std::io::Read;
    use std::path::{Component, Path, PathBuf};

    #[derive(Debug, Clone, Copy)]
    pub struct Limits {
        pub max_total: u64,
        pub max_entries: usize,
    }

    impl Default for Limits {
        fn default() -> Self {
            Self {
                max_total: 1024 * 1024 * 1024,
                max_entries: 100_000,
            }
        }
    }

    /// `path` made of normal components only (no root, no `..`).
    fn relative_inside(path: &Path) -> bool {
        !path.as_os_str().is_empty()
            && path
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    }

    /// Resolves `target` lexically against `link_dir` (both relative to the destination);
    /// `None` if it climbs out.
    fn resolve_inside(link_dir: &Path, target: &Path) -> Option<PathBuf> {
        if target.is_absolute() {
            return None;
        }
        let mut out: Vec<&std::ffi::OsStr> = link_dir
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s),
                _ => None,
            })
            .collect();
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
    pub fn unpack(zip_bytes: &[u8], dest: &Path, limits: Limits) -> Result<(), String> {
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes))
            .map_err(|e| format!("not a zip archive: {e}"))?;
        if z.len() > limits.max_entries {
            return Err(format!(
                "archive has {} entries, over the limit of {}",
                z.len(),
                limits.max_entries
            ));
        }
        // Cheap first check of what the archive declares; the real count follows.
        let mut declared = 0u64;
        for i in 0..z.len() {
            declared = declared.saturating_add(
                z.by_index_raw(i)
                    .map_err(|e| format!("entry {i}: {e}"))?
                    .size(),
            );
        }
        if declared > limits.max_total {
            return Err(format!(
                "archive declares {declared} bytes, over the limit of {} (a zip bomb?)",
                limits.max_total
            ));
        }
        std::fs::create_dir_all(dest)
            .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
        let root = dest
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", dest.display()))?;
        let mut total = 0u64;
        for i in 0..z.len() {
            let mut f = z.by_index(i).map_err(|e| format!("entry {i}: {e}"))?;
            let raw = f
                .name()
                .map_err(|e| format!("entry {i} has a bad name: {e}"))?
                .into_owned();
            let rel = PathBuf::from(&raw);
            if !relative_inside(&rel) || raw.contains('\\') {
                return Err(format!(
                    "entry {raw:?} points outside the working dir (absolute or ..)"
                ));
            }
            let out = root.join(&rel);
            // Parents must resolve inside the destination (a link may not redirect a write).
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("entry {raw:?}: {e}"))?;
                let real = parent
                    .canonicalize()
                    .map_err(|e| format!("entry {raw:?}: {e}"))?;
                if !real.starts_with(&root) {
                    return Err(format!(
                        "entry {raw:?} would be written outside the working dir through a link"
                    ));
                }
            }
            if f.is_dir() {
                std::fs::create_dir_all(&out).map_err(|e| format!("entry {raw:?}: {e}"))?;
                continue;
            }
            if f.is_symlink() {
                let mut target = String::new();
                f.by_ref()
                    .take(4096)
                    .read_to_string(&mut target)
                    .map_err(|e| format!("link {raw:?}: {e}"))?;
                let link_dir = rel.parent().unwrap_or(Path::new(""));
                if resolve_inside(link_dir, Path::new(&target)).is_none() {
                    return Err(format!(
                        "link {raw:?} -> {target:?} points outside the working dir"
                    ));
                }
                std::os::unix::fs::symlink(&target, &out)
                    .map_err(|e| format!("link {raw:?}: {e}"))?;
                continue;
            }
            let mut w = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .map_err(|e| format!("entry {raw:?}: {e}"))?;
            // Count what inflates, not what the header claims.
            let room = limits.max_total - total;
            let n = std::io::copy(&mut f.by_ref().take(room + 1), &mut w)
                .map_err(|e| format!("entry {raw:?}: {e}"))?;
            total += n;
            if total > limits.max_total {
                drop(w);
                let _ = std::fs::remove_dir_all(dest);
                return Err(format!(
                    "archive expands beyond {} bytes (a zip bomb?); refused at entry {raw:?}",
                    limits.max_total
                ));
            }
            if let Some(mode) = f.unix_mode() {
                use std::os::unix::fs::PermissionsExt;
                let _ =
                    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode & 0o755));
            }
        }
        Ok(())
    }
}

#[cfg(feature = "package")]
pub use unpacking::{Limits, unpack};

#[cfg(all(test, feature = "package"))]
mod unpack_tests {
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
        let a = archive(
            &[("a.txt", b"A"), ("sub/b.txt", b"B")],
            &[("sub/link", "../a.txt")],
        );
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
            let e = unpack(
                &a,
                &dest,
                Limits {
                    max_total: 1 << 20,
                    max_entries: 10,
                },
            )
            .unwrap_err();
            assert!(e.contains(want), "case {i}: {e}");
        }
        // A link to a directory outside, then a write through it.
        let a = archive(&[("d/x", b"x")], &[("d", "..")]);
        assert!(unpack(&a, &d.path().join("linked"), Limits::default()).is_err());
        assert!(!d.path().join("x").exists(), "nothing was written outside");
        assert!(!d.path().join("evil").exists());
        assert!(
            unpack(b"not a zip", &d.path().join("junk"), Limits::default())
                .unwrap_err()
                .contains("not a zip")
        );
    }
}
