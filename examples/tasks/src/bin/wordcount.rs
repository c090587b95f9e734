//! Word count, map-reduce style: every file under a directory is cut into pieces, a `count`
//! task counts the words of each piece, and `merge` tasks combine the counts pairwise into
//! one table (each merge takes two `ObjectRef`s, so the reduction is a tree of dependent
//! tasks). Run as a job, shipping the text with it:
//!
//! ```sh
//! rayctl job submit --working-dir examples/tasks/data -- "$PWD/target/release/wordcount" .
//! ```

use std::collections::BTreeMap;
use std::path::Path;

/// Texts are cut into pieces of about this many bytes (at whitespace).
const PIECE: usize = 16 * 1024;

#[sdk::remote]
fn count(text: String) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
    {
        *m.entry(w.to_lowercase()).or_insert(0) += 1;
    }
    m
}

#[sdk::remote]
fn merge(mut a: BTreeMap<String, u64>, b: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    for (k, v) in b {
        *a.entry(k).or_insert(0) += v;
    }
    a
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(PIECE);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        if end < rest.len() {
            end = rest[end..]
                .find(char::is_whitespace)
                .map_or(rest.len(), |i| end + i);
        }
        out.push(rest[..end].to_owned());
        rest = &rest[end..];
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _session = sdk::init()?;
    let dir = std::env::args().nth(1).unwrap_or_else(|| ".".into());
    let mut paths = Vec::new();
    files(Path::new(&dir), &mut paths).map_err(|e| format!("cannot read {dir}: {e}"))?;
    paths.sort();
    let mut level = Vec::new();
    let mut bytes = 0;
    for p in &paths {
        // Binary files are skipped, not counted as garbage words.
        let Ok(text) = std::fs::read_to_string(p) else {
            continue;
        };
        bytes += text.len();
        level.extend(pieces(&text).into_iter().map(count::remote));
    }
    if level.is_empty() {
        return Err(format!("no text files under {dir}").into());
    }
    let maps = level.len();
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        let mut it = level.into_iter();
        while let Some(a) = it.next() {
            next.push(match it.next() {
                Some(b) => merge::remote(a, b),
                None => a,
            });
        }
        level = next;
    }
    let counts = sdk::get(&level[0])?;
    let total: u64 = counts.values().sum();
    let mut top: Vec<(&String, &u64)> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!(
        "{} files, {bytes} bytes, {maps} map tasks: {total} words, {} distinct",
        paths.len(),
        counts.len()
    );
    for (w, n) in top.iter().take(10) {
        println!("{n:>8}  {w}");
    }
    Ok(())
}
