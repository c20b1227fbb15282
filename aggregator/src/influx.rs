//! `POST /write`: InfluxDB 1.x line protocol, so that an existing Telegraf (`outputs.influxdb`) or
//! any InfluxDB 1.x client can feed the aggregator. Also `GET|HEAD /ping` and a `POST /query` that
//! only answers `CREATE DATABASE` (Telegraf sends it at start).
//!
//! Every numeric field (float, `i` integer, `u` unsigned) of a line is one reading whose sensor id
//! is `<measurement>/<tag values, ordered by tag key>/<field key>` (without tags:
//! `<measurement>/<field key>`): `cpu,host=gw1,cpu=cpu0 usage_idle=97.5` is `cpu/cpu0/gw1/usage_idle`.
//! String and boolean fields are counted and skipped. A line is taken whole or rejected whole
//! (bad syntax, an id the shared rules refuse, a value that is not finite, a time outside
//! 2000–9999); rejected lines never hold back the good ones, as in InfluxDB 1.x: the good lines are
//! written and the answer is 400 `partial_write` naming the first few bad lines. All good: 204.
//!
//! Line protocol carries no sequence numbers. Each agent's writes go to their own stream, epoch
//! [`INFLUX_EPOCH`] (agents' spool epochs are never negative), and the log writer numbers them at
//! commit time. One request is one append, answered after the log commit. Delivery is therefore
//! at least once: a writer that retries after a lost answer writes its points again.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;

use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use tributary_shared::reading::{validate_sensor_id, validate_ts};
use tributary_shared::{BlockBuilder, MAX_SENSOR_ID_LEN, ReadingError};

use crate::api::AppState;
use crate::config::AgentConfig;
use crate::ingest::{BODY_LIMIT, IngestError, agent_for_token, read_body};
use crate::log::{AppendError, LogBlock};

/// The log epoch of line-protocol writes. Agents' epochs are random non-negative 63-bit numbers
/// (and `/api/v1/ingest` refuses larger ones), so a negative epoch is never an agent's spool.
pub const INFLUX_EPOCH: i64 = -1;

/// Most readings in one log block, as agents build them; a larger request is split.
pub const MAX_BLOCK_READINGS: usize = 65_536;

/// How many rejected lines a `partial_write` answer names.
const MAX_REASONS: usize = 3;

/// Longest `/query` body read (a `CREATE DATABASE` statement is a few dozen bytes).
const QUERY_BODY_LIMIT: usize = 64 << 10;

// ---------------------------------------------------------------------------------------------
// The parser
// ---------------------------------------------------------------------------------------------

/// A field's value, as line protocol types it.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    Float(f64),
    /// `12i`
    Integer(i64),
    /// `12u`
    Unsigned(u64),
    /// `"text"`, with `\"` and `\\` unescaped.
    String(Cow<'a, str>),
    /// `t`, `T`, `true`, `True`, `TRUE`, and the same for false.
    Boolean(bool),
}

/// One parsed line (a point): names unescaped, tags as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Line<'a> {
    pub measurement: Cow<'a, str>,
    pub tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    pub fields: Vec<(Cow<'a, str>, FieldValue<'a>)>,
    /// In the request's precision; `None` means "the server's receive time".
    pub timestamp: Option<i64>,
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineError {
    #[error("no measurement")]
    NoMeasurement,
    #[error("tag {0:?} is not key=value with both non-empty")]
    BadTag(String),
    #[error("tag key {0:?} appears twice")]
    DuplicateTag(String),
    #[error("no fields (a line is `measurement[,tag=value...] field=value[,...] [timestamp]`)")]
    NoFields,
    #[error("field {0:?} is not key=value with both non-empty")]
    BadField(String),
    #[error("field {field:?}: {value:?} is not a float, integer (12i), unsigned (12u), string or boolean")]
    BadValue { field: String, value: String },
    #[error("field {0:?}: string value has no closing quote")]
    UnterminatedString(String),
    #[error("timestamp {0:?} is not an integer")]
    BadTimestamp(String),
    #[error("unexpected text after the timestamp: {0:?}")]
    TrailingText(String),
    #[error("not valid UTF-8")]
    NotUtf8,
    #[error("field {field:?}: value {value} is not a finite number")]
    NotFinite { field: String, value: String },
    #[error("timestamp {ts} in precision {precision} is out of range: {reason}")]
    Timestamp { ts: i64, precision: &'static str, reason: String },
    #[error("sensor id {id:?}: {error}")]
    SensorId { id: String, error: ReadingError },
}

/// Splits a body into lines and parses each; yields `(line number from 1, result)` for every line
/// that is not blank or a comment. A string field value may span lines; an unterminated one
/// costs only its own line.
pub fn parse_body(body: &[u8]) -> impl Iterator<Item = (usize, Result<Line<'_>, LineError>)> + '_ {
    let mut pos = 0;
    let mut line_no = 0;
    std::iter::from_fn(move || {
        while pos < body.len() {
            line_no += 1;
            let start = pos;
            let (result, next) = parse_line(body, start);
            pos = next.max(start + 1);
            let number = line_no;
            // Lines a string field value spanned count too, so numbers match the client's editor.
            line_no += body[start..pos.min(body.len())].iter().filter(|&&b| b == b'\n').count().saturating_sub(1);
            match result {
                Ok(None) => continue,
                Ok(Some(line)) => return Some((number, Ok(line))),
                Err(error) => return Some((number, Err(error))),
            }
        }
        None
    })
}

/// Parses the line starting at `start`; returns it (None: blank or comment) and where the next
/// line starts.
fn parse_line(buf: &[u8], start: usize) -> (Result<Option<Line<'_>>, LineError>, usize) {
    let mut p = Cursor { buf, pos: start };
    match p.line() {
        Ok(line) => (Ok(line), p.pos),
        Err(error) => {
            // A bad line ends at its first newline, even inside an open quote: a stray quote must
            // not swallow the good lines after it.
            let next = buf[start..].iter().position(|&b| b == b'\n').map_or(buf.len(), |i| start + i + 1);
            (Err(error), next)
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Failure = LineError;

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn at_line_end(&self) -> bool {
        matches!(self.peek(), None | Some(b'\n'))
    }

    fn skip_spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r')) {
            self.pos += 1;
        }
    }

    fn fail<T>(&self, error: LineError) -> Result<T, Failure> {
        Err(error)
    }

    /// Consumes up to (not including) an unescaped byte in `stops` or a newline; a backslash
    /// always takes the byte after it along (as InfluxDB 1.x scans).
    fn scan_name(&mut self, stops: &[u8]) -> &'a [u8] {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b == b'\n' || stops.contains(&b) {
                break;
            }
            if b == b'\\' && self.buf.get(self.pos + 1).is_some_and(|&n| n != b'\n') {
                self.pos += 2;
            } else {
                self.pos += 1;
            }
        }
        &self.buf[start..self.pos]
    }

    /// Consumes an unquoted token (a number, boolean or timestamp).
    fn scan_token(&mut self, stops: &[u8]) -> &'a [u8] {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b == b'\n' || b == b'\r' || stops.contains(&b) {
                break;
            }
            self.pos += 1;
        }
        &self.buf[start..self.pos]
    }

    fn line(&mut self) -> Result<Option<Line<'a>>, Failure> {
        self.skip_spaces();
        if self.at_line_end() {
            self.pos += 1;
            return Ok(None);
        }
        if self.peek() == Some(b'#') {
            let rest = &self.buf[self.pos..];
            self.pos += rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1);
            return Ok(None);
        }
        let raw = self.scan_name(b", ");
        let measurement = unescape(raw, b", ")?;
        if measurement.is_empty() {
            return self.fail(LineError::NoMeasurement);
        }
        let mut tags: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::new();
        while self.peek() == Some(b',') {
            self.pos += 1;
            let tag_start = self.pos;
            let key = self.scan_name(b",= ");
            if self.peek() != Some(b'=') || key.is_empty() {
                let text = sample(&self.buf[tag_start..self.pos]);
                return self.fail(LineError::BadTag(text));
            }
            self.pos += 1;
            let value = self.scan_name(b", ");
            if value.is_empty() {
                let text = sample(&self.buf[tag_start..self.pos]);
                return self.fail(LineError::BadTag(text));
            }
            tags.push((unescape(key, b",= ")?, unescape(value, b",= ")?));
        }
        if let Some(key) = first_repeated(tags.iter().map(|(k, _)| k.as_ref())) {
            return self.fail(LineError::DuplicateTag(sample(key.as_bytes())));
        }
        if self.peek() != Some(b' ') {
            return self.fail(LineError::NoFields);
        }
        self.skip_spaces();
        if self.at_line_end() {
            return self.fail(LineError::NoFields);
        }
        let mut fields = Vec::new();
        loop {
            let field_start = self.pos;
            let key = self.scan_name(b",= ");
            if self.peek() != Some(b'=') || key.is_empty() {
                let text = sample(&self.buf[field_start..self.pos]);
                return self.fail(LineError::BadField(text));
            }
            let key = unescape(key, b",= ")?;
            self.pos += 1;
            let value = if self.peek() == Some(b'"') {
                self.string_value(&key)?
            } else {
                let token = self.scan_token(b", ");
                parse_value(token)
                    .ok_or_else(|| LineError::BadValue { field: sample(key.as_bytes()), value: sample(token) })?
            };
            fields.push((key, value));
            if self.peek() == Some(b',') {
                self.pos += 1;
            } else {
                break;
            }
        }
        let mut timestamp = None;
        if self.peek() == Some(b' ') {
            self.skip_spaces();
            if !self.at_line_end() {
                let token = self.scan_token(b" ");
                let text = std::str::from_utf8(token).ok();
                match text.and_then(|t| t.parse::<i64>().ok()) {
                    Some(ts) => timestamp = Some(ts),
                    None => {
                        return self.fail(LineError::BadTimestamp(sample(token)));
                    }
                }
                self.skip_spaces();
            }
        } else {
            self.skip_spaces();
        }
        if !self.at_line_end() {
            let rest = self.scan_token(b"");
            return self.fail(LineError::TrailingText(sample(rest)));
        }
        self.pos += 1;
        Ok(Some(Line { measurement, tags, fields, timestamp }))
    }

    /// A quoted string value (the cursor is on the opening quote); it may hold newlines.
    fn string_value(&mut self, key: &str) -> Result<FieldValue<'a>, Failure> {
        self.pos += 1;
        let start = self.pos;
        let mut escaped = false;
        loop {
            match self.peek() {
                None => return Err(LineError::UnterminatedString(sample(key.as_bytes()))),
                Some(b'\\') if matches!(self.buf.get(self.pos + 1), Some(b'"' | b'\\')) => {
                    escaped = true;
                    self.pos += 2;
                }
                Some(b'"') => break,
                Some(_) => self.pos += 1,
            }
        }
        let raw = &self.buf[start..self.pos];
        self.pos += 1;
        let text = if escaped {
            let mut out = Vec::with_capacity(raw.len());
            let mut i = 0;
            while i < raw.len() {
                if raw[i] == b'\\' && matches!(raw.get(i + 1), Some(b'"' | b'\\')) {
                    out.push(raw[i + 1]);
                    i += 2;
                } else {
                    out.push(raw[i]);
                    i += 1;
                }
            }
            Cow::Owned(String::from_utf8(out).map_err(|_| LineError::NotUtf8)?)
        } else {
            Cow::Borrowed(std::str::from_utf8(raw).map_err(|_| LineError::NotUtf8)?)
        };
        // A string ending the line must leave the cursor on a separator or the line's end.
        if !matches!(self.peek(), None | Some(b',' | b' ' | b'\n' | b'\r')) {
            let value = sample(format!("\"{text}\"").as_bytes());
            return self.fail(LineError::BadValue { field: sample(key.as_bytes()), value });
        }
        Ok(FieldValue::String(text))
    }
}

/// The first key that occurs twice. Quadratic for the usual handful of keys (no allocation), sorted
/// beyond that, so a hostile line of a million tags costs n log n, not n².
fn first_repeated<'k>(mut keys: impl ExactSizeIterator<Item = &'k str> + Clone) -> Option<&'k str> {
    if keys.len() <= 16 {
        let mut rest = keys.clone();
        return keys.find(|k| {
            rest.next();
            rest.clone().any(|other| other == *k)
        });
    }
    let mut sorted: Vec<&str> = keys.collect();
    sorted.sort_unstable();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// At most 64 bytes of `raw` for an error message (a bad line may be megabytes long).
fn sample(raw: &[u8]) -> String {
    const MAX: usize = 64;
    if raw.len() <= MAX {
        return String::from_utf8_lossy(raw).into_owned();
    }
    format!("{}...", String::from_utf8_lossy(&raw[..MAX]))
}

/// Removes the backslash of `\` followed by one of `escapable`; any other backslash is literal
/// (InfluxDB 1.x: `\\` in a name stays two characters).
fn unescape<'a>(raw: &'a [u8], escapable: &[u8]) -> Result<Cow<'a, str>, LineError> {
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(raw).map(Cow::Borrowed).map_err(|_| LineError::NotUtf8);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw.get(i + 1) {
            Some(next) if raw[i] == b'\\' && escapable.contains(next) => {
                out.push(*next);
                i += 2;
            }
            _ => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map(Cow::Owned).map_err(|_| LineError::NotUtf8)
}

/// An unquoted field value: boolean, `i` integer, `u` unsigned or float (digits, sign, point,
/// exponent only: `inf` and `NaN` are not line protocol).
fn parse_value(token: &[u8]) -> Option<FieldValue<'static>> {
    match token {
        b"t" | b"T" | b"true" | b"True" | b"TRUE" => return Some(FieldValue::Boolean(true)),
        b"f" | b"F" | b"false" | b"False" | b"FALSE" => return Some(FieldValue::Boolean(false)),
        _ => {}
    }
    let text = std::str::from_utf8(token).ok()?;
    if let Some(digits) = text.strip_suffix('i') {
        return integer_digits(digits).then(|| digits.parse().ok().map(FieldValue::Integer)).flatten();
    }
    if let Some(digits) = text.strip_suffix('u') {
        return (integer_digits(digits) && !digits.starts_with('-'))
            .then(|| digits.parse().ok().map(FieldValue::Unsigned))
            .flatten();
    }
    if !text.bytes().any(|b| b.is_ascii_digit())
        || !text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
    {
        return None;
    }
    // A float beyond f64's range parses as infinity: kept here, rejected as not finite later.
    text.parse().ok().map(FieldValue::Float)
}

fn integer_digits(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

// ---------------------------------------------------------------------------------------------
// Lines to readings
// ---------------------------------------------------------------------------------------------

/// The `precision=` of a write: the unit of its timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

impl Precision {
    /// InfluxDB 1.x's names; empty or missing means nanoseconds.
    pub fn parse(text: &str) -> Option<Precision> {
        Some(match text {
            "" | "n" | "ns" => Precision::Nanoseconds,
            "u" | "us" | "µ" | "µs" => Precision::Microseconds,
            "ms" => Precision::Milliseconds,
            "s" => Precision::Seconds,
            "m" => Precision::Minutes,
            "h" => Precision::Hours,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Precision::Nanoseconds => "ns",
            Precision::Microseconds => "us",
            Precision::Milliseconds => "ms",
            Precision::Seconds => "s",
            Precision::Minutes => "m",
            Precision::Hours => "h",
        }
    }

    /// `ts` in this unit, as Unix ms (rounded down), or None if it does not fit an i64.
    pub fn to_ms(self, ts: i64) -> Option<i64> {
        match self {
            Precision::Nanoseconds => Some(ts.div_euclid(1_000_000)),
            Precision::Microseconds => Some(ts.div_euclid(1_000)),
            Precision::Milliseconds => Some(ts),
            Precision::Seconds => ts.checked_mul(1_000),
            Precision::Minutes => ts.checked_mul(60_000),
            Precision::Hours => ts.checked_mul(3_600_000),
        }
    }
}

/// What one line yields: its readings (sensor id, value) at one time, and the fields skipped.
#[derive(Debug, Default, PartialEq)]
pub struct LineReadings {
    pub ts_ms: i64,
    pub readings: Vec<(String, f64)>,
    pub skipped_strings: u64,
    pub skipped_booleans: u64,
}

/// The readings of a line, all or none: `now_ms` stands in for a missing timestamp.
pub fn line_readings(line: &Line<'_>, precision: Precision, now_ms: i64) -> Result<LineReadings, LineError> {
    let ts_ms = match line.timestamp {
        None => now_ms,
        Some(ts) => {
            let out_of_range = |reason: String| LineError::Timestamp { ts, precision: precision.name(), reason };
            let ms = precision.to_ms(ts).ok_or_else(|| out_of_range("does not fit in 64 bits as ms".into()))?;
            validate_ts(ms).map_err(|e| out_of_range(e.to_string()))?;
            ms
        }
    };
    let mut tags: Vec<&(Cow<'_, str>, Cow<'_, str>)> = line.tags.iter().collect();
    // InfluxDB's canonical series key orders tags by key.
    tags.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut prefix = String::with_capacity(64);
    prefix.push_str(&line.measurement);
    for (_, value) in &tags {
        prefix.push('/');
        prefix.push_str(value);
        // Every id would be too long: say so before building any (a line may have a million tags).
        if prefix.len() >= MAX_SENSOR_ID_LEN {
            let id = format!("{prefix}/...");
            let error = ReadingError::SensorIdTooLong { len: id.len() };
            return Err(LineError::SensorId { id: sample(id.as_bytes()), error });
        }
    }
    // A field key given twice: the last one counts, as InfluxDB keeps it.
    let superseded = superseded_fields(&line.fields);
    let mut out = LineReadings { ts_ms, ..LineReadings::default() };
    for (i, (key, value)) in line.fields.iter().enumerate() {
        if superseded.as_ref().is_some_and(|s| s[i]) {
            continue;
        }
        let number = match value {
            FieldValue::Float(v) => *v,
            FieldValue::Integer(v) => *v as f64,
            FieldValue::Unsigned(v) => *v as f64,
            FieldValue::String(_) => {
                out.skipped_strings += 1;
                continue;
            }
            FieldValue::Boolean(_) => {
                out.skipped_booleans += 1;
                continue;
            }
        };
        if !number.is_finite() {
            return Err(LineError::NotFinite { field: sample(key.as_bytes()), value: number.to_string() });
        }
        let id = format!("{prefix}/{key}");
        validate_sensor_id(&id).map_err(|error| LineError::SensorId { id: sample(id.as_bytes()), error })?;
        out.readings.push((id, number));
    }
    Ok(out)
}

/// Which fields a later field of the same key overrides; None when no key repeats.
fn superseded_fields(fields: &[(Cow<'_, str>, FieldValue<'_>)]) -> Option<Vec<bool>> {
    first_repeated(fields.iter().map(|(k, _)| k.as_ref()))?;
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(fields.len());
    for (i, (key, _)) in fields.iter().enumerate() {
        last.insert(key.as_ref(), i);
    }
    Some(fields.iter().enumerate().map(|(i, (key, _))| last.get(key.as_ref()) != Some(&i)).collect())
}

/// A parsed request, ready for the log.
#[derive(Debug, Default)]
pub struct ParsedWrite {
    /// Numbered from 0 within the request (the log writer places them).
    pub blocks: Vec<LogBlock>,
    pub readings: u64,
    /// Lines that are neither blank nor comments.
    pub lines: u64,
    pub rejected: u64,
    /// The first few rejected lines: (line number, reason).
    pub reasons: Vec<(usize, LineError)>,
    pub skipped_strings: u64,
    pub skipped_booleans: u64,
}

/// Parses a (decompressed) body into log blocks of at most [`MAX_BLOCK_READINGS`] readings.
pub fn parse_write(body: &[u8], precision: Precision, now_ms: i64) -> ParsedWrite {
    let mut out = ParsedWrite::default();
    let mut builder = BlockBuilder::default();
    let mut next_seq = 0u64;
    let mut seal = |builder: &mut BlockBuilder, blocks: &mut Vec<LogBlock>| {
        if builder.is_empty() {
            return;
        }
        let block = builder.take();
        let count = block.entries.len() as u32;
        blocks.push(LogBlock { first_seq: next_seq, count, data: Bytes::from(block.encode()) });
        next_seq += u64::from(count);
    };
    for (number, line) in parse_body(body) {
        out.lines += 1;
        match line.and_then(|line| line_readings(&line, precision, now_ms)) {
            Ok(line) => {
                out.skipped_strings += line.skipped_strings;
                out.skipped_booleans += line.skipped_booleans;
                for (id, value) in line.readings {
                    builder.push(&id, line.ts_ms, value);
                    out.readings += 1;
                    if builder.len() >= MAX_BLOCK_READINGS {
                        seal(&mut builder, &mut out.blocks);
                    }
                }
            }
            Err(error) => {
                out.rejected += 1;
                if out.reasons.len() < MAX_REASONS {
                    out.reasons.push((number, error));
                }
            }
        }
    }
    seal(&mut builder, &mut out.blocks);
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// Why a write was answered with an error. Every one but [`WriteError::PartialWrite`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "missing or unknown token: send an agent's token as `Authorization: Bearer <token>` (or `Token <token>`, \
         HTTP Basic auth with the token as password, or `?u=<any>&p=<token>`)"
    )]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("Content-Encoding {0:?} is not supported: send gzip or identity")]
    UnsupportedEncoding(String),
    #[error(
        "body is larger than {BODY_LIMIT} bytes (after decompression); send smaller batches (Telegraf: lower \
         metric_batch_size)"
    )]
    TooLarge,
    /// The good lines were written; these were not.
    #[error("{rejected} of {lines} lines rejected: {reasons}")]
    PartialWrite { rejected: u64, lines: u64, reasons: String },
    #[error("{0}; retry")]
    Unavailable(AppendError),
}

impl WriteError {
    pub fn status(&self) -> StatusCode {
        match self {
            WriteError::Unauthorized => StatusCode::UNAUTHORIZED,
            WriteError::BadRequest(_) | WriteError::PartialWrite { .. } => StatusCode::BAD_REQUEST,
            WriteError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            WriteError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            WriteError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            WriteError::Unauthorized => "unauthorized",
            WriteError::BadRequest(_) => "bad_request",
            WriteError::UnsupportedEncoding(_) => "unsupported_media_type",
            WriteError::TooLarge => "payload_too_large",
            WriteError::PartialWrite { .. } => "partial_write",
            WriteError::Unavailable(_) => "unavailable",
        }
    }
}

impl IntoResponse for WriteError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code(), "detail": self.to_string() });
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, WriteError::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `POST /write?precision=..&db=..`: `db`, `rp` and `consistency` are accepted and ignored.
pub async fn write(State(app): State<AppState>, RawQuery(query): RawQuery, headers: HeaderMap, body: Body) -> Response {
    let response = match handle(&app, query.as_deref(), &headers, body).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => {
            if error.status().is_server_error() {
                tracing::warn!(%error, "line-protocol write failed");
            } else {
                tracing::debug!(%error, status = error.status().as_u16(), "line-protocol write refused");
            }
            error.into_response()
        }
    };
    app.metrics.influx_request(response.status().as_u16());
    response
}

async fn handle(app: &AppState, query: Option<&str>, headers: &HeaderMap, body: Body) -> Result<(), WriteError> {
    let params: Vec<(Cow<'_, str>, Cow<'_, str>)> =
        query.map(|q| url::form_urlencoded::parse(q.as_bytes()).collect()).unwrap_or_default();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_ref());
    let agent = authenticate(&app.agents, headers, param("p")).ok_or(WriteError::Unauthorized)?;
    let precision_text = param("precision").unwrap_or("");
    let precision = Precision::parse(precision_text).ok_or_else(|| {
        WriteError::BadRequest(format!("precision {precision_text:?} is not one of ns, u (us), ms, s, m, h"))
    })?;
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()) {
        None => false,
        Some(e) if e.trim().eq_ignore_ascii_case("gzip") => true,
        Some(e) if e.trim().is_empty() || e.trim().eq_ignore_ascii_case("identity") => false,
        Some(other) => return Err(WriteError::UnsupportedEncoding(other)),
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > BODY_LIMIT as u64) {
        return Err(WriteError::TooLarge);
    }
    let body = read_body(body).await.map_err(|error| match error {
        IngestError::TooLarge => WriteError::TooLarge,
        other => WriteError::BadRequest(other.to_string()),
    })?;
    let now_ms = crate::unix_ms();
    // Inflating and parsing take milliseconds of CPU for a large batch: off the async workers.
    let parsed = tokio::task::spawn_blocking(move || {
        let text = if gzip { Cow::Owned(gunzip(&body)?) } else { Cow::Borrowed(&body[..]) };
        Ok::<_, WriteError>(parse_write(&text, precision, now_ms))
    })
    .await
    .map_err(|e| WriteError::Unavailable(AppendError::Storage(e.to_string())))??;
    app.metrics.influx_fields_skipped_string.inc_by(parsed.skipped_strings);
    app.metrics.influx_fields_skipped_boolean.inc_by(parsed.skipped_booleans);
    app.metrics.influx_lines_rejected.inc_by(parsed.rejected);
    if !parsed.blocks.is_empty() {
        let ack =
            app.log.append_assigned(&agent.id, INFLUX_EPOCH, parsed.blocks).await.map_err(WriteError::Unavailable)?;
        tracing::trace!(agent = %agent.id, readings = ack.accepted, "line-protocol write logged");
    }
    if parsed.rejected == 0 {
        return Ok(());
    }
    let reasons: Vec<String> = parsed.reasons.iter().map(|(n, e)| format!("line {n}: {e}")).collect();
    let mut reasons = reasons.join("; ");
    if parsed.rejected > parsed.reasons.len() as u64 {
        reasons.push_str("; ...");
    }
    tracing::debug!(
        agent = %agent.id,
        rejected = parsed.rejected,
        lines = parsed.lines,
        sample = %reasons,
        "line-protocol lines rejected; the others were written"
    );
    Err(WriteError::PartialWrite { rejected: parsed.rejected, lines: parsed.lines, reasons })
}

/// Inflates a gzip body, refusing one that inflates beyond [`BODY_LIMIT`] (a gzip bomb costs at
/// most that much memory).
fn gunzip(body: &[u8]) -> Result<Vec<u8>, WriteError> {
    let mut out = Vec::with_capacity((body.len() * 4).min(BODY_LIMIT));
    flate2::read::MultiGzDecoder::new(body)
        .take(BODY_LIMIT as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| WriteError::BadRequest(format!("body is not valid gzip ({e}); check Content-Encoding")))?;
    if out.len() > BODY_LIMIT {
        return Err(WriteError::TooLarge);
    }
    Ok(out)
}

/// The agent a write authenticates as: its token in `Authorization: Bearer|Token <token>`, as the
/// password of `Authorization: Basic` (Telegraf's `username`/`password`), or as `?p=`.
/// `Token user:token` (InfluxDB 1.8's 2.x-compatible form) works too.
fn authenticate<'a>(agents: &'a [AgentConfig], headers: &HeaderMap, query_p: Option<&str>) -> Option<&'a AgentConfig> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return query_p.and_then(|p| agent_for_token(agents, p.as_bytes()));
    };
    let value = value.to_str().ok()?;
    let (scheme, credentials) = value.trim().split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        agent_for_token(agents, credentials.as_bytes())
    } else if scheme.eq_ignore_ascii_case("token") {
        agent_for_token(agents, credentials.as_bytes()).or_else(|| {
            let (_, password) = credentials.split_once(':')?;
            agent_for_token(agents, password.as_bytes())
        })
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(credentials).ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        agent_for_token(agents, &decoded[colon + 1..])
    } else {
        None
    }
}

/// `GET|HEAD /ping`: InfluxDB's liveness probe.
pub async fn ping() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `GET|POST /query`: only `CREATE DATABASE` (a no-op: there is one log), so that Telegraf without
/// `skip_database_creation` starts cleanly; the statement comes as `?q=` or a form body.
pub async fn query(RawQuery(query): RawQuery, body: Body) -> Response {
    let mut statement = query.as_deref().and_then(|q| form_value(q.as_bytes(), "q"));
    if statement.is_none() {
        if let Ok(collected) =
            http_body_util::BodyExt::collect(http_body_util::Limited::new(body, QUERY_BODY_LIMIT)).await
        {
            statement = form_value(&collected.to_bytes(), "q");
        }
    }
    let create = statement.as_deref().is_some_and(|q| {
        let words: Vec<&str> = q.split_whitespace().take(2).collect();
        words.len() == 2 && words[0].eq_ignore_ascii_case("create") && words[1].eq_ignore_ascii_case("database")
    });
    if create {
        return (StatusCode::OK, Json(serde_json::json!({ "results": [{ "statement_id": 0 }] }))).into_response();
    }
    let detail = format!(
        "{} is not supported: /query answers only CREATE DATABASE (a no-op); write with POST /write and read \
         through /api/v1/ (see the README)",
        statement.map_or_else(|| "a query without q=".to_string(), |q| format!("{q:?}"))
    );
    (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": "bad_request", "detail": detail }))).into_response()
}

fn form_value(form: &[u8], name: &str) -> Option<String> {
    url::form_urlencoded::parse(form).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(text: &str) -> Line<'_> {
        let mut lines: Vec<_> = parse_body(text.as_bytes()).collect();
        assert_eq!(lines.len(), 1, "{text}: {lines:?}");
        lines.remove(0).1.unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn error(text: &str) -> LineError {
        let mut lines: Vec<_> = parse_body(text.as_bytes()).collect();
        assert_eq!(lines.len(), 1, "{text}: {lines:?}");
        lines.remove(0).1.unwrap_err()
    }

    #[test]
    fn telegraf_lines_parse_with_tags_fields_and_escapes() {
        let line = one(
            r#"disk,device=sda1,path=/mnt/my\ disk,fstype=ext4 free=12i,used_percent=41.5,ro=false,label="a \"b\" \\c" 1764000000000000000"#,
        );
        assert_eq!(line.measurement, "disk");
        assert_eq!(
            line.tags,
            [
                ("device".into(), "sda1".into()),
                ("path".into(), "/mnt/my disk".into()),
                ("fstype".into(), "ext4".into())
            ]
        );
        assert_eq!(
            line.fields,
            [
                ("free".into(), FieldValue::Integer(12)),
                ("used_percent".into(), FieldValue::Float(41.5)),
                ("ro".into(), FieldValue::Boolean(false)),
                ("label".into(), FieldValue::String(r#"a "b" \c"#.into())),
            ]
        );
        assert_eq!(line.timestamp, Some(1_764_000_000_000_000_000));
        let line = one(r"my\ meas\,ure,t\=a\ g=v\,a\=l\ ue fi\ e\,l\=d=1u");
        assert_eq!(line.measurement, "my meas,ure");
        assert_eq!(line.tags, [("t=a g".into(), "v,a=l ue".into())]);
        assert_eq!(line.fields, [("fi e,l=d".into(), FieldValue::Unsigned(1))]);
        assert_eq!(line.timestamp, None);
        // A backslash before anything else is a plain character.
        assert_eq!(one(r"a\b c\d=1").measurement, r"a\b");
    }

    #[test]
    fn every_value_type_parses() {
        for (text, value) in [
            ("1", FieldValue::Float(1.0)),
            ("-1.5", FieldValue::Float(-1.5)),
            ("1e3", FieldValue::Float(1000.0)),
            ("-2.5E-3", FieldValue::Float(-0.0025)),
            (".5", FieldValue::Float(0.5)),
            ("-12i", FieldValue::Integer(-12)),
            ("9223372036854775807i", FieldValue::Integer(i64::MAX)),
            ("18446744073709551615u", FieldValue::Unsigned(u64::MAX)),
            ("t", FieldValue::Boolean(true)),
            ("TRUE", FieldValue::Boolean(true)),
            ("True", FieldValue::Boolean(true)),
            ("F", FieldValue::Boolean(false)),
            ("false", FieldValue::Boolean(false)),
            (r#""""#, FieldValue::String("".into())),
            ("\"two\nlines\"", FieldValue::String("two\nlines".into())),
        ] {
            assert_eq!(one(&format!("m v={text} 5")).fields, [("v".into(), value)], "{text}");
        }
        for bad in ["inf", "NaN", "1.2.3x", "12x", "-1u", "9223372036854775808i", "1i2", "tru", "", "\"a\"b"] {
            assert!(matches!(error(&format!("m v={bad}")), LineError::BadValue { .. }), "{bad}");
        }
    }

    #[test]
    fn malformed_lines_name_their_fault() {
        assert_eq!(error("cpu"), LineError::NoFields);
        assert_eq!(error("cpu,host=a"), LineError::NoFields);
        assert_eq!(error("cpu "), LineError::NoFields);
        assert_eq!(error(",host=a v=1"), LineError::NoMeasurement);
        assert!(matches!(error("cpu,host v=1"), LineError::BadTag(_)));
        assert!(matches!(error("cpu,host= v=1"), LineError::BadTag(_)));
        assert_eq!(error("cpu,a=1,a=2 v=1"), LineError::DuplicateTag("a".into()));
        assert!(matches!(error("cpu v"), LineError::BadField(_)));
        assert!(matches!(error("cpu =1"), LineError::BadField(_)));
        assert_eq!(error("cpu v=1 12x"), LineError::BadTimestamp("12x".into()));
        assert_eq!(error("cpu v=1 12 13"), LineError::TrailingText("13".into()));
        assert_eq!(error("cpu v=\"open"), LineError::UnterminatedString("v".into()));
        let raw: &[u8] = b"cpu,h=\xff v=1";
        let results: Vec<_> = parse_body(raw).collect();
        assert_eq!(results[0].1, Err(LineError::NotUtf8));
    }

    #[test]
    fn blank_lines_comments_and_crlf_are_not_points() {
        let body = "# a comment\n\n  \ncpu v=1 10\r\n# another\r\nmem v=2i\n";
        let lines: Vec<_> =
            parse_body(body.as_bytes()).map(|(n, l)| (n, l.unwrap().measurement.into_owned())).collect();
        assert_eq!(lines, [(4, "cpu".to_string()), (6, "mem".to_string())]);
    }

    #[test]
    fn a_bad_line_costs_only_itself() {
        // The stray quote of line 2 would otherwise run to line 5's first quote.
        let body = "cpu v=1 1\ncpu v=\"never closed\ncpu v=2 2\ncpu,x v=3\ncpu v=4,s=\"a\" 4";
        let results: Vec<_> = parse_body(body.as_bytes()).collect();
        let good: Vec<Option<i64>> = results.iter().filter_map(|(_, l)| l.as_ref().ok()).map(|l| l.timestamp).collect();
        assert_eq!(good, [Some(1), Some(2), Some(4)]);
        let bad: Vec<usize> = results.iter().filter(|(_, l)| l.is_err()).map(|(n, _)| *n).collect();
        assert_eq!(bad, [2, 4]);
    }

    #[test]
    fn sensor_ids_are_measurement_sorted_tag_values_and_field() {
        let line = one("cpu,host=gw1,cpu=cpu0 usage_idle=97.5,usage_user=1i,state=\"ok\",up=t 1764000000000000000");
        let out = line_readings(&line, Precision::Nanoseconds, 0).unwrap();
        assert_eq!(out.ts_ms, 1_764_000_000_000);
        assert_eq!(
            out.readings,
            [("cpu/cpu0/gw1/usage_idle".to_string(), 97.5), ("cpu/cpu0/gw1/usage_user".to_string(), 1.0)]
        );
        assert_eq!((out.skipped_strings, out.skipped_booleans), (1, 1));
        let out = line_readings(&one("room temp=21.5,temp=22"), Precision::Nanoseconds, 1_764_000_000_123).unwrap();
        assert_eq!((out.ts_ms, out.readings), (1_764_000_000_123, vec![("room/temp".to_string(), 22.0)]));
    }

    #[test]
    fn a_line_is_rejected_whole_for_one_bad_reading() {
        let check = |text: &str| line_readings(&one(text), Precision::Seconds, 0).unwrap_err();
        assert!(matches!(check("m a=1,b=1e999 1764000000"), LineError::NotFinite { .. }));
        assert!(matches!(check("m,t=a+b v=1 1764000000"), LineError::SensorId { .. }));
        let long = "x".repeat(tributary_shared::MAX_SENSOR_ID_LEN);
        assert!(matches!(check(&format!("m v=1,{long}=2 1764000000")), LineError::SensorId { .. }));
        assert!(matches!(check("m v=1 946684799"), LineError::Timestamp { .. }));
        assert!(matches!(check("m v=1 9223372036854775807"), LineError::Timestamp { .. }));
        assert!(matches!(
            line_readings(&one("m v=1 -1"), Precision::Nanoseconds, 0).unwrap_err(),
            LineError::Timestamp { .. }
        ));
    }

    #[test]
    fn a_line_of_100k_tags_or_fields_is_not_quadratic() {
        // Quadratic duplicate checks or id building would make this 5 * 10^9 comparisons.
        let tags: String = (0..100_000).map(|i| format!(",t{i}=v")).collect();
        let fields: String = (0..100_000).map(|i| format!("f{i}=1,")).collect();
        let fields = fields.trim_end_matches(',');
        let parsed =
            parse_write(format!("m{tags} v=1\nm {fields},f7=2 1764000000\n").as_bytes(), Precision::Seconds, 0);
        assert_eq!((parsed.lines, parsed.rejected, parsed.readings), (2, 1, 100_000));
        assert!(
            matches!(&parsed.reasons[0].1, LineError::SensorId { id, .. } if id.len() < 100),
            "{:?}",
            parsed.reasons
        );
        let repeated: String = (0..100).map(|i| format!(",t{i}=v")).collect();
        let parsed = parse_write(format!("m{repeated},t42=w v=1").as_bytes(), Precision::Seconds, 0);
        assert!(matches!(&parsed.reasons[0].1, LineError::DuplicateTag(k) if k == "t42"), "{:?}", parsed.reasons);
    }

    #[test]
    fn every_precision_lands_on_the_same_ms() {
        let ms = 1_764_000_000_000i64;
        for (precision, ts) in [
            ("", ms * 1_000_000),
            ("ns", ms * 1_000_000 + 999_999),
            ("u", ms * 1_000),
            ("us", ms * 1_000),
            ("ms", ms),
            ("s", ms / 1_000),
            ("m", ms / 60_000),
            ("h", ms / 3_600_000),
        ] {
            // `ms` is a whole hour, so every unit can spell it.
            assert_eq!(Precision::parse(precision).unwrap().to_ms(ts), Some(ms), "{precision}");
        }
        assert_eq!(Precision::parse("d"), None);
    }

    #[test]
    fn big_writes_split_into_blocks_numbered_from_zero() {
        let body: String =
            (0..MAX_BLOCK_READINGS + 10).map(|i| format!("m v={i} {}\n", 1_764_000_000 + i as i64)).collect();
        let parsed = parse_write(body.as_bytes(), Precision::Seconds, 0);
        assert_eq!(
            (parsed.lines, parsed.rejected, parsed.readings),
            (MAX_BLOCK_READINGS as u64 + 10, 0, MAX_BLOCK_READINGS as u64 + 10)
        );
        let shape: Vec<(u64, u32)> = parsed.blocks.iter().map(|b| (b.first_seq, b.count)).collect();
        assert_eq!(shape, [(0, MAX_BLOCK_READINGS as u32), (MAX_BLOCK_READINGS as u64, 10)]);
        let last = tributary_shared::Block::decode(&parsed.blocks[1].data).unwrap();
        assert_eq!(
            last.readings().last(),
            Some(("m/v", (1_764_000_000 + MAX_BLOCK_READINGS as i64 + 9) * 1000, (MAX_BLOCK_READINGS + 9) as f64))
        );
    }

    #[test]
    fn every_auth_form_names_its_agent() {
        let agents = vec![
            AgentConfig { id: "a".into(), token: "ta".into() },
            AgentConfig { id: "b".into(), token: "tb".into() },
        ];
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            authenticate(&agents, &headers, None).map(|a| a.id.clone())
        };
        assert_eq!(with("Bearer tb").as_deref(), Some("b"));
        assert_eq!(with("Token ta").as_deref(), Some("a"));
        assert_eq!(with("Token telegraf:tb").as_deref(), Some("b"));
        let basic = base64::engine::general_purpose::STANDARD.encode("telegraf:ta");
        assert_eq!(with(&format!("Basic {basic}")).as_deref(), Some("a"));
        assert_eq!(with("Bearer tc"), None);
        assert_eq!(with("Basic !!!"), None);
        assert_eq!(with("Digest tb"), None);
        let none = HeaderMap::new();
        assert_eq!(authenticate(&agents, &none, Some("tb")).map(|a| a.id.as_str()), Some("b"));
        assert!(authenticate(&agents, &none, Some("nope")).is_none());
        assert!(authenticate(&agents, &none, None).is_none());
    }

    #[test]
    fn a_gzip_bomb_is_refused_without_inflating_it_all() {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b'\n'; 1 << 20];
        for _ in 0..(BODY_LIMIT >> 20) + 1 {
            encoder.write_all(&zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        assert!(matches!(gunzip(&bomb), Err(WriteError::TooLarge)));
        assert!(matches!(gunzip(b"not gzip"), Err(WriteError::BadRequest(_))));
    }

    /// Escapes a name for line protocol as Telegraf does (comma, space and, except in a
    /// measurement, equals sign).
    fn escape(name: &str, equals: bool) -> String {
        let mut out = String::new();
        for c in name.chars() {
            if c == ',' || c == ' ' || (equals && c == '=') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    fn name() -> impl Strategy<Value = String> {
        // No backslash: a name ending in one before an escaped separator is ambiguous in line
        // protocol itself. No leading '#' or whitespace-only names (comments, blank lines).
        "[a-zA-Zµ0-9_,= .-]{1,12}".prop_filter("a name", |s| !s.starts_with('#') && !s.starts_with(' '))
    }

    fn value() -> impl Strategy<Value = FieldValue<'static>> {
        prop_oneof![
            any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(FieldValue::Float),
            any::<i64>().prop_map(FieldValue::Integer),
            any::<u64>().prop_map(FieldValue::Unsigned),
            any::<bool>().prop_map(FieldValue::Boolean),
            "[a-z\"\\\\ ,=\n]{0,10}".prop_map(|s| FieldValue::String(s.into())),
        ]
    }

    fn write_value(v: &FieldValue<'_>) -> String {
        match v {
            FieldValue::Float(f) => format!("{f:?}"),
            FieldValue::Integer(i) => format!("{i}i"),
            FieldValue::Unsigned(u) => format!("{u}u"),
            FieldValue::Boolean(b) => b.to_string(),
            FieldValue::String(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        }
    }

    proptest! {
        #[test]
        fn escaped_lines_round_trip(
            measurement in name(),
            tags in proptest::collection::btree_map(name(), name(), 0..4),
            fields in proptest::collection::vec((name(), value()), 1..5),
            timestamp in proptest::option::of(any::<i64>()),
        ) {
            let mut text = escape(&measurement, false);
            for (k, v) in &tags {
                text.push_str(&format!(",{}={}", escape(k, true), escape(v, true)));
            }
            let fields_text: Vec<String> =
                fields.iter().map(|(k, v)| format!("{}={}", escape(k, true), write_value(v))).collect();
            text.push(' ');
            text.push_str(&fields_text.join(","));
            if let Some(ts) = timestamp {
                text.push_str(&format!(" {ts}"));
            }
            let body = format!("{text}\n{text}\n");
            let parsed: Vec<_> = parse_body(body.as_bytes()).collect();
            prop_assert_eq!(parsed.len(), 2, "{}", body);
            for (_, line) in parsed {
                let line = line.map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
                prop_assert_eq!(&line.measurement, &measurement);
                let tags_back: Vec<(String, String)> =
                    line.tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                prop_assert_eq!(tags_back, tags.clone().into_iter().collect::<Vec<_>>());
                prop_assert_eq!(line.fields.len(), fields.len());
                for ((k, v), (k2, v2)) in line.fields.iter().zip(&fields) {
                    prop_assert_eq!(k.as_ref(), k2.as_str());
                    prop_assert_eq!(v, v2);
                }
                prop_assert_eq!(line.timestamp, timestamp);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let parsed = parse_write(&body, Precision::Nanoseconds, 1_764_000_000_000);
            prop_assert!(parsed.rejected <= parsed.lines);
        }

        #[test]
        fn line_like_noise_never_panics(body in "[a-z0-9,= \\\\\"\n.tfiu#-]{0,200}") {
            let parsed = parse_write(body.as_bytes(), Precision::Seconds, 1_764_000_000_000);
            prop_assert!(parsed.rejected <= parsed.lines);
            let readings: u64 = parsed.blocks.iter().map(|b| u64::from(b.count)).sum();
            prop_assert_eq!(readings, parsed.readings);
        }
    }
}
