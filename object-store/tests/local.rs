//! The store served on a real Unix socket to real client processes (`object-store-probe`):
//! zero-copy sharing between processes, pins released when a client is killed, memory
//! pressure with pins, typed values, bad input on the socket.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::{Store, StoreClient, StoreConfig, StoreServer};
use protocol::ObjectId;

const PROBE: &str = env!("CARGO_BIN_EXE_object-store-probe");

struct Fixture {
    store: Arc<Store>,
    server: StoreServer,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(capacity: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            capacity,
            plasma_dir: PathBuf::from("/dev/shm"),
            spill_dir: dir.path().join("spill"),
            chunk: 16 << 20,
        };
        let store = Arc::new(Store::open(&cfg).unwrap());
        // As the node runs it: spilling ahead in the background, racing the creates.
        store
            .start_spiller(
                object_store::store::DEFAULT_SPILL_THRESHOLD,
                Duration::from_millis(50),
            )
            .unwrap();
        let server =
            StoreServer::start(store.clone(), &dir.path().join("store.sock"), None).unwrap();
        Self {
            store,
            server,
            _dir: dir,
        }
    }
    fn socket(&self) -> &Path {
        self.server.path()
    }
    fn client(&self) -> StoreClient {
        StoreClient::connect(self.socket()).unwrap()
    }
    fn probe(&self, args: &[&str]) -> Command {
        let mut c = Command::new(PROBE);
        c.arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        c
    }
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn oid(n: u64) -> ObjectId {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[19] = 0xee;
    ObjectId::from_bytes(b)
}

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_256_mib_object_put_by_one_process_is_read_in_place_by_another() {
    let f = Fixture::new(512 << 20);
    let id = oid(1).to_string();
    let put = f
        .probe(&[
            "put",
            "--id",
            &id,
            "--size",
            &(256u64 << 20).to_string(),
            "--seed",
            "7",
        ])
        .output()
        .unwrap();
    assert!(put.status.success(), "put failed");
    let put = &json_lines(&put.stdout)[0];
    let get = f.probe(&["get", "--id", &id]).output().unwrap();
    assert!(get.status.success(), "get failed");
    let get = &json_lines(&get.stdout)[0];
    assert_eq!(get["crc"], put["crc"], "checksums differ");
    assert_eq!(get["len"], 256u64 << 20);
    // No copy: the bytes B read lie inside B's own mapping of the arena.
    let (addr, len) = (get["addr"].as_u64().unwrap(), get["len"].as_u64().unwrap());
    let (start, end) = (
        get["map_start"].as_u64().unwrap(),
        get["map_end"].as_u64().unwrap(),
    );
    assert!(
        start <= addr && addr + len <= end,
        "view {addr:#x}+{len} is outside the mapping {start:#x}..{end:#x}"
    );
    // The same holds in this process, and the bytes agree.
    let c = f.client();
    let v = c.get_one(oid(1), Some(Duration::from_secs(5))).unwrap();
    assert!(c.mapping().contains(&(v.data().as_ptr() as usize)));
    assert_eq!(
        u64::from(crc32fast::hash(v.data())),
        put["crc"].as_u64().unwrap()
    );
    // Nothing was pinned by the processes that exited; only our view pins it now.
    assert_eq!(f.store.stats().pinned, 256 << 20);
}

#[test]
fn a_killed_client_releases_its_pins_and_its_unsealed_objects() {
    let f = Fixture::new(64 << 20);
    let c = f.client();
    for i in 0..3 {
        c.put(oid(i), &vec![i as u8; 1 << 20], b"").unwrap();
    }
    assert_eq!(f.store.stats().pinned, 0);
    let mut hold = f
        .probe(&[
            "hold",
            "--id",
            &oid(0).to_string(),
            "--id",
            &oid(1).to_string(),
            "--unsealed",
            &oid(9).to_string(),
            "--unsealed-size",
            "1048576",
        ])
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(hold.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut hold = Killer(hold);
    assert!(line.contains("\"holding\":2"), "{line}");
    assert_eq!(f.store.stats().pinned, 3 << 20);
    // Pinned objects survive a delete until released.
    c.delete(&[oid(0)]).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hold.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    hold.0.wait().unwrap();
    wait_for("pins to be released", Duration::from_secs(30), || {
        f.store.stats().pinned == 0
    });
    assert!(!c.contains(oid(0)).unwrap(), "the pending delete ran");
    assert!(c.contains(oid(1)).unwrap());
    // The unsealed object was aborted: its id is free again and its memory returned.
    assert_eq!(f.store.stats().used, 2 << 20);
    c.put(oid(9), b"again", b"").unwrap();
}

#[test]
fn ten_times_the_capacity_with_pins_spills_restores_and_fails_only_when_all_is_pinned() {
    const MIB: usize = 1 << 20;
    let f = Fixture::new(64 << 20);
    let c = f.client();
    let data = |i: u64| -> Vec<u8> { (0..MIB).map(|j| (j as u64 * 7 + i * 131) as u8).collect() };
    let mut crcs = Vec::new();
    let mut pinned = Vec::new();
    for i in 0..640u64 {
        let d = data(i);
        crcs.push(crc32fast::hash(&d));
        c.put(oid(i), &d, b"meta")
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
        if i % 80 == 0 {
            // Some objects stay pinned throughout.
            pinned.push(c.get_one(oid(i), Some(Duration::ZERO)).unwrap());
        }
    }
    let st = f.store.stats();
    assert!(st.spilled_bytes_total >= 570 * MIB as u64, "{st:?}");
    assert!(st.objects_spilled >= 570, "{st:?}");
    // Pinned objects were never evicted or spilled out: their bytes are where they were.
    for v in &pinned {
        let i = u64::from_le_bytes(v.id().as_bytes()[..8].try_into().unwrap());
        assert_eq!(
            crc32fast::hash(v.data()),
            crcs[i as usize],
            "pinned object {i} changed"
        );
    }
    // Every object reads back identical, restored from disk where it was spilled.
    for i in (0..640u64).rev() {
        let v = c.get_one(oid(i), Some(Duration::ZERO)).unwrap();
        assert_eq!(crc32fast::hash(v.data()), crcs[i as usize], "object {i}");
        assert_eq!(v.metadata(), b"meta");
    }
    assert!(f.store.stats().restored_bytes_total > 0);
    // Pin until nothing can be freed: only then does a create fail, with ObjectStoreFull.
    let mut held = Vec::new();
    let mut i = 0u64;
    let err = loop {
        match c.get_one(oid(i), Some(Duration::ZERO)) {
            Ok(v) => held.push(v),
            Err(e) => break e,
        }
        i += 1;
    };
    assert_eq!(err.kind(), Some("ObjectStoreFull"), "{err}");
    let st = f.store.stats();
    assert!(
        st.pinned + MIB as u64 + 64 > st.capacity,
        "full while only {} of {} bytes were pinned",
        st.pinned,
        st.capacity
    );
    let err = c.put(oid(10_000), &data(1), b"").unwrap_err();
    assert_eq!(err.kind(), Some("ObjectStoreFull"));
    assert!(err.to_string().contains("pinned"), "{err}");
    drop(held);
    drop(pinned);
    c.put(oid(10_000), &data(1), b"").unwrap();
}

#[test]
fn typed_values_are_read_in_place_and_checked() {
    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }
    let f = Fixture::new(64 << 20);
    let (w, r) = (f.client(), f.client());
    let value = Sample {
        name: "pi".into(),
        values: (0..100_000).collect(),
    };
    w.put_typed(oid(1), &value).unwrap();
    let got = r
        .get_typed::<Sample>(oid(1), Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(got.name.as_str(), "pi");
    assert_eq!(got.values.len(), 100_000);
    assert_eq!(got.values[99_999].to_native(), 99_999);
    assert!(
        r.mapping().contains(&(got.values.as_ptr() as usize)),
        "archived data is read in place"
    );
    let e = r
        .get_typed::<String>(oid(1), Some(Duration::ZERO))
        .err()
        .unwrap();
    assert!(
        matches!(e, object_store::ClientError::WrongType { .. }),
        "{e}"
    );
    // Raw bytes under a typed tag fail validation instead of being trusted.
    w.put(
        oid(2),
        &[0xff; 3],
        format!("rkyv:{}", std::any::type_name::<Sample>()).as_bytes(),
    )
    .unwrap();
    let e = r
        .get_typed::<Sample>(oid(2), Some(Duration::ZERO))
        .err()
        .unwrap();
    assert!(
        matches!(e, object_store::ClientError::Invalid { .. }),
        "{e}"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_the_store_keeps_serving() {
    let f = Fixture::new(8 << 20);
    let c = f.client();
    let e = c.create(oid(1), 9 << 20, 0).err().unwrap();
    assert_eq!(e.kind(), Some("TooLarge"));
    assert!(
        e.to_string().contains("9437184") && e.to_string().contains("8388608"),
        "{e}"
    );
    c.put(oid(1), b"x", b"").unwrap();
    assert_eq!(
        c.put(oid(1), b"x", b"").unwrap_err().kind(),
        Some("AlreadyExists")
    );
    assert!(c.get_one(oid(2), Some(Duration::from_millis(50))).is_err());
    // A batch reports each item: the duplicate fails, the others land.
    let r = c
        .put_many(&[
            (oid(4), b"a", b""),
            (oid(1), b"dup", b""),
            (oid(5), b"b", b"m"),
        ])
        .unwrap();
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    assert_eq!(r[1].as_ref().unwrap_err().kind(), Some("AlreadyExists"));
    assert_eq!(
        c.get_one(oid(5), Some(Duration::ZERO)).unwrap().metadata(),
        b"m"
    );
    let big = vec![0u8; 1 << 20];
    assert_eq!(
        c.put_many(&[(oid(6), &big, b"")]).unwrap_err().kind(),
        Some("TooLarge")
    );
    assert_eq!(
        c.pull(oid(2), "127.0.0.1:1", None).unwrap_err().kind(),
        Some("Unsupported")
    );
    // A writer dropped without sealing aborts its object.
    drop(c.create(oid(3), 100, 0).unwrap());
    assert!(!c.contains(oid(3)).unwrap());
    // Garbage on the socket: an error frame, the connection closed, nothing else disturbed.
    let mut raw = std::os::unix::net::UnixStream::connect(f.socket()).unwrap();
    raw.write_all(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut raw, &mut all).unwrap();
    assert!(String::from_utf8_lossy(&all).contains("Protocol"));
    let mut huge = std::os::unix::net::UnixStream::connect(f.socket()).unwrap();
    huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert!(c.contains(oid(1)).unwrap());
}
