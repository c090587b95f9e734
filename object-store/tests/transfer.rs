//! Transfer between two stores over loopback gRPC: checksums equal, bytes in flight never
//! above the cap, the pulled copy is secondary, bad sources give clear errors.

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

/// Serves `store`'s object manager on a loopback port with `token`; returns its address.
async fn serve(store: Arc<Store>, token: Option<AuthToken>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let routes = tonic::service::Routes::new(ObjectManagerService::new(store).into_server());
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
