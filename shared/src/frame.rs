//! The serial frame format: how a sensor sends readings over a UART, and how the agent reads them
//! back out of a byte stream that drops, flips and cuts bytes.
//!
//! # Layout (for firmware authors)
//!
//! A frame carries one or more readings. Before framing, its bytes are:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version, `0x01` |
//! | 1–5 | number of readings *n*, unsigned LEB128 varint |
//! | … | *n* readings, each: |
//! | 1–5 | &nbsp;&nbsp;sensor id length, unsigned LEB128 varint (1–128) |
//! | len | &nbsp;&nbsp;sensor id, UTF-8 (no `+`, `#` or control characters; `/` is fine) |
//! | 1 | &nbsp;&nbsp;timestamp present: `0x00` no (the agent stamps its receive time), `0x01` yes |
//! | 1–10 | &nbsp;&nbsp;if present: Unix time in ms, zigzag-encoded then LEB128 varint (`(t << 1) ^ (t >> 63)`) |
//! | 8 | &nbsp;&nbsp;value, IEEE 754 f64, little-endian |
//! | 4 | CRC-32 of every byte above, little-endian |
//!
//! That is the [postcard](https://postcard.jamesmunns.com/wire-format) encoding of
//! `(u8, [FrameReading])`, so Rust firmware gets it from `postcard`; C firmware writes it by hand.
//! At most [`MAX_FRAME_LEN`] bytes, CRC included.
//!
//! The CRC is CRC-32/ISO-HDLC (polynomial `0x04C11DB7` reflected, init and final XOR `0xFFFFFFFF`):
//! zlib's `crc32`, Python's `zlib.crc32`, ESP-IDF's `esp_rom_crc32_le`, table-free in a dozen lines
//! of C. 32 bits, not 16, because a receiver set to the wrong baud rate reads thousands of garbage
//! segments a second: with CRC-16 one in 65,536 would pass as a frame (a bogus reading every few
//! seconds); with CRC-32 one in 4 billion. It detects every error burst up to 32 bits.
//!
//! The bytes are then [COBS](https://en.wikipedia.org/wiki/Consistent_Overhead_Byte_Stuffing)-encoded
//! (which removes every `0x00`, at a cost of one byte per 254) and followed by one `0x00` delimiter.
//! A receiver that starts mid-stream, or loses or corrupts bytes, resynchronises at the next `0x00`;
//! firmware may also send a `0x00` before its first frame after boot, so the receiver drops
//! whatever partial frame it held. Consecutive delimiters are ignored.
//!
//! Example: one reading `room1/temp` = 21.5 at 1764000000000 ms encodes to the 34 bytes
//! `15 01 01 0a 72 6f 6f 6d 31 2f 74 65 6d 70 01 80 a0 bf e9 d6 66 01 01 01 01 08 80 35 40 ad ca 7c a4 00`
//! (the test `the_documented_example_is_what_the_encoder_writes` checks it).
//!
//! [`encode`] writes a frame; [`Deframer`] splits a byte stream into frames and checks each;
//! [`Frame::parse`] checks one. Neither allocates: firmware can use both with fixed buffers.

use serde::{Deserialize, Serialize};

/// The format version this module writes and reads.
pub const FRAME_VERSION: u8 = 1;

/// Most bytes in a frame before COBS, CRC included. Bounds the receiver's buffer: a frame can carry
/// a few dozen readings with short ids, and a stream without delimiters is cut off here.
pub const MAX_FRAME_LEN: usize = 1024;

/// Most bytes a frame takes on the wire: COBS adds one byte per 254, plus the delimiter.
pub const MAX_ENCODED_LEN: usize = cobs::max_encoding_length(MAX_FRAME_LEN) + 1;

const CRC_LEN: usize = 4;

/// The frame checksum: CRC-32/ISO-HDLC (zlib's crc32).
pub const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// One reading as a frame carries it: the id as the device knows it, its own timestamp (Unix ms)
/// if it has a clock, and the value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FrameReading<'a> {
    pub sensor: &'a str,
    pub ts: Option<i64>,
    pub value: f64,
}

/// Why bytes between two delimiters are not a frame. [`FrameError::label`] names each for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not valid COBS (a byte was lost, added or changed)")]
    Cobs,
    #[error("the CRC does not match (corrupted or truncated frame)")]
    Crc,
    #[error("frame format version {0}, this agent reads version {FRAME_VERSION}")]
    Version(u8),
    #[error("the CRC matches but the readings cannot be decoded (a firmware bug?)")]
    Decode,
    #[error("more than {MAX_FRAME_LEN} bytes without a 0x00 delimiter")]
    TooLong,
    #[error("the output buffer is too small for the frame")]
    BufferTooSmall,
}

impl FrameError {
    /// A short snake_case name, the `reason` label of the agent's rejection counter.
    pub fn label(self) -> &'static str {
        match self {
            FrameError::Cobs => "cobs",
            FrameError::Crc => "crc",
            FrameError::Version(_) => "version",
            FrameError::Decode => "decode",
            FrameError::TooLong | FrameError::BufferTooSmall => "too_long",
        }
    }
}

#[derive(Serialize)]
struct Body<'r, 'a> {
    version: u8,
    readings: &'r [FrameReading<'a>],
}

/// Writes `readings` as one frame into `out`, delimiter included, and returns its length.
/// Fails with [`FrameError::TooLong`] if the readings exceed [`MAX_FRAME_LEN`], and with
/// [`FrameError::BufferTooSmall`] if `out` cannot hold the frame ([`MAX_ENCODED_LEN`] always can).
pub fn encode(readings: &[FrameReading<'_>], out: &mut [u8]) -> Result<usize, FrameError> {
    let mut raw = [0u8; MAX_FRAME_LEN];
    let body = Body { version: FRAME_VERSION, readings };
    let len = postcard::to_slice(&body, &mut raw[..MAX_FRAME_LEN - CRC_LEN]).map_err(|_| FrameError::TooLong)?.len();
    let crc = CRC32.checksum(&raw[..len]);
    raw[len..len + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    let raw = &raw[..len + CRC_LEN];
    if out.len() < cobs::max_encoding_length(raw.len()) + 1 {
        return Err(FrameError::BufferTooSmall);
    }
    let n = cobs::encode(raw, out);
    out[n] = 0;
    Ok(n + 1)
}

/// A checked frame: CRC, version and every reading's encoding are valid.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The readings' bytes (after the count).
    readings: &'a [u8],
    count: u32,
}

impl<'a> Frame<'a> {
    /// Checks a frame's bytes after COBS decoding (no delimiter).
    pub fn parse(raw: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        if raw.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLong);
        }
        // Version, count and the CRC at least.
        if raw.len() < 2 + CRC_LEN {
            return Err(FrameError::Crc);
        }
        let (content, crc) = raw.split_at(raw.len() - CRC_LEN);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if CRC32.checksum(content) != crc {
            return Err(FrameError::Crc);
        }
        if content[0] != FRAME_VERSION {
            return Err(FrameError::Version(content[0]));
        }
        let (count, readings) = postcard::take_from_bytes::<u32>(&content[1..]).map_err(|_| FrameError::Decode)?;
        // Decode every reading once now, so that iterating cannot fail half-way.
        let mut rest = readings;
        for _ in 0..count {
            let (_, tail) = postcard::take_from_bytes::<FrameReading<'_>>(rest).map_err(|_| FrameError::Decode)?;
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(FrameError::Decode);
        }
        Ok(Frame { readings, count })
    }

    /// How many readings the frame holds.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The readings, in the order the device wrote them.
    pub fn readings(&self) -> impl Iterator<Item = FrameReading<'a>> + 'a {
        let mut rest = self.readings;
        (0..self.count).map_while(move |_| {
            let (reading, tail) = postcard::take_from_bytes::<FrameReading<'a>>(rest).ok()?;
            rest = tail;
            Some(reading)
        })
    }
}

/// Splits a byte stream into frames at `0x00` delimiters and checks each, with a fixed buffer of
/// `N` bytes (use [`MAX_ENCODED_LEN`]; smaller caps frames lower). Bytes that do not make a frame
/// are reported once per segment and skipped; the next delimiter starts afresh.
#[derive(Debug, Clone)]
pub struct Deframer<const N: usize = MAX_ENCODED_LEN> {
    buf: [u8; N],
    len: usize,
    /// The current segment outgrew the buffer: drop bytes until the next delimiter.
    overflow: bool,
}

impl<const N: usize> Default for Deframer<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Deframer<N> {
    pub const fn new() -> Self {
        Deframer { buf: [0; N], len: 0, overflow: false }
    }

    /// Forgets a partial frame (after the port was closed and reopened, say).
    pub fn reset(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    /// Bytes of an unfinished frame held.
    pub fn pending(&self) -> usize {
        self.len
    }

    /// Feeds bytes as they arrive; calls `on_frame` for every complete segment, in order.
    pub fn feed(&mut self, mut input: &[u8], mut on_frame: impl FnMut(Result<Frame<'_>, FrameError>)) {
        while !input.is_empty() {
            let (chunk, delimited) = match input.iter().position(|&b| b == 0) {
                Some(i) => (&input[..i], Some(i + 1)),
                None => (input, None),
            };
            if !self.overflow {
                if self.len + chunk.len() > N {
                    self.overflow = true;
                } else {
                    self.buf[self.len..self.len + chunk.len()].copy_from_slice(chunk);
                    self.len += chunk.len();
                }
            }
            match delimited {
                Some(next) => {
                    if self.overflow {
                        on_frame(Err(FrameError::TooLong));
                    } else if self.len > 0 {
                        match cobs::decode_in_place(&mut self.buf[..self.len]) {
                            Ok(n) => on_frame(Frame::parse(&self.buf[..n])),
                            Err(_) => on_frame(Err(FrameError::Cobs)),
                        }
                    }
                    self.reset();
                    input = &input[next..];
                }
                None => input = &[],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::{String, ToString};
    use std::vec::Vec;
    use std::{format, vec};

    /// An owned reading, to compare what came out with what went in.
    #[derive(Debug, Clone, PartialEq)]
    struct Owned {
        sensor: String,
        ts: Option<i64>,
        value: f64,
    }

    impl From<FrameReading<'_>> for Owned {
        fn from(r: FrameReading<'_>) -> Owned {
            Owned { sensor: r.sensor.to_string(), ts: r.ts, value: r.value }
        }
    }

    fn frame(readings: &[FrameReading<'_>]) -> Vec<u8> {
        let mut out = [0u8; MAX_ENCODED_LEN];
        let n = encode(readings, &mut out).unwrap();
        out[..n].to_vec()
    }

    /// Feeds `stream` in pieces of `piece` bytes: (frames' readings, errors).
    fn deframe(stream: &[u8], piece: usize) -> (Vec<Vec<Owned>>, Vec<FrameError>) {
        let mut deframer = Deframer::<MAX_ENCODED_LEN>::new();
        let (mut frames, mut errors) = (Vec::new(), Vec::new());
        for part in stream.chunks(piece.max(1)) {
            deframer.feed(part, |r| match r {
                Ok(f) => frames.push(f.readings().map(Owned::from).collect()),
                Err(e) => errors.push(e),
            });
        }
        (frames, errors)
    }

    fn sample(i: usize) -> Vec<u8> {
        let ids = [format!("dev-{i}/temperature"), format!("dev-{i}/humidity")];
        frame(&[
            FrameReading { sensor: &ids[0], ts: Some(1_764_000_000_000 + i as i64), value: 20.0 + i as f64 / 100.0 },
            FrameReading { sensor: &ids[1], ts: None, value: -(i as f64) },
        ])
    }

    fn readings_of(i: usize) -> Vec<Owned> {
        vec![
            Owned {
                sensor: format!("dev-{i}/temperature"),
                ts: Some(1_764_000_000_000 + i as i64),
                value: 20.0 + i as f64 / 100.0,
            },
            Owned { sensor: format!("dev-{i}/humidity"), ts: None, value: -(i as f64) },
        ]
    }

    #[test]
    fn frames_round_trip_whatever_the_read_sizes() {
        let mut stream = Vec::new();
        for i in 0..50 {
            stream.extend(sample(i));
        }
        let expected: Vec<_> = (0..50).map(readings_of).collect();
        for piece in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(deframe(&stream, piece), (expected.clone(), vec![]), "read size {piece}");
        }
    }

    #[test]
    fn extreme_values_and_timestamps_survive() {
        let id = "x".repeat(128);
        let readings = [
            FrameReading { sensor: &id, ts: Some(i64::MAX), value: f64::MAX },
            FrameReading { sensor: "a", ts: Some(i64::MIN), value: f64::MIN_POSITIVE },
            FrameReading { sensor: "küche/temp", ts: Some(0), value: -0.0 },
        ];
        let (frames, errors) = deframe(&frame(&readings), 4096);
        assert!(errors.is_empty());
        assert_eq!(frames, [readings.iter().copied().map(Owned::from).collect::<Vec<_>>()]);
    }

    #[test]
    fn the_documented_example_is_what_the_encoder_writes() {
        let bytes = frame(&[FrameReading { sensor: "room1/temp", ts: Some(1_764_000_000_000), value: 21.5 }]);
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            // Checked against an independent encoder (Python: struct, zlib.crc32, a hand-written COBS).
            "15 01 01 0a 72 6f 6f 6d 31 2f 74 65 6d 70 01 80 a0 bf e9 d6 66 01 01 01 01 08 80 35 40 ad ca 7c a4 00"
        );
        assert_eq!(bytes.len(), 34);
    }

    #[test]
    fn every_single_byte_corruption_is_detected_and_the_stream_resynchronises() {
        let (a, b, c) = (sample(1), sample(2), sample(3));
        for pos in 0..a.len() {
            for flip in 1..=255u8 {
                let mut stream = a.clone();
                stream[pos] ^= flip;
                stream.extend(&b);
                stream.extend(&c);
                let (frames, errors) = deframe(&stream, 5);
                let at = format!("byte {pos} ^ {flip:#04x}");
                assert!(!errors.is_empty(), "{at}: the corruption went unnoticed");
                assert!(!frames.contains(&readings_of(1)), "{at}: the corrupted frame was accepted");
                assert!(
                    frames.iter().all(|f| *f == readings_of(2) || *f == readings_of(3)),
                    "{at}: a frame no one sent came out: {frames:?}"
                );
                assert_eq!(frames.last(), Some(&readings_of(3)), "{at}: the stream did not resynchronise");
                if pos + 1 < a.len() {
                    // Only a lost delimiter takes the next frame down with it.
                    assert!(frames.contains(&readings_of(2)), "{at}: the good frame after it was lost");
                }
            }
        }
    }

    #[test]
    fn a_dropped_byte_costs_only_its_own_frame() {
        let (a, b) = (sample(1), sample(2));
        for pos in 0..a.len() {
            let mut stream = a.clone();
            stream.remove(pos);
            stream.extend(&b);
            let (frames, errors) = deframe(&stream, 3);
            if pos + 1 < a.len() {
                assert_eq!(frames, [readings_of(2)], "dropped byte {pos}");
                assert_eq!(errors.len(), 1, "dropped byte {pos}");
            } else {
                // The delimiter was dropped: both frames merge into one bad segment.
                assert!(frames.is_empty() && errors.len() == 1, "dropped delimiter");
            }
        }
    }

    #[test]
    fn truncated_frames_are_rejected_and_the_next_one_arrives() {
        let (a, b) = (sample(1), sample(2));
        for cut in 1..a.len() - 1 {
            let mut stream = a[..cut].to_vec();
            stream.push(0);
            stream.extend(&b);
            let (frames, errors) = deframe(&stream, 4096);
            assert_eq!(frames, [readings_of(2)], "cut at {cut}");
            assert_eq!(errors.len(), 1, "cut at {cut}");
            assert!(matches!(errors[0], FrameError::Cobs | FrameError::Crc), "cut at {cut}: {:?}", errors[0]);
        }
    }

    #[test]
    fn frames_are_capped_at_the_maximum_length() {
        // The largest frame that fits encodes and decodes.
        let id = "s".repeat(100);
        let reading = FrameReading { sensor: &id, ts: Some(1_764_000_000_000), value: 1.0 };
        let mut readings = vec![reading; 1];
        while encode(&readings, &mut [0u8; MAX_ENCODED_LEN]).is_ok() {
            readings.push(reading);
        }
        assert_eq!(encode(&readings, &mut [0u8; MAX_ENCODED_LEN]), Err(FrameError::TooLong));
        readings.pop();
        let big = frame(&readings);
        assert!(big.len() > MAX_FRAME_LEN - 120 && big.len() <= MAX_ENCODED_LEN, "{}", big.len());
        let (frames, errors) = deframe(&big, 100);
        assert_eq!((frames.len(), frames[0].len(), errors.len()), (1, readings.len(), 0));

        // A stream without delimiters is cut off, once, and the next frame arrives.
        let mut stream = vec![0x55u8; 5 * MAX_ENCODED_LEN];
        stream.push(0);
        stream.extend(sample(1));
        assert_eq!(deframe(&stream, 333), (vec![readings_of(1)], vec![FrameError::TooLong]));

        // A small output buffer is refused, not overrun.
        assert_eq!(encode(&readings, &mut [0u8; 64]), Err(FrameError::BufferTooSmall));
    }

    #[test]
    fn empty_segments_are_ignored_and_garbage_is_reported_per_segment() {
        let mut stream = vec![0, 0, 0];
        stream.extend(sample(1));
        stream.extend([0, 0]);
        stream.extend(b"\x02garbage\x01\x00");
        stream.extend(sample(2));
        let (frames, errors) = deframe(&stream, 4096);
        assert_eq!(frames, [readings_of(1), readings_of(2)]);
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn a_valid_crc_over_bad_content_is_a_decode_or_version_error() {
        let with_crc = |content: &[u8]| {
            let mut raw = content.to_vec();
            raw.extend(CRC32.checksum(content).to_le_bytes());
            raw
        };
        assert_eq!(Frame::parse(&with_crc(&[2, 0])).err(), Some(FrameError::Version(2)));
        // One reading announced, none there.
        assert_eq!(Frame::parse(&with_crc(&[1, 1])).err(), Some(FrameError::Decode));
        // A sensor id that is not UTF-8.
        let mut bad_utf8 = vec![1, 1, 2, 0xff, 0xfe, 0];
        bad_utf8.extend(1.0f64.to_le_bytes());
        assert_eq!(Frame::parse(&with_crc(&bad_utf8)).err(), Some(FrameError::Decode));
        // Trailing bytes after the announced readings.
        assert_eq!(Frame::parse(&with_crc(&[1, 0, 7])).err(), Some(FrameError::Decode));
        // No readings: a keep-alive, valid and empty.
        assert!(Frame::parse(&with_crc(&[1, 0])).unwrap().is_empty());
    }
}
