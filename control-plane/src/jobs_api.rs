//! The Jobs REST API on every head's HTTP port, following Ray's documented paths and JSON
//! fields so existing Ray job clients work: `GET /api/version`, `POST /api/jobs/`,
//! `GET /api/jobs/`, `GET /api/jobs/{id}`, `GET /api/jobs/{id}/logs`,
//! `GET /api/jobs/{id}/logs/tail` (followed until the job ends: a WebSocket of TEXT frames
//! for Ray's client, a chunked text stream otherwise),
//! `POST /api/jobs/{id}/stop`, `DELETE /api/jobs/{id}`, `GET /api/openapi.json`, and the
//! package endpoints Ray's client uses for `working_dir`: `GET|PUT /api/packages/gcs/{name}`
//! (an archive is checked by unpacking it into a scratch directory before it is stored).
//!
//! `POST /api/authenticate` (Ray's dashboard login) answers a request that carries the token
//! with Ray's `ray-authentication-token` cookie (`HttpOnly; SameSite=Strict`), which the
//! access check then accepts in place of the header.
//!
//! Browser safety: a POST or PUT with a body must say what it is: `application/json` for
//! POSTs, an archive type (or none, as Ray's client sends) for package PUTs; anything else is
//! 415, so a cross-site `text/plain` form can never submit a job. (A PUT always needs a
//! CORS preflight, which we never grant.) Host and Origin are checked for every request by
//! `protocol::server`.
//!
//! API Boundary: every handler goes through the cluster's gRPC API with a `HeadClient` that
//! knows every head, so a follower's request reaches the leader (forwarding) and the REST
//! layer holds no state. Errors are JSON `{"error": …}` with 400 (bad input), 404, 409
//! (duplicate submission_id) or 503 (no leader reachable).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::auth::AuthToken;
use protocol::client::{ClientError, ClientOptions, HeadClient};
use protocol::{RpcError, pb};
use serde::Deserialize;
use serde_json::{Value, json};

/// The version Ray's job clients check for (`dashboard/modules/version.py`).
const RAY_API_VERSION: &str = "4";
const OPENAPI: &str = include_str!("jobs_openapi.json");

/// Package uploads checked at once: each may unpack up to `Limits::max_total` into a scratch
/// directory and holds its body in memory, so the head's disk and memory use stay bounded.
const MAX_CONCURRENT_UPLOADS: usize = 2;

#[derive(Clone)]
struct Api {
    client: HeadClient,
    uploads: std::sync::Arc<tokio::sync::Semaphore>,
}

pub(crate) fn router(heads: Vec<String>, token: Option<AuthToken>) -> anyhow::Result<Router> {
    let opts = ClientOptions {
        deadline: Duration::from_secs(15),
        ..Default::default()
    };
    let client = HeadClient::new(&heads, token, opts)?;
    Ok(Router::new()
        .route("/api/version", get(version))
        .route("/api/authenticate", post(authenticate))
        .route(
            "/api/openapi.json",
            get(|| async { ([("content-type", "application/json")], OPENAPI) }),
        )
        .route("/api/jobs/", post(submit).get(list))
        .route("/api/jobs/{id}", get(get_job).delete(delete_job))
        .route("/api/jobs/{id}/logs", get(logs))
        .route("/api/jobs/{id}/logs/tail", get(tail))
        .route("/api/jobs/{id}/stop", post(stop))
        .route(
            "/api/packages/{protocol}/{name}",
            get(package_exists)
                .put(package_upload)
                .layer(axum::extract::DefaultBodyLimit::max(
                    protocol::package::DEFAULT_MAX_BYTES as usize + 1,
                )),
        )
        .layer(axum::middleware::from_fn(require_body_type))
        .with_state(Api {
            client,
            uploads: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS)),
        }))
}

/// 415 for a POST or PUT body of a type a browser may send cross-site without asking.
async fn require_body_type(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::Method;
    let method = req.method().clone();
    if method != Method::POST && method != Method::PUT {
        return next.run(req).await;
    }
    let empty = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "0")
        || (req.headers().get("content-length").is_none()
            && req.headers().get("transfer-encoding").is_none());
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    let ok = match (&method, ctype.as_deref()) {
        (_, Some("application/json")) => true,
        (&Method::POST, None) => empty,
        (&Method::PUT, None | Some("application/octet-stream" | "application/zip")) => true,
        _ => false,
    };
    if ok {
        return next.run(req).await;
    }
    ApiError(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "{method} bodies must be application/json{} (got {})",
            if method == Method::PUT {
                " or application/zip"
            } else {
                ""
            },
            ctype.as_deref().unwrap_or("no content-type")
        ),
    )
    .into_response()
}

/// Ray's dashboard login: the access check has already accepted the request's token; hand it
/// back as an `HttpOnly; SameSite=Strict` cookie (30 days, as Ray's).
async fn authenticate(headers: axum::http::HeaderMap) -> Response {
    let token = ["authorization", "x-ray-authorization"]
        .iter()
        .find_map(|h| headers.get(*h)?.to_str().ok()?.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        // Auth is disabled (else the access check would have refused): nothing to remember.
        return Json(json!({ "authenticated": true })).into_response();
    };
    let cookie = format!(
        "{}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        protocol::server::AUTH_COOKIE,
        30 * 24 * 3600
    );
    (
        [("set-cookie", cookie)],
        Json(json!({ "authenticated": true })),
    )
        .into_response()
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let code = match e.rpc() {
            Some(RpcError::InvalidArgument(_) | RpcError::FailedPrecondition(_)) => {
                StatusCode::BAD_REQUEST
            }
            Some(RpcError::NotFound(_)) => StatusCode::NOT_FOUND,
            Some(RpcError::AlreadyExists(_)) => StatusCode::CONFLICT,
            Some(RpcError::ResourceExhausted(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            Some(RpcError::Unauthenticated(_)) => StatusCode::UNAUTHORIZED,
            Some(
                RpcError::Unavailable(_)
                | RpcError::NotLeader { .. }
                | RpcError::DeadlineExceeded(_),
            )
            | None => StatusCode::SERVICE_UNAVAILABLE,
            Some(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(
            code,
            e.rpc().map_or_else(|| e.to_string(), RpcError::detail),
        )
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// Ray's version reply, plus the heads' gRPC addresses (`rayctl_heads`), so `rayctl
/// --address http://HOST:8265` finds the cluster the way Ray users type its address.
async fn version(State(api): State<Api>) -> Json<Value> {
    Json(json!({
        "version": RAY_API_VERSION,
        "ray_version": "2.60.0",
        "ray_commit": concat!("rayctl-", env!("CARGO_PKG_VERSION")),
        "session_name": "rayctl",
        "rayctl_heads": api.client.addresses(),
    }))
}

/// Ray's `JobSubmitRequest`, plus our `max_retries` and `priority`. Unknown fields are
/// ignored, as newer Ray clients send fields older servers do not know.
#[derive(Deserialize)]
struct SubmitBody {
    entrypoint: String,
    #[serde(default)]
    submission_id: Option<String>,
    /// Deprecated alias of `submission_id` in Ray.
    #[serde(default)]
    job_id: Option<String>,
    #[serde(default)]
    runtime_env: Option<Value>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    entrypoint_num_cpus: Option<f64>,
    #[serde(default)]
    entrypoint_num_gpus: Option<f64>,
    #[serde(default)]
    entrypoint_memory: Option<f64>,
    #[serde(default)]
    entrypoint_resources: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    max_retries: Option<u32>,
    #[serde(default)]
    priority: Option<i32>,
    /// Ours: lets a client retry a submit safely (see `SubmitJobRequest.client_token`).
    #[serde(default)]
    client_token: Option<String>,
}

async fn submit(State(api): State<Api>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let b: SubmitBody = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("invalid job submission JSON: {e}")))?;
    let mut resources: BTreeMap<String, f64> = b.entrypoint_resources.unwrap_or_default();
    for (name, v) in [
        ("CPU", b.entrypoint_num_cpus),
        ("GPU", b.entrypoint_num_gpus),
        ("memory", b.entrypoint_memory),
    ] {
        if let Some(v) = v
            && resources.insert(name.to_owned(), v).is_some()
        {
            return Err(bad(format!(
                "{name} is given both as entrypoint_num_* and in entrypoint_resources"
            )));
        }
    }
    let runtime_env_json = match b.runtime_env {
        None | Some(Value::Null) => String::new(),
        Some(v) => v.to_string(),
    };
    let submission_id = b
        .submission_id
        .or(b.job_id)
        .unwrap_or_else(crate::jobs::new_submission_id);
    let req = pb::SubmitJobRequest {
        submission_id,
        entrypoint: b.entrypoint,
        runtime_env_json,
        metadata: b.metadata.unwrap_or_default().into_iter().collect(),
        entrypoint_resources: resources.into_iter().collect(),
        max_retries: b.max_retries.unwrap_or(0),
        priority: b.priority.unwrap_or(0),
        // Each REST request is one submission: the handler's own retries (after a lost
        // reply) carry this token, so they get the same job back instead of a 409.
        client_token: b
            .client_token
            .unwrap_or_else(|| format!("rest-{}", crate::jobs::new_submission_id())),
    };
    let info = api
        .client
        .call(|mut c| {
            let r = req.clone();
            async move { c.submit_job(r).await }
        })
        .await?;
    Ok(Json(
        json!({ "job_id": info.job_id, "submission_id": info.submission_id }),
    ))
}

/// Ray's `JobDetails` for one job.
pub(crate) fn details(j: &pb::JobInfo) -> Value {
    let opt_ms = |v: u64| if v == 0 { Value::Null } else { json!(v) };
    let runtime_env: Value =
        serde_json::from_str(&j.runtime_env_json).unwrap_or_else(|_| json!({}));
    let res = |k: &str| {
        j.entrypoint_resources
            .get(k)
            .copied()
            .map_or(Value::Null, |v| json!(v))
    };
    let custom: BTreeMap<&String, &f64> = j
        .entrypoint_resources
        .iter()
        .filter(|(k, _)| !["CPU", "GPU", "memory"].contains(&k.as_str()))
        .collect();
    json!({
        "type": "SUBMISSION",
        "job_id": j.job_id,
        "submission_id": j.submission_id,
        "driver_info": null,
        "status": protocol::job_status_name(j.status),
        "entrypoint": j.entrypoint,
        "message": j.message,
        "error_type": null,
        "start_time": opt_ms(j.submitted_at_ms),
        "end_time": opt_ms(j.ended_at_ms),
        // Ours (Ray's client ignores fields it does not know): when the current attempt's
        // driver started, for the dashboard's status history.
        "run_start_time": opt_ms(j.started_at_ms),
        "metadata": j.metadata,
        "runtime_env": runtime_env,
        "driver_agent_http_address": null,
        "driver_node_id": if j.driver_node_id.is_empty() { Value::Null } else { json!(j.driver_node_id) },
        "driver_exit_code": if j.has_exit_code { json!(j.exit_code) } else { Value::Null },
        "entrypoint_num_cpus": res("CPU"),
        "entrypoint_num_gpus": res("GPU"),
        "entrypoint_memory": res("memory"),
        "entrypoint_resources": if custom.is_empty() { Value::Null } else { json!(custom) },
        "attempt": j.attempt,
        "max_retries": j.max_retries,
        "priority": j.priority,
    })
}

async fn list(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let r = api
        .client
        .call(|mut c| async move { c.list_jobs(pb::ListJobsRequest {}).await })
        .await?;
    Ok(Json(Value::Array(r.jobs.iter().map(details).collect())))
}

async fn get_one(api: &Api, id: String) -> Result<pb::JobInfo, ApiError> {
    let req = pb::GetJobRequest { job_id: id };
    Ok(api
        .client
        .call(|mut c| {
            let r = req.clone();
            async move { c.get_job(r).await }
        })
        .await?)
}

async fn get_job(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(details(&get_one(&api, id).await?)))
}

async fn read_logs(api: &Api, id: &str, offset: u64) -> Result<pb::JobLogs, ApiError> {
    let req = pb::GetJobLogsRequest {
        job_id: id.to_owned(),
        offset,
        max_bytes: 4 << 20,
    };
    Ok(api
        .client
        .call(|mut c| {
            let r = req.clone();
            async move { c.get_job_logs(r).await }
        })
        .await?)
}

/// The whole log so far.
async fn logs(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    loop {
        let l = read_logs(&api, &id, out.len() as u64).await?;
        if l.data.is_empty() {
            break;
        }
        out.extend_from_slice(&l.data);
    }
    Ok(Json(json!({ "logs": String::from_utf8_lossy(&out) })))
}

/// Follows the log until the job ends: over a WebSocket when the client asks for one (Ray's
/// `JobSubmissionClient.tail_job_logs`, hence `ray job submit` and `ray job logs -f`: TEXT
/// frames, then a normal close), else as a chunked `text/plain` stream.
async fn tail(
    State(api): State<Api>,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Fail with a status code, not a broken stream, when the job does not exist.
    get_one(&api, id.clone()).await?;
    if let Ok(ws) = ws {
        return Ok(ws.on_upgrade(move |socket| tail_ws(api, id, socket)));
    }
    let stream = futures_util::stream::unfold(Some(0u64), move |offset| {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let mut offset = offset?;
            loop {
                match read_logs(&api, &id, offset).await {
                    Ok(l) if !l.data.is_empty() => {
                        offset = l.next_offset;
                        return Some((Ok::<_, std::io::Error>(Bytes::from(l.data)), Some(offset)));
                    }
                    Ok(l) if l.complete => return None,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    Err(e) => {
                        return Some((
                            Ok(Bytes::from(format!(
                                "\n[rayctl: log tail ended: {}]\n",
                                e.1
                            ))),
                            None,
                        ));
                    }
                }
            }
        }
    });
    Ok((
        [("content-type", "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Takes the text of `buf`, leaving in it the last bytes if they begin a character the next
/// read completes (a log read can cut one); invalid bytes become U+FFFD.
fn utf8_text(buf: &mut Vec<u8>) -> String {
    let mut keep = 0;
    for i in (buf.len().saturating_sub(3)..buf.len()).rev() {
        let b = buf[i];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for its lead byte
        }
        let need = match b {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        if buf.len() - i < need {
            keep = buf.len() - i;
        }
        break;
    }
    let rest = buf.split_off(buf.len() - keep);
    let text = String::from_utf8_lossy(buf).into_owned();
    *buf = rest;
    text
}

async fn tail_ws(api: Api, id: String, mut socket: WebSocket) {
    use axum::extract::ws::{CloseFrame, Message, close_code};
    let mut offset = 0u64;
    let mut pending = Vec::new();
    let close = loop {
        match read_logs(&api, &id, offset).await {
            Ok(l) if !l.data.is_empty() => {
                offset = l.next_offset;
                pending.extend_from_slice(&l.data);
                let text = utf8_text(&mut pending);
                if !text.is_empty() && socket.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
            Ok(l) if l.complete => {
                if !pending.is_empty() {
                    let text = String::from_utf8_lossy(&pending).into_owned();
                    let _ = socket.send(Message::Text(text.into())).await;
                }
                break CloseFrame {
                    code: close_code::NORMAL,
                    reason: "job finished".into(),
                };
            }
            Ok(_) => {
                // Nothing new yet: wait, but notice a client that went away.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    m = socket.recv() => match m {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                        Some(Ok(_)) => {}
                    },
                }
            }
            Err(e) => {
                let _ = socket
                    .send(Message::Text(
                        format!("\n[rayctl: log tail ended: {}]\n", e.1).into(),
                    ))
                    .await;
                break CloseFrame {
                    code: close_code::ERROR,
                    reason: "cannot read the job's log".into(),
                };
            }
        }
    };
    let _ = socket.send(Message::Close(Some(close))).await;
}

async fn stop(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let before = get_one(&api, id.clone()).await?;
    let terminal = matches!(
        pb::JobStatus::try_from(before.status),
        Ok(pb::JobStatus::Succeeded | pb::JobStatus::Failed | pb::JobStatus::Stopped)
    );
    if terminal {
        return Ok(Json(json!({ "stopped": false })));
    }
    let req = pb::StopJobRequest { job_id: id };
    api.client
        .call(|mut c| {
            let r = req.clone();
            async move { c.stop_job(r).await }
        })
        .await?;
    Ok(Json(json!({ "stopped": true })))
}

async fn delete_job(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let req = pb::DeleteJobRequest { job_id: id };
    let r = api
        .client
        .call(|mut c| {
            let r = req.clone();
            async move { c.delete_job(r).await }
        })
        .await?;
    Ok(Json(json!({ "deleted": r.deleted })))
}

fn check_package_path(proto: &str, name: &str) -> Result<(), ApiError> {
    if proto != "gcs" {
        return Err(bad(format!(
            "package protocol {proto:?} is not supported (gcs)"
        )));
    }
    protocol::package::check_name(name).map_err(bad)
}

async fn package_exists(
    State(api): State<Api>,
    Path((proto, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check_package_path(&proto, &name)?;
    let req = pb::KvGetRequest {
        namespace: protocol::package::KV_NAMESPACE.into(),
        key: protocol::package::manifest_key(&name),
    };
    api.client
        .call(|mut c| {
            let r = req.clone();
            async move { c.kv_get(r).await }
        })
        .await?;
    Ok(Json(json!({ "exists": true })))
}

/// Stores a package after checking it unpacks safely (into a scratch directory).
async fn package_upload(
    State(api): State<Api>,
    Path((proto, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    check_package_path(&proto, &name)?;
    if body.is_empty() {
        return Err(bad("the package body is empty"));
    }
    let _permit = tokio::time::timeout(Duration::from_secs(60), api.uploads.acquire())
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{MAX_CONCURRENT_UPLOADS} package uploads are being checked; try again later"
                ),
            )
        })?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let bytes = body.clone();
    let checked = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let scratch = tempfile::tempdir().map_err(|e| format!("no scratch directory: {e}"))?;
        protocol::package::unpack(
            &bytes,
            &scratch.path().join("p"),
            protocol::package::Limits::default(),
        )
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    checked.map_err(|e| bad(format!("package {name} is refused: {e}")))?;
    let chunks: Vec<&[u8]> = body.chunks(protocol::package::CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        kv_put(
            &api,
            protocol::package::chunk_key(&name, i as u64),
            chunk.to_vec(),
        )
        .await?;
    }
    let sha: String = {
        use sha2::Digest;
        protocol::hex::encode(sha2::Sha256::digest(&body))
    };
    let manifest = protocol::package::Manifest {
        size: body.len() as u64,
        chunks: chunks.len() as u64,
        sha256: sha,
    };
    let m = serde_json::to_vec(&manifest)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    kv_put(&api, protocol::package::manifest_key(&name), m).await?;
    Ok(Json(
        json!({ "uploaded": true, "uri": protocol::package::uri(&name) }),
    ))
}

async fn kv_put(api: &Api, key: Vec<u8>, value: Vec<u8>) -> Result<(), ApiError> {
    let req = pb::KvPutRequest {
        namespace: protocol::package::KV_NAMESPACE.into(),
        key,
        value,
        overwrite: true,
    };
    api.client
        .call(|mut c| {
            let r = req.clone();
            async move { c.kv_put(r).await }
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::utf8_text;

    #[test]
    fn log_text_never_splits_a_character_between_frames() {
        let all = "héllo ✓ 🦀\n".as_bytes().to_vec();
        // Cut at every byte: the frames always join to the text.
        for cut in 0..=all.len() {
            let mut buf = all[..cut].to_vec();
            let mut out = utf8_text(&mut buf);
            buf.extend_from_slice(&all[cut..]);
            out.push_str(&utf8_text(&mut buf));
            assert_eq!(out, "héllo ✓ 🦀\n", "cut at {cut}");
            assert!(buf.is_empty());
        }
        // Invalid bytes are replaced, not kept back forever.
        let mut bad = vec![b'a', 0xFF, b'b'];
        assert_eq!(utf8_text(&mut bad), "a\u{FFFD}b");
        assert!(bad.is_empty());
    }
}
