//! The aggregator's request decoders, postcard and JSON, on any body: a batch or a 400's reason.
//! An accepted batch holds only blocks that decode, hold `count` valid readings, and whose
//! sequence ranges fit the log's integers.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tributary_aggregator::ingest::{ValidBatch, decode_json, decode_postcard};
use tributary_shared::Block;

fn check(batch: &ValidBatch) {
    assert!(batch.epoch >= 0);
    for block in &batch.blocks {
        let decoded = Block::decode(&block.data).expect("an accepted block decodes");
        assert_eq!(decoded.len() as u64, u64::from(block.count));
        decoded.validate().expect("an accepted block holds only valid readings");
        assert!(block.first_seq.checked_add(u64::from(block.count)).is_some_and(|end| end <= i64::MAX as u64));
    }
}

fuzz_target!(|data: &[u8]| {
    match decode_postcard(&Bytes::copy_from_slice(data)) {
        Ok(batch) => check(&batch),
        Err(reason) => assert!(!reason.is_empty()),
    }
    match decode_json(data) {
        Ok(batch) => check(&batch),
        Err(reason) => assert!(!reason.is_empty()),
    }
});
