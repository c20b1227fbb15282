//! What a window knows of its readings: count, min, max, mean, standard deviation, first and last
//! by event time, and a quantile [`Sketch`]. Finite for any finite inputs, and mergeable.
//!
//! Mean and variance use Welford's update (Chan et al. to merge) on values scaled by a power of
//! two that bounds them, `2^scale`: scaling by a power of two is exact, every intermediate stays
//! within a few units, so `1e308` and `-1e308` in one window give mean 0 rather than inf − inf.
//! A plain sum would overflow; a documented value range would reject real data.
//!
//! Determinism: the processor adds readings to a window in log order, continuing from the stored
//! state, so the same log gives the same bits whatever the step sizes and restarts. Merging is
//! only used to answer queries (coarser sizes, ranges).

use serde::{Deserialize, Serialize};

use super::sketch::Sketch;

/// Count, extremes, moments, first/last and a quantile sketch of a set of readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    /// Running mean, always within [min, max].
    mean: f64,
    /// Σ (x − mean)² / 4^scale.
    m2_scaled: f64,
    /// Every value seen so far has |x| < 2^(scale+1).
    scale: i32,
    /// (event time, value) of the earliest reading; ties go to the one first in the log.
    pub first: (i64, f64),
    /// (event time, value) of the latest reading; ties go to the one last in the log.
    pub last: (i64, f64),
    pub sketch: Sketch,
}

/// The binary exponent of |x| (x = m·2^e, 1 ≤ m < 2); subnormals and zero count as the
/// smallest normal exponent, so scaling never divides by less than 2^-1022.
fn exponent(x: f64) -> i32 {
    let biased = ((x.to_bits() >> 52) & 0x7ff) as i32;
    biased.max(1) - 1023
}

/// 2^e for e in [-1074, 1023], exactly.
fn pow2(e: i32) -> f64 {
    if e >= -1022 { f64::from_bits(((e + 1023) as u64) << 52) } else { f64::from_bits(1u64 << (e + 1074)) }
}

impl Stats {
    pub fn of(ts: i64, value: f64) -> Stats {
        Stats {
            count: 1,
            min: value,
            max: value,
            mean: value,
            m2_scaled: 0.0,
            scale: exponent(value),
            first: (ts, value),
            last: (ts, value),
            sketch: Sketch::of(value),
        }
    }

    /// Adds a reading that comes after every reading already added (log order).
    pub fn add(&mut self, ts: i64, value: f64) {
        self.raise_scale(exponent(value));
        let down = pow2(-self.scale);
        let n = self.count + 1;
        let y = value * down;
        let old = self.mean * down;
        let delta = y - old;
        let new = old + delta / n as f64;
        self.m2_scaled += delta * (y - new);
        self.count = n;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.mean = (new * pow2(self.scale)).clamp(self.min, self.max);
        if ts < self.first.0 {
            self.first = (ts, value);
        }
        if ts >= self.last.0 {
            self.last = (ts, value);
        }
        self.sketch.add(value);
    }

    /// Adds `other`'s readings, which come after this one's in the log.
    pub fn merge(&mut self, other: &Stats) {
        self.raise_scale(other.scale);
        let mut other_m2 = other.m2_scaled;
        if other.scale < self.scale {
            other_m2 *= pow2(2 * (other.scale - self.scale).max(-537));
        }
        let down = pow2(-self.scale);
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let (ya, yb) = (self.mean * down, other.mean * down);
        let delta = yb - ya;
        let mean = ya + delta * (nb / n);
        self.m2_scaled += other_m2 + delta * delta * (na * (nb / n));
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.mean = (mean * pow2(self.scale)).clamp(self.min, self.max);
        if other.first.0 < self.first.0 {
            self.first = other.first;
        }
        if other.last.0 >= self.last.0 {
            self.last = other.last;
        }
        self.sketch.merge(&other.sketch);
    }

    fn raise_scale(&mut self, to: i32) {
        if to > self.scale {
            // Exact unless the scaled moment underflows, which only loses what is negligible
            // next to the new, far larger values.
            self.m2_scaled *= pow2(2 * (self.scale - to).max(-537));
            self.scale = to;
        }
    }

    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Population standard deviation; never more than the largest magnitude seen.
    pub fn stddev(&self) -> f64 {
        let scaled = (self.m2_scaled / self.count as f64).max(0.0).sqrt();
        let bound = self.min.abs().max(self.max.abs());
        let std = scaled * pow2(self.scale.min(1023));
        if std.is_finite() { std.min(bound) } else { bound }
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.quantile(q).map(|v| v.clamp(self.min, self.max))
    }

    /// Several quantiles at once (see [`Sketch::quantiles`]).
    pub fn quantiles<const N: usize>(&self, qs: [f64; N]) -> Option<[f64; N]> {
        self.sketch.quantiles(qs).map(|vs| vs.map(|v| v.clamp(self.min, self.max)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(values: &[f64]) -> Stats {
        let mut s = Stats::of(0, values[0]);
        for (i, v) in values.iter().enumerate().skip(1) {
            s.add(i as i64, *v);
        }
        s
    }

    #[test]
    fn opposite_extremes_have_a_finite_mean_and_deviation() {
        let s = fold(&[1e308, 1e308, -1e308, -1e308]);
        assert_eq!(s.mean(), 0.0);
        assert!((s.stddev() - 1e308).abs() / 1e308 < 1e-12, "{}", s.stddev());
        let s = fold(&[f64::MAX, -f64::MAX, f64::MAX]);
        assert!(s.mean().is_finite() && s.stddev().is_finite());
        assert!((s.mean() - f64::MAX / 3.0).abs() / f64::MAX < 1e-12, "{}", s.mean());
        let s = fold(&[f64::MAX, f64::MAX]);
        assert_eq!((s.mean(), s.stddev()), (f64::MAX, 0.0));
    }

    #[test]
    fn ordinary_data_matches_exact_arithmetic() {
        let values: Vec<f64> = (0..1000).map(|i| 20.0 + ((i * 7919) % 1000) as f64 / 100.0).collect();
        let s = fold(&values);
        let mean = values.iter().sum::<f64>() / 1000.0;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 1000.0;
        assert!((s.mean() - mean).abs() <= 1e-12 * mean, "{} vs {mean}", s.mean());
        assert!((s.stddev() - var.sqrt()).abs() <= 1e-9 * var.sqrt());
        let max = values.iter().copied().fold(f64::MIN, f64::max);
        assert_eq!((s.min, s.max, s.count), (20.0, max, 1000));
    }

    #[test]
    fn merged_pieces_agree_with_the_fold() {
        let values: Vec<f64> = (0..500).map(|i| ((i * 31) % 97) as f64 * 1.5e200 - 7e201).collect();
        let whole = fold(&values);
        let mut merged = fold(&values[..123]);
        merged.merge(&fold(&values[123..400]));
        merged.merge(&fold(&values[400..]));
        assert_eq!((merged.count, merged.min, merged.max), (whole.count, whole.min, whole.max));
        assert!((merged.mean() - whole.mean()).abs() <= 1e-12 * whole.mean().abs());
        assert!((merged.stddev() - whole.stddev()).abs() <= 1e-9 * whole.stddev());
        assert_eq!(merged.sketch.count(), 500);
    }

    #[test]
    fn first_and_last_follow_event_time_with_log_order_on_ties() {
        let mut s = Stats::of(100, 1.0);
        s.add(50, 2.0);
        s.add(150, 3.0);
        s.add(150, 4.0);
        s.add(50, 5.0);
        assert_eq!((s.first, s.last), ((50, 2.0), (150, 4.0)));
    }

    #[test]
    fn tiny_and_zero_values_do_not_break_the_scale() {
        let s = fold(&[0.0, 5e-324, -5e-324, 0.0]);
        assert_eq!(s.mean(), 0.0);
        assert!(s.stddev().is_finite());
        let s = fold(&[1e-300, 1e300]);
        assert!((s.mean() - 5e299).abs() / 5e299 < 1e-12);
    }
}
