//! The object store as the node daemons host it: a client in this process puts an object
//! into one node's store over its Unix socket, asks another node to pull it over loopback
//! through the object managers, and reads it there; both nodes report it in /metrics.

use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::{Cluster, ClusterOptions};
use object_store::StoreClient;
use protocol::ObjectId;

const TOKEN: &str = "objects-test-token";

fn metrics(port: &serde_json::Value) -> Result<String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    Ok(ureq::get(&url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .call()?
        .body_mut()
        .read_to_string()?)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    chaos_tests::find_metric(text, name)
}

#[test]
fn an_object_put_on_one_node_is_pulled_and_read_on_another() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        token: Some(TOKEN.into()),
        ..Default::default()
    })?;
    let head_node = &c.heads[0].ready["node"];
    let worker = &c.nodes[0].ready;
    let sock_a = head_node["object_store_socket"]
        .as_str()
        .context("head node socket")?;
    let sock_b = worker["object_store_socket"]
        .as_str()
        .context("worker socket")?;
    let om_a = format!("127.0.0.1:{}", head_node["object_manager_port"]);
    // Default settings: each store may grow to 30 % of RAM but reserves nothing until used.
    assert!(head_node["object_store_memory"].as_u64().unwrap() >= 64 << 20);

    let a = StoreClient::connect(sock_a)?;
    let b = StoreClient::connect(sock_b)?;
    let id = ObjectId::from_bytes([0x42; 20]);
    let data: Vec<u8> = (0..(48u64 << 20) + 7)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 11) as u8)
        .collect();
    a.put(id, &data, b"meta")?;
    assert!(!b.contains(id)?);
    b.pull(id, &om_a, Some(Duration::from_secs(120)))?;
    let v = b.get_one(id, Some(Duration::ZERO))?;
    assert_eq!(
        crc32fast::hash(v.data()),
        crc32fast::hash(&data),
        "checksums differ after transfer"
    );
    assert_eq!(v.metadata(), b"meta");
    assert!(b.mapping().contains(&(v.data().as_ptr() as usize)));

    // Pulling from a node that lacks the object is a clear error.
    let e = a
        .pull(
            ObjectId::from_bytes([1; 20]),
            &format!("127.0.0.1:{}", worker["object_manager_port"]),
            Some(Duration::from_secs(30)),
        )
        .unwrap_err();
    assert!(e.to_string().contains("not on this node"), "{e}");

    // Both daemons publish the store's state and the transfer.
    let res = chaos_tests::wait_for("object store metrics", Duration::from_secs(30), || {
        let ma = metrics(&head_node["metrics_export_port"]).ok()?;
        let mb = metrics(&worker["metrics_export_port"]).ok()?;
        let used_b = metric(&mb, "ray_object_store_used_memory")?;
        let sent = metric(
            &ma,
            "rayctl_object_transfer_bytes_total{direction=\"sent\"}",
        )?;
        let got = metric(
            &mb,
            "rayctl_object_transfer_bytes_total{direction=\"received\"}",
        )?;
        (used_b >= (48 << 20) as f64 && sent >= (48 << 20) as f64 && got >= (48 << 20) as f64)
            .then_some(())
    });
    if res.is_err() {
        eprintln!(
            "head node:\n{}\nworker:\n{}",
            metrics(&head_node["metrics_export_port"])?,
            metrics(&worker["metrics_export_port"])?
        );
    }
    res
}
