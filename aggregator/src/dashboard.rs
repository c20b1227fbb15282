//! `GET /`: one static page (vanilla JS, no build step, no CDN) over the JSON API.

use axum::http::header;
use axum::response::{Html, IntoResponse};

const PAGE: &str = include_str!("dashboard.html");
const ICON: &str = include_str!("favicon.svg");

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `GET /favicon.ico`: browsers ask for it on every page load; an answer spares a 404 each time.
pub async fn icon() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "image/svg+xml"), (header::CACHE_CONTROL, "max-age=86400")], ICON)
}
