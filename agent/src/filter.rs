//! Pre-filters at the edge: what they drop never costs a flash write or a byte upstream.
//!
//! `[[filter]]` sections of the agent's TOML each name a sensor glob and any of four filters. A
//! sensor takes the first section whose glob matches its id (later sections are not merged in; a
//! section without filters lets its sensors through untouched, an exception before a `"**"`
//! default). Each reading goes through the section's filters in this order:
//!
//! 1. **range** (`min`, `max`, `action = "drop" | "clamp"`): a value outside `[min, max]` is
//!    dropped or clamped to the bound; a value equal to a bound passes.
//! 2. **spike** (`max_jump`, `max_hold`): a reading is held back until the sensor's next one
//!    arrives, and dropped if it is more than `max_jump` away from both its neighbours in the same
//!    direction (a single reading far outside them; a step or a ramp passes). The first reading
//!    passes unjudged (it has no neighbour before it); a held reading whose next one has not come
//!    within `max_hold` (the agent's clock) goes out unjudged. Neighbours are taken in arrival order.
//! 3. **deadband** (`delta`, `relative`, `max_silence`): a reading passes if it differs from the
//!    last one passed by more than `max(delta, relative x |last|)` (so `delta = 0` drops only exact
//!    repeats), or if `max_silence` has passed since that one by event time (a heartbeat; the agent
//!    does not invent readings, so a sensor that stops sending gets no heartbeat).
//! 4. **downsample** (`interval`, `agg = "last" | "mean" | "min" | "max"`): the readings of one
//!    interval (aligned to the Unix epoch, by event time: `[k x interval, (k + 1) x interval)`) become
//!    one. It goes out when a reading of a later interval arrives, or when no reading has come for
//!    the interval for one `interval` on the agent's clock (checked by [`Filters::tick`]). `last`,
//!    `min` and `max` give the reading they picked, with its own timestamp; `mean` is stamped with
//!    the interval's start.
//!
//! A reading whose timestamp is before one the deadband or downsample stage has already seen for
//! the sensor (a device clock stepped back, a rebooted device) is passed on as it is, the stage's
//! state restarts from it (an open interval is emitted first), and the stage counts it in
//! `tributary_agent_filter_resets_total{reason="clock_backwards"}`: nothing panics, nothing wedges.
//!
//! Held readings (one per spike-filtered sensor, one interval per downsampled sensor) live in memory:
//! [`Filters::finish`] hands them over at a clean stop, a SIGKILL loses them.
//!
//! New rules (SIGHUP) replace the old ones in place, [`Filters::reconfigure`]: a sensor whose rule is
//! the same before and after (the same filters with the same settings, whichever section it comes
//! from) keeps its state; any other sensor first hands over what it holds through its old rule, as
//! at a clean stop, then starts afresh under its new one (its next reading counts as its first).
//! Carrying a deadband's reference or an open interval into different settings would judge readings
//! by rules that never saw them; a held reading must not be lost either way.
//!
//! Per-sensor state is bounded: sensors not heard from for [`IDLE_EVICT`] (agent's clock) and holding
//! nothing are forgotten at the next sweep, and past [`MAX_SENSORS`] sensors a new sensor's readings
//! pass unfiltered (counted in `tributary_agent_filter_state_full_total`) until a sweep makes room.
//! The map is keyed by sensor id with a seeded foldhash: one lookup per reading (42 ns a reading for
//! the deadband filter over 1,000 sensors, `agent/examples/filter_bench.rs`).
//! Validation runs before the filters, so values are finite here; a non-finite one would pass untouched.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Deserializer};

use crate::metrics::Metrics;

/// Most sensors the filters keep state for (about 200 B each, plus the id: 20-30 MB at most).
pub const MAX_SENSORS: usize = 100_000;
/// A sensor not heard from for this long, holding nothing, is forgotten (its next reading counts as
/// its first: it passes every filter but range).
pub const IDLE_EVICT: Duration = Duration::from_secs(3600);
/// How often [`Filters::tick`] looks for idle sensors.
const SWEEP_EVERY_MS: i64 = 60_000;

/// One `[[filter]]` section. Documented in `deploy/agent.toml` and the README.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Sensor id glob: `*` matches within one `/`-separated level, `**` across levels (so `"**"`
    /// matches every sensor), `?`, `[ab]`, `{a,b}`. The first matching section wins. Required.
    pub sensor: SensorGlob,
    /// Range check. Default: none.
    pub range: Option<RangeConfig>,
    /// Spike filter. Default: none.
    pub spike: Option<SpikeConfig>,
    /// Deadband (report by exception). Default: none.
    pub deadband: Option<DeadbandConfig>,
    /// Downsample (at most one reading per interval). Default: none.
    pub downsample: Option<DownsampleConfig>,
}

/// `range = { min = 0.0, max = 100.0, action = "drop" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeConfig {
    /// Lowest value kept. Default: none (no lower bound); at least one of `min`, `max` is required.
    pub min: Option<f64>,
    /// Highest value kept. Default: none (no upper bound).
    pub max: Option<f64>,
    /// `drop` (default) or `clamp` (to the bound crossed).
    #[serde(default)]
    pub action: RangeAction,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RangeAction {
    /// Drop the reading, counted with `reason="below_min"` or `"above_max"`.
    #[default]
    Drop,
    /// Replace the value by the bound it crossed, counted in `tributary_agent_filter_clamped_total`.
    Clamp,
}

/// `spike = { max_jump = 10.0 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpikeConfig {
    /// A reading more than this (absolute, in the sensor's unit) above both its neighbours, or
    /// below both, is a spike and dropped. Required, > 0.
    pub max_jump: f64,
    /// A held reading goes out unjudged when the sensor's next reading has not come within this
    /// (agent's clock). Default 60 s.
    #[serde(default = "default_max_hold", with = "humantime_serde")]
    pub max_hold: Duration,
}

/// `deadband = { delta = 0.5, max_silence = "60s" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadbandConfig {
    /// A reading passes when it differs from the last one passed by more than this (absolute, in
    /// the sensor's unit). Default 0: only exact repeats are dropped.
    #[serde(default)]
    pub delta: f64,
    /// Relative band, a fraction of |last value passed| (0.01 = 1 %); the band is the larger of the
    /// two. Default 0 (off).
    #[serde(default)]
    pub relative: f64,
    /// A reading this long (event time) after the last one passed goes out even if unchanged: a
    /// heartbeat. Default 60 s.
    #[serde(default = "default_max_silence", with = "humantime_serde")]
    pub max_silence: Duration,
}

/// `downsample = { interval = "10s", agg = "mean" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownsampleConfig {
    /// Length of an interval, at least 1 ms. Required.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// `last` (default), `mean`, `min` or `max`.
    #[serde(default)]
    pub agg: Agg,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Agg {
    /// The interval's latest reading by event time (the later arrival on a tie).
    #[default]
    Last,
    /// The mean of the interval's values, stamped with the interval's start.
    Mean,
    /// The lowest reading (the first on a tie).
    Min,
    /// The highest reading (the first on a tie).
    Max,
}

fn default_max_hold() -> Duration {
    Duration::from_secs(60)
}
fn default_max_silence() -> Duration {
    Duration::from_secs(60)
}

/// A compiled sensor glob, with the text it came from.
#[derive(Clone)]
pub struct SensorGlob {
    text: String,
    matcher: globset::GlobMatcher,
}

impl SensorGlob {
    /// The aggregator's glob language (`*` within a level, `**` across), so one pattern means the
    /// same in both configurations.
    pub fn parse(text: &str) -> Result<SensorGlob, String> {
        let matcher = globset::GlobBuilder::new(text)
            .literal_separator(true)
            .build()
            .map(|g| g.compile_matcher())
            .map_err(|e| format!("{text:?} is not a sensor glob: {e}"))?;
        Ok(SensorGlob { text: text.to_string(), matcher })
    }

    pub fn is_match(&self, sensor: &str) -> bool {
        self.matcher.is_match(sensor)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for SensorGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl<'de> Deserialize<'de> for SensorGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SensorGlob, D::Error> {
        let text = String::deserialize(d)?;
        SensorGlob::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Checks `[[filter]]` sections for values serde cannot refuse: the key (as serde names it, e.g.
/// `filter[1].range`) and the reason.
pub fn check(filters: &[FilterConfig]) -> Result<(), (String, String)> {
    for (i, f) in filters.iter().enumerate() {
        let at = |key: &str| format!("filter[{i}].{key}");
        let name = f.sensor.as_str();
        if let Some(r) = &f.range {
            if r.min.is_none() && r.max.is_none() {
                return Err((at("range"), format!("sensor {name:?}: give min, max or both")));
            }
            for (key, v) in [("min", r.min), ("max", r.max)] {
                if v.is_some_and(|v| !v.is_finite()) {
                    return Err((at(&format!("range.{key}")), format!("sensor {name:?}: must be a finite number")));
                }
            }
            if let (Some(min), Some(max)) = (r.min, r.max) {
                if min > max {
                    return Err((at("range"), format!("sensor {name:?}: min {min} is above max {max}")));
                }
            }
        }
        if let Some(s) = &f.spike {
            if !(s.max_jump.is_finite() && s.max_jump > 0.0) {
                return Err((at("spike.max_jump"), format!("sensor {name:?}: must be a number above 0")));
            }
            if s.max_hold.is_zero() {
                return Err((at("spike.max_hold"), format!("sensor {name:?}: must be above 0")));
            }
        }
        if let Some(d) = &f.deadband {
            if !(d.delta.is_finite() && d.delta >= 0.0) {
                return Err((at("deadband.delta"), format!("sensor {name:?}: must be a number, 0 or above")));
            }
            if !(d.relative.is_finite() && d.relative >= 0.0) {
                return Err((at("deadband.relative"), format!("sensor {name:?}: must be a number, 0 or above")));
            }
            if d.max_silence.as_millis() == 0 {
                return Err((at("deadband.max_silence"), format!("sensor {name:?}: must be at least 1ms")));
            }
        }
        if let Some(d) = &f.downsample {
            if d.interval.as_millis() == 0 {
                return Err((at("downsample.interval"), format!("sensor {name:?}: must be at least 1ms")));
            }
        }
    }
    Ok(())
}

/// The counters the filters add to `/metrics`, resolved once (a labelled lookup per reading would
/// cost a lock and a hash on the hot path).
#[derive(Clone)]
pub struct FilterCounters {
    pub below_min: Counter,
    pub above_max: Counter,
    pub clamped: Counter,
    pub spike: Counter,
    pub unchanged: Counter,
    pub heartbeats: Counter,
    pub aggregated: Counter,
    pub deadband_backwards: Counter,
    pub downsample_backwards: Counter,
    pub state_full: Counter,
    pub held: Gauge,
    pub sensors: Gauge,
}

impl FilterCounters {
    pub fn new(m: &Metrics) -> FilterCounters {
        FilterCounters {
            below_min: m.filter_drop_counter("range", "below_min"),
            above_max: m.filter_drop_counter("range", "above_max"),
            clamped: m.filter_clamped.clone(),
            spike: m.filter_drop_counter("spike", "spike"),
            unchanged: m.filter_drop_counter("deadband", "unchanged"),
            heartbeats: m.filter_heartbeats.clone(),
            aggregated: m.filter_drop_counter("downsample", "aggregated"),
            deadband_backwards: m.filter_reset_counter("deadband", "clock_backwards"),
            downsample_backwards: m.filter_reset_counter("downsample", "clock_backwards"),
            state_full: m.filter_state_full.clone(),
            held: m.filter_held_readings.clone(),
            sensors: m.filter_sensors.clone(),
        }
    }
}

/// A section's filters, ready to run.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    range: Option<RangeConfig>,
    spike: Option<(f64, i64)>,
    deadband: Option<(f64, f64, i64)>,
    downsample: Option<(i64, Agg)>,
}

impl Rule {
    fn new(c: &FilterConfig) -> Rule {
        Rule {
            range: c.range.clone(),
            spike: c.spike.as_ref().map(|s| (s.max_jump, millis(s.max_hold))),
            deadband: c.deadband.as_ref().map(|d| (d.delta, d.relative, millis(d.max_silence))),
            downsample: c.downsample.as_ref().map(|d| (millis(d.interval), d.agg)),
        }
    }

    fn is_empty(&self) -> bool {
        self.range.is_none() && self.spike.is_none() && self.deadband.is_none() && self.downsample.is_none()
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Sensors whose glob matched no section (or a section without filters).
const NO_RULE: u32 = u32::MAX;

/// What the filters remember of one sensor.
#[derive(Debug)]
struct SensorState {
    rule: u32,
    /// Agent's clock (ms) of its last reading: for eviction.
    last_arrival_ms: i64,
    /// Spike: the last value that passed the stage, and the reading held for judgement.
    spike_prev: Option<f64>,
    spike_held: Option<Held>,
    /// Deadband: the last reading passed, and the latest timestamp seen.
    deadband_last: Option<(i64, f64)>,
    deadband_seen: i64,
    bucket: Option<Bucket>,
}

impl SensorState {
    fn new(rule: u32, now_ms: i64) -> SensorState {
        SensorState {
            rule,
            last_arrival_ms: now_ms,
            spike_prev: None,
            spike_held: None,
            deadband_last: None,
            deadband_seen: i64::MIN,
            bucket: None,
        }
    }

    fn holds(&self) -> bool {
        self.spike_held.is_some() || self.bucket.is_some()
    }
}

#[derive(Debug, Clone, Copy)]
struct Held {
    ts: i64,
    value: f64,
    since_ms: i64,
}

/// One open downsample interval.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: i64,
    count: u64,
    /// A running mean (a sum of large finite values could overflow).
    mean: f64,
    last: (i64, f64),
    min: (i64, f64),
    max: (i64, f64),
    /// Agent's clock (ms) of the last reading folded in: the timer emits the interval once no
    /// reading has come for it for one interval.
    touched_ms: i64,
}

impl Bucket {
    fn new(start: i64, ts: i64, value: f64, now_ms: i64) -> Bucket {
        Bucket {
            start,
            count: 1,
            mean: value,
            last: (ts, value),
            min: (ts, value),
            max: (ts, value),
            touched_ms: now_ms,
        }
    }

    fn add(&mut self, ts: i64, value: f64, now_ms: i64) {
        self.count += 1;
        let n = self.count as f64;
        // Finite for any finite inputs, unlike mean + (value - mean) / n.
        self.mean = self.mean * ((n - 1.0) / n) + value / n;
        if ts >= self.last.0 {
            self.last = (ts, value);
        }
        if value < self.min.1 {
            self.min = (ts, value);
        }
        if value > self.max.1 {
            self.max = (ts, value);
        }
        self.touched_ms = now_ms;
    }

    fn result(&self, agg: Agg) -> (i64, f64) {
        match agg {
            Agg::Last => self.last,
            Agg::Mean => (self.start, self.mean.clamp(self.min.1, self.max.1)),
            Agg::Min => self.min,
            Agg::Max => self.max,
        }
    }
}

/// The pre-filters of one intake, with their per-sensor state.
pub struct Filters {
    globs: Vec<SensorGlob>,
    rules: Vec<Rule>,
    /// foldhash, seeded per process: a lookup per reading, so SipHash's cost shows; ids come from
    /// outside, so not an unseeded hash either.
    sensors: HashMap<Box<str>, SensorState, foldhash::fast::RandomState>,
    /// Readings held (spike) and open intervals (downsample), for the gauge and to skip idle ticks.
    held: usize,
    last_sweep_ms: i64,
    counters: FilterCounters,
}

impl Filters {
    pub fn new(config: &[FilterConfig], counters: FilterCounters) -> Filters {
        Filters {
            globs: config.iter().map(|c| c.sensor.clone()).collect(),
            rules: config.iter().map(Rule::new).collect(),
            sensors: HashMap::default(),
            held: 0,
            last_sweep_ms: i64::MIN,
            counters,
        }
    }

    /// No section configured: every reading passes untouched.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Readings held back (spike) plus open downsample intervals.
    pub fn held(&self) -> usize {
        self.held
    }

    /// How often [`Filters::tick`] should run: often enough to emit a quiet sensor's interval or
    /// held reading within a tenth of its time, at most every 50 ms; `None` without filters.
    pub fn tick_period(&self) -> Option<Duration> {
        if self.rules.is_empty() {
            return None;
        }
        let shortest = self
            .rules
            .iter()
            .flat_map(|r| [r.spike.map(|s| s.1), r.downsample.map(|d| d.0)])
            .flatten()
            .min()
            .unwrap_or(10_000);
        Some(Duration::from_millis((shortest / 10).clamp(50, 1_000) as u64))
    }

    /// Runs one reading through its sensor's filters; `emit` gets what passes (0, 1 or 2 readings:
    /// an interval closed by this reading, or a held reading released by it, may come out too).
    /// `now_ms` is the agent's clock.
    pub fn apply(&mut self, sensor: &str, ts: i64, value: f64, now_ms: i64, emit: &mut impl FnMut(&str, i64, f64)) {
        if self.rules.is_empty() || !value.is_finite() {
            emit(sensor, ts, value);
            return;
        }
        let Filters { globs, rules, sensors, held, counters, .. } = self;
        let state = match sensors.get_mut(sensor) {
            Some(state) => state,
            None => {
                let rule = rule_of(globs, rules, sensor);
                if sensors.len() >= MAX_SENSORS {
                    if rule != NO_RULE {
                        counters.state_full.inc();
                    }
                    emit(sensor, ts, value);
                    return;
                }
                counters.sensors.set(sensors.len() as i64 + 1);
                sensors.entry(sensor.into()).or_insert(SensorState::new(rule, now_ms))
            }
        };
        if state.rule == NO_RULE {
            emit(sensor, ts, value);
            return;
        }
        state.last_arrival_ms = now_ms;
        let rule = &rules[state.rule as usize];
        let mut value = value;

        if let Some(range) = &rule.range {
            if let Some(min) = range.min.filter(|&min| value < min) {
                if range.action == RangeAction::Drop {
                    counters.below_min.inc();
                    return;
                }
                counters.clamped.inc();
                value = min;
            } else if let Some(max) = range.max.filter(|&max| value > max) {
                if range.action == RangeAction::Drop {
                    counters.above_max.inc();
                    return;
                }
                counters.clamped.inc();
                value = max;
            }
        }

        let (ts, value) = match rule.spike {
            None => (ts, value),
            Some((max_jump, _)) => {
                let Some(prev) = state.spike_prev else {
                    // The first reading: nothing before it to judge it by.
                    state.spike_prev = Some(value);
                    after_spike(rule, state, sensor, ts, value, now_ms, held, counters, emit);
                    return;
                };
                let Some(h) = state.spike_held.replace(Held { ts, value, since_ms: now_ms }) else {
                    *held += 1;
                    counters.held.set(*held as i64);
                    return;
                };
                let (up, down) = (h.value - prev, h.value - value);
                let spike = (up > max_jump && down > max_jump) || (up < -max_jump && down < -max_jump);
                if spike {
                    counters.spike.inc();
                    return;
                }
                state.spike_prev = Some(h.value);
                (h.ts, h.value)
            }
        };
        after_spike(rule, state, sensor, ts, value, now_ms, held, counters, emit);
    }

    /// Emits what has waited long enough: downsample intervals no reading has come for within one
    /// interval, and spike-held readings older than `max_hold` (agent's clock). Also forgets idle
    /// sensors once a minute. Cheap when nothing is held.
    pub fn tick(&mut self, now_ms: i64, emit: &mut impl FnMut(&str, i64, f64)) {
        if self.held > 0 {
            let Filters { rules, sensors, held, counters, .. } = self;
            for (sensor, state) in sensors.iter_mut() {
                if !state.holds() {
                    continue;
                }
                let rule = &rules[state.rule as usize];
                if let (Some(h), Some((_, max_hold))) = (state.spike_held, rule.spike) {
                    if now_ms.saturating_sub(h.since_ms) >= max_hold {
                        release_held(rule, state, sensor, now_ms, held, counters, emit);
                    }
                }
                if let (Some(b), Some((interval, agg))) = (state.bucket, rule.downsample) {
                    if now_ms.saturating_sub(b.touched_ms) >= interval {
                        state.bucket = None;
                        *held -= 1;
                        let (ts, value) = b.result(agg);
                        emit(sensor, ts, value);
                    }
                }
            }
            counters.held.set(*held as i64);
        }
        if now_ms.saturating_sub(self.last_sweep_ms) >= SWEEP_EVERY_MS {
            self.last_sweep_ms = now_ms;
            let idle = millis(IDLE_EVICT);
            self.sensors.retain(|_, s| s.holds() || now_ms.saturating_sub(s.last_arrival_ms) < idle);
            self.counters.sensors.set(self.sensors.len() as i64);
        }
    }

    /// Hands over everything held (at a clean stop): spike-held readings unjudged, then every open
    /// interval.
    pub fn finish(&mut self, now_ms: i64, emit: &mut impl FnMut(&str, i64, f64)) {
        let Filters { rules, sensors, held, counters, .. } = self;
        for (sensor, state) in sensors.iter_mut() {
            if state.holds() {
                release_all(&rules[state.rule as usize], state, sensor, now_ms, held, counters, emit);
            }
        }
        counters.held.set(*held as i64);
    }

    /// Replaces the rules by `config` (a reload), as the module doc describes: sensors whose rule
    /// is unchanged keep their state; the others hand what they hold to `emit` through their old
    /// rule and are forgotten.
    pub fn reconfigure(&mut self, config: &[FilterConfig], now_ms: i64, emit: &mut impl FnMut(&str, i64, f64)) {
        let mut next = Filters::new(config, self.counters.clone());
        next.last_sweep_ms = self.last_sweep_ms;
        let Filters { rules, sensors, held, counters, .. } = self;
        for (sensor, mut state) in std::mem::take(sensors) {
            let rule = rule_of(&next.globs, &next.rules, &sensor);
            let same = match (state.rule, rule) {
                (NO_RULE, NO_RULE) => true,
                (NO_RULE, _) | (_, NO_RULE) => false,
                (old, new) => rules[old as usize] == next.rules[new as usize],
            };
            if same {
                state.rule = rule;
                next.held += usize::from(state.spike_held.is_some()) + usize::from(state.bucket.is_some());
                next.sensors.insert(sensor, state);
            } else if state.holds() {
                release_all(&rules[state.rule as usize], &mut state, &sensor, now_ms, held, counters, emit);
            }
        }
        counters.held.set(next.held as i64);
        counters.sensors.set(next.sensors.len() as i64);
        *self = next;
    }
}

/// The index of the section whose glob matches `sensor` first, or [`NO_RULE`] if none does or it
/// has no filters.
fn rule_of(globs: &[SensorGlob], rules: &[Rule], sensor: &str) -> u32 {
    let rule = globs.iter().position(|g| g.is_match(sensor)).filter(|&r| !rules[r].is_empty());
    rule.map_or(NO_RULE, |r| r as u32)
}

/// Hands over everything a sensor holds: its spike-held reading unjudged (through the rest of the
/// rule), then its open interval.
fn release_all(
    rule: &Rule,
    state: &mut SensorState,
    sensor: &str,
    now_ms: i64,
    held: &mut usize,
    counters: &FilterCounters,
    emit: &mut impl FnMut(&str, i64, f64),
) {
    if state.spike_held.is_some() {
        release_held(rule, state, sensor, now_ms, held, counters, emit);
    }
    if let (Some(b), Some((_, agg))) = (state.bucket.take(), rule.downsample) {
        *held -= 1;
        let (ts, value) = b.result(agg);
        emit(sensor, ts, value);
    }
}

/// A spike-held reading goes on unjudged (no next reading came, or the agent stops).
fn release_held(
    rule: &Rule,
    state: &mut SensorState,
    sensor: &str,
    now_ms: i64,
    held: &mut usize,
    counters: &FilterCounters,
    emit: &mut impl FnMut(&str, i64, f64),
) {
    if let Some(h) = state.spike_held.take() {
        *held -= 1;
        state.spike_prev = Some(h.value);
        after_spike(rule, state, sensor, h.ts, h.value, now_ms, held, counters, emit);
    }
}

/// Deadband, then downsample.
#[allow(clippy::too_many_arguments)]
fn after_spike(
    rule: &Rule,
    state: &mut SensorState,
    sensor: &str,
    ts: i64,
    value: f64,
    now_ms: i64,
    held: &mut usize,
    counters: &FilterCounters,
    emit: &mut impl FnMut(&str, i64, f64),
) {
    if let Some((delta, relative, max_silence)) = rule.deadband {
        if ts < state.deadband_seen {
            counters.deadband_backwards.inc();
            state.deadband_last = Some((ts, value));
        } else {
            match state.deadband_last {
                None => state.deadband_last = Some((ts, value)),
                Some((last_ts, last)) => {
                    let band = delta.max(relative * last.abs());
                    if (value - last).abs() > band {
                        state.deadband_last = Some((ts, value));
                    } else if ts.saturating_sub(last_ts) >= max_silence {
                        counters.heartbeats.inc();
                        state.deadband_last = Some((ts, value));
                    } else {
                        state.deadband_seen = ts;
                        counters.unchanged.inc();
                        return;
                    }
                }
            }
        }
        state.deadband_seen = ts;
    }

    let Some((interval, agg)) = rule.downsample else {
        emit(sensor, ts, value);
        return;
    };
    // Saturating: validation bounds timestamps, but nothing here may panic on one that slipped by.
    let start = ts.saturating_sub(ts.rem_euclid(interval));
    match &mut state.bucket {
        None => {
            state.bucket = Some(Bucket::new(start, ts, value, now_ms));
            *held += 1;
        }
        Some(b) if b.start == start => {
            b.add(ts, value, now_ms);
            counters.aggregated.inc();
        }
        Some(b) if b.start < start => {
            let (out_ts, out) = b.result(agg);
            *b = Bucket::new(start, ts, value, now_ms);
            emit(sensor, out_ts, out);
        }
        Some(b) => {
            // An earlier interval than the open one: the clock went back.
            let (out_ts, out) = b.result(agg);
            state.bucket = None;
            *held -= 1;
            counters.downsample_backwards.inc();
            emit(sensor, out_ts, out);
            emit(sensor, ts, value);
        }
    }
    counters.held.set(*held as i64);
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_000_000_000;

    type Out = Vec<(String, i64, f64)>;

    fn rules(toml: &str) -> Vec<FilterConfig> {
        #[derive(Deserialize)]
        struct File {
            filter: Vec<FilterConfig>,
        }
        let file: File = tributary_shared::config_file::parse(toml, std::path::Path::new("test.toml")).unwrap();
        check(&file.filter).unwrap();
        file.filter
    }

    fn filters(toml: &str) -> (Filters, Metrics) {
        let metrics = Metrics::new();
        (Filters::new(&rules(toml), FilterCounters::new(&metrics)), metrics)
    }

    fn reconfigure(f: &mut Filters, toml: &str) -> Out {
        let mut out = Vec::new();
        f.reconfigure(&rules(toml), 0, &mut |s, t, v| out.push((s.to_string(), t, v)));
        out
    }

    /// Readings of sensor `s` as (ts, value), each arriving at `now` = its ts.
    fn feed(f: &mut Filters, sensor: &str, readings: &[(i64, f64)]) -> Out {
        let mut out = Vec::new();
        for &(ts, value) in readings {
            f.apply(sensor, ts, value, ts, &mut |s, t, v| out.push((s.to_string(), t, v)));
        }
        out
    }

    fn values(out: &Out) -> Vec<f64> {
        out.iter().map(|r| r.2).collect()
    }

    fn tick(f: &mut Filters, now: i64) -> Out {
        let mut out = Vec::new();
        f.tick(now, &mut |s, t, v| out.push((s.to_string(), t, v)));
        out
    }

    fn finish(f: &mut Filters) -> Out {
        let mut out = Vec::new();
        f.finish(0, &mut |s, t, v| out.push((s.to_string(), t, v)));
        out
    }

    fn metric(m: &Metrics, key: &str) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.parse().unwrap())
            .unwrap_or_else(|| panic!("{key} missing from:\n{text}"))
    }

    fn dropped(m: &Metrics, filter: &str, reason: &str) -> f64 {
        metric(m, &format!("tributary_agent_filter_dropped_total{{filter=\"{filter}\",reason=\"{reason}\"}}"))
    }

    #[test]
    fn range_keeps_values_on_the_bounds_and_drops_beyond() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\nrange = { min = 0.0, max = 100.0 }\n");
        // The very first reading is judged like any other.
        let out =
            feed(&mut f, "a", &[(T0, -0.5), (T0 + 1, 0.0), (T0 + 2, 100.0), (T0 + 3, 100.000001), (T0 + 4, 50.0)]);
        assert_eq!(values(&out), [0.0, 100.0, 50.0]);
        assert_eq!(dropped(&m, "range", "below_min"), 1.0);
        assert_eq!(dropped(&m, "range", "above_max"), 1.0);
        assert_eq!(metric(&m, "tributary_agent_filter_clamped_total"), 0.0);
    }

    #[test]
    fn range_clamp_replaces_the_value_by_the_bound_crossed() {
        let (mut f, m) =
            filters("[[filter]]\nsensor = \"**\"\nrange = { min = -10.0, max = 10.0, action = \"clamp\" }\n");
        let out = feed(&mut f, "a", &[(T0, -1e308), (T0 + 1, -10.0), (T0 + 2, 11.0), (T0 + 3, 3.0)]);
        assert_eq!(
            out,
            [
                ("a".into(), T0, -10.0),
                ("a".into(), T0 + 1, -10.0),
                ("a".into(), T0 + 2, 10.0),
                ("a".into(), T0 + 3, 3.0)
            ]
        );
        assert_eq!(metric(&m, "tributary_agent_filter_clamped_total"), 2.0);
        assert_eq!(dropped(&m, "range", "below_min"), 0.0);
    }

    #[test]
    fn a_one_sided_range_leaves_the_other_side_open() {
        let (mut f, _) = filters("[[filter]]\nsensor = \"**\"\nrange = { min = 0.0 }\n");
        assert_eq!(values(&feed(&mut f, "a", &[(T0, -1.0), (T0 + 1, 1e300)])), [1e300]);
    }

    #[test]
    fn spike_drops_a_single_reading_far_above_or_below_both_neighbours() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\nspike = { max_jump = 10.0 }\n");
        let seq = [(T0, 20.0), (T0 + 1, 21.0), (T0 + 2, 80.0), (T0 + 3, 22.0), (T0 + 4, -40.0), (T0 + 5, 21.0)];
        let out = feed(&mut f, "a", &seq);
        // The first passes at once; each later one waits for its successor; 21.0 is still held.
        assert_eq!(out, [("a".into(), T0, 20.0), ("a".into(), T0 + 1, 21.0), ("a".into(), T0 + 3, 22.0)]);
        assert_eq!(dropped(&m, "spike", "spike"), 2.0);
        assert_eq!(metric(&m, "tributary_agent_filter_held_readings"), 1.0);
        assert_eq!(finish(&mut f), [("a".into(), T0 + 5, 21.0)]);
        assert_eq!(metric(&m, "tributary_agent_filter_held_readings"), 0.0);
    }

    #[test]
    fn spike_lets_steps_ramps_and_jumps_of_exactly_max_jump_through() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\nspike = { max_jump = 10.0 }\n");
        // A jump of exactly max_jump both ways is not a spike.
        let out = feed(&mut f, "exact", &[(T0, 0.0), (T0 + 1, 10.0), (T0 + 2, 0.0), (T0 + 3, 0.0)]);
        assert_eq!(values(&out), [0.0, 10.0, 0.0]);
        // A step (the level stays) and a ramp (the reading is between its neighbours) pass.
        let out = feed(&mut f, "step", &[(T0, 0.0), (T0 + 1, 50.0), (T0 + 2, 50.0), (T0 + 3, 100.0), (T0 + 4, 150.0)]);
        assert_eq!(values(&out), [0.0, 50.0, 50.0, 100.0]);
        assert_eq!(dropped(&m, "spike", "spike"), 0.0);
    }

    #[test]
    fn spike_passes_the_first_and_the_last_reading_unjudged() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\nspike = { max_jump = 1.0 }\n");
        // Nothing before the first to judge it by: a spike there passes.
        let out = feed(&mut f, "a", &[(T0, 999.0), (T0 + 1, 1.0), (T0 + 2, 1.0), (T0 + 3, 999.0)]);
        assert_eq!(values(&out), [999.0, 1.0, 1.0]);
        // Nothing after the last: at a clean stop it goes out as it is.
        assert_eq!(values(&finish(&mut f)), [999.0]);
        assert_eq!(dropped(&m, "spike", "spike"), 0.0);
    }

    #[test]
    fn spike_releases_a_held_reading_after_max_hold_and_judges_by_arrival_order() {
        let (mut f, _) = filters("[[filter]]\nsensor = \"**\"\nspike = { max_jump = 5.0, max_hold = \"2s\" }\n");
        let mut out = Vec::new();
        let mut apply =
            |f: &mut Filters, ts, v, now| f.apply("a", ts, v, now, &mut |s, t, v| out.push((s.to_string(), t, v)));
        apply(&mut f, T0, 1.0, T0);
        apply(&mut f, T0 + 1000, 2.0, T0 + 1000);
        assert_eq!(tick(&mut f, T0 + 2999), []);
        assert_eq!(tick(&mut f, T0 + 3000), [("a".into(), T0 + 1000, 2.0)]);
        // A timestamp going backwards changes nothing: neighbours are the readings before and after.
        apply(&mut f, T0 - 5000, 50.0, T0 + 4000);
        apply(&mut f, T0 - 4000, 2.0, T0 + 5000);
        assert_eq!(out, [("a".into(), T0, 1.0)]);
        assert_eq!(f.held(), 1);
    }

    #[test]
    fn deadband_passes_changes_beyond_delta_and_heartbeats() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\ndeadband = { delta = 0.5, max_silence = \"10s\" }\n");
        let s = 1000;
        let seq = [
            (T0, 20.0),           // first: passes
            (T0 + s, 20.5),       // change == delta: dropped
            (T0 + 2 * s, 19.5),   // == delta below: dropped
            (T0 + 3 * s, 20.51),  // beyond: passes
            (T0 + 12 * s, 20.51), // 9 s after the last passed: dropped
            (T0 + 13 * s, 20.4),  // exactly max_silence after it: heartbeat
            (T0 + 14 * s, 20.4),
        ];
        let out = feed(&mut f, "a", &seq);
        assert_eq!(out, [("a".into(), T0, 20.0), ("a".into(), T0 + 3 * s, 20.51), ("a".into(), T0 + 13 * s, 20.4)]);
        assert_eq!(dropped(&m, "deadband", "unchanged"), 4.0);
        assert_eq!(metric(&m, "tributary_agent_filter_heartbeats_total"), 1.0);
    }

    #[test]
    fn deadband_of_zero_drops_only_exact_repeats_and_relative_scales_with_the_value() {
        let (mut f, _) = filters(
            "[[filter]]\nsensor = \"exact\"\ndeadband = {}\n[[filter]]\nsensor = \"rel\"\ndeadband = { relative = 0.1 }\n",
        );
        let out = feed(&mut f, "exact", &[(T0, 1.0), (T0 + 1, 1.0), (T0 + 2, 1.000001), (T0 + 3, 1.000001)]);
        assert_eq!(values(&out), [1.0, 1.000001]);
        // 10 % of 100 is 10: 109 stays in the band, 111 leaves it; then 10 % of 111.
        let out =
            feed(&mut f, "rel", &[(T0, 100.0), (T0 + 1, 109.0), (T0 + 2, 111.0), (T0 + 3, 122.0), (T0 + 4, 122.2)]);
        assert_eq!(values(&out), [100.0, 111.0, 122.2]);
    }

    #[test]
    fn deadband_restarts_when_the_clock_goes_backwards() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\ndeadband = { delta = 1.0, max_silence = \"1h\" }\n");
        let out =
            feed(&mut f, "a", &[(T0, 5.0), (T0 + 10, 5.0), (T0 - 60_000, 5.0), (T0 - 59_000, 5.0), (T0 - 58_000, 7.0)]);
        // The stepped-back reading passes and is the new reference; then the band applies again.
        assert_eq!(out, [("a".into(), T0, 5.0), ("a".into(), T0 - 60_000, 5.0), ("a".into(), T0 - 58_000, 7.0)]);
        assert_eq!(
            metric(&m, "tributary_agent_filter_resets_total{filter=\"deadband\",reason=\"clock_backwards\"}"),
            1.0
        );
    }

    #[test]
    fn downsample_emits_an_interval_when_the_next_interval_starts() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\ndownsample = { interval = \"10s\", agg = \"last\" }\n");
        let base = T0 - T0 % 10_000;
        // The first reading opens an interval and is held.
        assert_eq!(feed(&mut f, "a", &[(base, 1.0)]), []);
        assert_eq!(metric(&m, "tributary_agent_filter_held_readings"), 1.0);
        // The interval's last instant belongs to it; its end belongs to the next.
        assert_eq!(feed(&mut f, "a", &[(base + 9_999, 2.0)]), []);
        assert_eq!(feed(&mut f, "a", &[(base + 10_000, 3.0)]), [("a".into(), base + 9_999, 2.0)]);
        assert_eq!(dropped(&m, "downsample", "aggregated"), 1.0);
        assert_eq!(finish(&mut f), [("a".into(), base + 10_000, 3.0)]);
        assert_eq!(metric(&m, "tributary_agent_filter_held_readings"), 0.0);
    }

    #[test]
    fn downsample_aggregates_as_configured() {
        let base = T0 - T0 % 60_000;
        let seq = [(base + 5, 4.0), (base + 1, 1.0), (base + 3, 9.0), (base + 2, 1.0), (base + 4, 9.0)];
        for (agg, want) in [
            ("last", (base + 5, 4.0)), // by event time, not arrival
            ("mean", (base, 24.0 / 5.0)),
            ("min", (base + 1, 1.0)), // the first of equal values
            ("max", (base + 3, 9.0)),
        ] {
            let (mut f, _) = filters(&format!(
                "[[filter]]\nsensor = \"**\"\ndownsample = {{ interval = \"1m\", agg = \"{agg}\" }}\n"
            ));
            assert_eq!(feed(&mut f, "a", &seq), [], "{agg}");
            assert_eq!(finish(&mut f), [("a".into(), want.0, want.1)], "{agg}");
        }
        // A mean of huge values stays finite.
        let (mut f, _) = filters("[[filter]]\nsensor = \"**\"\ndownsample = { interval = \"1m\", agg = \"mean\" }\n");
        feed(&mut f, "a", &[(base, 1e308), (base + 1, 1e308), (base + 2, -1e308), (base + 3, -1e308)]);
        assert_eq!(finish(&mut f), [("a".into(), base, 0.0)]);
    }

    #[test]
    fn a_quiet_sensors_interval_goes_out_on_the_timer() {
        let (mut f, _) = filters("[[filter]]\nsensor = \"**\"\ndownsample = { interval = \"10s\" }\n");
        let mut out = Vec::new();
        // Arrives at agent time `now`, 2 s after its event time.
        f.apply("a", T0, 7.0, T0 + 2_000, &mut |s, t, v| out.push((s.to_string(), t, v)));
        assert!(out.is_empty());
        assert_eq!(tick(&mut f, T0 + 11_999), []);
        assert_eq!(tick(&mut f, T0 + 12_000), [("a".into(), T0, 7.0)]);
        assert_eq!(f.held(), 0);
        assert_eq!(tick(&mut f, T0 + 30_000), []);
    }

    #[test]
    fn downsample_passes_a_reading_from_an_earlier_interval_and_restarts() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\ndownsample = { interval = \"10s\" }\n");
        let base = T0 - T0 % 10_000;
        let out = feed(&mut f, "a", &[(base + 20_000, 1.0), (base + 5_000, 2.0), (base + 6_000, 3.0)]);
        // The open interval goes out, then the stepped-back reading as it is; the next opens afresh.
        assert_eq!(out, [("a".into(), base + 20_000, 1.0), ("a".into(), base + 5_000, 2.0)]);
        assert_eq!(
            metric(&m, "tributary_agent_filter_resets_total{filter=\"downsample\",reason=\"clock_backwards\"}"),
            1.0
        );
        assert_eq!(finish(&mut f), [("a".into(), base + 6_000, 3.0)]);
    }

    #[test]
    fn filters_run_in_order_range_spike_deadband_downsample() {
        let (mut f, m) = filters(
            "[[filter]]\nsensor = \"**\"\nrange = { max = 100.0, action = \"clamp\" }\nspike = { max_jump = 50.0 }\n\
             deadband = { delta = 1.0 }\ndownsample = { interval = \"1m\", agg = \"max\" }\n",
        );
        let base = T0 - T0 % 60_000;
        // 1000 is clamped to 100 before the spike filter sees it (|100 - 10| > 50 both ways: a spike);
        // 10.5 is within the deadband of 10; the rest meet in one interval, whose max goes out.
        let seq =
            [(base, 10.0), (base + 1, 1000.0), (base + 2, 10.0), (base + 3, 10.5), (base + 4, 30.0), (base + 5, 0.0)];
        assert_eq!(feed(&mut f, "a", &seq), []);
        assert_eq!(finish(&mut f), [("a".into(), base + 4, 30.0)]);
        assert_eq!(metric(&m, "tributary_agent_filter_clamped_total"), 1.0);
        assert_eq!(dropped(&m, "spike", "spike"), 1.0);
        assert_eq!(dropped(&m, "deadband", "unchanged"), 2.0);
        assert_eq!(dropped(&m, "downsample", "aggregated"), 2.0);
    }

    #[test]
    fn the_first_matching_section_wins_and_a_section_without_filters_exempts() {
        let (mut f, m) = filters(
            "[[filter]]\nsensor = \"line1/raw/*\"\n[[filter]]\nsensor = \"line1/*\"\nrange = { max = 1.0 }\n\
             [[filter]]\nsensor = \"**\"\nrange = { max = 10.0 }\n",
        );
        assert_eq!(values(&feed(&mut f, "line1/raw/t", &[(T0, 50.0)])), [50.0]);
        assert_eq!(values(&feed(&mut f, "line1/t", &[(T0, 5.0), (T0 + 1, 0.5)])), [0.5]);
        // `*` stays within a level: line1/a/b falls through to the default.
        assert_eq!(values(&feed(&mut f, "line1/a/b", &[(T0, 5.0), (T0 + 1, 50.0)])), [5.0]);
        assert_eq!(dropped(&m, "range", "above_max"), 2.0);
    }

    #[test]
    fn non_finite_values_pass_untouched_and_leave_no_state() {
        // Validation rejects them before the filters; should one get here, it must not poison state.
        let (mut f, _) =
            filters("[[filter]]\nsensor = \"**\"\nrange = { min = 0.0, max = 1.0 }\ndeadband = { delta = 1.0 }\n");
        let out = feed(&mut f, "a", &[(T0, f64::NAN), (T0 + 1, f64::INFINITY), (T0 + 2, 0.5), (T0 + 3, 0.6)]);
        assert_eq!(out.len(), 3);
        assert!(out[0].2.is_nan() && out[1].2 == f64::INFINITY && out[2].2 == 0.5);
    }

    #[test]
    fn idle_sensors_are_forgotten_and_state_is_capped() {
        let (mut f, m) = filters("[[filter]]\nsensor = \"**\"\ndeadband = { delta = 1.0, max_silence = \"1y\" }\n");
        feed(&mut f, "a", &[(T0, 1.0)]);
        tick(&mut f, T0 + 1);
        assert_eq!(metric(&m, "tributary_agent_filter_sensors"), 1.0);
        tick(&mut f, T0 + millis(IDLE_EVICT) + SWEEP_EVERY_MS);
        assert_eq!(metric(&m, "tributary_agent_filter_sensors"), 0.0);
        // Forgotten: its next reading is a first one again.
        assert_eq!(values(&feed(&mut f, "a", &[(T0 + 1, 1.0)])), [1.0]);

        let mut out = Vec::new();
        for i in 0..MAX_SENSORS + 10 {
            f.apply(&format!("s{i}"), T0, 1.0, T0, &mut |s, _, _| out.push(s.len()));
        }
        // Past the cap, readings of new sensors pass unfiltered, counted.
        assert_eq!(out.len(), MAX_SENSORS + 10);
        assert_eq!(metric(&m, "tributary_agent_filter_state_full_total"), 11.0);
        assert_eq!(f.sensors.len(), MAX_SENSORS);
    }

    #[test]
    fn a_reload_hands_over_what_the_old_rules_held_and_starts_afresh() {
        let (mut f, m) = filters(
            "[[filter]]\nsensor = \"spike/*\"\nspike = { max_jump = 5.0 }\n\
             [[filter]]\nsensor = \"ds/*\"\ndeadband = {}\ndownsample = { interval = \"1m\", agg = \"max\" }\n",
        );
        let base = T0 - T0 % 60_000;
        assert_eq!(values(&feed(&mut f, "spike/a", &[(T0, 1.0), (T0 + 1, 2.0)])), [1.0]);
        assert_eq!(feed(&mut f, "ds/a", &[(base, 5.0), (base + 1, 9.0), (base + 2, 7.0)]), []);
        assert_eq!(f.held(), 2);
        // Both sensors' rules change: the held reading and the open interval go out as at a stop.
        let mut out = reconfigure(&mut f, "[[filter]]\nsensor = \"**\"\nrange = { max = 50.0 }\n");
        out.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(out, [("ds/a".into(), base + 1, 9.0), ("spike/a".into(), T0 + 1, 2.0)]);
        assert_eq!((f.held(), metric(&m, "tributary_agent_filter_held_readings")), (0, 0.0));
        assert_eq!(metric(&m, "tributary_agent_filter_sensors"), 0.0);
        // The new rule applies at once; nothing of the old ones is left (no spike hold, no interval).
        assert_eq!(values(&feed(&mut f, "spike/a", &[(T0 + 2, 60.0), (T0 + 3, 3.0)])), [3.0]);
        assert_eq!(values(&feed(&mut f, "ds/a", &[(base + 3, 5.0), (base + 4, 5.0)])), [5.0, 5.0]);
        // Rules taken away: every reading passes.
        assert_eq!(reconfigure(&mut f, "filter = []\n"), []);
        assert!(f.is_empty());
        assert_eq!(values(&feed(&mut f, "spike/a", &[(T0 + 5, 60.0)])), [60.0]);
    }

    #[test]
    fn a_reload_keeps_the_state_of_sensors_whose_rule_did_not_change() {
        let deadband = "sensor = \"db/*\"\ndeadband = { delta = 1.0, max_silence = \"1h\" }\n";
        let spike = "sensor = \"spike/*\"\nspike = { max_jump = 5.0 }\n";
        let (mut f, m) = filters(&format!("[[filter]]\n{deadband}[[filter]]\n{spike}"));
        assert_eq!(values(&feed(&mut f, "db/a", &[(T0, 20.0)])), [20.0]);
        assert_eq!(values(&feed(&mut f, "spike/a", &[(T0, 1.0), (T0 + 1, 2.0)])), [1.0]);
        assert_eq!(values(&feed(&mut f, "other", &[(T0, 1.0)])), [1.0]);
        // A section added in front and the order changed: the same rules keep their state, wherever
        // they now are; the sensor the new section takes over starts afresh.
        let out = reconfigure(
            &mut f,
            &format!(
                "[[filter]]\nsensor = \"other\"\nrange = {{ max = 0.5 }}\n[[filter]]\n{spike}[[filter]]\n{deadband}"
            ),
        );
        assert_eq!(out, []);
        assert_eq!((f.held(), metric(&m, "tributary_agent_filter_held_readings")), (1, 1.0));
        // The deadband still remembers 20.0; the spike filter judges its held 2.0 by its next reading.
        assert_eq!(values(&feed(&mut f, "db/a", &[(T0 + 1, 20.5), (T0 + 2, 21.5)])), [21.5]);
        assert_eq!(values(&feed(&mut f, "spike/a", &[(T0 + 2, 3.0)])), [2.0]);
        assert_eq!(values(&feed(&mut f, "other", &[(T0 + 1, 1.0), (T0 + 2, 0.25)])), [0.25]);
        assert_eq!(metric(&m, "tributary_agent_filter_sensors"), 3.0);
    }

    #[test]
    fn sensors_without_filters_pass_untouched() {
        let (mut f, _) = filters("[[filter]]\nsensor = \"line1/*\"\ndeadband = {}\n");
        assert_eq!(values(&feed(&mut f, "other", &[(T0, 1.0), (T0 + 1, 1.0)])), [1.0, 1.0]);
        let (mut none, _) = filters("filter = []\n");
        assert!(none.is_empty() && none.tick_period().is_none());
        assert_eq!(values(&feed(&mut none, "a", &[(T0, 1.0), (T0 + 1, 1.0)])), [1.0, 1.0]);
    }

    fn config_error(filters: &str) -> String {
        let text = format!(
            "agent_id = \"gw-1\"\ndata_dir = \"/tmp/x\"\n[upstream]\nurl = \"http://127.0.0.1:8080\"\ntoken = \"t\"\n{filters}"
        );
        crate::config::Config::parse(&text, std::path::Path::new("/etc/agent.toml")).unwrap_err().to_string()
    }

    #[test]
    fn bad_filter_sections_are_refused_naming_the_key() {
        for (section, key, reason) in [
            ("sensor = \"**\"\nrange = { min = 5.0, max = 1.0 }", "filter[0].range", "min 5 is above max 1"),
            ("sensor = \"**\"\nrange = { action = \"clamp\" }", "filter[0].range", "give min, max or both"),
            ("sensor = \"**\"\ndownsample = { interval = \"0s\" }", "filter[0].downsample.interval", "at least 1ms"),
            (
                "sensor = \"**\"\ndownsample = { interval = \"1s\", agg = \"median\" }",
                "filter[0].downsample.agg",
                "unknown variant `median`",
            ),
            ("sensor = \"line1/{a\"", "filter[0].sensor", "is not a sensor glob"),
            ("sensor = \"**\"\nspike = { max_jump = 0.0 }", "filter[0].spike.max_jump", "above 0"),
            ("sensor = \"**\"\ndeadband = { delta = -1.0 }", "filter[0].deadband.delta", "0 or above"),
            ("sensor = \"**\"\ndeadband = { max_silence = \"0s\" }", "filter[0].deadband.max_silence", "at least 1ms"),
            ("sensor = \"**\"\ndeadband = { delt = 1.0 }", "filter[0].deadband.delt", "unknown field"),
            ("range = { min = 0.0 }", "filter[0].sensor", "missing field `sensor`"),
        ] {
            let e = config_error(&format!("[[filter]]\n{section}\n"));
            assert!(e.contains(&format!("{key}: ")) && e.contains(reason), "{section}: {e}");
        }
        // The second section is named by its index.
        let e =
            config_error("[[filter]]\nsensor = \"a\"\n[[filter]]\nsensor = \"b\"\nrange = { min = 2.0, max = 1.0 }\n");
        assert!(e.contains("filter[1].range: sensor \"b\""), "{e}");
    }

    #[test]
    fn the_example_sections_parse_with_their_documented_defaults() {
        // deploy/agent.toml shows one [[filter]] table, commented out: uncommented, it must load.
        let table: String = crate::config::EXAMPLE
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                ["[[filter]]", "sensor =", "range =", "spike =", "deadband =", "downsample ="]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(table.lines().count(), 6, "{table}");
        let text = format!(
            "agent_id = \"gw-1\"\ndata_dir = \"/tmp/x\"\n[upstream]\nurl = \"http://127.0.0.1:8080\"\ntoken = \"t\"\n{table}"
        );
        let config = crate::config::Config::parse(&text, std::path::Path::new("agent.toml")).unwrap();
        let f = &config.filter[0];
        let (spike, deadband, downsample) =
            (f.spike.as_ref().unwrap(), f.deadband.as_ref().unwrap(), f.downsample.as_ref().unwrap());
        assert_eq!(f.range.as_ref().unwrap().action, RangeAction::default());
        assert_eq!(spike.max_hold, default_max_hold());
        assert_eq!((deadband.relative, deadband.max_silence), (0.0, default_max_silence()));
        assert_eq!(downsample.agg, Agg::default());
    }

    #[test]
    fn sensor_state_stays_small() {
        // The README and MAX_SENSORS's doc give about 200 bytes a sensor.
        assert!(std::mem::size_of::<SensorState>() <= 200, "{}", std::mem::size_of::<SensorState>());
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_do_not_panic() {
        let (mut f, _) = filters("[[filter]]\nsensor = \"**\"\ndeadband = {}\ndownsample = { interval = \"7ms\" }\n");
        let out = feed(&mut f, "a", &[(i64::MIN + 1, 1.0), (i64::MAX, 2.0), (i64::MIN, 3.0)]);
        assert_eq!(out.len(), 3);
        assert_eq!(finish(&mut f), []);
    }
}
