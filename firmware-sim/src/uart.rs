//! What a device writes to its UART: its readings as checked frames (`tributary_shared::frame`) or
//! as text lines, queued whole in a fixed-size [`Outbox`] until the UART takes them.
//!
//! - frames: one frame per sample with the three readings `dev-<n>/<quantity>`, with the device's
//!   timestamp when it has a clock;
//! - lines: `dev-<n>/temperature=21.53,dev-<n>/humidity=40.2,dev-<n>/pressure=1013.2\r\n`;
//! - number: the bare temperature, `21.53\r\n`.
//!
//! Values are rounded to the sensor's resolution in every format, so a frame and a line of the same
//! sample carry the same numbers. `no_std`, no allocation.

use core::fmt::{self, Write};

use tributary_shared::frame::{FrameError, FrameReading, encode};

use crate::device::{ID_CAPACITY, Sample};
use crate::payload::write_fixed;
use crate::signal::Quantity;

/// Room for `dev-4294967295/temperature`.
pub const SENSOR_ID_CAPACITY: usize = ID_CAPACITY + 16;

/// Longest line of one sample: three ids, three values at their widest, separators.
pub const LINE_CAPACITY: usize = 3 * (SENSOR_ID_CAPACITY + 16) + 2;

/// The sensor id of one quantity of a device: `dev-3/temperature`.
pub fn sensor_id(device_id: &str, quantity: Quantity) -> heapless::String<SENSOR_ID_CAPACITY> {
    let mut id = heapless::String::new();
    // Cannot fail: SENSOR_ID_CAPACITY holds the longest device id and quantity name.
    let _ = write!(id, "{device_id}/{}", quantity.name());
    id
}

/// A value as the sensor reports it: rounded to its resolution.
pub fn quantized(value: f64, quantity: Quantity) -> f64 {
    let scale = libm::pow(10.0, f64::from(quantity.decimals()));
    libm::round(value * scale) / scale
}

/// Writes one frame with the sample's three readings into `out` (delimiter included) and returns
/// its length. `clock`: the device knows the time, and stamps its readings with `sample.ts`.
pub fn write_frame(device_id: &str, sample: &Sample, clock: bool, out: &mut [u8]) -> Result<usize, FrameError> {
    let ids = Quantity::ALL.map(|q| sensor_id(device_id, q));
    let ts = clock.then_some(sample.ts);
    let mut readings = [FrameReading { sensor: "", ts, value: 0.0 }; 3];
    for ((reading, id), q) in readings.iter_mut().zip(&ids).zip(Quantity::ALL) {
        reading.sensor = id;
        reading.value = quantized(sample.get(q), q);
    }
    encode(&readings, out)
}

/// Writes `id=value` pairs of the sample's three readings, ended by `\r\n`.
pub fn write_line<W: Write>(out: &mut W, device_id: &str, sample: &Sample) -> fmt::Result {
    for (i, q) in Quantity::ALL.into_iter().enumerate() {
        if i > 0 {
            out.write_char(',')?;
        }
        write!(out, "{device_id}/{}=", q.name())?;
        write_fixed(out, sample.get(q), q.decimals())?;
    }
    out.write_str("\r\n")
}

/// Writes the bare temperature, ended by `\r\n`.
pub fn write_number_line<W: Write>(out: &mut W, sample: &Sample) -> fmt::Result {
    let q = Quantity::Temperature;
    write_fixed(out, sample.get(q), q.decimals())?;
    out.write_str("\r\n")
}

/// Bytes waiting for the UART. Frames and lines go in whole or not at all: when the UART falls
/// behind (a burst, a slow baud rate) the newest are dropped and counted, as firmware would.
#[derive(Debug, Default)]
pub struct Outbox<const N: usize> {
    buf: heapless::Vec<u8, N>,
    dropped: u32,
}

impl<const N: usize> Outbox<N> {
    pub const fn new() -> Self {
        Outbox { buf: heapless::Vec::new(), dropped: 0 }
    }

    /// Queues `bytes` whole; false (and counted) if they do not fit.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if self.buf.extend_from_slice(bytes).is_err() {
            self.dropped = self.dropped.saturating_add(1);
            return false;
        }
        true
    }

    /// What waits for the UART.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The UART took the first `n` bytes.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        self.buf.copy_within(n.., 0);
        self.buf.truncate(self.buf.len() - n);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Frames or lines that did not fit.
    pub fn dropped(&self) -> u32 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::frame::{Deframer, MAX_ENCODED_LEN};

    const SAMPLE: Sample = Sample { ts: 1_764_000_000_000, temperature: 21.534, humidity: 40.16, pressure: 1013.249 };

    #[test]
    fn a_frame_carries_the_three_readings_at_sensor_resolution() {
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let n = write_frame("dev-7", &SAMPLE, true, &mut buf).unwrap();
        let mut got = std::vec::Vec::new();
        Deframer::<MAX_ENCODED_LEN>::new().feed(&buf[..n], |f| {
            for r in f.unwrap().readings() {
                got.push((std::string::String::from(r.sensor), r.ts, r.value));
            }
        });
        let ts = Some(SAMPLE.ts);
        assert_eq!(
            got,
            [
                ("dev-7/temperature".into(), ts, 21.53),
                ("dev-7/humidity".into(), ts, 40.2),
                ("dev-7/pressure".into(), ts, 1013.2)
            ]
        );
        let n = write_frame("dev-7", &SAMPLE, false, &mut buf).unwrap();
        Deframer::<MAX_ENCODED_LEN>::new().feed(&buf[..n], |f| assert!(f.unwrap().readings().all(|r| r.ts.is_none())));
    }

    #[test]
    fn lines_are_what_the_agent_parses() {
        let mut line = heapless::String::<LINE_CAPACITY>::new();
        write_line(&mut line, "dev-4294967295", &Sample { temperature: -40.0, ..SAMPLE }).unwrap();
        assert_eq!(
            line,
            "dev-4294967295/temperature=-40.00,dev-4294967295/humidity=40.2,dev-4294967295/pressure=1013.2\r\n"
        );
        line.clear();
        write_number_line(&mut line, &SAMPLE).unwrap();
        assert_eq!(line, "21.53\r\n");
    }

    #[test]
    fn the_outbox_takes_whole_frames_and_counts_what_does_not_fit() {
        let mut outbox = Outbox::<8>::new();
        assert!(outbox.push(b"abcde"));
        assert!(!outbox.push(b"fghi"));
        assert_eq!((outbox.pending(), outbox.dropped()), (&b"abcde"[..], 1));
        outbox.consume(2);
        assert!(outbox.push(b"fghij"));
        assert_eq!(outbox.pending(), b"cdefghij");
        outbox.consume(100);
        assert!(outbox.is_empty());
    }
}
