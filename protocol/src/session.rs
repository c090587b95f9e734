//! The per-user session root: where `rayctl start` keeps its sessions, the `cluster.json`
//! that tells clients where the cluster is, and the daemon records `rayctl stop` reads. The
//! SDK finds the cluster through it too, so the rule lives here, once.
//!
//! The root is `$RAYCTL_TMPDIR`, else `$XDG_RUNTIME_DIR/rayctl`, else `/tmp/rayctl-<uid>`.
//!
//! Invariant: a root is used only if it is a directory owned by this user that no one else
//! can write (created 0700 when missing). A predictable path in a world-writable `/tmp` could
//! otherwise be made first by another user, who would then steer our clients (and the token
//! they send) to a cluster of theirs, or choose the PIDs `rayctl stop` kills.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

pub const TMPDIR_ENV: &str = "RAYCTL_TMPDIR";

#[derive(Debug, thiserror::Error)]
pub enum SessionDirError {
    #[error("cannot create the session directory {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "refusing the session directory {path}: it is owned by uid {owner}, not by you (uid {uid}); another user may have made it to steer your clients. Remove it, or set RAYCTL_TMPDIR to a directory of your own"
    )]
    NotOwned { path: String, owner: u32, uid: u32 },
    #[error(
        "refusing the session directory {path}: others can write to it (mode {mode:o}); chmod 700 it, or set RAYCTL_TMPDIR to a directory of your own"
    )]
    Writable { path: String, mode: u32 },
    #[error("refusing the session directory {path}: it is not a directory")]
    NotADir { path: String },
}

/// The root's path, without creating or checking it.
pub fn root_path() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var(TMPDIR_ENV) {
        return PathBuf::from(d);
    }
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("rayctl");
    }
    PathBuf::from(format!("/tmp/rayctl-{}", nix::unistd::geteuid().as_raw()))
}

/// The root, created 0700 if missing, after checking it is this user's alone.
pub fn root() -> Result<PathBuf, SessionDirError> {
    let p = root_path();
    ensure_private_dir(&p)?;
    Ok(p)
}

/// Creates `dir` (0700, parents as needed) if missing; refuses it unless it (and what a link
/// there points at) is a directory owned by this user and not writable by group or others.
pub fn ensure_private_dir(dir: &Path) -> Result<(), SessionDirError> {
    let path = dir.display().to_string();
    if let Err(source) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(SessionDirError::Create { path, source });
    }
    let uid = nix::unistd::geteuid().as_raw();
    let link = std::fs::symlink_metadata(dir).map_err(|source| SessionDirError::Create {
        path: path.clone(),
        source,
    })?;
    let meta = std::fs::metadata(dir).map_err(|source| SessionDirError::Create {
        path: path.clone(),
        source,
    })?;
    for m in [&link, &meta] {
        if m.uid() != uid {
            return Err(SessionDirError::NotOwned {
                path,
                owner: m.uid(),
                uid,
            });
        }
    }
    if !meta.is_dir() {
        return Err(SessionDirError::NotADir { path });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(SessionDirError::Writable { path, mode });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_root_is_private_and_a_shared_one_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a").join("rayctl");
        ensure_private_dir(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        ensure_private_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&d).unwrap_err().to_string();
        assert!(e.contains("others can write"), "{e}");
        let f = t.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = ensure_private_dir(&f).unwrap_err().to_string();
        assert!(
            e.contains("cannot create") || e.contains("not a directory"),
            "{e}"
        );
    }
}
