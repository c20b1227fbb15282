//! `Batch::from_postcard` on any bytes, then every block of what decodes: values or errors, and a
//! decoded batch re-encodes to one that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_shared::Batch;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = Batch::from_postcard(data) else { return };
    for wire in &batch.blocks {
        if let Ok(block) = wire.decode() {
            assert_eq!(block.len() as u64, u64::from(wire.count));
            let _ = block.validate();
        }
    }
    let again = batch.to_postcard();
    assert_eq!(Batch::from_postcard(&again).expect("a re-encoded batch decodes"), batch);
});
