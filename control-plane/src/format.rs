//! The on-disk format of a head's Raft store, and the version checks that guard it. postcard
//! is not self-describing: bytes written by another build could fail to decode, or decode
//! into the wrong command. So every versioned thing is read version first and refused, with
//! the version named, when this build does not know it:
//!
//! - the data dir: a 4-byte big-endian `u32` under the meta key [`FORMAT_KEY`], read before
//!   anything else when the store opens (`SledRaftDb::open`). Format 1 is the layout before
//!   the stamp existed (an unstamped db with data); it is migrated to format 2 on open, in
//!   one atomic step (see `SledRaftDb::open`). Formats 1 and 2 keep the Raft log in sled;
//!   format 3 keeps it in a write-ahead log in the store's `wal/` directory, and
//!   `LogStore::open` moves a format-2 log there (then stamps 3).
//! - a log entry: a postcard `u32` (varint) [`ENTRY_VERSION`], then the postcard `Entry`.
//!   Format 1's entries are the same bytes without the version (migration prepends it).
//! - a snapshot: a postcard `u32` version first (see `sm_store`), as it always was; the
//!   check now happens before the rest is decoded.
//!
//! Invariant: a version this build cannot read is an error, never a silent reset or a
//! best-effort decode. Bump a version when an older build could misread the new bytes:
//! adding a `Command` variant or field bumps [`ENTRY_VERSION`] (and the snapshot's version if
//! `ClusterState` changes); a new key layout or meta encoding bumps [`DB_FORMAT`].

use std::ops::RangeInclusive;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The meta key holding the data dir's format.
pub const FORMAT_KEY: &str = "format";
/// The format this build writes.
pub const DB_FORMAT: u32 = 3;
/// The formats this build opens: 1 (unstamped) and 2 are migrated on open.
pub const DB_FORMATS_READ: RangeInclusive<u32> = 1..=DB_FORMAT;
/// The version of a log entry's encoding this build writes.
pub const ENTRY_VERSION: u32 = 1;
pub const ENTRY_VERSIONS_READ: RangeInclusive<u32> = 1..=ENTRY_VERSION;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Written by a build whose format this one does not know (usually a newer one).
    #[error(
        "this {what} was written by format version {found}; this build reads versions {min}..={max}"
    )]
    Unsupported {
        what: &'static str,
        found: u32,
        min: u32,
        max: u32,
    },
    /// The version itself is unreadable.
    #[error("this {what}'s format version is unreadable: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("this {what} (format version {version}) does not decode: {reason}")]
    Decode {
        what: &'static str,
        version: u32,
        reason: String,
    },
}

impl FormatError {
    fn unsupported(what: &'static str, found: u32, read: &RangeInclusive<u32>) -> Self {
        Self::Unsupported {
            what,
            found,
            min: *read.start(),
            max: *read.end(),
        }
    }
}

/// The data dir's stamp as stored.
pub fn encode_db_format(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// The data dir's format from its stamp; an unknown one is an error.
pub fn decode_db_format(stamp: &[u8]) -> Result<u32, FormatError> {
    let what = "data dir";
    let v = u32::from_be_bytes(stamp.try_into().map_err(|_| FormatError::Corrupt {
        what,
        reason: format!("the stamp is {} bytes, expected 4", stamp.len()),
    })?);
    if !DB_FORMATS_READ.contains(&v) {
        return Err(FormatError::unsupported(what, v, &DB_FORMATS_READ));
    }
    Ok(v)
}

/// Splits the leading version (a postcard varint `u32`) off `bytes`, refusing one outside
/// `read`. Nothing after the version is looked at.
pub fn split_version<'a>(
    what: &'static str,
    bytes: &'a [u8],
    read: &RangeInclusive<u32>,
) -> Result<(u32, &'a [u8]), FormatError> {
    let (v, rest): (u32, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| FormatError::Corrupt {
            what,
            reason: e.to_string(),
        })?;
    if !read.contains(&v) {
        return Err(FormatError::unsupported(what, v, read));
    }
    Ok((v, rest))
}

/// `version` as the postcard varint every versioned record starts with.
pub fn version_prefix(version: u32) -> Vec<u8> {
    postcard::to_allocvec(&version).expect("a u32 always encodes")
}

/// A log entry's bytes: [`ENTRY_VERSION`], then the entry.
pub fn encode_entry<T: Serialize>(entry: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(entry, version_prefix(ENTRY_VERSION))
}

/// A log entry from its bytes, version checked first.
pub fn decode_entry<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let what = "log entry";
    let (version, rest) = split_version(what, bytes, &ENTRY_VERSIONS_READ)?;
    postcard::from_bytes(rest).map_err(|e| FormatError::Decode {
        what,
        version,
        reason: e.to_string(),
    })
}

/// A format-1 log entry's bytes as format 2 stores them: the entry encoding did not change,
/// so the version is all it lacks.
pub fn migrate_entry_from_format1(v1: &[u8]) -> Vec<u8> {
    let mut out = version_prefix(1);
    out.extend_from_slice(v1);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_checked_before_the_rest() {
        // Version 7 followed by nothing decodable: the version is what the error names.
        let e = decode_entry::<u64>(&[7, 0xff, 0xff]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this log entry was written by format version 7; this build reads versions 1..=1"
        );
        let e = decode_db_format(&encode_db_format(4)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this data dir was written by format version 4; this build reads versions 1..=3"
        );
        assert!(matches!(
            decode_db_format(&[0, 2]),
            Err(FormatError::Corrupt { .. })
        ));
    }

    #[test]
    fn entries_round_trip_and_migrate() {
        let v = (5u64, "x".to_string());
        let b = encode_entry(&v).unwrap();
        assert_eq!(b[0], ENTRY_VERSION as u8);
        assert_eq!(decode_entry::<(u64, String)>(&b).unwrap(), v);
        let v1 = postcard::to_allocvec(&v).unwrap();
        assert_eq!(migrate_entry_from_format1(&v1), b);
    }
}
