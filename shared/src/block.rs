//! Blocks: runs of consecutive readings of one agent, the unit the spool, the wire and the log share.
//!
//! A block interns its sensor ids once and stores each reading as (sensor index, timestamp delta
//! from the previous reading, value), in postcard's varint encoding: about 11 bytes a reading before
//! compression. The stored form is one format byte followed by the payload, so the format can change
//! without guessing.
//!
//! A block whose timestamps the agent could not trust carries a [`BlockClock`] flag: format byte 3,
//! the flag (postcard), then the block in format 1 or 2. Blocks of formats 1 and 2 (all blocks
//! written before the flag existed) read as [`BlockClock::Synced`].

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use crate::reading::{MIN_TS_MS, ReadingError, validate_sensor_id, validate_value, validate_value_and_ts};

/// Format byte: postcard, uncompressed.
const FORMAT_POSTCARD: u8 = 1;
/// Format byte: postcard, zstd-compressed.
#[cfg(feature = "std")]
const FORMAT_POSTCARD_ZSTD: u8 = 2;

/// Format byte: a [`BlockClock`] flag (postcard) followed by a block in format 1 or 2.
pub const FORMAT_FLAGGED: u8 = 3;

/// Upper bound on a decoded block, so a corrupt or hostile blob cannot make a decoder allocate
/// without limit (a 65,536-reading block with long ids stays well below it).
pub const MAX_DECODED_BYTES: usize = 16 << 20;

/// Blocks smaller than this are stored uncompressed: zstd's frame overhead would eat the gain.
#[cfg(feature = "std")]
const COMPRESS_MIN_ENTRIES: usize = 16;

/// One reading inside a block; `sensor` indexes [`Block::sensors`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub sensor: u32,
    pub ts: i64,
    pub value: f64,
}

/// A decoded block: its interned sensor ids, its readings in sequence order, and whether their
/// timestamps come from a clock the agent trusted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    pub sensors: Vec<String>,
    pub entries: Vec<Entry>,
    pub clock: BlockClock,
}

/// Whether a block's timestamps can be trusted. The aggregator quarantines the readings of a
/// flagged block instead of folding them into windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockClock {
    /// Stamped by a synchronised clock, or by the device; also every block of formats 1 and 2.
    #[default]
    Synced,
    /// Stamped by the gateway's clock before it was first synchronised in the boot `boot_id`
    /// (`/proc/sys/kernel/random/boot_id`), when its wall clock read `offset_ms` ahead of its
    /// boot-time clock (`CLOCK_BOOTTIME`): each reading was taken `ts - offset_ms` ms after boot,
    /// so the agent re-stamps the block once the clock is synchronised in that boot. Timestamps
    /// may read as early as 1970 (a gateway without a real-time clock).
    Unsynced { boot_id: [u8; 16], offset_ms: i64 },
    /// Device timestamps further from the gateway's synchronised clock than its limits
    /// (`[clock] on_device_skew = "flag"`).
    DeviceSkew,
}

impl BlockClock {
    /// The flag of a stored block, read from its first bytes without decoding the readings.
    pub fn of(blob: &[u8]) -> Result<BlockClock, BlockError> {
        match blob.split_first() {
            None => Err(BlockError::Empty),
            Some((&FORMAT_FLAGGED, payload)) => Ok(split_flag(payload)?.0),
            Some(_) => Ok(BlockClock::Synced),
        }
    }

    /// The reason the aggregator quarantines a flagged block's readings under.
    pub fn quarantine_reason(self) -> Option<&'static str> {
        match self {
            BlockClock::Synced => None,
            BlockClock::Unsynced { .. } => Some("clock_unsynced"),
            BlockClock::DeviceSkew => Some("device_clock_skew"),
        }
    }
}

/// A flagged block's flag and the inner block's bytes (format 1 or 2).
fn split_flag(payload: &[u8]) -> Result<(BlockClock, &[u8]), BlockError> {
    let (clock, inner): (BlockClock, _) =
        postcard::take_from_bytes(payload).map_err(|e| BlockError::Malformed(e.to_string()))?;
    match inner.first() {
        Some(&FORMAT_FLAGGED) => Err(BlockError::Malformed("a flagged block inside a flagged block".to_string())),
        _ => Ok((clock, inner)),
    }
}

/// Prefixes an encoded block with its flag, unless it is [`BlockClock::Synced`].
fn flagged(clock: BlockClock, inner: Vec<u8>) -> Vec<u8> {
    if clock == BlockClock::Synced {
        return inner;
    }
    let mut out = postcard::to_allocvec(&(FORMAT_FLAGGED, clock)).unwrap_or_default();
    if out.is_empty() {
        return inner;
    }
    out.extend_from_slice(&inner);
    out
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BlockError {
    #[error("block is empty (no format byte)")]
    Empty,
    #[error("block has unknown format byte {0}; is this peer older than the one that wrote it?")]
    UnknownFormat(u8),
    #[error("block does not decode: {0}")]
    Malformed(String),
    #[error("block refers to sensor #{index} but interns only {interned}")]
    SensorIndex { index: u32, interned: usize },
    #[error("block holds {actual} readings, its header says {expected}")]
    CountMismatch { expected: u64, actual: u64 },
    #[error("reading #{index} of the block: {error}")]
    Reading { index: usize, error: ReadingError },
}

impl Block {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The sensor id of an entry of this block.
    pub fn sensor_of(&self, entry: &Entry) -> &str {
        &self.sensors[entry.sensor as usize]
    }

    /// (sensor id, ts, value) for each reading, in order.
    pub fn readings(&self) -> impl Iterator<Item = (&str, i64, f64)> + '_ {
        self.entries.iter().map(|e| (self.sensor_of(e), e.ts, e.value))
    }

    /// Encodes the block, compressing it when that makes it smaller.
    pub fn encode(&self) -> Vec<u8> {
        flagged(self.clock, self.encode_unflagged())
    }

    fn encode_unflagged(&self) -> Vec<u8> {
        let raw = self.encode_postcard_unflagged();
        #[cfg(feature = "std")]
        if self.entries.len() >= COMPRESS_MIN_ENTRIES {
            // Level 1: most of the gain (timestamps and repeated values) at the lowest CPU cost,
            // which matters on a gateway.
            if let Ok(packed) = zstd::bulk::compress(&raw[1..], 1) {
                if packed.len() + 1 < raw.len() {
                    let mut out = Vec::with_capacity(packed.len() + 1);
                    out.push(FORMAT_POSTCARD_ZSTD);
                    out.extend_from_slice(&packed);
                    return out;
                }
            }
        }
        raw
    }

    /// Encodes without compression (the format byte followed by the postcard payload, after the
    /// flag if there is one).
    pub fn encode_postcard(&self) -> Vec<u8> {
        flagged(self.clock, self.encode_postcard_unflagged())
    }

    fn encode_postcard_unflagged(&self) -> Vec<u8> {
        let repr = Repr { sensors: &self.sensors, entries: DeltaEntries(&self.entries) };
        let mut out = postcard::to_allocvec(&(FORMAT_POSTCARD, repr)).unwrap_or_default();
        // postcard cannot fail on these types short of allocation failure; keep the format byte anyway.
        if out.is_empty() {
            out.push(FORMAT_POSTCARD);
        }
        out
    }

    /// Decodes a stored block and checks its internal consistency (sensor indices). Does not check
    /// the readings themselves: see [`Block::validate`].
    pub fn decode(blob: &[u8]) -> Result<Block, BlockError> {
        let (&format, payload) = blob.split_first().ok_or(BlockError::Empty)?;
        match format {
            FORMAT_POSTCARD => Self::decode_postcard(payload),
            #[cfg(feature = "std")]
            FORMAT_POSTCARD_ZSTD => {
                let raw = zstd::bulk::decompress(payload, MAX_DECODED_BYTES)
                    .map_err(|e| BlockError::Malformed(e.to_string()))?;
                Self::decode_postcard(&raw)
            }
            FORMAT_FLAGGED => {
                let (clock, inner) = split_flag(payload)?;
                Ok(Block { clock, ..Self::decode(inner)? })
            }
            other => Err(BlockError::UnknownFormat(other)),
        }
    }

    fn decode_postcard(payload: &[u8]) -> Result<Block, BlockError> {
        let (sensors, entries) = decode_parts::<String>(payload)?;
        Ok(Block { sensors, entries, clock: BlockClock::Synced })
    }

    /// Checks every sensor id and every reading against the rules that hold everywhere (for a
    /// [`BlockClock::Unsynced`] block, timestamps from 1970 on).
    pub fn validate(&self) -> Result<(), BlockError> {
        validate_parts(self.sensors.iter().map(String::as_str), &self.entries, self.clock)
    }

    /// The readings from `skip` on, as a new block (used when a peer resends a block that is
    /// partly known already).
    pub fn tail(&self, skip: usize) -> Block {
        self.sub_block(skip..self.entries.len())
    }

    /// The readings at indices `range` (clamped to the block), as a new block that interns only
    /// the sensors they use. The log keeps the unlogged parts of a block this way, each with its
    /// own first sequence number.
    pub fn sub_block(&self, range: core::ops::Range<usize>) -> Block {
        let end = range.end.min(self.entries.len());
        let start = range.start.min(end);
        let mut builder = BlockBuilder::default();
        for e in &self.entries[start..end] {
            builder.push(self.sensor_of(e), e.ts, e.value);
        }
        Block { clock: self.clock, ..builder.finish() }
    }
}

/// Collects readings into a block, interning sensor ids as they come.
#[derive(Debug, Default)]
pub struct BlockBuilder {
    index: BTreeMap<String, u32>,
    block: Block,
}

impl BlockBuilder {
    pub fn push(&mut self, sensor: &str, ts: i64, value: f64) {
        let idx = self.intern(sensor);
        self.push_interned(idx, ts, value);
    }

    /// The index of `sensor` in this block, adding it if new.
    pub fn intern(&mut self, sensor: &str) -> u32 {
        match self.index.get(sensor) {
            Some(&i) => i,
            None => {
                let i = self.block.sensors.len() as u32;
                self.block.sensors.push(sensor.to_string());
                self.index.insert(sensor.to_string(), i);
                i
            }
        }
    }

    /// Pushes a reading of a sensor already interned with [`BlockBuilder::intern`].
    pub fn push_interned(&mut self, sensor: u32, ts: i64, value: f64) {
        debug_assert!((sensor as usize) < self.block.sensors.len());
        self.block.entries.push(Entry { sensor, ts, value });
    }

    pub fn len(&self) -> usize {
        self.block.entries.len()
    }

    /// How many sensor ids are interned so far.
    pub fn sensor_count(&self) -> usize {
        self.block.sensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.block.entries.is_empty()
    }

    pub fn finish(self) -> Block {
        self.block
    }

    /// Hands out the block built so far and starts a new one.
    pub fn take(&mut self) -> Block {
        self.index.clear();
        core::mem::take(&mut self.block)
    }
}

#[derive(Serialize)]
struct Repr<'a> {
    sensors: &'a [String],
    entries: DeltaEntries<'a>,
}

/// A block as decoded, with its sensor ids owned (`String`) or borrowed (`&str`).
#[derive(Deserialize)]
struct DecodedRepr<S> {
    sensors: Vec<S>,
    entries: Vec<(u32, i64, f64)>,
}

/// Decodes many blocks in a row (the aggregator's processor reads every block of the log):
/// the sensor ids borrow from the bytes instead of one allocation each, and one zstd context
/// serves every block (a fresh one per block cost a large allocation and its page faults).
#[cfg(feature = "std")]
#[derive(Default)]
pub struct BlockDecoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// A compressed block's decompressed bytes, which the last decoded view borrows.
    decompressed: Vec<u8>,
}

#[cfg(feature = "std")]
impl BlockDecoder {
    /// Decodes like [`Block::decode`].
    pub fn decode<'a>(&'a mut self, blob: &'a [u8]) -> Result<BlockView<'a>, BlockError> {
        let (&format, payload) = blob.split_first().ok_or(BlockError::Empty)?;
        let (clock, format, payload) = match format {
            FORMAT_FLAGGED => {
                let (clock, inner) = split_flag(payload)?;
                let (&format, payload) = inner.split_first().ok_or(BlockError::Empty)?;
                (clock, format, payload)
            }
            _ => (BlockClock::Synced, format, payload),
        };
        let payload: &'a [u8] = match format {
            FORMAT_POSTCARD => payload,
            FORMAT_POSTCARD_ZSTD => {
                let zstd = match &mut self.zstd {
                    Some(zstd) => zstd,
                    None => self
                        .zstd
                        .insert(zstd::bulk::Decompressor::new().map_err(|e| BlockError::Malformed(e.to_string()))?),
                };
                self.decompressed =
                    zstd.decompress(payload, MAX_DECODED_BYTES).map_err(|e| BlockError::Malformed(e.to_string()))?;
                &self.decompressed
            }
            other => return Err(BlockError::UnknownFormat(other)),
        };
        let (sensors, entries) = decode_parts::<&str>(payload)?;
        Ok(BlockView { sensors, entries, clock })
    }
}

/// A decoded block whose sensor ids borrow from the bytes it was decoded from.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockView<'a> {
    pub sensors: Vec<&'a str>,
    pub entries: Vec<Entry>,
    pub clock: BlockClock,
}

impl BlockView<'_> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// As [`Block::validate`].
    pub fn validate(&self) -> Result<(), BlockError> {
        validate_parts(self.sensors.iter().copied(), &self.entries, self.clock)
    }
}

fn decode_parts<'a, S: Deserialize<'a>>(payload: &'a [u8]) -> Result<(Vec<S>, Vec<Entry>), BlockError> {
    let (repr, rest): (DecodedRepr<S>, _) =
        postcard::take_from_bytes(payload).map_err(|e| BlockError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(BlockError::Malformed(alloc::format!("{} trailing bytes", rest.len())));
    }
    let interned = repr.sensors.len();
    let mut ts = 0i64;
    let mut entries = Vec::with_capacity(repr.entries.len());
    for (sensor, delta, value) in repr.entries {
        if sensor as usize >= interned {
            return Err(BlockError::SensorIndex { index: sensor, interned });
        }
        ts = ts.wrapping_add(delta);
        entries.push(Entry { sensor, ts, value });
    }
    Ok((repr.sensors, entries))
}

fn validate_parts<'a>(
    sensors: impl Iterator<Item = &'a str>,
    entries: &[Entry],
    clock: BlockClock,
) -> Result<(), BlockError> {
    for (index, id) in sensors.enumerate() {
        validate_sensor_id(id).map_err(|error| BlockError::Reading { index, error })?;
    }
    for (index, e) in entries.iter().enumerate() {
        let checked = match clock {
            // A clock never set reads 1970: the readings are kept (and quarantined) all the same.
            BlockClock::Unsynced { .. } if (0..MIN_TS_MS).contains(&e.ts) => validate_value(e.value),
            _ => validate_value_and_ts(e.ts, e.value),
        };
        checked.map_err(|error| BlockError::Reading { index, error })?;
    }
    Ok(())
}

/// Serialises entries with each timestamp as the delta from the previous one (the first from 0),
/// so a steady stream costs one or two varint bytes per timestamp.
struct DeltaEntries<'a>(&'a [Entry]);

impl Serialize for DeltaEntries<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        let mut prev = 0i64;
        for e in self.0 {
            seq.serialize_element(&(e.sensor, e.ts.wrapping_sub(prev), e.value))?;
            prev = e.ts;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Block {
        let mut b = BlockBuilder::default();
        for i in 0..n {
            let sensor = ["room1/temp", "room2/temp", "room1/humidity"][i % 3];
            b.push(sensor, 1_764_000_000_000 + (i as i64) * 1000, 20.0 + (i % 7) as f64 * 0.5);
        }
        b.finish()
    }

    #[test]
    fn blocks_round_trip_compressed_and_not() {
        for n in [0, 1, 5, 15, 16, 1000] {
            let block = sample(n);
            assert_eq!(Block::decode(&block.encode()).unwrap(), block, "n = {n}");
            assert_eq!(Block::decode(&block.encode_postcard()).unwrap(), block, "n = {n}");
        }
    }

    #[test]
    fn interning_keeps_one_id_per_sensor() {
        let block = sample(300);
        assert_eq!(block.sensors, ["room1/temp", "room2/temp", "room1/humidity"]);
        assert_eq!(block.readings().nth(4), Some(("room2/temp", 1_764_000_004_000, 22.0)));
    }

    #[test]
    fn a_steady_stream_costs_few_bytes_per_reading() {
        let block = sample(5000);
        let raw = block.encode_postcard().len() as f64 / 5000.0;
        let packed = block.encode().len() as f64 / 5000.0;
        assert!(raw < 13.0, "{raw} B per reading uncompressed");
        assert!(packed < raw / 2.0, "{packed} B per reading compressed vs {raw}");
    }

    #[test]
    fn corrupt_blocks_are_errors_not_panics() {
        assert_eq!(Block::decode(&[]), Err(BlockError::Empty));
        assert_eq!(Block::decode(&[99, 1, 2]), Err(BlockError::UnknownFormat(99)));
        let good = sample(100).encode();
        for cut in [2, good.len() / 2, good.len() - 1] {
            assert!(Block::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = sample(3).encode_postcard();
        // The last entry is sensor (1 byte), ts delta 1000 (2-byte zigzag varint), value (8 bytes).
        let last = flipped.len() - 11;
        flipped[last] = 7;
        assert!(matches!(Block::decode(&flipped), Err(BlockError::SensorIndex { index: 7, .. })));
        let mut garbage = alloc::vec![FORMAT_POSTCARD];
        garbage.extend((0..200u8).map(|i| i.wrapping_mul(37)));
        assert!(Block::decode(&garbage).is_err());
    }

    #[test]
    fn validate_names_the_bad_reading() {
        let mut b = BlockBuilder::default();
        b.push("ok", 1_764_000_000_000, 1.0);
        b.push("ok", 1_764_000_000_000, f64::NAN);
        assert!(matches!(b.finish().validate(), Err(BlockError::Reading { index: 1, .. })));
    }

    #[test]
    fn sub_block_keeps_a_middle_run_and_only_its_sensors() {
        let block = sample(10);
        let middle = block.sub_block(3..5);
        assert_eq!(middle.len(), 2);
        assert_eq!(middle.readings().collect::<Vec<_>>(), block.readings().skip(3).take(2).collect::<Vec<_>>());
        // Readings 3 and 4 are room1/temp and room2/temp: room1/humidity is not interned.
        assert_eq!(middle.sensors, ["room1/temp", "room2/temp"]);
        assert_eq!(Block::decode(&middle.encode()).unwrap(), middle);
        assert!(block.sub_block(8..20).len() == 2 && block.sub_block(12..20).is_empty());
    }

    #[test]
    fn tail_drops_the_known_prefix() {
        let block = sample(10);
        let tail = block.tail(4);
        assert_eq!(tail.len(), 6);
        assert_eq!(tail.readings().next(), block.readings().nth(4));
    }

    #[test]
    fn flagged_blocks_round_trip_and_old_formats_read_as_synced() {
        let boot_id = [7u8; 16];
        for clock in [BlockClock::Unsynced { boot_id, offset_ms: -1_700_000_000_000 }, BlockClock::DeviceSkew] {
            for n in [1, 15, 1000] {
                let block = Block { clock, ..sample(n) };
                for blob in [block.encode(), block.encode_postcard()] {
                    assert_eq!(blob[0], FORMAT_FLAGGED);
                    assert_eq!(Block::decode(&blob).unwrap(), block, "n = {n}");
                    assert_eq!(BlockClock::of(&blob), Ok(clock));
                    let mut decoder = BlockDecoder::default();
                    let view = decoder.decode(&blob).unwrap();
                    assert_eq!((view.clock, view.entries.len()), (clock, n));
                }
                assert_eq!(block.sub_block(0..1).clock, clock, "a part keeps its block's flag");
            }
        }
        let old = sample(20).encode();
        assert_eq!(BlockClock::of(&old), Ok(BlockClock::Synced));
        assert_eq!(Block::decode(&old).unwrap().clock, BlockClock::Synced);
        assert_eq!(sample(3).encode()[0], FORMAT_POSTCARD, "an unflagged block keeps its old format");
    }

    #[test]
    fn only_unsynced_blocks_may_hold_1970_timestamps_and_flags_do_not_nest() {
        let mut b = BlockBuilder::default();
        b.push("s", 12_345, 1.0);
        let block = b.finish();
        assert!(matches!(block.validate(), Err(BlockError::Reading { index: 0, .. })));
        let unsynced = Block { clock: BlockClock::Unsynced { boot_id: [1; 16], offset_ms: 0 }, ..block.clone() };
        assert_eq!(unsynced.validate(), Ok(()));
        assert!(Block { clock: BlockClock::DeviceSkew, ..block }.validate().is_err());
        let mut nested = alloc::vec![FORMAT_FLAGGED];
        nested.extend(unsynced.encode());
        assert!(matches!(Block::decode(&nested), Err(BlockError::Malformed(_))));
        assert!(Block::decode(&[FORMAT_FLAGGED, 9]).is_err());
    }
}
