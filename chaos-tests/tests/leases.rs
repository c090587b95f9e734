//! Worker leases over real node daemons: spillback to the node that has the resource, bounded
//! hops, queueing until a lease is returned, timeouts, infeasible requests, and the queued and
//! infeasible demand reported to the control plane (what the autoscaler will read).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use protocol::client::ClientOptions;
use protocol::pb;

fn req(resources: &[(&str, f64)], timeout_ms: u64, hops: u32) -> pb::LeaseRequest {
    pb::LeaseRequest {
        resources: resources
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<HashMap<_, _>>(),
        strategy: pb::SchedulingStrategy::Hybrid as i32,
        spillback_count: hops,
        queue_timeout_ms: timeout_ms,
        ..Default::default()
    }
}

async fn lease(c: &Cluster, addr: &str, r: pb::LeaseRequest) -> Result<pb::LeaseReply> {
    let opts = ClientOptions {
        rpc_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let mut nm = protocol::client::node_manager(addr, c.auth(), &opts)?;
    Ok(nm.request_worker_lease(r).await?.into_inner())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Worker node `i`'s id and node manager address.
fn node(c: &Cluster, i: usize) -> Result<(String, String)> {
    let field = |k: &str| {
        c.nodes[i].ready[k]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("node {i}'s {k}"))
    };
    Ok((field("node_id")?, field("address")?))
}

fn outcome(r: &pb::LeaseReply) -> pb::LeaseOutcome {
    pb::LeaseOutcome::try_from(r.outcome).unwrap_or(pb::LeaseOutcome::Unspecified)
}

#[test]
fn leases_spill_back_queue_time_out_and_report_demand() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 2,
        ..Default::default()
    })?;
    let rt = runtime()?;
    let head_node = format!(
        "127.0.0.1:{}",
        c.heads[0].ready["node"]["node_manager_port"]
    );
    let (n1_id, n1) = node(&c, 1)?;
    // The head's node learns the others' resources through the leader.
    wait_for(
        "the head's node to know node 1",
        Duration::from_secs(30),
        || {
            let r = rt
                .block_on(lease(&c, &head_node, req(&[("node1", 1.0)], 0, 0)))
                .ok()?;
            (outcome(&r) == pb::LeaseOutcome::Spillback).then_some(r)
        },
    )
    .map(|r| {
        assert_eq!(
            (r.node_id.as_str(), r.address.as_str()),
            (n1_id.as_str(), n1.as_str())
        )
    })?;

    // Node 1 grants it; a second one waits and times out, a third waits until the first is back.
    let first = rt.block_on(lease(&c, &n1, req(&[("node1", 1.0)], 0, 1)))?;
    assert_eq!(outcome(&first), pb::LeaseOutcome::Granted);
    let second = rt.block_on(lease(&c, &n1, req(&[("node1", 1.0)], 200, 1)))?;
    assert_eq!(outcome(&second), pb::LeaseOutcome::TimedOut, "{second:?}");
    let waiting = {
        let n1 = n1.clone();
        let r = req(&[("node1", 1.0)], 30_000, 1);
        let auth = c.auth();
        rt.spawn(async move {
            let mut nm = protocol::client::node_manager(
                &n1,
                auth,
                &ClientOptions {
                    rpc_timeout: Duration::from_secs(60),
                    ..Default::default()
                },
            )?;
            anyhow::Ok(nm.request_worker_lease(r).await?.into_inner())
        })
    };
    // While it waits, the leader hears of the queued shape; an infeasible one is reported too.
    let gpu = rt.block_on(lease(&c, &head_node, req(&[("GPU", 1.0)], 0, 0)))?;
    assert_eq!(outcome(&gpu), pb::LeaseOutcome::Infeasible);
    assert!(gpu.message.contains("GPU"), "{}", gpu.message);
    wait_for(
        "the demand in rayctl status",
        Duration::from_secs(30),
        || {
            let s = c.status(None).ok()?;
            let d = s["pending_demand"].as_array()?;
            let queued = d
                .iter()
                .any(|x| x["shape"]["node1"] == 1.0 && x["queued"] == 1);
            let infeasible = d.iter().any(|x| {
                x["shape"]["GPU"] == 1.0 && x["infeasible"].as_u64().is_some_and(|n| n >= 1)
            });
            // Node 1's lease shows in its available resources.
            let node = s["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["node_id"] == n1_id.as_str())?
                .clone();
            let busy = node["resources_available"]["node1"].is_null();
            (queued && infeasible && busy).then_some(())
        },
    )?;
    let back = rt.block_on(async {
        let mut nm = protocol::client::node_manager(&n1, c.auth(), &ClientOptions::default())?;
        anyhow::Ok(
            nm.return_worker_lease(pb::ReturnLeaseRequest {
                lease_id: first.lease_id.clone(),
            })
            .await?
            .into_inner(),
        )
    })?;
    assert!(back.returned);
    let third = rt.block_on(waiting)??;
    assert_eq!(outcome(&third), pb::LeaseOutcome::Granted, "{third:?}");
    // Returning twice frees nothing.
    let again = rt.block_on(async {
        let mut nm = protocol::client::node_manager(&n1, c.auth(), &ClientOptions::default())?;
        anyhow::Ok(
            nm.return_worker_lease(pb::ReturnLeaseRequest {
                lease_id: first.lease_id.clone(),
            })
            .await?
            .into_inner(),
        )
    })?;
    assert!(!again.returned);

    // Past the hop limit the node asked last keeps what it can run, even if another node
    // would be preferred; what it can never run stays infeasible.
    let kept = rt.block_on(lease(&c, &head_node, req(&[("CPU", 1.0)], 5_000, 100)))?;
    assert_eq!(outcome(&kept), pb::LeaseOutcome::Granted, "{kept:?}");
    let never = rt.block_on(lease(&c, &head_node, req(&[("node1", 1.0)], 0, 100)))?;
    assert_eq!(outcome(&never), pb::LeaseOutcome::Infeasible);
    // Bad input.
    let bad = rt.block_on(lease(&c, &head_node, req(&[("CPU", -1.0)], 0, 0)));
    assert!(bad.is_err_and(|e| e.to_string().contains("CPU")));
    Ok(())
}

/// A `StartActor` whose caller goes away mid-start (a leader that died) must not strand the
/// actor's lease. Here the actor's binary comes from a "node" that takes connections and
/// never answers (as a frozen node does), the call is cancelled after 300 ms, while the node
/// holds the lease and waits for the binary, and the node gives the lease back once that
/// fetch fails (about 10 s here: the HTTP/2 handshake fails).
#[test]
fn a_start_actor_cancelled_mid_start_gives_its_lease_back() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    let rt = runtime()?;
    let (n0_id, n0) = node(&c, 0)?;
    let status_of = |c: &Cluster| -> Option<serde_json::Value> {
        let s = c.status(None).ok()?;
        s["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["node_id"] == n0_id.as_str() && n["state"] == "ALIVE")
            .cloned()
    };
    // A resource fully in use is left out of the available ones.
    let free = |c: &Cluster| {
        Some(
            status_of(c)?["resources_available"]["node0"]
                .as_f64()
                .unwrap_or(0.0),
        )
    };
    let incarnation = wait_for(
        "node 0 with its resource free",
        Duration::from_secs(60),
        || {
            let n = status_of(&c)?;
            (n["resources_available"]["node0"] == 1.0).then_some(n["incarnation"].as_u64()?)
        },
    )?;

    // The binary's source must be a live node of the cluster (a node fetches binaries from
    // nowhere else): register the silent listener as one, a node that accepts connections and
    // never answers, as a frozen node does, and keep it alive with heartbeats.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let fake = silent.local_addr()?.to_string();
    let _enter = rt.enter();
    let head = c.client();
    let fake_id = "fa".repeat(16);
    let reg = pb::RegisterNodeRequest {
        node_id: fake_id.clone(),
        address: fake.clone(),
        ..Default::default()
    };
    let fake_inc = rt
        .block_on(head.call(|mut h| {
            let r = reg.clone();
            async move { h.register_node(r).await }
        }))?
        .incarnation;
    let beating = rt.spawn(async move {
        loop {
            let hb = pb::HeartbeatRequest {
                node_id: fake_id.clone(),
                incarnation: fake_inc,
                ..Default::default()
            };
            let _ = head
                .call(|mut h| {
                    let hb = hb.clone();
                    async move { h.heartbeat(hb).await }
                })
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    wait_for(
        "node 0 to see the silent node",
        Duration::from_secs(30),
        || {
            let view = rt
                .block_on(async {
                    let mut nm =
                        protocol::client::node_manager(&n0, c.auth(), &ClientOptions::default())?;
                    anyhow::Ok(
                        nm.get_cluster_view(pb::GetClusterViewRequest {})
                            .await?
                            .into_inner(),
                    )
                })
                .ok()?;
            view.cluster_view
                .iter()
                .any(|n| n.address == fake)
                .then_some(())
        },
    )?;
    let class = "nowhere::Nothing".to_string();
    let req = pb::StartActorRequest {
        actor_id: "ab".repeat(16),
        num_restarts: 0,
        node_incarnation: incarnation,
        job_id: String::new(),
        spec: Some(pb::ActorSpec {
            class_name: class.clone(),
            constructor: Some(pb::TaskSpec {
                task_id: vec![0; 20],
                function: class,
                ..Default::default()
            }),
            resources: [("node0".to_string(), 1.0)].into_iter().collect(),
            binary_sha256: "0".repeat(64),
            binary_source: fake.clone(),
            max_concurrency: 1,
            ..Default::default()
        }),
    };
    let opts = ClientOptions {
        rpc_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let r = rt.block_on(async {
        let mut nm = protocol::client::node_manager(&n0, c.auth(), &opts)?;
        anyhow::Ok(nm.start_actor(req).await)
    })?;
    assert!(
        r.is_err(),
        "its binary never comes, so it cannot start: {r:?}"
    );
    wait_for("the lease to be taken", Duration::from_secs(30), || {
        (free(&c)? == 0.0).then_some(())
    })?;
    wait_for(
        "the lease to be given back once the fetch fails",
        Duration::from_secs(120),
        || (free(&c)? == 1.0).then_some(()),
    )?;
    beating.abort();
    drop(silent);
    Ok(())
}
