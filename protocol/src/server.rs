//! Server-side plumbing every gRPC and HTTP listener of ours shares: the cluster-token check,
//! RPC metrics, the RESOURCE_EXHAUSTED mapping for oversize messages, `/metrics`, and `serve`.
//!
//! Invariant: a request without the configured token never reaches a service; gRPC callers get
//! UNAUTHENTICATED, HTTP callers 401.

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

async fn check_token(State(token): State<Option<AuthToken>>, req: Request, next: Next) -> Response {
    let Some(t) = &token else {
        return next.run(req).await;
    };
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if t.matches_header(header) {
        return next.run(req).await;
    }
    if is_grpc(&req) {
        let status: tonic::Status =
            RpcError::Unauthenticated("missing or wrong cluster token".into()).into();
        return status.into_http::<Body>().into_response();
    }
    (StatusCode::UNAUTHORIZED, "missing or wrong cluster token\n").into_response()
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

/// The axum router serving `routes` (gRPC) behind the token check and RPC metrics.
pub fn grpc_router(routes: tonic::service::Routes, token: Option<AuthToken>) -> Router {
    routes
        .into_axum_router()
        .layer(middleware::from_fn(rpc_metrics))
        .layer(middleware::from_fn_with_state(token, check_token))
}

/// Adds the token check to an HTTP router (REST, `/metrics`).
pub fn with_token(router: Router, token: Option<AuthToken>) -> Router {
    router.layer(middleware::from_fn_with_state(token, check_token))
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
        token: Option<AuthToken>,
    ) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let http_router = with_token(
            metrics_route(move || metrics.as_ref().map(|r| r()).unwrap_or_default())
                .merge(http_routes),
            token.clone(),
        );
        let grpc_router = grpc_router(routes, token);
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
