//! The store's Unix-socket server: one thread per local client (workers and drivers are few
//! and long-lived, and a blocking thread answers a request in one context switch each way,
//! which no async runtime beats on this path).
//!
//! Invariant: when a connection ends for any reason, the client's pins are released and its
//! unsealed objects aborted (`Store::disconnect`), so a killed worker never leaks memory.
//!
//! Access: the socket hands out the arena's fd, so only this user's processes may use it:
//! the socket is 0600 in a 0700 directory, and each connection's peer uid (`SO_PEERCRED`)
//! must be ours (root's connections are served too: root can read the memory anyway).
//! At most [`MAX_CLIENTS`] connections are served at once; past that a client is told why
//! and closed.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags};
use protocol::ObjectId;

use crate::ipc::{self, Hello, Reply, Request};
use crate::store::{Store, StoreError};

/// Pulls an object from another node into the local store; provided by the transfer module
/// when the node serves the object manager.
pub type PullHook =
    Arc<dyn Fn(ObjectId, String, Option<Duration>) -> Result<(), String> + Send + Sync>;

/// Connections served at once (each is a thread).
pub const MAX_CLIENTS: usize = 1024;

pub struct StoreServer {
    path: PathBuf,
    listener: UnixListener,
    stopped: Arc<AtomicBool>,
    /// A clone of each open connection, so `stop` can close them.
    conns: Arc<Mutex<HashMap<u64, UnixStream>>>,
}

impl StoreServer {
    /// Binds `path` (replacing a stale socket file) and serves `store` on it.
    pub fn start(
        store: Arc<Store>,
        path: &Path,
        puller: Option<PullHook>,
    ) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        let uid = nix::unistd::geteuid().as_raw();
        let stopped = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let accept = listener.try_clone()?;
        let (s, c) = (stopped.clone(), conns.clone());
        std::thread::Builder::new()
            .name("object-store-accept".into())
            .spawn(move || {
                for (n, conn) in accept.incoming().enumerate() {
                    if s.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    if let Err(why) = admit(
                        &conn,
                        uid,
                        c.lock().unwrap_or_else(|p| p.into_inner()).len(),
                    ) {
                        tracing::warn!("object store refused a connection: {why}");
                        refuse(&conn, &why);
                        continue;
                    }
                    if let Ok(clone) = conn.try_clone() {
                        c.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(n as u64, clone);
                    }
                    let (store, puller, conns) = (store.clone(), puller.clone(), c.clone());
                    let spawned = std::thread::Builder::new()
                        .name("object-store-conn".into())
                        .spawn(move || {
                            serve_client(&store, conn, puller.as_ref());
                            conns
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&(n as u64));
                        });
                    if let Err(e) = spawned {
                        tracing::error!("cannot start an object store connection thread: {e}");
                    }
                }
            })?;
        Ok(Self {
            path: path.to_owned(),
            listener,
            stopped,
            conns,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, closes every connection (their pins are released) and removes the
    /// socket file.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        // Wake the accept loop on kernels where shutdown does not.
        let _ = UnixStream::connect(&self.path);
        for (_, c) in self.conns.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a new connection is served: its peer is this user (or root), and there is room.
fn admit(conn: &UnixStream, uid: u32, open: usize) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    if cred.uid() != uid && cred.uid() != 0 {
        return Err(format!(
            "process {} runs as uid {}, and this store serves only uid {uid}",
            cred.pid(),
            cred.uid()
        ));
    }
    if open >= MAX_CLIENTS {
        return Err(format!(
            "{open} clients are connected, the most this store serves ({MAX_CLIENTS})"
        ));
    }
    Ok(())
}

/// Tells a refused client why (an error frame where it expects the hello), then closes.
fn refuse(conn: &UnixStream, why: &str) {
    let mut w = conn;
    let _ = ipc::write_frame(
        &mut w,
        &mut Vec::new(),
        &Reply::Error {
            kind: "Refused".into(),
            message: why.to_owned(),
        },
    );
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

fn serve_client(store: &Store, conn: UnixStream, puller: Option<&PullHook>) {
    let client = store.new_client();
    if let Err(e) = send_hello(store, &conn) {
        tracing::debug!("object store client went away during the handshake: {e}");
        return;
    }
    let peek = conn.try_clone().ok();
    // The client is gone when a non-blocking peek sees end of stream.
    let gone = || {
        let Some(p) = &peek else { return false };
        let mut b = [0u8; 1];
        matches!(
            nix::sys::socket::recv(
                p.as_raw_fd(),
                &mut b,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
            ),
            Ok(0)
        )
    };
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, conn);
    let mut writer = BufWriter::with_capacity(64 * 1024, write_half);
    let (mut rbuf, mut wbuf) = (Vec::new(), Vec::new());
    let fd = reader.get_ref().as_raw_fd();
    loop {
        if reader.buffer().is_empty() {
            ipc::spin_until_readable(fd, ipc::SPIN);
        }
        let req = match ipc::read_frame::<Request>(&mut reader, &mut rbuf) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("object store client sent a bad frame: {e}");
                let _ = ipc::write_frame(
                    &mut writer,
                    &mut wbuf,
                    &Reply::Error {
                        kind: "Protocol".into(),
                        message: e.to_string(),
                    },
                );
                let _ = writer.flush();
                break;
            }
        };
        let reply = match handle(store, client, req, puller, &gone) {
            None => continue,
            Some(Ok(r)) => r,
            Some(Err(e)) => Reply::Error {
                kind: e.kind().into(),
                message: e.to_string(),
            },
        };
        if ipc::write_frame(&mut writer, &mut wbuf, &reply).is_err() {
            break;
        }
        // Flush only when no further request is already buffered: pipelined requests share
        // one write.
        if reader.buffer().is_empty() && writer.flush().is_err() {
            break;
        }
    }
    store.disconnect(client);
}

fn send_hello(store: &Store, conn: &UnixStream) -> std::io::Result<()> {
    let mut frame = Vec::new();
    ipc::write_frame(
        &mut frame,
        &mut Vec::new(),
        &Hello {
            version: ipc::PROTOCOL_VERSION,
            capacity: store.arena().capacity(),
            chunk: store.arena().chunk(),
        },
    )?;
    let fds = [store.arena().fd().as_raw_fd()];
    let iov = [std::io::IoSlice::new(&frame)];
    let sent = nix::sys::socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    if sent != frame.len() {
        // The fd went with the first byte; send the rest plainly.
        (&*conn).write_all(&frame[sent..])?;
    }
    Ok(())
}

/// Executes one request; `None` for requests without a reply.
fn handle(
    store: &Store,
    client: u64,
    req: Request,
    puller: Option<&PullHook>,
    gone: &dyn Fn() -> bool,
) -> Option<Result<Reply, StoreError>> {
    let timeout = |ms: Option<u64>| ms.map(Duration::from_millis);
    Some(match req {
        Request::Create {
            id,
            data_size,
            meta_size,
        } => store
            .create(client, id, data_size, meta_size, true)
            .map(Reply::Created),
        Request::Seal { id, release } => store
            .seal(client, id)
            .and_then(|()| {
                if release {
                    store.release(client, id)
                } else {
                    Ok(())
                }
            })
            .map(|()| Reply::Ok),
        Request::Abort { id } => store.abort(client, id).map(|()| Reply::Ok),
        Request::Put { id, data, meta } => store.put(id, &data, &meta, true).map(|()| Reply::Ok),
        Request::PutMany { items } => Ok(Reply::Results(
            items
                .into_iter()
                .map(|(id, data, meta)| {
                    store
                        .put(id, &data, &meta, true)
                        .err()
                        .map(|e| (e.kind().to_owned(), e.to_string()))
                })
                .collect(),
        )),
        Request::Get { ids, timeout_ms } => store
            .get(client, &ids, timeout(timeout_ms), gone)
            .map(Reply::Objects),
        Request::Release { ids } => {
            for id in ids {
                if let Err(e) = store.release(client, id) {
                    tracing::debug!("release from client {client}: {e}");
                }
            }
            return None;
        }
        Request::Delete { ids } => {
            store.delete(&ids);
            Ok(Reply::Ok)
        }
        Request::Contains { id } => Ok(Reply::Bool(store.contains(&id))),
        Request::Stats => Ok(Reply::Stats(store.stats())),
        Request::Pull {
            id,
            from,
            timeout_ms,
        } => Ok(match puller {
            None => Reply::Error {
                kind: "Unsupported".into(),
                message: "this store has no object manager to pull with".into(),
            },
            Some(p) => match p(id, from, timeout(timeout_ms)) {
                Ok(()) => Reply::Ok,
                Err(message) => Reply::Error {
                    kind: "PullFailed".into(),
                    message,
                },
            },
        }),
    })
}
