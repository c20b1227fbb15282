//! `Block::decode` on any bytes: a block or an error. Whatever decodes is internally consistent
//! and survives its own re-encoding (both forms).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_shared::Block;

fn same(a: &Block, b: &Block) -> bool {
    a.sensors == b.sensors
        && a.entries.len() == b.entries.len()
        && a.entries
            .iter()
            .zip(&b.entries)
            .all(|(x, y)| x.sensor == y.sensor && x.ts == y.ts && x.value.to_bits() == y.value.to_bits())
}

fuzz_target!(|data: &[u8]| {
    let Ok(block) = Block::decode(data) else { return };
    assert!(block.entries.iter().all(|e| (e.sensor as usize) < block.sensors.len()));
    let _ = block.validate();
    for blob in [block.encode(), block.encode_postcard()] {
        let again = Block::decode(&blob).expect("a re-encoded block decodes");
        assert!(same(&again, &block), "re-encoding changed the block");
    }
    let skip = data.len() % (block.len() + 1);
    assert_eq!(block.tail(skip).len(), block.len() - skip);
});
