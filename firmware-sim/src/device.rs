//! A simulated sensor node: three signals, a PRNG and a payload buffer, all in fixed-size memory.
//!
//! A `Device` is what firmware would keep in a static: it never allocates, and given the same seed,
//! number and timestamps it produces the same readings on any machine.

use core::fmt::Write;

use crate::payload::{Format, write_payload};
use crate::signal::{Noise, Quantity, Signal};

/// Room for the longest payload: the multi format with every value at its widest and a 19-digit ts
/// is under 100 bytes.
pub const PAYLOAD_CAPACITY: usize = 128;

/// Room for `dev-4294967295`.
pub const ID_CAPACITY: usize = 16;

/// One reading of every quantity of a device, taken at `ts` (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub ts: i64,
    pub temperature: f64,
    pub humidity: f64,
    pub pressure: f64,
}

impl Sample {
    pub fn get(&self, quantity: Quantity) -> f64 {
        match quantity {
            Quantity::Temperature => self.temperature,
            Quantity::Humidity => self.humidity,
            Quantity::Pressure => self.pressure,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Device {
    number: u32,
    id: heapless::String<ID_CAPACITY>,
    signals: heapless::Vec<Signal, 3>,
    noise: Noise,
    payload: heapless::String<PAYLOAD_CAPACITY>,
}

impl Device {
    /// Device `number` (from 1) of a fleet seeded with `seed`. Devices of one fleet differ from
    /// each other; the same (seed, number) is always the same device.
    pub fn new(number: u32, seed: u64) -> Self {
        let mut noise = Noise::new(device_seed(seed, number));
        let mut id = heapless::String::new();
        // Cannot fail: ID_CAPACITY holds the longest u32.
        let _ = write!(id, "dev-{number}");
        let mut signals = heapless::Vec::new();
        for q in Quantity::ALL {
            // Cannot fail: the Vec holds exactly the three quantities.
            let _ = signals.push(Signal::new(q, &mut noise));
        }
        Device { number, id, signals, noise, payload: heapless::String::new() }
    }

    pub fn number(&self) -> u32 {
        self.number
    }

    /// `dev-<number>`: the last MQTT topic level and the prefix of the device's sensor ids.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads every quantity at `ts_ms` (Unix ms).
    pub fn sample(&mut self, ts_ms: i64) -> Sample {
        let mut values = [0.0; 3];
        for (value, signal) in values.iter_mut().zip(self.signals.iter_mut()) {
            *value = signal.sample(ts_ms, &mut self.noise);
        }
        Sample { ts: ts_ms, temperature: values[0], humidity: values[1], pressure: values[2] }
    }

    /// Reads at `ts_ms` and formats the MQTT payload into the device's buffer. The buffer is
    /// overwritten by the next call.
    pub fn payload(&mut self, ts_ms: i64, format: Format) -> &str {
        let sample = self.sample(ts_ms);
        self.payload.clear();
        // Cannot fail: PAYLOAD_CAPACITY fits every format, and readings are clamped so finite.
        let _ = write_payload(&mut self.payload, format, &sample);
        &self.payload
    }
}

/// Spreads (seed, number) over the PRNG's seed space so neighbouring devices are unrelated.
fn device_seed(seed: u64, number: u32) -> u64 {
    // SplitMix64's finaliser.
    let mut z = seed ^ u64::from(number).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: i64 = 1_764_028_800_000; // 2025-11-25T00:00:00Z
    const MINUTE: i64 = 60_000;

    #[test]
    fn the_same_seed_plays_the_same_device() {
        let mut a = Device::new(3, 42);
        let mut b = Device::new(3, 42);
        for i in 0..1000 {
            let ts = START + i * 1000;
            assert_eq!(a.sample(ts), b.sample(ts));
        }
        assert_eq!(a.payload(START + 1_000_000, Format::Multi), b.payload(START + 1_000_000, Format::Multi));
    }

    #[test]
    fn devices_and_seeds_differ() {
        let first = |number, seed| Device::new(number, seed).sample(START);
        assert_ne!(first(1, 42), first(2, 42));
        assert_ne!(first(1, 42), first(1, 43));
        assert_eq!(Device::new(17, 1).id(), "dev-17");
    }

    #[test]
    fn a_simulated_week_stays_plausible_and_follows_the_day() {
        for number in 1..=20 {
            let mut device = Device::new(number, 9);
            let (mut afternoon, mut night) = ((0.0, 0), (0.0, 0));
            let (mut humidity_sum, mut n) = (0.0, 0);
            let mut ts = START;
            while ts < START + 7 * 24 * 60 * MINUTE {
                let s = device.sample(ts);
                assert!((-20.0..=50.0).contains(&s.temperature), "dev-{number} {s:?}");
                assert!((0.0..=100.0).contains(&s.humidity), "dev-{number} {s:?}");
                assert!((950.0..=1070.0).contains(&s.pressure), "dev-{number} {s:?}");
                let hour = (ts - START) % (24 * 60 * MINUTE) / (60 * MINUTE);
                if (13..=17).contains(&hour) {
                    afternoon = (afternoon.0 + s.temperature, afternoon.1 + 1);
                } else if (2..=6).contains(&hour) {
                    night = (night.0 + s.temperature, night.1 + 1);
                }
                humidity_sum += s.humidity;
                n += 1;
                ts += MINUTE;
            }
            let (afternoon, night) = (afternoon.0 / afternoon.1 as f64, night.0 / night.1 as f64);
            assert!(afternoon > night + 2.0, "dev-{number}: afternoon {afternoon:.2} vs night {night:.2}");
            let humidity = humidity_sum / n as f64;
            assert!((25.0..=75.0).contains(&humidity), "dev-{number}: mean humidity {humidity:.1}");
        }
    }

    #[test]
    fn readings_keep_the_sensor_resolution_in_the_payload() {
        let mut device = Device::new(1, 5);
        let payload = device.payload(START, Format::Multi);
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        let temperature = v["temperature"].as_f64().unwrap();
        assert_eq!((temperature * 100.0).round() / 100.0, temperature);
        assert_eq!(v["ts"].as_i64(), Some(START));
    }
}
