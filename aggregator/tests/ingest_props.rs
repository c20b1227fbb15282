//! Property tests of ingest decoding: any request body decodes to a batch or to a 400's reason,
//! never a panic; whatever is accepted holds only valid readings in consistent blocks; valid
//! batches are accepted with their readings unchanged, in either format.
//!
//! Long run: `PROPTEST_CASES=100000 cargo test --release -p tributary-aggregator --test ingest_props`.

use bytes::Bytes;
use proptest::prelude::*;
use tributary_aggregator::ingest::{ValidBatch, decode_json, decode_postcard};
use tributary_shared::batch::JsonBlock;
use tributary_shared::{Batch, Block, BlockBuilder, JsonBatch, MAX_TS_MS, MIN_TS_MS, Reading, WireBlock};

fn sensor_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9/_-]{1,24}",
        1 => proptest::collection::vec(any::<char>(), 1..40).prop_map(|cs| {
            let mut id: String = cs.into_iter().map(|c| if matches!(c, '+' | '#') || c.is_control() { '_' } else { c }).collect();
            while id.len() > 128 {
                id.pop();
            }
            id
        }),
    ]
}

fn finite_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => any::<f64>().prop_filter("finite", |v| v.is_finite()),
        1 => prop_oneof![Just(f64::MAX), Just(f64::MIN), Just(1e308), Just(-1e308), Just(-0.0), Just(f64::from_bits(1))],
        2 => -1e6f64..1e6,
    ]
}

fn valid_ts() -> impl Strategy<Value = i64> {
    prop_oneof![3 => MIN_TS_MS..=MAX_TS_MS, 1 => prop_oneof![Just(MIN_TS_MS), Just(MAX_TS_MS)]]
}

fn readings(max: usize) -> impl Strategy<Value = Vec<Reading>> {
    proptest::collection::vec(
        (sensor_id(), valid_ts(), finite_value()).prop_map(|(sensor, ts, value)| Reading { sensor, ts, value }),
        0..max,
    )
}

/// A reading that breaks one rule.
fn invalid_reading() -> impl Strategy<Value = Reading> {
    let r = |sensor: &str, ts: i64, value: f64| Reading { sensor: sensor.to_string(), ts, value };
    prop_oneof![
        Just(r("a", MIN_TS_MS, f64::NAN)),
        Just(r("a", MIN_TS_MS, f64::INFINITY)),
        Just(r("a", MIN_TS_MS, f64::NEG_INFINITY)),
        (i64::MIN..MIN_TS_MS).prop_map(move |ts| r("a", ts, 1.0)),
        (MAX_TS_MS + 1..=i64::MAX).prop_map(move |ts| r("a", ts, 1.0)),
        Just(r("", MIN_TS_MS, 1.0)),
        Just(r("a/+", MIN_TS_MS, 1.0)),
        Just(r("#", MIN_TS_MS, 1.0)),
        Just(r("a\u{0}b", MIN_TS_MS, 1.0)),
        Just(r(&"x".repeat(129), MIN_TS_MS, 1.0)),
    ]
}

fn block_of(readings: &[Reading]) -> Block {
    let mut b = BlockBuilder::default();
    for r in readings {
        b.push(&r.sensor, r.ts, r.value);
    }
    b.finish()
}

fn bits(block: &Block) -> Vec<(String, i64, u64)> {
    block.readings().map(|(s, t, v)| (s.to_string(), t, v.to_bits())).collect()
}

/// What every accepted batch must satisfy: each block decodes, holds `count` readings, all valid,
/// and its sequence range fits an SQLite integer.
fn check_accepted(batch: &ValidBatch) -> Result<(), TestCaseError> {
    prop_assert!(batch.epoch >= 0);
    for block in &batch.blocks {
        let decoded = Block::decode(&block.data);
        prop_assert!(decoded.is_ok(), "an accepted block does not decode: {decoded:?}");
        let decoded = decoded.unwrap();
        prop_assert_eq!(decoded.len() as u64, u64::from(block.count));
        prop_assert!(decoded.validate().is_ok(), "an accepted block holds an invalid reading");
        for (sensor, ts, value) in decoded.readings() {
            let reading = Reading { sensor: sensor.to_string(), ts, value };
            prop_assert!(reading.validate().is_ok(), "{reading:?}");
        }
        prop_assert!(block.first_seq.checked_add(u64::from(block.count)).is_some_and(|end| end <= i64::MAX as u64));
    }
    Ok(())
}

/// Postcard batch bodies assembled from parts, some of them hostile: a valid block, a block with
/// an invalid reading, a block whose count lies, noise.
fn postcard_body() -> impl Strategy<Value = Vec<u8>> {
    let part = prop_oneof![
        3 => readings(20).prop_map(|rs| { let b = block_of(&rs); (b.len() as u32, b.encode()) }),
        1 => (readings(5), invalid_reading()).prop_map(|(mut rs, bad)| { rs.push(bad); let b = block_of(&rs); (b.len() as u32, b.encode()) }),
        1 => (readings(5), any::<u32>()).prop_map(|(rs, count)| (count, block_of(&rs).encode())),
        1 => (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(c, d)| (c, d)),
    ];
    (
        "[a-z-]{1,8}",
        prop_oneof![3 => 0u64..1000, 1 => any::<u64>()],
        proptest::collection::vec((prop_oneof![3 => 0u64..10_000, 1 => any::<u64>()], part), 0..5),
    )
        .prop_map(|(agent, epoch, parts)| {
            Batch {
                agent_id: &agent,
                epoch,
                blocks: parts
                    .iter()
                    .map(|(seq, (count, data))| WireBlock { first_seq: *seq, count: *count, data })
                    .collect(),
            }
            .to_postcard()
        })
}

proptest! {
    #[test]
    fn any_body_is_a_batch_or_a_reason(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        match decode_postcard(&Bytes::from(bytes.clone())) {
            Ok(batch) => check_accepted(&batch)?,
            Err(reason) => prop_assert!(!reason.to_string().is_empty()),
        }
        match decode_json(&bytes) {
            Ok(batch) => check_accepted(&batch)?,
            Err(reason) => prop_assert!(!reason.to_string().is_empty()),
        }
    }

    #[test]
    fn assembled_postcard_bodies_are_accepted_only_when_valid(
        body in postcard_body(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let mut body = body;
        let len = body.len();
        for (at, byte) in flips {
            body[at.index(len)] ^= byte;
        }
        if let Ok(batch) = decode_postcard(&Bytes::from(body)) {
            check_accepted(&batch)?;
        }
    }

    #[test]
    fn json_bodies_with_an_invalid_reading_are_refused(
        agent in "[a-z]{1,8}",
        before in readings(10),
        bad in invalid_reading(),
        after in readings(10),
    ) {
        let mut rs = before;
        rs.push(bad);
        rs.extend(after);
        let batch = JsonBatch { agent_id: agent, epoch: 1, blocks: vec![JsonBlock { first_seq: 0, readings: rs }] };
        let body = serde_json::to_vec(&batch).unwrap();
        prop_assert!(decode_json(&body).is_err());
    }

    #[test]
    fn valid_postcard_batches_are_accepted_unchanged(
        agent in "[a-z0-9-]{1,16}",
        epoch in 0u64..=i64::MAX as u64,
        blocks in proptest::collection::vec((0u64..1 << 40, readings(200)), 0..5),
    ) {
        let encoded: Vec<(u64, Block, Vec<u8>)> = blocks.iter().map(|(seq, rs)| { let b = block_of(rs); let e = b.encode(); (*seq, b, e) }).collect();
        let batch = Batch {
            agent_id: &agent,
            epoch,
            blocks: encoded.iter().map(|(seq, b, data)| WireBlock { first_seq: *seq, count: b.len() as u32, data }).collect(),
        };
        let accepted = decode_postcard(&Bytes::from(batch.to_postcard()));
        prop_assert!(accepted.is_ok(), "{:?}", accepted.err());
        let accepted = accepted.unwrap();
        check_accepted(&accepted)?;
        prop_assert_eq!(&accepted.agent_id, &agent);
        prop_assert_eq!(accepted.epoch as u64, epoch);
        prop_assert_eq!(accepted.blocks.len(), encoded.len());
        for (got, (seq, block, data)) in accepted.blocks.iter().zip(&encoded) {
            prop_assert_eq!(got.first_seq, *seq);
            prop_assert_eq!(&got.data[..], &data[..], "the log stores the agent's bytes as sent");
            prop_assert_eq!(bits(&Block::decode(&got.data).unwrap()), bits(block));
        }
    }

    #[test]
    fn valid_json_batches_are_accepted_unchanged(
        agent in "[a-z0-9-]{1,16}",
        epoch in 0u64..=i64::MAX as u64,
        blocks in proptest::collection::vec((0u64..1 << 40, readings(100)), 0..5),
    ) {
        let batch = JsonBatch {
            agent_id: agent.clone(),
            epoch,
            blocks: blocks.iter().map(|(seq, rs)| JsonBlock { first_seq: *seq, readings: rs.clone() }).collect(),
        };
        let body = serde_json::to_vec(&batch).unwrap();
        let accepted = decode_json(&body);
        prop_assert!(accepted.is_ok(), "{:?}", accepted.err());
        let accepted = accepted.unwrap();
        check_accepted(&accepted)?;
        prop_assert_eq!(accepted.epoch as u64, epoch);
        prop_assert_eq!(accepted.blocks.len(), blocks.len());
        for (got, (seq, rs)) in accepted.blocks.iter().zip(&blocks) {
            prop_assert_eq!(got.first_seq, *seq);
            prop_assert_eq!(bits(&Block::decode(&got.data).unwrap()), bits(&block_of(rs)), "values change in JSON");
        }
    }
}
