//! `POST /api/v1/ingest`: authenticate, decode and validate a batch, hand it to the log writer,
//! and answer only once the log has committed it.
//!
//! Checks run in a fixed order (401, 415, 413, 400, 403) and all of them before anything is
//! queued, so a rejected request writes nothing.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use subtle::ConstantTimeEq;
use tributary_shared::batch::{JSON_CONTENT_TYPE, POSTCARD_CONTENT_TYPE};
use tributary_shared::{Batch, JsonBatch};

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
    #[error("{0}")]
    BadRequest(String),
    #[error("this token belongs to agent `{token_agent}`, the batch is for agent `{batch_agent}`")]
    Forbidden { token_agent: String, batch_agent: String },
    #[error("{0}")]
    Unavailable(#[from] AppendError),
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::Forbidden { .. } => StatusCode::FORBIDDEN,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(serde_json::json!({ "error": self.to_string() }))).into_response();
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
    .map_err(|e| IngestError::Unavailable(AppendError::Storage(e.to_string())))?
    .map_err(IngestError::BadRequest)?;
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
    let token = token.trim().as_bytes();
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

async fn read_body(body: Body) -> Result<Bytes, IngestError> {
    match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(IngestError::TooLarge),
        Err(error) => Err(IngestError::BadRequest(format!("cannot read the body: {error}"))),
    }
}

/// Sequence numbers and epochs are stored as SQLite integers (i64).
const MAX_STORED: u64 = i64::MAX as u64;

/// Decodes a postcard [`Batch`]; the blocks keep pointing into `body` (no copy).
pub fn decode_postcard(body: &Bytes) -> Result<ValidBatch, String> {
    let batch = Batch::from_postcard(body).map_err(|e| format!("body is not a postcard batch: {e}"))?;
    let epoch = check_epoch(batch.epoch)?;
    let mut blocks = Vec::with_capacity(batch.blocks.len());
    for (i, wire) in batch.blocks.iter().enumerate() {
        let block = wire.decode().map_err(|e| format!("block #{i} (first_seq {}): {e}", wire.first_seq))?;
        block.validate().map_err(|e| format!("block #{i} (first_seq {}): {e}", wire.first_seq))?;
        check_seq(i, wire.first_seq, wire.count)?;
        blocks.push(LogBlock { first_seq: wire.first_seq, count: wire.count, data: body.slice_ref(wire.data) });
    }
    Ok(ValidBatch { agent_id: batch.agent_id.to_string(), epoch, blocks })
}

/// Decodes a [`JsonBatch`] and encodes each block the way agents do, so the log holds one format.
pub fn decode_json(body: &[u8]) -> Result<ValidBatch, String> {
    let batch: JsonBatch = serde_json::from_slice(body).map_err(|e| format!("body is not a JSON batch: {e}"))?;
    let epoch = check_epoch(batch.epoch)?;
    let mut blocks = Vec::with_capacity(batch.blocks.len());
    for (i, json) in batch.blocks.iter().enumerate() {
        let block = json.to_block();
        block.validate().map_err(|e| format!("block #{i} (first_seq {}): {e}", json.first_seq))?;
        let count =
            u32::try_from(block.len()).map_err(|_| format!("block #{i} holds more than {} readings", u32::MAX))?;
        check_seq(i, json.first_seq, count)?;
        blocks.push(LogBlock { first_seq: json.first_seq, count, data: Bytes::from(block.encode()) });
    }
    Ok(ValidBatch { agent_id: batch.agent_id, epoch, blocks })
}

fn check_epoch(epoch: u64) -> Result<i64, String> {
    i64::try_from(epoch).map_err(|_| format!("epoch {epoch} is larger than {MAX_STORED}"))
}

fn check_seq(i: usize, first_seq: u64, count: u32) -> Result<(), String> {
    match first_seq.checked_add(u64::from(count)) {
        Some(end) if end <= MAX_STORED => Ok(()),
        _ => Err(format!("block #{i}: sequence numbers {first_seq} + {count} go beyond {MAX_STORED}")),
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

    #[test]
    fn bad_batches_are_refused_with_a_reason() {
        let data = encoded(&[1.0]);
        let lying = Batch { agent_id: "gw", epoch: 1, blocks: vec![WireBlock { first_seq: 0, count: 3, data: &data }] };
        let err = decode_postcard(&Bytes::from(lying.to_postcard())).unwrap_err();
        assert!(err.contains("block #0") && err.contains("says 3"), "{err}");
        let nan = encoded(&[f64::NAN]);
        let bad = Batch { agent_id: "gw", epoch: 1, blocks: vec![WireBlock { first_seq: 0, count: 1, data: &nan }] };
        assert!(decode_postcard(&Bytes::from(bad.to_postcard())).unwrap_err().contains("not a finite number"));
        let huge = Batch { agent_id: "gw", epoch: u64::MAX, blocks: vec![] };
        assert!(decode_postcard(&Bytes::from(huge.to_postcard())).unwrap_err().contains("epoch"));
        assert!(decode_postcard(&Bytes::from_static(b"\xff\xff")).unwrap_err().contains("not a postcard batch"));
        assert!(decode_json(b"{\"agent_id\":1}").unwrap_err().contains("not a JSON batch"));
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
