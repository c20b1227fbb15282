//! Sensor state (count, latest reading by event time, last seen) and agent state, kept whole in
//! memory (a few dozen bytes a sensor) and written for the sensors a commit changed.

use std::collections::HashMap;

use rusqlite::{Connection, params};

use super::window::Point;
use crate::store::StoreError;

/// A sensor's state, as the processor folds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SensorState {
    /// Readings folded into its windows.
    pub count: u64,
    /// Readings set aside because their time was too far ahead of the aggregator's clock.
    pub quarantined: u64,
    /// Event time of the newest reading; ties go to the later one in the log.
    pub last_ts: i64,
    pub last_value: f64,
    /// When the aggregator received the most recent block holding this sensor (Unix ms).
    pub last_seen: i64,
}

impl Default for SensorState {
    fn default() -> Self {
        SensorState { count: 0, quarantined: 0, last_ts: i64::MIN, last_value: 0.0, last_seen: i64::MIN }
    }
}

#[derive(Debug, Default, Clone)]
pub struct SensorOperator {
    states: Vec<SensorState>,
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
}

impl SensorOperator {
    pub fn open(conn: &Connection) -> Result<SensorOperator, StoreError> {
        let mut op = SensorOperator::default();
        let mut stmt =
            conn.prepare("SELECT series, count, quarantined, last_ts, last_value, last_seen FROM sensors")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                SensorState {
                    count: r.get::<_, i64>(1)?.max(0) as u64,
                    quarantined: r.get::<_, i64>(2)?.max(0) as u64,
                    last_ts: r.get(3)?,
                    last_value: r.get(4)?,
                    last_seen: r.get(5)?,
                },
            ))
        })?;
        for row in rows {
            let (series, state) = row?;
            let slot = op.slot(series as u32);
            *slot = state;
        }
        Ok(op)
    }

    fn slot(&mut self, series: u32) -> &mut SensorState {
        let i = series as usize;
        if i >= self.states.len() {
            self.states.resize(i + 1, SensorState::default());
            self.is_dirty.resize(i + 1, false);
        }
        if !self.is_dirty[i] {
            self.is_dirty[i] = true;
            self.dirty.push(series);
        }
        &mut self.states[i]
    }

    pub fn add(&mut self, p: &Point) {
        let s = self.slot(p.series);
        s.count += 1;
        if p.ts >= s.last_ts {
            s.last_ts = p.ts;
            s.last_value = p.value;
        }
        s.last_seen = s.last_seen.max(p.received_at);
    }

    pub fn quarantine(&mut self, p: &Point) {
        let s = self.slot(p.series);
        s.quarantined += 1;
        s.last_seen = s.last_seen.max(p.received_at);
    }

    pub fn get(&self, series: u32) -> Option<&SensorState> {
        self.states.get(series as usize)
    }

    pub fn flush(&self, tx: &Connection) -> Result<(), StoreError> {
        let mut stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO sensors (series, count, quarantined, last_ts, last_value, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for series in &self.dirty {
            let s = &self.states[*series as usize];
            stmt.execute(params![
                *series as i64,
                s.count as i64,
                s.quarantined as i64,
                s.last_ts,
                s.last_value,
                s.last_seen
            ])?;
        }
        Ok(())
    }

    pub fn committed(&mut self) {
        for series in self.dirty.drain(..) {
            self.is_dirty[series as usize] = false;
        }
    }
}

/// An agent's state: readings logged, last block received.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AgentState {
    pub readings: u64,
    pub last_seen: i64,
}

#[derive(Debug, Default, Clone)]
pub struct AgentOperator {
    states: HashMap<String, AgentState>,
    dirty: Vec<String>,
}

impl AgentOperator {
    pub fn open(conn: &Connection) -> Result<AgentOperator, StoreError> {
        let mut states = HashMap::new();
        let mut stmt = conn.prepare("SELECT id, readings, last_seen FROM agents")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                AgentState { readings: r.get::<_, i64>(1)?.max(0) as u64, last_seen: r.get(2)? },
            ))
        })?;
        for row in rows {
            let (id, state) = row?;
            states.insert(id, state);
        }
        Ok(AgentOperator { states, dirty: Vec::new() })
    }

    pub fn add_block(&mut self, agent: &str, readings: u64, received_at: i64) {
        let state = match self.states.get_mut(agent) {
            Some(s) => s,
            None => self.states.entry(agent.to_string()).or_insert(AgentState { readings: 0, last_seen: i64::MIN }),
        };
        state.readings += readings;
        state.last_seen = state.last_seen.max(received_at);
        if !self.dirty.iter().any(|d| d == agent) {
            self.dirty.push(agent.to_string());
        }
    }

    pub fn flush(&self, tx: &Connection) -> Result<(), StoreError> {
        let mut stmt =
            tx.prepare_cached("INSERT OR REPLACE INTO agents (id, readings, last_seen) VALUES (?1, ?2, ?3)")?;
        for id in &self.dirty {
            if let Some(s) = self.states.get(id) {
                stmt.execute(params![id, s.readings as i64, s.last_seen])?;
            }
        }
        Ok(())
    }

    /// The agents changed since the last commit, with their state.
    pub fn changed(&self) -> impl Iterator<Item = (&str, AgentState)> + '_ {
        self.dirty.iter().filter_map(|id| self.states.get(id).map(|s| (id.as_str(), *s)))
    }

    pub fn committed(&mut self) {
        self.dirty.clear();
    }
}
