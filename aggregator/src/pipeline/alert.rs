//! Alert rules evaluated on event time, per sensor, in log order: a value above or below a
//! threshold for a duration (with hysteresis), a rate of change, or an anomaly.
//!
//! An alert has a lifecycle (firing → resolved) kept in the `alerts` table; transitions go to
//! webhooks ([`crate::notify`]) and, as readings of `_alert/<rule>/<sensor>`, back into the log.
//! A reading older than the last one a rule has seen for its sensor (late data) still lands in
//! its windows but does not move the alert: an hour-old reading must not resolve a live alert.
//! Staleness is a processing-time condition and lives apart (see [`crate::stale`]).

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::window::Point;
use crate::store::StoreError;

/// What makes a rule's condition true.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Fires above `threshold`, resolves at or below `clear`.
    Above { threshold: f64, clear: f64 },
    /// Fires below `threshold`, resolves at or above `clear`.
    Below { threshold: f64, clear: f64 },
    /// Change per second between consecutive readings above this.
    RateAbove(f64),
    /// Change per second between consecutive readings below this (e.g. a drop: negative).
    RateBelow(f64),
    /// The sensor's anomaly model flagged the reading.
    Anomaly,
}

/// One `[[alerts]]` rule on event time, compiled.
#[derive(Debug, Clone)]
pub struct AlertRule {
    pub name: String,
    pub sensor: globset::GlobMatcher,
    pub condition: Condition,
    /// How long (event time) the condition must hold before the alert fires.
    pub for_ms: i64,
    pub severity: String,
}

/// An alert transition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub id: u64,
    pub rule: String,
    #[serde(skip)]
    pub series: u32,
    pub severity: String,
    /// `firing` or `resolved`.
    pub state: &'static str,
    /// Event time and value of the reading that caused it.
    pub ts: i64,
    pub value: f64,
    /// Log offset of that reading.
    pub offset: u64,
    /// When the aggregator received it (Unix ms): a notification for an old transition is a
    /// replay of history, not news.
    pub received_at: i64,
}

/// A rule's state for one sensor, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RuleState {
    /// Event time since which the condition has held, while it holds.
    since: Option<i64>,
    /// The firing alert's id.
    firing: Option<u64>,
    /// The last in-order reading.
    last: Option<(i64, f64)>,
}

pub struct AlertOperator {
    rules: Vec<AlertRule>,
    /// Per series (by id): the rules matching it with their states, once looked up. Held by
    /// series rather than in a map keyed by (rule, series): with ten rules on every sensor, the
    /// map's lookups were most of the cost of a reading.
    of_series: Vec<Option<SeriesRules>>,
    /// Series whose states changed since the last commit.
    dirty: Vec<u32>,
    transitions: Vec<Transition>,
    next_id: u64,
}

#[derive(Debug, Default)]
struct SeriesRules {
    /// (rule index, its state for the series).
    states: Vec<(usize, RuleState)>,
    dirty: bool,
}

impl AlertOperator {
    pub fn open(rules: Vec<AlertRule>, conn: &Connection) -> Result<AlertOperator, StoreError> {
        let max: Option<i64> = conn.query_row("SELECT max(id) FROM alerts", [], |r| r.get(0))?;
        Ok(AlertOperator {
            rules,
            of_series: Vec::new(),
            dirty: Vec::new(),
            transitions: Vec::new(),
            next_id: max.map_or(1, |m| m as u64 + 1),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Evaluates every rule matching the sensor on one reading.
    pub fn add(
        &mut self,
        conn: &Connection,
        name: &str,
        p: &Point,
        offset: u64,
        anomalous: bool,
    ) -> Result<(), StoreError> {
        let i = p.series as usize;
        if i >= self.of_series.len() {
            self.of_series.resize_with(i + 1, || None);
        }
        let AlertOperator { rules, of_series, dirty, transitions, next_id } = self;
        let series = match &mut of_series[i] {
            Some(series) => series,
            slot => {
                let mut states = Vec::new();
                // Alerts about alerts would loop; anomalies of a sensor are matched through `anomaly`.
                if !name.starts_with("_alert/") {
                    for (k, rule) in rules.iter().enumerate().filter(|(_, r)| r.sensor.is_match(name)) {
                        states.push((k, load_state(conn, &rule.name, p.series)?.unwrap_or_default()));
                    }
                }
                slot.insert(SeriesRules { states, dirty: false })
            }
        };
        if series.states.is_empty() {
            return Ok(());
        }
        for (k, state) in &mut series.states {
            let rule = &rules[*k];
            if state.last.is_some_and(|(ts, _)| p.ts < ts) {
                continue;
            }
            let (holds, clears) = match &rule.condition {
                Condition::Above { threshold, clear } => (p.value > *threshold, p.value <= *clear),
                Condition::Below { threshold, clear } => (p.value < *threshold, p.value >= *clear),
                Condition::RateAbove(limit) | Condition::RateBelow(limit) => {
                    let rate = match state.last {
                        Some((ts, v)) if p.ts > ts => {
                            Some((p.value / 2.0 - v / 2.0) * 2.0 / ((p.ts - ts) as f64 / 1000.0))
                        }
                        _ => None,
                    };
                    let holds = rate.is_some_and(|r| match rule.condition {
                        Condition::RateAbove(_) => r > *limit,
                        _ => r < *limit,
                    });
                    (holds, rate.is_some() && !holds)
                }
                Condition::Anomaly => (anomalous, !anomalous),
            };
            state.last = Some((p.ts, p.value));
            let mut transition = None;
            match state.firing {
                Some(id) if clears => {
                    state.firing = None;
                    state.since = None;
                    transition = Some((id, "resolved"));
                }
                Some(_) => {}
                None if holds => {
                    let since = *state.since.get_or_insert(p.ts);
                    if p.ts.saturating_sub(since) >= rule.for_ms {
                        let id = *next_id;
                        *next_id += 1;
                        state.firing = Some(id);
                        transition = Some((id, "firing"));
                    }
                }
                None => state.since = None,
            }
            if !series.dirty {
                series.dirty = true;
                dirty.push(p.series);
            }
            if let Some((id, what)) = transition {
                transitions.push(Transition {
                    id,
                    rule: rule.name.clone(),
                    series: p.series,
                    severity: rule.severity.clone(),
                    state: what,
                    ts: p.ts,
                    value: p.value,
                    offset,
                    received_at: p.received_at,
                });
            }
        }
        Ok(())
    }

    /// Transitions since the last commit.
    pub fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    pub fn flush(&self, tx: &Connection) -> Result<(), StoreError> {
        self.to_write().write(tx)
    }

    /// What [`AlertOperator::flush`] writes, to write on another thread
    /// ([`super::Pipeline::commit_behind`]).
    pub fn to_write(&self) -> AlertRows {
        let mut states = Vec::new();
        for series in &self.dirty {
            let Some(Some(rules)) = self.of_series.get(*series as usize) else { continue };
            for (k, s) in &rules.states {
                states.push((self.rules[*k].name.clone(), *series, postcard::to_allocvec(s).unwrap_or_default()));
            }
        }
        AlertRows { states, transitions: self.transitions.clone() }
    }

    pub fn committed(&mut self) {
        for series in self.dirty.drain(..) {
            if let Some(Some(rules)) = self.of_series.get_mut(series as usize) {
                rules.dirty = false;
            }
        }
        self.transitions.clear();
    }
}

/// The changed rule states and the transitions since the last commit, encoded.
#[derive(Debug, Default)]
pub struct AlertRows {
    states: Vec<(String, u32, Vec<u8>)>,
    transitions: Vec<Transition>,
}

impl AlertRows {
    pub fn write(&self, tx: &Connection) -> Result<(), StoreError> {
        let mut state =
            tx.prepare_cached("INSERT OR REPLACE INTO alert_states (rule, series, data) VALUES (?1, ?2, ?3)")?;
        for (rule, series, data) in &self.states {
            state.execute(params![rule, *series as i64, data])?;
        }
        let mut fire = tx.prepare_cached(
            "INSERT OR IGNORE INTO alerts (id, rule, series, severity, state, fired_ts, fired_value, fired_offset)
             VALUES (?1, ?2, ?3, ?4, 'firing', ?5, ?6, ?7)",
        )?;
        let mut resolve = tx.prepare_cached(
            "UPDATE alerts SET state = 'resolved', resolved_ts = ?2, resolved_value = ?3, resolved_offset = ?4 WHERE id = ?1",
        )?;
        for t in &self.transitions {
            if t.state == "firing" {
                fire.execute(params![
                    t.id as i64,
                    t.rule,
                    t.series as i64,
                    t.severity,
                    t.ts,
                    t.value,
                    t.offset as i64
                ])?;
            } else {
                resolve.execute(params![t.id as i64, t.ts, t.value, t.offset as i64])?;
            }
        }
        Ok(())
    }
}

fn load_state(conn: &Connection, rule: &str, series: u32) -> Result<Option<RuleState>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT data FROM alert_states WHERE rule = ?1 AND series = ?2")?;
    let data: Option<Vec<u8>> = stmt.query_row(params![rule, series as i64], |r| r.get(0)).optional()?;
    Ok(data.and_then(|d| postcard::from_bytes(&d).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(condition: Condition, for_ms: i64) -> AlertRule {
        AlertRule {
            name: "hot".into(),
            sensor: crate::config::parse_glob("line*/temp").unwrap(),
            condition,
            for_ms,
            severity: "warning".into(),
        }
    }

    fn conn() -> Connection {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_write(&dir.path().join("s.db")).unwrap();
        std::mem::forget(dir);
        conn
    }

    /// Feeds (ts in s, value) and returns the transitions as (ts in s, state).
    fn feed(op: &mut AlertOperator, conn: &Connection, readings: &[(i64, f64)]) -> Vec<(i64, &'static str)> {
        for (i, (ts, v)) in readings.iter().enumerate() {
            let p = Point { series: 0, ts: ts * 1000, value: *v, received_at: 0, block: 0 };
            op.add(conn, "line1/temp", &p, i as u64, false).unwrap();
        }
        let out = op.transitions().iter().map(|t| (t.ts / 1000, t.state)).collect();
        op.committed();
        out
    }

    #[test]
    fn above_for_a_duration_fires_once_and_resolves_below_clear() {
        let conn = conn();
        let mut op =
            AlertOperator::open(vec![rule(Condition::Above { threshold: 80.0, clear: 75.0 }, 30_000)], &conn).unwrap();
        let t = feed(
            &mut op,
            &conn,
            &[
                (0, 81.0),
                (10, 85.0),
                (20, 79.0),
                (25, 82.0),
                (40, 83.0),
                (55, 90.0),
                (60, 78.0),
                (70, 76.0),
                (80, 75.0),
                (90, 81.0),
            ],
        );
        // 81 at 0 then 79 at 20 breaks the run; 82 from 25 holds 30 s at 55; 78 and 76 are above clear.
        assert_eq!(t, [(55, "firing"), (80, "resolved")]);
    }

    #[test]
    fn late_readings_do_not_move_an_alert() {
        let conn = conn();
        let mut op =
            AlertOperator::open(vec![rule(Condition::Above { threshold: 80.0, clear: 80.0 }, 0)], &conn).unwrap();
        assert_eq!(feed(&mut op, &conn, &[(100, 90.0), (50, 10.0)]), [(100, "firing")]);
    }

    #[test]
    fn a_rate_of_change_fires_on_a_fast_rise() {
        let conn = conn();
        let mut op = AlertOperator::open(vec![rule(Condition::RateAbove(1.0), 0)], &conn).unwrap();
        assert_eq!(
            feed(&mut op, &conn, &[(0, 20.0), (10, 25.0), (12, 40.0), (20, 41.0)]),
            [(12, "firing"), (20, "resolved")]
        );
    }

    #[test]
    fn state_survives_a_commit_and_reload() {
        let mut conn = conn();
        let rules = vec![rule(Condition::Above { threshold: 80.0, clear: 80.0 }, 20_000)];
        let mut op = AlertOperator::open(rules.clone(), &conn).unwrap();
        for (ts, v) in [(0, 85.0), (10, 86.0)] {
            op.add(
                &conn,
                "line1/temp",
                &Point { series: 0, ts: ts * 1000, value: v, received_at: 0, block: 0 },
                0,
                false,
            )
            .unwrap();
        }
        let tx = conn.transaction().unwrap();
        op.flush(&tx).unwrap();
        tx.commit().unwrap();
        let mut reopened = AlertOperator::open(rules, &conn).unwrap();
        assert_eq!(feed(&mut reopened, &conn, &[(20, 87.0)]), [(20, "firing")], "the run since 0 s was remembered");
    }
}
