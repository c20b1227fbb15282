//! What an agent POSTs to the aggregator's `/api/v1/ingest`, and what it gets back.
//!
//! A batch carries the agent id, the spool epoch and a run of blocks, each with its first sequence
//! number and reading count, so the aggregator can deduplicate by range without decoding.
//! Postcard ([`POSTCARD_CONTENT_TYPE`]) is the default; JSON ([`JsonBatch`]) is accepted for tools
//! and scripts.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::block::{Block, BlockBuilder, BlockError};
use crate::reading::Reading;

pub const POSTCARD_CONTENT_TYPE: &str = "application/x-postcard";
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// Request header by which an agent tells what its spool still holds beyond the batch:
/// `readings=<n>, bytes=<n>`. Optional; older agents do not send it.
pub const BACKLOG_HEADER: &str = "x-tributary-backlog";

/// A postcard batch. Blocks borrow from the request body, so decoding copies nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch<'a> {
    pub agent_id: &'a str,
    pub epoch: u64,
    #[serde(borrow)]
    pub blocks: Vec<WireBlock<'a>>,
}

/// One stored block on the wire: `count` readings numbered from `first_seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireBlock<'a> {
    pub first_seq: u64,
    pub count: u32,
    #[serde(with = "serde_bytes")]
    pub data: &'a [u8],
}

impl<'a> Batch<'a> {
    pub fn to_postcard(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a postcard body; the whole body must be one batch.
    pub fn from_postcard(body: &'a [u8]) -> Result<Batch<'a>, postcard::Error> {
        let (batch, rest) = postcard::take_from_bytes::<Batch<'a>>(body)?;
        if rest.is_empty() { Ok(batch) } else { Err(postcard::Error::DeserializeUnexpectedEnd) }
    }
}

impl WireBlock<'_> {
    /// Decodes the block and checks it holds exactly `count` readings.
    pub fn decode(&self) -> Result<Block, BlockError> {
        let block = Block::decode(self.data)?;
        if block.len() as u64 != u64::from(self.count) {
            return Err(BlockError::CountMismatch { expected: self.count.into(), actual: block.len() as u64 });
        }
        Ok(block)
    }
}

/// The JSON form of a batch: readings spelled out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonBatch {
    pub agent_id: String,
    pub epoch: u64,
    pub blocks: Vec<JsonBlock>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonBlock {
    pub first_seq: u64,
    pub readings: Vec<Reading>,
}

impl JsonBlock {
    pub fn to_block(&self) -> Block {
        let mut builder = BlockBuilder::default();
        for r in &self.readings {
            builder.push(&r.sensor, r.ts, r.value);
        }
        builder.finish()
    }
}

/// The aggregator's answer to an accepted batch (and to an empty one, the agent's handshake).
/// `next_seq` is the aggregator's high-water mark for this (agent, epoch): the end of the highest
/// range it has durably logged. An agent that sends in order may delete everything below it.
/// `missing` counts the sequence numbers below `next_seq` that are not logged (holes: dropped by a
/// spool, or sent out of order and not arrived yet); a later batch that carries them fills them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestAck {
    pub accepted: u64,
    pub duplicates: u64,
    pub next_seq: u64,
    /// Absent in acks from aggregators that predate it: read as 0.
    #[serde(default)]
    pub missing: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postcard_batches_round_trip_and_reject_trailing_bytes() {
        let mut b = BlockBuilder::default();
        b.push("s", 1_764_000_000_000, 1.5);
        let data = b.finish().encode();
        let batch = Batch {
            agent_id: "gw-1",
            epoch: 7,
            blocks: alloc::vec![WireBlock { first_seq: 10, count: 1, data: &data }],
        };
        let mut body = batch.to_postcard();
        let decoded = Batch::from_postcard(&body).unwrap();
        assert_eq!(decoded, batch);
        assert_eq!(decoded.blocks[0].decode().unwrap().len(), 1);
        body.push(0);
        assert!(Batch::from_postcard(&body).is_err());
    }

    #[test]
    fn a_block_whose_count_lies_is_rejected() {
        let mut b = BlockBuilder::default();
        b.push("s", 1_764_000_000_000, 1.5);
        let data = b.finish().encode();
        let wire = WireBlock { first_seq: 0, count: 2, data: &data };
        assert!(matches!(wire.decode(), Err(BlockError::CountMismatch { expected: 2, actual: 1 })));
    }

    #[test]
    fn an_ack_without_missing_still_parses() {
        let old: IngestAck = serde_json::from_str(r#"{"accepted":1,"duplicates":2,"next_seq":3}"#).unwrap();
        assert_eq!(old, IngestAck { accepted: 1, duplicates: 2, next_seq: 3, missing: 0 });
        let new: IngestAck = serde_json::from_str(r#"{"accepted":0,"duplicates":0,"next_seq":9,"missing":4}"#).unwrap();
        assert_eq!(new.missing, 4);
    }

    #[test]
    fn json_batches_parse_and_reject_unknown_fields() {
        let body = r#"{"agent_id":"gw-1","epoch":3,"blocks":[{"first_seq":0,"readings":[{"sensor":"a","ts":1764000000000,"value":2}]}]}"#;
        let batch: JsonBatch = serde_json::from_str(body).unwrap();
        assert_eq!(batch.blocks[0].to_block().readings().next(), Some(("a", 1_764_000_000_000, 2.0)));
        assert!(serde_json::from_str::<JsonBatch>(&body.replace("\"epoch\"", "\"epoc\"")).is_err());
    }
}
