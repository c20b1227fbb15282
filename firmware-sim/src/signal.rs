//! Signal models: what a sensor measures at a given moment.
//!
//! A reading is a daily cycle, plus a slow drift, plus noise, plus a rare spike, clamped to the
//! sensor's range:
//!
//! ```text
//! value(t) = offset + amplitude · cos(2π · (hour(t) − peak_hour) / 24) + drift(t) + noise
//! ```
//!
//! The drift is an Ornstein–Uhlenbeck process (a random walk pulled back towards zero), so it wanders
//! like weather over hours and days but never runs away in a long simulation. Only `core` and `libm`:
//! this runs on firmware.

use core::f64::consts::PI;

use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoroshiro128PlusPlus;

const MS_PER_HOUR: f64 = 3_600_000.0;
const MS_PER_DAY: i64 = 86_400_000;

/// What a device measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Temperature,
    Humidity,
    Pressure,
}

impl Quantity {
    pub const ALL: [Quantity; 3] = [Quantity::Temperature, Quantity::Humidity, Quantity::Pressure];

    /// The field name in MQTT payloads and the suffix of the sensor id (`dev-3/temperature`).
    pub const fn name(self) -> &'static str {
        match self {
            Quantity::Temperature => "temperature",
            Quantity::Humidity => "humidity",
            Quantity::Pressure => "pressure",
        }
    }

    pub const fn unit(self) -> &'static str {
        match self {
            Quantity::Temperature => "°C",
            Quantity::Humidity => "%",
            Quantity::Pressure => "hPa",
        }
    }

    /// Decimals a real sensor reports (a BME280-class part: 0.01 °C, 0.1 %, 0.1 hPa).
    pub const fn decimals(self) -> u32 {
        match self {
            Quantity::Temperature => 2,
            Quantity::Humidity | Quantity::Pressure => 1,
        }
    }

    pub const fn profile(self) -> &'static Profile {
        match self {
            Quantity::Temperature => &TEMPERATURE,
            Quantity::Humidity => &HUMIDITY,
            Quantity::Pressure => &PRESSURE,
        }
    }
}

/// How one quantity behaves, for a typical device; each device varies it by the `*_spread` fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Daily mean.
    pub offset: f64,
    /// A device's mean lies uniformly within `offset ± offset_spread` (a warmer room, a higher site).
    pub offset_spread: f64,
    /// Half the day–night swing.
    pub amplitude: f64,
    pub amplitude_spread: f64,
    /// Hour of the day (UTC) at which the cycle peaks.
    pub peak_hour: f64,
    pub peak_spread_hours: f64,
    /// Standard deviation of the per-reading noise.
    pub noise_sd: f64,
    /// Long-run standard deviation of the drift.
    pub drift_sd: f64,
    /// Correlation time of the drift: how long a warm spell or a low-pressure system lasts.
    pub drift_hours: f64,
    /// Chance per reading of a spike (a door opened, a sensor glitch), and its typical size.
    pub spike_chance: f64,
    pub spike_size: f64,
    /// The sensor's measuring range: readings never leave it.
    pub min: f64,
    pub max: f64,
}

pub const TEMPERATURE: Profile = Profile {
    offset: 18.0,
    offset_spread: 4.0,
    amplitude: 4.0,
    amplitude_spread: 1.5,
    peak_hour: 15.0,
    peak_spread_hours: 1.5,
    noise_sd: 0.05,
    drift_sd: 1.5,
    drift_hours: 12.0,
    spike_chance: 2e-4,
    spike_size: 4.0,
    min: -40.0,
    max: 85.0,
};

/// Relative humidity runs against temperature: highest before dawn.
pub const HUMIDITY: Profile = Profile {
    offset: 50.0,
    offset_spread: 10.0,
    amplitude: 10.0,
    amplitude_spread: 3.0,
    peak_hour: 5.0,
    peak_spread_hours: 1.5,
    noise_sd: 0.3,
    drift_sd: 5.0,
    drift_hours: 12.0,
    spike_chance: 1e-4,
    spike_size: 8.0,
    min: 0.0,
    max: 100.0,
};

/// Pressure: a small daily tide on top of slow weather systems.
pub const PRESSURE: Profile = Profile {
    offset: 1013.25,
    offset_spread: 3.0,
    amplitude: 0.8,
    amplitude_spread: 0.3,
    peak_hour: 10.0,
    peak_spread_hours: 1.0,
    noise_sd: 0.05,
    drift_sd: 8.0,
    drift_hours: 48.0,
    spike_chance: 0.0,
    spike_size: 0.0,
    min: 870.0,
    max: 1085.0,
};

/// A device's source of randomness: a small seeded PRNG (16 bytes of state) and a Box–Muller
/// gaussian that keeps its second value.
#[derive(Debug, Clone)]
pub struct Noise {
    rng: Xoroshiro128PlusPlus,
    spare: Option<f64>,
}

impl Noise {
    pub fn new(seed: u64) -> Self {
        Noise { rng: Xoroshiro128PlusPlus::seed_from_u64(seed), spare: None }
    }

    /// Uniform in [0, 1), with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [-1, 1).
    pub fn symmetric(&mut self) -> f64 {
        2.0 * self.uniform() - 1.0
    }

    /// Standard normal.
    pub fn gaussian(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let radius = libm::sqrt(-2.0 * libm::log(1.0 - self.uniform()));
        let angle = 2.0 * PI * self.uniform();
        self.spare = Some(radius * libm::sin(angle));
        radius * libm::cos(angle)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
}

/// One quantity of one device: its own mean, swing and phase, and its drift so far.
#[derive(Debug, Clone)]
pub struct Signal {
    quantity: Quantity,
    offset: f64,
    amplitude: f64,
    peak_hour: f64,
    drift: f64,
    last_ts: Option<i64>,
}

impl Signal {
    /// A signal whose parameters are drawn from the quantity's profile; the drift starts from its
    /// long-run distribution, so a fresh device is not special.
    pub fn new(quantity: Quantity, noise: &mut Noise) -> Self {
        let p = quantity.profile();
        Signal {
            quantity,
            offset: p.offset + p.offset_spread * noise.symmetric(),
            amplitude: p.amplitude + p.amplitude_spread * noise.symmetric(),
            peak_hour: p.peak_hour + p.peak_spread_hours * noise.symmetric(),
            drift: p.drift_sd * noise.gaussian(),
            last_ts: None,
        }
    }

    pub fn quantity(&self) -> Quantity {
        self.quantity
    }

    /// The daily cycle alone at `ts_ms` (Unix ms): no drift, no noise.
    pub fn cycle(&self, ts_ms: i64) -> f64 {
        let hour = ts_ms.rem_euclid(MS_PER_DAY) as f64 / MS_PER_HOUR;
        self.offset + self.amplitude * libm::cos(2.0 * PI * (hour - self.peak_hour) / 24.0)
    }

    /// A reading at `ts_ms`. Readings are meant to come in time order; a clock that steps back
    /// leaves the drift where it is.
    pub fn sample(&mut self, ts_ms: i64, noise: &mut Noise) -> f64 {
        let p = self.quantity.profile();
        if let Some(last) = self.last_ts {
            let dt_hours = (ts_ms - last) as f64 / MS_PER_HOUR;
            if dt_hours > 0.0 {
                // Exact OU step: the variance stays drift_sd² however the readings are spaced,
                // from microseconds (--interval 0) to hours.
                let decay = libm::exp(-dt_hours / p.drift_hours);
                let step_sd = p.drift_sd * libm::sqrt(-libm::expm1(-2.0 * dt_hours / p.drift_hours));
                self.drift = self.drift * decay + step_sd * noise.gaussian();
            }
        }
        if self.last_ts.is_none_or(|last| ts_ms > last) {
            self.last_ts = Some(ts_ms);
        }
        let mut value = self.cycle(ts_ms) + self.drift + p.noise_sd * noise.gaussian();
        if p.spike_chance > 0.0 && noise.uniform() < p.spike_chance {
            value += p.spike_size * (0.5 + noise.uniform()) * if noise.uniform() < 0.5 { -1.0 } else { 1.0 };
        }
        value.clamp(p.min, p.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_noise_has_zero_mean_and_unit_variance() {
        let mut noise = Noise::new(7);
        let n = 100_000;
        let (mut sum, mut sum_sq) = (0.0, 0.0);
        for _ in 0..n {
            let z = noise.gaussian();
            sum += z;
            sum_sq += z * z;
        }
        let mean = sum / n as f64;
        let var = sum_sq / n as f64 - mean * mean;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn the_daily_cycle_peaks_at_the_peak_hour() {
        let mut noise = Noise::new(1);
        let signal = Signal::new(Quantity::Temperature, &mut noise);
        let day = 1_764_028_800_000; // 2025-11-25T00:00:00Z
        let at = |h: f64| signal.cycle(day + (h * MS_PER_HOUR) as i64);
        let peak = at(signal.peak_hour);
        assert!((peak - (signal.offset + signal.amplitude)).abs() < 1e-9);
        assert!((at(signal.peak_hour + 12.0) - (signal.offset - signal.amplitude)).abs() < 1e-9);
    }

    #[test]
    fn drift_does_not_depend_on_how_often_a_device_samples() {
        // The drift's spread after a day should be the same whether it was stepped every second or
        // every hour (it is the OU process's stationary spread either way).
        let spread = |step_ms: i64| {
            let mut noise = Noise::new(3);
            let (mut sum_sq, n) = (0.0, 400);
            for _ in 0..n {
                let mut s = Signal::new(Quantity::Pressure, &mut noise);
                s.drift = 0.0;
                let mut ts = 1_764_000_000_000;
                s.sample(ts, &mut noise);
                let end = ts + 24 * 3_600_000;
                while ts < end {
                    ts += step_ms;
                    s.sample(ts, &mut noise);
                }
                sum_sq += s.drift * s.drift;
            }
            libm::sqrt(sum_sq / n as f64)
        };
        let (fine, coarse) = (spread(60_000), spread(3_600_000));
        // Expected: 8 · sqrt(1 − e^(−2·24/48)) ≈ 6.3 hPa.
        assert!((fine - 6.3).abs() < 1.0, "{fine}");
        assert!((coarse - 6.3).abs() < 1.0, "{coarse}");
    }
}
