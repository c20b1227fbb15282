//! MQTT payload formats, the agent's contract, written with `core::fmt` into any buffer.
//!
//! - `multi`: `{"temperature": 21.53, "humidity": 40.2, "pressure": 1013.2, "ts": 1764000000000}`;
//!   the agent makes one reading per numeric field, with sensor id `dev-<n>/<field>`.
//! - `object`: `{"value": 21.53, "ts": 1764000000000}` (temperature only).
//! - `number`: `21.53` (temperature only; the agent stamps its receive time).
//!
//! Values are written as fixed-point decimals from an integer, which is exact at the sensor's
//! resolution and much cheaper than general float formatting.

use core::fmt::{self, Write};

use crate::device::Sample;
use crate::signal::Quantity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "host", derive(clap::ValueEnum))]
pub enum Format {
    /// Every quantity and the timestamp in one JSON object.
    #[default]
    Multi,
    /// `{"value": …, "ts": …}` with the temperature.
    Object,
    /// The bare temperature.
    Number,
}

impl Format {
    /// Readings the agent makes from one message of this format.
    pub const fn readings(self) -> u64 {
        match self {
            Format::Multi => Quantity::ALL.len() as u64,
            Format::Object | Format::Number => 1,
        }
    }
}

pub fn write_payload<W: Write>(out: &mut W, format: Format, sample: &Sample) -> fmt::Result {
    match format {
        Format::Multi => {
            out.write_char('{')?;
            for q in Quantity::ALL {
                write!(out, "\"{}\": ", q.name())?;
                write_fixed(out, sample.get(q), q.decimals())?;
                out.write_str(", ")?;
            }
            write!(out, "\"ts\": {}}}", sample.ts)
        }
        Format::Object => {
            let q = Quantity::Temperature;
            out.write_str("{\"value\": ")?;
            write_fixed(out, sample.get(q), q.decimals())?;
            write!(out, ", \"ts\": {}}}", sample.ts)
        }
        Format::Number => {
            let q = Quantity::Temperature;
            write_fixed(out, sample.get(q), q.decimals())
        }
    }
}

/// Writes `value` rounded to `decimals` places (at most 9), e.g. `-0.05`, `1013.2`, `7`.
/// Not-finite or huge values are an error: JSON has no spelling for them.
pub fn write_fixed<W: Write>(out: &mut W, value: f64, decimals: u32) -> fmt::Result {
    if decimals > 9 {
        return Err(fmt::Error);
    }
    let scale = 10u64.pow(decimals);
    let scaled = libm::round(value * scale as f64);
    // Also false for NaN; 2^53 keeps the integer exact.
    if !(-9.0e15..=9.0e15).contains(&scaled) {
        return Err(fmt::Error);
    }
    let scaled = scaled as i64;
    if scaled < 0 {
        out.write_char('-')?;
    }
    let magnitude = scaled.unsigned_abs();
    if decimals == 0 {
        write!(out, "{magnitude}")
    } else {
        write!(out, "{}.{:0width$}", magnitude / scale, magnitude % scale, width = decimals as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(value: f64, decimals: u32) -> heapless::String<32> {
        let mut s = heapless::String::new();
        write_fixed(&mut s, value, decimals).unwrap();
        s
    }

    #[test]
    fn fixed_point_rounds_and_signs_like_a_sensor_display() {
        assert_eq!(fixed(21.534, 2), "21.53");
        assert_eq!(fixed(21.535_01, 2), "21.54");
        assert_eq!(fixed(-0.05, 2), "-0.05");
        assert_eq!(fixed(-3.0, 1), "-3.0");
        assert_eq!(fixed(-0.004, 2), "0.00");
        assert_eq!(fixed(1013.25, 1), "1013.3");
        assert_eq!(fixed(100.0, 1), "100.0");
        assert_eq!(fixed(7.4, 0), "7");
        let mut s = heapless::String::<32>::new();
        assert!(write_fixed(&mut s, f64::NAN, 2).is_err());
        assert!(write_fixed(&mut s, f64::INFINITY, 2).is_err());
    }

    #[test]
    fn every_format_is_the_json_the_agent_expects() {
        let sample = Sample { ts: 1_764_000_000_000, temperature: 21.53, humidity: 40.2, pressure: 1013.2 };
        let render = |format| {
            let mut s = heapless::String::<128>::new();
            write_payload(&mut s, format, &sample).unwrap();
            s
        };
        assert_eq!(
            render(Format::Multi),
            r#"{"temperature": 21.53, "humidity": 40.2, "pressure": 1013.2, "ts": 1764000000000}"#
        );
        assert_eq!(render(Format::Object), r#"{"value": 21.53, "ts": 1764000000000}"#);
        assert_eq!(render(Format::Number), "21.53");
        for format in [Format::Multi, Format::Object, Format::Number] {
            serde_json::from_str::<serde_json::Value>(&render(format)).unwrap();
        }
    }
}
