//! A small tmpfs standing in for a disk that fills up: mounted on a directory for the
//! guard's lifetime (lazily unmounted on drop, also on panic), filled to ENOSPC with a filler
//! file, and freed again. Used by the disk-full test and the chaos runner.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// A tmpfs mounted on a directory for the guard's lifetime.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("a full disk is a small tmpfs (mount -t tmpfs), which needs root");
        }
        std::fs::create_dir_all(dir)?;
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "rayctl-disk-full",
            ])
            .arg(dir)
            .status()
            .context("run mount")?;
        ensure!(
            st.success(),
            "mount -t tmpfs on {} failed: {st}",
            dir.display()
        );
        Ok(Self { dir: dir.into() })
    }

    /// Fills the filesystem with `filler` until the kernel says ENOSPC.
    pub fn fill(&self) -> Result<()> {
        let mut f = std::fs::File::create(self.dir.join("filler"))?;
        for chunk in [64 * 1024, 4096, 512, 1] {
            let buf = vec![0u8; chunk];
            loop {
                match f.write_all(&buf) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
                    Err(e) => return Err(e).context("fill the tmpfs"),
                }
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn free(&self) -> Result<()> {
        std::fs::remove_file(self.dir.join("filler")).context("remove the filler")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the head may still hold files open; the tmpfs goes when it lets go.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}
