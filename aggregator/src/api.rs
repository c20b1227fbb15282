//! The HTTP surface: routes, shared state, and the read side of the dashboard API.
//!
//! Reads go to `store.db` on pooled read-only connections in blocking threads, so a slow query
//! never stalls ingest on the async workers. Every list is paged or capped; a request beyond a
//! cap gets a 400 that names it. Errors are JSON `{"error": code, "detail": text}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, parse_glob, parse_window_size};
use crate::log::LogHandle;
use crate::metrics::{self, Metrics};
use crate::pipeline::calendar::Calendar;
use crate::pipeline::window::Window;
use crate::store::{self, SensorRow, SetAsideRow, StoreError, StoreReader};
use crate::{Liveness, access, dashboard, ingest, json, prometheus, series, unix_ms};

/// Most windows one request for one sensor returns (a week of 1-minute windows).
pub const MAX_WINDOWS: usize = 10_000;
/// Most windows a multi-sensor read returns in all (1,000 sensors' last hour of 1-minute
/// windows is 60,000; about 15 MB of JSON).
pub const MAX_MULTI_WINDOWS: usize = 100_000;
/// Default and largest page of `/api/v1/sensors`.
pub const DEFAULT_SENSORS_PAGE: usize = 1_000;
pub const MAX_SENSORS_PAGE: usize = 10_000;

/// What the API needs to know of the pipeline's configuration.
pub struct ApiLayout {
    /// The stored window calendars, finest first.
    pub calendars: Vec<Calendar>,
    pub stale_after: Duration,
    /// (glob, threshold) exceptions to `stale_after`, first match wins.
    pub stale: Vec<(globset::GlobMatcher, Duration)>,
}

impl ApiLayout {
    pub fn from_config(config: &crate::Config) -> ApiLayout {
        ApiLayout {
            calendars: config.pipeline_spec().calendars,
            stale_after: config.pipeline.stale_after,
            stale: config
                .pipeline
                .stale
                .iter()
                .filter_map(|s| parse_glob(&s.sensor).ok().map(|g| (g, s.after)))
                .collect(),
        }
    }

    fn stale_after(&self, sensor: &str) -> Duration {
        self.stale.iter().find(|(g, _)| g.is_match(sensor)).map_or(self.stale_after, |(_, d)| *d)
    }

    /// The sizes a query can ask for, for error messages.
    pub(crate) fn sizes(&self) -> String {
        let names: Vec<String> = self
            .calendars
            .iter()
            .map(|c| match c {
                Calendar::Fixed(_) => format!("{} (and its multiples)", c.label()),
                Calendar::Days { .. } => format!("day ({})", c.label()),
            })
            .collect();
        names.join(", ")
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub agents: Arc<[AgentConfig]>,
    pub log: LogHandle,
    pub store: StoreReader,
    pub metrics: Arc<Metrics>,
    pub writer_alive: Liveness,
    /// Pipeline versions: which one serves, the serving processor's health, replay progress.
    pub versions: Arc<crate::versions::Versions>,
    /// `stale.db`, when stale-sensor rules are configured.
    pub stale: Option<StoreReader>,
    pub access: Arc<access::Access>,
    pub cors_origins: Arc<[String]>,
    pub live: crate::live::Hub,
    /// Each agent's last contact and spool backlog.
    pub fleet: Arc<crate::fleet::Fleet>,
    /// `log.db`, for what only the log knows (gaps).
    pub log_path: std::path::PathBuf,
}

/// `GET /api/v1/openapi.json`.
async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], crate::openapi::document()).into_response()
}

/// `GET /api/v1/pipeline`: the serving version and every version's state, progress and checksum.
async fn pipeline(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let versions = app.versions.clone();
    let (serving, list) = tokio::task::spawn_blocking(move || versions.status())
        .await
        .map_err(|e| ApiError::Unavailable(format!("the pipeline status failed: {e}")))?;
    Ok(Json(serde_json::json!({ "serving": serving, "versions": list })))
}

impl AppState {
    /// The serving version's layout (its window sizes; staleness settings).
    pub fn layout(&self) -> Arc<ApiLayout> {
        self.versions.layout()
    }

    /// The serving layout and a snapshot of its store, for a request that plans with the layout
    /// and then reads (see [`crate::versions::Versions::serving_view`]).
    pub fn serving(&self) -> (Arc<ApiLayout>, store::StoreSnapshot) {
        self.versions.serving_view(&self.store)
    }
}

pub fn router(state: AppState) -> Router {
    let (access, cors) = (state.access.clone(), access::cors(&state.cors_origins));
    let router = Router::new()
        .route("/", get(dashboard::page))
        .route("/favicon.ico", get(dashboard::icon))
        .route("/assets/{name}", get(dashboard::asset))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/ingest", post(ingest::ingest))
        .route("/api/v1/sensors", get(list_sensors))
        .route("/api/v1/sensors/{*rest}", get(sensor_path))
        .route("/api/v1/windows", get(multi_windows))
        .route("/api/v1/latest", get(latest))
        .route("/api/v1/pipeline", get(pipeline))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/stream", get(crate::live::stream))
        .route("/prometheus/api/v1/query_range", get(prometheus::query_range).post(prometheus::query_range))
        .route("/prometheus/api/v1/query", get(prometheus::query).post(prometheus::query))
        .route("/prometheus/api/v1/series", get(prometheus::series).post(prometheus::series))
        .route("/prometheus/api/v1/labels", get(prometheus::label_names).post(prometheus::label_names))
        .route("/prometheus/api/v1/label/{name}/values", get(prometheus::label_values))
        .route("/prometheus/api/v1/status/buildinfo", get(prometheus::buildinfo))
        .route("/prometheus/api/v1/metadata", get(prometheus::metadata))
        .route("/api/v1/quarantine", get(list_quarantine))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/set-aside", get(list_set_aside))
        .route("/api/v1/gaps", get(list_gaps).post(ingest::report_gaps))
        .route("/api/v1/anomalies", get(list_anomalies))
        .route("/api/v1/alerts", get(list_alerts))
        .route("/write", post(crate::influx::write))
        .route("/ping", get(crate::influx::ping))
        .route("/query", get(crate::influx::query).post(crate::influx::query))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(access, access::guard));
    // Outermost, so a browser's preflight is answered before the read guard asks for a token.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
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
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// The status and the stable, machine-readable code.
    fn kind(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Store(_) | ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
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

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no such path {}: the API is under /api/v1/ (see the README)", uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} does not take {method}", uri.path()))
}

async fn healthz(State(app): State<AppState>) -> Response {
    if !app.writer_alive.is_alive() {
        return (StatusCode::SERVICE_UNAVAILABLE, "log writer is not running").into_response();
    }
    if !app.versions.processor_alive() {
        return (StatusCode::SERVICE_UNAVAILABLE, "processor is not running").into_response();
    }
    match app.versions.processor_stalled() {
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => (StatusCode::OK, "ok").into_response(),
    }
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    // Derived at scrape time, so they are current even while the processor waits out a backoff.
    let metrics = &app.metrics;
    metrics.processor_lag_readings.set((metrics.log_end_offset.get() - metrics.processor_offset.get()).max(0));
    metrics.processor_stalled.set(i64::from(app.versions.processor_stalled().is_some()));
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics.encode()).into_response()
}

/// `?limit=`: empty or missing means [`DEFAULT_SENSORS_PAGE`].
fn page_limit(text: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(DEFAULT_SENSORS_PAGE);
    };
    match text.parse::<u64>() {
        Ok(n) if (1..=MAX_SENSORS_PAGE as u64).contains(&n) => Ok(n as usize),
        _ => Err(ApiError::BadRequest(format!(
            "limit {text:?} must be a whole number from 1 to {MAX_SENSORS_PAGE} (the cap); follow the Link: \
             rel=\"next\" header for more"
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
/// body stays a plain array.
fn paged<T: Serialize>(rows: Vec<T>, next: Option<String>) -> Response {
    let mut response = Json(rows).into_response();
    if let Some(next) = next.and_then(|url| HeaderValue::from_str(&format!("<{url}>; rel=\"next\"")).ok()) {
        response.headers_mut().insert(header::LINK, next);
    }
    response
}

/// A sensor with its freshness.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct SensorView {
    #[serde(flatten)]
    row: SensorRow,
    /// `online`, or `stale` when nothing arrived for longer than its `stale_after`.
    status: &'static str,
}

pub(crate) fn view(layout: &ApiLayout, row: SensorRow, now: i64) -> SensorView {
    let limit = layout.stale_after(&row.id).as_millis().min(i64::MAX as u128) as i64;
    let status = if now.saturating_sub(row.last_seen) > limit { "stale" } else { "online" };
    SensorView { row, status }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct SensorsQuery {
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /api/v1/sensors?limit=&after=&prefix=`: sensors sorted by id, a page at a time.
async fn list_sensors(
    State(app): State<AppState>,
    query: Result<Query<SensorsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_limit(q.limit.as_deref())?;
    let prefix = q.prefix.unwrap_or_default();
    let after = q.after.filter(|a| !a.is_empty());
    let p = prefix.clone();
    let page = app.store.read(move |conn| store::sensors_page(conn, &p, after.as_deref(), limit)).await?;
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
    let now = unix_ms();
    let views: Vec<SensorView> = page.rows.into_iter().map(|r| view(&app.layout(), r, now)).collect();
    Ok(paged(views, next))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct LatestQuery {
    sensor: Option<String>,
}

/// `GET /api/v1/latest?sensor=<glob>`: the last value, freshness and status of every matching
/// sensor (all without the filter), sorted by id; more than [`MAX_SENSORS_PAGE`] is a 400.
async fn latest(
    State(app): State<AppState>,
    query: Result<Query<LatestQuery>, QueryRejection>,
) -> Result<Json<Vec<SensorView>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let pattern = q.sensor.filter(|s| !s.is_empty()).unwrap_or_else(|| "**".into());
    let glob = parse_glob(&pattern).map_err(ApiError::BadRequest)?;
    let prefix = literal_prefix(&pattern);
    let rows = app
        .store
        .read(move |conn| store::sensors_matching(conn, &prefix, |name| glob.is_match(name), MAX_SENSORS_PAGE))
        .await?;
    if rows.len() > MAX_SENSORS_PAGE {
        return Err(ApiError::BadRequest(format!(
            "{pattern:?} matches more than {MAX_SENSORS_PAGE} sensors (the limit); narrow the glob or page \
             through /api/v1/sensors"
        )));
    }
    let now = unix_ms();
    Ok(Json(rows.into_iter().map(|r| view(&app.layout(), r, now)).collect()))
}

/// `/api/v1/sensors/{id}`, `/api/v1/sensors/{id}/windows` and `.../series`, where the id may hold `/` as it
/// is or percent-encoded. Read from the raw path: a last segment `windows` or `series` written as
/// such names the sub-resource; a sensor whose own last level is one of those is written
/// `...%2Fwindows`.
async fn sensor_path(
    State(app): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<WindowQuery>, QueryRejection>,
    series_query: Result<Query<series::SeriesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let raw = uri.path().strip_prefix("/api/v1/sensors/").unwrap_or_default();
    let (raw_id, sub) = match (raw.strip_suffix("/windows"), raw.strip_suffix("/series")) {
        (Some(id), _) => (id, Some("windows")),
        (_, Some(id)) => (id, Some("series")),
        _ => (raw, None),
    };
    let id = percent_decode(raw_id)?;
    if id.is_empty() {
        return Err(ApiError::BadRequest("the sensor id in the path is empty".into()));
    }
    match sub {
        None => {
            let row = find_sensor(&app, id).await?;
            Ok(Json(view(&app.layout(), row, unix_ms())).into_response())
        }
        Some("series") => {
            let Query(query) = series_query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
            let row = find_sensor(&app, id).await?;
            series::answer(&app, &row.id, &query, &headers).await
        }
        Some(_) => {
            let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
            let format = answer_format(query.format.as_deref(), &headers)?;
            let row = find_sensor(&app, id).await?;
            sensor_windows(&app, &row, &query, format).await
        }
    }
}

fn percent_decode(raw: &str) -> Result<String, ApiError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => out.push(b),
                None => return Err(ApiError::BadRequest(format!("bad percent-encoding in {raw:?}"))),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::BadRequest(format!("{raw:?} is not UTF-8 once decoded")))
}

async fn find_sensor(app: &AppState, id: String) -> Result<SensorRow, ApiError> {
    let lookup = id.clone();
    app.store
        .read(move |conn| store::sensor(conn, &lookup))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no sensor `{id}` (yet): nothing from it has been processed")))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowQuery {
    size: Option<String>,
    from: Option<String>,
    to: Option<String>,
    sensor: Option<String>,
    /// Which members of each window to return (`json::FIELDS`); all by default.
    fields: Option<String>,
    /// `json` (default), `csv` (also chosen by `Accept: text/csv`) or `parquet` (a download,
    /// `application/vnd.apache.parquet`, also chosen by that `Accept`).
    format: Option<String>,
}

/// What an answer is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Csv,
    Parquet,
}

/// `format=json|csv|parquet`; without a `format`, the first of `text/csv` and
/// `application/vnd.apache.parquet` that `Accept` names, else JSON.
pub(crate) fn answer_format(format: Option<&str>, headers: &HeaderMap) -> Result<Format, ApiError> {
    match format.map(str::trim) {
        None | Some("") => {
            let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
            Ok(accept
                .split(',')
                .map(str::trim)
                .find_map(|media| match media {
                    m if m.starts_with("text/csv") => Some(Format::Csv),
                    m if m.starts_with(crate::parquet::CONTENT_TYPE) => Some(Format::Parquet),
                    _ => None,
                })
                .unwrap_or(Format::Json))
        }
        Some("json") => Ok(Format::Json),
        Some("csv") => Ok(Format::Csv),
        Some("parquet") => Ok(Format::Parquet),
        Some(other) => Err(ApiError::BadRequest(format!("format {other:?} must be json, csv or parquet"))),
    }
}

fn csv_response(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response()
}

/// A window as the API serves it.
#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct WindowView {
    pub start: i64,
    pub end: i64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub stddev: f64,
    pub first: Point,
    pub last: Point,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    /// How many log blocks changed the window after it had closed (late data).
    pub revision: u32,
    /// When a reading in it was last received (Unix ms).
    pub updated_at: i64,
}

#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Point {
    pub ts: i64,
    pub value: f64,
}

impl WindowView {
    /// `quantiles`: compute p50/p95/p99 (else 0: the answer leaves them out).
    fn new(start: i64, end: i64, w: &Window, quantiles: bool) -> WindowView {
        let s = &w.stats;
        let [p50, p95, p99] = match quantiles {
            true => s.quantiles([0.5, 0.95, 0.99]).unwrap_or([s.mean(); 3]),
            false => [0.0; 3],
        };
        WindowView {
            start,
            end,
            count: s.count,
            min: s.min,
            max: s.max,
            mean: s.mean(),
            stddev: s.stddev(),
            first: Point { ts: s.first.0, value: s.first.1 },
            last: Point { ts: s.last.0, value: s.last.1 },
            p50,
            p95,
            p99,
            revision: w.revision,
            updated_at: w.updated_at,
        }
    }
}

/// How a `size=` is served: a stored calendar, or a multiple of a stored fixed size.
#[derive(Clone)]
pub(crate) struct Plan {
    pub(crate) calendar: Calendar,
    /// Windows of the stored calendar merged per served window (1 = served as stored).
    pub(crate) factor: i64,
}

impl Plan {
    pub(crate) fn served_size(&self) -> Option<i64> {
        match self.calendar {
            Calendar::Fixed(size) => Some(size * self.factor),
            Calendar::Days { .. } => None,
        }
    }

    /// (start, end) of the served window holding `ts`.
    pub(crate) fn bucket(&self, ts: i64) -> (i64, i64) {
        match self.served_size() {
            Some(size) => {
                let start = ts.div_euclid(size).saturating_mul(size);
                (start, start.saturating_add(size))
            }
            None => {
                let (_, start, end) = self.calendar.bucket(ts);
                (start, end)
            }
        }
    }
}

pub(crate) fn plan(layout: &ApiLayout, size: Option<&str>) -> Result<Plan, ApiError> {
    let text = size.map(str::trim).filter(|s| !s.is_empty());
    let Some(text) = text else {
        // The default: 1m if stored, else the finest size.
        let calendar = layout
            .calendars
            .iter()
            .find(|c| c.code() == 60_000)
            .or(layout.calendars.first())
            .cloned()
            .ok_or_else(|| ApiError::BadRequest("no window sizes are configured".into()))?;
        return Ok(Plan { calendar, factor: 1 });
    };
    if text == "day" {
        return layout
            .calendars
            .iter()
            .find(|c| matches!(c, Calendar::Days { .. }))
            .map(|c| Plan { calendar: c.clone(), factor: 1 })
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "size=day needs `[pipeline] days = {{ tz = \"...\" }}`; this aggregator serves {}",
                    layout.sizes()
                ))
            });
    }
    let size = parse_window_size(text).map_err(|e| ApiError::BadRequest(format!("size {e}")))?;
    // The coarsest stored size that divides it: fewest windows to merge.
    layout
        .calendars
        .iter()
        .rev()
        .filter_map(|c| match c {
            Calendar::Fixed(stored) if size % stored == 0 => Some(Plan { calendar: c.clone(), factor: size / stored }),
            _ => None,
        })
        .next()
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "size {text:?} is not a stored size nor a multiple of one: {}",
                layout.sizes()
            ))
        })
}

/// An optional Unix-ms bound; `from=` (empty) means no bound, as in `?size=1m&from=&to=`.
pub(crate) fn bound(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name} {text:?} is not a Unix time in milliseconds"))),
    }
}

/// Reads and, for multiples, merges one sensor's windows with `from <= start < to`.
pub(crate) fn read_windows(
    conn: &rusqlite::Connection,
    plan: &Plan,
    series: u32,
    from: i64,
    to: i64,
    cap: usize,
    quantiles: bool,
) -> Result<Vec<WindowView>, StoreError> {
    let mut out: Vec<WindowView> = Vec::new();
    each_window(conn, plan, series, from, to, quantiles, |w| {
        out.push(w);
        out.len() <= cap
    })?;
    Ok(out)
}

/// [`read_windows`] a window at a time, in order, until `each` says stop: an export streams them
/// without holding the list.
fn each_window(
    conn: &rusqlite::Connection,
    plan: &Plan,
    series: u32,
    from: i64,
    to: i64,
    quantiles: bool,
    mut each: impl FnMut(WindowView) -> bool,
) -> Result<(), StoreError> {
    // Every event time is within 2000..9999 (shared::reading), so clamping the range there
    // loses nothing and keeps the index arithmetic far from overflow.
    let (lo, hi) =
        (from.max(tributary_shared::MIN_TS_MS - 86_400_000), to.min(tributary_shared::MAX_TS_MS + 86_400_000));
    if lo >= hi {
        return Ok(());
    }
    let first = plan.calendar.index_of(lo);
    let last = plan.calendar.index_of(hi - 1);
    let in_range = |start: i64| from <= start && start < to;
    let mut current: Option<(i64, i64, Window)> = None;
    let mut more = true;
    store::windows_each(conn, &plan.calendar, series, first, last, |index, window| {
        let (start, end) = plan.bucket(plan.calendar.start_of(index));
        if plan.factor == 1 {
            // Served as stored: each window straight into the answer, nothing to merge.
            if in_range(start) {
                more = each(WindowView::new(start, end, &window, quantiles));
            }
            return more;
        }
        match &mut current {
            Some((s, _, acc)) if *s == start => acc.merge(&window),
            _ => {
                if let Some((s, e, w)) = current.take()
                    && in_range(s)
                {
                    more = each(WindowView::new(s, e, &w, quantiles));
                }
                current = Some((start, end, window));
            }
        }
        more
    })?;
    if more
        && let Some((s, e, w)) = current
        && in_range(s)
    {
        each(WindowView::new(s, e, &w, quantiles));
    }
    Ok(())
}

/// `from`/`to`; missing or empty means unbounded (the window cap still applies).
fn range(query: &WindowQuery) -> Result<(i64, i64), ApiError> {
    let from = bound("from", query.from.as_deref())?.unwrap_or(i64::MIN);
    let to = bound("to", query.to.as_deref())?.unwrap_or(i64::MAX);
    if from > to {
        return Err(ApiError::BadRequest(format!("from ({from}) is after to ({to})")));
    }
    Ok((from, to))
}

fn too_many(cap: usize, n: usize) -> ApiError {
    ApiError::BadRequest(format!(
        "the request covers more than {cap} windows ({n}+); ask for a larger size or a narrower from/to"
    ))
}

/// A JSON body written by [`crate::json`].
pub(crate) fn json_response(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

async fn sensor_windows(
    app: &AppState,
    row: &SensorRow,
    query: &WindowQuery,
    format: Format,
) -> Result<Response, ApiError> {
    if query.sensor.is_some() {
        return Err(ApiError::BadRequest("`sensor` belongs to /api/v1/windows; here the sensor is in the path".into()));
    }
    let (layout, snapshot) = app.serving();
    let plan = plan(&layout, query.size.as_deref())?;
    let (from, to) = range(query)?;
    let fields = json::Fields::parse(query.fields.as_deref()).map_err(ApiError::BadRequest)?;
    let id = row.id.clone();
    if format == Format::Parquet {
        let lookup = id.clone();
        let series = snapshot.read(move |conn| store::series_id(conn, &lookup)).await?;
        let sensors = series.map(|s| (s, id.clone())).into_iter().collect();
        let export = WindowsExport { plan, from, to, fields, cap: MAX_WINDOWS };
        return parquet_windows(snapshot, sensors, export, &format!("{id}-windows")).await;
    }
    let csv = format == Format::Csv;
    let result = snapshot
        .read(move |conn| {
            let views = match store::series_id(conn, &id)? {
                Some(series) => read_windows(conn, &plan, series, from, to, MAX_WINDOWS, fields.quantiles())?,
                None => Vec::new(),
            };
            if views.len() > MAX_WINDOWS {
                return Ok(Err(views.len()));
            }
            let mut body = Vec::with_capacity(views.len() * json::WINDOW_BYTES + 2);
            if csv {
                json::csv_header(&mut body, fields);
                json::csv_rows(&mut body, &id, &views, fields);
            } else {
                json::windows(&mut body, &views, fields);
            }
            Ok(Ok(body))
        })
        .await?;
    let body = result.map_err(|n| too_many(MAX_WINDOWS, n))?;
    Ok(if csv { csv_response(body) } else { json_response(body) })
}

/// What a Parquet window export reads.
struct WindowsExport {
    plan: Plan,
    from: i64,
    to: i64,
    fields: json::Fields,
    /// More windows than this is the JSON answer's 400.
    cap: usize,
}

/// Some sensors' windows as a Parquet download ([`crate::parquet`]), streamed as they are read,
/// a window at a time. Once the body has started no 400 can follow, so when the range could
/// hold more than the cap the windows are counted first (a read without quantiles).
async fn parquet_windows(
    snapshot: store::StoreSnapshot,
    sensors: Vec<(u32, String)>,
    export: WindowsExport,
    filename: &str,
) -> Result<Response, ApiError> {
    let WindowsExport { plan, from, to, fields, cap } = export;
    let stored = stored_windows(&plan.calendar, from, to).saturating_mul(sensors.len() as u64);
    if stored > cap as u64 {
        let (plan, sensors) = (plan.clone(), sensors.clone());
        let counted = snapshot
            .read(move |conn| {
                let mut n = 0usize;
                for (series, _) in &sensors {
                    each_window(conn, &plan, *series, from, to, false, |_| {
                        n += 1;
                        n <= cap
                    })?;
                    if n > cap {
                        break;
                    }
                }
                Ok(n)
            })
            .await?;
        if counted > cap {
            return Err(too_many(cap, counted));
        }
    }
    let (mut export, abort, response) = crate::parquet::windows(filename, fields)
        .map_err(|e| ApiError::Unavailable(format!("the export cannot start ({e}); try again shortly")))?;
    tokio::spawn(async move {
        let written = snapshot
            .read(move |conn| {
                for (series, name) in sensors {
                    let name = bytes::Bytes::from(name);
                    let mut pushed = Ok(());
                    each_window(conn, &plan, series, from, to, fields.quantiles(), |w| {
                        pushed = export.push(&name, &w);
                        pushed.is_ok()
                    })?;
                    if let Err(e) = pushed {
                        return Ok(Err(e));
                    }
                }
                Ok(export.finish())
            })
            .await;
        // After the first bytes, an error can only cut the download short (see `Abort`), as the
        // streamed JSON answer of `multi_windows` does.
        abort.settle("a Parquet window export", written);
    });
    Ok(response)
}

/// `GET /api/v1/windows?sensor=<glob>&size=&from=&to=`: many sensors' windows in one request.
async fn multi_windows(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let format = answer_format(query.format.as_deref(), &headers)?;
    let csv = format == Format::Csv;
    let pattern = query.sensor.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
        ApiError::BadRequest("sensor=<glob> is required, e.g. sensor=line1/* (* within a level, ** across)".into())
    })?;
    let glob = parse_glob(&pattern).map_err(ApiError::BadRequest)?;
    let (layout, snapshot) = app.serving();
    let plan = plan(&layout, query.size.as_deref())?;
    let (from, to) = range(&query)?;
    let fields = json::Fields::parse(query.fields.as_deref()).map_err(ApiError::BadRequest)?;
    let prefix = literal_prefix(&pattern);
    let matching: Vec<(u32, String)> = snapshot
        .read(move |conn| {
            let mut all = store::series_with_prefix(conn, &prefix)?;
            all.retain(|(_, name)| glob.is_match(name));
            Ok(all)
        })
        .await?;
    if format == Format::Parquet {
        let export = WindowsExport { plan, from, to, fields, cap: MAX_MULTI_WINDOWS };
        return parquet_windows(snapshot, matching, export, "windows").await;
    }
    // A fleet-wide read is a few thousand small queries and a few MB of JSON: split it over the
    // cores, each part on its own read connection, and send the parts in sensor order.
    let parts = std::thread::available_parallelism().map_or(1, |n| n.get()).min(matching.len() / 64).max(1);
    let chunk = matching.len().div_ceil(parts).max(1);
    let opening = if csv {
        let mut header = Vec::new();
        json::csv_header(&mut header, fields);
        bytes::Bytes::from(header)
    } else {
        bytes::Bytes::from_static(b"[")
    };
    let content_type = match csv {
        true => HeaderValue::from_static("text/csv; charset=utf-8"),
        false => HeaderValue::from_static("application/json"),
    };
    let closing = if csv { None } else { Some(bytes::Bytes::from_static(b"]")) };
    let stored = stored_windows(&plan.calendar, from, to).saturating_mul(matching.len() as u64);
    if stored <= MAX_MULTI_WINDOWS as u64 {
        // The answer cannot pass the cap: stream each part's chunks as they are written, so the
        // first bytes leave while the rest is read, and no part is held whole in memory.
        let mut receivers = Vec::with_capacity(parts);
        for part in matching.chunks(chunk) {
            let (part, plan) = (part.to_vec(), plan.clone());
            let snapshot = snapshot.clone();
            // Unbounded: a later part must not wait for the earlier ones to be sent, or the parts
            // would run one after the other. What it holds is bounded by the window cap.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<bytes::Bytes, std::io::Error>>();
            receivers.push(rx);
            tokio::spawn(async move {
                let sink = tx.clone();
                let read = snapshot.read(move |conn| {
                    let mut emit = |chunk: Vec<u8>| sink.send(Ok(chunk.into())).is_ok();
                    windows_part(conn, &plan, &part, from, to, fields, csv, &mut emit)
                });
                if let Err(e) = read.await {
                    // Headers are gone: all that is left is to cut the answer short, visibly.
                    tracing::warn!(error = %e, "fleet window read failed mid-answer");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string())));
                }
            });
        }
        let body = joined(opening, receivers, closing, csv);
        return Ok(([(header::CONTENT_TYPE, content_type)], axum::body::Body::from_stream(body)).into_response());
    }
    // Possibly past the cap: read it all, count, then answer 400 or send it.
    let mut reads = Vec::with_capacity(parts);
    for part in matching.chunks(chunk) {
        let (part, plan) = (part.to_vec(), plan.clone());
        let snapshot = snapshot.clone();
        reads.push(tokio::spawn(async move {
            snapshot
                .read(move |conn| {
                    let mut chunks = Vec::new();
                    let mut emit = |chunk: Vec<u8>| {
                        chunks.push(bytes::Bytes::from(chunk));
                        true
                    };
                    let total = windows_part(conn, &plan, &part, from, to, fields, csv, &mut emit)?;
                    Ok((total, chunks))
                })
                .await
        }));
    }
    let mut total = 0usize;
    let mut receivers = Vec::with_capacity(reads.len());
    for read in reads {
        let (windows, chunks) = read.await.map_err(|e| ApiError::Store(StoreError::Join(e)))??;
        total += windows;
        if total > MAX_MULTI_WINDOWS {
            return Err(too_many(MAX_MULTI_WINDOWS, total));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for c in chunks {
            let _ = tx.send(Ok(c));
        }
        receivers.push(rx);
    }
    let body = joined(opening, receivers, closing, csv);
    Ok(([(header::CONTENT_TYPE, content_type)], axum::body::Body::from_stream(body)).into_response())
}

/// A part's answer leaves in chunks of about this size: big enough for few socket writes, small
/// enough that a 13 MB answer is never copied whole to grow a buffer.
const CHUNK_BYTES: usize = 256 << 10;

/// How many stored windows each sensor can have with `from <= start < to`: an upper bound on
/// what a read returns (merged sizes return fewer).
fn stored_windows(calendar: &Calendar, from: i64, to: i64) -> u64 {
    let (lo, hi) =
        (from.max(tributary_shared::MIN_TS_MS - 86_400_000), to.min(tributary_shared::MAX_TS_MS + 86_400_000));
    if lo >= hi {
        return 0;
    }
    (calendar.index_of(hi - 1) - calendar.index_of(lo) + 1).max(0) as u64
}

/// The parts' chunks in order behind `opening`, with a comma between the sensors of two JSON
/// parts, then `closing`.
fn joined(
    opening: bytes::Bytes,
    receivers: Vec<tokio::sync::mpsc::UnboundedReceiver<Result<bytes::Bytes, std::io::Error>>>,
    closing: Option<bytes::Bytes>,
    csv: bool,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    use futures_util::StreamExt;
    let parts = futures_util::stream::iter(receivers).flat_map(|rx| {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) }).enumerate()
    });
    let mut any = false;
    let body = parts.flat_map(move |(i, chunk)| {
        // A part's first chunk starts with a sensor: a comma goes before it if an earlier part
        // wrote one.
        let comma = !csv && i == 0 && any && matches!(&chunk, Ok(c) if !c.is_empty());
        any |= matches!(&chunk, Ok(c) if !c.is_empty());
        let comma = comma.then(|| Ok(bytes::Bytes::from_static(b",")));
        futures_util::stream::iter(comma.into_iter().chain(std::iter::once(chunk)))
    });
    futures_util::stream::once(async move { Ok(opening) })
        .chain(body)
        .chain(futures_util::stream::iter(closing.map(Ok)))
}

/// Writes the windows of some sensors as comma-separated `{"sensor": ..., "windows": [...]}`
/// objects (or CSV rows) and hands them to `emit` in chunks of about [`CHUNK_BYTES`]; returns how
/// many windows they hold. It stops early past [`MAX_MULTI_WINDOWS`], or when `emit` says the
/// client is gone.
#[allow(clippy::too_many_arguments)]
fn windows_part(
    conn: &rusqlite::Connection,
    plan: &Plan,
    sensors: &[(u32, String)],
    from: i64,
    to: i64,
    fields: json::Fields,
    csv: bool,
    emit: &mut dyn FnMut(Vec<u8>) -> bool,
) -> Result<usize, StoreError> {
    let mut body = Vec::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4);
    let (mut total, mut first) = (0usize, true);
    // One list for all the sensors, not one grown per sensor.
    let mut windows = Vec::new();
    for (series, name) in sensors {
        let cap = MAX_MULTI_WINDOWS - total;
        windows.clear();
        each_window(conn, plan, *series, from, to, fields.quantiles(), |w| {
            windows.push(w);
            windows.len() <= cap
        })?;
        total += windows.len();
        if total > MAX_MULTI_WINDOWS {
            return Ok(total);
        }
        if csv {
            json::csv_rows(&mut body, name, &windows, fields);
        } else {
            // A comma before every sensor but the part's first: a later chunk starts with one.
            if !first {
                body.push(b',');
            }
            json::sensor_windows(&mut body, name, &windows, fields);
        }
        first = false;
        if body.len() >= CHUNK_BYTES {
            let next = Vec::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4);
            if !emit(std::mem::replace(&mut body, next)) {
                return Ok(total);
            }
        }
    }
    if !body.is_empty() {
        emit(body);
    }
    Ok(total)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuarantineQuery {
    sensor: Option<String>,
    limit: Option<usize>,
}

async fn list_quarantine(
    State(app): State<AppState>,
    query: Result<Query<QuarantineQuery>, QueryRejection>,
) -> Result<Json<Vec<store::QuarantineRow>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(DEFAULT_SENSORS_PAGE);
    if limit == 0 || limit > MAX_SENSORS_PAGE {
        return Err(ApiError::BadRequest(format!("limit must be from 1 to {MAX_SENSORS_PAGE}")));
    }
    let rows = app
        .store
        .read(move |conn| {
            let series = match q.sensor.as_deref().filter(|s| !s.is_empty()) {
                Some(id) => match store::series_id(conn, id)? {
                    Some(series) => Some(series),
                    None => return Ok(Vec::new()),
                },
                None => None,
            };
            store::quarantine(conn, series, limit)
        })
        .await?;
    Ok(Json(rows))
}

/// The part of a glob before its first special character: every match starts with it, so the
/// store can narrow the scan to ids with that prefix.
pub(crate) fn literal_prefix(pattern: &str) -> String {
    pattern.chars().take_while(|c| !matches!(c, '*' | '?' | '[' | '{' | '\\')).collect()
}

/// The series a `sensor=` parameter names: the sensor with that exact id, else every sensor the
/// glob matches; all sensors when it is missing.
fn sensors_named(
    conn: &rusqlite::Connection,
    pattern: Option<&str>,
) -> Result<Result<Option<Vec<u32>>, String>, StoreError> {
    let Some(pattern) = pattern.filter(|p| !p.is_empty()) else { return Ok(Ok(None)) };
    if let Some(series) = store::series_id(conn, pattern)? {
        return Ok(Ok(Some(vec![series])));
    }
    let glob = match parse_glob(pattern) {
        Ok(glob) => glob,
        Err(e) => return Ok(Err(e)),
    };
    let prefix = literal_prefix(pattern);
    let matching = store::series_with_prefix(conn, &prefix)?.into_iter().filter(|(_, name)| glob.is_match(name));
    Ok(Ok(Some(matching.map(|(series, _)| series).collect())))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AnomalyQuery {
    sensor: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    /// The cursor of the previous page: `<ts>.<offset>` of its last event.
    after: Option<String>,
}

/// `GET /api/v1/anomalies?sensor=<id or glob>&from=&to=&limit=`: anomaly events with
/// `from <= ts < to`, oldest first; `Link: rel="next"` when more follow.
async fn list_anomalies(
    State(app): State<AppState>,
    uri: Uri,
    query: Result<Query<AnomalyQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_limit(q.limit.as_deref())?;
    let from = bound("from", q.from.as_deref())?.unwrap_or(i64::MIN);
    let to = bound("to", q.to.as_deref())?.unwrap_or(i64::MAX);
    if from > to {
        return Err(ApiError::BadRequest(format!("from ({from}) is after to ({to})")));
    }
    let after = match q.after.as_deref().filter(|a| !a.is_empty()) {
        None => None,
        Some(text) => {
            let parsed = text.split_once('.').and_then(|(ts, o)| Some((ts.parse().ok()?, o.parse().ok()?)));
            Some(parsed.ok_or_else(|| {
                ApiError::BadRequest(format!("after {text:?} is not a cursor; follow the Link: rel=\"next\" header"))
            })?)
        }
    };
    let sensor = q.sensor.clone();
    let page = app
        .store
        .read(move |conn| {
            Ok(match sensors_named(conn, sensor.as_deref())? {
                Ok(series) => Ok(store::anomalies(conn, series.as_deref(), from, to, after, limit)?),
                Err(e) => Err(e),
            })
        })
        .await?
        .map_err(ApiError::BadRequest)?;
    let next = match page.rows.last() {
        Some(last) if page.more => {
            let mut next =
                format!("{}?after={}.{}&from={from}&to={to}&limit={limit}", uri.path(), last.ts, last.offset);
            if let Some(sensor) = &q.sensor {
                next.push_str(&format!("&sensor={}", encode_query_value(sensor)));
            }
            Some(next)
        }
        _ => None,
    };
    Ok(paged(page.rows, next))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AlertQuery {
    state: Option<String>,
    limit: Option<String>,
}

/// An alert as `/api/v1/alerts` lists it: an event-time rule's (fired by a reading) or a
/// stale-sensor rule's (fired by the clock).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum AlertView {
    Reading {
        #[serde(flatten)]
        row: store::AlertRow,
        /// Fired while this pipeline version replayed the log's history (stored, not notified).
        replayed: bool,
    },
    Stale(crate::stale::StaleAlert),
}

/// `GET /api/v1/alerts?state=firing|resolved&limit=`: alerts, newest first (event-time alerts,
/// then stale-sensor alerts).
async fn list_alerts(
    State(app): State<AppState>,
    query: Result<Query<AlertQuery>, QueryRejection>,
) -> Result<Json<Vec<AlertView>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_limit(q.limit.as_deref())?;
    let state = match q.state.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s @ ("firing" | "resolved")) => Some(s.to_string()),
        Some(other) => {
            return Err(ApiError::BadRequest(format!("state {other:?} must be firing or resolved")));
        }
    };
    let wanted = state.clone();
    let replayed_below = app.versions.replayed_below();
    let mut out: Vec<AlertView> = app
        .store
        .read(move |conn| store::alerts(conn, wanted.as_deref(), limit))
        .await?
        .rows
        .into_iter()
        .map(|row| AlertView::Reading { replayed: row.fired_offset < replayed_below, row })
        .collect();
    if let Some(stale) = &app.stale {
        let left = limit - out.len().min(limit);
        if left > 0 {
            let rows = stale.read(move |conn| crate::stale::list(conn, state.as_deref(), left)).await?.rows;
            out.extend(rows.into_iter().map(AlertView::Stale));
        }
    }
    Ok(Json(out))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AgentView {
    id: String,
    /// `online`, `catching_up` (its spool holds a backlog), `offline` (silent for a minute) or
    /// `never_seen`.
    state: &'static str,
    last_seen: Option<i64>,
    /// Its last request (this aggregator's life), and what its spool held then.
    last_contact: Option<i64>,
    backlog_readings: Option<u64>,
    backlog_bytes: Option<u64>,
    readings: u64,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetAsideQuery {
    limit: Option<String>,
    after: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct GapsQuery {
    /// One agent's gaps only.
    agent: Option<String>,
    limit: Option<String>,
    /// The `id` of the last gap of the previous page.
    after: Option<String>,
}

/// A paging cursor that is a number (`after=`), or none; `what` names it in the error.
fn whole_number_after<T: std::str::FromStr>(text: Option<&str>, what: &str) -> Result<Option<T>, ApiError> {
    match text.map(str::trim).filter(|a| !a.is_empty()) {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("after {text:?} must be {what} (a whole number)"))),
    }
}

/// `GET /api/v1/gaps?agent=&limit=&after=`: sequence ranges agents have not delivered, in the
/// order they were found (the `Link` header pages on).
async fn list_gaps(
    State(app): State<AppState>,
    query: Result<Query<GapsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_limit(query.limit.as_deref())?;
    let after: Option<i64> = whole_number_after(query.after.as_deref(), "the id of a gap")?;
    let agent = query.agent.filter(|a| !a.is_empty());
    let (path, filter) = (app.log_path.clone(), agent.clone());
    let (rows, more) = tokio::task::spawn_blocking(move || {
        let conn = crate::log::open_read(&path)?;
        crate::log::gaps(&conn, filter.as_deref(), after, limit)
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("reading the log's gaps failed: {e}")))?
    .map_err(|e| ApiError::Unavailable(format!("the log cannot be read now ({e}); try again shortly")))?;
    let next = match rows.last() {
        Some(last) if more => {
            let agent = agent.map(|a| format!("&agent={}", encode_query_value(&a))).unwrap_or_default();
            Some(format!("/api/v1/gaps?limit={limit}&after={}{agent}", last.id))
        }
        _ => None,
    };
    Ok(paged(rows, next))
}

/// `GET /api/v1/set-aside?limit=&after=`: log blocks the processor left out, by offset.
async fn list_set_aside(
    State(app): State<AppState>,
    query: Result<Query<SetAsideQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_limit(query.limit.as_deref())?;
    let after: Option<u64> = whole_number_after(query.after.as_deref(), "a log offset")?;
    let page = app.store.read(move |conn| store::set_aside(conn, after, limit)).await?;
    let next = match page.rows.last() {
        Some(last) if page.more => Some(format!("/api/v1/set-aside?limit={limit}&after={}", last.first_offset)),
        _ => None,
    };
    Ok(paged::<SetAsideRow>(page.rows, next))
}

async fn list_agents(State(app): State<AppState>) -> Result<Json<Vec<AgentView>>, ApiError> {
    let seen = app.store.read(store::agents).await?;
    let now = unix_ms();
    let mut agents: Vec<AgentView> = app
        .agents
        .iter()
        .map(|agent| {
            let row = seen.iter().find(|row| row.id == agent.id);
            let contact = app.fleet.get(&agent.id);
            let last_seen = row.map(|r| r.last_seen);
            AgentView {
                id: agent.id.clone(),
                state: crate::fleet::state(contact, last_seen, now),
                last_seen,
                last_contact: contact.map(|c| c.at),
                backlog_readings: contact.and_then(|c| c.backlog_readings),
                backlog_bytes: contact.and_then(|c| c.backlog_bytes),
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

    fn layout() -> ApiLayout {
        ApiLayout {
            calendars: vec![Calendar::fixed(10_000), Calendar::fixed(60_000), Calendar::fixed(3_600_000)],
            stale_after: Duration::from_secs(300),
            stale: Vec::new(),
        }
    }

    #[test]
    fn sizes_are_served_from_the_coarsest_divisor() {
        let l = layout();
        let p = plan(&l, Some("5m")).unwrap();
        assert_eq!((p.calendar.code(), p.factor), (60_000, 5));
        let p = plan(&l, Some("2h")).unwrap();
        assert_eq!((p.calendar.code(), p.factor), (3_600_000, 2));
        let p = plan(&l, Some("30s")).unwrap();
        assert_eq!((p.calendar.code(), p.factor), (10_000, 3));
        let p = plan(&l, None).unwrap();
        assert_eq!((p.calendar.code(), p.factor), (60_000, 1));
        let err = plan(&l, Some("15s")).err().unwrap().to_string();
        assert!(err.contains("10s") && err.contains("1h"), "{err}");
        assert!(plan(&l, Some("day")).is_err());
    }

    #[test]
    fn percent_decoding_accepts_slashes_both_ways() {
        assert_eq!(percent_decode("room1%2Ftemp").unwrap(), "room1/temp");
        assert_eq!(percent_decode("room1/temp").unwrap(), "room1/temp");
        assert_eq!(percent_decode("k%C3%BCche").unwrap(), "küche");
        assert!(percent_decode("bad%2").is_err());
        assert!(percent_decode("bad%ZZ").is_err());
    }

    #[test]
    fn extreme_ranges_are_answered_not_overflowed() {
        let q = WindowQuery {
            size: None,
            from: Some(i64::MIN.to_string()),
            to: Some(i64::MAX.to_string()),
            sensor: None,
            fields: None,
            format: None,
        };
        assert_eq!(range(&q).unwrap(), (i64::MIN, i64::MAX));
        let q = WindowQuery {
            size: None,
            from: Some("10".into()),
            to: Some("5".into()),
            sensor: None,
            fields: None,
            format: None,
        };
        assert!(range(&q).is_err());
        let q = WindowQuery { size: None, from: None, to: None, sensor: None, fields: None, format: None };
        assert_eq!(range(&q).unwrap(), (i64::MIN, i64::MAX));
    }
}
