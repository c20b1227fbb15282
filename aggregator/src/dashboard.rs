//! `GET /`: one static page (vanilla JS, no build step, no CDN) over the JSON API.

use axum::response::Html;

const PAGE: &str = include_str!("dashboard.html");

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}
