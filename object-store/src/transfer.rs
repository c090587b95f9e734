//! Object transfer between nodes: the `ObjectManager` gRPC service (the source side) and the
//! [`Puller`] (the destination side).
//!
//! The puller asks the source for the object's size and checksum, allocates the local copy,
//! then fetches chunks (default 5 MiB) concurrently, each written straight into the
//! allocation. A node-wide byte semaphore caps the bytes requested but not yet written; the
//! copy is sealed only after its CRC-32 matches the source's, and it is a secondary copy
//! (evictable), since the primary lives on the source.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::ObjectId;
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, OmClient};
use protocol::pb;
use tokio::sync::Semaphore;

use crate::store::{NODE_CLIENT, Store, StoreError};

pub const DEFAULT_CHUNK_BYTES: u64 = 5 * 1024 * 1024;
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: u64 = 256 * 1024 * 1024;

/// Serves chunks of this node's objects to pullers on other nodes.
#[derive(Clone)]
pub struct ObjectManagerService {
    store: Arc<Store>,
}

impl ObjectManagerService {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    pub fn into_server(self) -> pb::object_manager_server::ObjectManagerServer<Self> {
        pb::object_manager_server::ObjectManagerServer::new(self)
            .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES)
    }

    /// Runs `f` on a pinned view of the object's bytes (data then metadata), off the async
    /// threads: a get may restore a spilled object from disk.
    async fn with_object<T: Send + 'static>(
        &self,
        raw_id: &[u8],
        f: impl FnOnce(&Arc<Store>, ObjectId, crate::store::Block) -> Result<T, tonic::Status>
        + Send
        + 'static,
    ) -> Result<T, tonic::Status> {
        let id = ObjectId::from_slice(raw_id)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let block = store
                .get(NODE_CLIENT, &[id], Some(Duration::ZERO), &|| false)
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?
                .pop()
                .flatten()
                .ok_or_else(|| {
                    tonic::Status::not_found(format!("object {id} is not on this node"))
                })?;
            let out = f(&store, id, block);
            let _ = store.release(NODE_CLIENT, id);
            out
        })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
    }
}

/// A range of a sealed object in the arena, pinned while it lives (a chunk being sent).
struct PinnedChunk {
    store: Arc<Store>,
    id: ObjectId,
    offset: u64,
    len: u64,
}

impl PinnedChunk {
    fn new(store: &Arc<Store>, id: ObjectId, offset: u64, len: u64) -> Self {
        store.pin_again(NODE_CLIENT, id);
        Self {
            store: store.clone(),
            id,
            offset,
            len,
        }
    }
}

impl AsRef<[u8]> for PinnedChunk {
    fn as_ref(&self) -> &[u8] {
        self.store.arena().slice(self.offset, self.len)
    }
}

impl Drop for PinnedChunk {
    fn drop(&mut self) {
        let _ = self.store.release(NODE_CLIENT, self.id);
    }
}

#[tonic::async_trait]
impl pb::object_manager_server::ObjectManager for ObjectManagerService {
    async fn get_object_info(
        &self,
        req: tonic::Request<pb::GetObjectInfoRequest>,
    ) -> Result<tonic::Response<pb::ObjectInfo>, tonic::Status> {
        let info = self
            .with_object(&req.into_inner().object_id, |store, id, b| {
                Ok(pb::ObjectInfo {
                    data_size: b.data_size,
                    metadata_size: b.meta_size,
                    crc32: store.checksum(id, b),
                })
            })
            .await?;
        Ok(tonic::Response::new(info))
    }

    async fn read_chunk(
        &self,
        req: tonic::Request<pb::ReadChunkRequest>,
    ) -> Result<tonic::Response<pb::ObjectChunk>, tonic::Status> {
        let r = req.into_inner();
        let data = self
            .with_object(&r.object_id, move |store, id, b| {
                let end = r
                    .offset
                    .checked_add(r.length)
                    .filter(|&e| e <= b.total())
                    .ok_or_else(|| {
                        tonic::Status::out_of_range(format!(
                            "chunk {}+{} is outside object {id} of {} bytes",
                            r.offset,
                            r.length,
                            b.total()
                        ))
                    })?;
                if r.length > protocol::MAX_MESSAGE_BYTES as u64 / 2 {
                    return Err(tonic::Status::invalid_argument(format!(
                        "chunk of {} bytes is too large",
                        r.length
                    )));
                }
                // No copy: the chunk points into the arena and keeps its own pin until
                // the response is written.
                Ok(prost::bytes::Bytes::from_owner(PinnedChunk::new(
                    store,
                    id,
                    b.offset + r.offset,
                    end - r.offset,
                )))
            })
            .await?;
        crate::metrics::record_sent(data.len() as u64);
        Ok(tonic::Response::new(pb::ObjectChunk { data }))
    }

    async fn write_object(
        &self,
        req: tonic::Request<tonic::Streaming<pb::WriteObjectChunk>>,
    ) -> Result<tonic::Response<pb::WriteObjectReply>, tonic::Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| tonic::Status::invalid_argument("empty WriteObject stream"))?;
        let id = ObjectId::from_slice(&first.object_id)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let (ds, ms) = (first.data_size, first.metadata_size);
        let store = self.store.clone();
        let block =
            tokio::task::spawn_blocking(move || store.create(NODE_CLIENT, id, ds, ms, true))
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?
                .map_err(|e| match e {
                    StoreError::AlreadyExists(_) => tonic::Status::already_exists(e.to_string()),
                    StoreError::ObjectStoreFull { .. } | StoreError::TooLarge { .. } => {
                        tonic::Status::resource_exhausted(e.to_string())
                    }
                    e => tonic::Status::unavailable(e.to_string()),
                })?;
        // Aborts the allocation unless the stream completes.
        struct Abort<'a>(&'a Store, ObjectId, bool);
        impl Drop for Abort<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    let _ = self.0.abort(NODE_CLIENT, self.1);
                }
            }
        }
        let mut guard = Abort(&self.store, id, false);
        let total = block.total();
        let mut offset = 0u64;
        let mut chunk = Some(first.payload);
        loop {
            if let Some(data) = chunk.take() {
                let len = data.len() as u64;
                if offset + len > total {
                    return Err(tonic::Status::out_of_range(format!(
                        "object {id}: {} bytes sent for {total}",
                        offset + len
                    )));
                }
                // SAFETY: the block is unsealed and created here; nobody else sees it.
                let dst = unsafe { self.store.arena().slice_mut(block.offset + offset, len) };
                dst.copy_from_slice(&data);
                offset += len;
            }
            match stream.message().await? {
                Some(c) => chunk = Some(c.payload),
                None => break,
            }
        }
        if offset != total {
            return Err(tonic::Status::invalid_argument(format!(
                "object {id}: stream ended after {offset} of {total} bytes"
            )));
        }
        self.store
            .seal(NODE_CLIENT, id)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        guard.2 = true;
        let _ = self.store.release(NODE_CLIENT, id);
        crate::metrics::record_pulled(total);
        Ok(tonic::Response::new(pb::WriteObjectReply {}))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot reach object manager {from}: {message}")]
    Source { from: String, message: String },
    #[error("object {id} from {from}: checksum {got:08x}, expected {expected:08x}")]
    Checksum {
        id: ObjectId,
        from: String,
        got: u32,
        expected: u32,
    },
    #[error("object {id} from {from}: chunk at {offset} has {got} bytes, expected {expected}")]
    ShortChunk {
        id: ObjectId,
        from: String,
        offset: u64,
        got: u64,
        expected: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "refusing to pull from {from}: it is not the object manager of a live node in this node's cluster view"
    )]
    NotAMember { from: String },
    #[error("pull of {0} timed out")]
    Timeout(ObjectId),
}

#[derive(Debug, Clone)]
pub struct PullerConfig {
    pub chunk_bytes: u64,
    /// Node-wide cap on bytes requested from sources and not yet written locally.
    pub max_bytes_in_flight: u64,
    pub token: Option<AuthToken>,
}

impl Default for PullerConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_bytes_in_flight: DEFAULT_MAX_BYTES_IN_FLIGHT,
            token: None,
        }
    }
}

/// Pulls objects from other nodes into the local store.
pub struct Puller {
    store: Arc<Store>,
    chunk: u64,
    cap: u64,
    permits: Arc<Semaphore>,
    token: Option<AuthToken>,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// The object managers pulls may go to (live nodes); none: any (no cluster view yet
    /// given, as in this crate's own tests).
    sources: std::sync::RwLock<Option<std::collections::HashSet<String>>>,
}

impl Puller {
    pub fn new(store: Arc<Store>, cfg: PullerConfig) -> Self {
        let cap = cfg.max_bytes_in_flight.clamp(1, u64::from(u32::MAX));
        // A chunk larger than the cap could never get its permits.
        let chunk = cfg.chunk_bytes.clamp(1, cap);
        Self {
            store,
            chunk,
            cap,
            permits: Arc::new(Semaphore::new(cap as usize)),
            token: cfg.token,
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            sources: std::sync::RwLock::new(None),
        }
    }

    /// From now on, pull only from these object managers (`host:port`): the live nodes. A
    /// local client's `Pull` can then never make this node connect anywhere else.
    pub fn set_sources(&self, sources: impl IntoIterator<Item = String>) {
        *self.sources.write().unwrap_or_else(|p| p.into_inner()) =
            Some(sources.into_iter().collect());
    }

    fn allowed(&self, from: &str) -> bool {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|s| s.contains(from))
    }

    /// The most bytes ever in flight at once (for tests and the bench).
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::Relaxed)
    }
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Makes a sealed secondary copy of `id` in the local store, pulled from `from`
    /// (`host:port` of its object manager). Returns at once if a copy is already here; waits
    /// for a concurrent pull of the same object instead of starting a second one.
    ///
    /// The pull runs as its own task: dropping the returned future (a caller's timeout) never
    /// leaves a half-written allocation behind; the pull finishes or fails on its own, bounded
    /// by per-RPC deadlines.
    pub async fn pull(self: &Arc<Self>, id: ObjectId, from: &str) -> Result<(), PullError> {
        let (me, from) = (self.clone(), from.to_owned());
        let from2 = from.clone();
        tokio::spawn(async move { me.pull_inner(id, &from).await })
            .await
            .unwrap_or_else(|e| {
                Err(PullError::Source {
                    from: from2,
                    message: e.to_string(),
                })
            })
    }

    async fn pull_inner(self: &Arc<Self>, id: ObjectId, from: &str) -> Result<(), PullError> {
        if self.store.contains(&id) {
            return Ok(());
        }
        if !self.allowed(from) {
            return Err(PullError::NotAMember {
                from: from.to_owned(),
            });
        }
        let src_err = |e: &dyn std::fmt::Display| PullError::Source {
            from: from.to_owned(),
            message: e.to_string(),
        };
        let opts = ClientOptions {
            rpc_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        };
        let mut client: OmClient =
            protocol::client::object_manager(from, self.token.clone(), &opts)
                .map_err(|e| src_err(&e))?;
        let info = client
            .get_object_info(pb::GetObjectInfoRequest {
                object_id: id.as_bytes().to_vec(),
            })
            .await
            .map_err(|e| src_err(&e.message()))?
            .into_inner();
        let store = self.store.clone();
        let (ds, ms) = (info.data_size, info.metadata_size);
        let created =
            tokio::task::spawn_blocking(move || store.create(NODE_CLIENT, id, ds, ms, false))
                .await
                .map_err(|e| src_err(&e))?;
        let block = match created {
            Ok(b) => b,
            Err(StoreError::AlreadyExists(_)) => return self.wait_sealed(id).await,
            Err(e) => return Err(e.into()),
        };
        let res = self.fetch_chunks(&client, id, from, block).await;
        let store = self.store.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(), PullError> {
            res?;
            let got = crc32fast::hash(store.arena().slice(block.offset, block.total()));
            if got != info.crc32 {
                return Err(PullError::Checksum {
                    id,
                    from: String::new(),
                    got,
                    expected: info.crc32,
                });
            }
            store.seal_with_crc(NODE_CLIENT, id, got)?;
            store.release(NODE_CLIENT, id)?;
            Ok(())
        })
        .await
        .map_err(|e| src_err(&e))?;
        if let Err(e) = done {
            let _ = self.store.abort(NODE_CLIENT, id);
            return Err(match e {
                PullError::Checksum {
                    id, got, expected, ..
                } => PullError::Checksum {
                    id,
                    from: from.to_owned(),
                    got,
                    expected,
                },
                e => e,
            });
        }
        crate::metrics::record_pulled(block.total());
        Ok(())
    }

    async fn fetch_chunks(
        self: &Arc<Self>,
        client: &OmClient,
        id: ObjectId,
        from: &str,
        block: crate::store::Block,
    ) -> Result<(), PullError> {
        let total = block.total();
        let mut tasks = tokio::task::JoinSet::new();
        let mut first_err = None;
        let flatten = |r: Result<Result<(), PullError>, tokio::task::JoinError>| {
            r.map_err(|e| PullError::Source {
                from: from.to_owned(),
                message: e.to_string(),
            })
            .and_then(|r| r)
        };
        let mut offset = 0;
        while offset < total {
            let len = self.chunk.min(total - offset);
            let permit = self
                .permits
                .clone()
                .acquire_many_owned(len as u32)
                .await
                .expect("the semaphore is never closed");
            let now = self.in_flight.fetch_add(len, Ordering::AcqRel) + len;
            self.max_in_flight.fetch_max(now, Ordering::AcqRel);
            let (mut client, me, from) = (client.clone(), self.clone(), from.to_owned());
            tasks.spawn(async move {
                let res = client
                    .read_chunk(pb::ReadChunkRequest {
                        object_id: id.as_bytes().to_vec(),
                        offset,
                        length: len,
                    })
                    .await;
                let out = match res {
                    Err(e) => Err(PullError::Source {
                        from,
                        message: e.message().to_owned(),
                    }),
                    Ok(r) => {
                        let data = r.into_inner().data;
                        if data.len() as u64 != len {
                            Err(PullError::ShortChunk {
                                id,
                                from,
                                offset,
                                got: data.len() as u64,
                                expected: len,
                            })
                        } else {
                            // SAFETY: the block is ours (created by NODE_CLIENT, unsealed) and
                            // chunks are disjoint, so no other view of these bytes exists.
                            let dst =
                                unsafe { me.store.arena().slice_mut(block.offset + offset, len) };
                            dst.copy_from_slice(&data);
                            Ok(())
                        }
                    }
                };
                me.in_flight.fetch_sub(len, Ordering::AcqRel);
                drop(permit);
                out
            });
            offset += len;
            // Stop queueing chunks once one failed.
            while let Some(r) = tasks.try_join_next() {
                if let Err(e) = flatten(r) {
                    first_err.get_or_insert(e);
                }
            }
            if first_err.is_some() {
                break;
            }
        }
        // Every chunk task ends before we return, whatever happened: the caller may free the
        // block next, and no task may still be writing into it.
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = flatten(r) {
                tasks.abort_all();
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn wait_sealed(&self, id: ObjectId) -> Result<(), PullError> {
        let store = self.store.clone();
        let got = tokio::task::spawn_blocking(move || {
            let got = store.get(NODE_CLIENT, &[id], Some(Duration::from_secs(300)), &|| {
                false
            })?;
            if got[0].is_some() {
                store.release(NODE_CLIENT, id)?;
            }
            Ok::<_, StoreError>(got[0].is_some())
        })
        .await
        .map_err(|e| PullError::Source {
            from: String::new(),
            message: e.to_string(),
        })??;
        if got {
            Ok(())
        } else {
            Err(PullError::Timeout(id))
        }
    }

    /// The hook the store's socket server calls for a client's `Pull` request: runs the pull on
    /// `rt`, bounded by the request's timeout.
    pub fn hook(self: &Arc<Self>, rt: tokio::runtime::Handle) -> crate::server::PullHook {
        let me = self.clone();
        Arc::new(move |id, from, timeout| {
            let fut = me.pull(id, &from);
            let res = match timeout {
                // The pull itself goes on in its own task (see `pull`); only the wait ends.
                Some(t) => rt.block_on(async {
                    tokio::time::timeout(t, fut)
                        .await
                        .unwrap_or(Err(PullError::Timeout(id)))
                }),
                None => rt.block_on(fut),
            };
            res.map_err(|e| e.to_string())
        })
    }
}
