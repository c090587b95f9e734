//! The leader's resource view reaches every node with its heartbeat replies: each node learns
//! the others' resources, and a dead node leaves every view.

use std::time::Duration;

use anyhow::Result;
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use protocol::client::ClientOptions;
use protocol::pb;

fn view(
    c: &Cluster,
    rt: &tokio::runtime::Runtime,
    node_manager_port: &serde_json::Value,
) -> Option<Vec<pb::NodeResources>> {
    let addr = format!("127.0.0.1:{node_manager_port}");
    rt.block_on(async {
        let mut nm =
            protocol::client::node_manager(&addr, c.auth(), &ClientOptions::default()).ok()?;
        nm.get_cluster_view(pb::GetClusterViewRequest {}).await.ok()
    })
    .map(|r| r.into_inner().cluster_view)
}

#[test]
fn nodes_learn_each_others_resources_and_forget_dead_ones() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 2,
        ..Default::default()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let n0 = c.nodes[0].ready["node_manager_port"].clone();
    let n1_id = c.nodes[1].ready["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    wait_for(
        "node 0 to see all three nodes and node 1's resource",
        Duration::from_secs(30),
        || {
            let v = view(&c, &rt, &n0)?;
            let n1 = v.iter().find(|n| n.node_id == n1_id)?;
            (v.len() == 3
                && n1.total.get("node1") == Some(&1.0)
                && n1.available.get("node1") == Some(&1.0))
            .then_some(())
        },
    )?;
    c.nodes[1].kill9();
    wait_for(
        "node 0 to forget the dead node",
        Duration::from_secs(30),
        || {
            let v = view(&c, &rt, &n0)?;
            (v.len() == 2 && v.iter().all(|n| n.node_id != n1_id)).then_some(())
        },
    )?;
    Ok(())
}
