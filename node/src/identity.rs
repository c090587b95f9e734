//! A node's identity: a random `NodeId` kept in `<data_dir>/node_id`, so a restarted daemon
//! comes back as the same node (with a new incarnation), and an exclusive lock on
//! `<data_dir>/node.lock` so two daemons never share one identity.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use protocol::NodeId;

/// Held for the daemon's lifetime; dropping it releases the lock.
pub struct IdentityLock(#[allow(dead_code)] Flock<File>);

pub fn acquire(data_dir: &Path) -> anyhow::Result<(IdentityLock, NodeId)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let lock_path = data_dir.join("node.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, e)) => bail!(
            "data dir {} is in use by another node daemon ({e}); give each node its own --data-dir",
            data_dir.display()
        ),
    };
    let id_path = data_dir.join("node_id");
    let node_id = match std::fs::read_to_string(&id_path) {
        Ok(s) => s
            .trim()
            .parse::<NodeId>()
            .with_context(|| format!("corrupt node id file {}", id_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 16];
            File::open("/dev/urandom")
                .and_then(|mut r| r.read_exact(&mut b))
                .context("cannot read /dev/urandom")?;
            let id = NodeId::from_bytes(b);
            let tmp = data_dir.join("node_id.tmp");
            std::fs::write(&tmp, id.to_string())
                .and_then(|_| std::fs::rename(&tmp, &id_path))
                .with_context(|| format!("cannot write {}", id_path.display()))?;
            id
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", id_path.display())),
    };
    Ok((IdentityLock(lock), node_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_and_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let (lock, id) = acquire(dir.path()).unwrap();
        let err = acquire(dir.path())
            .err()
            .expect("second daemon must be refused");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(lock);
        let (_lock, again) = acquire(dir.path()).unwrap();
        assert_eq!(id, again);
        std::fs::write(dir.path().join("node_id"), "garbage").unwrap();
        drop(_lock);
        assert!(acquire(dir.path()).is_err());
    }
}
