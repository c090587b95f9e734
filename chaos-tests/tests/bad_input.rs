//! Bad input on every port: clear errors, and the servers keep serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Result;
use chaos_tests::{Cluster, ClusterOptions};
use protocol::RpcError;
use protocol::client::{ClientError, ClientOptions};
use protocol::pb;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn rpc_err(e: ClientError) -> RpcError {
    match e {
        ClientError::Rpc(e) => e,
        other => panic!("expected an RPC error, got {other}"),
    }
}

fn http_get(port: u64, path: &str, token: Option<&str>) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port as u16))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn garbage_oversize_and_unknown_ids_get_clear_errors() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let rt = rt();
    let _enter = rt.enter();
    let client = c.client_for(
        &c.head_addrs,
        ClientOptions {
            deadline: Duration::from_secs(5),
            ..Default::default()
        },
    );

    // Random bytes on the gRPC port, several times: the server drops the connection and lives.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    eprintln!("garbage seed {seed:#x}");
    for _ in 0..20 {
        let mut s = TcpStream::connect(&c.head_addrs[0])?;
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = s.write_all(&bytes);
    }

    // Oversize message: RESOURCE_EXHAUSTED.
    let big = pb::KvPutRequest {
        namespace: "t".into(),
        key: b"k".to_vec(),
        value: vec![7; 20 * 1024 * 1024],
        overwrite: true,
    };
    let ch = protocol::client::channel(&c.head_addrs[0], &ClientOptions::default())?;
    let mut raw = pb::control_plane_client::ControlPlaneClient::with_interceptor(
        ch,
        protocol::auth::ClientAuth(c.auth()),
    )
    .max_encoding_message_size(64 * 1024 * 1024);
    let err = rt.block_on(raw.kv_put(big)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // Over the KV's own value limit but under the message limit: RESOURCE_EXHAUSTED too.
    let mid = pb::KvPutRequest {
        namespace: "t".into(),
        key: b"k".to_vec(),
        value: vec![7; 2 * 1024 * 1024],
        overwrite: true,
    };
    let e = rt
        .block_on(client.call(|mut c| {
            let r = mid.clone();
            async move { c.kv_put(r).await }
        }))
        .unwrap_err();
    assert!(matches!(rpc_err(e), RpcError::ResourceExhausted(_)));

    // A message cut short, and one with a field of the wrong wire type: INVALID_ARGUMENT
    // naming the message (prost's own answer would be INTERNAL).
    for bytes in [vec![0x0a, 5, b'a'], vec![0x09, 1, 2, 3, 4, 5, 6, 7, 8]] {
        let ch = protocol::client::channel(&c.head_addrs[0], &ClientOptions::default())?;
        let e = rt
            .block_on(chaos_tests::probe::raw_call(
                ch,
                c.token.as_deref(),
                "/rayctl.v1.ControlPlane/KvPut",
                bytes,
            ))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("KvPutRequest"), "{e:?}");
    }

    // Unknown and malformed ids.
    let unknown = "ab".repeat(16);
    let e = rt
        .block_on(client.call(|mut c| {
            let id = unknown.clone();
            async move { c.get_node(pb::GetNodeRequest { node_id: id }).await }
        }))
        .unwrap_err();
    assert!(matches!(rpc_err(e), RpcError::NotFound(_)));
    let e = rt
        .block_on(client.call(|mut c| async move {
            c.get_node(pb::GetNodeRequest {
                node_id: "xyz".into(),
            })
            .await
        }))
        .unwrap_err();
    match rpc_err(e) {
        RpcError::InvalidArgument(m) => {
            assert!(m.contains("xyz"), "the error names the bad value: {m}")
        }
        other => panic!("{other}"),
    }
    let hb = pb::HeartbeatRequest {
        node_id: unknown.clone(),
        incarnation: 1,
        ..Default::default()
    };
    let e = rt
        .block_on(client.call(|mut c| {
            let r = hb.clone();
            async move { c.heartbeat(r).await }
        }))
        .unwrap_err();
    assert!(matches!(rpc_err(e), RpcError::NotFound(_)));
    let reg = pb::RegisterNodeRequest {
        node_id: unknown.clone(),
        address: "127.0.0.1:1".into(),
        resources_total: [("CPU".to_string(), -1.0)].into(),
        ..Default::default()
    };
    let e = rt
        .block_on(client.call(|mut c| {
            let r = reg.clone();
            async move { c.register_node(r).await }
        }))
        .unwrap_err();
    assert!(matches!(rpc_err(e), RpcError::InvalidArgument(_)));
    let reg = pb::RegisterNodeRequest {
        node_id: unknown,
        address: "no-port".into(),
        ..Default::default()
    };
    let e = rt
        .block_on(client.call(|mut c| {
            let r = reg.clone();
            async move { c.register_node(r).await }
        }))
        .unwrap_err();
    assert!(matches!(rpc_err(e), RpcError::InvalidArgument(_)));
    let e = rt
        .block_on(client.call(|mut c| async move {
            c.kv_get(pb::KvGetRequest {
                namespace: "t".into(),
                key: b"missing".to_vec(),
            })
            .await
        }))
        .unwrap_err();
    assert!(matches!(rpc_err(e), RpcError::NotFound(_)));
    let e = rt
        .block_on(client.call(|mut c| async move {
            c.raft_remove_peer(pb::RaftRemovePeerRequest {
                address: "127.0.0.1:9".into(),
            })
            .await
        }))
        .unwrap_err();
    // Membership changes take the heads' peer secret, which the cluster token is not.
    let e = rpc_err(e);
    assert!(
        matches!(&e, RpcError::Unauthenticated(m) if m.contains("peer secret")),
        "{e:?}"
    );

    // Still serving.
    let s = c.status(None)?;
    assert_eq!(s["leader"], c.head_addrs[0].as_str());
    // rayctl exit codes: unknown cluster → 3.
    let (code, _, err) = c.rayctl(&["status", "--address", "127.0.0.1:1", "--timeout", "300ms"])?;
    assert_eq!(code, 3, "{err}");
    let (code, _, _) = c.rayctl(&[
        "start",
        "--head",
        "--peers",
        "127.0.0.1:1,127.0.0.1:2",
        "--port",
        "5",
    ])?;
    assert_ne!(code, 0);
    Ok(())
}

#[test]
fn a_cluster_token_is_required_on_every_port() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        token: Some("s3cret-token".into()),
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let rt = rt();
    let _enter = rt.enter();
    // Without the token: UNAUTHENTICATED on the head and on the node.
    let ch = protocol::client::channel(&c.head_addrs[0], &ClientOptions::default())?;
    let mut raw = pb::control_plane_client::ControlPlaneClient::new(ch);
    let e = rt
        .block_on(raw.get_cluster_status(pb::GetClusterStatusRequest {}))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = rt
        .block_on(raw.head_info(pb::HeadInfoRequest {}))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let nm_port = c.nodes[0].ready["node_manager_port"].as_u64().unwrap();
    let mut nm = protocol::client::node_manager(
        &format!("127.0.0.1:{nm_port}"),
        None,
        &ClientOptions::default(),
    )?;
    let e = rt
        .block_on(nm.health_check(pb::NodeHealthCheckRequest {}))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut nm = protocol::client::node_manager(
        &format!("127.0.0.1:{nm_port}"),
        c.auth(),
        &ClientOptions::default(),
    )?;
    let ok = rt
        .block_on(nm.health_check(pb::NodeHealthCheckRequest {}))?
        .into_inner();
    assert_eq!(ok.node_id, c.nodes[0].ready["node_id"].as_str().unwrap());
    // HTTP: 401 without, 200 with.
    let dash = c.heads[0].ready["dashboard_port"].as_u64().unwrap();
    assert!(http_get(dash, "/metrics", None)?.starts_with("HTTP/1.1 401"));
    let m = http_get(dash, "/metrics", Some("s3cret-token"))?;
    assert!(
        m.starts_with("HTTP/1.1 200") && m.contains("rayctl_raft_term"),
        "{m}"
    );
    // With the token (RAYCTL_AUTH_TOKEN for rayctl) everything works.
    let s = c.status(None)?;
    assert_eq!(Cluster::nodes_in_state(&s, "ALIVE").len(), 2);
    Ok(())
}
