//! Hostile clients for every listener of a cluster, shared by the chaos runner's scenarios
//! and the tests: raw gRPC calls carrying bytes a real client never sends (garbage,
//! truncated messages, wrong wire types, nesting, oversize frames, floods of streams), the
//! credential matrix (none, wrong, right) on every port, and the resident memory of a
//! process.
//!
//! Each probe returns what it saw; the caller decides what is acceptable.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Buf, BufMut};
use protocol::auth::{AuthToken, ClientAuth};
use protocol::client::ClientOptions;
use protocol::pb;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// A codec that sends and receives message bytes as they are, so a probe can put anything
/// in a gRPC frame.
#[derive(Default, Clone)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// One unary call of `path` (e.g. `/rayctl.v1.ControlPlane/KvPut`) whose message is `bytes`.
pub async fn raw_call(
    ch: Channel,
    token: Option<&str>,
    path: &'static str,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch).max_encoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(bytes);
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}")
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("token"))?,
        );
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(req, path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// The listeners of a cluster, as `host:port`.
#[derive(Debug, Clone, Default)]
pub struct Listeners {
    /// The heads' gRPC ports (ControlPlane, Raft and Ray's GCS answers share them).
    pub heads: Vec<String>,
    pub node_managers: Vec<String>,
    pub object_managers: Vec<String>,
    /// The nodes' bulk object transfer ports (plain TCP, `object_store::bulk`).
    pub bulk: Vec<String>,
    /// HTTP endpoints: (what, host:port, path).
    pub http: Vec<(String, String, String)>,
}

/// What the probes saw: answers by gRPC code, and the answers that break the rules.
#[derive(Debug, Default)]
pub struct Seen {
    pub codes: BTreeMap<String, usize>,
    pub bad: Vec<String>,
    pub calls: usize,
}

impl Seen {
    fn answer(&mut self, what: &str, r: &Result<Vec<u8>, tonic::Status>, allowed: &[tonic::Code]) {
        self.calls += 1;
        let code = r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        *self.codes.entry(format!("{code:?}")).or_default() += 1;
        match r {
            Err(s) if !allowed.contains(&s.code()) => {
                self.bad.push(format!(
                    "{what}: {:?} {:?} (allowed: {allowed:?})",
                    s.code(),
                    s.message()
                ));
            }
            Err(s) if s.message().trim().is_empty() => {
                self.bad
                    .push(format!("{what}: {:?} with no message", s.code()));
            }
            Ok(_) if !allowed.contains(&tonic::Code::Ok) => {
                self.bad.push(format!("{what}: answered OK"));
            }
            _ => {}
        }
    }
}

fn xorshift(seed: &mut u64) -> u8 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed as u8
}

/// Protobuf bytes of `depth` nested length-delimited fields 1 around an empty one.
fn nested(depth: usize) -> Vec<u8> {
    let mut b = Vec::new();
    for _ in 0..depth {
        let mut outer = vec![0x0a];
        prost::encoding::encode_varint(b.len() as u64, &mut outer);
        outer.extend_from_slice(&b);
        b = outer;
    }
    b
}

/// Writes `n` connections' worth of random bytes at `addr` (no HTTP/2 preface).
pub fn garbage(addr: &str, n: usize, seed: &mut u64) -> usize {
    let mut sent = 0;
    for _ in 0..n {
        let Ok(mut s) = TcpStream::connect_timeout(
            &match addr.parse() {
                Ok(a) => a,
                Err(_) => return sent,
            },
            Duration::from_secs(1),
        ) else {
            continue;
        };
        let bytes: Vec<u8> = (0..4096).map(|_| xorshift(seed)).collect();
        if s.write_all(&bytes).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Bad gRPC on one listener with the right token: truncated messages, wrong wire types,
/// deep nesting, a 5 MiB message, a frame that claims 1 GiB, unknown ids, and `streams`
/// concurrent calls. `paths` are (method path, a valid message's bytes).
pub async fn bad_grpc(
    addr: &str,
    token: &str,
    paths: &[(&'static str, Vec<u8>)],
    streams: usize,
    seen: &mut Seen,
) -> Result<()> {
    use tonic::Code::{
        FailedPrecondition, Internal, InvalidArgument, NotFound, ResourceExhausted, Unavailable,
    };
    let ok = tonic::Code::Ok;
    let opts = ClientOptions {
        rpc_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let ch = protocol::client::channel(addr, &opts)?;
    for (path, valid) in paths {
        let what = |k: &str| format!("{addr}{path} {k}");
        // Every prefix of a valid message that cuts a field short.
        for cut in [1, valid.len() / 2, valid.len().saturating_sub(1)] {
            if cut == 0 || cut >= valid.len() {
                continue;
            }
            let r = raw_call(ch.clone(), Some(token), path, valid[..cut].to_vec()).await;
            seen.answer(
                &what(&format!("truncated to {cut} bytes")),
                &r,
                &[InvalidArgument, NotFound, FailedPrecondition, ok],
            );
        }
        // Field 1 as a 64-bit fixed where a string is expected; field 2 as a group start;
        // bytes that are no varint. Some of these are well-formed unknown fields to a message
        // that lacks field 2 (or any field): decoded, such a call is answered as an empty
        // request is (a follower's NOT_LEADER included), and for a fieldless one, OK.
        let lenient: &[tonic::Code] = if valid.is_empty() {
            &[InvalidArgument, NotFound, FailedPrecondition, ok]
        } else {
            &[InvalidArgument, NotFound, FailedPrecondition]
        };
        for bytes in [
            vec![0x09, 1, 2, 3, 4, 5, 6, 7, 8],
            vec![0x13, 0x14],
            vec![0xff; 12],
        ] {
            let r = raw_call(ch.clone(), Some(token), path, bytes).await;
            seen.answer(&what("wrong wire type"), &r, lenient);
        }
        let r = raw_call(ch.clone(), Some(token), path, nested(5000)).await;
        seen.answer(&what("5000 levels of nesting"), &r, lenient);
        // 5 MiB of field 15 (an unknown field): within the message limit, so the server
        // decodes it, skips the field and answers by the rest (here: empty fields).
        let mut big = vec![0x7a];
        prost::encoding::encode_varint(5 << 20, &mut big);
        big.resize(big.len() + (5 << 20), b'x');
        let r = raw_call(ch.clone(), Some(token), path, big).await;
        seen.answer(
            &what("5 MiB unknown field"),
            &r,
            &[
                InvalidArgument,
                NotFound,
                ResourceExhausted,
                FailedPrecondition,
                ok,
            ],
        );
    }
    // A frame header that claims 1 GiB, then nothing: refused by size before any is read.
    if let Some((path, _)) = paths.first() {
        let mut fake = Vec::new();
        fake.put_u8(0);
        fake.put_u32(1 << 30);
        let r = tokio::time::timeout(Duration::from_secs(20), raw_frame(addr, token, path, fake))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in 20 s")));
        seen.answer(
            &format!("{addr}{path} 1 GiB frame"),
            &r,
            &[ResourceExhausted, Internal],
        );
    }
    // A flood of concurrent calls on one connection.
    if let Some((path, valid)) = paths.first() {
        let calls = (0..streams).map(|_| raw_call(ch.clone(), Some(token), path, valid.clone()));
        let results = futures_util::future::join_all(calls).await;
        for r in &results {
            seen.answer(
                &format!("{addr}{path} one of {streams} concurrent calls"),
                r,
                &[
                    ok,
                    NotFound,
                    InvalidArgument,
                    FailedPrecondition,
                    ResourceExhausted,
                    Unavailable,
                ],
            );
        }
    }
    Ok(())
}

/// Sends one HTTP/2 gRPC request whose body is `body` exactly (frame header included), over
/// a fresh connection.
async fn raw_frame(
    addr: &str,
    token: &str,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    // The raw codec adds its own 5-byte header; to send a header that lies, hand-build the
    // request at the HTTP/2 layer through tonic's channel as a streaming body.
    let mut svc = protocol::client::channel(addr, &ClientOptions::default())
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    tower::ServiceExt::<tonic::codegen::http::Request<tonic::body::Body>>::ready(&mut svc)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let req = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(body),
        )))
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let resp = tower::Service::call(&mut svc, req)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    // The status is in the headers (trailers-only) or the trailers.
    if let Some(s) = tonic::Status::from_header_map(resp.headers()) {
        return if s.code() == tonic::Code::Ok {
            Ok(Vec::new())
        } else {
            Err(s)
        };
    }
    let collected = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    match collected
        .trailers()
        .and_then(tonic::Status::from_header_map)
    {
        Some(s) if s.code() != tonic::Code::Ok => Err(s),
        _ => Ok(Vec::new()),
    }
}

/// The credential matrix: every gRPC listener and HTTP endpoint with no token, a wrong one
/// and the right one. Returns the violations (an empty list passes). The cluster token must
/// never open Raft.
pub async fn auth_matrix(l: &Listeners, token: &str) -> Result<Vec<String>> {
    use tonic::Code::Unauthenticated;
    let mut bad = Vec::new();
    let vote = pb::RaftMessage { data: vec![0; 8] };
    for (what, cred) in [
        ("no token", None),
        ("a wrong token", Some("wrong-token")),
        ("the cluster token", Some(token)),
    ] {
        let right = cred == Some(token);
        let auth = cred.map(|t| AuthToken::new(t, "probe")).transpose()?;
        let opts = ClientOptions::default();
        let mut checks: Vec<(String, tonic::Code, bool)> = Vec::new();
        for h in &l.heads {
            let ch = protocol::client::channel(h, &opts)?;
            let mut cp = pb::control_plane_client::ControlPlaneClient::with_interceptor(
                ch.clone(),
                ClientAuth(auth.clone()),
            );
            let c = cp
                .head_info(pb::HeadInfoRequest {})
                .await
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            checks.push((format!("{h} ControlPlane"), c, right));
            let mut raft =
                pb::raft_client::RaftClient::with_interceptor(ch, ClientAuth(auth.clone()));
            let c = raft
                .vote(vote.clone())
                .await
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            checks.push((format!("{h} Raft"), c, false));
        }
        for n in &l.node_managers {
            let mut nm = protocol::client::node_manager(n, auth.clone(), &opts)?;
            let c = nm
                .health_check(pb::NodeHealthCheckRequest {})
                .await
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            checks.push((format!("{n} NodeManager"), c, right));
        }
        for o in &l.object_managers {
            let mut om = protocol::client::object_manager(o, auth.clone(), &opts)?;
            let c = om
                .get_object_info(pb::GetObjectInfoRequest {
                    object_id: vec![9; 20],
                    ..Default::default()
                })
                .await
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            checks.push((format!("{o} ObjectManager"), c, right));
        }
        // The bulk port answers its hello: accepted with the cluster token only.
        for b in &l.bulk {
            let got = object_store::bulk::BulkConn::connect(b, auth.as_ref()).await;
            if got.is_ok() != right {
                bad.push(format!(
                    "{b} object transfer with {what}: {} (want {})",
                    got.map_or_else(|e| e.to_string(), |_| "accepted".into()),
                    if right { "accepted" } else { "refused" }
                ));
            }
        }
        for (listener, got, admitted) in checks {
            if admitted == (got == Unauthenticated) {
                bad.push(format!(
                    "{listener} with {what}: {got:?} (want {})",
                    if admitted {
                        "anything but Unauthenticated"
                    } else {
                        "Unauthenticated"
                    }
                ));
            }
        }
        for (name, addr, path) in &l.http {
            let got = http_status(addr, path, cred).with_context(|| format!("{name} {addr}"))?;
            let want = match (cred, right) {
                (None, _) => 401,
                (Some(_), false) => 403,
                (Some(_), true) => 200,
            };
            if got != want {
                bad.push(format!(
                    "{name} {addr}{path} with {what}: HTTP {got} (want {want})"
                ));
            }
        }
    }
    Ok(bad)
}

/// The status of `GET path` at `addr`, with a bearer token if given.
pub fn http_status(addr: &str, path: &str, token: Option<&str>) -> Result<u16> {
    let mut req = ureq::get(&format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    match req.config().http_status_as_error(false).build().call() {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(e.into()),
    }
}

/// Resident memory of process `pid` in bytes (VmRSS), None if it is gone.
pub fn rss(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A zip of `files` (name, bytes) and symlinks (name, target), names as given (`../x` and
/// `/abs` included).
pub fn zip_archive(files: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o = zip::write::SimpleFileOptions::default();
    for (n, d) in files {
        z.start_file(*n, o).expect("zip");
        z.write_all(d).expect("zip");
    }
    for (n, t) in links {
        z.add_symlink(*n, *t, o).expect("zip");
    }
    z.finish().expect("zip").into_inner()
}

/// 1.1 GiB of zeros in a few MiB: more than a node unpacks.
pub fn zip_bomb() -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    z.start_file("zeros", o).expect("zip");
    let block = vec![0u8; 1 << 20];
    for _ in 0..1100 {
        z.write_all(&block).expect("zip");
    }
    z.finish().expect("zip").into_inner()
}

/// `n` empty entries: a bomb by count.
pub fn zip_many_entries(n: usize) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..n {
        z.start_file(format!("e{i}"), o).expect("zip");
    }
    z.finish().expect("zip").into_inner()
}
