//! The local socket protocol between the store (in the node daemon) and its clients (workers
//! and drivers on the same machine).
//!
//! Wire contract: a Unix stream socket. On connect the server sends one [`Hello`] frame whose
//! `sendmsg` carries the arena's fd as SCM_RIGHTS; the client maps it once. Then the client
//! sends [`Request`] frames and the server answers each with one [`Reply`] frame, in order,
//! except `Release`, which has no reply. Clients defer the release of small objects and send
//! them in one `Release` frame ahead of their next request (or when 64 are pending), as
//! plasma's release delay did, so reading many small objects costs no extra syscalls.
//! A frame is a little-endian u32 length followed by that many bytes of postcard.
//! When the connection closes, the server releases every pin the client held and aborts its
//! unsealed objects.

use std::io::{Read, Write};

use protocol::ObjectId;
use serde::{Deserialize, Serialize};

use crate::store::{Block, StoreStats};

/// Bumped on any incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 1;
/// Frames above this are refused; large objects go through shared memory, not the socket.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Objects up to this size are sent inline in a `Put` (one round trip); larger ones are
/// created, written in place and sealed.
pub const INLINE_PUT_MAX: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub capacity: u64,
    /// The arena is reserved in whole multiples of this (or up to `capacity`), so a client
    /// may pre-fault any aligned chunk that holds part of a block it was given.
    pub chunk: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Create {
        id: ObjectId,
        data_size: u64,
        meta_size: u64,
    },
    /// Seal, and with `release` also drop the creator's pin.
    Seal {
        id: ObjectId,
        release: bool,
    },
    Abort {
        id: ObjectId,
    },
    Put {
        id: ObjectId,
        data: Vec<u8>,
        meta: Vec<u8>,
    },
    /// Several small puts in one round trip; answered with `Results`, one per item.
    PutMany {
        items: Vec<(ObjectId, Vec<u8>, Vec<u8>)>,
    },
    Get {
        ids: Vec<ObjectId>,
        timeout_ms: Option<u64>,
    },
    Release {
        ids: Vec<ObjectId>,
    },
    Delete {
        ids: Vec<ObjectId>,
    },
    Contains {
        id: ObjectId,
    },
    Stats,
    /// Ask the node to pull a copy from another node's object manager (`host:port`).
    Pull {
        id: ObjectId,
        from: String,
        timeout_ms: Option<u64>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Created(Block),
    Objects(Vec<Option<Block>>),
    Bool(bool),
    Stats(StoreStats),
    /// Per-item outcome of a batch: `None` for success, else (kind, message).
    Results(Vec<Option<(String, String)>>),
    Error {
        kind: String,
        message: String,
    },
}

/// How long a reader polls a socket before it blocks. A request-reply over a Unix socket
/// costs two thread wake-ups (about 15 µs each on this class of VM); a reader that polls
/// briefly catches the next message of a busy peer without sleeping. Bounded, so an idle
/// connection costs nothing.
pub const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// Polls `fd` for up to `max` until it has data (or end of stream), yielding the CPU between
/// polls so a peer on the same core still runs.
pub fn spin_until_readable(fd: std::os::fd::RawFd, max: std::time::Duration) {
    let start = std::time::Instant::now();
    let mut b = [0u8; 1];
    loop {
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        match nix::sys::socket::recv(fd, &mut b, flags) {
            Err(nix::errno::Errno::EAGAIN) if start.elapsed() < max => std::thread::yield_now(),
            _ => return,
        }
    }
}

pub fn write_frame<T: Serialize>(
    w: &mut impl Write,
    buf: &mut Vec<u8>,
    msg: &T,
) -> std::io::Result<()> {
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    let mut out = postcard::to_extend(msg, std::mem::take(buf)).map_err(std::io::Error::other)?;
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    let res = w.write_all(&out);
    *buf = out;
    res
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is larger than the limit of {MAX_FRAME}"),
        ));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    postcard::from_bytes(buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_frames_are_refused() {
        let mut wire = Vec::new();
        let mut buf = Vec::new();
        let id = ObjectId::from_bytes([7; 20]);
        write_frame(
            &mut wire,
            &mut buf,
            &Request::Put {
                id,
                data: vec![1, 2, 3],
                meta: vec![],
            },
        )
        .unwrap();
        write_frame(&mut wire, &mut buf, &Request::Stats).unwrap();
        let mut r = &wire[..];
        match read_frame::<Request>(&mut r, &mut buf).unwrap() {
            Some(Request::Put { id: got, data, .. }) => {
                assert_eq!((got, data), (id, vec![1, 2, 3]))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            read_frame::<Request>(&mut r, &mut buf).unwrap(),
            Some(Request::Stats)
        ));
        assert!(read_frame::<Request>(&mut r, &mut buf).unwrap().is_none());

        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let e = read_frame::<Request>(&mut &huge[..], &mut buf).unwrap_err();
        assert!(e.to_string().contains("larger than the limit"), "{e}");
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert_eq!(
            read_frame::<Request>(&mut &garbage[..], &mut buf)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::InvalidData
        );
    }
}
