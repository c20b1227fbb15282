//! The dashboard: one page, its script and styles, and the chart library (uPlot, vendored from the
//! npm registry with its licence), all compiled into the binary: no build step for users, no CDN,
//! works without internet.

use axum::extract::Path;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

use crate::api::ApiError;

const PAGE: &str = include_str!("assets/index.html");
const ICON: &str = include_str!("favicon.svg");

/// (name under `/assets/`, content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript; charset=utf-8", include_str!("assets/app.js")),
    ("app.css", "text/css; charset=utf-8", include_str!("assets/app.css")),
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8", include_str!("assets/uplot/uPlot.iife.min.js")),
    ("uPlot.min.css", "text/css; charset=utf-8", include_str!("assets/uplot/uPlot.min.css")),
    ("uPlot.LICENSE", "text/plain; charset=utf-8", include_str!("assets/uplot/LICENSE")),
];

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `GET /assets/<name>`. Revalidated on every load (`no-cache`), so an upgraded binary's page
/// never runs an old script.
pub async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (_, content_type, body) =
        ASSETS.iter().find(|(n, _, _)| *n == name).ok_or_else(|| ApiError::NotFound(format!("no asset {name:?}")))?;
    Ok(([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], *body).into_response())
}

/// `GET /favicon.ico`: browsers ask for it on every page load; an answer spares a 404 each time.
pub async fn icon() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "image/svg+xml"), (header::CACHE_CONTROL, "max-age=86400")], ICON)
}
