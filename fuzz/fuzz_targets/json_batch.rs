//! `JsonBatch` from any bytes: a batch or an error; what parses becomes blocks that round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_shared::{Block, JsonBatch};

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = serde_json::from_slice::<JsonBatch>(data) else { return };
    for json in &batch.blocks {
        let block = json.to_block();
        assert_eq!(block.len(), json.readings.len());
        if block.validate().is_ok() {
            let again = Block::decode(&block.encode()).expect("an encoded block decodes");
            assert_eq!(again.len(), block.len());
        }
    }
});
