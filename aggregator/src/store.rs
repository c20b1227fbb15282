//! The serving store (`store.db`): what the processor has made of the log, read by the API.
//!
//! Tables: `sensors` (count and latest reading per sensor), `windows` (1-minute tumbling windows by
//! event time: count, min, max, sum — all mergeable, so late readings update old windows and
//! coarser windows are merged at query time), `agents`, and `processor_offsets`. The processor
//! writes results and its log offset in one transaction, so the store never counts a block twice
//! or misses one across a crash.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::process::Aggregate;

/// Width of the stored windows; coarser ones are merged from these.
pub const WINDOW_MS: i64 = 60_000;

/// The name under which the built-in processor commits its offset.
pub const PROCESSOR_NAME: &str = "main";

/// Read connections kept open for the API (each query borrows one on a blocking thread).
const READ_POOL: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("serving store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("serving store: journal_mode is {0}, WAL is needed")]
    NotWal(String),
    #[error("serving store query was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Mergeable aggregate of readings: count, min, max, sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

impl Window {
    pub fn of(value: f64) -> Window {
        Window { count: 1, min: value, max: value, sum: value }
    }

    pub fn add(&mut self, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
    }

    pub fn merge(&mut self, other: &Window) {
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }
}

/// The start of the 1-minute window holding event time `ts`.
pub fn minute_of(ts: i64) -> i64 {
    ts.div_euclid(WINDOW_MS) * WINDOW_MS
}

/// Merges 1-minute windows (sorted by start) into tumbling windows of `size_ms` (a whole number
/// of minutes), aligned on the Unix epoch.
pub fn merge_windows(minutes: &[(i64, Window)], size_ms: i64) -> Vec<(i64, Window)> {
    let mut merged: Vec<(i64, Window)> = Vec::new();
    for (start, window) in minutes {
        let bucket = start.div_euclid(size_ms) * size_ms;
        match merged.last_mut() {
            Some((last, acc)) if *last == bucket => acc.merge(window),
            _ => merged.push((bucket, *window)),
        }
    }
    merged
}

/// A sensor as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SensorRow {
    pub id: String,
    pub count: u64,
    pub last_value: f64,
    pub last_ts: i64,
    pub last_seen: i64,
}

/// What the store knows of an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRow {
    pub id: String,
    pub readings: u64,
    pub last_seen: i64,
}

fn set_pragmas(conn: &Connection) -> Result<(), StoreError> {
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotWal(mode));
    }
    // FULL like the log: the processor's offset must not get ahead of results a power cut loses.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// The processor's write side of the store.
pub struct StoreWriter {
    conn: Connection,
}

impl StoreWriter {
    /// Opens (creating if needed) `store.db`.
    pub fn open(path: &Path) -> Result<StoreWriter, StoreError> {
        let conn = Connection::open(path)?;
        set_pragmas(&conn)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sensors (
                id TEXT PRIMARY KEY,
                count INTEGER NOT NULL,
                last_value REAL NOT NULL,
                last_ts INTEGER NOT NULL,
                last_seen INTEGER NOT NULL
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS windows (
                sensor TEXT NOT NULL,
                start INTEGER NOT NULL,
                count INTEGER NOT NULL,
                min REAL NOT NULL,
                max REAL NOT NULL,
                sum REAL NOT NULL,
                PRIMARY KEY (sensor, start)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS agents (
                id TEXT PRIMARY KEY,
                readings INTEGER NOT NULL,
                last_seen INTEGER NOT NULL
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS processor_offsets (
                name TEXT PRIMARY KEY,
                next_offset INTEGER NOT NULL
            ) WITHOUT ROWID;",
        )?;
        Ok(StoreWriter { conn })
    }

    /// The log offset from which `name` resumes (0 for a new store).
    pub fn offset(&self, name: &str) -> Result<u64, StoreError> {
        let offset: Option<i64> = self
            .conn
            .query_row("SELECT next_offset FROM processor_offsets WHERE name = ?1", [name], |r| r.get(0))
            .optional()?;
        Ok(offset.unwrap_or(0).max(0) as u64)
    }

    /// Merges an aggregate into the store and moves `name`'s offset to `next_offset`, atomically.
    pub fn apply(&mut self, name: &str, aggregate: &Aggregate, next_offset: u64) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            // On a tie in event time the later reading in the log wins: this batch is later.
            let mut sensor = tx.prepare_cached(
                "INSERT INTO sensors (id, count, last_value, last_ts, last_seen) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET
                    count = count + excluded.count,
                    last_value = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last_value ELSE last_value END,
                    last_ts = MAX(last_ts, excluded.last_ts),
                    last_seen = MAX(last_seen, excluded.last_seen)",
            )?;
            for (id, s) in aggregate.sensors() {
                sensor.execute(params![id, s.count as i64, s.last_value, s.last_ts, s.last_seen])?;
            }
            let mut window = tx.prepare_cached(
                "INSERT INTO windows (sensor, start, count, min, max, sum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (sensor, start) DO UPDATE SET
                    count = count + excluded.count,
                    min = MIN(min, excluded.min),
                    max = MAX(max, excluded.max),
                    sum = sum + excluded.sum",
            )?;
            for (id, start, w) in aggregate.windows() {
                window.execute(params![id, start, w.count as i64, w.min, w.max, w.sum])?;
            }
            let mut agent = tx.prepare_cached(
                "INSERT INTO agents (id, readings, last_seen) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET
                    readings = readings + excluded.readings,
                    last_seen = MAX(last_seen, excluded.last_seen)",
            )?;
            for (id, a) in aggregate.agents() {
                agent.execute(params![id, a.readings as i64, a.last_seen])?;
            }
            tx.prepare_cached(
                "INSERT INTO processor_offsets (name, next_offset) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET next_offset = excluded.next_offset",
            )?
            .execute(params![name, next_offset as i64])?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Read-only access for the API, off the async runtime, with a few pooled connections.
#[derive(Clone)]
pub struct StoreReader {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Connection>>>,
}

impl StoreReader {
    /// `path` must already exist (the processor creates it at start).
    pub fn new(path: &Path) -> StoreReader {
        StoreReader { path: path.to_path_buf(), pool: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Runs `query` on a pooled read-only connection in a blocking thread.
    pub async fn read<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = self.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = reader.pool.lock().ok().and_then(|mut pool| pool.pop());
            let conn = match pooled {
                Some(conn) => conn,
                None => Connection::open_with_flags(
                    &reader.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?,
            };
            let result = query(&conn);
            if let Ok(mut pool) = reader.pool.lock() {
                if pool.len() < READ_POOL {
                    pool.push(conn);
                }
            }
            result
        })
        .await?
    }
}

fn sensor_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SensorRow> {
    Ok(SensorRow {
        id: row.get(0)?,
        count: row.get::<_, i64>(1)?.max(0) as u64,
        last_value: row.get(2)?,
        last_ts: row.get(3)?,
        last_seen: row.get(4)?,
    })
}

/// All sensors, sorted by id (byte order).
pub fn sensors(conn: &Connection) -> Result<Vec<SensorRow>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT id, count, last_value, last_ts, last_seen FROM sensors ORDER BY id")?;
    let rows = stmt.query_map([], sensor_row)?.collect::<Result<_, _>>()?;
    Ok(rows)
}

/// One sensor, if the store knows it.
pub fn sensor(conn: &Connection, id: &str) -> Result<Option<SensorRow>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, count, last_value, last_ts, last_seen FROM sensors WHERE id = ?1")?;
    Ok(stmt.query_row([id], sensor_row).optional()?)
}

/// A sensor's 1-minute windows with `from <= start < to`, sorted by start.
pub fn minute_windows(conn: &Connection, id: &str, from: i64, to: i64) -> Result<Vec<(i64, Window)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT start, count, min, max, sum FROM windows WHERE sensor = ?1 AND start >= ?2 AND start < ?3 ORDER BY start",
    )?;
    let rows = stmt
        .query_map(params![id, from, to], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                Window { count: r.get::<_, i64>(1)?.max(0) as u64, min: r.get(2)?, max: r.get(3)?, sum: r.get(4)? },
            ))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Every agent the processor has seen.
pub fn agents(conn: &Connection) -> Result<Vec<AgentRow>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT id, readings, last_seen FROM agents ORDER BY id")?;
    let rows = stmt
        .query_map([], |r| {
            Ok(AgentRow { id: r.get(0)?, readings: r.get::<_, i64>(1)?.max(0) as u64, last_seen: r.get(2)? })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(values: &[f64]) -> Window {
        let mut window = Window::of(values[0]);
        for v in &values[1..] {
            window.add(*v);
        }
        window
    }

    #[test]
    fn minutes_merge_into_aligned_coarser_windows() {
        let base = 1_764_000_000_000 / 300_000 * 300_000;
        let minutes = [
            (base, w(&[1.0, 2.0])),
            (base + 60_000, w(&[5.0])),
            (base + 240_000, w(&[-1.0])),
            (base + 300_000, w(&[7.0, 9.0])),
        ];
        let merged = merge_windows(&minutes, 300_000);
        assert_eq!(merged, [(base, w(&[1.0, 2.0, 5.0, -1.0])), (base + 300_000, w(&[7.0, 9.0]))]);
        assert_eq!(merge_windows(&minutes, 60_000), minutes);
    }

    #[test]
    fn late_readings_merge_into_their_minute() {
        let mut a = w(&[3.0]);
        a.merge(&w(&[1.0, 10.0]));
        assert_eq!(a, Window { count: 3, min: 1.0, max: 10.0, sum: 14.0 });
        assert_eq!(minute_of(119_999), 60_000);
        assert_eq!(minute_of(120_000), 120_000);
    }
}
