//! The web dashboard every head serves at `GET /` on its HTTP port (Ray's port 8265).
//!
//! One page and two assets, built into the binary (`include_str!`): no CDN, no npm step, it
//! works with no internet. The page itself holds no cluster data, so it and its assets are
//! public ([`protocol::server::PUBLIC_PATHS`]); everything it shows comes from the
//! token-checked APIs on the same port (the Jobs API, Ray's State API, `/api/rayctl/*`),
//! through the cluster API, so a follower's dashboard shows what the leader knows. Without
//! the `ray-authentication-token` cookie those answer 401; the page asks the public
//! `/api/rayctl/session` first and shows its login form,
//! which posts the token to `/api/authenticate` (it sets the `HttpOnly; SameSite=Strict`
//! cookie). Live updates are polling.
//!
//! `RAYCTL_DASHBOARD_DIR`, when set, serves the assets from that directory instead (for
//! working on the page without rebuilding).

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use protocol::auth::AuthToken;
use serde_json::json;

const INDEX: &str = include_str!("dashboard/index.html");
const APP: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

#[derive(Clone)]
struct Dash {
    token: Option<AuthToken>,
    grafana_host: Option<String>,
    grafana_iframe_host: Option<String>,
}

/// The dashboard's routes. `grafana_host` (Ray's `RAY_GRAFANA_HOST`) is where the metrics page
/// embeds panels from; `grafana_iframe_host` (Ray's `RAY_GRAFANA_IFRAME_HOST`) overrides the
/// address the browser uses for them.
pub(crate) fn router(
    token: Option<AuthToken>,
    grafana_host: Option<String>,
    grafana_iframe_host: Option<String>,
) -> Router {
    let dash = Dash {
        token,
        grafana_host,
        grafana_iframe_host,
    };
    let frame_src = dash
        .iframe_host()
        .map(|h| format!(" frame-src {h};"))
        .unwrap_or_default();
    let csp = format!(
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self';{frame_src} frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    );
    let page = move |name: &'static str, builtin: &'static str, ctype: &'static str| {
        let csp = csp.clone();
        get(move || async move { asset(name, builtin, ctype, &csp) })
    };
    let config = dash.clone();
    let session = dash.clone();
    Router::new()
        .route("/", page("index.html", INDEX, "text/html; charset=utf-8"))
        .route(
            "/dashboard/app.js",
            page("app.js", APP, "text/javascript; charset=utf-8"),
        )
        .route(
            "/dashboard/style.css",
            page("style.css", STYLE, "text/css; charset=utf-8"),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/api/rayctl/session",
            get(move |headers: axum::http::HeaderMap| {
                let d = session.clone();
                async move {
                    let ok = match &d.token {
                        None => true,
                        Some(t) => protocol::server::presented_in(&headers)
                            .is_some_and(|given| t.matches(given)),
                    };
                    axum::Json(json!({
                        "auth_required": d.token.is_some(),
                        "authenticated": ok,
                    }))
                }
            }),
        )
        .route(
            "/api/rayctl/dashboard",
            get(move || {
                let c = config.clone();
                async move {
                    axum::Json(json!({
                        "version": env!("CARGO_PKG_VERSION"),
                        "grafana_host": c.iframe_host(),
                        "grafana_dashboard_uid": "rayctl",
                    }))
                }
            }),
        )
}

impl Dash {
    fn iframe_host(&self) -> Option<String> {
        self.grafana_iframe_host
            .clone()
            .or_else(|| self.grafana_host.clone())
            .map(|h| h.trim_end_matches('/').to_owned())
            .filter(|h| !h.is_empty())
    }
}

fn asset(name: &str, builtin: &'static str, ctype: &'static str, csp: &str) -> Response {
    let body = match std::env::var_os("RAYCTL_DASHBOARD_DIR") {
        Some(dir) => match std::fs::read_to_string(std::path::Path::new(&dir).join(name)) {
            Ok(s) => s,
            Err(e) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("RAYCTL_DASHBOARD_DIR: cannot read {name}: {e}"),
                )
                    .into_response();
            }
        },
        None => builtin.to_owned(),
    };
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}
