//! This node's log files, for `rayctl logs` and the heads' `/api/v0/logs`: the files of its
//! session's logs directory, listed by glob and read by offset or from the last lines.
//!
//! Invariant: only plain file names inside the logs directory are read (no `/`, no `..`, no
//! links out), so a caller with the cluster token can read logs and nothing else.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use protocol::pb;
use tonic::Status;

/// The most a read returns, and the default.
pub(crate) const MAX_READ: u64 = 4 << 20;
/// How far back a tail looks for its lines.
const MAX_TAIL_BYTES: u64 = 64 << 20;

pub(crate) fn list(dir: &Path, glob: &str) -> Result<Vec<pb::LogFile>, Status> {
    let matcher = if glob.is_empty() {
        None
    } else {
        Some(
            globset::Glob::new(glob)
                .map_err(|e| Status::invalid_argument(format!("glob {glob:?}: {e}")))?
                .compile_matcher(),
        )
    };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut files: Vec<pb::LogFile> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let meta = e.metadata().ok().filter(std::fs::Metadata::is_file)?;
            if matcher.as_ref().is_some_and(|m| !m.is_match(&name)) {
                return None;
            }
            let modified_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            Some(pb::LogFile {
                name,
                size: meta.len(),
                modified_ms,
            })
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

fn path(dir: &Path, name: &str) -> Result<PathBuf, Status> {
    if name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name.contains('\0')
        || name == "."
        || name == ".."
    {
        return Err(Status::invalid_argument(format!(
            "{name:?} is not a log file name (list them with ListLogs)"
        )));
    }
    let p = dir.join(name);
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_file() => Ok(p),
        Ok(_) => Err(Status::invalid_argument(format!(
            "{name} is not a plain file"
        ))),
        Err(_) => Err(Status::not_found(format!(
            "no log file {name} on this node"
        ))),
    }
}

pub(crate) fn read(dir: &Path, r: &pb::ReadLogRequest) -> Result<pb::ReadLogReply, Status> {
    let p = path(dir, &r.filename)?;
    let mut f = std::fs::File::open(&p)
        .map_err(|e| Status::unavailable(format!("cannot open {}: {e}", r.filename)))?;
    let size = f
        .metadata()
        .map_err(|e| Status::unavailable(e.to_string()))?
        .len();
    let start = if r.tail_lines > 0 {
        tail_start(&mut f, size, r.tail_lines)?
    } else {
        r.offset.min(size)
    };
    let max = if r.max_bytes == 0 {
        MAX_READ
    } else {
        r.max_bytes.min(MAX_READ)
    };
    let len = (size - start).min(max);
    let mut data = vec![0; len as usize];
    f.seek(SeekFrom::Start(start))
        .and_then(|_| f.read_exact(&mut data))
        .map_err(|e| Status::unavailable(format!("cannot read {}: {e}", r.filename)))?;
    Ok(pb::ReadLogReply {
        data,
        next_offset: start + len,
        size,
    })
}

/// Where the last `lines` lines of the file begin (a last line without its newline counts).
fn tail_start(f: &mut std::fs::File, size: u64, lines: u32) -> Result<u64, Status> {
    const CHUNK: u64 = 64 << 10;
    let mut end = size;
    let mut found = 0u32;
    let mut buf = vec![0u8; CHUNK as usize];
    let floor = size.saturating_sub(MAX_TAIL_BYTES);
    let mut skip_last = true;
    while end > floor {
        let start = end.saturating_sub(CHUNK).max(floor);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut buf[..n]))
            .map_err(|e| Status::unavailable(e.to_string()))?;
        for i in (0..n).rev() {
            if buf[i] != b'\n' {
                continue;
            }
            // The file's final newline ends the last line rather than starting one.
            if skip_last && start + i as u64 + 1 == size {
                skip_last = false;
                continue;
            }
            skip_last = false;
            found += 1;
            if found == lines {
                return Ok(start + i as u64 + 1);
            }
        }
        skip_last = false;
        end = start;
    }
    Ok(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_text(dir: &Path, name: &str, offset: u64, tail: u32) -> Result<String, Status> {
        let r = read(
            dir,
            &pb::ReadLogRequest {
                filename: name.into(),
                offset,
                max_bytes: 0,
                tail_lines: tail,
            },
        )?;
        Ok(String::from_utf8(r.data).unwrap())
    }

    #[test]
    fn logs_list_by_glob_and_read_by_offset_or_tail() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("worker-a.log"), "one\ntwo\nthree\n").unwrap();
        std::fs::write(d.path().join("worker-b.log"), "x").unwrap();
        std::fs::write(d.path().join("node.log"), "n\n").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let names = |g: &str| -> Vec<String> {
            list(d.path(), g)
                .unwrap()
                .into_iter()
                .map(|f| f.name)
                .collect()
        };
        assert_eq!(names("worker-*"), ["worker-a.log", "worker-b.log"]);
        assert_eq!(names(""), ["node.log", "worker-a.log", "worker-b.log"]);
        assert!(list(d.path(), "[").is_err(), "a bad glob is an error");
        assert_eq!(
            read_text(d.path(), "worker-a.log", 4, 0).unwrap(),
            "two\nthree\n"
        );
        assert_eq!(read_text(d.path(), "worker-a.log", 99, 0).unwrap(), "");
        assert_eq!(
            read_text(d.path(), "worker-a.log", 0, 2).unwrap(),
            "two\nthree\n"
        );
        assert_eq!(
            read_text(d.path(), "worker-a.log", 0, 9).unwrap(),
            "one\ntwo\nthree\n"
        );
        assert_eq!(read_text(d.path(), "worker-b.log", 0, 1).unwrap(), "x");
        for bad in ["../etc/passwd", "sub", "", "..", "nope.log"] {
            assert!(read_text(d.path(), bad, 0, 0).is_err(), "{bad}");
        }
        // A link out of the directory is not followed.
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("out.log")).unwrap();
        assert!(read_text(d.path(), "out.log", 0, 0).is_err());
    }
}
