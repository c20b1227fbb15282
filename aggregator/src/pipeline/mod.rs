//! The stream processing pipeline: operators that fold the log, in log order, into the serving
//! store.
//!
//! A [`Pipeline`] holds its operators, each with its own tables: one [`window::WindowOperator`]
//! per configured window size, sensor and agent state ([`state`]), quarantine of readings whose
//! time is ahead of the aggregator's clock, anomaly models ([`anomaly`]) and alert rules
//! ([`alert`]). [`processor`] runs it on a thread: it reads blocks from its offset, folds them,
//! and commits every operator's changes together with the new offset in one store transaction,
//! so a crash neither loses nor double-counts.
//!
//! Event-time processing is deterministic: everything that goes into the tables comes from the
//! log (readings, their order, the time each block was received), never from the wall clock or
//! from how the log was cut into steps. Staleness, the one processing-time signal, is computed
//! when it is read and is not stored.

pub mod alert;
pub mod anomaly;
pub mod calendar;
pub mod processor;
pub mod sketch;
pub mod state;
pub mod stats;
pub mod window;

use rusqlite::{Connection, params};
use tributary_shared::BlockView;

use self::alert::{AlertOperator, AlertRule, Transition};
use self::anomaly::{AnomalyOperator, AnomalyRule};
use self::calendar::Calendar;
use self::state::{AgentOperator, SensorOperator};
use self::window::{Point, WindowOperator};
use crate::store::StoreError;

/// What the pipeline computes, from `[pipeline]` in aggregator.toml.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// The window sizes precomputed, finest first.
    pub calendars: Vec<Calendar>,
    /// Readings stamped further than this ahead of the time their block was received are
    /// quarantined, never folded in.
    pub max_clock_skew_ms: i64,
    pub anomaly: Vec<AnomalyRule>,
    /// Event-time alert rules (staleness rules are processing time: [`crate::stale`]).
    pub alerts: Vec<AlertRule>,
}

/// The agent id derived streams are appended to the log under.
pub const DERIVED_AGENT: &str = "_pipeline";

/// A reading the pipeline derives (an anomaly score, an alert transition), appended to the log
/// as a reading of its own stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub sensor: String,
    pub ts: i64,
    pub value: f64,
}

/// A reading set aside instead of folded in.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    pub offset: u64,
    pub series: u32,
    pub ts: i64,
    pub value: f64,
    pub received_at: i64,
    pub reason: &'static str,
}

/// A log block the processor left out: it does not decode or validate, its count lies, or the
/// store refused it alone.
#[derive(Debug, Clone, PartialEq)]
pub struct SetAside {
    pub first_offset: u64,
    pub count: u64,
    pub agent_id: String,
    pub reason: String,
}

/// Sensor ids to small integers, persisted in the `series` table.
#[derive(Debug, Default)]
pub struct SeriesIndex {
    ids: rustc_hash::FxHashMap<String, u32>,
    names: Vec<String>,
    /// Ids made since the last commit, to insert.
    new_from: usize,
}

impl SeriesIndex {
    pub fn open(conn: &Connection) -> Result<SeriesIndex, StoreError> {
        let mut index = SeriesIndex::default();
        let mut stmt = conn.prepare("SELECT id, name FROM series ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, name) = row?;
            if id as usize != index.names.len() {
                return Err(StoreError::Corrupt(format!("series ids are not dense at {id} ({name})")));
            }
            index.ids.insert(name.clone(), id as u32);
            index.names.push(name);
        }
        index.new_from = index.names.len();
        Ok(index)
    }

    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map(String::as_str).unwrap_or("")
    }

    fn flush(&self, tx: &Connection) -> Result<(), StoreError> {
        let mut stmt = tx.prepare_cached("INSERT INTO series (id, name) VALUES (?1, ?2)")?;
        for (i, name) in self.names.iter().enumerate().skip(self.new_from) {
            stmt.execute(params![i as i64, name])?;
        }
        Ok(())
    }

    fn committed(&mut self) {
        self.new_from = self.names.len();
    }
}

/// The operators and what they hold between commits.
pub struct Pipeline {
    pub spec: PipelineSpec,
    pub series: SeriesIndex,
    pub windows: Vec<WindowOperator>,
    pub sensors: SensorOperator,
    pub agents: AgentOperator,
    pub anomalies: AnomalyOperator,
    pub alerts: AlertOperator,
    quarantine: Vec<Quarantined>,
    /// Blocks set aside since the last commit.
    pub set_aside: Vec<SetAside>,
    /// Derived readings since the last commit, in order.
    pub derived: Vec<Derived>,
    /// Derived readings appended to the log so far: the next one's sequence number.
    pub derived_seq: u64,
    /// Readings folded since the last commit.
    pub pending: u64,
    /// The readings folded since the last commit, while a live stream wants them.
    pub live: Option<LiveReadings>,
    /// Readings taken by [`Pipeline::fold_block`], not folded yet.
    staged: Vec<Staged>,
}

/// A reading taken from the log, waiting to be folded.
pub struct Staged {
    pub point: Point,
    pub offset: u64,
    /// Why it is quarantined instead of folded: stamped further ahead of its block's arrival
    /// than `max_clock_skew` (`future`), or its block is flagged by the agent (a clock never
    /// synchronised, `clock_unsynced`; a device clock beyond the agent's limits, `device_clock_skew`).
    pub quarantine: Option<&'static str>,
}

/// Readings staged before they are folded at the latest (a few MiB).
const STAGE_READINGS: usize = 16_384;
/// Fewer staged readings than this fold on one thread: starting threads would cost more.
const PARALLEL_READINGS: usize = 4_096;

/// Readings kept for the live stream (`crate::live`), at most [`crate::live::MAX_EVENT_READINGS`].
#[derive(Debug, Default)]
pub struct LiveReadings {
    pub readings: Vec<(u32, i64, f64)>,
    pub omitted: u64,
}

impl Pipeline {
    /// Loads each operator's state from the store.
    pub fn open(spec: PipelineSpec, conn: &Connection) -> Result<Pipeline, StoreError> {
        let windows =
            spec.calendars.iter().map(|c| WindowOperator::open(c.clone(), conn)).collect::<Result<Vec<_>, _>>()?;
        let derived_seq: Option<i64> = rusqlite::OptionalExtension::optional(conn.query_row(
            "SELECT value FROM pipeline_meta WHERE key = 'derived_seq'",
            [],
            |r| r.get(0),
        ))?;
        Ok(Pipeline {
            series: SeriesIndex::open(conn)?,
            windows,
            sensors: SensorOperator::open(conn)?,
            agents: AgentOperator::open(conn)?,
            anomalies: AnomalyOperator::new(spec.anomaly.clone()),
            alerts: AlertOperator::open(spec.alerts.clone(), conn)?,
            quarantine: Vec::new(),
            set_aside: Vec::new(),
            derived: Vec::new(),
            derived_seq: derived_seq.unwrap_or(0).max(0) as u64,
            pending: 0,
            live: None,
            staged: Vec::new(),
            spec,
        })
    }

    /// Takes one log block (its readings in order) for the operators: staged, and folded by
    /// [`Pipeline::fold_staged`] (at the latest when [`STAGE_READINGS`] are staged).
    pub fn fold_block(
        &mut self,
        conn: &Connection,
        first_offset: u64,
        agent_id: &str,
        received_at: i64,
        block: &BlockView<'_>,
    ) -> Result<(), StoreError> {
        let map: Vec<u32> = block.sensors.iter().map(|id| self.series.intern(id)).collect();
        let horizon = received_at.saturating_add(self.spec.max_clock_skew_ms);
        let flagged = block.clock.quarantine_reason();
        self.staged.reserve(block.entries.len());
        for (i, entry) in block.entries.iter().enumerate() {
            let Some(&series) = map.get(entry.sensor as usize) else { continue };
            self.staged.push(Staged {
                point: Point { series, ts: entry.ts, value: entry.value, received_at, block: first_offset },
                offset: first_offset + i as u64,
                quarantine: flagged.or((entry.ts > horizon).then_some("future")),
            });
        }
        self.agents.add_block(agent_id, block.entries.len() as u64, received_at);
        self.pending += block.entries.len() as u64;
        if self.staged.len() >= STAGE_READINGS {
            self.fold_staged(conn)?;
        }
        Ok(())
    }

    /// Folds the staged readings into every operator. Each window size folds on a thread of
    /// its own (with its own read connection for rows late data needs) while this thread runs
    /// sensor state, anomalies and alerts: operators share no state, and each still sees the
    /// readings in log order, so the tables are the same as folding them one after the other.
    pub fn fold_staged(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        let Pipeline { windows, series, sensors, anomalies, alerts, quarantine, derived, live, .. } = self;
        let mut others = |conn: &Connection| -> Result<(), StoreError> {
            for s in &staged {
                let point = &s.point;
                if let Some(reason) = s.quarantine {
                    sensors.quarantine(point);
                    quarantine.push(Quarantined {
                        offset: s.offset,
                        series: point.series,
                        ts: point.ts,
                        value: point.value,
                        received_at: point.received_at,
                        reason,
                    });
                    continue;
                }
                sensors.add(point);
                if let Some(live) = live {
                    if live.readings.len() < crate::live::MAX_EVENT_READINGS {
                        live.readings.push((point.series, point.ts, point.value));
                    } else {
                        live.omitted += 1;
                    }
                }
                let name = series.name(point.series);
                let mut anomalous = false;
                if !anomalies.is_empty() {
                    if let Some(a) = anomalies.add(conn, name, point, s.offset)? {
                        anomalous = true;
                        derived.push(Derived { sensor: format!("_anomaly/{name}"), ts: a.ts, value: a.score });
                    }
                }
                if !alerts.is_empty() {
                    let before = alerts.transitions().len();
                    alerts.add(conn, name, point, s.offset, anomalous)?;
                    for t in &alerts.transitions()[before..] {
                        derived.push(Derived {
                            sensor: format!("_alert/{}/{name}", t.rule),
                            ts: t.ts,
                            value: if t.state == "firing" { 1.0 } else { 0.0 },
                        });
                    }
                }
            }
            Ok(())
        };
        let parallel = staged.len() >= PARALLEL_READINGS && windows.iter().all(WindowOperator::has_reader);
        if !parallel {
            for op in windows.iter_mut() {
                op.add_staged(Some(conn), &staged)?;
            }
            return others(conn);
        }
        std::thread::scope(|scope| {
            let threads: Vec<_> = windows.iter_mut().map(|op| scope.spawn(|| op.add_staged(None, &staged))).collect();
            let mut result = others(conn);
            for thread in threads {
                let folded =
                    thread.join().unwrap_or_else(|_| Err(StoreError::Corrupt("a window operator panicked".into())));
                result = result.and(folded);
            }
            result
        })
    }

    /// Memory the window operators took since the last commit: a commit lets them drop it.
    pub fn grown_bytes(&self) -> usize {
        self.windows.iter().map(WindowOperator::grown_bytes).sum()
    }

    /// Alert transitions since the last commit (to notify once it is durable).
    pub fn transitions(&self) -> &[Transition] {
        self.alerts.transitions()
    }

    /// Writes every operator's changes and `next_offset` as `name`'s offset in one transaction.
    /// The caller appends [`Pipeline::derived`] to the log first, numbered from
    /// [`Pipeline::derived_seq`]: a crash in between redoes the same appends, which the log
    /// drops as duplicates.
    pub fn commit(&mut self, conn: &mut Connection, name: &str, next_offset: u64) -> Result<(), StoreError> {
        // Folding here would derive readings the caller has not appended to the log first.
        debug_assert!(self.staged.is_empty(), "fold_staged before commit");
        // Encoding the rows is most of a commit's work outside SQLite: one thread per size.
        let encoded: Vec<window::EncodedRows> = if self.windows.len() > 1 {
            std::thread::scope(|scope| {
                let threads: Vec<_> =
                    self.windows.iter_mut().map(|op| scope.spawn(move || op.encode_dirty())).collect();
                threads.into_iter().map(|t| t.join().unwrap_or_default()).collect()
            })
        } else {
            self.windows.iter().map(WindowOperator::encode_dirty).collect()
        };
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.series.flush(&tx)?;
        for (op, rows) in self.windows.iter().zip(&encoded) {
            op.write(&tx, rows)?;
        }
        self.sensors.flush(&tx)?;
        self.agents.flush(&tx)?;
        self.anomalies.flush(&tx)?;
        self.alerts.flush(&tx)?;
        tx.prepare_cached("INSERT OR REPLACE INTO pipeline_meta (key, value) VALUES ('derived_seq', ?1)")?
            .execute([(self.derived_seq + self.derived.len() as u64) as i64])?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO quarantine (offset, series, ts, value, received_at, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for q in &self.quarantine {
                stmt.execute(params![q.offset as i64, q.series as i64, q.ts, q.value, q.received_at, q.reason])?;
            }
        }
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO set_aside (first_offset, count, agent_id, reason, set_aside_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let now = crate::unix_ms();
            for b in &self.set_aside {
                stmt.execute(params![b.first_offset as i64, b.count as i64, b.agent_id, b.reason, now])?;
            }
        }
        tx.prepare_cached(
            "INSERT INTO processor_offsets (name, next_offset) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET next_offset = excluded.next_offset",
        )?
        .execute(params![name, next_offset as i64])?;
        tx.commit()?;
        self.series.committed();
        for (op, rows) in self.windows.iter_mut().zip(&encoded) {
            op.committed(rows);
        }
        self.sensors.committed();
        self.agents.committed();
        self.anomalies.committed();
        self.alerts.committed();
        self.derived_seq += self.derived.len() as u64;
        self.derived.clear();
        self.quarantine.clear();
        self.set_aside.clear();
        self.pending = 0;
        Ok(())
    }
}
