//! The serving store (`store.db`): what the processor has made of the log, read by the API.
//!
//! Tables: `sensors` (count and latest reading per sensor), `windows` (1-minute tumbling windows by
//! event time: count, min, max, mean — all mergeable, so late readings update old windows and
//! coarser windows are merged at query time), `agents`, `set_aside` (log blocks the processor
//! could not use, with the reason) and `processor_offsets`. The processor writes results and its
//! log offset in one transaction, so the store never counts a block twice or misses one across a
//! crash. The store holds nothing the log does not: an old schema is dropped and rebuilt by
//! replaying the log.

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

/// `PRAGMA user_version` of the current layout. 0 was the first (windows kept a `sum`, which
/// overflows); 2 keeps the mean and adds `set_aside`.
pub const SCHEMA_VERSION: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("serving store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("serving store: journal_mode is {0}, WAL is needed")]
    NotWal(String),
    #[error(
        "serving store {path} has schema version {found}, this binary knows up to {SCHEMA_VERSION}: run the newer \
         binary, or delete store.db to rebuild it from the log"
    )]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("serving store query was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Mergeable aggregate of readings: count, min, max and mean.
///
/// The mean is kept rather than the sum: a sum of finite readings overflows (two of `1e308` make
/// `inf`, and `inf + -inf` makes NaN), while a mean of finite readings lies in `[min, max]`. Every
/// update keeps it there, so all four fields stay finite whatever finite values arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

impl Window {
    pub fn of(value: f64) -> Window {
        Window { count: 1, min: value, max: value, mean: value }
    }

    /// Folds in one reading (the processor's per-reading path).
    pub fn add(&mut self, value: f64) {
        self.count = self.count.saturating_add(1);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        let n = self.count as f64;
        let delta = value - self.mean;
        let mean = if delta.is_finite() {
            self.mean + delta / n
        } else {
            // `value - mean` overflowed (opposite signs near f64::MAX): a weighted mean of finite terms.
            self.mean * ((n - 1.0) / n) + value / n
        };
        self.mean = self.bounded(mean);
    }

    /// Merges another window's readings into this one (late readings, coarser windows).
    pub fn merge(&mut self, other: &Window) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let count = self.count.saturating_add(other.count);
        let n = count as f64;
        let delta = other.mean - self.mean;
        let mean = if delta.is_finite() {
            // Chan et al.: exact when both means are equal, accurate when they are close.
            self.mean + delta * (other.count as f64 / n)
        } else {
            self.mean * (self.count as f64 / n) + other.mean * (other.count as f64 / n)
        };
        self.count = count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.mean = self.bounded(mean);
    }

    /// The exact mean lies in [min, max]; rounding can step just outside (or, summing two terms
    /// near f64::MAX, to infinity), so clamp. Written with min/max, which cannot panic, unlike
    /// `f64::clamp`.
    fn bounded(&self, mean: f64) -> f64 {
        mean.max(self.min).min(self.max)
    }
}

/// The largest multiple of `size` at or below `x`, saturating at `i64::MIN` (query bounds are
/// not limited to the readings' 2000..9999 range).
pub fn align_down(x: i64, size: i64) -> i64 {
    x.checked_sub(x.rem_euclid(size)).unwrap_or(i64::MIN)
}

/// The smallest multiple of `size` at or above `x`; `None` if it is beyond `i64::MAX`.
pub fn align_up(x: i64, size: i64) -> Option<i64> {
    match x.rem_euclid(size) {
        0 => Some(x),
        r => x.checked_add(size - r),
    }
}

/// The start of the 1-minute window holding event time `ts`.
pub fn minute_of(ts: i64) -> i64 {
    align_down(ts, WINDOW_MS)
}

/// Merges 1-minute windows (sorted by start) into tumbling windows of `size_ms` (a whole number
/// of minutes), aligned on the Unix epoch. `None` once there would be more than `max` windows.
pub fn merge_windows(
    minutes: impl IntoIterator<Item = (i64, Window)>,
    size_ms: i64,
    max: usize,
) -> Option<Vec<(i64, Window)>> {
    let mut merged: Vec<(i64, Window)> = Vec::new();
    for (start, window) in minutes {
        let bucket = align_down(start, size_ms);
        if let Some((last, acc)) = merged.last_mut() {
            if *last == bucket {
                acc.merge(&window);
                continue;
            }
        }
        if merged.len() >= max {
            return None;
        }
        merged.push((bucket, window));
    }
    Some(merged)
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

/// A log block the processor set aside instead of folding it in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetAsideRow {
    /// Offset of the block's first reading in the log (its key in `log.db`'s `blocks`).
    pub first_offset: u64,
    /// The readings the log's `count` column claims for it.
    pub count: u64,
    pub agent: String,
    pub reason: String,
    /// When the processor set it aside (Unix ms).
    pub set_aside_at: i64,
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

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sensors (
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
        mean REAL NOT NULL,
        PRIMARY KEY (sensor, start)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS agents (
        id TEXT PRIMARY KEY,
        readings INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS set_aside (
        first_offset INTEGER PRIMARY KEY,
        count INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        set_aside_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS processor_offsets (
        name TEXT PRIMARY KEY,
        next_offset INTEGER NOT NULL
    ) WITHOUT ROWID;";

/// Creates the tables, or rebuilds a store of an older layout: everything in it is derived from
/// the log, so dropping it and resetting the offset to 0 makes the processor replay the log.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema { path: path.to_path_buf(), found: version });
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let tables: Vec<String> = tx
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if !tables.is_empty() {
        tracing::warn!(
            path = %path.display(),
            from = version,
            to = SCHEMA_VERSION,
            "the serving store has an older layout; rebuilding it from the log"
        );
    }
    for table in &tables {
        tx.execute_batch(&format!("DROP TABLE \"{}\"", table.replace('"', "\"\"")))?;
    }
    tx.execute_batch(SCHEMA)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// The processor's write side of the store.
pub struct StoreWriter {
    conn: Connection,
}

impl StoreWriter {
    /// Opens (creating if needed) `store.db`, rebuilding it if its layout is older.
    pub fn open(path: &Path) -> Result<StoreWriter, StoreError> {
        let mut conn = Connection::open(path)?;
        set_pragmas(&conn)?;
        migrate(&mut conn, path)?;
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

    /// Blocks and readings set aside so far.
    pub fn set_aside_totals(&self) -> Result<(u64, u64), StoreError> {
        let (blocks, readings): (i64, i64) =
            self.conn.query_row("SELECT COUNT(*), COALESCE(SUM(count), 0) FROM set_aside", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        Ok((blocks.max(0) as u64, readings.max(0) as u64))
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
            // Windows merge in Rust, not in SQL, so that `Window::merge` is the one definition of
            // how means combine (and the one the property tests check).
            let mut stored =
                tx.prepare_cached("SELECT count, min, max, mean FROM windows WHERE sensor = ?1 AND start = ?2")?;
            let mut window = tx.prepare_cached(
                "INSERT INTO windows (sensor, start, count, min, max, mean) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (sensor, start) DO UPDATE SET
                    count = excluded.count, min = excluded.min, max = excluded.max, mean = excluded.mean",
            )?;
            // In key order, so the B-tree is walked once instead of at random (the in-memory fold
            // is a hash map): 2-3x fewer page visits for a backlog touching many windows.
            let mut windows: Vec<(&str, i64, &Window)> = aggregate.windows().collect();
            windows.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            for (id, start, w) in windows {
                let merged = match stored.query_row(params![id, start], |r| window_at(r, 0)).optional()? {
                    Some(mut old) => {
                        old.merge(w);
                        old
                    }
                    None => *w,
                };
                window.execute(params![id, start, merged.count as i64, merged.min, merged.max, merged.mean])?;
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
            let mut set_aside = tx.prepare_cached(
                "INSERT OR REPLACE INTO set_aside (first_offset, count, agent_id, reason, set_aside_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let now = crate::unix_ms();
            for block in aggregate.set_aside() {
                set_aside.execute(params![
                    block.first_offset as i64,
                    block.count as i64,
                    block.agent_id,
                    block.reason,
                    now
                ])?;
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

/// A page of rows and whether more follow it.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub more: bool,
}

/// Up to `limit` sensors whose id starts with `prefix` and sorts after `after`, sorted by id
/// (byte order, as SQLite compares TEXT and Rust compares `str`).
pub fn sensors(
    conn: &Connection,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Page<SensorRow>, StoreError> {
    // Ids with a common prefix are one contiguous run in byte order: start at the later of the
    // prefix and the cursor, stop at the first id without the prefix.
    let (sql, bound) = match after {
        Some(after) if after >= prefix => {
            ("SELECT id, count, last_value, last_ts, last_seen FROM sensors WHERE id > ?1 ORDER BY id", after)
        }
        _ => ("SELECT id, count, last_value, last_ts, last_seen FROM sensors WHERE id >= ?1 ORDER BY id", prefix),
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query([bound])?;
    let mut page = Page { rows: Vec::new(), more: false };
    while let Some(row) = rows.next()? {
        let sensor = sensor_row(row)?;
        if !sensor.id.starts_with(prefix) {
            break;
        }
        if page.rows.len() == limit {
            page.more = true;
            break;
        }
        page.rows.push(sensor);
    }
    Ok(page)
}

/// One sensor, if the store knows it.
pub fn sensor(conn: &Connection, id: &str) -> Result<Option<SensorRow>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, count, last_value, last_ts, last_seen FROM sensors WHERE id = ?1")?;
    Ok(stmt.query_row([id], sensor_row).optional()?)
}

/// A sensor's windows of `size_ms` whose 1-minute windows start in `[from, to)` (`from` and `to`
/// aligned on `size_ms`), merged and sorted by start; `None` if there are more than `max`. Reads
/// minutes only until the cap is passed.
pub fn windows(
    conn: &Connection,
    id: &str,
    from: i64,
    to: i64,
    size_ms: i64,
    max: usize,
) -> Result<Option<Vec<(i64, Window)>>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT start, count, min, max, mean FROM windows WHERE sensor = ?1 AND start >= ?2 AND start < ?3 ORDER BY start",
    )?;
    let mut rows = stmt.query(params![id, from, to])?;
    let mut failed = None;
    let minutes = std::iter::from_fn(|| match rows.next() {
        Ok(Some(row)) => match (row.get::<_, i64>(0), window_at(row, 1)) {
            (Ok(start), Ok(window)) => Some((start, window)),
            (Err(e), _) | (_, Err(e)) => {
                failed = Some(e);
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            failed = Some(e);
            None
        }
    });
    let merged = merge_windows(minutes, size_ms, max);
    match failed {
        Some(error) => Err(error.into()),
        None => Ok(merged),
    }
}

/// The window in columns `i..i + 4` (count, min, max, mean).
fn window_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Window> {
    Ok(Window { count: r.get::<_, i64>(i)?.max(0) as u64, min: r.get(i + 1)?, max: r.get(i + 2)?, mean: r.get(i + 3)? })
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

/// Up to `limit` set-aside blocks after log offset `after`, by offset.
pub fn set_aside(conn: &Connection, after: Option<u64>, limit: usize) -> Result<Page<SetAsideRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT first_offset, count, agent_id, reason, set_aside_at FROM set_aside
         WHERE first_offset > ?1 ORDER BY first_offset LIMIT ?2",
    )?;
    let after = after.map_or(-1, |a| a.min(i64::MAX as u64) as i64);
    let mut rows: Vec<SetAsideRow> = stmt
        .query_map(params![after, limit.saturating_add(1) as i64], |r| {
            Ok(SetAsideRow {
                first_offset: r.get::<_, i64>(0)?.max(0) as u64,
                count: r.get::<_, i64>(1)?.max(0) as u64,
                agent: r.get(2)?,
                reason: r.get(3)?,
                set_aside_at: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    Ok(Page { rows, more })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(values: &[f64]) -> Window {
        let mut window = Window::of(values[0]);
        for v in &values[1..] {
            window.add(*v);
        }
        window
    }

    /// Count, min and max exactly; the mean within `tolerance(values)`.
    fn assert_same(a: &Window, b: &Window, values: &[f64]) {
        assert_eq!((a.count, a.min, a.max), (b.count, b.min, b.max));
        let tol = tolerance(values);
        assert!((a.mean - b.mean).abs() <= tol, "means {} and {} differ by more than {tol}", a.mean, b.mean);
    }

    /// The stated accuracy of a mean: each add or merge rounds a few terms no larger than the
    /// largest |value|, so n values cost at most 8·n·ε·max|x| (and at least one subnormal step).
    fn tolerance(values: &[f64]) -> f64 {
        let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        8.0 * values.len() as f64 * (f64::EPSILON * largest).max(f64::from_bits(1))
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
        let merged = merge_windows(minutes, 300_000, 10).unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].0, base);
        assert_same(&merged[0].1, &w(&[1.0, 2.0, 5.0, -1.0]), &[1.0, 2.0, 5.0, -1.0]);
        assert_eq!(merged[1], (base + 300_000, w(&[7.0, 9.0])));
        assert_eq!(merge_windows(minutes, 60_000, 10).unwrap(), minutes);
        assert_eq!(merge_windows(minutes, 60_000, 4).unwrap(), minutes, "exactly the cap is fine");
        assert_eq!(merge_windows(minutes, 60_000, 3), None, "one over the cap is refused");
        assert_eq!(merge_windows(minutes, 300_000, 2).map(|m| m.len()), Some(2), "the cap counts merged windows");
    }

    #[test]
    fn late_readings_merge_into_their_minute() {
        let mut a = w(&[3.0]);
        a.merge(&w(&[1.0, 10.0]));
        assert_same(&a, &Window { count: 3, min: 1.0, max: 10.0, mean: 14.0 / 3.0 }, &[3.0, 1.0, 10.0]);
        assert_eq!(minute_of(119_999), 60_000);
        assert_eq!(minute_of(120_000), 120_000);
    }

    #[test]
    fn opposite_readings_near_the_limit_average_to_zero() {
        // The reported case: the old running sum went to inf, then inf + -inf = NaN.
        let all = w(&[1e308, 1e308, -1e308, -1e308]);
        assert_eq!(all, Window { count: 4, min: -1e308, max: 1e308, mean: 0.0 });
        let mut merged = w(&[1e308, 1e308]);
        merged.merge(&w(&[-1e308, -1e308]));
        assert_eq!(merged, all);
        let extremes = w(&[f64::MAX, -f64::MAX, f64::MIN_POSITIVE]);
        assert_eq!(extremes.mean, f64::MIN_POSITIVE / 3.0);
    }

    #[test]
    fn alignment_saturates_instead_of_overflowing() {
        assert_eq!(align_up(0, 60), Some(0));
        assert_eq!(align_up(1, 60), Some(60));
        assert_eq!(align_up(-1, 60), Some(0));
        assert_eq!(align_up(i64::MIN, 60_000), Some(i64::MIN + 4_192 + (60_000 - 8_384)));
        assert_eq!(align_up(i64::MAX, 60_000), None);
        assert_eq!(align_down(-1, 60), -60);
        assert_eq!(align_down(i64::MIN, 60_000), i64::MIN, "saturates");
        assert_eq!(align_down(i64::MAX, 60_000) % 60_000, 0);
    }

    /// A generator of pseudo-random numbers for the accuracy data sets (xorshift64*).
    struct Xorshift(u64);

    impl Xorshift {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// The exact mean of values whose ulp is at least 2⁻⁶² (|x| ≥ 2⁻¹⁰): each is an integer
    /// times 2⁻⁶², so an i128 sums them without rounding; the mean is then rounded twice.
    fn exact_mean(values: &[f64]) -> f64 {
        let scale = 2f64.powi(62);
        let sum: i128 = values
            .iter()
            .map(|v| {
                assert!(*v == 0.0 || v.abs() >= 2f64.powi(-10));
                (v * scale) as i128
            })
            .sum();
        sum as f64 / values.len() as f64 / scale
    }

    #[test]
    fn means_match_exact_sums_on_ordinary_data() {
        let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
        let n = 100_000;
        let sets: Vec<(&str, Vec<f64>)> = vec![
            ("room temperature", (0..n).map(|_| 21.0 + 4.0 * (rng.unit() - 0.5)).collect()),
            ("ramp", (0..n).map(|i| 0.5 + i as f64 * 0.01).collect()),
            ("large offset, small noise", (0..n).map(|_| 900.0 + rng.unit() * 0.01).collect()),
            ("mixed signs", (0..n).map(|_| (rng.unit() - 0.45) * 2000.0).filter(|v| v.abs() >= 0.001).collect()),
        ];
        for (name, values) in &sets {
            let exact = exact_mean(values);
            let folded = w(values).mean;
            // A day window: 1,440 minutes folded separately, then merged.
            let mut day = w(&values[..values.len() / 1440]);
            for minute in values[values.len() / 1440..].chunks(values.len() / 1440 + 1) {
                day.merge(&w(minute));
            }
            let naive = values.iter().sum::<f64>() / values.len() as f64;
            let rel = |x: f64| ((x - exact) / exact).abs();
            eprintln!(
                "{name}: relative error folded {:.1e}, merged {:.1e}, naive sum/n {:.1e}",
                rel(folded),
                rel(day.mean),
                rel(naive)
            );
            assert!(rel(folded) < 1e-12 && rel(day.mean) < 1e-12, "{name}: {folded} / {} vs {exact}", day.mean);
        }
    }

    /// Any finite f64, with the extremes and ordinary values well represented.
    fn finite() -> impl Strategy<Value = f64> {
        use proptest::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
        prop_oneof![
            3 => POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO,
            2 => -1e3..1e3f64,
            1 => prop::sample::select(vec![
                f64::MAX,
                -f64::MAX,
                1e308,
                -1e308,
                f64::MIN_POSITIVE,
                -f64::MIN_POSITIVE,
                f64::from_bits(1),
                -f64::from_bits(1),
                0.0,
                -0.0,
            ]),
        ]
    }

    proptest! {
        #[test]
        fn windows_stay_finite_and_within_min_max(values in prop::collection::vec(finite(), 1..200)) {
            let window = w(&values);
            prop_assert_eq!(window.count, values.len() as u64);
            prop_assert_eq!(window.min, values.iter().copied().fold(f64::INFINITY, f64::min));
            prop_assert_eq!(window.max, values.iter().copied().fold(f64::NEG_INFINITY, f64::max));
            prop_assert!(window.mean.is_finite() && window.min <= window.mean && window.mean <= window.max,
                "{:?}", window);
        }

        #[test]
        fn merging_in_any_grouping_matches_folding(
            values in prop::collection::vec(finite(), 1..200),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let folded = w(&values);
            // Split the readings into runs at random points, fold each run, then merge the runs
            // pairwise in a random order.
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(values.len())).chain([0, values.len()]).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut parts: Vec<Window> = cuts.windows(2).map(|r| w(&values[r[0]..r[1]])).collect();
            let mut picks = order.iter().cycle();
            while parts.len() > 1 {
                let a = parts.swap_remove(picks.next().map_or(0, |i| i.index(parts.len())));
                let b = parts.swap_remove(picks.next().map_or(0, |i| i.index(parts.len())));
                let mut merged = a;
                merged.merge(&b);
                prop_assert!(merged.mean.is_finite() && merged.min <= merged.mean && merged.mean <= merged.max);
                parts.push(merged);
            }
            assert_same(&parts[0], &folded, &values);
        }
    }

    #[test]
    fn a_store_of_the_old_layout_is_rebuilt_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE windows (sensor TEXT, start INTEGER, count INTEGER, min REAL, max REAL, sum REAL);
                 INSERT INTO windows VALUES ('a', 0, 2, 1e308, 1e308, 9e999);
                 CREATE TABLE processor_offsets (name TEXT PRIMARY KEY, next_offset INTEGER NOT NULL);
                 INSERT INTO processor_offsets VALUES ('main', 42);",
            )
            .unwrap();
        }
        let store = StoreWriter::open(&path).unwrap();
        assert_eq!(store.offset(PROCESSOR_NAME).unwrap(), 0, "replays the log from the start");
        let columns: Vec<String> = store
            .conn
            .prepare("SELECT name FROM pragma_table_info('windows')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(columns, ["sensor", "start", "count", "min", "max", "mean"]);
        assert_eq!(store.set_aside_totals().unwrap(), (0, 0));
        drop(store);
        // Opening it again keeps it.
        let mut store = StoreWriter::open(&path).unwrap();
        store.apply(PROCESSOR_NAME, &Aggregate::default(), 7).unwrap();
        drop(store);
        assert_eq!(StoreWriter::open(&path).unwrap().offset(PROCESSOR_NAME).unwrap(), 7);

        Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let error = StoreWriter::open(&path).err().unwrap().to_string();
        assert!(error.contains("delete store.db to rebuild it"), "{error}");
    }
}
