//! Security by default, over real processes and sockets: every listener takes only the right
//! credential; a process holding the cluster token (as all job code does) cannot touch the
//! Raft group; nothing a head decodes can crash it; browsers, other users and a disabled
//! auth mode on a public address are refused.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chaos_tests::driver::Driver;
use chaos_tests::{Cluster, ClusterOptions, rayctl_in, wait_for};
use control_plane::state::Command as Cmd;
use control_plane::types::TypeConfig;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use protocol::auth::{AuthToken, ClientAuth};
use protocol::client::ClientOptions;
use protocol::pb;
use serde_json::Value;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn actor_driver() -> &'static str {
    env!("CARGO_BIN_EXE_actor_driver")
}

/// One HTTP/1.1 request on a fresh connection; (status, whole response).
fn http(
    port: u64,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port as u16))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req += &format!("Host: 127.0.0.1:{port}\r\n");
    }
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let out = String::from_utf8_lossy(&out).into_owned();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {out:?}"))?;
    Ok((code, out))
}

fn code<T>(r: std::result::Result<T, tonic::Status>) -> tonic::Code {
    r.map_or_else(|s| s.code(), |_| tonic::Code::Ok)
}

fn channel(addr: &str) -> Result<tonic::transport::Channel> {
    Ok(protocol::client::channel(addr, &ClientOptions::default())?)
}

fn raft_client(
    addr: &str,
    cred: Option<&str>,
) -> Result<
    pb::raft_client::RaftClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientAuth>,
    >,
> {
    let auth = cred.map(|t| AuthToken::new(t, "test")).transpose()?;
    Ok(
        pb::raft_client::RaftClient::with_interceptor(channel(addr)?, ClientAuth(auth))
            .max_encoding_message_size(64 << 20),
    )
}

/// No process on the machine has `secret` on its command line.
fn no_command_line_holds(secret: &str) -> Result<()> {
    for e in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(secret)
        {
            bail!(
                "process {:?} has the secret on its command line",
                e.file_name()
            );
        }
    }
    Ok(())
}

#[test]
fn every_listener_takes_only_the_right_credential() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let token = c.token.clone().context("the head generated a token")?;
    let peer = std::fs::read_to_string(c.peer_secret_path())?
        .trim()
        .to_owned();
    // A live actor, so a worker's CoreWorker port is there to probe.
    let mut d = Driver::start(actor_driver(), &c, &["hold"], &[])?;
    d.result(Duration::from_secs(120))?;
    let rt = rt();
    let _enter = rt.enter();
    let actors = rt.block_on(
        c.client()
            .call(|mut h| async move { h.list_actors(pb::ListActorsRequest::default()).await }),
    )?;
    let worker = actors
        .actors
        .iter()
        .find(|a| !a.worker_address.is_empty())
        .context("an actor with a worker")?
        .worker_address
        .clone();
    let head_grpc = c.head_addrs[0].clone();
    let node = &c.nodes[0].ready;
    let nm = format!("127.0.0.1:{}", node["node_manager_port"]);
    let om = format!("127.0.0.1:{}", node["object_manager_port"]);
    let vote = postcard::to_allocvec(&VoteRequest::<u64>::new(Vote::new(1, 7), None))?;

    for (what, cred) in [
        ("no token", None),
        ("a wrong token", Some("wrong-token")),
        ("the cluster token", Some(token.as_str())),
    ] {
        let auth = cred.map(|t| AuthToken::new(t, "test")).transpose()?;
        let right = cred == Some(token.as_str());
        let codes = rt.block_on(async {
            let mut cp = pb::control_plane_client::ControlPlaneClient::with_interceptor(
                channel(&head_grpc)?,
                ClientAuth(auth.clone()),
            );
            let mut raft = raft_client(&head_grpc, cred)?;
            let mut n =
                protocol::client::node_manager(&nm, auth.clone(), &ClientOptions::default())?;
            let mut o =
                protocol::client::object_manager(&om, auth.clone(), &ClientOptions::default())?;
            let mut w = pb::core_worker_client::CoreWorkerClient::with_interceptor(
                channel(&worker)?,
                ClientAuth(auth.clone()),
            );
            anyhow::Ok(vec![
                (
                    "head ControlPlane",
                    code(cp.get_cluster_status(pb::GetClusterStatusRequest {}).await),
                    right,
                ),
                // The cluster token never opens Raft.
                (
                    "head Raft",
                    code(raft.vote(pb::RaftMessage { data: vote.clone() }).await),
                    false,
                ),
                (
                    "node NodeManager",
                    code(n.health_check(pb::NodeHealthCheckRequest {}).await),
                    right,
                ),
                (
                    "node ObjectManager",
                    code(
                        o.get_object_info(pb::GetObjectInfoRequest {
                            object_id: vec![9; 20],
                            ..Default::default()
                        })
                        .await,
                    ),
                    right,
                ),
                (
                    "worker CoreWorker",
                    code(
                        w.push_tasks(futures_util::stream::iter(
                            Vec::<pb::PushTasksRequest>::new(),
                        ))
                        .await,
                    ),
                    right,
                ),
            ])
        })?;
        for (listener, got, admitted) in codes {
            if admitted {
                assert_ne!(got, tonic::Code::Unauthenticated, "{listener} with {what}");
            } else {
                assert_eq!(got, tonic::Code::Unauthenticated, "{listener} with {what}");
            }
        }
        let head = &c.heads[0].ready;
        for (listener, port, path) in [
            ("head REST", &head["dashboard_port"], "/api/jobs/"),
            ("head /metrics", &head["dashboard_port"], "/metrics"),
            ("node /metrics", &node["metrics_export_port"], "/metrics"),
        ] {
            let port = port.as_u64().context("port")?;
            let bearer = cred.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = bearer
                .as_deref()
                .map(|b| vec![("Authorization", b)])
                .unwrap_or_default();
            let (got, _) = http(port, "GET", path, &headers, "")?;
            let want = match (cred, right) {
                (None, _) => 401,
                (Some(_), false) => 403,
                (Some(_), true) => 200,
            };
            assert_eq!(got, want, "{listener} with {what}");
        }
    }
    // The peer secret opens Raft (this vote then fails the membership check, not auth).
    let got = rt.block_on(async {
        let mut raft = raft_client(&head_grpc, Some(&peer))?;
        anyhow::Ok(raft.vote(pb::RaftMessage { data: vote }).await)
    })?;
    let e = got.expect_err("raft id 7 is no member");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not a member"), "{e:?}");

    // The token reached the worker through its environment: no command line holds it.
    no_command_line_holds(&token)?;
    no_command_line_holds(&peer)?;
    d.send_line("done")?;
    Ok(())
}

#[test]
fn a_node_dials_only_live_nodes_for_objects_and_binaries() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let head_node = &c.heads[0].ready["node"];
    let worker = &c.nodes[0].ready;
    let other_om = format!("127.0.0.1:{}", worker["object_manager_port"]);
    let store = object_store::StoreClient::connect(
        head_node["object_store_socket"]
            .as_str()
            .context("socket")?,
    )?;
    // A local client's Pull from an address that is no node of the cluster is refused.
    let outsider = std::net::TcpListener::bind("127.0.0.1:0")?;
    let id = protocol::ObjectId::from_bytes([5; 20]);
    let e = store
        .pull(
            id,
            &outsider.local_addr()?.to_string(),
            Some(Duration::from_secs(10)),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("not the object manager of a live node"), "{e}");
    // From a live node it is a real pull (here: of an object that node does not have).
    let reached = wait_for(
        "the other node in the view",
        Duration::from_secs(30),
        || {
            let e = store
                .pull(id, &other_om, Some(Duration::from_secs(10)))
                .err()?
                .to_string();
            (!e.contains("not the object manager")).then_some(e)
        },
    )?;
    assert!(!reached.is_empty());
    // A lease request that names a binary source outside the cluster never makes the node
    // dial it.
    let rt = rt();
    let nm = format!("127.0.0.1:{}", head_node["node_manager_port"]);
    let r = rt.block_on(async {
        let mut n = protocol::client::node_manager(&nm, c.auth(), &ClientOptions::default())?;
        anyhow::Ok(
            n.request_worker_lease(pb::LeaseRequest {
                resources: [("CPU".to_string(), 1.0)].into_iter().collect(),
                binary_sha256: "0".repeat(64),
                binary_source: outsider.local_addr()?.to_string(),
                queue_timeout_ms: 5_000,
                ..Default::default()
            })
            .await,
        )
    })?;
    let e = r.expect_err("the source is no node");
    assert!(e.message().contains("not a live node"), "{e:?}");
    Ok(())
}

/// The leader's raft id, term and last log index, from `rayctl status`.
fn leader_view(c: &Cluster) -> Result<(u64, u64, u64)> {
    let s = c.status(None)?;
    let leader = s["leader"].as_str().context("leader")?;
    let h = s["heads"]
        .as_array()
        .and_then(|a| a.iter().find(|h| h["address"] == leader))
        .context("leader head")?;
    Ok((
        h["raft_id"].as_str().context("raft id")?.parse()?,
        s["term"].as_u64().context("term")?,
        h["last_log_index"].as_u64().unwrap_or(0),
    ))
}

fn log_id(term: u64, node: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

/// An AppendEntries whose one entry is a command batch nested `depth` deep, as bytes (the
/// value itself is never built: dropping it would recurse as deep).
fn nested_append(leader: u64, term: u64, index: u64, depth: usize) -> Result<Vec<u8>> {
    let base = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, leader),
        prev_log_id: Some(log_id(term, leader, index)),
        entries: vec![Entry::<TypeConfig> {
            log_id: log_id(term, leader, index + 1),
            payload: EntryPayload::Normal(Cmd::Batch(Vec::new())),
        }],
        leader_commit: None,
    };
    let bytes = postcard::to_allocvec(&base)?;
    let batch = postcard::to_allocvec(&Cmd::Batch(Vec::new()))?;
    // The request ends with the entry's command (an empty batch), then leader_commit (None).
    let tail: Vec<u8> = batch.iter().copied().chain([0]).collect();
    anyhow::ensure!(bytes.ends_with(&tail), "unexpected encoding");
    let mut out = bytes[..bytes.len() - tail.len()].to_vec();
    for _ in 0..depth {
        out.extend_from_slice(&batch[..batch.len() - 1]);
        out.push(1);
    }
    out.extend_from_slice(&tail);
    Ok(out)
}

fn kv(c: &Cluster, rt: &tokio::runtime::Runtime, key: &str) -> Result<Option<Vec<u8>>> {
    let req = pb::KvGetRequest {
        namespace: "sec".into(),
        key: key.as_bytes().to_vec(),
    };
    match rt.block_on(c.client().call(|mut h| {
        let r = req.clone();
        async move { h.kv_get(r).await }
    })) {
        Ok(r) => Ok(Some(r.value)),
        Err(e) if matches!(e.rpc(), Some(protocol::RpcError::NotFound(_))) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn put(c: &Cluster, rt: &tokio::runtime::Runtime, key: &str, value: &[u8]) -> Result<()> {
    let req = pb::KvPutRequest {
        namespace: "sec".into(),
        key: key.as_bytes().to_vec(),
        value: value.to_vec(),
        overwrite: true,
    };
    rt.block_on(c.client().call(|mut h| {
        let r = req.clone();
        async move { h.kv_put(r).await }
    }))?;
    Ok(())
}

#[test]
fn a_process_holding_the_cluster_token_cannot_touch_the_raft_group() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 3,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let rt = rt();
    let _enter = rt.enter();
    put(&c, &rt, "before", b"1")?;
    // Every head holds the log up to the put, membership included: a head that has no
    // membership yet takes a vote from any sender (it may be joining), so a follower that
    // lags behind would make "a vote from a non-member" pass for the wrong reason.
    chaos_tests::wait_for(
        "every head to hold the log",
        Duration::from_secs(30),
        || {
            let s = c.status(None).ok()?;
            let idx: Vec<u64> = s["heads"]
                .as_array()?
                .iter()
                .map(|h| h["last_log_index"].as_u64())
                .collect::<Option<_>>()?;
            (idx.len() == 3 && idx.iter().all(|&i| i > 0 && i == idx[0])).then_some(())
        },
    )?;
    let token = c.token.clone().context("token")?;
    let peer = std::fs::read_to_string(c.peer_secret_path())?
        .trim()
        .to_owned();
    let (leader, term, last) = leader_view(&c)?;
    let member = c.status(None)?["heads"]
        .as_array()
        .and_then(|a| a.iter().find(|h| h["role"] != "leader"))
        .and_then(|h| h["raft_id"].as_str()?.parse::<u64>().ok())
        .context("a follower")?;
    let vote = |t: u64, from: u64| {
        postcard::to_allocvec(&VoteRequest::<u64>::new(Vote::new(t, from), None))
    };
    let forged = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, leader),
        prev_log_id: Some(log_id(term, leader, last)),
        entries: vec![Entry::<TypeConfig> {
            log_id: log_id(term, leader, last + 1),
            payload: EntryPayload::Normal(Cmd::KvPut {
                namespace: "sec".into(),
                key: b"forged".to_vec(),
                value: b"x".to_vec(),
                overwrite: true,
            }),
        }],
        leader_commit: Some(log_id(term, leader, last + 1)),
    };
    let empty_huge = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1 << 40, leader),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let attacks: Vec<(&str, &str, Vec<u8>)> = vec![
        ("vote at term 1,000,000", "vote", vote(1_000_000, member)?),
        ("vote at term u64::MAX", "vote", vote(u64::MAX, member)?),
        (
            "empty append at a huge term",
            "append",
            postcard::to_allocvec(&empty_huge)?,
        ),
        (
            "append impersonating the leader",
            "append",
            postcard::to_allocvec(&forged)?,
        ),
        (
            "batch nested 1,200 deep",
            "append",
            nested_append(leader, term, last, 1_200)?,
        ),
        (
            "batch nested 100,000 deep",
            "append",
            nested_append(leader, term, last, 100_000)?,
        ),
    ];
    let send = |addr: &str, cred: &str, kind: &str, data: &[u8]| {
        rt.block_on(async {
            let mut r = raft_client(addr, Some(cred))?;
            let msg = pb::RaftMessage {
                data: data.to_vec(),
            };
            anyhow::Ok(match kind {
                "vote" => r.vote(msg).await.map(|_| ()),
                _ => r.append_entries(msg).await.map(|_| ()),
            })
        })
    };
    // With the cluster token, every attack on every head is refused at the door.
    for addr in &c.head_addrs {
        for (what, kind, data) in &attacks {
            let e = send(addr, &token, kind, data)?.expect_err(what);
            assert_eq!(
                e.code(),
                tonic::Code::Unauthenticated,
                "{what} to {addr}: {e:?}"
            );
            assert!(e.message().contains("peer secret"), "{what}: {e:?}");
        }
    }
    // With the peer secret (a head's own credential), what no honest head sends is still
    // refused before openraft sees it: the overflowing term, the nested batches, a sender
    // that is no member.
    let second_wall: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "vote at term u64::MAX",
            "vote",
            vote(u64::MAX, member)?,
            "terms must be below",
        ),
        (
            "vote from a non-member",
            "vote",
            vote(1_000_000, 12_345)?,
            "not a member",
        ),
        (
            "batch nested 1,200 deep",
            "append",
            nested_append(leader, term, last, 1_200)?,
            "malformed",
        ),
        (
            "batch nested 100,000 deep",
            "append",
            nested_append(leader, term, last, 100_000)?,
            "malformed",
        ),
    ];
    for addr in &c.head_addrs {
        for (what, kind, data, why) in &second_wall {
            let e = send(addr, &peer, kind, data)?.expect_err(what);
            assert_eq!(
                e.code(),
                tonic::Code::InvalidArgument,
                "{what} to {addr}: {e:?}"
            );
            assert!(e.message().contains(why), "{what}: {e:?}");
        }
    }
    // No head died; the leader kept its leadership and term.
    for h in &c.heads {
        assert!(
            h.pid().is_some_and(chaos_tests::process_alive),
            "{} died:\n{}",
            h.name,
            h.log_tail()
        );
    }
    let (leader_after, term_after, _) = leader_view(&c)?;
    // No attack moved the term (a forged one would be at 1,000,000 or more); only an
    // election of this loaded machine's own could have, by one or two.
    assert!(term_after <= term + 2, "term {term} → {term_after}");
    if leader_after == leader {
        assert_eq!(term_after, term, "the leader kept its term");
    }
    // The replicas agree: a write after the attacks, then the leader is killed and a former
    // follower leads: it has both writes and nothing forged.
    put(&c, &rt, "after", b"2")?;
    wait_for(
        "every head applied the write",
        Duration::from_secs(30),
        || {
            let s = c.status(None).ok()?;
            let heads = s["heads"].as_array()?;
            let applied: Vec<u64> = heads
                .iter()
                .filter_map(|h| h["last_applied"].as_u64())
                .collect();
            (applied.len() == 3 && applied.iter().all(|a| *a == applied[0])).then_some(())
        },
    )?;
    let old = c.wait_leader(Duration::from_secs(30))?;
    c.heads[old].kill9();
    let new = c.wait_leader(Duration::from_secs(30))?;
    assert_ne!(new, old);
    assert_eq!(kv(&c, &rt, "before")?, Some(b"1".to_vec()));
    assert_eq!(kv(&c, &rt, "after")?, Some(b"2".to_vec()));
    assert_eq!(kv(&c, &rt, "forged")?, None);
    Ok(())
}

#[test]
fn browsers_are_no_way_in() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let port = c.heads[0].ready["dashboard_port"]
        .as_u64()
        .context("port")?;
    let bearer = format!("Bearer {}", c.token.as_deref().context("token")?);
    let auth = ("Authorization", bearer.as_str());
    let job = r#"{"entrypoint": "id"}"#;
    // The ShadowRay request: text/plain, as any web page can send. Without the token it is
    // 401; even with it the body type is refused (415), so nothing ran.
    let (got, _) = http(
        port,
        "POST",
        "/api/jobs/",
        &[("Content-Type", "text/plain")],
        job,
    )?;
    assert_eq!(got, 401);
    let (got, body) = http(
        port,
        "POST",
        "/api/jobs/",
        &[auth, ("Content-Type", "text/plain")],
        job,
    )?;
    assert_eq!(got, 415, "{body}");
    let (got, _) = http(
        port,
        "POST",
        "/api/jobs/",
        &[auth, ("Content-Type", "application/x-www-form-urlencoded")],
        "entrypoint=id",
    )?;
    assert_eq!(got, 415);
    let (_, list) = http(port, "GET", "/api/jobs/", &[auth], "")?;
    assert!(list.ends_with("[]"), "no job was submitted: {list}");
    // DNS rebinding (a name the attacker points at 127.0.0.1) and cross-site origins.
    let (got, body) = http(
        port,
        "GET",
        "/api/jobs/",
        &[auth, ("Host", "evil.example:8265")],
        "",
    )?;
    assert_eq!(got, 403, "{body}");
    assert!(body.contains("evil.example"), "{body}");
    let (got, _) = http(
        port,
        "GET",
        "/api/jobs/",
        &[auth, ("Origin", "http://evil.example")],
        "",
    )?;
    assert_eq!(got, 403);
    let own = format!("http://127.0.0.1:{port}");
    let (got, _) = http(
        port,
        "GET",
        "/api/jobs/",
        &[auth, ("Origin", own.as_str())],
        "",
    )?;
    assert_eq!(got, 200, "the dashboard's own origin");
    // Ray's other header, and the dashboard login's cookie in place of any header.
    let (got, _) = http(
        port,
        "GET",
        "/api/jobs/",
        &[("X-Ray-Authorization", bearer.as_str())],
        "",
    )?;
    assert_eq!(got, 200);
    let (got, resp) = http(port, "POST", "/api/authenticate", &[auth], "")?;
    assert_eq!(got, 200, "{resp}");
    let cookie = resp
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .context("a cookie")?
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().context("cookie pair")?.to_owned();
    let (got, _) = http(port, "GET", "/api/jobs/", &[("Cookie", pair.as_str())], "")?;
    assert_eq!(got, 200);
    let (got, _) = http(
        port,
        "GET",
        "/api/jobs/",
        &[("Cookie", "ray-authentication-token=nope")],
        "",
    )?;
    assert_eq!(got, 403);
    let (got, _) = http(
        port,
        "POST",
        "/api/authenticate",
        &[("Authorization", "Bearer nope")],
        "",
    )?;
    assert_eq!(got, 403);
    // A JSON submission with the token works (Ray's client), and so does a body-less stop.
    let (got, body) = http(
        port,
        "POST",
        "/api/jobs/",
        &[auth, ("Content-Type", "application/json")],
        r#"{"entrypoint": "sleep 30", "submission_id": "sec-1"}"#,
    )?;
    assert_eq!(got, 200, "{body}");
    let (got, body) = http(port, "POST", "/api/jobs/sec-1/stop", &[auth], "")?;
    assert_eq!(got, 200, "{body}");
    // One validation rule for submission ids, on the head.
    let (got, body) = http(
        port,
        "POST",
        "/api/jobs/",
        &[auth, ("Content-Type", "application/json")],
        r#"{"entrypoint": "true", "submission_id": ".."}"#,
    )?;
    assert_eq!(got, 400, "{body}");
    assert!(body.contains("submission_id"), "{body}");
    Ok(())
}

fn as_nobody(args: &[&str]) -> Result<std::process::Output> {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args)
        .output()
        .context("setpriv (util-linux) is needed")
}

const CONNECT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT", e.__class__.__name__)
    sys.exit(0)
data = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
print("READ", data.decode("utf-8", "replace"))
"#;

#[test]
fn another_user_cannot_use_the_store_or_plant_a_session_dir() -> Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "this test switches to uid 65534 and needs root (CI runs as root)"
    );
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        ..Default::default()
    })?;
    let sock = c.heads[0].ready["node"]["object_store_socket"]
        .as_str()
        .context("socket")?
        .to_owned();
    let path = std::path::Path::new(&sock);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(path)?, 0o600);
    assert_eq!(mode(path.parent().context("dir")?)?, 0o700);
    let out = as_nobody(&["/usr/bin/python3", "-c", CONNECT, &sock])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("CONNECT PermissionError"),
        "{text} {:?}",
        out.stderr
    );
    // Past the file modes (opened up here by root), the store still checks who connects.
    for p in path.ancestors().skip(1) {
        if p.starts_with(c.path()) {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let out = as_nobody(&["/usr/bin/python3", "-c", CONNECT, &sock])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("READ") && text.contains("serves only uid"),
        "{text} {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The owner still gets in.
    object_store::StoreClient::connect(&sock)?;

    // A session root another user made (or anyone can write) is refused, with a reason.
    let planted = c.path().join("planted");
    std::fs::create_dir(&planted)?;
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534))?;
    let out = rayctl_in(c.path())?
        .args(["status", "--timeout", "1s"])
        .env("RAYCTL_TMPDIR", &planted)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("owned by uid 65534"), "{err}");
    let shared = c.path().join("shared");
    std::fs::create_dir(&shared)?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777))?;
    let out = rayctl_in(c.path())?
        .args(["status", "--timeout", "1s"])
        .env("RAYCTL_TMPDIR", &shared)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("others can write"), "{err}");
    Ok(())
}

#[test]
fn disabled_auth_is_loud_and_never_public_by_accident() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = |args: &[&str]| {
        rayctl_in(tmp.path())?
            .args(args)
            .output()
            .map_err(anyhow::Error::from)
    };
    let out = run(&[
        "start",
        "--head",
        "--block",
        "--auth-mode",
        "disabled",
        "--bind-host",
        "0.0.0.0",
        "--port",
        "0",
        "--dashboard-port",
        "0",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--allow-unauthenticated-remote"), "{err}");
    // On loopback it starts, warns, and serves without a token.
    let ready = tmp.path().join("ready.json");
    let log = std::fs::File::create(tmp.path().join("head.log"))?;
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let head = Kill(
        rayctl_in(tmp.path())?
            .args([
                "start",
                "--head",
                "--block",
                "--auth-mode",
                "disabled",
                "--port",
                "0",
                "--dashboard-port",
                "0",
            ])
            .arg(format!("--ready-file={}", ready.display()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let pid = head.0.id() as i32;
    let v: Value = wait_for("the head", Duration::from_secs(60), || {
        serde_json::from_slice(&std::fs::read(&ready).ok()?).ok()
    })?;
    let port = v["dashboard_port"].as_u64().context("port")?;
    let (got, _) = http(port, "GET", "/api/jobs/", &[], "")?;
    assert_eq!(got, 200);
    let logged = std::fs::read_to_string(tmp.path().join("head.log"))?;
    assert!(logged.contains("WARNING: --auth-mode disabled"), "{logged}");
    assert!(!tmp.path().join("auth_token").exists(), "no token is made");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    Ok(())
}
