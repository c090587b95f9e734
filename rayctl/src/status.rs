//! `rayctl status` and `rayctl operator raft …`: clients of the control plane.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use control_plane::cluster_view::{NODE_TYPE_LABEL, status_json};
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb;
use serde_json::json;

use crate::cli::{ClientArgs, Output, RaftCommand};

pub(crate) fn client(args: &ClientArgs) -> anyhow::Result<HeadClient> {
    let token = AuthToken::load(args.auth_token_file.as_deref())?;
    let heads = crate::session::resolve_heads(args.address.as_deref(), token.as_ref())?;
    let opts = ClientOptions {
        deadline: args.timeout,
        ..Default::default()
    };
    Ok(HeadClient::new(&heads, token, opts)?)
}

/// A client for membership changes: they take the heads' peer secret, not the cluster token.
fn peer_client(args: &ClientArgs, file: Option<&std::path::Path>) -> anyhow::Result<HeadClient> {
    let token = AuthToken::load(args.auth_token_file.as_deref())
        .ok()
        .flatten();
    let heads = crate::session::resolve_heads(args.address.as_deref(), token.as_ref())?;
    let secret = protocol::auth::load_peer_secret(file, false).context(
        "membership changes need the heads' peer secret: run this on a head's machine or pass --peer-secret-file",
    )?;
    let opts = ClientOptions {
        deadline: args.timeout,
        ..Default::default()
    };
    Ok(HeadClient::new(&heads, Some(secret), opts)?)
}

fn sorted(m: &std::collections::HashMap<String, f64>) -> BTreeMap<String, f64> {
    m.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

fn fmt_shape(m: &std::collections::HashMap<String, f64>) -> String {
    let parts: Vec<String> = sorted(m)
        .iter()
        .map(|(k, v)| format!("'{k}': {}", fmt_amount(k, *v)))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn fmt_amount(name: &str, v: f64) -> String {
    if name == "memory" || name.ends_with("memory") {
        bytesize::ByteSize::b(v as u64).to_string()
    } else {
        format!("{v}")
    }
}

fn status_text(s: &pb::ClusterStatus) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "======== Cluster status ========");
    let _ = writeln!(
        o,
        "Leader: {} (term {}, commit index {})",
        s.leader, s.term, s.commit_index
    );
    let _ = writeln!(
        o,
        "Heads\n---------------------------------------------------------------"
    );
    for h in &s.heads {
        let p = h.ports.unwrap_or_default();
        let _ = writeln!(
            o,
            " {:<22} {:<11} applied {:<8} dashboard :{}",
            h.address, h.role, h.last_applied, p.dashboard_port
        );
    }
    let alive: Vec<_> = s
        .nodes
        .iter()
        .filter(|n| n.state == pb::NodeState::Alive as i32)
        .collect();
    let dead: Vec<_> = s
        .nodes
        .iter()
        .filter(|n| n.state != pb::NodeState::Alive as i32)
        .collect();
    if let Some(a) = s.autoscaler.as_ref().filter(|a| a.enabled) {
        let _ = writeln!(
            o,
            "======== Autoscaler status: {} UTC ========",
            clock(a.last_round_ms)
        );
    }
    let _ = writeln!(
        o,
        "Node status\n---------------------------------------------------------------"
    );
    let line = |n: &pb::NodeInfo| {
        let kind = match (n.is_head, n.labels.get(NODE_TYPE_LABEL)) {
            (true, _) => "head ".to_owned(),
            (false, Some(t)) => format!("{t} "),
            _ => String::new(),
        };
        format!(
            " 1 {kind}node_{} {} (incarnation {})",
            n.node_id, n.address, n.incarnation
        )
    };
    let (idle, active): (Vec<&pb::NodeInfo>, Vec<&pb::NodeInfo>) =
        alive.iter().copied().partition(|n| n.idle_ms.is_some());
    let _ = writeln!(o, "Active:");
    for n in &active {
        let _ = writeln!(
            o,
            "{}{}",
            line(n),
            if n.draining { ", draining" } else { "" }
        );
    }
    if active.is_empty() {
        let _ = writeln!(o, " (no active nodes)");
    }
    let _ = writeln!(o, "Idle:");
    for n in &idle {
        let _ = writeln!(
            o,
            "{}, idle {:.0}s{}",
            line(n),
            n.idle_ms.unwrap_or(0) as f64 / 1000.0,
            if n.draining { ", draining" } else { "" }
        );
    }
    if idle.is_empty() {
        let _ = writeln!(o, " (no idle nodes)");
    }
    if let Some(a) = s.autoscaler.as_ref().filter(|a| a.enabled) {
        let _ = writeln!(o, "Pending:");
        let pending: Vec<_> = a
            .instances
            .iter()
            .filter(|i| matches!(i.state.as_str(), "QUEUED" | "REQUESTED" | "ALLOCATED"))
            .collect();
        let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for i in &pending {
            by_type.entry(&i.node_type).or_default().push(&i.state);
        }
        for (t, states) in &by_type {
            let _ = writeln!(
                o,
                " {t}, {} launching ({})",
                states.len(),
                states.join(", ")
            );
        }
        if pending.is_empty() {
            let _ = writeln!(o, " (no pending nodes)");
        }
        let stopping: Vec<_> = a
            .instances
            .iter()
            .filter(|i| {
                matches!(
                    i.state.as_str(),
                    "RAY_STOP_REQUESTED" | "RAY_STOPPING" | "TERMINATING"
                )
            })
            .collect();
        if !stopping.is_empty() {
            let _ = writeln!(o, "Stopping:");
            for i in stopping {
                let _ = writeln!(
                    o,
                    " {}, {} ({}): {}",
                    i.node_type, i.instance_id, i.state, i.message
                );
            }
        }
        let _ = writeln!(o, "Recent failures:");
        let newest = a.instances.iter().map(|i| i.updated_ms).max().unwrap_or(0);
        let failures: Vec<_> = a
            .instances
            .iter()
            .filter(|i| {
                matches!(
                    i.state.as_str(),
                    "ALLOCATION_FAILED" | "ALLOCATION_TIMEOUT" | "TERMINATION_FAILED"
                )
            })
            .filter(|i| newest.saturating_sub(i.updated_ms) < 10 * 60 * 1000)
            .collect();
        let mut latest: BTreeMap<&str, &pb::AutoscalerInstance> = BTreeMap::new();
        for i in &failures {
            let e = latest.entry(&i.node_type).or_insert(i);
            if i.updated_ms > e.updated_ms {
                *e = i;
            }
        }
        for (t, i) in &latest {
            let what = i.message.split(':').next().unwrap_or("LaunchFailed");
            let _ = writeln!(
                o,
                " {t}: {what} (latest_attempt: {}, {} in 10 min): {}",
                clock(i.updated_ms),
                failures.iter().filter(|f| f.node_type == *t).count(),
                i.message
            );
        }
        if failures.is_empty() {
            let _ = writeln!(o, " (no failures)");
        }
        if !a.last_error.is_empty() {
            let _ = writeln!(o, "Autoscaler: {}", a.last_error);
        }
    }
    let _ = writeln!(o, "Dead:");
    for n in &dead {
        let _ = writeln!(o, " 1 node_{} {}: {}", n.node_id, n.address, n.death_reason);
    }
    if dead.is_empty() {
        let _ = writeln!(o, " (no dead nodes)");
    }
    let mut total: BTreeMap<String, f64> = BTreeMap::new();
    let mut avail: BTreeMap<String, f64> = BTreeMap::new();
    for n in &alive {
        for (k, v) in &n.resources_total {
            *total.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &n.resources_available {
            *avail.entry(k.clone()).or_default() += v;
        }
    }
    let _ = writeln!(
        o,
        "Resources\n---------------------------------------------------------------\nUsage:"
    );
    for (k, t) in &total {
        let used = t - avail.get(k).copied().unwrap_or(0.0);
        let _ = writeln!(o, " {}/{} {k}", fmt_amount(k, used), fmt_amount(k, *t));
    }
    if let Some(a) = s.autoscaler.as_ref().filter(|a| a.enabled) {
        let _ = writeln!(o, "Constraints:");
        let mut floor: BTreeMap<String, usize> = BTreeMap::new();
        for b in &a.constraints {
            *floor.entry(fmt_shape(&b.resources)).or_default() += 1;
        }
        for (shape, k) in &floor {
            let _ = writeln!(o, " {shape}: {k} from request_resources()");
        }
        if floor.is_empty() {
            let _ = writeln!(o, " (no request_resources() constraints)");
        }
    }
    let _ = writeln!(o, "Demands:");
    for d in &s.pending_demand {
        let shape: Vec<String> = sorted(&d.shape)
            .iter()
            .map(|(k, v)| format!("{k}: {}", fmt_amount(k, *v)))
            .collect();
        let _ = writeln!(
            o,
            " {{{}}} {}: {} queued, {} infeasible",
            shape.join(", "),
            match d.kind.strip_prefix("placement_group:") {
                Some(strategy) => format!("placement group ({strategy})"),
                None => d.kind.clone(),
            },
            d.queued,
            d.infeasible
        );
    }
    if s.pending_demand.is_empty() {
        let _ = writeln!(o, " (no resource demands)");
    }
    if let Some(a) = s.autoscaler.as_ref().filter(|a| a.enabled) {
        for d in &a.infeasible {
            let _ = writeln!(
                o,
                " {}: {} infeasible: no node type of the autoscaling config can hold it",
                fmt_shape(&d.shape),
                d.queued
            );
        }
        for d in &a.held_back {
            let _ = writeln!(
                o,
                " {}: {} waiting: max_workers, upscaling_speed or a launch backoff holds it back",
                fmt_shape(&d.shape),
                d.queued
            );
        }
    }
    o
}

pub(crate) async fn status(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args)?;
    let s = c
        .call(|mut c| async move { c.get_cluster_status(pb::GetClusterStatusRequest {}).await })
        .await
        .context("cannot get the cluster status")?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status_json(&s))?),
        Output::Text => print!("{}", status_text(&s)),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_peers(p: &pb::RaftPeers, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let v = json!({
                "term": p.term,
                "leader": p.leader,
                "peers": p.peers.iter().map(|x| json!({
                    "raft_id": x.raft_id.to_string(),
                    "address": x.address,
                    "voter": x.voter,
                    "leader": x.leader,
                    "matched_index": x.matched_index,
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            println!(
                "{:<22} {:<20} {:<8} {:<8} Matched",
                "Address", "ID", "Voter", "Leader"
            );
            for x in &p.peers {
                println!(
                    "{:<22} {:<20} {:<8} {:<8} {}",
                    x.address,
                    x.raft_id,
                    x.voter,
                    x.leader,
                    x.matched_index.map_or("-".to_string(), |m| m.to_string())
                );
            }
        }
    }
    Ok(())
}

pub(crate) async fn raft(cmd: RaftCommand) -> anyhow::Result<ExitCode> {
    let (args, peers) = match cmd {
        RaftCommand::ListPeers(args) => {
            let c = client(&args)?;
            let p = c
                .call(|mut c| async move { c.raft_list_peers(pb::RaftListPeersRequest {}).await })
                .await?;
            (args, p)
        }
        RaftCommand::AddPeer {
            peer,
            learner,
            peer_secret_file,
            client: args,
        } => {
            let mut args = args;
            // Catching up a new head can take a while.
            args.timeout = args.timeout.max(std::time::Duration::from_secs(30));
            let c = peer_client(&args, peer_secret_file.as_deref())?;
            let opts = ClientOptions {
                rpc_timeout: args.timeout,
                deadline: args.timeout,
                ..Default::default()
            };
            let c = c.with_options(opts);
            let req = pb::RaftAddPeerRequest {
                address: peer,
                learner_only: learner,
            };
            let p = c
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.raft_add_peer(r).await }
                })
                .await?;
            (args, p)
        }
        RaftCommand::RemovePeer {
            peer,
            peer_secret_file,
            client: args,
        } => {
            let c = peer_client(&args, peer_secret_file.as_deref())?;
            let req = pb::RaftRemovePeerRequest { address: peer };
            let p = c
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.raft_remove_peer(r).await }
                })
                .await?;
            (args, p)
        }
    };
    print_peers(&peers, args.output)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demands_name_what_waits() {
        let demand = |kind: &str, queued, infeasible| pb::ResourceDemand {
            shape: [("CPU".to_string(), 2.0)].into_iter().collect(),
            queued,
            infeasible,
            kind: kind.into(),
        };
        let s = pb::ClusterStatus {
            pending_demand: vec![
                demand("task", 3, 0),
                demand("actor", 0, 1),
                demand("placement_group:STRICT_SPREAD", 2, 0),
            ],
            ..Default::default()
        };
        let text = status_text(&s);
        assert!(
            text.contains(" {CPU: 2} task: 3 queued, 0 infeasible"),
            "{text}"
        );
        assert!(
            text.contains(" {CPU: 2} actor: 0 queued, 1 infeasible"),
            "{text}"
        );
        assert!(
            text.contains(" {CPU: 2} placement group (STRICT_SPREAD): 2 queued, 0 infeasible"),
            "{text}"
        );
        assert!(!text.contains("no resource demands"), "{text}");
        let empty = status_text(&pb::ClusterStatus::default());
        assert!(empty.contains("(no resource demands)"), "{empty}");
    }
}
