//! Anomaly detection per sensor: a rolling robust z-score (median and MAD of the last readings)
//! or an EWMA model, chosen per sensor glob with `[[anomaly]]`.
//!
//! Each reading is scored against the model *before* it is added, in log order, so the same log
//! gives the same anomalies. A model's state is stored with every commit that changed it, so a
//! restart continues where the last commit left off.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::window::Point;
use crate::store::StoreError;

/// Scores are capped: a reading off a perfectly flat signal would otherwise score infinity.
pub const MAX_SCORE: f64 = 1e9;
/// 1 / Φ⁻¹(3/4): makes the MAD a consistent estimator of the standard deviation.
const MAD_SCALE: f64 = 1.4826;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Median and median absolute deviation of the last `window` readings.
    Mad,
    /// Exponentially weighted mean and variance, α = 2 / (window + 1).
    Ewma,
}

/// One `[[anomaly]]` rule, compiled.
#[derive(Debug, Clone)]
pub struct AnomalyRule {
    pub sensor: globset::GlobMatcher,
    pub model: ModelKind,
    /// A reading whose score exceeds this is an anomaly.
    pub threshold: f64,
    /// Readings a model sees before it scores any.
    pub warmup: u32,
    /// Readings the model looks back over.
    pub window: u32,
}

/// An anomalous reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Anomaly {
    pub offset: u64,
    #[serde(skip)]
    pub series: u32,
    pub ts: i64,
    pub value: f64,
    /// The range the model expected: center ± threshold · spread.
    pub expected_low: f64,
    pub expected_high: f64,
    pub score: f64,
}

/// A model's state, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Model {
    /// The last readings in arrival order (a ring), and how many were ever seen.
    Mad {
        recent: Vec<f64>,
        next: u32,
        seen: u64,
        /// `recent` sorted (by `total_cmp`), kept up to date as readings come and go, so the
        /// median and the MAD cost a walk over half the window instead of two selections over a
        /// copy of it. Not stored: rebuilt from `recent` on load.
        #[serde(skip)]
        sorted: Vec<f64>,
    },
    Ewma {
        mean: f64,
        var: f64,
        seen: u64,
    },
}

impl Model {
    fn new(kind: ModelKind) -> Model {
        match kind {
            ModelKind::Mad => Model::Mad { recent: Vec::new(), next: 0, seen: 0, sorted: Vec::new() },
            ModelKind::Ewma => Model::Ewma { mean: 0.0, var: 0.0, seen: 0 },
        }
    }

    /// (center, spread) of what the model expects, if it has warmed up.
    fn expectation(&self, warmup: u32) -> Option<(f64, f64)> {
        match self {
            Model::Mad { sorted, seen, .. } => {
                if *seen < u64::from(warmup.max(1)) || sorted.is_empty() {
                    return None;
                }
                let median = median_of_sorted(sorted);
                Some((median, mad_of_sorted(sorted, median) * MAD_SCALE))
            }
            Model::Ewma { mean, var, seen } => {
                (*seen >= u64::from(warmup.max(1))).then(|| (*mean, var.max(0.0).sqrt()))
            }
        }
    }

    fn add(&mut self, value: f64, window: u32) {
        match self {
            Model::Mad { recent, next, seen, sorted } => {
                let window = window.max(1) as usize;
                if recent.len() < window {
                    recent.push(value);
                } else {
                    let old = std::mem::replace(&mut recent[*next as usize % window], value);
                    if let Ok(at) = sorted.binary_search_by(|v| v.total_cmp(&old)) {
                        sorted.remove(at);
                    }
                }
                let at = sorted.partition_point(|v| v.total_cmp(&value).is_lt());
                sorted.insert(at, value);
                *next = ((*next as usize + 1) % window) as u32;
                *seen += 1;
            }
            Model::Ewma { mean, var, seen } => {
                if *seen == 0 {
                    *mean = value;
                    *var = 0.0;
                } else {
                    let alpha = 2.0 / (f64::from(window.max(1)) + 1.0);
                    // Halved differences keep ±f64::MAX inputs finite.
                    let half_diff = value / 2.0 - *mean / 2.0;
                    let incr = alpha * half_diff;
                    *mean = (*mean + 2.0 * incr).clamp(-f64::MAX, f64::MAX);
                    let v = (1.0 - alpha) * (*var + alpha * half_diff * half_diff * 4.0);
                    *var = if v.is_finite() { v } else { f64::MAX };
                }
                *seen += 1;
            }
        }
    }
}

impl Model {
    /// Rebuilds what is not stored (after a load).
    fn restore(&mut self) {
        if let Model::Mad { recent, sorted, .. } = self {
            *sorted = recent.clone();
            sorted.sort_by(f64::total_cmp);
        }
    }
}

/// The median of sorted, non-empty `values`: the middle one, or halfway between the middle two.
fn median_of_sorted(values: &[f64]) -> f64 {
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { values[n / 2 - 1] / 2.0 + values[n / 2] / 2.0 }
}

/// The median absolute deviation from `median` of sorted, non-empty `values`. The deviations
/// grow outwards from where `median` sits: two sorted sequences (below it, going down; above
/// it, going up), so the middle deviations are order statistics of two sorted sequences, found
/// by bisection in O(log n) instead of merging half the window for every reading.
fn mad_of_sorted(values: &[f64], median: f64) -> f64 {
    let n = values.len();
    let split = values.partition_point(|v| *v < median);
    let below = |t: usize| deviation(values[split - 1 - t], median);
    let above = |t: usize| deviation(values[split + t], median);
    let kth = |k: usize| kth_of_two(below, split, above, n - split, k);
    if n % 2 == 1 { kth(n / 2) } else { kth(n / 2 - 1) / 2.0 + kth(n / 2) / 2.0 }
}

/// |v − median|, halved first so that ±f64::MAX stay finite.
fn deviation(v: f64, median: f64) -> f64 {
    (v / 2.0 - median / 2.0).abs() * 2.0
}

/// The `k`-th smallest (from 0) of two ascending sequences `a` (length `a_len`) and `b`,
/// `k < a_len + b_len`: bisects how many of the first k + 1 come from `a`.
fn kth_of_two(a: impl Fn(usize) -> f64, a_len: usize, b: impl Fn(usize) -> f64, b_len: usize, k: usize) -> f64 {
    let take = k + 1;
    let (mut lo, mut hi) = (take.saturating_sub(b_len), take.min(a_len));
    while lo < hi {
        let i = (lo + hi) / 2;
        // Taking i from `a` leaves take − i ≥ 1 from `b`; too few from `a` if `b`'s last taken
        // is above `a`'s first left.
        if b(take - i - 1) > a(i) { lo = i + 1 } else { hi = i }
    }
    let (i, j) = (lo, take - lo);
    match (i.checked_sub(1).map(&a), j.checked_sub(1).map(&b)) {
        (Some(x), Some(y)) => x.max(y),
        (Some(x), None) => x,
        (None, Some(y)) => y,
        (None, None) => 0.0,
    }
}

/// Scores `value` against (center, spread): |x − center| / spread, capped.
fn score(value: f64, center: f64, spread: f64) -> f64 {
    let distance = (value / 2.0 - center / 2.0).abs() * 2.0;
    if distance == 0.0 {
        0.0
    } else if spread <= 0.0 || !spread.is_finite() {
        if spread.is_finite() { MAX_SCORE } else { 0.0 }
    } else {
        (distance / spread).min(MAX_SCORE)
    }
}

/// The anomaly operator: a model per sensor that a rule matches.
pub struct AnomalyOperator {
    rules: Vec<AnomalyRule>,
    /// Per series: the index of its rule (`None`: no rule matches), once looked up.
    rule_of: Vec<Option<Option<usize>>>,
    models: rustc_hash::FxHashMap<u32, Model>,
    dirty: rustc_hash::FxHashSet<u32>,
    found: Vec<Anomaly>,
}

impl AnomalyOperator {
    pub fn new(rules: Vec<AnomalyRule>) -> AnomalyOperator {
        AnomalyOperator {
            rules,
            rule_of: Vec::new(),
            models: Default::default(),
            dirty: Default::default(),
            found: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Scores and then learns one reading; returns the anomaly if it is one.
    pub fn add(
        &mut self,
        conn: &Connection,
        name: &str,
        p: &Point,
        offset: u64,
    ) -> Result<Option<&Anomaly>, StoreError> {
        let i = p.series as usize;
        if i >= self.rule_of.len() {
            self.rule_of.resize(i + 1, None);
        }
        let rule_index = match self.rule_of[i] {
            Some(r) => r,
            None => {
                // Derived streams (`_anomaly/...`, `_alert/...`) are never modelled: no feedback loops.
                let r =
                    if name.starts_with('_') { None } else { self.rules.iter().position(|r| r.sensor.is_match(name)) };
                self.rule_of[i] = Some(r);
                r
            }
        };
        let Some(rule_index) = rule_index else { return Ok(None) };
        let rule = &self.rules[rule_index];
        let model = match self.models.entry(p.series) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let stored = load_model(conn, p.series)?.filter(|m| {
                    matches!(
                        (m, rule.model),
                        (Model::Mad { .. }, ModelKind::Mad) | (Model::Ewma { .. }, ModelKind::Ewma)
                    )
                });
                entry.insert(stored.unwrap_or_else(|| Model::new(rule.model)))
            }
        };
        let anomaly = model.expectation(rule.warmup).and_then(|(center, spread)| {
            let s = score(p.value, center, spread);
            (s > rule.threshold).then(|| {
                let reach = (rule.threshold * spread).min(f64::MAX);
                Anomaly {
                    offset,
                    series: p.series,
                    ts: p.ts,
                    value: p.value,
                    expected_low: (center - reach).max(-f64::MAX),
                    expected_high: (center + reach).min(f64::MAX),
                    score: s,
                }
            })
        });
        model.add(p.value, rule.window);
        self.dirty.insert(p.series);
        Ok(match anomaly {
            Some(a) => {
                self.found.push(a);
                self.found.last()
            }
            None => None,
        })
    }

    /// Anomalies found since the last commit.
    pub fn found(&self) -> &[Anomaly] {
        &self.found
    }

    pub fn flush(&self, tx: &Connection) -> Result<(), StoreError> {
        self.to_write().write(tx)
    }

    /// What [`AnomalyOperator::flush`] writes, to write on another thread
    /// ([`super::Pipeline::commit_behind`]).
    pub fn to_write(&self) -> AnomalyRows {
        let models = self
            .dirty
            .iter()
            .filter_map(|series| {
                self.models.get(series).map(|model| (*series, postcard::to_allocvec(model).unwrap_or_default()))
            })
            .collect();
        AnomalyRows { models, found: self.found.clone() }
    }

    pub fn committed(&mut self) {
        self.dirty.clear();
        self.found.clear();
        // Models stay in memory (a few hundred bytes a sensor); a restart reloads them lazily.
    }
}

/// The changed models and the anomalies found since the last commit, encoded.
#[derive(Debug, Default)]
pub struct AnomalyRows {
    models: Vec<(u32, Vec<u8>)>,
    found: Vec<Anomaly>,
}

impl AnomalyRows {
    pub fn write(&self, tx: &Connection) -> Result<(), StoreError> {
        let mut state = tx.prepare_cached("INSERT OR REPLACE INTO anomaly_models (series, data) VALUES (?1, ?2)")?;
        for (series, data) in &self.models {
            state.execute(params![*series as i64, data])?;
        }
        let mut found = tx.prepare_cached(
            "INSERT OR IGNORE INTO anomalies (offset, series, ts, value, expected_low, expected_high, score)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for a in &self.found {
            found.execute(params![
                a.offset as i64,
                a.series as i64,
                a.ts,
                a.value,
                a.expected_low,
                a.expected_high,
                a.score
            ])?;
        }
        Ok(())
    }
}

fn load_model(conn: &Connection, series: u32) -> Result<Option<Model>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT data FROM anomaly_models WHERE series = ?1")?;
    let data: Option<Vec<u8>> = stmt.query_row([series as i64], |r| r.get(0)).optional()?;
    Ok(data.and_then(|d| postcard::from_bytes::<Model>(&d).ok()).map(|mut model| {
        model.restore();
        model
    }))
}

#[cfg(test)]
mod tests {

    /// The merge walk `mad_of_sorted` replaced: the oracle for its bisection.
    fn mad_by_merging(values: &[f64], median: f64) -> f64 {
        let n = values.len();
        let split = values.partition_point(|v| *v < median);
        let (mut below, mut above) = (split, split);
        let (mut previous, mut current) = (0.0, 0.0);
        for _ in 0..=n / 2 {
            previous = current;
            let take_below = match (below.checked_sub(1), above < n) {
                (Some(b), true) => deviation(values[b], median) <= deviation(values[above], median),
                (Some(_), false) => true,
                _ => false,
            };
            if take_below {
                below -= 1;
                current = deviation(values[below], median);
            } else {
                current = deviation(values[above], median);
                above += 1;
            }
        }
        if n % 2 == 1 { current } else { previous / 2.0 + current / 2.0 }
    }

    #[test]
    fn bisected_mad_equals_the_merge_bit_for_bit() {
        let mut state = 11u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        for case in 0..20_000 {
            let n = 1 + (next() % 70) as usize;
            let mut values: Vec<f64> = (0..n)
                .map(|_| match case % 4 {
                    // many ties
                    0 => (next() % 5) as f64,
                    1 => next() as f64 / 1e3 - 1e6,
                    2 => [f64::MAX, -f64::MAX, 0.0, 1e-300][(next() % 4) as usize],
                    _ => 20.0 + (next() % 1000) as f64 / 100.0,
                })
                .collect();
            values.sort_by(f64::total_cmp);
            let median = median_of_sorted(&values);
            let (fast, slow) = (mad_of_sorted(&values, median), mad_by_merging(&values, median));
            assert_eq!(fast.to_bits(), slow.to_bits(), "{values:?}: {fast} vs {slow}");
        }
    }

    use super::*;

    fn rule(model: ModelKind) -> AnomalyRule {
        AnomalyRule { sensor: crate::config::parse_glob("**").unwrap(), model, threshold: 4.0, warmup: 20, window: 60 }
    }

    fn run(op: &mut AnomalyOperator, conn: &Connection, values: &[f64]) -> Vec<(usize, f64)> {
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let p = Point { series: 0, ts: i as i64 * 1000, value: *v, received_at: 0, block: 0 };
            if let Some(a) = op.add(conn, "line1/temp", &p, i as u64).unwrap() {
                out.push((i, a.score));
            }
        }
        out
    }

    fn conn() -> Connection {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_write(&dir.path().join("s.db")).unwrap();
        std::mem::forget(dir);
        conn
    }

    #[test]
    fn a_spike_in_a_noisy_signal_is_found_by_both_models_and_nothing_else() {
        let values: Vec<f64> =
            (0..300).map(|i| if i == 200 { 60.0 } else { 20.0 + ((i * 37) % 11) as f64 * 0.1 }).collect();
        for kind in [ModelKind::Mad, ModelKind::Ewma] {
            let conn = conn();
            let mut op = AnomalyOperator::new(vec![rule(kind)]);
            let found = run(&mut op, &conn, &values);
            assert_eq!(found.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [200], "{kind:?}: {found:?}");
            let a = &op.found()[0];
            assert!(a.expected_low < 20.0 && a.expected_high > 21.0 && a.expected_high < 60.0, "{a:?}");
        }
    }

    #[test]
    fn nothing_is_scored_during_warm_up_and_derived_streams_are_never_modelled() {
        let conn = conn();
        let mut op = AnomalyOperator::new(vec![rule(ModelKind::Mad)]);
        let values: Vec<f64> = (0..19).map(|i| if i == 10 { 1e6 } else { 1.0 }).collect();
        assert!(run(&mut op, &conn, &values).is_empty());
        let p = Point { series: 1, ts: 0, value: 1e9, received_at: 0, block: 0 };
        assert!(op.add(&conn, "_anomaly/line1/temp", &p, 0).unwrap().is_none());
    }

    /// The median as sorting a copy gives it (the reference for the incremental one).
    fn median_by_sorting(values: &[f64]) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        median_of_sorted(&v)
    }

    #[test]
    fn the_incremental_median_and_mad_equal_recomputing_them_bit_for_bit() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let specials = [0.0, -0.0, 1.0, 1.0, f64::MAX, -f64::MAX, 5e-324, 20.5];
        for window in [1u32, 2, 3, 7, 60] {
            let mut model = Model::new(ModelKind::Mad);
            for _ in 0..2_000 {
                let r = next();
                let value = match r % 4 {
                    0 => specials[(r >> 8) as usize % specials.len()],
                    1 => ((r >> 11) % 7) as f64,
                    _ => (r >> 11) as f64 / (1u64 << 40) as f64 - 2000.0,
                };
                model.add(value, window);
                let Model::Mad { recent, sorted, .. } = &model else { unreachable!() };
                let median = median_by_sorting(recent);
                let deviations: Vec<f64> = recent.iter().map(|v| (v / 2.0 - median / 2.0).abs() * 2.0).collect();
                let (center, spread) = model.expectation(1).unwrap();
                assert_eq!(center.to_bits(), median.to_bits(), "window {window}: {recent:?}");
                assert_eq!(spread.to_bits(), (median_by_sorting(&deviations) * MAD_SCALE).to_bits(), "{recent:?}");
                let mut restored = model.clone();
                restored.restore();
                assert_eq!(restored, model);
                assert_eq!(sorted.len(), recent.len());
            }
        }
    }

    #[test]
    fn extreme_values_give_finite_scores_and_ranges() {
        for kind in [ModelKind::Mad, ModelKind::Ewma] {
            let conn = conn();
            let mut op = AnomalyOperator::new(vec![rule(kind)]);
            let values: Vec<f64> = (0..100).map(|i| if i % 2 == 0 { f64::MAX } else { -f64::MAX }).collect();
            run(&mut op, &conn, &values);
            let flat: Vec<f64> = vec![5.0; 50].into_iter().chain([6.0]).collect();
            run(&mut op, &conn, &flat);
            for a in op.found() {
                assert!(
                    a.score.is_finite() && a.expected_low.is_finite() && a.expected_high.is_finite(),
                    "{kind:?} {a:?}"
                );
            }
        }
    }
}
