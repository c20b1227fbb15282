//! The HTTP surface: routes, shared state, and the read side of the dashboard API.
//!
//! Reads go to `store.db` on pooled read-only connections in blocking threads, so a slow query
//! never stalls ingest on the async workers.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::log::LogHandle;
use crate::metrics::{self, Metrics};
use crate::store::{self, SensorRow, StoreError, StoreReader, WINDOW_MS};
use crate::{Liveness, dashboard, ingest};

/// Largest window `?size=` accepts.
const MAX_WINDOW: Duration = Duration::from_secs(86_400);

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub agents: Arc<[AgentConfig]>,
    pub log: LogHandle,
    pub store: StoreReader,
    pub metrics: Arc<Metrics>,
    pub writer_alive: Liveness,
    pub processor_alive: Liveness,
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
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Store(ref error) => {
                tracing::error!(%error, "store query failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}

async fn healthz(State(app): State<AppState>) -> Response {
    match (app.writer_alive.is_alive(), app.processor_alive.is_alive()) {
        (true, true) => (StatusCode::OK, "ok").into_response(),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "log writer is not running").into_response(),
        (_, false) => (StatusCode::SERVICE_UNAVAILABLE, "processor is not running").into_response(),
    }
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], app.metrics.encode()).into_response()
}

async fn list_sensors(State(app): State<AppState>) -> Result<Json<Vec<SensorRow>>, ApiError> {
    Ok(Json(app.store.read(store::sensors).await?))
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
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name} {text:?} is not a Unix time in milliseconds"))),
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

/// The first multiple of `size` at or after `x`.
fn align_up(x: i64, size: i64) -> i64 {
    let down = x.div_euclid(size).saturating_mul(size);
    if down == x { down } else { down.saturating_add(size) }
}

async fn sensor_windows(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Json<Vec<WindowRow>>, ApiError> {
    let id = sensor_id(path)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let size = window_size(query.size.as_deref().filter(|s| !s.trim().is_empty()))?;
    let from = bound("from", query.from.as_deref())?.unwrap_or(i64::MIN);
    let to = bound("to", query.to.as_deref())?.unwrap_or(i64::MAX);
    find_sensor(&app, id.clone()).await?;
    // Only whole windows with from <= start < to: their minutes lie in [align_up(from), align_up(to)).
    let (lo, hi) = (align_up(from, size), if to == i64::MAX { i64::MAX } else { align_up(to, size) });
    let minutes = app.store.read(move |conn| store::minute_windows(conn, &id, lo, hi)).await?;
    let rows = store::merge_windows(&minutes, size)
        .into_iter()
        .filter(|(start, _)| from <= *start && *start < to)
        .map(|(start, w)| WindowRow {
            start,
            end: start + size,
            count: w.count,
            min: w.min,
            max: w.max,
            mean: w.sum / w.count.max(1) as f64,
        })
        .collect();
    Ok(Json(rows))
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
    fn align_up_rounds_to_the_next_boundary() {
        assert_eq!(align_up(0, 60), 0);
        assert_eq!(align_up(1, 60), 60);
        assert_eq!(align_up(-1, 60), 0);
        assert_eq!(align_up(i64::MIN, 60), i64::MIN);
    }
}
