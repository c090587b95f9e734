//! Transfer between stores over loopback, the bulk path (plain TCP) and the gRPC chunks:
//! checksums equal, bytes in flight never above the cap, the pulled copy is secondary, bad
//! sources give clear errors, a source that dies mid-way or corrupts a range is resumed from
//! from another copy, fetching only what is missing.

use std::sync::Arc;
use std::time::Duration;

use object_store::{
    ObjectManagerService, Puller, PullerConfig, Store, StoreClient, StoreConfig, StoreServer,
};
use protocol::ObjectId;
use protocol::auth::AuthToken;

fn store(dir: &std::path::Path, name: &str, capacity: u64) -> Arc<Store> {
    Arc::new(
        Store::open(&StoreConfig {
            capacity,
            plasma_dir: "/dev/shm".into(),
            spill_dir: dir.join(name).join("spill"),
            chunk: 16 << 20,
        })
        .unwrap(),
    )
}

fn oid(n: u8) -> ObjectId {
    ObjectId::from_bytes([n; 20])
}

/// Serves `store`'s object manager and bulk port on loopback with `token`; returns the object
/// manager's address.
async fn serve(store: Arc<Store>, token: Option<AuthToken>) -> String {
    let bulk = serve_bulk(store.clone(), token.clone()).await;
    serve_om(store, token, bulk).await
}

/// Serves `store`'s bulk port; returns it.
async fn serve_bulk(store: Arc<Store>, token: Option<AuthToken>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(object_store::bulk::serve(l, store, token));
    port
}

/// Serves `store`'s object manager, announcing `bulk_port` (0: none).
async fn serve_om(store: Arc<Store>, token: Option<AuthToken>, bulk_port: u16) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let routes = tonic::service::Routes::new(
        ObjectManagerService::new(store)
            .with_bulk_port(bulk_port)
            .into_server(),
    );
    tokio::spawn(protocol::server::serve(
        l,
        protocol::server::grpc_router(routes, protocol::server::Access::token(token)),
        std::future::pending(),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_a_large_object_in_chunks_under_the_in_flight_cap() {
    let dir = tempfile::tempdir().unwrap();
    let token = AuthToken::new("s3cret-token-for-tests", "test").unwrap();
    let (a, b) = (
        store(dir.path(), "a", 256 << 20),
        store(dir.path(), "b", 256 << 20),
    );
    let addr = serve(a.clone(), Some(token.clone())).await;

    let sa = StoreServer::start(a.clone(), &dir.path().join("a.sock"), None).unwrap();
    let ca = StoreClient::connect(sa.path()).unwrap();
    let data: Vec<u8> = (0..(100u64 << 20) + 12345)
        .map(|i| ((i * 2654435761) >> 13) as u8)
        .collect();
    ca.put(oid(1), &data, b"the metadata").unwrap();

    let cfg = PullerConfig {
        chunk_bytes: 1 << 20,
        max_bytes_in_flight: 3 << 20,
        token: Some(token.clone()),
        ..Default::default()
    };
    let puller = Arc::new(Puller::new(b.clone(), cfg));
    // Two concurrent pulls of one object make one copy.
    let (p1, p2) = (puller.clone(), puller.clone());
    let (r1, r2) = tokio::join!(p1.pull(oid(1), &addr), p2.pull(oid(1), &addr));
    r1.unwrap();
    r2.unwrap();
    assert!(
        puller.max_in_flight() > 0 && puller.max_in_flight() <= 3 << 20,
        "max in flight {}",
        puller.max_in_flight()
    );

    // Read the copy through B's socket, as a worker on B would.
    let sb = StoreServer::start(
        b.clone(),
        &dir.path().join("b.sock"),
        Some(puller.hook(tokio::runtime::Handle::current())),
    )
    .unwrap();
    let want = crc32fast::hash(&data);
    ca.put(oid(2), &vec![2u8; 200 << 20], b"").unwrap();
    let (path, addr2) = (sb.path().to_owned(), addr.clone());
    tokio::task::spawn_blocking(move || {
        let cb = StoreClient::connect(path).unwrap();
        let v = cb.get_one(oid(1), Some(Duration::ZERO)).unwrap();
        assert_eq!(crc32fast::hash(v.data()), want);
        assert_eq!(v.metadata(), b"the metadata");
        drop(v);
        // Through the socket's Pull request too; the copy of object 1 is secondary, so the
        // pressure this pull makes evicts it.
        cb.pull(oid(2), &addr2, Some(Duration::from_secs(120)))
            .unwrap();
        assert!(cb.contains(oid(2)).unwrap());
        assert!(
            !cb.contains(oid(1)).unwrap(),
            "the secondary copy of object 1 was evicted for room"
        );
    })
    .await
    .unwrap();
    assert_eq!(b.stats().evictions_total, 1);
    assert_eq!(
        b.stats().spilled_bytes_total,
        0,
        "secondary copies are dropped, never spilled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sources_give_clear_errors_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let token = AuthToken::new("s3cret-token-for-tests", "test").unwrap();
    let (a, b) = (
        store(dir.path(), "a", 16 << 20),
        store(dir.path(), "b", 16 << 20),
    );
    let addr = serve(a.clone(), Some(token.clone())).await;
    a.put(oid(1), b"hello", b"", true).unwrap();

    let good = Arc::new(Puller::new(
        b.clone(),
        PullerConfig {
            token: Some(token),
            ..Default::default()
        },
    ));
    let e = good.pull(oid(9), &addr).await.unwrap_err();
    assert!(e.to_string().contains("not on this node"), "{e}");
    let no_token = Arc::new(Puller::new(b.clone(), PullerConfig::default()));
    let e = no_token.pull(oid(1), &addr).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("token"), "{e}");
    let e = good.pull(oid(1), "127.0.0.1:1").await.unwrap_err();
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    assert_eq!(b.stats().used, 0);
    good.pull(oid(1), &addr).await.unwrap();
    assert!(b.contains(&oid(1)));
}

/// A loopback TCP proxy to `target` that forwards what the target sends until `cut_after`
/// bytes in all (then closes every connection, as a source that dies), inverting the byte
/// at stream position `flip_at` (counted over all connections) if given. Returns its port.
async fn proxy(target: u16, cut_after: u64, flip_at: Option<u64>) -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let sent = sent.clone();
            tokio::spawn(async move {
                let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (mut cr, mut cw) = c.into_split();
                let (mut sr, mut sw) = s.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let at = sent.fetch_add(n as u64, Ordering::SeqCst);
                    if at + n as u64 > cut_after {
                        break;
                    }
                    if let Some(f) = flip_at.filter(|f| (at..at + n as u64).contains(f)) {
                        buf[(f - at) as usize] ^= 0xff;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    port
}

fn pattern(n: u64, seed: u64) -> Vec<u8> {
    (0..n)
        .map(|i| (((i + seed) * 2654435761) >> 13) as u8)
        .collect()
}

/// The CRC-32 of the sealed copy of `id` in `s` (data then metadata), read in place.
fn crc_of(s: &Store, id: ObjectId) -> u32 {
    let b = s
        .get(
            object_store::store::NODE_CLIENT,
            &[id],
            Some(Duration::ZERO),
            &|| false,
        )
        .unwrap()[0]
        .expect("the copy is sealed");
    let crc = crc32fast::hash(s.arena().slice(b.offset, b.total()));
    s.release(object_store::store::NODE_CLIENT, id).unwrap();
    crc
}

fn bulk_puller(b: &Arc<Store>, token: &AuthToken, streams: usize, ttl: Duration) -> Arc<Puller> {
    Arc::new(Puller::new(
        b.clone(),
        PullerConfig {
            chunk_bytes: 1 << 20,
            max_bytes_in_flight: 8 << 20,
            bulk_streams: streams,
            partial_ttl: ttl,
            token: Some(token.clone()),
        },
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_over_grpc_chunks_when_the_source_has_no_bulk_port() {
    let dir = tempfile::tempdir().unwrap();
    let token = AuthToken::new("s3cret-token-for-tests", "test").unwrap();
    let (a, b) = (
        store(dir.path(), "a", 64 << 20),
        store(dir.path(), "b", 64 << 20),
    );
    let addr = serve_om(a.clone(), Some(token.clone()), 0).await;
    let data = pattern((20 << 20) + 7, 1);
    a.put(oid(1), &data, b"meta", true).unwrap();
    let p = bulk_puller(&b, &token, 2, Duration::from_secs(60));
    p.pull(oid(1), &addr).await.unwrap();
    let mut whole = data.clone();
    whole.extend_from_slice(b"meta");
    assert_eq!(crc_of(&b, oid(1)), crc32fast::hash(&whole));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_port_refuses_bad_tokens_and_bad_ranges_clearly() {
    use object_store::bulk::{BulkConn, RangeError};
    let dir = tempfile::tempdir().unwrap();
    let token = AuthToken::new("s3cret-token-for-tests", "test").unwrap();
    let a = store(dir.path(), "a", 16 << 20);
    a.put(oid(1), &[7u8; 1000], b"", true).unwrap();
    let port = serve_bulk(a.clone(), Some(token.clone())).await;
    let addr = format!("127.0.0.1:{port}");
    let wrong = AuthToken::new("wrong-token", "test").unwrap();
    for t in [None, Some(&wrong)] {
        let e = BulkConn::connect(&addr, t).await.err().expect("refused");
        assert!(e.to_string().contains("refused the cluster token"), "{e}");
    }
    // Garbage instead of a hello: the connection is closed, the server goes on.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 16];
        // Closed without an answer: an end of stream, or a reset (the rest went unread).
        match s.read(&mut buf).await {
            Ok(n) => assert_eq!(n, 0, "an answer to garbage"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    let mut c = BulkConn::connect(&addr, Some(&token)).await.unwrap();
    let mut buf = vec![0u8; 100];
    match c.read_range(oid(9), 0, &mut buf).await {
        Err(RangeError::Source(m)) => assert!(m.contains("not on this node"), "{m}"),
        other => panic!("{other:?}"),
    }
    match c.read_range(oid(1), 950, &mut buf).await {
        Err(RangeError::Source(m)) => assert!(m.contains("outside object"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The same connection still serves a good range, checked by its CRC.
    let crc = c.read_range(oid(1), 900, &mut buf).await.unwrap();
    assert_eq!(buf, vec![7u8; 100]);
    assert_eq!(crc.finalize(), crc32fast::hash(&[7u8; 100]));
    // Every range's pin is given back (the server drops it just after the last byte).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while a.list().iter().any(|o| o.3 != 0) {
        assert!(std::time::Instant::now() < deadline, "a pin was kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_whose_source_dies_midway_resumes_from_another_copy() {
    let dir = tempfile::tempdir().unwrap();
    let token = AuthToken::new("s3cret-token-for-tests", "test").unwrap();
    let (a, b, c) = (
        store(dir.path(), "a", 256 << 20),
        store(dir.path(), "b", 256 << 20),
        store(dir.path(), "c", 256 << 20),
    );
    let data = pattern((100 << 20) + 12345, 2);
    a.put(oid(1), &data, b"m", true).unwrap();
    c.put(oid(1), &data, b"m", true).unwrap();
    // A's bulk port is reached through a proxy that dies after 30 MiB.
    let a_bulk = serve_bulk(a.clone(), Some(token.clone())).await;
    let dying = proxy(a_bulk, 30 << 20, None).await;
    let addr_a = serve_om(a.clone(), Some(token.clone()), dying).await;
    let addr_c = serve(c.clone(), Some(token.clone())).await;

    let p = bulk_puller(&b, &token, 2, Duration::from_secs(60));
    let e = p.pull(oid(1), &addr_a).await.unwrap_err();
    assert!(
        matches!(e, object_store::PullError::Source { .. }),
        "a dead source is a source error: {e}"
    );
    assert!(!b.contains(&oid(1)), "nothing sealed from a failed pull");
    assert!(b.stats().used > 0, "the ranges already here are kept");
    p.pull(oid(1), &addr_c).await.unwrap();
    let kept = p.resumed_bytes();
    // At most 30 MiB crossed before the cut; the ranges cut mid-way are fetched again.
    assert!(
        (20 << 20..=30 << 20).contains(&kept),
        "{kept} bytes were not fetched again"
    );
    let mut whole = data;
    whole.push(b'm');
    assert_eq!(crc_of(&b, oid(1)), crc32fast::hash(&whole));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_range_is_refused_then_fetched_again_from_another_copy() {
    let dir = tempfile::tempdir().unwrap();
    let token = AuthToken::new("s3cret-token-for-tests", "test").unwrap();
    let (a, b, c) = (
        store(dir.path(), "a", 64 << 20),
        store(dir.path(), "b", 64 << 20),
        store(dir.path(), "c", 64 << 20),
    );
    let data = pattern(20 << 20, 3);
    a.put(oid(1), &data, b"", true).unwrap();
    c.put(oid(1), &data, b"", true).unwrap();
    // One connection: stream position 10 MiB is inside range 9's bytes.
    let a_bulk = serve_bulk(a.clone(), Some(token.clone())).await;
    let flipping = proxy(a_bulk, u64::MAX, Some(10 << 20)).await;
    let addr_a = serve_om(a.clone(), Some(token.clone()), flipping).await;
    let addr_c = serve(c.clone(), Some(token.clone())).await;

    let p = bulk_puller(&b, &token, 1, Duration::from_secs(60));
    let e = p.pull(oid(1), &addr_a).await.unwrap_err();
    assert!(
        matches!(e, object_store::PullError::Checksum { .. }),
        "a flipped byte is a checksum error: {e}"
    );
    assert!(!b.contains(&oid(1)));
    p.pull(oid(1), &addr_c).await.unwrap();
    assert_eq!(p.resumed_bytes(), 9 << 20, "ranges 0 to 8 were kept");
    assert_eq!(crc_of(&b, oid(1)), crc32fast::hash(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_ranges_are_given_back_after_their_time() {
    let dir = tempfile::tempdir().unwrap();
    let token = AuthToken::new("s3cret-token-for-tests", "test").unwrap();
    let (a, b) = (
        store(dir.path(), "a", 64 << 20),
        store(dir.path(), "b", 64 << 20),
    );
    let data = pattern(20 << 20, 4);
    a.put(oid(1), &data, b"", true).unwrap();
    let a_bulk = serve_bulk(a.clone(), Some(token.clone())).await;
    let dying = proxy(a_bulk, 8 << 20, None).await;
    let addr_dying = serve_om(a.clone(), Some(token.clone()), dying).await;
    let addr_a = serve(a.clone(), Some(token.clone())).await;

    let p = bulk_puller(&b, &token, 2, Duration::from_secs(1));
    p.pull(oid(1), &addr_dying).await.unwrap_err();
    assert!(b.stats().used > 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while b.stats().used > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the kept ranges were never given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.pull(oid(1), &addr_a).await.unwrap();
    assert_eq!(p.resumed_bytes(), 0, "nothing was kept to resume from");
    assert_eq!(crc_of(&b, oid(1)), crc32fast::hash(&data));
}
