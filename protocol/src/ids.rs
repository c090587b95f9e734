//! Id newtypes. Node ids are 16 random bytes shown as 32 lowercase hex chars; a head's Raft
//! id is derived from its advertised address so every head computes the same ids from the
//! same `--peers` list without coordination.
//!
//! Invariant: a `NodeId` is always 32 lowercase hex chars; parsing anything else fails.

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
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct NodeId([u8; 16]);

impl NodeId {
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = || IdError { kind: "node id", value: s.chars().take(80).collect(), expected: "32 lowercase hex characters" };
        if s.len() != 32 {
            return Err(err());
        }
        let mut out = [0u8; 16];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            match (hex(chunk[0]), hex(chunk[1])) {
                (Some(h), Some(l)) => out[i] = h << 4 | l,
                _ => return Err(err()),
            }
        }
        Ok(Self(out))
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
    let err = || IdError { kind: "address", value: addr.chars().take(80).collect(), expected: "HOST:PORT with a port in 1..=65535" };
    let (host, port) = addr.rsplit_once(':').ok_or_else(err)?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(err());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_and_rejects_bad_input() {
        let id = NodeId::from_bytes([0xab; 16]);
        let s = id.to_string();
        assert_eq!(s, "ab".repeat(16));
        assert_eq!(s.parse::<NodeId>(), Ok(id));
        for bad in ["", "ab", &"AB".repeat(16), &"zz".repeat(16), &"ab".repeat(17)] {
            let e = bad.parse::<NodeId>().unwrap_err();
            assert_eq!(e.kind, "node id", "{bad}");
        }
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
