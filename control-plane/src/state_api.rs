//! Ray's State API on every head's HTTP port (`GET /api/v0/{resource}` and
//! `GET /api/v0/{tasks,actors,objects}/summarize`), so Ray's own `ray list`, `ray get` and
//! `ray summary` work against our heads unchanged.
//!
//! Contract (Ray 2.60, `python/ray/util/state/common.py` and `dashboard/state_api_utils.py`):
//! - query: `limit` (default 100, at most 10,000), `timeout` (s), `detail`,
//!   `filter_keys` / `filter_predicates` (`=`, `!=`) / `filter_values` as parallel repeated
//!   parameters, `exclude_driver` (workers);
//! - reply: `{"result": true, "msg": "", "data": {"result": {"total", "num_after_truncation",
//!   "num_filtered", "result": [rows], "partial_failure_warning", "warnings"}}}`; an error is
//!   `{"result": false, "msg": …}`, which Ray's client raises with the message;
//! - rows carry exactly the columns of Ray's schema for the resource: the base columns, or
//!   every column with `detail`; a value we do not have is `null`. Ray's client builds its
//!   dataclasses with `Schema(**row)`, so one unknown key would break it. Filters apply
//!   before the columns are cut, on the filterable columns only, as Ray's server does.
//!
//! Data: nodes, jobs, actors and placement groups come from the control plane (through a
//! `HeadClient`, so a follower's request reaches the leader); tasks, objects and workers
//! from every live node, each asked with the request's timeout. A node that does not answer
//! is named in `partial_failure_warning` and its rows are missing.
//!
//! Invariant: `rows_*` and `respond` are pure; only `collect` does I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient};
use protocol::pb;
use serde_json::{Value, json};

use crate::cluster_view::{host, status};

/// One of Ray's state resources: its columns and which of them filters may name.
pub(crate) struct Resource {
    pub(crate) name: &'static str,
    base: &'static [&'static str],
    /// The columns `detail=true` adds.
    more: &'static [&'static str],
    filterable: &'static [&'static str],
}

// Ray 2.60's `list_columns(detail)` and `filterable_columns()` of each schema.
const ACTORS: Resource = Resource {
    name: "actors",
    base: &[
        "actor_id",
        "class_name",
        "state",
        "job_id",
        "name",
        "node_id",
        "pid",
        "ray_namespace",
    ],
    more: &[
        "serialized_runtime_env",
        "required_resources",
        "death_cause",
        "is_detached",
        "placement_group_id",
        "repr_name",
        "num_restarts",
        "num_restarts_due_to_lineage_reconstruction",
        "num_restarts_due_to_node_preemption",
        "call_site",
        "label_selector",
        "fallback_strategy",
    ],
    filterable: &[
        "actor_id",
        "class_name",
        "job_id",
        "name",
        "node_id",
        "pid",
        "placement_group_id",
        "ray_namespace",
        "repr_name",
        "state",
    ],
};

const NODES: Resource = Resource {
    name: "nodes",
    base: &[
        "node_id",
        "node_ip",
        "is_head_node",
        "state",
        "state_message",
        "node_name",
        "resources_total",
        "labels",
    ],
    more: &["start_time_ms", "end_time_ms"],
    filterable: &["is_head_node", "node_id", "node_ip", "node_name", "state"],
};

const TASKS: Resource = Resource {
    name: "tasks",
    base: &[
        "task_id",
        "attempt_number",
        "name",
        "state",
        "job_id",
        "actor_id",
        "type",
        "func_or_class_name",
        "parent_task_id",
        "node_id",
        "worker_id",
        "worker_pid",
        "error_type",
    ],
    more: &[
        "language",
        "required_resources",
        "runtime_env_info",
        "placement_group_id",
        "events",
        "profiling_data",
        "creation_time_ms",
        "start_time_ms",
        "end_time_ms",
        "task_log_info",
        "error_message",
        "is_debugger_paused",
        "call_site",
        "label_selector",
        "fallback_strategy",
    ],
    filterable: &[
        "actor_id",
        "attempt_number",
        "error_type",
        "func_or_class_name",
        "is_debugger_paused",
        "job_id",
        "language",
        "name",
        "node_id",
        "parent_task_id",
        "placement_group_id",
        "state",
        "task_id",
        "type",
        "worker_id",
        "worker_pid",
    ],
};

const JOBS: Resource = Resource {
    name: "jobs",
    base: &[
        "job_id",
        "submission_id",
        "entrypoint",
        "type",
        "status",
        "message",
        "error_type",
        "driver_info",
    ],
    more: &[
        "start_time",
        "end_time",
        "metadata",
        "runtime_env",
        "driver_agent_http_address",
        "driver_node_id",
        "driver_exit_code",
    ],
    filterable: &["job_id", "status", "submission_id", "type"],
};

const PLACEMENT_GROUPS: Resource = Resource {
    name: "placement_groups",
    base: &["placement_group_id", "name", "creator_job_id", "state"],
    more: &[
        "bundles",
        "is_detached",
        "stats",
        "topology_strategy",
        "topology_assignments",
    ],
    filterable: &[
        "creator_job_id",
        "is_detached",
        "name",
        "placement_group_id",
        "state",
    ],
};

const WORKERS: Resource = Resource {
    name: "workers",
    base: &[
        "worker_id",
        "is_alive",
        "worker_type",
        "exit_type",
        "node_id",
        "ip",
        "pid",
    ],
    more: &[
        "exit_detail",
        "worker_launch_time_ms",
        "worker_launched_time_ms",
        "start_time_ms",
        "end_time_ms",
        "debugger_port",
        "num_paused_threads",
    ],
    filterable: &[
        "debugger_port",
        "exit_type",
        "ip",
        "is_alive",
        "node_id",
        "num_paused_threads",
        "pid",
        "worker_id",
        "worker_type",
    ],
};

const OBJECT_COLUMNS: &[&str] = &[
    "object_id",
    "object_size",
    "task_status",
    "attempt_number",
    "reference_type",
    "call_site",
    "type",
    "pid",
    "ip",
];

const OBJECTS: Resource = Resource {
    name: "objects",
    base: OBJECT_COLUMNS,
    more: &[],
    filterable: &[
        "attempt_number",
        "call_site",
        "ip",
        "object_id",
        "object_size",
        "pid",
        "reference_type",
        "task_status",
        "type",
    ],
};

const RESOURCES: [&Resource; 7] = [
    &ACTORS,
    &NODES,
    &TASKS,
    &JOBS,
    &PLACEMENT_GROUPS,
    &WORKERS,
    &OBJECTS,
];

impl Resource {
    /// The columns of a reply: the base ones, and with `detail` every one.
    pub(crate) fn columns(&self, detail: bool) -> Vec<&'static str> {
        let mut c = self.base.to_vec();
        if detail {
            c.extend_from_slice(self.more);
        }
        c
    }
}

pub(crate) fn resource(name: &str) -> Option<&'static Resource> {
    RESOURCES.iter().copied().find(|r| r.name == name)
}

/// Ray's default and largest `limit`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Query {
    pub(crate) limit: usize,
    pub(crate) timeout: Duration,
    pub(crate) detail: bool,
    /// (column, `=` is true / `!=` is false, value).
    pub(crate) filters: Vec<(String, bool, String)>,
    pub(crate) exclude_driver: bool,
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// Parses Ray's query string (repeated parameters for the filters).
pub(crate) fn parse_query(raw: &str) -> Result<Query, String> {
    let mut q = Query {
        limit: DEFAULT_LIMIT,
        timeout: Duration::from_secs(24),
        detail: false,
        filters: Vec::new(),
        exclude_driver: true,
    };
    let (mut keys, mut preds, mut vals) = (Vec::new(), Vec::new(), Vec::new());
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        match k.as_ref() {
            "limit" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("limit {v:?} is not a whole number"))?;
                if n == 0 || n > MAX_LIMIT {
                    return Err(format!("limit {n} must be from 1 to {MAX_LIMIT}"));
                }
                q.limit = n;
            }
            "timeout" => {
                let s: f64 = v
                    .parse()
                    .map_err(|_| format!("timeout {v:?} is not a number of seconds"))?;
                if !s.is_finite() || s <= 0.0 || s > 3600.0 {
                    return Err(format!("timeout {s} must be from 0 to 3600 seconds"));
                }
                q.timeout = Duration::from_secs_f64(s);
            }
            "detail" => {
                q.detail = parse_bool(&v).ok_or_else(|| format!("detail {v:?} is not a boolean"))?
            }
            "exclude_driver" => {
                q.exclude_driver = parse_bool(&v)
                    .ok_or_else(|| format!("exclude_driver {v:?} is not a boolean"))?
            }
            "filter_keys" => keys.push(v.into_owned()),
            "filter_predicates" => preds.push(v.into_owned()),
            "filter_values" => vals.push(v.into_owned()),
            // Ray's clients send more (e.g. `summary_by`, `server_timeout_multiplier`).
            _ => {}
        }
    }
    if keys.len() != preds.len() || keys.len() != vals.len() {
        return Err(format!(
            "{} filter_keys, {} filter_predicates and {} filter_values: they go in threes",
            keys.len(),
            preds.len(),
            vals.len()
        ));
    }
    for ((k, p), v) in keys.into_iter().zip(preds).zip(vals) {
        let eq = match p.as_str() {
            "=" => true,
            "!=" => false,
            other => {
                return Err(format!(
                    "Unsupported filter predicate {other} is given. Available predicates: =, !="
                ));
            }
        };
        q.filters.push((k.to_lowercase(), eq, v));
    }
    Ok(q)
}

/// Whether a row's value matches a filter value, the way Ray's server compares: strings
/// ignoring case, booleans and numbers after converting the filter's text.
fn matches(got: Option<&Value>, want: &str) -> bool {
    match got {
        Some(Value::String(s)) => s.eq_ignore_ascii_case(want),
        Some(Value::Bool(b)) => parse_bool(want) == Some(*b),
        Some(Value::Number(n)) => match (n.as_i64(), want.parse::<i64>()) {
            (Some(a), Ok(b)) => a == b,
            _ => n
                .as_f64()
                .zip(want.parse::<f64>().ok())
                .is_some_and(|(a, b)| a == b),
        },
        _ => false,
    }
}

/// Filters, limits and cuts rows to the resource's columns; the `data.result` of Ray's
/// list reply.
pub(crate) fn respond(
    res: &Resource,
    rows: Vec<Value>,
    q: &Query,
    warnings: &[String],
) -> Result<Value, String> {
    for (k, _, _) in &q.filters {
        if !res.filterable.contains(&k.as_str()) {
            return Err(format!(
                "The given filter column {k} is not supported. Enter filters with --filter key=value or --filter key!=value Supported filter columns: {:?}",
                res.filterable
            ));
        }
    }
    let total = rows.len();
    let kept: Vec<Value> = rows
        .into_iter()
        .filter(|r| {
            q.filters
                .iter()
                .all(|(k, eq, v)| matches(r.get(k), v) == *eq)
        })
        .collect();
    let num_filtered = kept.len();
    let columns = res.columns(q.detail);
    let result: Vec<Value> = kept
        .iter()
        .take(q.limit)
        .map(|r| {
            Value::Object(
                columns
                    .iter()
                    .map(|c| (c.to_string(), r.get(*c).cloned().unwrap_or(Value::Null)))
                    .collect(),
            )
        })
        .collect();
    Ok(json!({
        "total": total,
        "num_after_truncation": total,
        "num_filtered": num_filtered,
        "result": result,
        "partial_failure_warning": partial_warning(warnings),
        "warnings": null,
    }))
}

fn partial_warning(w: &[String]) -> String {
    if w.is_empty() {
        String::new()
    } else {
        format!(
            "some nodes did not answer, their rows are missing: {}",
            w.join("; ")
        )
    }
}

fn opt_str(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

fn opt_ms(ms: u64) -> Value {
    if ms == 0 { Value::Null } else { json!(ms) }
}

fn strip<'a>(name: &'a str, prefix: &str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}

pub(crate) fn actor_row(a: &pb::ActorInfo) -> Value {
    let state = pb::ActorState::try_from(a.state)
        .map(|s| strip(s.as_str_name(), "ACTOR_STATE_"))
        .unwrap_or("DEPENDENCIES_UNREADY");
    let state = if state == "UNSPECIFIED" {
        "DEPENDENCIES_UNREADY"
    } else {
        state
    };
    let death_cause = if state == "DEAD" {
        json!({"actor_died_error_context": {"error_message": a.message, "actor_id": a.actor_id, "class_name": a.class_name}})
    } else {
        Value::Null
    };
    json!({
        "actor_id": a.actor_id,
        "class_name": a.class_name,
        "state": state,
        "job_id": a.job_id,
        "name": a.name,
        "node_id": opt_str(&a.node_id),
        "pid": if a.pid == 0 { Value::Null } else { json!(a.pid) },
        "ray_namespace": a.namespace,
        "serialized_runtime_env": "{}",
        "required_resources": a.resources.iter().collect::<BTreeMap<_, _>>(),
        "death_cause": death_cause,
        "is_detached": a.detached,
        "placement_group_id": null,
        "repr_name": "",
        "num_restarts": a.num_restarts,
        "num_restarts_due_to_lineage_reconstruction": 0,
        "num_restarts_due_to_node_preemption": 0,
        "call_site": null,
        "label_selector": {},
        "fallback_strategy": null,
    })
}

pub(crate) fn node_row(n: &pb::NodeInfo) -> Value {
    let state = if n.state == pb::NodeState::Alive as i32 {
        "ALIVE"
    } else {
        "DEAD"
    };
    let ip = host(&n.address);
    json!({
        "node_id": n.node_id,
        "node_ip": ip,
        "is_head_node": n.is_head,
        "state": state,
        "state_message": opt_str(&n.death_reason),
        "node_name": ip,
        "resources_total": n.resources_total.iter().collect::<BTreeMap<_, _>>(),
        "labels": n.labels.iter().collect::<BTreeMap<_, _>>(),
        "start_time_ms": opt_ms(n.registered_at_ms),
        "end_time_ms": opt_ms(n.dead_at_ms),
    })
}

pub(crate) fn pg_row(p: &pb::PlacementGroupInfo) -> Value {
    let state = pb::PlacementGroupState::try_from(p.state)
        .map(|s| strip(s.as_str_name(), "PLACEMENT_GROUP_STATE_"))
        .unwrap_or("PENDING");
    let strategy = pb::PlacementStrategy::try_from(p.strategy)
        .map(|s| strip(s.as_str_name(), "PLACEMENT_STRATEGY_"))
        .unwrap_or("PACK");
    let bundles: Vec<Value> = p
        .bundles
        .iter()
        .enumerate()
        .map(|(i, b)| {
            json!({
                "bundle_id": format!("{}-{i}", p.pg_id),
                "node_id": p.bundle_node_ids.get(i).map(|s| opt_str(s)).unwrap_or(Value::Null),
                "unit_resources": b.resources.iter().collect::<BTreeMap<_, _>>(),
                "label_selector": {},
            })
        })
        .collect();
    json!({
        "placement_group_id": p.pg_id,
        "name": p.name,
        "creator_job_id": p.job_id,
        "state": state,
        "bundles": bundles,
        "is_detached": p.detached,
        // Ray's `topology_strategy` maps topology labels to strategies (none here); the
        // group's own strategy goes with the scheduling stats.
        "stats": {
            "scheduling_state": state,
            "strategy": strategy,
            "message": p.message,
        },
        "topology_strategy": null,
        "topology_assignments": null,
    })
}

/// Ray's error type for one of our task error kinds (`KIND: message`).
fn error_type(error: &str) -> Value {
    let kind = error.split(':').next().unwrap_or_default().trim();
    match kind {
        "" => Value::Null,
        "PANIC" | "ARGUMENT" | "UNKNOWN_FUNCTION" => json!("TASK_EXECUTION_EXCEPTION"),
        "WORKER_DIED" => json!("WORKER_DIED"),
        "ACTOR_DIED" => json!("ACTOR_DIED"),
        "ACTOR_UNAVAILABLE" => json!("ACTOR_UNAVAILABLE"),
        "OBJECT_LOST" | "ARG_LOST" => json!("OBJECT_LOST"),
        "CANCELLED" => json!("TASK_CANCELLED"),
        "DEPENDENCY" => json!("DEPENDENCY_RESOLUTION_FAILED"),
        "SCHEDULING" => json!("TASK_PLACEMENT_GROUP_REMOVED"),
        other => json!(other),
    }
}

pub(crate) fn task_row(t: &pb::TaskEvent) -> Value {
    let actor = !t.actor_id.is_empty();
    let ended = matches!(t.state(), pb::TaskState::Finished | pb::TaskState::Failed);
    let state = protocol::task_state_name(t.state());
    json!({
        "task_id": t.task_id,
        "attempt_number": t.attempt,
        "name": t.function,
        "state": state,
        "job_id": t.job_id,
        "actor_id": opt_str(&t.actor_id),
        "type": if actor { "ACTOR_TASK" } else { "NORMAL_TASK" },
        "func_or_class_name": t.function,
        // Not recorded here; Ray's schema wants a string.
        "parent_task_id": "",
        "node_id": opt_str(&t.node_id),
        "worker_id": opt_str(&t.worker_id),
        "worker_pid": null,
        "error_type": error_type(&t.error),
        "language": "RUST",
        "required_resources": {},
        "runtime_env_info": null,
        "placement_group_id": null,
        "events": [{"state": state, "created_ms": t.time_ms}],
        "profiling_data": null,
        "creation_time_ms": opt_ms(t.created_ms),
        "start_time_ms": opt_ms(t.start_ms),
        "end_time_ms": if ended { opt_ms(if t.end_ms > 0 { t.end_ms } else { t.time_ms }) } else { Value::Null },
        "task_log_info": null,
        "error_message": opt_str(&t.error),
        "is_debugger_paused": null,
        "call_site": null,
        "label_selector": {},
        "fallback_strategy": null,
    })
}

/// One row per stored copy, with the process that owns it (found by owner prefix among
/// every node's processes; pid 0 when its owner is gone).
pub(crate) fn object_rows(nodes: &[(String, pb::ListObjectsReply)]) -> Vec<Value> {
    let owners: Vec<(&str, &pb::ProcessRefs, &str)> = nodes
        .iter()
        .flat_map(|(addr, n)| {
            n.processes
                .iter()
                .filter(|p| !p.owner_prefix.is_empty())
                .map(move |p| (p.owner_prefix.as_str(), p, host(addr)))
        })
        .collect();
    let mut rows = Vec::new();
    for (addr, n) in nodes {
        for o in &n.objects {
            let owner = owners
                .iter()
                .find(|(prefix, _, _)| o.object_id.starts_with(prefix));
            rows.push(json!({
                "object_id": o.object_id,
                "object_size": o.size,
                "task_status": "FINISHED",
                "attempt_number": 0,
                "reference_type": if o.pins > 0 { "USED_BY_PENDING_TASK" } else if o.primary { "PINNED_IN_MEMORY" } else { "LOCAL_REFERENCE" },
                "call_site": "disabled",
                "type": match owner { Some((_, p, _)) if p.worker_id.is_empty() => "DRIVER", _ => "WORKER" },
                "pid": owner.map_or(0, |(_, p, _)| p.pid),
                "ip": owner.map_or(host(addr), |(_, _, ip)| ip),
            }));
        }
    }
    rows
}

pub(crate) fn worker_rows(n: &pb::ListObjectsReply, ip: &str) -> Vec<Value> {
    n.processes
        .iter()
        .map(|p| {
            let driver = p.worker_id.is_empty();
            json!({
                "worker_id": if driver { format!("driver-{}", p.owner_prefix) } else { p.worker_id.clone() },
                "is_alive": true,
                "worker_type": if driver { "DRIVER" } else { "WORKER" },
                "exit_type": null,
                "node_id": n.node_id,
                "ip": ip,
                "pid": p.pid,
                "exit_detail": null,
                "worker_launch_time_ms": null,
                "worker_launched_time_ms": null,
                "start_time_ms": null,
                "end_time_ms": null,
                "debugger_port": null,
                "num_paused_threads": null,
            })
        })
        .collect()
}

/// `ray summary tasks`: Ray's `TaskSummaries` grouped by function name.
pub(crate) fn task_summary(rows: &[Value]) -> Value {
    let mut summary: BTreeMap<String, Value> = BTreeMap::new();
    let (mut tasks, mut actor_tasks) = (0, 0);
    for t in rows {
        let name = t["func_or_class_name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let ty = t["type"].as_str().unwrap_or("NORMAL_TASK");
        if ty == "ACTOR_TASK" {
            actor_tasks += 1;
        } else {
            tasks += 1;
        }
        let e = summary
            .entry(name.clone())
            .or_insert_with(|| json!({"func_or_class_name": name, "type": ty, "state_counts": {}}));
        let state = t["state"].as_str().unwrap_or("NIL").to_owned();
        let n = e["state_counts"][&state].as_u64().unwrap_or(0);
        e["state_counts"][&state] = json!(n + 1);
    }
    json!({
        "summary": summary,
        "total_tasks": tasks,
        "total_actor_tasks": actor_tasks,
        "total_actor_scheduled": 0,
        "summary_by": "func_name",
    })
}

/// `ray summary actors`: Ray's `ActorSummaries` grouped by class.
pub(crate) fn actor_summary(rows: &[Value]) -> Value {
    let mut summary: BTreeMap<String, Value> = BTreeMap::new();
    for a in rows {
        let class = a["class_name"].as_str().unwrap_or_default().to_owned();
        let e = summary
            .entry(class.clone())
            .or_insert_with(|| json!({"class_name": class, "state_counts": {}}));
        let state = a["state"].as_str().unwrap_or("DEAD").to_owned();
        let n = e["state_counts"][&state].as_u64().unwrap_or(0);
        e["state_counts"][&state] = json!(n + 1);
    }
    json!({"summary": summary, "total_actors": rows.len(), "summary_by": "class"})
}

/// `ray summary objects`: Ray's `ObjectSummaries` (no call sites are recorded here, so one
/// group, as Ray shows with call sites disabled).
pub(crate) fn object_summary(rows: &[Value]) -> Value {
    let mut per = json!({
        "total_objects": 0, "total_size_mb": 0.0, "total_num_workers": 0, "total_num_nodes": 0,
        "task_state_counts": {}, "task_attempt_number_counts": {}, "ref_type_counts": {},
    });
    let mut workers = std::collections::BTreeSet::new();
    let mut nodes = std::collections::BTreeSet::new();
    let mut size = 0u64;
    for o in rows {
        size += o["object_size"].as_u64().unwrap_or(0);
        workers.insert(o["pid"].to_string());
        nodes.insert(o["ip"].to_string());
        for (k, field) in [
            ("task_state_counts", "task_status"),
            ("task_attempt_number_counts", "attempt_number"),
            ("ref_type_counts", "reference_type"),
        ] {
            let key = match &o[field] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            let n = per[k][&key].as_u64().unwrap_or(0);
            per[k][&key] = json!(n + 1);
        }
    }
    let mb = size as f64 / (1024.0 * 1024.0);
    per["total_objects"] = json!(rows.len());
    per["total_size_mb"] = json!(mb);
    per["total_num_workers"] = json!(workers.len());
    per["total_num_nodes"] = json!(nodes.len());
    let summary = if rows.is_empty() {
        json!({})
    } else {
        json!({ "disabled": per })
    };
    json!({
        "summary": summary,
        "total_objects": rows.len(),
        "total_size_mb": mb,
        "callsite_enabled": false,
        "summary_by": "callsite",
    })
}

// ---- I/O ----

#[derive(Clone)]
struct Api {
    client: HeadClient,
    token: Option<AuthToken>,
}

pub(crate) fn router(client: HeadClient, token: Option<AuthToken>) -> Router {
    Router::new()
        .route("/api/v0/logs", get(list_logs))
        .route("/api/v0/logs/{media}", get(log_file))
        .route("/api/v0/{resource}", get(list))
        .route("/api/v0/{resource}/summarize", get(summarize))
        .route("/api/rayctl/status", get(cluster_status))
        .route("/api/rayctl/node_stats", get(node_stats))
        .with_state(Api { client, token })
}

/// The cluster status as `rayctl status --format json` prints it (the dashboard's overview).
async fn cluster_status(State(api): State<Api>) -> Response {
    reply(
        status(&api.client)
            .await
            .map(|s| crate::cluster_view::status_json(&s)),
    )
}

/// Per live node, what only the node knows: its object store's use and its processes
/// (drivers and workers), for the dashboard's node page. Nodes that do not answer are named.
async fn node_stats(State(api): State<Api>) -> Response {
    let r = fan_out(&api, &api.client, Duration::from_secs(5), |mut nm| async move {
        nm.list_objects(pb::ListObjectsRequest {}).await
    })
    .await
    .map(|replies| {
        let mut nodes = serde_json::Map::new();
        let mut failed = Vec::new();
        for (addr, r) in replies {
            match r {
                Ok(r) => {
                    let workers = r.processes.iter().filter(|p| !p.worker_id.is_empty());
                    let drivers = r.processes.iter().filter(|p| p.worker_id.is_empty());
                    nodes.insert(
                        r.node_id.clone(),
                        json!({
                            "address": addr,
                            "object_store": {
                                "used_bytes": r.used_bytes,
                                "capacity_bytes": r.capacity_bytes,
                                "pinned_bytes": r.pinned_bytes,
                                "spilled_bytes": r.spilled_bytes,
                                "objects": r.objects.len(),
                            },
                            "workers": workers.clone().count(),
                            "drivers": drivers.count(),
                            "tasks_running": r.processes.iter().map(|p| p.tasks_running).sum::<u64>(),
                            "processes": r.processes.iter().map(|p| json!({
                                "pid": p.pid,
                                "worker_id": p.worker_id,
                                "job_id": p.job_id,
                                "objects_owned": p.objects_owned,
                                "tasks_running": p.tasks_running,
                            })).collect::<Vec<_>>(),
                        }),
                    );
                }
                Err(e) => failed.push(format!("{addr}: {e}")),
            }
        }
        json!({"nodes": nodes, "unreachable": failed})
    });
    reply(r)
}

// ---- logs (Ray's `/api/v0/logs`, `/logs/file`, `/logs/stream`) ----

fn query_map(raw: &str) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect()
}

fn log_error(e: crate::logs::LogError) -> Response {
    use crate::logs::LogError;
    let code = match &e {
        LogError::NotFound(_) => StatusCode::NOT_FOUND,
        LogError::BadRequest(_) => StatusCode::BAD_REQUEST,
        LogError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, e.to_string()).into_response()
}

fn logs_of(api: &Api, q: &std::collections::HashMap<String, String>) -> crate::logs::Logs {
    let timeout = q
        .get("timeout")
        .and_then(|t| t.parse::<f64>().ok())
        .filter(|t| t.is_finite() && *t > 0.0 && *t <= 3600.0)
        .map_or(Duration::from_secs(30), Duration::from_secs_f64);
    crate::logs::Logs::new(api.client.clone(), api.token.clone(), timeout)
}

/// `GET /api/v0/logs?node_id=…|node_ip=…&glob=…`: the node's files by kind, in Ray's envelope.
async fn list_logs(State(api): State<Api>, RawQuery(raw): RawQuery) -> Response {
    let q = query_map(raw.as_deref().unwrap_or_default());
    let Some(node) = q.get("node_id").or_else(|| q.get("node_ip")) else {
        return reply(Err(
            "give node_id or node_ip (as Ray's list_logs does)".into()
        ));
    };
    let glob = q.get("glob").map_or("*", String::as_str);
    match logs_of(&api, &q).list(Some(node), glob).await {
        Ok(nodes) => {
            let mut by_kind: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for n in &nodes {
                for f in &n.files {
                    let kind = if f.name.starts_with("worker-") {
                        "worker"
                    } else if f.name.starts_with("job-driver-") {
                        "job"
                    } else {
                        "daemon"
                    };
                    by_kind.entry(kind).or_default().push(&f.name);
                }
            }
            reply(Ok(json!(by_kind)))
        }
        Err(e) => reply(Err(e.to_string())),
    }
}

/// `GET /api/v0/logs/file|stream?…`: a file by `node_id`/`node_ip` and `filename`, or the log
/// of an `actor_id`, `task_id`, worker `pid`-less `worker_id` or `submission_id`; its last
/// `lines` lines (default 1000, -1 all); `stream` then follows it (a job's until it ends).
async fn log_file(
    State(api): State<Api>,
    Path(media): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    use crate::logs::Target;
    let follow = match media.as_str() {
        "file" => false,
        "stream" => true,
        other => {
            return (
                StatusCode::NOT_FOUND,
                format!("no /api/v0/logs/{other}: file or stream"),
            )
                .into_response();
        }
    };
    let q = query_map(raw.as_deref().unwrap_or_default());
    let target = if let Some(id) = q.get("actor_id") {
        Target::Actor(id.clone())
    } else if let Some(id) = q.get("task_id") {
        Target::Task(id.clone())
    } else if let Some(id) = q.get("submission_id") {
        Target::Job(id.clone())
    } else if let Some(id) = q.get("worker_id") {
        Target::Worker(id.clone())
    } else if let (Some(node), Some(f)) = (
        q.get("node_id").or_else(|| q.get("node_ip")),
        q.get("filename"),
    ) {
        Target::File {
            node: node.clone(),
            filename: f.clone(),
        }
    } else {
        return (
            StatusCode::BAD_REQUEST,
            "give node_id (or node_ip) and filename, or actor_id, task_id, worker_id or submission_id",
        )
            .into_response();
    };
    let lines: i64 = match q.get("lines").map(|l| l.parse::<i64>()) {
        None => 1000,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return (StatusCode::BAD_REQUEST, "lines must be a whole number").into_response();
        }
    };
    let logs = std::sync::Arc::new(logs_of(&api, &q));
    let at = match logs.locate(&target).await {
        Ok(at) => at,
        Err(e) => return log_error(e),
    };
    let first = match logs.read(&at, 0, u32::try_from(lines).unwrap_or(0)).await {
        Ok(r) => r,
        Err(e) => return log_error(e),
    };
    let job = matches!(target, Target::Job(_)).then(|| match &target {
        Target::Job(id) => id.clone(),
        _ => String::new(),
    });
    // The first piece, then the rest of the file, then (stream) what is appended.
    let stream = futures_util::stream::unfold(
        (Some(first), logs, at, false),
        move |(pending, logs, at, done)| {
            let job = job.clone();
            async move {
                if done {
                    return None;
                }
                let mut r = pending?;
                loop {
                    if !r.data.is_empty() {
                        let data = axum::body::Bytes::from(std::mem::take(&mut r.data));
                        let next = pb::ReadLogReply {
                            next_offset: r.next_offset,
                            size: r.size,
                            ..Default::default()
                        };
                        return Some((
                            Ok::<_, std::io::Error>(data),
                            (Some(next), logs, at, false),
                        ));
                    }
                    let more = r.next_offset < r.size;
                    if !more && !follow {
                        return None;
                    }
                    if !more {
                        if let Some(id) = &job
                            && logs.job_status(id).await.is_some_and(|s| {
                                matches!(
                                    pb::JobStatus::try_from(s),
                                    Ok(pb::JobStatus::Succeeded
                                        | pb::JobStatus::Failed
                                        | pb::JobStatus::Stopped)
                                )
                            })
                        {
                            // One last read for lines written just before the end.
                            let last = logs.read(&at, r.next_offset, 0).await.ok()?;
                            return (!last.data.is_empty()).then(|| {
                                (
                                    Ok(axum::body::Bytes::from(last.data)),
                                    (None, logs.clone(), at.clone(), true),
                                )
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    r = match logs.read(&at, r.next_offset, 0).await {
                        Ok(r) => r,
                        Err(e) => {
                            let text = format!("\n[log ended: {e}]\n");
                            return Some((
                                Ok(axum::body::Bytes::from(text)),
                                (None, logs, at, true),
                            ));
                        }
                    };
                }
            }
        },
    );
    (
        [("content-type", "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

fn reply(data: Result<Value, String>) -> Response {
    match data {
        Ok(result) => axum::Json(json!({
            "result": true, "msg": "", "data": {"result": result},
        }))
        .into_response(),
        Err(msg) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"result": false, "msg": msg, "data": null})),
        )
            .into_response(),
    }
}

async fn list(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    reply(list_inner(&api, &name, raw.as_deref().unwrap_or_default()).await)
}

async fn list_inner(api: &Api, name: &str, raw: &str) -> Result<Value, String> {
    let res = resource(name).ok_or_else(|| {
        format!(
            "unknown state resource {name:?}; one of {:?}",
            RESOURCES.iter().map(|r| r.name).collect::<Vec<_>>()
        )
    })?;
    let q = parse_query(raw)?;
    let (mut rows, warnings) = collect(api, res, q.timeout).await?;
    if res.name == "workers" && q.exclude_driver {
        rows.retain(|w| w["worker_type"] != "DRIVER");
    }
    respond(res, rows, &q, &warnings)
}

async fn summarize(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    reply(summarize_inner(&api, &name, raw.as_deref().unwrap_or_default()).await)
}

async fn summarize_inner(api: &Api, name: &str, raw: &str) -> Result<Value, String> {
    let q = parse_query(raw)?;
    let (res, f): (&Resource, fn(&[Value]) -> Value) = match name {
        "tasks" => (&TASKS, task_summary),
        "actors" => (&ACTORS, actor_summary),
        "objects" => (&OBJECTS, object_summary),
        other => {
            return Err(format!(
                "cannot summarize {other:?}: tasks, actors or objects"
            ));
        }
    };
    let (rows, warnings) = collect(api, res, q.timeout).await?;
    Ok(json!({
        "total": rows.len(),
        "num_after_truncation": rows.len(),
        "num_filtered": rows.len(),
        "result": {"node_id_to_summary": {"cluster": f(&rows)}},
        "partial_failure_warning": partial_warning(&warnings),
        "warnings": null,
    }))
}

/// Every row of a resource (before filters), and the nodes that did not answer.
async fn collect(
    api: &Api,
    res: &Resource,
    timeout: Duration,
) -> Result<(Vec<Value>, Vec<String>), String> {
    let c = api.client.with_options(ClientOptions {
        deadline: timeout,
        ..api.client.options().clone()
    });
    let err = |what: &str, e: protocol::client::ClientError| format!("cannot list {what}: {e}");
    match res.name {
        "actors" => {
            let r = c
                .call(|mut c| async move { c.list_actors(pb::ListActorsRequest {}).await })
                .await
                .map_err(|e| err("actors", e))?;
            Ok((r.actors.iter().map(actor_row).collect(), Vec::new()))
        }
        "placement_groups" => {
            let r = c
                .call(|mut c| async move {
                    c.list_placement_groups(pb::ListPlacementGroupsRequest {})
                        .await
                })
                .await
                .map_err(|e| err("placement groups", e))?;
            Ok((r.placement_groups.iter().map(pg_row).collect(), Vec::new()))
        }
        "jobs" => {
            let r = c
                .call(|mut c| async move { c.list_jobs(pb::ListJobsRequest {}).await })
                .await
                .map_err(|e| err("jobs", e))?;
            Ok((
                r.jobs.iter().map(crate::jobs_api::details).collect(),
                Vec::new(),
            ))
        }
        "nodes" => {
            let s = status(&c).await?;
            Ok((s.nodes.iter().map(node_row).collect(), Vec::new()))
        }
        "tasks" => {
            let mut rows = Vec::new();
            let mut failed = Vec::new();
            let mut replies = fan_out(api, &c, timeout, |mut nm| async move {
                nm.list_tasks(pb::ListTasksRequest {}).await
            })
            .await?;
            for (node, r) in replies.drain(..) {
                match r {
                    Ok(r) => rows.extend(r.tasks.iter().map(task_row)),
                    Err(e) => failed.push(format!("{node}: {e}")),
                }
            }
            Ok((rows, failed))
        }
        "objects" | "workers" => {
            let mut listed = Vec::new();
            let mut failed = Vec::new();
            for (node, r) in fan_out(api, &c, timeout, |mut nm| async move {
                nm.list_objects(pb::ListObjectsRequest {}).await
            })
            .await?
            {
                match r {
                    Ok(r) => listed.push((node, r)),
                    Err(e) => failed.push(format!("{node}: {e}")),
                }
            }
            let rows = if res.name == "objects" {
                object_rows(&listed)
            } else {
                listed
                    .iter()
                    .flat_map(|(node, r)| worker_rows(r, host(node)))
                    .collect()
            };
            Ok((rows, failed))
        }
        other => Err(format!("unknown state resource {other:?}")),
    }
}

/// Calls `f` on every live node's node manager at once; (node address, reply).
async fn fan_out<T, F, Fut>(
    api: &Api,
    c: &HeadClient,
    timeout: Duration,
    f: F,
) -> Result<Vec<(String, Result<T, String>)>, String>
where
    F: Fn(protocol::client::NmClient) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let s = status(c).await?;
    let opts = ClientOptions {
        rpc_timeout: timeout,
        ..Default::default()
    };
    let calls = s
        .nodes
        .iter()
        .filter(|n| n.state == pb::NodeState::Alive as i32)
        .map(|n| {
            let addr = n.address.clone();
            let nm = protocol::client::node_manager(&addr, api.token.clone(), &opts);
            let call = nm.map(&f);
            async move {
                let r = match call {
                    Ok(fut) => fut
                        .await
                        .map(tonic::Response::into_inner)
                        .map_err(|e| e.message().to_owned()),
                    Err(e) => Err(e.to_string()),
                };
                (addr, r)
            }
        });
    Ok(futures_util::future::join_all(calls).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(raw: &str) -> Query {
        parse_query(raw).expect("valid")
    }

    #[test]
    fn ray_queries_parse_with_repeated_filters() {
        let got = q(
            "limit=5&timeout=24&detail=True&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE&filter_keys=name&filter_predicates=!%3D&filter_values=x&summary_by=func_name",
        );
        assert_eq!(got.limit, 5);
        assert!(got.detail);
        assert_eq!(
            got.filters,
            [
                ("state".to_owned(), true, "ALIVE".to_owned()),
                ("name".to_owned(), false, "x".to_owned())
            ]
        );
        assert_eq!(q("").limit, 100);
        for (bad, why) in [
            ("limit=0", "limit 0"),
            ("limit=10001", "limit 10001"),
            ("limit=x", "whole number"),
            ("detail=maybe", "boolean"),
            ("filter_keys=a&filter_predicates=%3D", "in threes"),
            (
                "filter_keys=a&filter_predicates=%3E&filter_values=1",
                "Unsupported filter predicate >",
            ),
            ("timeout=-1", "timeout"),
        ] {
            let e = parse_query(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn node(id: &str, head: bool, alive: bool) -> pb::NodeInfo {
        pb::NodeInfo {
            node_id: id.into(),
            address: "10.1.2.3:7000".into(),
            state: if alive {
                pb::NodeState::Alive as i32
            } else {
                pb::NodeState::Dead as i32
            },
            is_head: head,
            resources_total: [("CPU".to_owned(), 2.0)].into(),
            death_reason: if alive { String::new() } else { "gone".into() },
            ..Default::default()
        }
    }

    #[test]
    fn rows_carry_exactly_the_schema_columns() {
        let rows = vec![
            node_row(&node("a", true, true)),
            node_row(&node("b", false, false)),
        ];
        let r = respond(&NODES, rows.clone(), &q(""), &[]).unwrap();
        let first = r["result"][0].as_object().unwrap();
        assert_eq!(
            first.keys().map(String::as_str).collect::<Vec<_>>().len(),
            NODES.base.len()
        );
        for c in NODES.base {
            assert!(first.contains_key(*c), "{c}");
        }
        assert_eq!(r["result"][0]["node_ip"], "10.1.2.3");
        let d = respond(&NODES, rows, &q("detail=true"), &[]).unwrap();
        assert_eq!(
            d["result"][1].as_object().unwrap().len(),
            NODES.columns(true).len()
        );
        assert_eq!(d["result"][1]["state_message"], "gone");
        // Every row builder makes every detail column, and no other.
        let checks: [(&Resource, Value); 5] = [
            (&NODES, node_row(&node("a", true, true))),
            (&ACTORS, actor_row(&pb::ActorInfo::default())),
            (
                &PLACEMENT_GROUPS,
                pg_row(&pb::PlacementGroupInfo::default()),
            ),
            (&TASKS, task_row(&pb::TaskEvent::default())),
            (&JOBS, {
                let mut j = crate::jobs_api::details(&pb::JobInfo::default());
                j.as_object_mut()
                    .unwrap()
                    .retain(|k, _| JOBS.columns(true).contains(&k.as_str()));
                j
            }),
        ];
        for (res, row) in checks {
            let keys: std::collections::BTreeSet<&str> = row
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let want: std::collections::BTreeSet<&str> = res.columns(true).into_iter().collect();
            assert_eq!(keys, want, "{}", res.name);
        }
        let listed = pb::ListObjectsReply {
            node_id: "n".into(),
            objects: vec![pb::StoredObject {
                object_id: "abcd0000".into(),
                size: 10,
                primary: true,
                ..Default::default()
            }],
            processes: vec![pb::ProcessRefs {
                pid: 42,
                owner_prefix: "abcd".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let nodes = [("10.0.0.1:7000".to_owned(), listed.clone())];
        for (res, rows) in [
            (&OBJECTS, object_rows(&nodes)),
            (&WORKERS, worker_rows(&listed, "10.0.0.1")),
        ] {
            let keys: std::collections::BTreeSet<&str> = rows[0]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(
                keys,
                res.columns(true).into_iter().collect(),
                "{}",
                res.name
            );
        }
        let o = &object_rows(&nodes)[0];
        assert_eq!(
            (o["pid"].as_u64(), o["type"].as_str()),
            (Some(42), Some("DRIVER"))
        );
        // An owner on another node is found there; one that is gone gives pid 0.
        let mut elsewhere = listed.clone();
        elsewhere.processes.clear();
        let owner_node = pb::ListObjectsReply {
            processes: listed.processes.clone(),
            ..Default::default()
        };
        let two = [
            ("10.0.0.1:7000".to_owned(), elsewhere.clone()),
            ("10.0.0.2:7000".to_owned(), owner_node),
        ];
        assert_eq!(object_rows(&two)[0]["ip"], "10.0.0.2");
        let gone = [("10.0.0.1:7000".to_owned(), elsewhere)];
        assert_eq!(object_rows(&gone)[0]["pid"], 0);
    }

    #[test]
    fn filters_compare_as_rays_server_does_and_limit_cuts_after_counting() {
        let rows = vec![
            node_row(&node("a", true, true)),
            node_row(&node("b", false, true)),
            node_row(&node("c", false, false)),
        ];
        let r = respond(
            &NODES,
            rows.clone(),
            &q("filter_keys=state&filter_predicates=%3D&filter_values=alive&limit=1"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (r["total"].as_u64(), r["num_filtered"].as_u64()),
            (Some(3), Some(2))
        );
        assert_eq!(r["result"].as_array().unwrap().len(), 1);
        let r = respond(
            &NODES,
            rows.clone(),
            &q("filter_keys=is_head_node&filter_predicates=%3D&filter_values=True"),
            &[],
        )
        .unwrap();
        assert_eq!(r["result"][0]["node_id"], "a");
        let r = respond(
            &NODES,
            rows.clone(),
            &q("filter_keys=node_id&filter_predicates=!%3D&filter_values=A"),
            &[],
        )
        .unwrap();
        assert_eq!(r["num_filtered"], 2);
        let e = respond(
            &NODES,
            rows,
            &q("filter_keys=labels&filter_predicates=%3D&filter_values=x"),
            &[],
        )
        .unwrap_err();
        assert!(e.contains("labels is not supported"), "{e}");
        let w = respond(&NODES, vec![], &q(""), &["n1: timed out".into()]).unwrap();
        assert!(
            w["partial_failure_warning"]
                .as_str()
                .unwrap()
                .contains("n1: timed out")
        );
    }

    #[test]
    fn summaries_count_by_name_and_state() {
        let t = |f: &str, s: &str, actor: &str| {
            task_row(&pb::TaskEvent {
                function: f.into(),
                state: protocol::task_state_from_name(s) as i32,
                actor_id: actor.into(),
                ..Default::default()
            })
        };
        let s = task_summary(&[
            t("f", "FINISHED", ""),
            t("f", "FAILED", ""),
            t("f", "FINISHED", ""),
            t("m", "FINISHED", "a1"),
        ]);
        assert_eq!(
            s["summary"]["f"]["state_counts"],
            json!({"FINISHED": 2, "FAILED": 1})
        );
        assert_eq!(s["summary"]["m"]["type"], "ACTOR_TASK");
        assert_eq!(
            (s["total_tasks"].as_u64(), s["total_actor_tasks"].as_u64()),
            (Some(3), Some(1))
        );
        let a = actor_summary(&[actor_row(&pb::ActorInfo {
            class_name: "C".into(),
            state: pb::ActorState::Alive as i32,
            ..Default::default()
        })]);
        assert_eq!(a["summary"]["C"]["state_counts"]["ALIVE"], 1);
        assert_eq!(object_summary(&[])["total_objects"], 0);
    }
}
