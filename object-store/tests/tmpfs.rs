//! The arena and the spill directory on small tmpfs mounts: a full /dev/shm and a full spill
//! disk give clean errors (`ObjectStoreFull`, `OutOfDisk`), never SIGBUS, never a corrupt or
//! partial spill file. Needs root to mount (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use object_store::store::NODE_CLIENT;
use object_store::{Store, StoreConfig, StoreError};
use protocol::ObjectId;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tmpfs needs root (CI runs as root): mount exited with {st}"
        );
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn oid(n: u64) -> ObjectId {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&n.to_le_bytes());
    ObjectId::from_bytes(b)
}

#[test]
fn a_full_shm_and_a_full_spill_disk_give_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let shm = Tmpfs::mount(&dir.path().join("shm"), "16m");
    let spill = Tmpfs::mount(&dir.path().join("spill"), "8m");
    // The store believes it may use 64 MiB; the tmpfs holds 16.
    let s = Store::open(&StoreConfig {
        capacity: 64 << 20,
        plasma_dir: shm.0.clone(),
        spill_dir: spill.0.clone(),
        chunk: 1 << 20,
    })
    .unwrap();
    let obj = |i: u64| vec![(i % 251) as u8; 1 << 20];
    let mut stored = Vec::new();
    let mut errors = Vec::new();
    for i in 0..64 {
        match s.put(oid(i), &obj(i), b"", true) {
            Ok(()) => stored.push(i),
            Err(e) => errors.push(e),
        }
    }
    // About 15 MiB fit in shared memory and about 7 MiB on the spill disk; the rest failed
    // cleanly. This process is still alive: no SIGBUS.
    assert!(stored.len() >= 16, "only {} objects stored", stored.len());
    assert!(!errors.is_empty());
    for e in &errors {
        assert!(
            matches!(e, StoreError::OutOfDisk { .. } | StoreError::ShmFull { .. }),
            "unexpected error {e}"
        );
    }
    let out_of_disk = errors
        .iter()
        .find(|e| matches!(e, StoreError::OutOfDisk { .. }))
        .expect("the spill disk filled up");
    assert!(
        out_of_disk.to_string().contains("OutOfDisk") && out_of_disk.to_string().contains("spill"),
        "{out_of_disk}"
    );
    let st = s.stats();
    assert!(
        st.reserved <= 16 << 20 && st.reserved >= 8 << 20,
        "reserved {} bytes on a 16 MiB tmpfs",
        st.reserved
    );
    // No partial spill file is left behind.
    for f in std::fs::read_dir(&spill.0).unwrap() {
        let name = f.unwrap().file_name();
        assert!(
            !name.to_string_lossy().ends_with(".tmp"),
            "partial spill file {name:?}"
        );
    }
    // Whatever was stored reads back intact, or fails with a clean error when restoring it
    // would need room that neither memory nor disk has.
    let mut read_back = 0;
    for &i in &stored {
        match s.get(
            NODE_CLIENT,
            &[oid(i)],
            Some(std::time::Duration::ZERO),
            &|| false,
        ) {
            Ok(got) => {
                let b = got[0].expect("a stored object is visible");
                assert_eq!(
                    s.arena().slice(b.offset, b.total()),
                    &obj(i)[..],
                    "object {i}"
                );
                s.release(NODE_CLIENT, oid(i)).unwrap();
                read_back += 1;
            }
            Err(e) => assert!(
                matches!(e, StoreError::OutOfDisk { .. } | StoreError::ShmFull { .. }),
                "object {i}: {e}"
            ),
        }
    }
    assert!(
        read_back >= stored.len() / 2,
        "read back {read_back} of {}",
        stored.len()
    );
    // Freeing space makes the store usable again.
    s.delete(&stored.iter().map(|&i| oid(i)).collect::<Vec<_>>());
    s.put(oid(1000), &obj(1), b"", true).unwrap();
    drop(s);
}
