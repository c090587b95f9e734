//! `--working-dir`: packs a directory into a zip (leaving out `.git` and what `.gitignore`
//! files exclude), names it by the SHA-256 of its bytes, and uploads it once into the
//! cluster's replicated KV (see `protocol::package`), with a progress bar.
//!
//! The archive is deterministic (sorted entries, fixed timestamps), so the same tree gives the
//! same name and is not uploaded again.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use protocol::client::HeadClient;
use protocol::package::{self, Manifest};
use protocol::pb;
use sha2::{Digest, Sha256};

/// Packs `dir` into a zip in memory; fails when the files exceed `max_bytes`.
pub(crate) fn pack(dir: &Path, max_bytes: u64) -> anyhow::Result<Vec<u8>> {
    let meta =
        std::fs::metadata(dir).with_context(|| format!("--working-dir {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("--working-dir {} is not a directory", dir.display());
    }
    let walker = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .require_git(false)
        .follow_links(false)
        .filter_entry(|e| e.file_name() != ".git")
        .sort_by_file_path(|a, b| a.cmp(b))
        .build();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut total = 0u64;
    for entry in walker {
        let entry = entry.with_context(|| format!("cannot walk {}", dir.display()))?;
        let path = entry.path();
        let rel = path
            .strip_prefix(dir)
            .context("walked outside the working dir")?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let name = rel
            .to_str()
            .with_context(|| format!("{} is not valid UTF-8", rel.display()))?
            .replace('\\', "/");
        let ft = entry.file_type().context("unknown file type")?;
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .last_modified_time(zip::DateTime::default());
        if ft.is_dir() {
            zip.add_directory(format!("{name}/"), opts)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path)?;
            zip.add_symlink(name, target.to_string_lossy(), opts)?;
        } else if ft.is_file() {
            let md = std::fs::metadata(path)?;
            total += md.len();
            if total > max_bytes {
                bail!(
                    "--working-dir {} holds more than the limit of {max_bytes} bytes (after .gitignore)",
                    dir.display()
                );
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = md.permissions().mode() & 0o777;
            zip.start_file(name, opts.unix_permissions(mode))?;
            let mut f = std::fs::File::open(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            std::io::copy(&mut f, &mut zip)?;
        }
    }
    let bytes = zip.finish()?.into_inner();
    if bytes.len() as u64 > max_bytes {
        bail!(
            "the working_dir package is {} bytes, over the limit of {max_bytes}",
            bytes.len()
        );
    }
    Ok(bytes)
}

/// Packs and uploads `dir` unless the cluster already has it; returns its URI.
pub(crate) async fn upload(c: &HeadClient, dir: &Path) -> anyhow::Result<String> {
    let bytes = pack(dir, package::DEFAULT_MAX_BYTES)?;
    let sha = protocol::hex::encode(Sha256::digest(&bytes));
    let name = format!("_ray_pkg_{}.zip", &sha[..32]);
    let kv_get = pb::KvGetRequest {
        namespace: package::KV_NAMESPACE.into(),
        key: package::manifest_key(&name),
    };
    let have = c
        .call(|mut c| {
            let r = kv_get.clone();
            async move { c.kv_get(r).await }
        })
        .await;
    if have.is_ok() {
        eprintln!(
            "working_dir {} is already in the cluster as {name}",
            dir.display()
        );
        return Ok(package::uri(&name));
    }
    let chunks: Vec<&[u8]> = bytes.chunks(package::CHUNK).collect();
    let bar = indicatif::ProgressBar::new(bytes.len() as u64)
        .with_message(format!("uploading {}", dir.display()));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for (i, chunk) in chunks.iter().enumerate() {
        put(c, package::chunk_key(&name, i as u64), chunk.to_vec()).await?;
        bar.inc(chunk.len() as u64);
    }
    let manifest = Manifest {
        size: bytes.len() as u64,
        chunks: chunks.len() as u64,
        sha256: sha,
    };
    put(
        c,
        package::manifest_key(&name),
        serde_json::to_vec(&manifest)?,
    )
    .await?;
    bar.finish_and_clear();
    let _ = std::io::stderr().flush();
    eprintln!(
        "uploaded working_dir {} ({} bytes) as {name}",
        dir.display(),
        bytes.len()
    );
    Ok(package::uri(&name))
}

async fn put(c: &HeadClient, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
    let req = pb::KvPutRequest {
        namespace: package::KV_NAMESPACE.into(),
        key,
        value,
        overwrite: true,
    };
    c.call(|mut c| {
        let r = req.clone();
        async move { c.kv_put(r).await }
    })
    .await
    .context("cannot upload the working_dir package")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_deterministically_and_honours_gitignore() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".gitignore"), "*.log\nbuild/\n").unwrap();
        std::fs::write(d.path().join("main.sh"), "echo hi").unwrap();
        std::fs::write(d.path().join("debug.log"), "noise").unwrap();
        std::fs::create_dir_all(d.path().join("build")).unwrap();
        std::fs::write(d.path().join("build/out"), "x").unwrap();
        std::fs::create_dir_all(d.path().join(".git")).unwrap();
        std::fs::write(d.path().join(".git/HEAD"), "ref").unwrap();
        let a = pack(d.path(), 1 << 20).unwrap();
        let b = pack(d.path(), 1 << 20).unwrap();
        assert_eq!(a, b, "same tree, same bytes");
        let z = zip::ZipArchive::new(std::io::Cursor::new(a)).unwrap();
        let mut names: Vec<String> = z.file_names().map(|n| n.unwrap().into_owned()).collect();
        names.sort();
        assert_eq!(names, vec![".gitignore", "main.sh"]);
        let e = pack(d.path(), 4).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }
}
