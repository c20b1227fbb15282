//! Who may read, from which origins, and the headers every answer carries.
//!
//! Reading is open unless `[http] read_token` is set; then the page and the read API need it, as
//! `Authorization: Bearer <token>` (tools, Grafana) or as the cookie that `/?token=<token>` sets
//! (a browser cannot put a header on a page load or an `EventSource`). Ingest paths authenticate
//! agents themselves, and `/healthz` and `/metrics` stay open for load balancers and Prometheus.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The cookie the page's token lives in.
pub const COOKIE: &str = "tributary_read";

/// Paths that do their own authentication (agents' tokens) or must stay open.
const OPEN: &[&str] = &["/healthz", "/metrics", "/favicon.ico", "/api/v1/ingest", "/write", "/ping", "/query"];

/// `default-src 'self'`: the page loads nothing from elsewhere (it works without internet).
/// Inline styles are allowed because the chart library sizes its elements with them.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub struct Access {
    pub read_token: Option<String>,
}

impl Access {
    fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.read_token else { return true };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let cookie = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
            v.split(';').filter_map(|pair| pair.trim().split_once('=')).find(|(k, _)| *k == COOKIE).map(|(_, t)| t)
        });
        [bearer, cookie].into_iter().flatten().any(|given| bool::from(given.as_bytes().ct_eq(expected.as_bytes())))
    }
}

/// The read guard and the security headers, as one middleware.
pub async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    // Agents report their dropped ranges with their own tokens; reading the gaps needs the read token.
    let agent_report = path == "/api/v1/gaps" && request.method() == axum::http::Method::POST;
    let open = OPEN.contains(&path) || path.starts_with("/assets/") || agent_report;
    let mut response = if open || access.allows(request.headers()) {
        next.run(request).await
    } else if path == "/" {
        page_login(&access, request.uri().query())
    } else {
        refused()
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CONTENT_SECURITY_POLICY, CSP),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn refused() -> Response {
    let body = serde_json::json!({
        "error": "unauthorized",
        "detail": "reading needs the read token ([http] read_token): send Authorization: Bearer <token>",
    });
    let mut response = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// `/?token=<t>` with the right token sets the cookie and goes to the page; anything else gets a
/// form that asks for it.
fn page_login(access: &Access, query: Option<&str>) -> Response {
    let given = query.into_iter().flat_map(|q| url::form_urlencoded::parse(q.as_bytes())).find(|(k, _)| k == "token");
    if let (Some((_, given)), Some(expected)) = (given, &access.read_token) {
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            let cookie = format!("{COOKIE}={expected}; Path=/; HttpOnly; SameSite=Strict; Max-Age=31536000");
            let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            return response;
        }
    }
    let form = "<!doctype html><meta charset=utf-8><title>Tributary</title>\
        <meta name=viewport content=\"width=device-width\">\
        <form method=get action=/ style=\"font:16px system-ui;margin:20vh auto;max-width:20em\">\
        <p>This dashboard needs its read token (<code>[http] read_token</code>).</p>\
        <input name=token type=password autofocus required style=\"width:100%;font:inherit\">\
        <p><button>Open</button></form>";
    (StatusCode::UNAUTHORIZED, Html(form)).into_response()
}

/// CORS for the configured origins: reads only (GET, HEAD), with the headers a reader sends.
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::HEAD])
            .allow_headers([header::AUTHORIZATION, header::ACCEPT, header::HeaderName::from_static("last-event-id")])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}
