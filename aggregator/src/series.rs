//! `GET /api/v1/sensors/{id}/series`: one sensor over a regular time grid, as columns a chart
//! draws directly. Every bucket of the grid is in the answer; a bucket without readings holds
//! `null` (a chart breaks its line there instead of drawing across a gap) and a `count` of 0.
//!
//! The grid's step is asked for (`step=5m`, a stored window size or a multiple of one, or `day`)
//! or chosen from `max_points` (the coarsest stored size that keeps the answer within it). A
//! grid of more than [`MAX_POINTS`] buckets is a 400 that names the limit, never a cut answer.

use std::fmt::Write as _;

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::api::{self, ApiError, AppState, Plan, WindowView};
use crate::pipeline::calendar::Calendar;
use crate::store;

/// Most buckets one answer holds.
pub const MAX_POINTS: usize = 10_000;
/// `max_points` when neither it nor `step` is given: about one per pixel of a wide chart.
pub const DEFAULT_MAX_POINTS: usize = 1_000;
/// The range when `from` is not given: the hour before `to`.
pub const DEFAULT_RANGE_MS: i64 = 3_600_000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    max_points: Option<String>,
    agg: Option<String>,
    /// `json` (default), `csv` (also chosen by `Accept: text/csv`) or `parquet` (a download,
    /// `application/vnd.apache.parquet`, also chosen by that `Accept`).
    format: Option<String>,
}

/// What a bucket can report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Mean,
    Min,
    Max,
    Count,
    Stddev,
    P50,
    P95,
    P99,
    Last,
}

const AGGS: [(&str, Agg); 9] = [
    ("mean", Agg::Mean),
    ("min", Agg::Min),
    ("max", Agg::Max),
    ("count", Agg::Count),
    ("stddev", Agg::Stddev),
    ("p50", Agg::P50),
    ("p95", Agg::P95),
    ("p99", Agg::P99),
    ("last", Agg::Last),
];

impl Agg {
    fn name(self) -> &'static str {
        AGGS.iter().find(|(_, a)| *a == self).map_or("?", |(n, _)| n)
    }

    fn quantile(self) -> bool {
        matches!(self, Agg::P50 | Agg::P95 | Agg::P99)
    }

    fn of(self, w: &WindowView) -> f64 {
        match self {
            Agg::Mean => w.mean,
            Agg::Min => w.min,
            Agg::Max => w.max,
            Agg::Count => w.count as f64,
            Agg::Stddev => w.stddev,
            Agg::P50 => w.p50,
            Agg::P95 => w.p95,
            Agg::P99 => w.p99,
            Agg::Last => w.last.value,
        }
    }
}

/// `agg=mean,min,max`: the default is mean, min, max and count (a chart's line and band).
pub fn parse_aggs(text: Option<&str>) -> Result<Vec<Agg>, String> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(vec![Agg::Mean, Agg::Min, Agg::Max, Agg::Count]);
    };
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim) {
        let agg = AGGS.iter().find(|(n, _)| *n == name).map(|(_, a)| *a).ok_or_else(|| {
            let valid: Vec<&str> = AGGS.iter().map(|(n, _)| *n).collect();
            format!("agg {name:?} is not one of {}", valid.join(", "))
        })?;
        if !out.contains(&agg) {
            out.push(agg);
        }
    }
    Ok(out)
}

/// The bucket grid of one answer.
struct Grid {
    plan: Plan,
    /// Bucket starts, ascending; the last bucket ends at or after `to`.
    starts: Vec<i64>,
}

impl Grid {
    fn step_label(&self) -> serde_json::Value {
        match self.plan.served_size() {
            Some(size) => size.into(),
            None => "day".into(),
        }
    }
}

/// The step that keeps `to - from` within `max_points` buckets: a multiple of the coarsest stored
/// size not larger than the step needed (so a month at 1,000 points reads hourly windows, not
/// 43,200 one-minute ones).
fn step_for(layout: &api::ApiLayout, from: i64, to: i64, max_points: usize) -> Result<Plan, ApiError> {
    let span = i128::from(to) - i128::from(from);
    let needed = (span.max(1) as u128).div_ceil(max_points as u128).min(i64::MAX as u128) as i64;
    let fixed: Vec<i64> = layout
        .calendars
        .iter()
        .filter_map(|c| match c {
            Calendar::Fixed(size) => Some(*size),
            Calendar::Days { .. } => None,
        })
        .collect();
    let Some(&finest) = fixed.iter().min() else {
        return api::plan(layout, Some("day"));
    };
    // A coarser stored size serves as it is when it still gives a quarter of the points asked for:
    // a month at 1,000 points is 720 hourly windows rather than 44-minute steps read from 43,200
    // one-minute windows.
    let coarse =
        fixed.iter().copied().filter(|s| *s >= needed && span / i128::from(*s) >= (max_points / 4).max(1) as i128);
    let (base, mut factor) = match coarse.min() {
        Some(size) => (size, 1),
        None => {
            let base = fixed.iter().copied().filter(|s| *s <= needed).max().unwrap_or(finest);
            (base, ((needed + base - 1) / base).max(1))
        }
    };
    // Aligning the first bucket to the step can add one bucket at the front.
    loop {
        let step = base * factor;
        let buckets = (to - from.div_euclid(step) * step + step - 1) / step;
        if buckets as usize <= max_points {
            return Ok(Plan { calendar: Calendar::fixed(base), factor });
        }
        factor += 1;
    }
}

fn grid(layout: &api::ApiLayout, query: &SeriesQuery, now: i64) -> Result<Grid, ApiError> {
    // Every reading's time is within the shared range; outside it there is nothing to chart, and
    // clamping keeps the bucket arithmetic far from overflow.
    let (lo, hi) = (tributary_shared::MIN_TS_MS - 86_400_000, tributary_shared::MAX_TS_MS + 86_400_000);
    let to = api::bound("to", query.to.as_deref())?.unwrap_or(now);
    let from = api::bound("from", query.from.as_deref())?.unwrap_or(to.saturating_sub(DEFAULT_RANGE_MS));
    if from >= to {
        return Err(ApiError::BadRequest(format!("from ({from}) must be before to ({to})")));
    }
    let (from, to) = (from.clamp(lo, hi), to.clamp(lo, hi));
    let step = query.step.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let max_points = query.max_points.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let plan = match (step, max_points) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest("give step or max_points, not both".into()));
        }
        (Some(step), None) => api::plan(layout, Some(step))?,
        (None, max_points) => {
            let max_points = match max_points {
                None => DEFAULT_MAX_POINTS,
                Some(text) => match text.parse::<usize>() {
                    Ok(n) if (1..=MAX_POINTS).contains(&n) => n,
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "max_points {text:?} must be a whole number from 1 to {MAX_POINTS} (the limit)"
                        )));
                    }
                },
            };
            step_for(layout, from, to, max_points)?
        }
    };
    let mut starts = Vec::new();
    let (mut start, _) = plan.bucket(from);
    while start < to {
        if starts.len() == MAX_POINTS {
            return Err(ApiError::BadRequest(format!(
                "from..to at this step is more than {MAX_POINTS} points (the limit); ask for a larger step or \
                 a narrower range"
            )));
        }
        starts.push(start);
        let (_, end) = plan.bucket(start);
        if end <= start {
            break;
        }
        start = end;
    }
    Ok(Grid { plan, starts })
}

/// The answer for one sensor, as JSON or, with `format=csv` or `Accept: text/csv`, as CSV, or with
/// `format=parquet` or `Accept: application/vnd.apache.parquet`, as a Parquet download.
pub async fn answer(
    app: &AppState,
    sensor: &str,
    query: &SeriesQuery,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let format = api::answer_format(query.format.as_deref(), headers)?;
    let aggs = parse_aggs(query.agg.as_deref()).map_err(ApiError::BadRequest)?;
    let (layout, snapshot) = app.serving();
    let grid = grid(&layout, query, crate::unix_ms())?;
    let (Some(&first), Some(&last)) = (grid.starts.first(), grid.starts.last()) else {
        return Err(ApiError::BadRequest("the range holds no bucket".into()));
    };
    let to = grid.plan.bucket(last).1;
    let quantiles = aggs.iter().any(|a| a.quantile());
    let (id, plan) = (sensor.to_string(), grid.plan.clone());
    let windows = snapshot
        .read(move |conn| match store::series_id(conn, &id)? {
            Some(series) => api::read_windows(conn, &plan, series, first, to, MAX_POINTS, quantiles),
            None => Ok(Vec::new()),
        })
        .await?;
    let columns = columns(&grid.starts, &windows, &aggs);
    if format == api::Format::Parquet {
        return parquet(sensor, grid.starts, &aggs, columns);
    }
    if format == api::Format::Csv {
        let mut response = to_csv(&grid.starts, &aggs, &columns).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        return Ok(response);
    }
    let mut body = serde_json::Map::new();
    body.insert("sensor".into(), sensor.into());
    body.insert("step".into(), grid.step_label());
    body.insert("from".into(), first.into());
    body.insert("to".into(), to.into());
    body.insert("time".into(), grid.starts.clone().into());
    for (agg, column) in aggs.iter().zip(columns) {
        let values: Vec<serde_json::Value> = column
            .into_iter()
            .map(|v| match v {
                Some(v) if *agg == Agg::Count => serde_json::Value::from(v as u64),
                Some(v) => serde_json::Value::from(v),
                None if *agg == Agg::Count => 0.into(),
                None => serde_json::Value::Null,
            })
            .collect();
        body.insert(agg.name().into(), values.into());
    }
    Ok(axum::Json(serde_json::Value::Object(body)).into_response())
}

/// The series as a Parquet download ([`crate::parquet`]): `time`, then a column per aggregate.
/// The grid is in memory already (at most [`MAX_POINTS`] buckets); the file is encoded on a
/// blocking thread and streamed.
fn parquet(sensor: &str, starts: Vec<i64>, aggs: &[Agg], columns: Vec<Vec<Option<f64>>>) -> Result<Response, ApiError> {
    let names: Vec<(&str, bool)> = aggs.iter().map(|a| (a.name(), *a == Agg::Count)).collect();
    let (mut export, abort, response) = crate::parquet::series(&format!("{sensor}-series"), &names)
        .map_err(|e| ApiError::Unavailable(format!("the export cannot start ({e}); try again shortly")))?;
    tokio::spawn(async move {
        let written = tokio::task::spawn_blocking(move || {
            for (i, start) in starts.iter().enumerate() {
                export.push(*start, columns.iter().map(|column| column[i]))?;
            }
            export.finish()
        })
        .await;
        // After the first bytes an error can only cut the download short (see `parquet::Abort`).
        abort.settle("a Parquet series export", written);
    });
    Ok(response)
}

/// One column per aggregate, one entry per bucket: `None` where no window starts at the bucket.
fn columns(starts: &[i64], windows: &[WindowView], aggs: &[Agg]) -> Vec<Vec<Option<f64>>> {
    let mut out = vec![vec![None; starts.len()]; aggs.len()];
    for w in windows {
        if let Ok(i) = starts.binary_search(&w.start) {
            for (column, agg) in out.iter_mut().zip(aggs) {
                column[i] = Some(agg.of(w));
            }
        }
    }
    out
}

/// `time,mean,min,...` with ISO-8601 UTC times (`+00:00`), empty cells for empty buckets.
fn to_csv(starts: &[i64], aggs: &[Agg], columns: &[Vec<Option<f64>>]) -> String {
    let mut out = String::with_capacity(starts.len() * 16 * (aggs.len() + 2));
    out.push_str("time");
    for agg in aggs {
        out.push(',');
        out.push_str(agg.name());
    }
    out.push('\n');
    for (i, start) in starts.iter().enumerate() {
        out.push_str(&iso8601(*start));
        for (column, agg) in columns.iter().zip(aggs) {
            out.push(',');
            match column[i] {
                Some(v) if *agg == Agg::Count => {
                    let _ = write!(out, "{}", v as u64);
                }
                Some(v) => {
                    let _ = write!(out, "{v}");
                }
                None if *agg == Agg::Count => out.push('0'),
                None => {}
            }
        }
        out.push('\n');
    }
    out
}

/// `2026-12-05T01:00:00.000+00:00`.
pub fn iso8601(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string(),
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn layout() -> api::ApiLayout {
        api::ApiLayout {
            calendars: vec![Calendar::fixed(10_000), Calendar::fixed(60_000), Calendar::fixed(3_600_000)],
            stale_after: Duration::from_secs(300),
            stale: Vec::new(),
        }
    }

    fn query(from: i64, to: i64, step: Option<&str>, max_points: Option<&str>) -> SeriesQuery {
        SeriesQuery {
            from: Some(from.to_string()),
            to: Some(to.to_string()),
            step: step.map(String::from),
            max_points: max_points.map(String::from),
            agg: None,
            format: None,
        }
    }

    const T0: i64 = 1_764_000_000_000;

    #[test]
    fn a_month_at_a_thousand_points_reads_hourly_windows() {
        let g = grid(&layout(), &query(T0, T0 + 30 * 86_400_000, None, Some("1000")), 0).unwrap();
        assert_eq!(g.plan.calendar.code(), 3_600_000);
        assert!(g.starts.len() <= 1000 && g.starts.len() >= 300, "{}", g.starts.len());
        let g = grid(&layout(), &query(T0, T0 + 900_000, None, Some("1000")), 0).unwrap();
        assert_eq!((g.plan.calendar.code(), g.plan.factor), (10_000, 1));
    }

    #[test]
    fn the_grid_covers_the_range_and_no_more_than_the_limit() {
        let g = grid(&layout(), &query(T0 + 5, T0 + 120_001, Some("1m"), None), 0).unwrap();
        let first = (T0 + 5).div_euclid(60_000) * 60_000;
        assert_eq!(g.starts, vec![first, first + 60_000, first + 120_000]);
        let err = grid(&layout(), &query(T0, T0 + 86_400_000, Some("1s"), None), 0).err().unwrap().to_string();
        assert!(err.contains("1s"), "{err}");
        let err = grid(&layout(), &query(T0, T0 + 86_400_000 * 8, Some("1m"), None), 0).err().unwrap().to_string();
        assert!(err.contains("10000"), "{err}");
        let err = grid(&layout(), &query(T0, T0, Some("1m"), None), 0).err().unwrap().to_string();
        assert!(err.contains("before"), "{err}");
        let err = grid(&layout(), &query(T0, T0 + 1, Some("1m"), Some("3")), 0).err().unwrap().to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn extreme_ranges_are_answered_not_overflowed() {
        let g = grid(&layout(), &query(i64::MIN, i64::MAX, None, Some("10000")), 0).unwrap();
        assert!(!g.starts.is_empty() && g.starts.len() <= MAX_POINTS);
        assert!(g.starts.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn aggregates_are_named_or_refused_with_the_valid_names() {
        assert_eq!(parse_aggs(Some("p95, mean,p95")).unwrap(), vec![Agg::P95, Agg::Mean]);
        let err = parse_aggs(Some("avg")).unwrap_err();
        assert!(err.contains("mean") && err.contains("p95"), "{err}");
        assert_eq!(iso8601(T0), "2025-11-24T16:00:00.000+00:00");
    }
}
