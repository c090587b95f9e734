//! Server-side plumbing every gRPC and HTTP listener of ours shares: the access check (cluster
//! token, peer secret, browser Host/Origin policy), RPC metrics, the RESOURCE_EXHAUSTED
//! mapping for oversize messages, `/metrics`, and `serve`.
//!
//! Invariant: a request without the configured token never reaches a service (gRPC callers get
//! UNAUTHENTICATED, HTTP callers 401, or 403 for a wrong token), except a GET of one of the
//! dashboard's static [`PUBLIC_PATHS`]; [`PEER_PATHS`] open only to the peer secret, whatever
//! the token; a plain HTTP request naming a foreign Host or Origin
//! is refused (403) before its credential is looked at.

use std::future::Future;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::RpcError;
use crate::auth::AuthToken;

pub const RPC_LATENCY: &str = "rayctl_rpc_latency_seconds";
pub const RPC_REQUESTS: &str = "rayctl_rpc_requests_total";

/// Declares the RPC metrics (call once per process, after installing the recorder).
pub fn describe_rpc_metrics() {
    metrics::describe_histogram!(
        RPC_LATENCY,
        metrics::Unit::Seconds,
        "gRPC server latency by method"
    );
    metrics::describe_counter!(
        RPC_REQUESTS,
        "gRPC requests served, by method and status code"
    );
}

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Paths only the heads' peer secret opens (the cluster token does not): the Raft transport
/// and membership changes. Job code holds the cluster token; it must never reach these.
pub const PEER_PATHS: &[&str] = &[
    "/rayctl.v1.Raft/",
    "/rayctl.v1.ControlPlane/RaftAddPeer",
    "/rayctl.v1.ControlPlane/RaftRemovePeer",
];

/// Paths a GET may fetch without a credential: the dashboard's page and its static assets,
/// which hold no cluster data (every number on the page comes from token-checked APIs, and
/// the page shows its login form when they answer 401).
pub const PUBLIC_PATHS: &[&str] = &[
    "/",
    // Whether this browser's cookie is good (a yes or no, nothing about the cluster), so
    // the page can show its login form without a failed request first.
    "/api/rayctl/session",
    "/dashboard/app.js",
    "/dashboard/style.css",
    "/favicon.ico",
];

/// The browser cookie that carries the token (Ray's name, set by `POST /api/authenticate`).
pub const AUTH_COOKIE: &str = "ray-authentication-token";

/// Which Host names and Origins a browser may use on our HTTP listeners (DNS rebinding and
/// cross-site requests). IP literals and `localhost` are always allowed hosts: a rebinding
/// attack needs a name the attacker controls.
#[derive(Clone, Debug, Default)]
pub struct HostPolicy {
    /// Extra host names served (the advertised host, hosts of allowed origins), lowercase.
    pub names: Vec<String>,
    /// Origins allowed besides the same origin, e.g. `https://dash.example.com`.
    pub origins: Vec<String>,
}

fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

impl HostPolicy {
    pub fn new(served: &[String], origins: &[String]) -> Self {
        let mut names: Vec<String> = served
            .iter()
            .map(|h| host_name(h).to_ascii_lowercase())
            .collect();
        for o in origins {
            let rest = o.split("://").nth(1).unwrap_or(o);
            names.push(host_name(rest.trim_end_matches('/')).to_ascii_lowercase());
        }
        Self {
            names,
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        name.parse::<std::net::IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// Same origin as `host`, or listed.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let o = origin.trim_end_matches('/').to_ascii_lowercase();
        let rest = o
            .strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"));
        if let (Some(rest), Some(h)) = (rest, host)
            && rest.eq_ignore_ascii_case(h)
        {
            return true;
        }
        self.origins.contains(&o)
    }
}

/// Who may call a listener: the cluster token (none: auth disabled), the heads' peer secret
/// for [`PEER_PATHS`], and the browser policy for plain HTTP.
#[derive(Clone, Debug, Default)]
pub struct Access {
    pub token: Option<AuthToken>,
    pub peer: Option<AuthToken>,
    pub hosts: std::sync::Arc<HostPolicy>,
}

impl Access {
    pub fn token(token: Option<AuthToken>) -> Self {
        Self {
            token,
            ..Self::default()
        }
    }
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The credential a request carries: `authorization` or `x-ray-authorization`
/// (`Bearer T`), or, from a browser, the `ray-authentication-token` cookie.
fn presented(req: &Request) -> Option<&str> {
    presented_in(req.headers())
}

/// [`presented`] for handlers that see only the headers.
pub fn presented_in(headers: &axum::http::HeaderMap) -> Option<&str> {
    for h in ["authorization", "x-ray-authorization"] {
        if let Some(t) = headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return Some(t.trim());
        }
    }
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(AUTH_COOKIE)?.strip_prefix('='))
}

fn refuse(req: &Request, missing: bool, msg: &str) -> Response {
    if is_grpc(req) {
        let status: tonic::Status = RpcError::Unauthenticated(msg.into()).into();
        return status.into_http::<Body>().into_response();
    }
    // Ray's dashboard: 401 without a token, 403 with a wrong one.
    let code = if missing {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    (code, format!("{msg}\n")).into_response()
}

/// A browser request from a foreign Host (DNS rebinding) or Origin (cross-site) is refused
/// before anything else; gRPC callers are not browsers.
fn browser_check(access: &Access, req: &Request) -> Option<Response> {
    if is_grpc(req) {
        return None;
    }
    let host = header(req, "host").or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(h) = host
        && !access.hosts.host_allowed(h)
    {
        return Some(
            (
                StatusCode::FORBIDDEN,
                format!(
                    "host {h:?} is not an address this server serves (add it with --dashboard-allowed-origins)\n"
                ),
            )
                .into_response(),
        );
    }
    if let Some(o) = header(req, "origin")
        && !access.hosts.origin_allowed(o, host)
    {
        return Some(
            (
                StatusCode::FORBIDDEN,
                format!("cross-origin request from {o:?} refused (allow it with --dashboard-allowed-origins)\n"),
            )
                .into_response(),
        );
    }
    None
}

async fn check_access(State(access): State<Access>, req: Request, next: Next) -> Response {
    if let Some(r) = browser_check(&access, &req) {
        return r;
    }
    let path = req.uri().path();
    if req.method() == axum::http::Method::GET && PUBLIC_PATHS.contains(&path) {
        return next.run(req).await;
    }
    let needed = match &access.peer {
        Some(p) if PEER_PATHS.iter().any(|pp| path.starts_with(pp)) => {
            return match presented(&req) {
                Some(t) if p.matches(t) => next.run(req).await,
                given => refuse(
                    &req,
                    given.is_none(),
                    "raft and membership RPCs take only the heads' peer secret (the cluster token does not open them)",
                ),
            };
        }
        _ => &access.token,
    };
    let Some(t) = needed else {
        return next.run(req).await;
    };
    match presented(&req) {
        Some(g) if t.matches(g) => next.run(req).await,
        None => refuse(
            &req,
            true,
            "missing cluster token: this cluster requires one (rayctl and the SDK read it from RAYCTL_AUTH_TOKEN, RAYCTL_AUTH_TOKEN_PATH or ~/.rayctl/auth_token; Ray's clients need RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)",
        ),
        Some(_) => refuse(&req, false, "wrong cluster token"),
    }
}

/// Records latency and status per method, and turns tonic's OUT_OF_RANGE for an oversize
/// message into RESOURCE_EXHAUSTED, the code gRPC specifies for it.
async fn rpc_metrics(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // Bounded label set: only our own methods get their name.
    let method = if path.starts_with("/rayctl.v1.") {
        path.rsplit('/').next().unwrap_or("other").to_string()
    } else {
        "other".into()
    };
    let start = Instant::now();
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    remap_too_large(h);
    let code = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0")
        .to_string();
    // tonic reports a decode failure in the trailers: remap there too.
    let resp = resp.map(|b| {
        Body::new(http_body_util::BodyExt::map_frame(b, |mut f| {
            if let Some(t) = f.trailers_mut() {
                remap_too_large(t);
            }
            f
        }))
    });
    metrics::histogram!(RPC_LATENCY, "method" => method.clone())
        .record(start.elapsed().as_secs_f64());
    metrics::counter!(RPC_REQUESTS, "method" => method, "code" => code).increment(1);
    resp
}

fn remap_too_large(h: &mut axum::http::HeaderMap) {
    let too_large = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if too_large {
        h.insert("grpc-status", HeaderValue::from_static("8"));
    }
}

/// The axum router serving `routes` (gRPC) behind the access check and RPC metrics.
pub fn grpc_router(routes: tonic::service::Routes, access: Access) -> Router {
    routes
        .into_axum_router()
        .layer(middleware::from_fn(rpc_metrics))
        .layer(middleware::from_fn_with_state(access, check_access))
}

/// Adds the access check to an HTTP router (REST, `/metrics`).
pub fn with_access(router: Router, access: Access) -> Router {
    router.layer(middleware::from_fn_with_state(access, check_access))
}

/// `GET /metrics` in Prometheus text format, rendered by `render`.
pub fn metrics_route<F>(render: F) -> Router
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], render()) }
        }),
    )
}

/// Serves `router` on `listener` (HTTP/1 and h2c, so gRPC and REST alike) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Renders a process's Prometheus metrics (the binary installs the recorder).
pub type MetricsRender = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// The running listeners of one daemon: gRPC on one port, HTTP (`/metrics`, later REST) on
/// another, both behind the token check. `stop` ends both gracefully.
pub struct Listeners {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Listeners {
    /// Serves `routes` on `grpc`, and `/metrics` rendered by `metrics` plus `http_routes`
    /// (REST) on `http`.
    pub fn spawn(
        grpc: TcpListener,
        routes: tonic::service::Routes,
        http: TcpListener,
        http_routes: Router,
        metrics: Option<MetricsRender>,
        access: Access,
    ) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let http_router = with_access(
            metrics_route(move || metrics.as_ref().map(|r| r()).unwrap_or_default())
                .merge(http_routes),
            access.clone(),
        );
        let grpc_router = grpc_router(routes, access);
        let mut tasks = Vec::new();
        for (name, listener, router) in [("gRPC", grpc, grpc_router), ("HTTP", http, http_router)] {
            let stopped = until_stopped(rx.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = serve(listener, router, stopped).await {
                    tracing::error!("{name} server stopped: {e}");
                }
            }));
        }
        Self { stop, tasks }
    }

    /// Stops accepting and ends both servers.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
        }
    }
}
