//! The HTTP surface: routes, shared state, and the read side of the dashboard API.
//!
//! Reads go to `store.db` on pooled read-only connections in blocking threads, so a slow query
//! never stalls ingest on the async workers. Every read is bounded: lists are paged
//! ([`MAX_PAGE`]), window queries are capped ([`MAX_WINDOWS`]). Errors are JSON
//! `{"error": "<code>", "detail": "<what to do>"}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::log::LogHandle;
use crate::metrics::{self, Metrics};
use crate::process::ProcessorStatus;
use crate::store::{self, SensorRow, SetAsideRow, StoreError, StoreReader, WINDOW_MS};
use crate::{Liveness, dashboard, ingest};

/// Largest window `?size=` accepts.
const MAX_WINDOW: Duration = Duration::from_secs(86_400);
/// Rows a list returns when `?limit=` is not given.
pub const DEFAULT_PAGE: usize = 1_000;
/// Largest `?limit=`.
pub const MAX_PAGE: usize = 10_000;
/// Most windows one `/windows` request returns (a week of 1-minute windows is 10,080).
pub const MAX_WINDOWS: usize = 10_000;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub agents: Arc<[AgentConfig]>,
    pub log: LogHandle,
    pub store: StoreReader,
    pub metrics: Arc<Metrics>,
    pub writer_alive: Liveness,
    pub processor_alive: Liveness,
    pub processor_status: ProcessorStatus,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/ingest", post(ingest::ingest))
        .route("/api/v1/sensors", get(list_sensors))
        .route("/api/v1/sensors/{id}", get(one_sensor))
        .route("/api/v1/sensors/{id}/windows", get(sensor_windows))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/set-aside", get(list_set_aside))
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("the serving store cannot be read now ({0}); try again shortly")]
    Store(#[from] StoreError),
}

impl ApiError {
    /// The status and the stable, machine-readable code.
    fn kind(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.kind();
        if let ApiError::Store(error) = &self {
            tracing::error!(%error, "store query failed");
        }
        (status, Json(serde_json::json!({ "error": code, "detail": self.to_string() }))).into_response()
    }
}

async fn unknown_path(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such path {}: the API is under /api/v1/ (see the README)", uri.path()))
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} does not take {method}", uri.path()))
}

async fn healthz(State(app): State<AppState>) -> Response {
    if !app.writer_alive.is_alive() {
        return (StatusCode::SERVICE_UNAVAILABLE, "log writer is not running").into_response();
    }
    if !app.processor_alive.is_alive() {
        return (StatusCode::SERVICE_UNAVAILABLE, "processor is not running").into_response();
    }
    match app.processor_status.stalled() {
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => (StatusCode::OK, "ok").into_response(),
    }
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    // Derived at scrape time, so they are current even while the processor waits out a backoff.
    let metrics = &app.metrics;
    metrics.processor_lag_readings.set((metrics.log_end_offset.get() - metrics.processor_offset.get()).max(0));
    metrics.processor_stalled.set(i64::from(app.processor_status.stalled().is_some()));
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics.encode()).into_response()
}

/// `?limit=`: empty or missing means [`DEFAULT_PAGE`].
fn page_limit(text: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(DEFAULT_PAGE);
    };
    match text.parse::<u64>() {
        Ok(n) if (1..=MAX_PAGE as u64).contains(&n) => Ok(n as usize),
        _ => Err(ApiError::BadRequest(format!(
            "limit {text:?} must be a whole number from 1 to {MAX_PAGE} (the cap); follow the Link: rel=\"next\" \
             header for more"
        ))),
    }
}

/// Percent-encodes a query-string value (everything but RFC 3986 unreserved characters).
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A JSON list with, when more rows follow, `Link: <next page>; rel="next"` (RFC 8288), so the
/// body stays the plain array it always was.
fn paged<T: Serialize>(rows: Vec<T>, next: Option<String>) -> Response {
    let mut response = Json(rows).into_response();
    if let Some(next) = next.and_then(|url| HeaderValue::from_str(&format!("<{url}>; rel=\"next\"")).ok()) {
        response.headers_mut().insert(header::LINK, next);
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SensorQuery {
    limit: Option<String>,
    after: Option<String>,
    prefix: Option<String>,
}

/// `GET /api/v1/sensors?limit=&after=&prefix=`: sensors sorted by id, a page at a time.
async fn list_sensors(
    State(app): State<AppState>,
    query: Result<Query<SensorQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_limit(query.limit.as_deref())?;
    let prefix = query.prefix.unwrap_or_default();
    let after = query.after.filter(|a| !a.is_empty());
    let (p, a) = (prefix.clone(), after.clone());
    let page = app.store.read(move |conn| store::sensors(conn, &p, a.as_deref(), limit)).await?;
    let next = match page.rows.last() {
        Some(last) if page.more => {
            let mut url = format!("/api/v1/sensors?limit={limit}&after={}", encode_query_value(&last.id));
            if !prefix.is_empty() {
                url.push_str(&format!("&prefix={}", encode_query_value(&prefix)));
            }
            Some(url)
        }
        _ => None,
    };
    Ok(paged(page.rows, next))
}

fn sensor_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|e| ApiError::BadRequest(format!("bad sensor id in the path: {e}")))
}

async fn find_sensor(app: &AppState, id: String) -> Result<SensorRow, ApiError> {
    let lookup = id.clone();
    app.store
        .read(move |conn| store::sensor(conn, &lookup))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no sensor `{id}` (yet): nothing from it has been processed")))
}

async fn one_sensor(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SensorRow>, ApiError> {
    let id = sensor_id(path)?;
    Ok(Json(find_sensor(&app, id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowQuery {
    size: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// An optional Unix-ms bound; `from=` (empty) means no bound, as in `?size=1m&from=&to=`.
fn bound(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            ApiError::BadRequest(format!("{name} {text:?} is not a Unix time in milliseconds (a whole number)"))
        }),
    }
}

#[derive(Debug, Serialize, PartialEq)]
struct WindowRow {
    start: i64,
    end: i64,
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
}

/// Parses `?size=` (humantime): a whole number of minutes, at most a day.
fn window_size(size: Option<&str>) -> Result<i64, ApiError> {
    let Some(text) = size else {
        return Ok(WINDOW_MS);
    };
    let size = humantime::parse_duration(text)
        .map_err(|e| ApiError::BadRequest(format!("size {text:?} is not a duration like 1m, 5m, 1h, 1d: {e}")))?;
    if size.is_zero() || size > MAX_WINDOW || size.as_millis() % WINDOW_MS as u128 != 0 {
        return Err(ApiError::BadRequest(format!(
            "size {text:?} must be a whole number of minutes between 1m and 1d (windows are stored per minute)"
        )));
    }
    Ok(size.as_millis() as i64)
}

/// The 1-minute windows to read for whole windows of `size` with `from <= start < to`: those in
/// `[align_up(from), align_up(to))`. `None` if no window can start in the range. Query
/// parameters are any `i64`, so every step is checked.
fn minute_range(from: Option<i64>, to: Option<i64>, size: i64) -> Option<(i64, i64)> {
    let lo = store::align_up(from.unwrap_or(i64::MIN), size)?;
    // A window can start at most at the last multiple of `size` below `to`.
    let hi = to.map_or(i64::MAX, |to| store::align_up(to, size).unwrap_or(i64::MAX));
    (lo < hi).then_some((lo, hi))
}

async fn sensor_windows(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Json<Vec<WindowRow>>, ApiError> {
    let id = sensor_id(path)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let size_text = query.size.as_deref().filter(|s| !s.trim().is_empty());
    let size = window_size(size_text)?;
    let from = bound("from", query.from.as_deref())?;
    let to = bound("to", query.to.as_deref())?;
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            return Err(ApiError::BadRequest(format!(
                "from ({from}) is after to ({to}): the range is from <= start < to"
            )));
        }
    }
    find_sensor(&app, id.clone()).await?;
    let Some((lo, hi)) = minute_range(from, to, size) else {
        return Ok(Json(Vec::new()));
    };
    let windows = app.store.read(move |conn| store::windows(conn, &id, lo, hi, size, MAX_WINDOWS)).await?;
    let Some(windows) = windows else {
        return Err(ApiError::BadRequest(format!(
            "this range holds more than {MAX_WINDOWS} windows of {} (the cap per request): ask for a larger size \
             (e.g. size=1h or 1d) or a narrower from/to",
            size_text.unwrap_or("1m")
        )));
    };
    let rows = windows
        .into_iter()
        .map(|(start, w)| WindowRow {
            start,
            end: start.saturating_add(size),
            count: w.count,
            min: w.min,
            max: w.max,
            mean: w.mean,
        })
        .collect();
    Ok(Json(rows))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetAsideQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /api/v1/set-aside?limit=&after=`: log blocks the processor left out of the store.
async fn list_set_aside(
    State(app): State<AppState>,
    query: Result<Query<SetAsideQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_limit(query.limit.as_deref())?;
    let after = match query.after.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
        None => None,
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("after {text:?} must be a log offset (a whole number)")))?,
        ),
    };
    let page = app.store.read(move |conn| store::set_aside(conn, after, limit)).await?;
    let next = match page.rows.last() {
        Some(last) if page.more => Some(format!("/api/v1/set-aside?limit={limit}&after={}", last.first_offset)),
        _ => None,
    };
    Ok(paged::<SetAsideRow>(page.rows, next))
}

#[derive(Debug, Serialize)]
struct AgentView {
    id: String,
    last_seen: Option<i64>,
    readings: u64,
}

async fn list_agents(State(app): State<AppState>) -> Result<Json<Vec<AgentView>>, ApiError> {
    let seen = app.store.read(store::agents).await?;
    let mut agents: Vec<AgentView> = app
        .agents
        .iter()
        .map(|agent| {
            let row = seen.iter().find(|row| row.id == agent.id);
            AgentView {
                id: agent.id.clone(),
                last_seen: row.map(|r| r.last_seen),
                readings: row.map_or(0, |r| r.readings),
            }
        })
        .collect();
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(agents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sizes_are_whole_minutes_up_to_a_day() {
        assert_eq!(window_size(None).unwrap(), 60_000);
        assert_eq!(window_size(Some("5m")).unwrap(), 300_000);
        assert_eq!(window_size(Some("1h")).unwrap(), 3_600_000);
        assert_eq!(window_size(Some("1d")).unwrap(), 86_400_000);
        for bad in ["90s", "0m", "2d", "soon", "1m30s"] {
            assert!(matches!(window_size(Some(bad)), Err(ApiError::BadRequest(_))), "{bad}");
        }
    }

    #[test]
    fn window_ranges_never_overflow() {
        const DAY: i64 = 86_400_000;
        // Every i64 is a valid query parameter: the range is clipped, never wrapped or panicking.
        let (lo, hi) = minute_range(Some(i64::MIN), Some(i64::MAX), DAY).unwrap();
        assert!(lo <= i64::MIN + DAY && lo % DAY == 0, "{lo}");
        assert_eq!(hi, i64::MAX);
        assert_eq!(minute_range(Some(i64::MAX), None, DAY), None, "no window starts after the last multiple");
        assert_eq!(minute_range(Some(i64::MAX - 1), Some(i64::MAX), 60_000), None);
        assert_eq!(minute_range(None, Some(i64::MIN), 60_000), None);
        assert_eq!(minute_range(Some(5), Some(5), 60_000), None);
        assert_eq!(minute_range(Some(1), Some(60_001), 60_000), Some((60_000, 120_000)));
        assert_eq!(minute_range(Some(-1), Some(0), 60_000), None, "start 0 is not < to 0");
    }

    #[test]
    fn page_limits_default_and_are_capped() {
        assert_eq!(page_limit(None).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_limit(Some("")).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_limit(Some("10000")).unwrap(), 10_000);
        for bad in ["0", "10001", "-1", "lots", "99999999999999999999999"] {
            let Err(ApiError::BadRequest(detail)) = page_limit(Some(bad)) else { panic!("{bad} accepted") };
            assert!(detail.contains("10000"), "{detail}");
        }
    }

    #[test]
    fn cursors_are_percent_encoded() {
        assert_eq!(encode_query_value("site/room 1&x=ü"), "site%2Froom%201%26x%3D%C3%BC");
    }
}
