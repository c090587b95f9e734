//! `rayctl list`, `rayctl summary` and `rayctl memory`: the cluster's state as Ray's state
//! API shows it. Actors and placement groups come from the control plane; tasks and objects
//! from every live node (owners report their tasks to their node; each node knows its store).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb;
use serde_json::{Value, json};

use crate::cli::{ClientArgs, ListArgs, ListKind, MemoryArgs, Output, SummaryArgs, SummaryKind};
use crate::status::client;

fn actor_state(s: i32) -> &'static str {
    match pb::ActorState::try_from(s) {
        Ok(pb::ActorState::PendingCreation) => "PENDING_CREATION",
        Ok(pb::ActorState::Alive) => "ALIVE",
        Ok(pb::ActorState::Restarting) => "RESTARTING",
        Ok(pb::ActorState::Dead) => "DEAD",
        _ => "UNKNOWN",
    }
}

fn pg_state(s: i32) -> &'static str {
    match pb::PlacementGroupState::try_from(s) {
        Ok(pb::PlacementGroupState::Pending) => "PENDING",
        Ok(pb::PlacementGroupState::Created) => "CREATED",
        Ok(pb::PlacementGroupState::Rescheduling) => "RESCHEDULING",
        Ok(pb::PlacementGroupState::Removed) => "REMOVED",
        _ => "UNKNOWN",
    }
}

fn pg_strategy(s: i32) -> &'static str {
    match pb::PlacementStrategy::try_from(s) {
        Ok(pb::PlacementStrategy::Pack) => "PACK",
        Ok(pb::PlacementStrategy::Spread) => "SPREAD",
        Ok(pb::PlacementStrategy::StrictPack) => "STRICT_PACK",
        Ok(pb::PlacementStrategy::StrictSpread) => "STRICT_SPREAD",
        _ => "UNKNOWN",
    }
}

fn sorted(m: &std::collections::HashMap<String, f64>) -> BTreeMap<String, f64> {
    m.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

fn actor_json(a: &pb::ActorInfo) -> Value {
    json!({
        "actor_id": a.actor_id, "class_name": a.class_name, "state": actor_state(a.state),
        "name": a.name, "namespace": a.namespace, "job_id": a.job_id, "node_id": a.node_id,
        "pid": a.pid, "worker_id": a.worker_id, "num_restarts": a.num_restarts,
        "max_restarts": a.max_restarts, "detached": a.detached, "message": a.message,
        "resources": sorted(&a.resources),
    })
}

fn pg_json(p: &pb::PlacementGroupInfo) -> Value {
    json!({
        "placement_group_id": p.pg_id, "name": p.name, "state": pg_state(p.state),
        "strategy": pg_strategy(p.strategy), "job_id": p.job_id, "detached": p.detached,
        "bundles": p.bundles.iter().map(|b| sorted(&b.resources)).collect::<Vec<_>>(),
        "bundle_nodes": p.bundle_node_ids, "message": p.message,
    })
}

fn task_json(t: &pb::TaskEvent) -> Value {
    json!({
        "task_id": t.task_id, "name": t.function, "state": protocol::task_state_name(t.state()), "actor_id": t.actor_id,
        "node_id": t.node_id, "worker_id": t.worker_id, "attempt": t.attempt, "job_id": t.job_id,
        "error": t.error, "owner_pid": t.owner_pid,
    })
}

/// Parses `KEY=VALUE` / `KEY!=VALUE`.
fn parse_filters(f: &[String]) -> anyhow::Result<Vec<(String, bool, String)>> {
    f.iter()
        .map(|s| {
            if let Some((k, v)) = s.split_once("!=") {
                Ok((k.trim().to_owned(), false, v.trim().to_owned()))
            } else if let Some((k, v)) = s.split_once('=') {
                Ok((k.trim().to_owned(), true, v.trim().to_owned()))
            } else {
                bail!("bad filter {s:?}: use KEY=VALUE or KEY!=VALUE")
            }
        })
        .collect()
}

fn field(v: &Value, k: &str) -> Option<String> {
    match v.get(k)? {
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn keep(v: &Value, filters: &[(String, bool, String)]) -> anyhow::Result<bool> {
    for (k, eq, want) in filters {
        let Some(got) = field(v, k) else {
            let keys: Vec<&String> = v
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            bail!("no field {k:?} to filter on; the fields are {keys:?}")
        };
        if (got.eq_ignore_ascii_case(want)) != *eq {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The node manager addresses of the live nodes.
async fn live_nodes(c: &HeadClient) -> anyhow::Result<Vec<(String, String)>> {
    let s = c
        .call(|mut c| async move { c.get_cluster_status(pb::GetClusterStatusRequest {}).await })
        .await
        .context("cannot get the cluster status")?;
    Ok(s.nodes
        .into_iter()
        .filter(|n| n.state == pb::NodeState::Alive as i32)
        .map(|n| (n.node_id, n.address))
        .collect())
}

fn node_client(addr: &str, args: &ClientArgs) -> anyhow::Result<protocol::client::NmClient> {
    let token = AuthToken::load(args.auth_token_file.as_deref())?;
    let opts = ClientOptions {
        rpc_timeout: args.timeout,
        ..Default::default()
    };
    Ok(protocol::client::node_manager(addr, token, &opts)?)
}

/// Every live node's task table, merged (each task is reported by its owner's node only).
async fn all_tasks(
    c: &HeadClient,
    args: &ClientArgs,
) -> anyhow::Result<(Vec<pb::TaskEvent>, u64, Vec<String>)> {
    let mut tasks = Vec::new();
    let (mut dropped, mut unreachable) = (0, Vec::new());
    for (id, addr) in live_nodes(c).await? {
        match node_client(&addr, args)?
            .list_tasks(pb::ListTasksRequest {})
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                dropped += r.dropped;
                tasks.extend(r.tasks);
            }
            Err(e) => unreachable.push(format!("{id} ({addr}): {}", e.message())),
        }
    }
    tasks.sort_by(|a, b| (a.time_ms, &a.task_id).cmp(&(b.time_ms, &b.task_id)));
    Ok((tasks, dropped, unreachable))
}

async fn all_objects(
    c: &HeadClient,
    args: &ClientArgs,
) -> anyhow::Result<(Vec<pb::ListObjectsReply>, Vec<String>)> {
    let (mut out, mut unreachable) = (Vec::new(), Vec::new());
    for (id, addr) in live_nodes(c).await? {
        match node_client(&addr, args)?
            .list_objects(pb::ListObjectsRequest {})
            .await
        {
            Ok(r) => out.push(r.into_inner()),
            Err(e) => unreachable.push(format!("{id} ({addr}): {}", e.message())),
        }
    }
    Ok((out, unreachable))
}

fn warn_unreachable(u: &[String]) {
    for n in u {
        eprintln!("warning: node {n} did not answer; its rows are missing");
    }
}

fn print_table(rows: &[Value], cols: &[&str]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| {
                    // One line per row: newlines (a panic's location, then its message)
                    // become spaces; long cells are cut (`-o json` has them whole).
                    field(r, c)
                        .map(|s| {
                            s.chars()
                                .map(|ch| if ch.is_control() { ' ' } else { ch })
                                .take(60)
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in cells {
        println!("{}", line(r));
    }
}

pub(crate) async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let filters = parse_filters(&args.filters)?;
    let c = client(&args.client)?;
    let (rows, cols): (Vec<Value>, &[&str]) = match args.kind {
        ListKind::Actors => {
            let r = c
                .call(|mut c| async move { c.list_actors(pb::ListActorsRequest {}).await })
                .await
                .context("cannot list actors")?;
            (
                r.actors.iter().map(actor_json).collect(),
                &[
                    "actor_id",
                    "class_name",
                    "state",
                    "name",
                    "node_id",
                    "pid",
                    "num_restarts",
                    "message",
                ],
            )
        }
        ListKind::PlacementGroups => {
            let r = c
                .call(|mut c| async move {
                    c.list_placement_groups(pb::ListPlacementGroupsRequest {})
                        .await
                })
                .await
                .context("cannot list placement groups")?;
            (
                r.placement_groups.iter().map(pg_json).collect(),
                &["placement_group_id", "name", "state", "strategy", "message"],
            )
        }
        ListKind::Tasks => {
            let (tasks, dropped, unreachable) = all_tasks(&c, &args.client).await?;
            warn_unreachable(&unreachable);
            if dropped > 0 {
                eprintln!(
                    "warning: {dropped} task events were dropped (owners reporting faster than their nodes keep)"
                );
            }
            (
                tasks.iter().map(task_json).collect(),
                &[
                    "task_id", "name", "state", "node_id", "attempt", "actor_id", "error",
                ],
            )
        }
        ListKind::Objects => {
            let (nodes, unreachable) = all_objects(&c, &args.client).await?;
            warn_unreachable(&unreachable);
            let rows = nodes
                .iter()
                .flat_map(|n| {
                    n.objects.iter().map(|o| {
                        json!({
                            "object_id": o.object_id, "node_id": n.node_id, "size": o.size,
                            "copy": if o.primary { "PRIMARY" } else { "SECONDARY" }, "pins": o.pins,
                            "location": if o.in_memory { "MEMORY" } else if o.spilled { "SPILLED" } else { "NONE" },
                            "sealed": o.sealed, "owner_prefix": &o.object_id[..22.min(o.object_id.len())],
                        })
                    })
                })
                .collect();
            (
                rows,
                &["object_id", "node_id", "size", "copy", "pins", "location"],
            )
        }
    };
    let mut kept = Vec::new();
    for r in rows {
        if keep(&r, &filters)? {
            kept.push(r);
        }
    }
    let total = kept.len();
    kept.truncate(args.limit);
    match args.client.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&kept)?),
        Output::Text => {
            print_table(&kept, cols);
            if total > kept.len() {
                eprintln!(
                    "({} of {total} rows shown; raise --limit for more)",
                    kept.len()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn summary(args: SummaryArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.client)?;
    match args.kind {
        SummaryKind::Tasks => {
            let (tasks, _, unreachable) = all_tasks(&c, &args.client).await?;
            warn_unreachable(&unreachable);
            // function → state → count
            let mut by: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
            for t in &tasks {
                *by.entry(t.function.clone())
                    .or_default()
                    .entry(protocol::task_state_name(t.state()).to_owned())
                    .or_default() += 1;
            }
            match args.client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"total": tasks.len(), "by_name": by}))?
                ),
                Output::Text => {
                    println!("{} tasks", tasks.len());
                    let rows: Vec<Value> = by
                        .iter()
                        .map(|(f, states)| {
                            let s: Vec<String> = states.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                            json!({"name": f, "total": states.values().sum::<u64>(), "states": s.join(", ")})
                        })
                        .collect();
                    print_table(&rows, &["name", "total", "states"]);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn memory(args: MemoryArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.client)?;
    let (nodes, unreachable) = all_objects(&c, &args.client).await?;
    warn_unreachable(&unreachable);
    let v: Vec<Value> = nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id, "used_bytes": n.used_bytes, "capacity_bytes": n.capacity_bytes,
                "pinned_bytes": n.pinned_bytes, "spilled_bytes": n.spilled_bytes,
                "objects": n.objects.len(),
                "primary_copies": n.objects.iter().filter(|o| o.primary).count(),
                "pinned_objects": n.objects.iter().filter(|o| o.pins > 0).count(),
                "processes": n.processes.iter().map(|p| json!({
                    "pid": p.pid, "worker_id": p.worker_id, "job_id": p.job_id,
                    "owner_prefix": p.owner_prefix, "objects_owned": p.objects_owned,
                    "tasks_running": p.tasks_running,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    match args.client.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Text => {
            for n in &v {
                println!(
                    "node {}: {} of {} bytes used, {} pinned, {} spilled; {} objects ({} primary copies, {} pinned)",
                    n["node_id"].as_str().unwrap_or(""),
                    n["used_bytes"],
                    n["capacity_bytes"],
                    n["pinned_bytes"],
                    n["spilled_bytes"],
                    n["objects"],
                    n["primary_copies"],
                    n["pinned_objects"]
                );
                let procs: Vec<Value> = n["processes"].as_array().cloned().unwrap_or_default();
                if !procs.is_empty() {
                    print_table(
                        &procs,
                        &[
                            "pid",
                            "worker_id",
                            "job_id",
                            "objects_owned",
                            "tasks_running",
                        ],
                    );
                }
                println!();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One Chrome-trace "complete" event per task that ended (pushed to its worker → finished or
/// failed), on a track per node (`pid`) and worker (`tid`).
pub(crate) fn trace_events(tasks: &[pb::TaskEvent]) -> Vec<Value> {
    tasks
        .iter()
        .filter(|t| t.end_ms > 0)
        .map(|t| {
            let start = if t.start_ms > 0 {
                t.start_ms
            } else {
                t.created_ms
            };
            let start = start.min(t.end_ms);
            json!({
                "cat": if t.actor_id.is_empty() { "task" } else { "actor_task" },
                "name": t.function,
                "ph": "X",
                "ts": start * 1000,
                "dur": (t.end_ms - start) * 1000,
                "pid": format!("node {}", t.node_id.get(..8).unwrap_or(&t.node_id)),
                "tid": format!("worker {}", t.worker_id),
                "args": {
                    "task_id": t.task_id, "state": protocol::task_state_name(t.state()), "attempt": t.attempt,
                    "job_id": t.job_id, "actor_id": t.actor_id, "error": t.error,
                },
            })
        })
        .collect()
}

pub(crate) async fn timeline(args: crate::cli::TimelineArgs) -> anyhow::Result<ExitCode> {
    let client_args = ClientArgs {
        address: args.address.clone(),
        auth_token_file: args.auth_token_file.clone(),
        timeout: args.timeout,
        output: crate::cli::Output::Text,
    };
    let c = client(&client_args)?;
    let (tasks, _, unreachable) = all_tasks(&c, &client_args).await?;
    warn_unreachable(&unreachable);
    let events = trace_events(&tasks);
    let text = serde_json::to_string(&events)?;
    match args.output.as_deref() {
        Some(p) if p == std::path::Path::new("-") => println!("{text}"),
        out => {
            let path = out.map(std::path::Path::to_path_buf).unwrap_or_else(|| {
                let now = std::time::SystemTime::now();
                std::path::PathBuf::from(format!(
                    "rayctl-timeline-{}.json",
                    humantime::format_rfc3339_seconds(now)
                        .to_string()
                        .replace(':', "-")
                ))
            });
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "{} task(s) written to {}: open it in chrome://tracing or https://ui.perfetto.dev",
                events.len(),
                path.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_fields_and_reject_unknown_ones() {
        let row = json!({"state": "ALIVE", "num_restarts": 1});
        let f = parse_filters(&["state=alive".into(), "num_restarts!=0".into()]).unwrap();
        assert!(keep(&row, &f).unwrap());
        let f = parse_filters(&["state=DEAD".into()]).unwrap();
        assert!(!keep(&row, &f).unwrap());
        assert!(keep(&row, &parse_filters(&["nope=1".into()]).unwrap()).is_err());
        assert!(parse_filters(&["state".into()]).is_err());
    }
}
