//! `POST /api/v1/ingest`: authenticate, decode and validate a batch, hand it to the log writer,
//! and answer only once the log has committed it.
//!
//! Checks run in a fixed order (401, 415, 413, 400, 403) and all of them before anything is
//! queued, so a rejected request writes nothing.
//!
//! Every error is JSON `{"error": "<code>", "detail": "<text>"}`, so that an agent can tell what
//! the aggregator itself refuses for good (`invalid_block`, the only code it may dead-letter) from
//! a proxy's 400, a version mismatch or a transient failure:
//!
//! | status | code | meaning |
//! |---|---|---|
//! | 401 | `unauthorized` | missing or unknown token |
//! | 415 | `unsupported_media_type` | not postcard or JSON |
//! | 413 | `payload_too_large` | body over [`BODY_LIMIT`] |
//! | 400 | `malformed_batch` | the body is not a batch (shape, epoch); not the data's fault |
//! | 400 | `unsupported_format` | a block's format byte is unknown here: upgrade the aggregator, retry |
//! | 400 | `invalid_block` | a block that is permanently invalid; adds `block`, `first_seq`, `permanent: true` |
//! | 400 | `too_many_holes` | the batch would leave more than [`MAX_HOLES`](crate::log::MAX_HOLES) holes for its (agent, epoch) |
//! | 403 | `forbidden` | the token's agent is not the batch's |
//! | 503 | `unavailable` | the log cannot commit now; retry |

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use subtle::ConstantTimeEq;
use tributary_shared::batch::{JSON_CONTENT_TYPE, POSTCARD_CONTENT_TYPE};
use tributary_shared::gap::{MAX_GAP_REPORTS, MAX_REPORTED_SENSORS};
use tributary_shared::{Batch, BlockError, GapReport, GapReports, JsonBatch};

use crate::api::AppState;
use crate::config::AgentConfig;
use crate::log::{AppendError, LogBlock};

/// Largest accepted body. axum's 2 MB default is too small for an agent's backlog batches.
pub const BODY_LIMIT: usize = 32 << 20;

/// Why an ingest request was refused; nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("missing or unknown bearer token")]
    Unauthorized,
    #[error("unsupported content type {0:?}: send {POSTCARD_CONTENT_TYPE} or {JSON_CONTENT_TYPE}")]
    UnsupportedMediaType(String),
    #[error("body is larger than {BODY_LIMIT} bytes; send smaller batches")]
    TooLarge,
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("{0}")]
    TooManyHoles(AppendError),
    #[error("this token belongs to agent `{token_agent}`, the batch is for agent `{batch_agent}`")]
    Forbidden { token_agent: String, batch_agent: String },
    #[error("{0}")]
    Unavailable(AppendError),
}

impl From<AppendError> for IngestError {
    fn from(error: AppendError) -> Self {
        match error {
            AppendError::TooManyHoles { .. } => IngestError::TooManyHoles(error),
            AppendError::Unavailable | AppendError::Storage(_) => IngestError::Unavailable(error),
        }
    }
}

/// Why a body is not an acceptable batch (all 400s).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// Not a batch at all: the body's fault (or a proxy's), never the data's.
    #[error("{0}")]
    Malformed(String),
    /// A block in a format this aggregator does not know (a newer agent).
    #[error(
        "block #{block} (first_seq {first_seq}): {error}; upgrade the aggregator to the agent's version, then retry"
    )]
    UnsupportedFormat { block: usize, first_seq: u64, error: BlockError },
    /// A block whose content can never be accepted.
    #[error("block #{block} (first_seq {first_seq}): {reason}")]
    InvalidBlock { block: usize, first_seq: u64, reason: String },
}

impl BatchError {
    fn block(block: usize, first_seq: u64, error: BlockError) -> BatchError {
        match error {
            BlockError::UnknownFormat(_) => BatchError::UnsupportedFormat { block, first_seq, error },
            // Everything else about a block's bytes is permanent: resending them cannot help.
            error => BatchError::InvalidBlock { block, first_seq, reason: error.to_string() },
        }
    }
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Batch(_) | IngestError::TooManyHoles(_) => StatusCode::BAD_REQUEST,
            IngestError::Forbidden { .. } => StatusCode::FORBIDDEN,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine-readable `error` code of the response body.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Unauthorized => "unauthorized",
            IngestError::UnsupportedMediaType(_) => "unsupported_media_type",
            IngestError::TooLarge => "payload_too_large",
            IngestError::Batch(BatchError::Malformed(_)) => "malformed_batch",
            IngestError::Batch(BatchError::UnsupportedFormat { .. }) => "unsupported_format",
            IngestError::Batch(BatchError::InvalidBlock { .. }) => "invalid_block",
            IngestError::TooManyHoles(_) => "too_many_holes",
            IngestError::Forbidden { .. } => "forbidden",
            IngestError::Unavailable(_) => "unavailable",
        }
    }

    /// The response body: `{"error": code, "detail": text}`, plus where the bad block is.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({ "error": self.code(), "detail": self.to_string() });
        if let IngestError::Batch(BatchError::InvalidBlock { block, first_seq, .. }) = self {
            body["block"] = (*block).into();
            body["first_seq"] = (*first_seq).into();
            body["permanent"] = true.into();
        }
        body
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, IngestError::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A decoded, validated batch, ready for the log.
#[derive(Debug)]
pub struct ValidBatch {
    pub agent_id: String,
    pub epoch: i64,
    pub blocks: Vec<LogBlock>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Postcard,
    Json,
}

pub async fn ingest(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let result = handle(&app, &headers, body).await;
    let response = match result {
        Ok(ack) => (StatusCode::OK, Json(ack)).into_response(),
        Err(error) => {
            if error.status().is_server_error() {
                tracing::warn!(%error, "ingest failed");
            } else {
                tracing::debug!(%error, status = error.status().as_u16(), "ingest rejected");
            }
            error.into_response()
        }
    };
    app.metrics.ingest_request(response.status().as_u16());
    response
}

async fn handle(app: &AppState, headers: &HeaderMap, body: Body) -> Result<tributary_shared::IngestAck, IngestError> {
    let agent = authenticate(&app.agents, headers).ok_or(IngestError::Unauthorized)?;
    let contact = app.fleet.contact(&agent.id, headers, crate::unix_ms());
    if let Some(backlog) = contact.backlog_readings {
        app.metrics.agent_backlog(&agent.id, backlog);
    }
    let format = content_format(headers)?;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > BODY_LIMIT as u64) {
        return Err(IngestError::TooLarge);
    }
    let body = read_body(body).await?;
    // Decoding a large batch takes milliseconds of CPU: keep it off the async workers.
    let batch = tokio::task::spawn_blocking(move || match format {
        Format::Postcard => decode_postcard(&body),
        Format::Json => decode_json(&body),
    })
    .await
    .map_err(|e| IngestError::Unavailable(AppendError::Storage(e.to_string())))??;
    if batch.agent_id != agent.id {
        return Err(IngestError::Forbidden { token_agent: agent.id.clone(), batch_agent: batch.agent_id });
    }
    Ok(app.log.append(&batch.agent_id, batch.epoch, batch.blocks).await?)
}

/// The agent whose token the `Authorization: Bearer` header carries. Every configured token is
/// compared in constant time so the response time does not reveal how much of a guess matched.
fn authenticate<'a>(agents: &'a [AgentConfig], headers: &HeaderMap) -> Option<&'a AgentConfig> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    agent_for_token(agents, token.trim().as_bytes())
}

/// The agent whose token is `token`, compared in constant time against every configured token
/// (also used by `POST /write`, which takes the token in several places).
pub(crate) fn agent_for_token<'a>(agents: &'a [AgentConfig], token: &[u8]) -> Option<&'a AgentConfig> {
    let mut found = None;
    for agent in agents {
        let matches = bool::from(agent.token.as_bytes().ct_eq(token));
        if matches && found.is_none() {
            found = Some(agent);
        }
    }
    found
}

fn content_format(headers: &HeaderMap) -> Result<Format, IngestError> {
    let value = headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let media = value.as_deref().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match media.as_str() {
        POSTCARD_CONTENT_TYPE => Ok(Format::Postcard),
        JSON_CONTENT_TYPE => Ok(Format::Json),
        _ => Err(IngestError::UnsupportedMediaType(value.unwrap_or_default())),
    }
}

pub(crate) async fn read_body(body: Body) -> Result<Bytes, IngestError> {
    match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(IngestError::TooLarge),
        Err(error) => Err(BatchError::Malformed(format!("cannot read the body: {error}")).into()),
    }
}

/// `POST /api/v1/gaps`: an agent's reports of readings it dropped ([`GapReports`] as JSON), stored
/// beside the holes they explain (`GET /api/v1/gaps`). The same token as for ingest; answers 204.
pub async fn report_gaps(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let agent = authenticate(&app.agents, &headers).ok_or(IngestError::Unauthorized)?;
        let body = read_body(body).await?;
        let reports: GapReports = serde_json::from_slice(&body)
            .map_err(|e| BatchError::Malformed(format!("body is not a JSON gap report: {e}")))?;
        if reports.agent_id != agent.id {
            return Err(IngestError::Forbidden { token_agent: agent.id.clone(), batch_agent: reports.agent_id });
        }
        let epoch = check_epoch(reports.epoch)?;
        check_reports(&reports.gaps)?;
        app.log.report_gaps(&agent.id, epoch, reports.gaps).await?;
        Ok::<_, IngestError>(())
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => {
            tracing::debug!(%error, status = error.status().as_u16(), "gap report rejected");
            error.into_response()
        }
    }
}

/// What a stored report may hold: ranges within the stored integers, a reason and sensor ids of
/// bounded length, a bounded number of each.
fn check_reports(gaps: &[GapReport]) -> Result<(), BatchError> {
    let bad = |i: usize, what: String| BatchError::Malformed(format!("gap report #{i}: {what}"));
    if gaps.len() > MAX_GAP_REPORTS {
        return Err(BatchError::Malformed(format!("{} gap reports, at most {MAX_GAP_REPORTS}", gaps.len())));
    }
    for (i, g) in gaps.iter().enumerate() {
        if g.from_seq >= g.to_seq || g.to_seq > MAX_STORED {
            return Err(bad(i, format!("the range {}..{} is empty or too large", g.from_seq, g.to_seq)));
        }
        if g.reason.is_empty() || g.reason.len() > 64 {
            return Err(bad(i, "the reason must be 1 to 64 bytes".into()));
        }
        if g.sensors.len() > MAX_REPORTED_SENSORS
            || g.sensors.iter().any(|s| s.len() > tributary_shared::MAX_SENSOR_ID_LEN)
        {
            return Err(bad(i, format!("at most {MAX_REPORTED_SENSORS} sensor ids, each a valid id's length")));
        }
        if g.readings > MAX_STORED || g.sensor_count > MAX_STORED {
            return Err(bad(i, "counts out of range".into()));
        }
    }
    Ok(())
}

/// Sequence numbers and epochs are stored as SQLite integers (i64).
const MAX_STORED: u64 = i64::MAX as u64;

/// Decodes a postcard [`Batch`]; the blocks keep pointing into `body` (no copy).
pub fn decode_postcard(body: &Bytes) -> Result<ValidBatch, BatchError> {
    let batch =
        Batch::from_postcard(body).map_err(|e| BatchError::Malformed(format!("body is not a postcard batch: {e}")))?;
    let epoch = check_epoch(batch.epoch)?;
    let mut blocks = Vec::with_capacity(batch.blocks.len());
    for (i, wire) in batch.blocks.iter().enumerate() {
        let block = wire.decode().map_err(|e| BatchError::block(i, wire.first_seq, e))?;
        block.validate().map_err(|e| BatchError::block(i, wire.first_seq, e))?;
        check_seq(i, wire.first_seq, wire.count)?;
        blocks.push(LogBlock { first_seq: wire.first_seq, count: wire.count, data: body.slice_ref(wire.data) });
    }
    Ok(ValidBatch { agent_id: batch.agent_id.to_string(), epoch, blocks })
}

/// Decodes a [`JsonBatch`] and encodes each block the way agents do, so the log holds one format.
pub fn decode_json(body: &[u8]) -> Result<ValidBatch, BatchError> {
    let batch: JsonBatch =
        serde_json::from_slice(body).map_err(|e| BatchError::Malformed(format!("body is not a JSON batch: {e}")))?;
    let epoch = check_epoch(batch.epoch)?;
    let mut blocks = Vec::with_capacity(batch.blocks.len());
    for (i, json) in batch.blocks.iter().enumerate() {
        let block = json.to_block();
        block.validate().map_err(|e| BatchError::block(i, json.first_seq, e))?;
        let count = u32::try_from(block.len()).map_err(|_| BatchError::InvalidBlock {
            block: i,
            first_seq: json.first_seq,
            reason: format!("holds more than {} readings", u32::MAX),
        })?;
        check_seq(i, json.first_seq, count)?;
        blocks.push(LogBlock { first_seq: json.first_seq, count, data: Bytes::from(block.encode()) });
    }
    Ok(ValidBatch { agent_id: batch.agent_id, epoch, blocks })
}

fn check_epoch(epoch: u64) -> Result<i64, BatchError> {
    i64::try_from(epoch).map_err(|_| BatchError::Malformed(format!("epoch {epoch} is larger than {MAX_STORED}")))
}

fn check_seq(block: usize, first_seq: u64, count: u32) -> Result<(), BatchError> {
    match first_seq.checked_add(u64::from(count)) {
        Some(end) if end <= MAX_STORED => Ok(()),
        _ => Err(BatchError::InvalidBlock {
            block,
            first_seq,
            reason: format!("sequence numbers {first_seq} + {count} go beyond {MAX_STORED}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::{BlockBuilder, WireBlock};

    fn encoded(values: &[f64]) -> Vec<u8> {
        let mut b = BlockBuilder::default();
        for v in values {
            b.push("room1/temp", 1_764_000_000_000, *v);
        }
        b.finish().encode()
    }

    #[test]
    fn postcard_blocks_point_into_the_body() {
        let data = encoded(&[1.0, 2.0]);
        let body = Bytes::from(
            Batch { agent_id: "gw", epoch: 1, blocks: vec![WireBlock { first_seq: 4, count: 2, data: &data }] }
                .to_postcard(),
        );
        let batch = decode_postcard(&body).unwrap();
        assert_eq!((batch.agent_id.as_str(), batch.epoch), ("gw", 1));
        assert_eq!(&batch.blocks[0].data[..], &data[..]);
    }

    fn code(error: BatchError) -> (&'static str, String) {
        let error = IngestError::from(error);
        (error.code(), error.to_string())
    }

    fn postcard_error(blocks: &[(u64, u32, &[u8])]) -> (&'static str, String) {
        let wire = blocks.iter().map(|&(first_seq, count, data)| WireBlock { first_seq, count, data }).collect();
        code(decode_postcard(&Bytes::from(Batch { agent_id: "gw", epoch: 1, blocks: wire }.to_postcard())).unwrap_err())
    }

    #[test]
    fn bad_batches_are_refused_with_a_code_and_a_reason() {
        let data = encoded(&[1.0]);
        let (c, err) = postcard_error(&[(0, 3, &data)]);
        assert!(c == "invalid_block" && err.contains("block #0") && err.contains("says 3"), "{c}: {err}");
        let nan = encoded(&[f64::NAN]);
        let (c, err) = postcard_error(&[(0, 1, &data), (1, 1, &nan)]);
        assert!(c == "invalid_block" && err.contains("block #1") && err.contains("not a finite number"), "{err}");
        let (c, err) = postcard_error(&[(u64::MAX - 1, 1, &data)]);
        assert!(c == "invalid_block" && err.contains("go beyond"), "{err}");
        let (c, err) = postcard_error(&[(0, 1, &[1, 0xff, 0xff])]);
        assert!(c == "invalid_block" && err.contains("does not decode"), "{err}");
        let (c, err) = postcard_error(&[(0, 1, &[9, 1, 2, 3])]);
        assert!(c == "unsupported_format" && err.contains("format byte 9") && err.contains("upgrade"), "{err}");
        let huge = Batch { agent_id: "gw", epoch: u64::MAX, blocks: vec![] };
        let (c, err) = code(decode_postcard(&Bytes::from(huge.to_postcard())).unwrap_err());
        assert!(c == "malformed_batch" && err.contains("epoch"), "{err}");
        let (c, err) = code(decode_postcard(&Bytes::from_static(b"\xff\xff")).unwrap_err());
        assert!(c == "malformed_batch" && err.contains("not a postcard batch"), "{err}");
        let (c, err) = code(decode_json(b"{\"agent_id\":1}").unwrap_err());
        assert!(c == "malformed_batch" && err.contains("not a JSON batch"), "{err}");
    }

    #[test]
    fn both_paths_bound_event_time_on_both_ends() {
        use tributary_shared::MAX_TS_MS;
        for ts in [i64::MAX, i64::MIN, MAX_TS_MS + 1, tributary_shared::MIN_TS_MS - 1] {
            let mut b = BlockBuilder::default();
            b.push("room1/temp", ts, 1.0);
            let data = b.finish().encode();
            let (c, err) = postcard_error(&[(0, 1, &data)]);
            assert!(c == "invalid_block" && err.contains("timestamp"), "{ts}: {c}: {err}");
            let json = format!(
                r#"{{"agent_id":"gw","epoch":1,"blocks":[{{"first_seq":0,"readings":[{{"sensor":"s","ts":{ts},"value":1}}]}}]}}"#
            );
            let (c, err) = code(decode_json(json.as_bytes()).unwrap_err());
            assert!(c == "invalid_block" && err.contains("timestamp"), "{ts}: {c}: {err}");
        }
        let mut b = BlockBuilder::default();
        b.push("room1/temp", MAX_TS_MS, 1.0);
        let data = b.finish().encode();
        let body = Batch { agent_id: "gw", epoch: 1, blocks: vec![WireBlock { first_seq: 0, count: 1, data: &data }] };
        assert!(decode_postcard(&Bytes::from(body.to_postcard())).is_ok());
        let json = format!(
            r#"{{"agent_id":"gw","epoch":1,"blocks":[{{"first_seq":0,"readings":[{{"sensor":"s","ts":{MAX_TS_MS},"value":1}}]}}]}}"#
        );
        assert!(decode_json(json.as_bytes()).is_ok());
    }

    #[test]
    fn only_invalid_blocks_are_marked_permanent() {
        let invalid = IngestError::from(BatchError::InvalidBlock { block: 2, first_seq: 40, reason: "x".into() });
        assert_eq!(
            invalid.body(),
            serde_json::json!({"error": "invalid_block", "detail": "block #2 (first_seq 40): x", "block": 2, "first_seq": 40, "permanent": true})
        );
        for other in [
            IngestError::Unauthorized,
            IngestError::TooLarge,
            IngestError::from(BatchError::Malformed("m".into())),
            IngestError::from(AppendError::TooManyHoles { agent: "gw".into(), epoch: 1, holes: 10_001 }),
            IngestError::from(AppendError::Unavailable),
        ] {
            let body = other.body();
            assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
            assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
        }
    }

    #[test]
    fn tokens_identify_their_agent() {
        let agents = vec![
            AgentConfig { id: "a".into(), token: "ta".into() },
            AgentConfig { id: "b".into(), token: "tb".into() },
        ];
        let mut headers = HeaderMap::new();
        assert!(authenticate(&agents, &headers).is_none());
        headers.insert(header::AUTHORIZATION, "Bearer tb".parse().unwrap());
        assert_eq!(authenticate(&agents, &headers).map(|a| a.id.as_str()), Some("b"));
        headers.insert(header::AUTHORIZATION, "Bearer t".parse().unwrap());
        assert!(authenticate(&agents, &headers).is_none());
        headers.insert(header::AUTHORIZATION, "Basic tb".parse().unwrap());
        assert!(authenticate(&agents, &headers).is_none());
    }
}
