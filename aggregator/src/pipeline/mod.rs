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
#[derive(Debug, Default, Clone)]
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
    /// Empty while the operators fold on threads of their own (between [`Pipeline::fold_block`]
    /// calls); every method of the pipeline that needs them takes them back first.
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
    /// How many staged readings are folded at once ([`STAGE_READINGS`] unless the processor says
    /// it is catching up).
    pub stage_readings: usize,
    /// The window operators while they fold staged readings on threads of their own (`windows`
    /// is empty meanwhile).
    folding: Vec<Folder>,
    /// An operator's thread panicked or did not start: its state is gone.
    lost_operator: bool,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Operators still folding use connections and memory of their own: not left running.
        let _ = self.settle();
    }
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

/// Readings staged before they are folded at the latest, once caught up with the log (1 MiB).
pub const STAGE_READINGS: usize = 16_384;
/// [`STAGE_READINGS`] while catching up (a replay, a backlog: 4 MiB). Each window operator folds
/// a batch sensor by sensor, so a larger batch holds more of each sensor's readings together:
/// with 10,000 sensors a replay took a tenth less CPU than with batches of 16 K. Live, the larger
/// batches in flight were 10 MiB more peak RSS at 1.5 M readings/s.
pub const CATCH_UP_STAGE_READINGS: usize = 65_536;
/// Fewer staged readings than this fold on one thread: starting threads would cost more.
const PARALLEL_READINGS: usize = 4_096;

/// Batches of staged readings queued for each window operator's thread at most (the batches
/// are shared: a few batches in memory).
const FOLD_QUEUE: usize = 2;

/// A window operator on a thread of its own, folding the batches sent to it in order; it comes
/// back when the sender is dropped.
struct Folder {
    batches: std::sync::mpsc::SyncSender<std::sync::Arc<window::BySeries>>,
    /// What the operator has grown by since the last commit, as of the last batch it folded.
    grown: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<(WindowOperator, Result<(), StoreError>)>,
}

/// Readings kept for the live stream (`crate::live`), at most [`crate::live::MAX_EVENT_READINGS`].
#[derive(Debug, Default)]
pub struct LiveReadings {
    pub readings: Vec<(u32, i64, f64)>,
    pub omitted: u64,
}

/// What a commit writes besides the windows (borrowed from the [`Pipeline`] while its window
/// operators are on threads of their own).
struct Rest<'a> {
    sensors: &'a SensorOperator,
    agents: &'a AgentOperator,
    /// `None` in a [`CommitJob`], which writes its own encoded copies of them.
    anomalies: Option<&'a AnomalyOperator>,
    alerts: Option<&'a AlertOperator>,
    /// The derived readings' next sequence number after this commit.
    derived_seq: u64,
    quarantine: &'a [Quarantined],
    set_aside: &'a [SetAside],
}

impl Rest<'_> {
    fn write(&self, tx: &Connection, name: &str, next_offset: u64) -> Result<(), StoreError> {
        self.sensors.flush(tx)?;
        self.agents.flush(tx)?;
        if let Some(anomalies) = self.anomalies {
            anomalies.flush(tx)?;
        }
        if let Some(alerts) = self.alerts {
            alerts.flush(tx)?;
        }
        tx.prepare_cached("INSERT OR REPLACE INTO pipeline_meta (key, value) VALUES ('derived_seq', ?1)")?
            .execute([self.derived_seq as i64])?;
        let mut stmt = tx.prepare_cached(
            "INSERT OR IGNORE INTO quarantine (offset, series, ts, value, received_at, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for q in self.quarantine {
            stmt.execute(params![q.offset as i64, q.series as i64, q.ts, q.value, q.received_at, q.reason])?;
        }
        let mut stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO set_aside (first_offset, count, agent_id, reason, set_aside_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let now = crate::unix_ms();
        for b in self.set_aside {
            stmt.execute(params![b.first_offset as i64, b.count as i64, b.agent_id, b.reason, now])?;
        }
        tx.prepare_cached(
            "INSERT INTO processor_offsets (name, next_offset) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET next_offset = excluded.next_offset",
        )?
        .execute(params![name, next_offset as i64])?;
        Ok(())
    }
}

/// A commit prepared by [`Pipeline::commit_behind`], written by [`CommitJob::write`] on another
/// thread (with a connection of its own) while the pipeline folds on.
pub struct CommitJob {
    series: SeriesIndex,
    /// Each window operator's rows (with its size's code), as its encoding finishes: the writer
    /// starts on the first while the others are still encoding.
    windows: std::sync::mpsc::Receiver<(i64, std::sync::Arc<window::EncodedRows>)>,
    sensors: SensorOperator,
    agents: AgentOperator,
    anomalies: anomaly::AnomalyRows,
    alerts: alert::AlertRows,
    derived_seq: u64,
    quarantine: Vec<Quarantined>,
    set_aside: Vec<SetAside>,
    name: &'static str,
    /// The offset the commit before it ended at: it is written only after that one.
    from_offset: u64,
    next_offset: u64,
}

impl CommitJob {
    /// Writes the commit in one transaction, as [`Pipeline::commit`] does.
    pub fn write(&self, conn: &mut Connection) -> Result<(), StoreError> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.series.flush(&tx)?;
        // Until every operator's encoding has finished (one that panicked sends nothing: its
        // rows stay dirty and go with the next commit).
        for (code, rows) in self.windows.iter() {
            window::write_rows(code, &tx, &rows)?;
        }
        let rest = Rest {
            sensors: &self.sensors,
            agents: &self.agents,
            anomalies: None,
            alerts: None,
            derived_seq: self.derived_seq,
            quarantine: &self.quarantine,
            set_aside: &self.set_aside,
        };
        rest.write(&tx, self.name, self.next_offset)?;
        self.anomalies.write(&tx)?;
        self.alerts.write(&tx)?;
        tx.commit()?;
        Ok(())
    }
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
            stage_readings: STAGE_READINGS,
            folding: Vec::new(),
            lost_operator: false,
            spec,
        })
    }

    /// Takes one log block (its readings in order) for the operators: staged, and folded by
    /// [`Pipeline::fold_staged`] (at the latest when [`Pipeline::stage_readings`] are staged).
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
        // The window operators wait for the first batch after they met (at the start, after a
        // commit): a short one gets them going sooner (staging 64 K readings first left them idle
        // for a twentieth of a replay).
        let batch = if self.folding.is_empty() { self.stage_readings.min(STAGE_READINGS) } else { self.stage_readings };
        if self.staged.len() >= batch {
            self.fold_staged_on(conn, true)?;
        }
        Ok(())
    }

    /// Folds the staged readings into every operator, and waits until every window operator is
    /// done with them. Each window size folds on a thread of its own (with its own read
    /// connection for rows late data needs) while this thread runs sensor state, anomalies and
    /// alerts: operators share no state, and each still sees the readings in log order, so the
    /// tables are the same as folding them one after the other.
    pub fn fold_staged(&mut self, conn: &Connection) -> Result<(), StoreError> {
        self.fold_staged_on(conn, false)
    }

    /// [`Pipeline::fold_staged`]; with `background`, the window operators may still be folding
    /// when it returns, each on a thread of its own taking batches from a queue, while this
    /// thread stages the next readings. Waiting for all of them after every batch left a core
    /// idle a quarter of the time (three operators' equal shares on two cores) and staging ran
    /// alone; now they meet only when something needs them all ([`Pipeline::settle`]): when the
    /// processor has caught up with the log, and before a commit.
    fn fold_staged_on(&mut self, conn: &Connection, background: bool) -> Result<(), StoreError> {
        if self.staged.is_empty() {
            return if background { Ok(()) } else { self.settle() };
        }
        // While catching up, taken and given back emptied: its memory serves the next batch
        // (grown anew for each, it was copied five times over and faulted in again). Once caught
        // up, batches are small and far apart: memory between them goes back.
        let mut staged = std::mem::take(&mut self.staged);
        let result = self.fold_batch(conn, &staged, background);
        if self.stage_readings == CATCH_UP_STAGE_READINGS {
            staged.clear();
            self.staged = staged;
        }
        result
    }

    /// [`Pipeline::fold_staged_on`] of `staged`: put in sensor order once for every window
    /// operator, on their threads once there is enough to share.
    fn fold_batch(&mut self, conn: &Connection, staged: &[Staged], background: bool) -> Result<(), StoreError> {
        let batch = std::sync::Arc::new(window::BySeries::of(staged));
        let parallel = self.folding.is_empty()
            && staged.len() >= PARALLEL_READINGS
            && self.windows.iter().all(WindowOperator::has_reader);
        if parallel {
            self.start_folders();
        }
        if self.folding.is_empty() && !self.lost_operator {
            for op in self.windows.iter_mut() {
                op.add_batch(Some(conn), &batch)?;
            }
            return self.fold_others(conn, staged);
        }
        for folder in &self.folding {
            // A folder that stopped (it panicked) is found out by `settle`.
            let _ = folder.batches.send(batch.clone());
        }
        let result = self.fold_others(conn, staged);
        if background { result } else { result.and(self.settle()) }
    }

    /// Moves each window operator to a thread of its own that folds the batches sent to it.
    fn start_folders(&mut self) {
        for mut op in std::mem::take(&mut self.windows) {
            // A few batches queued at most: staging waits for the slowest operator.
            let (batches, queue) = std::sync::mpsc::sync_channel::<std::sync::Arc<window::BySeries>>(FOLD_QUEUE);
            let grown = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(op.grown_bytes()));
            let report = grown.clone();
            let spawned = std::thread::Builder::new().name("window fold".into()).spawn(move || {
                let mut result = Ok(());
                for batch in queue {
                    if result.is_ok() {
                        result = op.add_batch(None, &batch);
                        report.store(op.grown_bytes(), std::sync::atomic::Ordering::Relaxed);
                    }
                }
                (op, result)
            });
            match spawned {
                Ok(thread) => self.folding.push(Folder { batches, grown, thread }),
                // The operator went with the thread that did not start: the pipeline must be
                // opened again from the store (`settle` says so).
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a window operator's thread");
                    self.lost_operator = true;
                }
            }
        }
    }

    /// Waits for the window operators folding on threads of their own to finish what they were
    /// sent, and takes them back in their order. An operator whose thread panicked or did not
    /// start is gone: every call after that fails, until the pipeline is opened again from the
    /// store.
    fn settle(&mut self) -> Result<(), StoreError> {
        let mut result = Ok(());
        for Folder { batches, thread, .. } in std::mem::take(&mut self.folding) {
            drop(batches);
            match thread.join() {
                Ok((op, folded)) => {
                    self.windows.push(op);
                    result = result.and(folded);
                }
                Err(_) => {
                    self.lost_operator = true;
                    result = result.and(Err(StoreError::Corrupt("a window operator panicked".into())));
                }
            }
        }
        if self.lost_operator && result.is_ok() {
            result = Err(StoreError::Corrupt("a window operator was lost; the pipeline must be reopened".into()));
        }
        result
    }

    /// Sensor state, quarantine, the live stream, anomalies and alerts for the staged readings.
    fn fold_others(&mut self, conn: &Connection, staged: &[Staged]) -> Result<(), StoreError> {
        let Pipeline { series, sensors, anomalies, alerts, quarantine, derived, live, .. } = self;
        for s in staged {
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
    }

    /// Memory the window operators took since the last commit: a commit lets them drop it.
    pub fn grown_bytes(&self) -> usize {
        // While operators fold on their threads: as of the last batch each folded (up to a queue
        // of batches behind, which only delays the commit it calls for).
        let folding: usize = self.folding.iter().map(|f| f.grown.load(std::sync::atomic::Ordering::Relaxed)).sum();
        self.windows.iter().map(WindowOperator::grown_bytes).sum::<usize>() + folding
    }

    /// Alert transitions since the last commit (to notify once it is durable).
    pub fn transitions(&self) -> &[Transition] {
        self.alerts.transitions()
    }

    /// Writes every operator's changes and `next_offset` as `name`'s offset in one transaction.
    /// The caller appends [`Pipeline::derived`] to the log first, numbered from
    /// [`Pipeline::derived_seq`]: a crash in between redoes the same appends, which the log
    /// drops as duplicates. After a failed commit the pipeline's state is undefined: open it
    /// again from the store (the window operators let go of the rows they wrote while SQLite
    /// still writes and commits the rest).
    pub fn commit(&mut self, conn: &mut Connection, name: &str, next_offset: u64) -> Result<(), StoreError> {
        // Folding here would derive readings the caller has not appended to the log first.
        debug_assert!(self.staged.is_empty(), "fold_staged before commit");
        self.settle()?;
        let Pipeline { windows, series, .. } = self;
        let rest = Rest {
            sensors: &self.sensors,
            agents: &self.agents,
            anomalies: Some(&self.anomalies),
            alerts: Some(&self.alerts),
            derived_seq: self.derived_seq + self.derived.len() as u64,
            quarantine: &self.quarantine,
            set_aside: &self.set_aside,
        };
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        series.flush(&tx)?;
        if windows.len() > 1 {
            std::thread::scope(|scope| -> Result<(), StoreError> {
                // Encoding the rows is most of a commit's work outside SQLite: one thread per size.
                let threads: Vec<_> = windows
                    .iter_mut()
                    .map(|op| {
                        let code = op.calendar.code();
                        let thread = scope.spawn(move || {
                            let rows = op.encode_dirty();
                            (op, rows)
                        });
                        (code, thread)
                    })
                    .collect();
                // The coarser sizes first (fewer windows: encoded first). Once a size's rows are
                // written, its operator seals and frees them on its thread while SQLite writes
                // the next size's rows and commits: that was a tenth of a replay's time, with
                // the other core idle.
                let mut finishing = Vec::new();
                for (code, thread) in threads.into_iter().rev() {
                    let (op, rows) = thread
                        .join()
                        .map_err(|_| StoreError::Corrupt(format!("encoding the rows of size {code} panicked")))?;
                    window::write_rows(code, &tx, &rows)?;
                    finishing.push(scope.spawn(move || op.committed(&rows)));
                }
                rest.write(&tx, name, next_offset)?;
                tx.commit()?;
                for thread in finishing {
                    thread.join().map_err(|_| StoreError::Corrupt("a window operator panicked".into()))?;
                }
                Ok(())
            })?;
        } else {
            let encoded: Vec<window::EncodedRows> = windows.iter().map(WindowOperator::encode_dirty).collect();
            for (op, rows) in windows.iter().zip(&encoded) {
                op.write(&tx, rows)?;
            }
            rest.write(&tx, name, next_offset)?;
            tx.commit()?;
            for (op, rows) in windows.iter_mut().zip(&encoded) {
                op.committed(rows);
            }
        }
        self.series.committed();
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

    /// Whether [`Pipeline::commit_behind`] can be used: every window operator has a read
    /// connection of its own (rows it reads back go through the unwritten commit). Anomaly models
    /// and alert states are read through the caller's connection, which does not see a commit
    /// being written, but only for a series they have not met yet (they never leave memory), so
    /// never one the commit holds.
    pub fn can_commit_behind(&self) -> bool {
        // Operators fold on their threads only when each has a connection of its own.
        !self.folding.is_empty() || self.windows.iter().all(WindowOperator::has_reader)
    }

    /// [`Pipeline::commit`] without writing: the pipeline is as after a commit, and the returned
    /// job writes it (on another thread, while the pipeline folds on; SQLite's part of a commit
    /// was a fifth of a replay's time with the other core idle). It may be made while the job
    /// before is still being written (neither reads the store), but is handed to the writer only
    /// after that one is written: before folding on, the caller gives the window operators its
    /// rows ([`Pipeline::writing`]), through which they read rows back until
    /// [`Pipeline::written`]. After a job fails, open the pipeline again from the store. The
    /// caller appends [`Pipeline::derived`] to the log first, as for [`Pipeline::commit`].
    /// Only when [`Pipeline::can_commit_behind`].
    ///
    /// `send` gets the job before the window operators have encoded their rows (each sends its
    /// rows to the job when done): the writer starts on the first while the largest still
    /// encodes (at the first commit of a replay, one core was idle a tenth of the time waiting
    /// for the finest size's encoding). Returns each operator's rows, for [`Pipeline::writing`].
    pub fn commit_behind<E>(
        &mut self,
        name: &'static str,
        from_offset: u64,
        next_offset: u64,
        send: impl FnOnce(CommitJob) -> Result<(), E>,
    ) -> Result<Result<Vec<std::sync::Arc<window::EncodedRows>>, E>, StoreError> {
        debug_assert!(self.staged.is_empty(), "fold_staged before commit");
        self.settle()?;
        debug_assert!(self.can_commit_behind());
        let (windows, encoded) = std::sync::mpsc::channel();
        let job = CommitJob {
            series: self.series.clone(),
            windows: encoded,
            sensors: self.sensors.clone(),
            agents: self.agents.clone(),
            anomalies: self.anomalies.to_write(),
            alerts: self.alerts.to_write(),
            derived_seq: self.derived_seq + self.derived.len() as u64,
            quarantine: std::mem::take(&mut self.quarantine),
            set_aside: std::mem::take(&mut self.set_aside),
            name,
            from_offset,
            next_offset,
        };
        self.derived_seq = job.derived_seq;
        let sent = send(job);
        let encoded: Vec<std::sync::Arc<window::EncodedRows>> = std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .windows
                .iter_mut()
                .map(|op| {
                    let windows = windows.clone();
                    scope.spawn(move || {
                        let rows = std::sync::Arc::new(op.encode_dirty());
                        op.committed(&rows);
                        // Not sent if the writer gave up on the job (it failed).
                        let _ = windows.send((op.calendar.code(), rows.clone()));
                        rows
                    })
                })
                .collect();
            drop(windows);
            // A panicked thread leaves its operator's rows dirty: they go with the next commit.
            threads.into_iter().map(|t| t.join().unwrap_or_default()).collect()
        });
        self.series.committed();
        self.sensors.committed();
        self.agents.committed();
        self.anomalies.committed();
        self.alerts.committed();
        self.derived.clear();
        self.pending = 0;
        Ok(sent.map(|()| encoded))
    }

    /// Before folding on while a commit is written: rows read back are read through its rows
    /// (`encoded`, each window operator's; the store does not show them yet).
    pub fn writing(&mut self, encoded: &[std::sync::Arc<window::EncodedRows>]) {
        for (op, rows) in self.windows.iter_mut().zip(encoded) {
            op.set_writing(Some(rows.clone()));
        }
    }

    /// After the last [`CommitJob`] is committed: the store shows its rows.
    pub fn written(&mut self) -> Result<(), StoreError> {
        self.settle()?;
        for op in &mut self.windows {
            op.set_writing(None);
        }
        Ok(())
    }
}
