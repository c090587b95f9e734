//! The bulk transfer path: an object's bytes over a plain TCP connection, straight from the
//! source's arena into the puller's allocation. No per-chunk framing, no protobuf, no copy
//! into a message buffer: one kernel copy on each side, as a plain TCP stream. The puller
//! ([`crate::Puller`]) keeps several connections busy and checks every range by its own
//! CRC-32, which the source computes while it sends.
//!
//! Wire format (integers little-endian):
//! - hello, client → server: `RTB1`, the token's length (u16, at most [`MAX_TOKEN`]) and its
//!   bytes (empty when auth is off); server → client: one byte, [`ACCEPTED`] or [`REFUSED`]
//!   (then it closes).
//! - request: object id (20 bytes), offset (u64), length (u64) within data then metadata;
//!   reply: [`OK`], exactly `length` bytes, their CRC-32 (u32); or [`FAILED`], a message
//!   length (u32, at most [`MAX_MESSAGE`]) and the UTF-8 message. The connection then takes
//!   the next request.
//!
//! Bounds: the hello must arrive within [`HELLO_TIMEOUT`]; an idle connection closes after
//! [`IDLE_TIMEOUT`]; a piece that cannot be written or read within [`IO_TIMEOUT`] ends the
//! connection, so a peer that stops reading never keeps an object pinned.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use protocol::ObjectId;
use protocol::auth::AuthToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::store::{NODE_CLIENT, Store};

pub const MAGIC: &[u8; 4] = b"RTB1";
pub const ACCEPTED: u8 = 0;
pub const REFUSED: u8 = 1;
pub const OK: u8 = 0;
pub const FAILED: u8 = 1;
pub const MAX_TOKEN: usize = 4096;
pub const MAX_MESSAGE: usize = 4096;
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes written or read (and checksummed) per step: large enough that the system calls do
/// not show, small enough that the CRC runs on bytes still in cache.
const PIECE: usize = 1 << 20;
const REQUEST_LEN: usize = ObjectId::LEN + 16;

/// Accepts bulk connections on `listener` until the task is dropped. `token`: the cluster
/// token a client must present (`None`: auth off).
pub async fn serve(listener: TcpListener, store: Arc<Store>, token: Option<AuthToken>) {
    loop {
        let sock = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("bulk transfer accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (store, token) = (store.clone(), token.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_conn(sock, store, token).await {
                tracing::debug!("bulk transfer connection: {e}");
            }
        });
    }
}

async fn serve_conn(
    mut s: TcpStream,
    store: Arc<Store>,
    token: Option<AuthToken>,
) -> io::Result<()> {
    let _ = s.set_nodelay(true);
    let given = timeout(HELLO_TIMEOUT, read_hello(&mut s))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello"))??;
    let ok = token
        .as_ref()
        .is_none_or(|t| std::str::from_utf8(&given).is_ok_and(|g| t.matches(g)));
    s.write_all(&[if ok { ACCEPTED } else { REFUSED }]).await?;
    if !ok {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "bad token"));
    }
    let mut req = [0u8; REQUEST_LEN];
    loop {
        match timeout(IDLE_TIMEOUT, s.read_exact(&mut req)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let (id, rest) = req.split_at(ObjectId::LEN);
        let id = ObjectId::from_slice(id).expect("20 bytes");
        let offset = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(rest[8..].try_into().expect("8 bytes"));
        match pin_range(&store, id, offset, len).await {
            Err(msg) => {
                let msg = &msg.as_bytes()[..msg.len().min(MAX_MESSAGE)];
                s.write_all(&[FAILED]).await?;
                s.write_all(&(msg.len() as u32).to_le_bytes()).await?;
                s.write_all(msg).await?;
            }
            Ok(range) => {
                s.write_all(&[OK]).await?;
                let mut crc = crc32fast::Hasher::new();
                for piece in range.bytes().chunks(PIECE) {
                    crc.update(piece);
                    timeout(IO_TIMEOUT, s.write_all(piece))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "peer not reading")
                        })??;
                }
                s.write_all(&crc.finalize().to_le_bytes()).await?;
                crate::metrics::record_sent(len);
            }
        }
    }
}

async fn read_hello(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = [0u8; 6];
    s.read_exact(&mut head).await?;
    if &head[..4] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a bulk transfer client",
        ));
    }
    let n = u16::from_le_bytes([head[4], head[5]]) as usize;
    if n > MAX_TOKEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "token too long"));
    }
    let mut token = vec![0u8; n];
    s.read_exact(&mut token).await?;
    Ok(token)
}

/// A range of a sealed object in the arena, holding one pin of the node's until dropped (a
/// range being sent, by either transfer path).
pub(crate) struct PinnedRange {
    store: Arc<Store>,
    id: ObjectId,
    offset: u64,
    len: u64,
}

impl PinnedRange {
    /// Takes one more pin on `id` (the caller holds one) for `offset..offset + len` of the
    /// arena.
    pub(crate) fn pin_again(store: &Arc<Store>, id: ObjectId, offset: u64, len: u64) -> Self {
        store.pin_again(NODE_CLIENT, id);
        Self {
            store: store.clone(),
            id,
            offset,
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        self.store.arena().slice(self.offset, self.len)
    }
}

impl AsRef<[u8]> for PinnedRange {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl Drop for PinnedRange {
    fn drop(&mut self) {
        let _ = self.store.release(NODE_CLIENT, self.id);
    }
}

/// Pins `id` (off the async threads: a spilled object is restored from disk first) and checks
/// the range lies inside it.
async fn pin_range(
    store: &Arc<Store>,
    id: ObjectId,
    offset: u64,
    len: u64,
) -> Result<PinnedRange, String> {
    let st = store.clone();
    let block = tokio::task::spawn_blocking(move || {
        st.get(NODE_CLIENT, &[id], Some(Duration::ZERO), &|| false)
            .map_err(|e| e.to_string())
            .and_then(|mut v| {
                v.pop()
                    .flatten()
                    .ok_or_else(|| format!("object {id} is not on this node"))
            })
    })
    .await
    .map_err(|e| e.to_string())??;
    let range = PinnedRange {
        store: store.clone(),
        id,
        offset: block.offset + offset,
        len,
    };
    match offset.checked_add(len) {
        Some(end) if end <= block.total() => Ok(range),
        _ => Err(format!(
            "range {offset}+{len} is outside object {id} of {} bytes",
            block.total()
        )),
    }
}

/// Why a range could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    /// The connection failed or timed out: try another source.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The source answered with an error (the object is gone, the range is bad).
    #[error("{0}")]
    Source(String),
    #[error("range at {offset}: checksum {got:08x}, the source's {expected:08x}")]
    Checksum {
        offset: u64,
        got: u32,
        expected: u32,
    },
}

/// A client connection to a source's bulk port.
pub struct BulkConn {
    s: TcpStream,
}

impl BulkConn {
    /// Connects to `addr` and presents `token`; a refused token is a clear error.
    pub async fn connect(addr: &str, token: Option<&AuthToken>) -> Result<Self, RangeError> {
        let mut s = timeout(HELLO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {addr}")))??;
        let _ = s.set_nodelay(true);
        let t = token.map_or(&b""[..], |t| t.as_str().as_bytes());
        let mut hello = Vec::with_capacity(6 + t.len());
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&(t.len() as u16).to_le_bytes());
        hello.extend_from_slice(t);
        s.write_all(&hello).await?;
        let mut answer = [0u8; 1];
        timeout(HELLO_TIMEOUT, s.read_exact(&mut answer))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer to the hello"))??;
        if answer[0] != ACCEPTED {
            return Err(RangeError::Source(format!(
                "{addr} refused the cluster token"
            )));
        }
        Ok(Self { s })
    }

    /// Reads `dst.len()` bytes of `id` from `offset` into `dst` and checks them against the
    /// source's CRC-32, which is returned (as a hasher, to combine with the other ranges').
    pub async fn read_range(
        &mut self,
        id: ObjectId,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<crc32fast::Hasher, RangeError> {
        let mut req = [0u8; REQUEST_LEN];
        req[..ObjectId::LEN].copy_from_slice(id.as_bytes());
        req[ObjectId::LEN..ObjectId::LEN + 8].copy_from_slice(&offset.to_le_bytes());
        req[ObjectId::LEN + 8..].copy_from_slice(&(dst.len() as u64).to_le_bytes());
        self.s.write_all(&req).await?;
        let mut status = [0u8; 1];
        self.read(&mut status).await?;
        if status[0] != OK {
            let mut n = [0u8; 4];
            self.read(&mut n).await?;
            let n = u32::from_le_bytes(n) as usize;
            if n > MAX_MESSAGE {
                return Err(RangeError::Source("malformed error from the source".into()));
            }
            let mut msg = vec![0u8; n];
            self.read(&mut msg).await?;
            return Err(RangeError::Source(
                String::from_utf8_lossy(&msg).into_owned(),
            ));
        }
        let mut crc = crc32fast::Hasher::new();
        for piece in dst.chunks_mut(PIECE) {
            self.read(piece).await?;
            crc.update(piece);
        }
        let mut theirs = [0u8; 4];
        self.read(&mut theirs).await?;
        let (got, expected) = (crc.clone().finalize(), u32::from_le_bytes(theirs));
        if got != expected {
            return Err(RangeError::Checksum {
                offset,
                got,
                expected,
            });
        }
        Ok(crc)
    }

    async fn read(&mut self, buf: &mut [u8]) -> io::Result<()> {
        timeout(IO_TIMEOUT, self.s.read_exact(buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the source stopped sending"))?
            .map(drop)
    }
}
