//! A mergeable quantile sketch: exact values while a window holds few readings, then
//! DDSketch's logarithmic buckets (Masson, Rim, Lee, VLDB 2019).
//!
//! Why not a crate: `sketches-ddsketch` keeps a dense store with no access to its bins, which
//! costs kilobytes per window in the store; windows here are mostly tiny (1.4 readings per
//! sensor-minute is typical), so the sketch stores exact values up to [`EXACT_MAX`] and sparse
//! buckets beyond, in a few bytes per occupied bucket. Bucket counts add exactly, so merging in
//! any grouping gives the same sketch bit for bit.
//!
//! Accuracy: a bucketed quantile is within [`RELATIVE_ACCURACY`] (0.5 %) of a value of the true
//! quantile's bucket; on the distributions sensors produce that is well under 1 % rank error
//! (tested below on skewed and narrow data).

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// Readings kept exactly before a window switches to buckets.
pub const EXACT_MAX: usize = 16;
/// Values an exact sketch holds without a heap allocation.
pub const INLINE: usize = 4;
/// DDSketch's α: a returned quantile is within this relative distance of the bucket's values.
pub const RELATIVE_ACCURACY: f64 = 0.005;
/// Magnitudes below this share the zero bucket (their logarithm would leave the key range).
const MIN_INDEXABLE: f64 = 1e-300;

/// γ = (1 + α) / (1 - α) and 1 / ln γ, computed once.
fn gamma() -> (f64, f64) {
    let g = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);
    (g, 1.0 / g.ln())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Sketch {
    /// Every value, in the order added (inline up to [`INLINE`]: most windows hold a few).
    Exact(SmallVec<[f64; INLINE]>),
    /// Bucket counts: keys ascending, for positive values and for the magnitudes of negative ones.
    /// Boxed: most windows stay exact, and a window's size is what memory is made of.
    Buckets(Box<Buckets>),
}

/// Bucket counts: keys ascending, for positive values and for the magnitudes of negative ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Buckets {
    zero: u64,
    pos: Vec<(i32, u64)>,
    neg: Vec<(i32, u64)>,
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch::Exact(SmallVec::new())
    }
}

impl Sketch {
    pub fn of(value: f64) -> Sketch {
        Sketch::Exact(smallvec::smallvec![value])
    }

    pub fn add(&mut self, value: f64) {
        match self {
            Sketch::Exact(values) if values.len() < EXACT_MAX => values.push(value),
            Sketch::Exact(_) => {
                self.switch_to_buckets();
                self.add(value);
            }
            Sketch::Buckets(b) => add_switch_to_buckets(&mut b.zero, &mut b.pos, &mut b.neg, value, 1),
        }
    }

    /// Adds `other`'s readings to this sketch.
    pub fn merge(&mut self, other: &Sketch) {
        match (&mut *self, other) {
            (Sketch::Exact(a), Sketch::Exact(b)) if a.len() + b.len() <= EXACT_MAX => a.extend_from_slice(b),
            (Sketch::Exact(_), _) => {
                self.switch_to_buckets();
                self.merge(other);
            }
            (Sketch::Buckets(a), Sketch::Exact(b)) => {
                let Buckets { zero, pos, neg } = &mut **a;
                for v in b {
                    add_switch_to_buckets(zero, pos, neg, *v, 1);
                }
            }
            (Sketch::Buckets(a), Sketch::Buckets(b)) => {
                let (Buckets { zero, pos, neg }, Buckets { zero: z2, pos: p2, neg: n2 }) = (&mut **a, &**b);
                *zero += z2;
                merge_keys(pos, p2);
                merge_keys(neg, n2);
            }
        }
    }

    fn switch_to_buckets(&mut self) {
        if let Sketch::Exact(values) = self {
            let (mut zero, mut pos, mut neg) = (0, Vec::new(), Vec::new());
            for v in values.iter() {
                add_switch_to_buckets(&mut zero, &mut pos, &mut neg, *v, 1);
            }
            *self = Sketch::Buckets(Box::new(Buckets { zero, pos, neg }));
        }
    }

    /// Bytes the sketch holds on the heap (values that spilled, buckets).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Sketch::Exact(values) if values.spilled() => values.capacity() * std::mem::size_of::<f64>(),
            Sketch::Exact(_) => 0,
            Sketch::Buckets(b) => {
                std::mem::size_of::<Buckets>()
                    + (b.pos.capacity() + b.neg.capacity()) * std::mem::size_of::<(i32, u64)>()
            }
        }
    }

    pub fn count(&self) -> u64 {
        match self {
            Sketch::Exact(values) => values.len() as u64,
            Sketch::Buckets(b) => {
                let Buckets { zero, pos, neg } = &**b;
                zero + pos.iter().map(|(_, c)| c).sum::<u64>() + neg.iter().map(|(_, c)| c).sum::<u64>()
            }
        }
    }

    /// The `q`-quantile (0 ≤ q ≤ 1), the value of rank ⌈q·n⌉ (1-based) in sorted order (exact while
    /// the sketch holds values, within [`RELATIVE_ACCURACY`] after). `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantiles([q]).map(|[v]| v)
    }

    /// Several quantiles at once: exact values are sorted once for all of them (a window list
    /// asks three of every window). `None` when empty or any `q` is outside 0..=1.
    pub fn quantiles<const N: usize>(&self, qs: [f64; N]) -> Option<[f64; N]> {
        let n = self.count();
        if n == 0 || qs.iter().any(|q| !(0.0..=1.0).contains(q)) {
            return None;
        }
        // Nearest rank, as SQL's percentile_disc: the first value with at least a fraction q of
        // the values at or below it (the p99 of two values is the larger one). The epsilon keeps
        // q·n = 95.000000000000001 from rounding up a whole rank.
        let rank = |q: f64| ((q * n as f64 - 1e-9).ceil().max(1.0) as u64 - 1).min(n - 1);
        match self {
            // Most windows of a sparse sensor hold one reading.
            Sketch::Exact(values) if values.len() == 1 => Some([values[0]; N]),
            Sketch::Exact(values) => {
                // On the stack while the window holds few values, as most do.
                let mut sorted: SmallVec<[f64; EXACT_MAX]> = values.iter().copied().collect();
                sorted.sort_unstable_by(f64::total_cmp);
                let mut out = [0.0; N];
                for (o, q) in out.iter_mut().zip(qs) {
                    *o = *sorted.get(rank(q) as usize)?;
                }
                Some(out)
            }
            Sketch::Buckets(b) => {
                let mut out = [0.0; N];
                for (o, q) in out.iter_mut().zip(qs) {
                    *o = b.quantile(rank(q))?;
                }
                Some(out)
            }
        }
    }
}

impl Buckets {
    /// The value of rank `rank` (below the total count).
    fn quantile(&self, rank: u64) -> Option<f64> {
        let Buckets { zero, pos, neg } = self;
        let (g, inv_ln_gamma) = gamma();
        // The bucket (γ^(k-1), γ^k] is represented by 2γ^k/(γ+1), written so that the
        // top bucket of f64::MAX stays finite.
        let value_of = |key: i32| (((f64::from(key) - 1.0) / inv_ln_gamma).exp() * (2.0 * g / (g + 1.0))).min(f64::MAX);
        let mut seen = 0u64;
        // Ascending values: negatives from the largest magnitude down, zero, positives up.
        for (key, count) in neg.iter().rev() {
            seen += count;
            if seen > rank {
                return Some(-value_of(*key));
            }
        }
        seen += zero;
        if seen > rank {
            return Some(0.0);
        }
        for (key, count) in pos {
            seen += count;
            if seen > rank {
                return Some(value_of(*key));
            }
        }
        pos.last().map(|(key, _)| value_of(*key))
    }
}

fn key_of(magnitude: f64) -> i32 {
    let (_, inv_ln_gamma) = gamma();
    let x = magnitude.ln() * inv_ln_gamma;
    // `x.ceil()`: a library call on x86-64 without SSE4.1, a tenth of a busy window's fold. Keys
    // of indexable magnitudes (1e-300 ..= f64::MAX) are within ±75,000, where truncating and
    // stepping up is exact (and the same as `ceil` on infinities and NaN).
    let truncated = x as i32;
    if f64::from(truncated) < x { truncated.saturating_add(1) } else { truncated }
}

fn add_switch_to_buckets(zero: &mut u64, pos: &mut Vec<(i32, u64)>, neg: &mut Vec<(i32, u64)>, value: f64, count: u64) {
    if value.abs() < MIN_INDEXABLE || !value.is_finite() {
        *zero += count;
    } else if value > 0.0 {
        add_key(pos, key_of(value), count);
    } else {
        add_key(neg, key_of(-value), count);
    }
}

fn add_key(keys: &mut Vec<(i32, u64)>, key: i32, count: u64) {
    match keys.binary_search_by_key(&key, |(k, _)| *k) {
        Ok(i) => keys[i].1 += count,
        Err(i) => keys.insert(i, (key, count)),
    }
}

fn merge_keys(into: &mut Vec<(i32, u64)>, from: &[(i32, u64)]) {
    for (key, count) in from {
        add_key(into, *key, *count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// |rank(estimate) − q| over the sorted data, as a fraction.
    fn rank_error(sorted: &[f64], q: f64, estimate: f64) -> f64 {
        let below = sorted.partition_point(|v| *v < estimate);
        let upto = sorted.partition_point(|v| *v <= estimate);
        let n = sorted.len() as f64;
        let target = (q * n).ceil().max(1.0) - 1.0;
        // The estimate's rank is any position among values equal to it.
        if (below as f64) <= target && target <= upto as f64 {
            0.0
        } else {
            ((below as f64 - target).abs()).min((upto as f64 - target).abs()) / n
        }
    }

    /// A deterministic pseudo-random stream in (0, 1).
    fn uniform(seed: u64) -> impl FnMut() -> f64 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
    }

    #[test]
    fn rank_error_stays_under_one_percent_on_skewed_and_narrow_data() {
        let mut u = uniform(7);
        let normal = |u: &mut dyn FnMut() -> f64| (-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos();
        let sets: Vec<(&str, Vec<f64>)> = vec![
            ("lognormal", (0..50_000).map(|_| normal(&mut u).exp()).collect()),
            ("exponential", (0..50_000).map(|_| -u().ln()).collect()),
            ("pareto", (0..50_000).map(|_| u().powf(-0.5)).collect()),
            ("normal around 20", (0..50_000).map(|_| 20.0 + 5.0 * normal(&mut u)).collect()),
            ("mixed signs", (0..50_000).map(|_| 100.0 * normal(&mut u)).collect()),
        ];
        for (name, data) in sets {
            // Built in pieces and merged, as coarser windows are.
            let mut sketch = Sketch::default();
            for chunk in data.chunks(777) {
                let mut part = Sketch::default();
                for v in chunk {
                    part.add(*v);
                }
                sketch.merge(&part);
            }
            assert_eq!(sketch.count(), data.len() as u64);
            let mut sorted = data.clone();
            sorted.sort_by(f64::total_cmp);
            for q in [0.01, 0.25, 0.5, 0.95, 0.99] {
                let estimate = sketch.quantile(q).unwrap();
                let error = rank_error(&sorted, q, estimate);
                assert!(error <= 0.01, "{name} p{}: rank error {:.3} %", q * 100.0, error * 100.0);
            }
        }
    }

    #[test]
    fn small_windows_are_exact() {
        let mut s = Sketch::default();
        for v in [5.0, 1.0, 4.0, 2.0, 3.0] {
            s.add(v);
        }
        assert_eq!(s.quantile(0.0), Some(1.0));
        assert_eq!(s.quantile(0.5), Some(3.0));
        assert_eq!(s.quantile(1.0), Some(5.0));
        assert_eq!(Sketch::default().quantile(0.5), None);
    }

    #[test]
    fn quantiles_at_once_equal_quantiles_one_by_one() {
        let qs = [0.0, 0.5, 0.95, 0.99, 1.0];
        let mut s = Sketch::default();
        for i in 0..300 {
            s.add(((i * 37) % 101) as f64 - 50.0);
            let each = qs.map(|q| s.quantile(q).unwrap());
            assert_eq!(s.quantiles(qs), Some(each), "after {} values ({:?})", i + 1, matches!(s, Sketch::Exact(_)));
        }
        assert!(matches!(s, Sketch::Buckets(_)), "the test covers both kinds");
        assert_eq!(s.quantiles([0.5, 1.5]), None);
        assert_eq!(Sketch::default().quantiles([0.5]), None);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let of = |values: &[f64]| {
            let mut s = Sketch::default();
            values.iter().for_each(|v| s.add(*v));
            s.quantiles([0.0, 0.5, 0.95, 0.99, 1.0]).unwrap()
        };
        assert_eq!(of(&[12.0]), [12.0; 5]);
        // A window of two readings: its p95 and p99 are the larger one, not the smaller.
        assert_eq!(of(&[20.0, 12.0]), [12.0, 12.0, 20.0, 20.0, 20.0]);
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(of(&ten), [1.0, 5.0, 10.0, 10.0, 10.0]);
    }

    #[test]
    fn merging_in_any_grouping_gives_the_same_buckets() {
        let values: Vec<f64> = (0..200).map(|i| ((i * 37) % 101) as f64 - 50.0 + 0.25).collect();
        let mut whole = Sketch::default();
        values.iter().for_each(|v| whole.add(*v));
        let mut pieces = Sketch::default();
        for chunk in values.chunks(13).rev() {
            let mut part = Sketch::default();
            chunk.iter().for_each(|v| part.add(*v));
            pieces.merge(&part);
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn keys_are_the_ceiling_of_the_scaled_logarithm() {
        let (_, inv_ln_gamma) = gamma();
        let mut u = uniform(11);
        let edges =
            [MIN_INDEXABLE, f64::MIN_POSITIVE, 1e-10, 0.5, 1.0, 1.0 + f64::EPSILON, 2.0, 20.0, 1e10, 1e300, f64::MAX];
        let exact_keys = (-70_000..70_000).step_by(997).map(|k| (f64::from(k) / inv_ln_gamma).exp());
        let random = (0..100_000).map(|_| (u() * 1400.0 - 690.0).exp());
        for m in edges.into_iter().chain(exact_keys).chain(random).chain([f64::INFINITY, f64::NAN]) {
            assert_eq!(key_of(m), (m.ln() * inv_ln_gamma).ceil() as i32, "{m:e}");
        }
    }

    #[test]
    fn extreme_values_have_buckets() {
        let mut s = Sketch::default();
        for v in [f64::MAX, -f64::MAX, f64::MIN_POSITIVE, 0.0, -0.0, 5e-324] {
            for _ in 0..5 {
                s.add(v);
            }
        }
        assert_eq!(s.count(), 30);
        let top = s.quantile(1.0).unwrap();
        assert!(top.is_finite() && top > 1e307, "{top}");
        let bottom = s.quantile(0.0).unwrap();
        assert!(bottom.is_finite() && bottom < -1e307, "{bottom}");
    }
}
