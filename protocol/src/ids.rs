//! Id newtypes. Node ids are 16 random bytes shown as 32 lowercase hex chars; a head's Raft
//! id is derived from its advertised address so every head computes the same ids from the
//! same `--peers` list without coordination.
//!
//! Invariant: a `NodeId` or an `ActorId` is always 32 lowercase hex chars, a `JobId`,
//! `WorkerId` or `LeaseId` 1 to 128 of `[A-Za-z0-9_-]`; parsing anything else fails, so a
//! value of these types never needs checking again.

use std::fmt;
use std::str::FromStr;

/// Error for an id that is not of the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: expected {expected}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// Identity of a node daemon, stable across its restarts (kept in its data dir).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId([u8; 16]);

impl NodeId {
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// Display as lowercase hex, Debug as `Name(hex)`.
macro_rules! hex_fmt {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut s = [0u8; 2 * std::mem::size_of::<$t>()];
                hex::encode_to_slice(self.0, &mut s).map_err(|_| fmt::Error)?;
                f.write_str(std::str::from_utf8(&s).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({})"), self)
            }
        }
    };
}

hex_fmt!(NodeId);
hex_fmt!(ObjectId);
hex_fmt!(ActorId);

/// Identity of an actor: 16 bytes (its creator's owner prefix and a counter) shown as 32
/// lowercase hex chars, as Ray's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorId([u8; 16]);

impl ActorId {
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl FromStr for ActorId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex(s).map(Self).ok_or_else(|| IdError {
            kind: "actor id",
            value: s.chars().take(80).collect(),
            expected: "32 lowercase hex characters",
        })
    }
}

impl serde::Serialize for ActorId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ActorId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Ids made of names: 1 to 128 of `[A-Za-z0-9_-]` (a job's submission id, `raysubmit_…`;
/// a worker's and a lease's, which their node makes). Shared, so clones on hot paths cost
/// no copy; serialized as the string.
macro_rules! name_id {
    ($(#[$doc:meta])* $t:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $t(std::sync::Arc<str>);

        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                check_name(s, $kind).map(|()| Self(s.into()))
            }
        }

        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                check_name(&s, $kind).map(|()| Self(s.into()))
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({})"), &self.0)
            }
        }

        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

name_id!(
    /// A job: its submission id (`raysubmit_…` or the submitter's own).
    JobId,
    "job id"
);
name_id!(
    /// A worker process, unique in the cluster (its node's id and a counter).
    WorkerId,
    "worker id"
);
name_id!(
    /// A lease of a worker to an owner, unique in the cluster (its node's id and a counter).
    LeaseId,
    "lease id"
);

fn check_name(s: &str, kind: &'static str) -> Result<(), IdError> {
    if s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err(IdError {
            kind,
            value: s.chars().take(140).collect(),
            expected: "1 to 128 characters of letters, digits, '_' and '-'",
        });
    }
    Ok(())
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = || IdError {
            kind: "node id",
            value: s.chars().take(80).collect(),
            expected: "32 lowercase hex characters",
        };
        parse_hex(s).map(Self).ok_or_else(err)
    }
}

/// Parses exactly `2 * N` lowercase hex characters.
fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = hex(chunk[0])? << 4 | hex(chunk[1])?;
    }
    Some(out)
}

/// Identity of an object: 20 bytes shown as 40 lowercase hex chars. Issue 5 gives it
/// structure (the creating task's id and a return index, or a put id); the object store only
/// needs it to be unique per object.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ObjectId([u8; 20]);

impl ObjectId {
    pub const LEN: usize = 20;
    pub const fn from_bytes(b: [u8; 20]) -> Self {
        Self(b)
    }
    pub const fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }
    /// The id of a task's return `i` (`num_returns` > 1, at most 63): return 0 is the
    /// task's own id; the others put `0x80 | i` in the kind byte (byte 11), so they never
    /// collide with another id of the same owner (kinds 0 to 2, and 0xC0 for stream items).
    pub fn return_id(&self, i: u8) -> Self {
        if i == 0 {
            return *self;
        }
        let mut b = self.0;
        b[11] = 0x80 | (i & 0x3f);
        Self(b)
    }

    /// The id of item `j` of a streaming task: kind byte 0xC0, the low 32 bits of the
    /// task's counter, then `j` (32 bits).
    pub fn stream_item_id(&self, j: u32) -> Self {
        let mut b = self.0;
        b[11] = 0xC0;
        b.copy_within(16..20, 12);
        b[16..20].copy_from_slice(&j.to_be_bytes());
        Self(b)
    }

    /// Parses the 20 raw bytes of a wire `bytes` field.
    pub fn from_slice(b: &[u8]) -> Result<Self, IdError> {
        <[u8; 20]>::try_from(b).map(Self).map_err(|_| IdError {
            kind: "object id",
            value: format!("{} bytes", b.len()),
            expected: "20 bytes",
        })
    }
}

impl FromStr for ObjectId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex(s).map(Self).ok_or_else(|| IdError {
            kind: "object id",
            value: s.chars().take(80).collect(),
            expected: "40 lowercase hex characters",
        })
    }
}

/// Raft id of a head: FNV-1a 64 of its advertised `host:port`, never 0.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RaftId(pub u64);

impl RaftId {
    pub fn from_address(addr: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in addr.trim().as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(h.max(1))
    }
}

/// Checks a `host:port` address: a non-empty host and a port in 1..=65535.
pub fn validate_address(addr: &str) -> Result<(), IdError> {
    let err = || IdError {
        kind: "address",
        value: addr.chars().take(80).collect(),
        expected: "HOST:PORT with a port in 1..=65535",
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(err)?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(err());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(err()),
    }
}

/// Checks a job's submission id (also its job id, a directory and a log file name on the
/// node): 1 to 128 of `[A-Za-z0-9_-]`. The one rule the heads and the nodes share.
pub fn validate_submission_id(id: &str) -> Result<(), IdError> {
    check_name(id, "submission_id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submission_ids() {
        for ok in ["raysubmit_abc", "a", "A-b_9", &"x".repeat(128)] {
            assert!(validate_submission_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", ".", "a.b", "a/b", "a b", "é", &"x".repeat(129)] {
            let e = validate_submission_id(bad).unwrap_err().to_string();
            assert!(e.contains("submission_id"), "{e}");
        }
    }

    #[test]
    fn node_id_round_trips_and_rejects_bad_input() {
        let id = NodeId::from_bytes([0xab; 16]);
        let s = id.to_string();
        assert_eq!(s, "ab".repeat(16));
        assert_eq!(s.parse::<NodeId>(), Ok(id));
        for bad in [
            "",
            "ab",
            &"AB".repeat(16),
            &"zz".repeat(16),
            &"ab".repeat(17),
        ] {
            let e = bad.parse::<NodeId>().unwrap_err();
            assert_eq!(e.kind, "node id", "{bad}");
        }
    }

    #[test]
    fn ids_show_as_lowercase_hex_with_leading_zeros() {
        let b: [u8; 20] = std::array::from_fn(|i| (i * 13) as u8);
        let want: String = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(ObjectId::from_bytes(b).to_string(), want);
        assert_eq!(
            format!("{:?}", ObjectId::from_bytes(b)),
            format!("ObjectId({want})")
        );
        let n: [u8; 16] = std::array::from_fn(|i| 0xf0 ^ i as u8);
        assert_eq!(
            NodeId::from_bytes(n).to_string(),
            "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
        );
        assert_eq!(ActorId::from_bytes([0x0a; 16]).to_string(), "0a".repeat(16));
    }

    #[test]
    fn object_id_round_trips_and_rejects_bad_input() {
        let id = ObjectId::from_bytes([0x0f; 20]);
        assert_eq!(id.to_string().parse::<ObjectId>(), Ok(id));
        assert_eq!(ObjectId::from_slice(id.as_bytes()), Ok(id));
        assert!(ObjectId::from_slice(&[1; 19]).is_err());
        for bad in ["", &"0f".repeat(16), &"0F".repeat(20), &"g0".repeat(20)] {
            assert_eq!(
                bad.parse::<ObjectId>().unwrap_err().kind,
                "object id",
                "{bad}"
            );
        }
    }

    #[test]
    fn actor_ids_round_trip_through_text_and_serde_and_reject_bad_input() {
        let id = ActorId::from_bytes([0x3c; 16]);
        assert_eq!(id.to_string().parse::<ActorId>(), Ok(id));
        let json = serde_json::to_string(&id).expect("ser");
        assert_eq!(json, format!("\"{}\"", "3c".repeat(16)));
        assert_eq!(serde_json::from_str::<ActorId>(&json).expect("de"), id);
        for bad in [
            "",
            &"3C".repeat(16),
            &"3c".repeat(15),
            &"3c".repeat(17),
            "x",
        ] {
            assert_eq!(
                bad.parse::<ActorId>().unwrap_err().kind,
                "actor id",
                "{bad}"
            );
        }
        assert!(serde_json::from_str::<ActorId>("\"zz\"").is_err());
    }

    #[test]
    fn name_ids_accept_what_nodes_and_submitters_make_and_nothing_else() {
        for ok in ["raysubmit_abc", "a", "0123abcd-17", &"x".repeat(128)] {
            assert_eq!(ok.parse::<JobId>().expect(ok).as_str(), ok);
            assert_eq!(LeaseId::try_from(ok.to_owned()).expect(ok).to_string(), ok);
        }
        for bad in ["", "a b", "../x", "é", &"x".repeat(129)] {
            assert_eq!(
                bad.parse::<WorkerId>().unwrap_err().kind,
                "worker id",
                "{bad}"
            );
        }
        let w: WorkerId = "n1-3".parse().expect("worker");
        assert_eq!(serde_json::to_string(&w).expect("ser"), "\"n1-3\"");
        assert!(serde_json::from_str::<WorkerId>("\"a/b\"").is_err());
        assert_eq!(format!("{w:?}"), "WorkerId(n1-3)");
    }

    #[test]
    fn raft_id_is_stable_and_distinct() {
        let a = RaftId::from_address("127.0.0.1:6379");
        assert_eq!(a, RaftId::from_address(" 127.0.0.1:6379 "));
        assert_ne!(a, RaftId::from_address("127.0.0.1:6380"));
        assert_ne!(a.0, 0);
    }

    #[test]
    fn addresses_are_validated() {
        assert!(validate_address("127.0.0.1:1").is_ok());
        assert!(validate_address("[::1]:80").is_ok());
        for bad in ["127.0.0.1", ":80", "h:0", "h:65536", "h:x", "a b:1"] {
            assert!(validate_address(bad).is_err(), "{bad}");
        }
    }
}
