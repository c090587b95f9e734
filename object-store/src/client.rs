//! The client side of the local store: connects to the node's socket, receives the arena's fd,
//! maps it once, and then reads objects in place. A get returns views into that mapping, so
//! its cost does not depend on the object's size; dropping a view releases its pin.
//!
//! Invariant: a view's bytes are read only while its pin is held (the view owns the pin), and
//! a writer's bytes are written only before its seal; the store frees or reuses a block only
//! when no pin is held on it.

use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use memmap2::{Advice, MmapRaw};
use nix::sys::socket::{ControlMessageOwned, MsgFlags};
use protocol::ObjectId;

use crate::ipc::{self, Hello, Reply, Request};
use crate::store::{Block, StoreStats};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("object store socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("object store connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("object store protocol: {0}")]
    Protocol(String),
    /// An error the store reported; `kind` is one of `StoreError::kind`'s values.
    #[error("{message}")]
    Store { kind: String, message: String },
    #[error("object {0} was not available before the timeout")]
    Timeout(ObjectId),
    #[error("object {id} holds {found}, not {expected}")]
    WrongType {
        id: ObjectId,
        expected: String,
        found: String,
    },
    #[error("object {id} is not a valid archived {ty}: {reason}")]
    Invalid {
        id: ObjectId,
        ty: &'static str,
        reason: String,
    },
}

impl ClientError {
    /// The store's error kind (`ObjectStoreFull`, `OutOfDisk`, `NotFound`, …), if it is one.
    pub fn kind(&self) -> Option<&str> {
        match self {
            Self::Store { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Releases not sent yet: they go out ahead of the next request.
    pending: Vec<ObjectId>,
}

/// Views up to this size have their release deferred; larger ones release at once, so
/// deferred pins never hold more than `MAX_PENDING * DEFERRED_MAX` bytes.
const DEFERRED_MAX: u64 = 64 * 1024;
const MAX_PENDING: usize = 64;

impl Conn {
    fn queue_flush(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let ids = std::mem::take(&mut self.pending);
            ipc::write_frame(&mut self.writer, &mut self.wbuf, &Request::Release { ids })?;
        }
        Ok(())
    }
}

struct Inner {
    conn: Mutex<Conn>,
    map: MmapRaw,
    capacity: u64,
    /// One bit per granule this process has already pre-faulted for writing.
    populated: Mutex<Vec<u64>>,
    /// Divides the store's reservation chunk, so a granule holding part of a block is
    /// entirely reserved (or reserved up to the capacity).
    granule: u64,
}

/// A connection to the node's object store. Cheap to clone; every clone shares one socket.
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<Inner>,
}

impl StoreClient {
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let (hello, fd) = receive_hello(&stream)?;
        if hello.version != ipc::PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!(
                "the store speaks protocol version {}, this client {}",
                hello.version,
                ipc::PROTOCOL_VERSION
            )));
        }
        let file = std::fs::File::from(fd);
        let map = MmapRaw::map_raw(&file)?;
        if (map.len() as u64) < hello.capacity {
            return Err(ClientError::Protocol(format!(
                "arena is {} bytes, the store announced {}",
                map.len(),
                hello.capacity
            )));
        }
        const PREFERRED_GRANULE: u64 = 4 << 20;
        let granule = if hello.chunk % PREFERRED_GRANULE == 0 {
            PREFERRED_GRANULE
        } else {
            hello.chunk.max(4096)
        };
        let granules = hello.capacity.div_ceil(granule).div_ceil(64) as usize;
        let conn = Conn {
            reader: BufReader::with_capacity(64 * 1024, stream.try_clone()?),
            writer: BufWriter::with_capacity(64 * 1024, stream),
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            pending: Vec::new(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                map,
                capacity: hello.capacity,
                populated: Mutex::new(vec![0; granules]),
                granule,
            }),
        })
    }

    /// The store's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// The address range of this process's mapping of the arena.
    pub fn mapping(&self) -> std::ops::Range<usize> {
        let base = self.inner.map.as_ptr() as usize;
        base..base + self.inner.map.len()
    }

    /// Creates an object and returns a writer for it; `seal` makes it visible.
    pub fn create(
        &self,
        id: ObjectId,
        data_size: u64,
        meta_size: u64,
    ) -> Result<ObjectWriter, ClientError> {
        let block = match self.call(&Request::Create {
            id,
            data_size,
            meta_size,
        })? {
            Reply::Created(b) => b,
            other => return Err(unexpected(other)),
        };
        self.inner.check(block)?;
        self.inner.prefault(block);
        Ok(ObjectWriter {
            client: self.clone(),
            id,
            block,
            done: false,
        })
    }

    /// Stores `data` and `meta` as a sealed object: inline for small objects (one round trip),
    /// else written in place through shared memory.
    pub fn put(&self, id: ObjectId, data: &[u8], meta: &[u8]) -> Result<(), ClientError> {
        if data.len() + meta.len() <= ipc::INLINE_PUT_MAX {
            return self
                .call(&Request::Put {
                    id,
                    data: data.to_vec(),
                    meta: meta.to_vec(),
                })
                .and_then(expect_ok);
        }
        let mut w = self.create(id, data.len() as u64, meta.len() as u64)?;
        w.data_mut().copy_from_slice(data);
        w.meta_mut().copy_from_slice(meta);
        w.seal()
    }

    /// Puts several small objects (each at most `ipc::INLINE_PUT_MAX` bytes) in one round
    /// trip. Returns one result per item, in order.
    pub fn put_many(
        &self,
        items: &[(ObjectId, &[u8], &[u8])],
    ) -> Result<Vec<Result<(), ClientError>>, ClientError> {
        if let Some((id, d, m)) = items
            .iter()
            .find(|(_, d, m)| d.len() + m.len() > ipc::INLINE_PUT_MAX)
        {
            return Err(ClientError::Store {
                kind: "TooLarge".into(),
                message: format!(
                    "object {id} has {} bytes; put_many takes objects up to {} bytes, use put",
                    d.len() + m.len(),
                    ipc::INLINE_PUT_MAX
                ),
            });
        }
        let items = items
            .iter()
            .map(|(id, d, m)| (*id, d.to_vec(), m.to_vec()))
            .collect::<Vec<_>>();
        let n = items.len();
        match self.call(&Request::PutMany { items })? {
            Reply::Results(r) if r.len() == n => Ok(r
                .into_iter()
                .map(|e| {
                    e.map_or(Ok(()), |(kind, message)| {
                        Err(ClientError::Store { kind, message })
                    })
                })
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    /// Waits up to `timeout` (`None`: no limit) until all `ids` are sealed on this node, and
    /// returns a view of each that is, `None` for the others.
    pub fn get(
        &self,
        ids: &[ObjectId],
        timeout: Option<Duration>,
    ) -> Result<Vec<Option<ObjectView>>, ClientError> {
        let timeout_ms = timeout.map(|t| t.as_millis().min(u128::from(u64::MAX)) as u64);
        let blocks = match self.call(&Request::Get {
            ids: ids.to_vec(),
            timeout_ms,
        })? {
            Reply::Objects(b) if b.len() == ids.len() => b,
            other => return Err(unexpected(other)),
        };
        let mut views = Vec::with_capacity(ids.len());
        for (id, b) in ids.iter().zip(blocks) {
            // Build every view first so that an error below still releases each pin on drop.
            views.push(b.map(|block| ObjectView {
                client: self.clone(),
                id: *id,
                block,
            }));
        }
        for v in views.iter().flatten() {
            self.inner.check(v.block)?;
        }
        Ok(views)
    }

    /// [`get`](Self::get) of one object, with an error if it is not there in time.
    pub fn get_one(
        &self,
        id: ObjectId,
        timeout: Option<Duration>,
    ) -> Result<ObjectView, ClientError> {
        self.get(&[id], timeout)?
            .pop()
            .flatten()
            .ok_or(ClientError::Timeout(id))
    }

    /// Deletes objects now, or when their last pin is released.
    pub fn delete(&self, ids: &[ObjectId]) -> Result<(), ClientError> {
        self.call(&Request::Delete { ids: ids.to_vec() })
            .and_then(expect_ok)
    }

    pub fn contains(&self, id: ObjectId) -> Result<bool, ClientError> {
        match self.call(&Request::Contains { id })? {
            Reply::Bool(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    pub fn stats(&self) -> Result<StoreStats, ClientError> {
        match self.call(&Request::Stats)? {
            Reply::Stats(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the node to pull `id` from the object manager at `from` (`host:port`) and waits
    /// until the local copy is sealed.
    pub fn pull(
        &self,
        id: ObjectId,
        from: &str,
        timeout: Option<Duration>,
    ) -> Result<(), ClientError> {
        let timeout_ms = timeout.map(|t| t.as_millis() as u64);
        self.call(&Request::Pull {
            id,
            from: from.to_owned(),
            timeout_ms,
        })
        .and_then(expect_ok)
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.inner.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        let mut c = self.lock();
        c.queue_flush()?;
        let Conn {
            reader,
            writer,
            rbuf,
            wbuf,
            ..
        } = &mut *c;
        ipc::write_frame(writer, wbuf, req)?;
        writer.flush()?;
        ipc::spin_until_readable(reader.get_ref().as_raw_fd(), ipc::SPIN);
        match ipc::read_frame::<Reply>(reader, rbuf)? {
            Some(Reply::Error { kind, message }) => Err(ClientError::Store { kind, message }),
            Some(r) => Ok(r),
            None => Err(ClientError::Protocol(
                "the store closed the connection".into(),
            )),
        }
    }

    /// Releases a pin: deferred for a small object, at once for a large one. Errors are
    /// ignored: a broken connection releases every pin anyway.
    fn release(&self, id: ObjectId, size: u64) {
        let mut c = self.lock();
        c.pending.push(id);
        if (size > DEFERRED_MAX || c.pending.len() >= MAX_PENDING) && c.queue_flush().is_ok() {
            let _ = c.writer.flush();
        }
    }

    /// Sends every deferred release now.
    pub fn flush_releases(&self) -> Result<(), ClientError> {
        let mut c = self.lock();
        c.queue_flush()?;
        c.writer.flush()?;
        Ok(())
    }
}

impl Inner {
    fn check(&self, b: Block) -> Result<(), ClientError> {
        match b.offset.checked_add(b.total()) {
            Some(end) if end <= self.map.len() as u64 => Ok(()),
            _ => Err(ClientError::Protocol(format!(
                "block {b:?} lies outside the arena"
            ))),
        }
    }

    /// Pre-faults, once per process, the granules a new writable block lies in, so a put does
    /// not pay a page fault per 4 KiB and repeated puts pay nothing. Best effort.
    fn prefault(&self, b: Block) {
        if b.total() == 0 {
            return;
        }
        let g = self.granule;
        let (first, last) = (b.offset / g, (b.offset + b.total() - 1) / g);
        let mut bits = self.populated.lock().unwrap_or_else(|p| p.into_inner());
        let mut i = first;
        while i <= last {
            if bits[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                i += 1;
                continue;
            }
            let run = i;
            while i <= last && bits[(i / 64) as usize] & (1 << (i % 64)) == 0 {
                bits[(i / 64) as usize] |= 1 << (i % 64);
                i += 1;
            }
            let (lo, hi) = (run * g, (i * g).min(self.capacity));
            let _ = self
                .map
                .advise_range(Advice::PopulateWrite, lo as usize, (hi - lo) as usize);
        }
    }

    fn slice(&self, b: Block) -> &[u8] {
        // SAFETY: `check` proved the range lies inside the mapping; the caller holds a pin on
        // a sealed object, which the store never frees or rewrites while pinned.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(b.offset as usize), b.total() as usize)
        }
    }
}

fn unexpected(r: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {r:?}"))
}

fn expect_ok(r: Reply) -> Result<(), ClientError> {
    match r {
        Reply::Ok => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn receive_hello(stream: &UnixStream) -> Result<(Hello, OwnedFd), ClientError> {
    let mut buf = vec![0u8; 256];
    let mut cmsg = nix::cmsg_space!(RawFd);
    let (n, fd) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fd = None;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor in our table for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        (msg.bytes, fd)
    };
    buf.truncate(n);
    let Some(fd) = fd else {
        // A refused connection gets an error frame instead of the hello.
        let mut rest = std::io::Read::chain(&buf[..], stream);
        if let Ok(Some(Reply::Error { message, .. })) =
            ipc::read_frame::<Reply>(&mut rest, &mut Vec::new())
        {
            return Err(ClientError::Protocol(format!(
                "the store refused this connection: {message}"
            )));
        }
        return Err(ClientError::Protocol(
            "the store sent no arena descriptor".into(),
        ));
    };
    // The hello frame may arrive in pieces: read the rest plainly.
    let mut rest = std::io::Read::chain(&buf[..], stream);
    let hello = ipc::read_frame::<Hello>(&mut rest, &mut Vec::new())?.ok_or_else(|| {
        ClientError::Protocol("the store closed the connection during the handshake".into())
    })?;
    Ok((hello, fd))
}

/// A writable, unsealed object. `seal` publishes it; dropping it unsealed aborts it.
pub struct ObjectWriter {
    client: StoreClient,
    id: ObjectId,
    block: Block,
    done: bool,
}

impl ObjectWriter {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    pub fn data_mut(&mut self) -> &mut [u8] {
        let b = self.block;
        &mut self.bytes_mut()[..b.data_size as usize]
    }
    pub fn meta_mut(&mut self) -> &mut [u8] {
        let b = self.block;
        &mut self.bytes_mut()[b.data_size as usize..]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let b = self.block;
        let inner = &self.client.inner;
        // SAFETY: `check` proved the range lies inside the mapping; the block was created by
        // this client and is unsealed, so no one else reads or writes it (module invariant),
        // and `&mut self` makes this the only live view.
        unsafe {
            std::slice::from_raw_parts_mut(
                inner.map.as_mut_ptr().add(b.offset as usize),
                b.total() as usize,
            )
        }
    }

    /// Seals the object and drops the creator's pin.
    pub fn seal(mut self) -> Result<(), ClientError> {
        self.done = true;
        self.client
            .call(&Request::Seal {
                id: self.id,
                release: true,
            })
            .and_then(expect_ok)
    }

    pub fn abort(mut self) -> Result<(), ClientError> {
        self.done = true;
        self.client
            .call(&Request::Abort { id: self.id })
            .and_then(expect_ok)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.client.call(&Request::Abort { id: self.id });
        }
    }
}

/// A pinned, read-only view of a sealed object in this process's mapping of the arena.
pub struct ObjectView {
    client: StoreClient,
    id: ObjectId,
    block: Block,
}

impl ObjectView {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    pub fn data(&self) -> &[u8] {
        &self.client.inner.slice(self.block)[..self.block.data_size as usize]
    }
    pub fn metadata(&self) -> &[u8] {
        &self.client.inner.slice(self.block)[self.block.data_size as usize..]
    }
}

impl std::fmt::Debug for ObjectView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ObjectView({}, {} + {} bytes)",
            self.id, self.block.data_size, self.block.meta_size
        )
    }
}

impl Drop for ObjectView {
    fn drop(&mut self) {
        self.client.release(self.id, self.block.total());
    }
}
