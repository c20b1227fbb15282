//! A subset of the Prometheus HTTP API under `/prometheus`, so Grafana's built-in Prometheus data
//! source plots Tributary's windows with no plugin (data source URL `http://<host>:8080/prometheus`).
//!
//! Every reading is one series `tributary_reading{sensor="<id>"}`. Queries are answered from the
//! stored windows, never from raw readings:
//! - `tributary_reading{sensor=~"line1/.*"}`: the last reading within the 5-minute lookback
//!   before each step, as Prometheus does;
//! - `avg_over_time(...[5m])`, `min_over_time`, `max_over_time`, `count_over_time`,
//!   `quantile_over_time(0.95, ...[5m])`: the windows with start in `[t - range, t)` merged.
//!
//! The range, the step and the start must be multiples of a stored window size (10s, 1m, 1h by
//! default), because a window cannot be split; anything else is a `bad_data` error that says so
//! rather than an approximation. Matchers: `=`, `!=`, `=~`, `!~` on `sensor` and `__name__`
//! (regexes anchored, as in Prometheus).

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::api::{ApiError, AppState};
use crate::pipeline::calendar::Calendar;
use crate::pipeline::window::Window;
use crate::store;

pub const METRIC: &str = "tributary_reading";
/// Prometheus' own limit of points per series in one answer.
pub const MAX_POINTS: usize = 11_000;
/// Most series one query may select.
pub const MAX_SERIES: usize = 1_000;
/// Most stored windows one query reads per series, and merges in all.
pub const MAX_WINDOWS_READ: usize = 200_000;
pub const MAX_WINDOWS_MERGED: usize = 2_000_000;
/// A bare selector's lookback, as Prometheus' default.
const LOOKBACK_MS: i64 = 300_000;

/// A Prometheus-style error: `{"status": "error", "errorType", "error"}`.
struct PromError(StatusCode, &'static str, String);

impl PromError {
    fn bad(text: impl Into<String>) -> PromError {
        PromError(StatusCode::BAD_REQUEST, "bad_data", text.into())
    }
}

impl From<ApiError> for PromError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::BadRequest(t) | ApiError::NotFound(t) | ApiError::MethodNotAllowed(t) => PromError::bad(t),
            other => PromError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", other.to_string()),
        }
    }
}

impl From<store::StoreError> for PromError {
    fn from(e: store::StoreError) -> Self {
        PromError::from(ApiError::Store(e))
    }
}

impl IntoResponse for PromError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"status": "error", "errorType": self.1, "error": self.2}))).into_response()
    }
}

fn success(data: Value) -> Response {
    axum::Json(json!({"status": "success", "data": data})).into_response()
}

/// The parameters of a GET query string and, for POST, a form body (Grafana POSTs by default).
fn params(query: Option<String>, headers: &HeaderMap, body: &Bytes) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect();
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form {
        out.extend(url::form_urlencoded::parse(body).into_owned());
    }
    out
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Unix seconds (with a fraction) or RFC 3339, to ms.
fn time_ms(name: &str, text: &str) -> Result<i64, PromError> {
    if let Ok(secs) = text.trim().parse::<f64>() {
        if secs.is_finite() && secs.abs() < 1e13 {
            return Ok((secs * 1000.0).round() as i64);
        }
    }
    text.trim().parse::<jiff::Timestamp>().map(|t| t.as_millisecond()).map_err(|_| {
        PromError::bad(format!("invalid parameter \"{name}\": cannot parse {text:?} to a valid timestamp"))
    })
}

/// `15s`, `1m`, `1h30m` (Prometheus durations), or seconds as a number, to ms.
fn duration_ms(text: &str) -> Result<i64, PromError> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 && secs < 1e10 {
            return Ok((secs * 1000.0).round() as i64);
        }
    }
    let mut total: i64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let n: i64 = rest[..digits].parse().map_err(|_| PromError::bad(format!("{text:?} is not a duration")))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "y" => 365 * 86_400_000,
            _ => return Err(PromError::bad(format!("{text:?} is not a duration (ms, s, m, h, d, w, y)"))),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| PromError::bad("duration too long"))?;
        rest = &rest[unit_len..];
    }
    if total <= 0 {
        return Err(PromError::bad(format!("{text:?} is not a positive duration")));
    }
    Ok(total)
}

#[derive(Debug, Clone)]
enum Matcher {
    Eq(String, String),
    Ne(String, String),
    Re(String, regex::Regex),
    NotRe(String, regex::Regex),
}

impl Matcher {
    fn label(&self) -> &str {
        match self {
            Matcher::Eq(l, _) | Matcher::Ne(l, _) | Matcher::Re(l, _) | Matcher::NotRe(l, _) => l,
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Eq(_, v) => value == v,
            Matcher::Ne(_, v) => value != v,
            Matcher::Re(_, r) => r.is_match(value),
            Matcher::NotRe(_, r) => !r.is_match(value),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    Last,
    Avg,
    Min,
    Max,
    Count,
    Quantile(f64),
}

#[derive(Debug)]
struct Expr {
    func: Func,
    matchers: Vec<Matcher>,
    /// `[5m]`; none for a bare selector (the lookback applies).
    range_ms: Option<i64>,
}

const FUNCS: [(&str, Func); 5] = [
    ("avg_over_time", Func::Avg),
    ("min_over_time", Func::Min),
    ("max_over_time", Func::Max),
    ("count_over_time", Func::Count),
    ("quantile_over_time", Func::Quantile(0.0)),
];

fn unsupported(query: &str) -> PromError {
    PromError::bad(format!(
        "{query:?} is not supported: Tributary answers `{METRIC}{{sensor=\"...\"}}` (=, !=, =~, !~) and avg_over_time, \
         min_over_time, max_over_time, count_over_time, quantile_over_time(q, ...) over `[range]`"
    ))
}

fn parse(query: &str) -> Result<Expr, PromError> {
    let q = query.trim();
    for (name, func) in FUNCS {
        if let Some(rest) = q.strip_prefix(name) {
            let inner = rest
                .trim_start()
                .strip_prefix('(')
                .and_then(|r| r.trim_end().strip_suffix(')'))
                .ok_or_else(|| unsupported(query))?;
            let (func, inner) = match func {
                Func::Quantile(_) => {
                    let (q_text, rest) = inner.split_once(',').ok_or_else(|| unsupported(query))?;
                    let phi: f64 = q_text.trim().parse().map_err(|_| unsupported(query))?;
                    if !(0.0..=1.0).contains(&phi) {
                        return Err(PromError::bad(format!("quantile {phi} must be from 0 to 1")));
                    }
                    (Func::Quantile(phi), rest)
                }
                other => (other, inner),
            };
            let inner = inner.trim();
            let open = inner
                .rfind('[')
                .ok_or_else(|| PromError::bad(format!("{name} needs a range: {name}({METRIC}{{...}}[5m])")))?;
            let range = inner[open + 1..].strip_suffix(']').ok_or_else(|| unsupported(query))?;
            let matchers = selector(&inner[..open], query)?;
            return Ok(Expr { func, matchers, range_ms: Some(duration_ms(range)?) });
        }
    }
    Ok(Expr { func: Func::Last, matchers: selector(q, query)?, range_ms: None })
}

/// `tributary_reading{sensor="a", ...}`, `{__name__="tributary_reading", ...}` or the bare name.
fn selector(text: &str, query: &str) -> Result<Vec<Matcher>, PromError> {
    let text = text.trim();
    let (name, body) = match text.find('{') {
        Some(i) => (text[..i].trim(), text[i + 1..].strip_suffix('}').ok_or_else(|| unsupported(query))?),
        None => (text, ""),
    };
    let ident = name
        .chars()
        .enumerate()
        .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()));
    if !ident {
        return Err(unsupported(query));
    }
    let mut matchers = Vec::new();
    if !name.is_empty() {
        matchers.push(Matcher::Eq("__name__".into(), name.into()));
    }
    let mut rest = body.trim();
    while !rest.is_empty() {
        let label_end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let label = rest[..label_end].to_string();
        rest = rest[label_end..].trim_start();
        let op =
            ["=~", "!~", "!=", "="].into_iter().find(|op| rest.starts_with(op)).ok_or_else(|| unsupported(query))?;
        rest = rest[op.len()..].trim_start();
        let (value, after) = string_literal(rest).ok_or_else(|| unsupported(query))?;
        rest = after.trim_start().strip_prefix(',').unwrap_or(after).trim_start();
        if label.is_empty() {
            return Err(unsupported(query));
        }
        let anchored = || {
            regex::Regex::new(&format!("^(?:{value})$"))
                .map_err(|e| PromError::bad(format!("invalid regular expression {value:?}: {e}")))
        };
        matchers.push(match op {
            "=" => Matcher::Eq(label, value),
            "!=" => Matcher::Ne(label, value),
            "=~" => Matcher::Re(label, anchored()?),
            _ => Matcher::NotRe(label, anchored()?),
        });
    }
    if matchers.is_empty() {
        return Err(PromError::bad("a selector needs a metric name or a matcher"));
    }
    for m in &matchers {
        if !matches!(m.label(), "__name__" | "sensor") {
            return Err(PromError::bad(format!("label {:?} is unknown: series have __name__ and sensor", m.label())));
        }
    }
    Ok(matchers)
}

/// A PromQL string: "..." or '...' with backslash escapes, or `...` raw. (value, rest).
fn string_literal(text: &str) -> Option<(String, &str)> {
    let quote = text.chars().next().filter(|c| matches!(c, '"' | '\'' | '`'))?;
    let mut out = String::new();
    let mut chars = text[1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => return Some((out, &text[1 + i + 1..])),
            '\\' if quote != '`' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The sensors the matchers select (at most [`MAX_SERIES`], else an error).
async fn select(app: &AppState, matchers: &[Matcher]) -> Result<Vec<(u32, String)>, PromError> {
    if !matchers.iter().filter(|m| m.label() == "__name__").all(|m| m.matches(METRIC)) {
        return Ok(Vec::new());
    }
    let sensors: Vec<Matcher> = matchers.iter().filter(|m| m.label() == "sensor").cloned().collect();
    // An exact sensor narrows the scan to it.
    let prefix = sensors
        .iter()
        .find_map(|m| match m {
            Matcher::Eq(_, v) => Some(v.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let all = app.store.read(move |conn| store::series_with_prefix(conn, &prefix)).await?;
    let chosen: Vec<(u32, String)> =
        all.into_iter().filter(|(_, name)| sensors.iter().all(|m| m.matches(name))).collect();
    if chosen.len() > MAX_SERIES {
        return Err(PromError::bad(format!(
            "the query selects {} series, more than {MAX_SERIES} (the limit); narrow the sensor matcher",
            chosen.len()
        )));
    }
    Ok(chosen)
}

/// The coarsest stored fixed size dividing every one of `values`.
fn calendar_for(app: &AppState, values: &[i64]) -> Result<Calendar, PromError> {
    app.layout()
        .calendars
        .iter()
        .rev()
        .find(|c| matches!(c, Calendar::Fixed(size) if values.iter().all(|v| v.rem_euclid(*size) == 0)))
        .cloned()
        .ok_or_else(|| {
            PromError::bad(format!(
                "the range, step and start must be multiples of a stored window size ({}); windows cannot be split",
                app.layout().sizes()
            ))
        })
}

fn value_of(func: Func, w: &Window) -> f64 {
    let s = &w.stats;
    match func {
        Func::Last => s.last.1,
        Func::Avg => s.mean(),
        Func::Min => s.min,
        Func::Max => s.max,
        Func::Count => s.count as f64,
        Func::Quantile(q) => s.quantile(q).unwrap_or(s.mean()),
    }
}

/// (t, value) at each t in `times`: the windows with start in `[t - range, t)` merged.
fn evaluate(stored: &[(i64, Window)], times: &[i64], range: i64, func: Func) -> Vec<(i64, f64)> {
    let mut out = Vec::new();
    let mut lo = 0;
    for &t in times {
        while lo < stored.len() && stored[lo].0 < t - range {
            lo += 1;
        }
        let mut merged: Option<Window> = None;
        for (start, w) in stored[lo..].iter().take_while(|(start, _)| *start < t) {
            let _ = start;
            match &mut merged {
                Some(m) => m.merge(w),
                None => merged = Some(w.clone()),
            }
        }
        if let Some(w) = merged {
            out.push((t, value_of(func, &w)));
        }
    }
    out
}

fn sample(t: i64, v: f64) -> Value {
    json!([t as f64 / 1000.0, format_value(v)])
}

/// Prometheus writes sample values as strings, `NaN`/`+Inf` included.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

async fn run(
    app: &AppState,
    expr: &Expr,
    times: Vec<i64>,
    step: i64,
) -> Result<Vec<(String, Vec<(i64, f64)>)>, PromError> {
    let (Some(&first), Some(&last)) = (times.first(), times.last()) else { return Ok(Vec::new()) };
    let range = expr.range_ms.unwrap_or(LOOKBACK_MS);
    let calendar = calendar_for(app, &[range, step, first])?;
    if let Calendar::Fixed(size) = calendar {
        // Bounded work: windows read per series, and windows merged over all steps.
        let read = (i128::from(last) - i128::from(first) + i128::from(range)) / i128::from(size);
        let merged = (range / size) as i128 * times.len() as i128;
        if read > MAX_WINDOWS_READ as i128 || merged > MAX_WINDOWS_MERGED as i128 {
            return Err(PromError::bad(format!(
                "the query needs {read} {}-windows per series ({merged} merges), more than {MAX_WINDOWS_READ} \
                 ({MAX_WINDOWS_MERGED}); use a range and step that are multiples of a coarser stored size, or a \
                 shorter time range",
                calendar.label()
            )));
        }
    }
    let series = select(app, &expr.matchers).await?;
    let func = expr.func;
    let results = app
        .store
        .read(move |conn| {
            let (from, to) = (first - range, last);
            let mut out = Vec::with_capacity(series.len());
            for (id, name) in series {
                let stored = store::windows(conn, &calendar, id, calendar.index_of(from), calendar.index_of(to - 1))?;
                let stored: Vec<(i64, Window)> =
                    stored.into_iter().map(|(index, w)| (calendar.start_of(index), w)).collect();
                let points = evaluate(&stored, &times, range, func);
                if !points.is_empty() {
                    out.push((name, points));
                }
            }
            Ok(out)
        })
        .await?;
    Ok(results)
}

fn labels(name: &str, expr: &Expr) -> Value {
    // A function drops the metric name, as in Prometheus.
    if expr.range_ms.is_some() { json!({"sensor": name}) } else { json!({"__name__": METRIC, "sensor": name}) }
}

/// `GET|POST /prometheus/api/v1/query_range?query=&start=&end=&step=`
pub async fn query_range(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(query, &headers, &body);
    answer_range(&app, &p).await.unwrap_or_else(IntoResponse::into_response)
}

async fn answer_range(app: &AppState, p: &[(String, String)]) -> Result<Response, PromError> {
    let required = |name: &str| param(p, name).ok_or_else(|| PromError::bad(format!("missing parameter \"{name}\"")));
    let expr = parse(required("query")?)?;
    let start = time_ms("start", required("start")?)?;
    let end = time_ms("end", required("end")?)?;
    let step = duration_ms(required("step")?)?;
    if end < start {
        return Err(PromError::bad("end timestamp must not be before start time"));
    }
    let points = (end - start) / step + 1;
    if points > MAX_POINTS as i64 {
        return Err(PromError::bad(format!(
            "exceeded maximum resolution of {MAX_POINTS} points per timeseries. Try decreasing the query resolution (?step=XX)"
        )));
    }
    let times: Vec<i64> = (0..points).map(|i| start + i * step).collect();
    let result: Vec<Value> = run(app, &expr, times, step)
        .await?
        .into_iter()
        .map(|(name, points)| {
            json!({"metric": labels(&name, &expr), "values": points.iter().map(|(t, v)| sample(*t, *v)).collect::<Vec<_>>()})
        })
        .collect();
    Ok(success(json!({"resultType": "matrix", "result": result})))
}

/// `GET|POST /prometheus/api/v1/query?query=&time=`
pub async fn query(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(query, &headers, &body);
    answer_instant(&app, &p).await.unwrap_or_else(IntoResponse::into_response)
}

async fn answer_instant(app: &AppState, p: &[(String, String)]) -> Result<Response, PromError> {
    let expr = parse(param(p, "query").ok_or_else(|| PromError::bad("missing parameter \"query\""))?)?;
    let time = match param(p, "time") {
        Some(t) => time_ms("time", t)?,
        None => crate::unix_ms(),
    };
    // Evaluated at the last boundary of the finest stored size at or before `time`.
    let finest = app
        .layout()
        .calendars
        .iter()
        .filter_map(|c| match c {
            Calendar::Fixed(s) => Some(*s),
            Calendar::Days { .. } => None,
        })
        .min()
        .ok_or_else(|| PromError::bad("no fixed window size is stored"))?;
    let t = time.div_euclid(finest) * finest;
    let result: Vec<Value> = run(app, &expr, vec![t], finest)
        .await?
        .into_iter()
        .filter_map(|(name, points)| {
            points.last().map(|(t, v)| json!({"metric": labels(&name, &expr), "value": sample(*t, *v)}))
        })
        .collect();
    Ok(success(json!({"resultType": "vector", "result": result})))
}

/// `GET|POST /prometheus/api/v1/series?match[]=`
pub async fn series(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(query, &headers, &body);
    let run = async {
        let mut out = Vec::new();
        for (_, m) in p.iter().filter(|(k, _)| k == "match[]") {
            let expr = parse(m)?;
            for (_, name) in select(&app, &expr.matchers).await? {
                let set = json!({"__name__": METRIC, "sensor": name});
                if !out.contains(&set) {
                    out.push(set);
                }
            }
        }
        if !p.iter().any(|(k, _)| k == "match[]") {
            return Err(PromError::bad("no match[] parameter provided"));
        }
        Ok(success(Value::Array(out)))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET|POST /prometheus/api/v1/labels`
pub async fn label_names() -> Response {
    success(json!(["__name__", "sensor"]))
}

/// `GET /prometheus/api/v1/label/{name}/values`
pub async fn label_values(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let run = async {
        match name.as_str() {
            "__name__" => Ok(success(json!([METRIC]))),
            "sensor" => {
                let all = app.store.read(|conn| store::series_with_prefix(conn, "")).await?;
                Ok(success(Value::Array(all.into_iter().map(|(_, n)| Value::String(n)).collect())))
            }
            _ => Ok(success(json!([]))),
        }
    };
    run.await.unwrap_or_else(|e: PromError| e.into_response())
}

/// `GET /prometheus/api/v1/status/buildinfo`: Grafana reads it to tell which flavour it talks to.
pub async fn buildinfo() -> Response {
    success(
        json!({"version": "2.45.0", "revision": "tributary", "branch": "", "buildUser": "", "buildDate": "", "goVersion": ""}),
    )
}

/// `GET /prometheus/api/v1/metadata`: nothing beyond the one metric.
pub async fn metadata() -> Response {
    success(json!({METRIC: [{"type": "gauge", "help": "A sensor reading, from Tributary's windows", "unit": ""}]}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_grafana_sends_are_parsed() {
        let e = parse(r#"avg_over_time(tributary_reading{sensor="room1/temp"}[5m])"#).ok().unwrap();
        assert_eq!((e.func, e.range_ms), (Func::Avg, Some(300_000)));
        let e = parse(r#"quantile_over_time(0.95, tributary_reading{sensor=~"line1/.*", sensor!="line1/x"}[1h])"#)
            .ok()
            .unwrap();
        assert_eq!(e.func, Func::Quantile(0.95));
        assert!(e.matchers[1].matches("line1/a") && !e.matchers[1].matches("xline1/a"), "anchored");
        assert!(!e.matchers[2].matches("line1/x"));
        let e = parse(r#"{__name__="tributary_reading",sensor='a\'b'}"#).ok().unwrap();
        assert!(e.matchers[1].matches("a'b") && e.range_ms.is_none());
        for bad in [
            "rate(tributary_reading[5m])",
            "tributary_reading{host=\"x\"}",
            "avg_over_time(tributary_reading)",
            "{}",
            "sum(x)",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_and_times_read_as_prometheus_writes_them() {
        assert_eq!(duration_ms("1h30m").ok(), Some(5_400_000));
        assert_eq!(duration_ms("15").ok(), Some(15_000));
        assert_eq!(duration_ms("0.5").ok(), Some(500));
        assert!(duration_ms("0s").is_err() && duration_ms("5x").is_err() && duration_ms("-1").is_err());
        assert_eq!(time_ms("start", "1764000000.5").ok(), Some(1_764_000_000_500));
        assert_eq!(time_ms("start", "2025-11-24T16:00:00Z").ok(), Some(1_764_000_000_000));
        assert!(time_ms("start", "soon").is_err() && time_ms("start", "1e300").is_err());
    }
}
