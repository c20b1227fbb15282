//! The serving store (`store.db`): what the pipeline has made of the log, read by the API.
//!
//! Tables, each owned by one operator: `series` (sensor ids as small integers), `sensors`
//! (state per sensor), `windows` (rows of [`Calendar::slots`] windows per size and sensor, see
//! [`crate::pipeline::window`]), `agents`, `quarantine`, and `processor_offsets` (the log offset
//! the tables reflect, committed with them). Everything here can be rebuilt from the log.
//!
//! This module is the store's narrow interface: the pipeline writes through [`open_write`] and
//! its operators, the API reads through [`StoreReader`]; a PostgreSQL store would implement the
//! same queries.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::pipeline::calendar::Calendar;
use crate::pipeline::window::{Window, decode_row_each};

/// The store's layout version (`PRAGMA user_version`). A store of another version is moved
/// aside and rebuilt from the log.
pub const LAYOUT_VERSION: i64 = 7;

/// Read connections kept open for the API (each query borrows one on a blocking thread).
const READ_POOL: usize = 4;

/// The page size of a store created from now on (SQLite's default is 4 KiB; a store made with
/// it keeps it, and works as before). The kernel's cost of writing the WAL and checkpointing it
/// goes by the page (a system call, a page-cache lookup and a journal reservation each), hardly by
/// the byte: a replay of the processing workload (three window sizes, 1,000 sensors) made 241,000
/// reads and writes of 4 KiB, 53,000 of 16 KiB for the same bytes, and its store writer took
/// 0.60 – 0.74 s of CPU instead of 0.37 – 0.46. Queries read no slower (a sensor-day of 10 s
/// windows for 100 sensors, every sensor's newest 1-minute row: the same within the noise), and a
/// commit that rewrites a few rows' tails writes about as many bytes, since those tails share pages.
pub const PAGE_SIZE: i64 = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("serving store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("serving store: journal_mode is {0}, WAL is needed")]
    NotWal(String),
    #[error(
        "serving store is damaged: {0}; stop the aggregator, move store.db aside and start it again to rebuild it from the log"
    )]
    Corrupt(String),
    #[error("cannot move the old serving store aside: {0}")]
    MoveAside(std::io::Error),
    #[error("serving store query was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{action} {path}: {source}; check the data directory's permissions and free space")]
    Unsynced { action: &'static str, path: PathBuf, source: std::io::Error },
}

/// The file beside a store that says it is being built by a replay without fsync, and during
/// which boot of the machine (`/proc/sys/kernel/random/boot_id`).
///
/// A store a replay builds serves nothing until it has caught up, and the log can build it
/// again: so it is written with `synchronous = OFF`, which leaves every write to the kernel's
/// page cache (the fsyncs of its checkpoints were an eighth of a replay's time). A process that
/// dies (SIGKILL, a panic) loses nothing the kernel was given, so within the same boot the replay
/// resumes from its last commit; after the machine went down (or its disk was restored from an
/// image), the store may be damaged, so it is deleted and replayed from the log
/// ([`recover_unsynced`]). Once caught up, [`end_unsynced`] syncs it and removes this file
/// before the store may serve.
pub fn unsynced_marker(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-unsynced");
    PathBuf::from(name)
}

/// This boot of the machine, if the kernel says (Linux); without it nothing is written unsynced.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string()).filter(|id| !id.is_empty())
}

fn unsynced_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Unsynced { action, path, source }
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(unsynced_error("cannot delete", path)(e)),
        _ => Ok(()),
    }
}

fn sync_dir_of(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(unsynced_error("cannot sync the directory of", path))
}

/// Before a store is opened: deletes it if it was being written without fsync during another
/// boot of the machine (see [`unsynced_marker`]). Returns whether it is being built unsynced
/// during this boot (its writes are all in the page cache: it goes on from its last commit).
pub fn recover_unsynced(path: &Path) -> Result<bool, StoreError> {
    let marker = unsynced_marker(path);
    let recorded = match std::fs::read(&marker) {
        // Not text: not this boot's either.
        Ok(recorded) => String::from_utf8_lossy(&recorded).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(unsynced_error("cannot read", &marker)(e)),
    };
    if boot_id().is_some_and(|id| id == recorded.trim()) {
        return Ok(true);
    }
    tracing::warn!(
        store = %path.display(),
        "this store was being built by a replay without fsync when the machine went down (or its disk was \
         restored from an image): it may be damaged, so it is deleted and replayed from the log"
    );
    remove_files(path)?;
    sync_dir_of(path)?;
    Ok(false)
}

/// Deletes a store: its file, its WAL and shared memory, and its unsynced marker.
pub fn remove_files(path: &Path) -> Result<(), StoreError> {
    for suffix in ["", "-wal", "-shm", "-unsynced"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        remove_if_present(Path::new(&file))?;
    }
    Ok(())
}

/// Writes the store at `path` through `conns` without fsync from now on (see
/// [`unsynced_marker`]): the marker is made durable first. False (and nothing changed) where the
/// boot cannot be told.
pub fn begin_unsynced(conns: &[&Connection], path: &Path) -> Result<bool, StoreError> {
    let Some(id) = boot_id() else { return Ok(false) };
    let marker = unsynced_marker(path);
    std::fs::write(&marker, format!("{id}\n"))
        .and_then(|()| std::fs::File::open(&marker)?.sync_all())
        .map_err(unsynced_error("cannot write", &marker))?;
    sync_dir_of(&marker)?;
    for conn in conns {
        write_unsynced(conn, true)?;
    }
    Ok(true)
}

/// How a connection writes a store built without fsync (`unsynced`), or one that may serve.
/// Unsynced, it leaves the pages in the WAL up to [`UNSYNCED_CHECKPOINT_BYTES`], not
/// [`CHECKPOINT_BYTES`], and not checkpointed when it closes: nothing reads the store before it
/// is synced, and [`end_unsynced`] checkpoints it once (the checkpoints after each commit were a
/// fifth of the store writer's time, and the last one was written while the rest of the
/// replay waited).
pub fn write_unsynced(conn: &Connection, unsynced: bool) -> Result<(), StoreError> {
    conn.pragma_update(None, "synchronous", if unsynced { "OFF" } else { "NORMAL" })?;
    set_checkpoint_bytes(conn, if unsynced { UNSYNCED_CHECKPOINT_BYTES } else { CHECKPOINT_BYTES })?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, unsynced)?;
    Ok(())
}

/// WAL bytes after which a commit checkpoints a store that serves. Commits rewrite the same
/// rows' tails again and again: a longer WAL between checkpoints writes each page to the file
/// once, not per commit (with 4,096 pages of 16 KiB, the live bench's store with its WAL took
/// 5 B/reading, not 1.8).
const CHECKPOINT_BYTES: i64 = 16 << 20;

/// [`CHECKPOINT_BYTES`] of a store built without fsync: the most disk its WAL takes beside it
/// (a replay of 2 M readings of the default pipeline writes 100 MiB of pages).
const UNSYNCED_CHECKPOINT_BYTES: i64 = 256 << 20;

fn set_checkpoint_bytes(conn: &Connection, bytes: i64) -> Result<(), StoreError> {
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    conn.pragma_update(None, "wal_autocheckpoint", bytes / page_size.max(512))?;
    Ok(())
}

/// Makes everything written to the store at `path` durable, and writes through `conns` with
/// fsync again: a checkpoint, then the store file, its WAL and their directory synced; then the
/// marker goes.
pub fn end_unsynced(conns: &[&Connection], path: &Path) -> Result<(), StoreError> {
    if let Some(conn) = conns.first() {
        // The whole replay may be in the WAL: into the file, and the WAL emptied (if a reader
        // holds a snapshot, what it can; the rest stays in the WAL, synced below). Still without
        // fsync (whatever the connection was opened with): the file is synced below, and an
        // emptied WAL never goes to the disk at all.
        write_unsynced(conn, true)?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    for conn in conns {
        write_unsynced(conn, false)?;
    }
    for suffix in ["", "-wal"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::File::open(&file) {
            Ok(f) => f.sync_all().map_err(unsynced_error("cannot sync", Path::new(&file)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unsynced_error("cannot open", Path::new(&file))(e)),
        }
    }
    sync_dir_of(path)?;
    remove_if_present(&unsynced_marker(path))?;
    sync_dir_of(path)
}

/// Turns off re-planning per binding. The bundled SQLite is built with STAT4, under which a
/// statement whose parameters compare with an indexed column is prepared again each time its
/// bindings change: a fleet read of 1,000 sensors spent a fifth of its time re-parsing the same SQL.
/// Our queries have one good plan (the primary key), so the planner's stability guarantee costs nothing.
pub fn plan_once(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// A read-only connection to the file `conn` has open, if it is a file (not in memory) and opens.
pub fn open_reader_beside(conn: &Connection) -> Option<Connection> {
    let path = conn.path().filter(|p| !p.is_empty())?;
    let reader =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).ok()?;
    plan_once(&reader).ok()?;
    // It reads a row now and then (late data): a small page cache, not SQLite's 2 MiB default.
    reader.pragma_update(None, "cache_size", -512).ok()?;
    Some(reader)
}

/// Opens (creating or upgrading if needed) the store for the pipeline; a store left unsynced by
/// another boot is deleted first ([`recover_unsynced`]).
pub fn open_write(path: &Path) -> Result<Connection, StoreError> {
    recover_unsynced(path)?;
    let conn = Connection::open(path)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let has_tables: bool =
        conn.query_row("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))?;
    let conn = if has_tables && version != LAYOUT_VERSION {
        // An older layout: everything in it can be rebuilt from the log, so keep it for
        // inspection and start empty (the processor replays the log from offset 0).
        drop(conn);
        let aside = path.with_extension(format!("db.layout-{version}"));
        for suffix in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{suffix}", path.display()));
            if from.exists() {
                std::fs::rename(&from, PathBuf::from(format!("{}{suffix}", aside.display())))
                    .map_err(StoreError::MoveAside)?;
            }
        }
        tracing::warn!(old = %aside.display(), "serving store has layout {version}, this version writes {LAYOUT_VERSION}: rebuilding it from the log");
        Connection::open(path)?
    } else {
        conn
    };
    plan_once(&conn)?;
    // Only a file with nothing in it yet takes it (before WAL mode is set); others keep theirs.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotWal(mode));
    }
    // NORMAL is enough: the store can always be rebuilt from the log, whose commits are FULL.
    write_unsynced(&conn, false)?;
    // The page cache stays at 2 MiB: since commits write tails, not whole rows, 8 MiB folded no
    // faster and cost 6 MiB of RSS.
    conn.pragma_update(None, "cache_size", -2048)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        CREATE TABLE IF NOT EXISTS sensors (
            series INTEGER PRIMARY KEY,
            count INTEGER NOT NULL,
            quarantined INTEGER NOT NULL,
            last_ts INTEGER NOT NULL,
            last_value REAL NOT NULL,
            last_seen INTEGER NOT NULL
        );
        -- A rowid table on purpose: a WITHOUT ROWID table keeps at most ~1 KB of a record in its
        -- leaf, and a row of 60 windows (~1.3 KB) would take an overflow page of its own.
        -- A row is stored in parts (sealed windows, then the open tail): pipeline/window.rs.
        CREATE TABLE IF NOT EXISTS windows (
            size INTEGER NOT NULL,
            series INTEGER NOT NULL,
            row INTEGER NOT NULL,
            part INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (size, series, row, part)
        );
        CREATE TABLE IF NOT EXISTS agents (id TEXT PRIMARY KEY, readings INTEGER NOT NULL, last_seen INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS quarantine (
            offset INTEGER PRIMARY KEY,
            series INTEGER NOT NULL,
            ts INTEGER NOT NULL,
            value REAL NOT NULL,
            received_at INTEGER NOT NULL,
            reason TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS quarantine_by_series ON quarantine (series, offset);
        CREATE TABLE IF NOT EXISTS processor_offsets (name TEXT PRIMARY KEY, next_offset INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS set_aside (
            first_offset INTEGER PRIMARY KEY,
            count INTEGER NOT NULL,
            agent_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            set_aside_at INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS pipeline_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS anomaly_models (series INTEGER PRIMARY KEY, data BLOB NOT NULL);
        CREATE TABLE IF NOT EXISTS anomalies (
            offset INTEGER PRIMARY KEY,
            series INTEGER NOT NULL,
            ts INTEGER NOT NULL,
            value REAL NOT NULL,
            expected_low REAL NOT NULL,
            expected_high REAL NOT NULL,
            score REAL NOT NULL
        );
        CREATE INDEX IF NOT EXISTS anomalies_by_series ON anomalies (series, ts);
        CREATE TABLE IF NOT EXISTS alert_states (rule TEXT NOT NULL, series INTEGER NOT NULL, data BLOB NOT NULL,
            PRIMARY KEY (rule, series)) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS alerts (
            id INTEGER PRIMARY KEY,
            rule TEXT NOT NULL,
            series INTEGER NOT NULL,
            severity TEXT NOT NULL,
            state TEXT NOT NULL,
            fired_ts INTEGER NOT NULL,
            fired_value REAL NOT NULL,
            fired_offset INTEGER NOT NULL,
            resolved_ts INTEGER,
            resolved_value REAL,
            resolved_offset INTEGER
        );
        CREATE INDEX IF NOT EXISTS alerts_by_state ON alerts (state, id);",
    )?;
    conn.pragma_update(None, "user_version", LAYOUT_VERSION)?;
    Ok(conn)
}

/// The committed offset of processor `name` (0 if it never committed).
pub fn offset(conn: &Connection, name: &str) -> Result<u64, StoreError> {
    let offset: Option<i64> =
        conn.query_row("SELECT next_offset FROM processor_offsets WHERE name = ?1", [name], |r| r.get(0)).optional()?;
    Ok(offset.unwrap_or(0).max(0) as u64)
}

/// A sensor as the API shows it (before its freshness, which depends on the clock).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SensorRow {
    pub id: String,
    /// Readings folded into its windows.
    pub count: u64,
    /// Readings quarantined (stamped too far ahead of the aggregator's clock).
    pub quarantined: u64,
    pub last_value: Option<f64>,
    pub last_ts: Option<i64>,
    pub last_seen: i64,
}

/// What the store knows of an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRow {
    pub id: String,
    pub readings: u64,
    pub last_seen: i64,
}

/// A quarantined reading.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct QuarantineRow {
    pub offset: u64,
    pub sensor: String,
    pub ts: i64,
    pub value: f64,
    pub received_at: i64,
    pub reason: String,
}

/// Runs `PRAGMA <check>` (`integrity_check` or the faster `quick_check`) on a database file:
/// `Ok` if it reports "ok", else the first problems it names (or why the file does not open).
pub fn check_file(path: &Path, check: &str) -> Result<(), String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| e.to_string())?;
    let mut stmt = conn.prepare(&format!("PRAGMA {check}(10)")).map_err(|e| e.to_string())?;
    let report: Vec<String> =
        stmt.query_map([], |r| r.get::<_, String>(0)).and_then(|rows| rows.collect()).map_err(|e| e.to_string())?;
    if report == ["ok"] { Ok(()) } else { Err(report.join("; ")) }
}

/// Read-only access for the API, off the async runtime, with a few pooled connections. The
/// serving version's store: [`StoreReader::switch`] moves every later read to another file (a
/// pipeline version being promoted), while reads in flight finish on the one they started on.
#[derive(Clone)]
pub struct StoreReader {
    current: Arc<std::sync::RwLock<Arc<ReadPool>>>,
}

struct ReadPool {
    path: PathBuf,
    conns: Mutex<Vec<Connection>>,
}

impl StoreReader {
    /// `path` must already exist (the processor creates it at start).
    pub fn new(path: &Path) -> StoreReader {
        StoreReader { current: Arc::new(std::sync::RwLock::new(Self::pool(path))) }
    }

    fn pool(path: &Path) -> Arc<ReadPool> {
        Arc::new(ReadPool { path: path.to_path_buf(), conns: Mutex::new(Vec::new()) })
    }

    fn current(&self) -> Arc<ReadPool> {
        // A plain pointer swap: a panic elsewhere cannot leave it half-written.
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The file reads go to.
    pub fn path(&self) -> PathBuf {
        self.current().path.clone()
    }

    /// Sends every read from now on to `path`.
    pub fn switch(&self, path: &Path) {
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Self::pool(path);
    }

    /// The store reads go to now, for a request that reads more than once: its reads all go to
    /// the same file, whatever version is promoted meanwhile (the previous version's store is
    /// kept), so its parts never mix two versions.
    pub fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot(self.current())
    }

    /// Runs `query` on a pooled read-only connection in a blocking thread.
    pub async fn read<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.snapshot().read(query).await
    }
}

/// See [`StoreReader::snapshot`].
#[derive(Clone)]
pub struct StoreSnapshot(Arc<ReadPool>);

impl StoreSnapshot {
    /// Runs `query` on a pooled read-only connection in a blocking thread.
    pub async fn read<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = reader.conns.lock().ok().and_then(|mut pool| pool.pop());
            let conn = match pooled {
                Some(conn) => conn,
                None => {
                    let conn = Connection::open_with_flags(
                        &reader.path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    plan_once(&conn)?;
                    conn
                }
            };
            let result = query(&conn);
            if let Ok(mut pool) = reader.conns.lock() {
                if pool.len() < READ_POOL {
                    pool.push(conn);
                }
            }
            result
        })
        .await?
    }
}

const SENSOR_COLUMNS: &str =
    "s.name, coalesce(t.count, 0), coalesce(t.quarantined, 0), t.last_value, t.last_ts, coalesce(t.last_seen, 0)";

fn sensor_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SensorRow> {
    let last_ts: Option<i64> = row.get(4)?;
    let count = row.get::<_, i64>(1)?.max(0) as u64;
    Ok(SensorRow {
        id: row.get(0)?,
        count,
        quarantined: row.get::<_, i64>(2)?.max(0) as u64,
        // A sensor with only quarantined readings has no latest value yet.
        last_value: if count > 0 { row.get(3)? } else { None },
        last_ts: if count > 0 { last_ts } else { None },
        last_seen: row.get(5)?,
    })
}

/// Sensors whose id starts with `prefix`, after `after` (exclusive), sorted by id (byte order),
/// at most `limit`.
pub fn sensors_page(
    conn: &Connection,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Page<SensorRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SENSOR_COLUMNS} FROM series s LEFT JOIN sensors t ON t.series = s.id
         WHERE s.name >= ?1 AND substr(s.name, 1, length(?2)) = ?2 ORDER BY s.name LIMIT ?3"
    ))?;
    // `>= after` then skip `after` itself: SQLite compares text by bytes, like the cursor.
    let from = after.unwrap_or(prefix).max(prefix);
    let rows: Vec<SensorRow> = stmt
        .query_map(params![from, prefix, (limit + 2) as i64], sensor_row)?
        .filter(|r| !matches!((r, after), (Ok(row), Some(a)) if row.id == a))
        .take(limit + 1)
        .collect::<Result<_, _>>()?;
    Ok(Page::of(rows, limit))
}

/// Sensors whose id starts with `prefix` and passes `keep`, sorted by id, at most `limit` (one
/// more when more match, so the caller can tell a full answer from a cut one).
pub fn sensors_matching(
    conn: &Connection,
    prefix: &str,
    keep: impl Fn(&str) -> bool,
    limit: usize,
) -> Result<Vec<SensorRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SENSOR_COLUMNS} FROM series s LEFT JOIN sensors t ON t.series = s.id
         WHERE s.name >= ?1 AND substr(s.name, 1, length(?1)) = ?1 ORDER BY s.name"
    ))?;
    let mut out = Vec::new();
    let mut rows = stmt.query([prefix])?;
    while let Some(row) = rows.next()? {
        let name = row.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
        if keep(name) {
            out.push(sensor_row(row)?);
            if out.len() > limit {
                break;
            }
        }
    }
    Ok(out)
}

/// One sensor, if the store knows it.
pub fn sensor(conn: &Connection, id: &str) -> Result<Option<SensorRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SENSOR_COLUMNS} FROM series s LEFT JOIN sensors t ON t.series = s.id WHERE s.name = ?1"
    ))?;
    Ok(stmt.query_row([id], sensor_row).optional()?)
}

/// The integer id of a sensor.
pub fn series_id(conn: &Connection, id: &str) -> Result<Option<u32>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT id FROM series WHERE name = ?1")?;
    Ok(stmt.query_row([id], |r| r.get::<_, i64>(0)).optional()?.map(|v| v as u32))
}

/// Every sensor id with its integer id, for glob matching (`prefix` narrows the scan).
pub fn series_with_prefix(conn: &Connection, prefix: &str) -> Result<Vec<(u32, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, name FROM series WHERE name >= ?1 AND substr(name, 1, length(?1)) = ?1 ORDER BY name",
    )?;
    let rows = stmt
        .query_map([prefix], |r| Ok((r.get::<_, i64>(0)? as u32, r.get::<_, String>(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// The windows of `calendar` of one sensor with index in `[first, last]`, sorted by start:
/// (index, window).
pub fn windows(
    conn: &Connection,
    calendar: &Calendar,
    series: u32,
    first: i64,
    last: i64,
) -> Result<Vec<(i64, Window)>, StoreError> {
    let mut out = Vec::new();
    windows_each(conn, calendar, series, first, last, |index, window| {
        out.push((index, window));
        true
    })?;
    Ok(out)
}

/// [`windows`] handing each window (by index, ascending) to `each` until it says stop (false).
pub fn windows_each(
    conn: &Connection,
    calendar: &Calendar,
    series: u32,
    first: i64,
    last: i64,
    mut each: impl FnMut(i64, Window) -> bool,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT row, data FROM windows WHERE size = ?1 AND series = ?2 AND row >= ?3 AND row <= ?4 ORDER BY row, part",
    )?;
    let slots = calendar.slots();
    let mut rows =
        stmt.query(params![calendar.code(), series as i64, first.div_euclid(slots), last.div_euclid(slots)])?;
    let mut more = true;
    while more && let Some(row) = rows.next()? {
        let row_index: i64 = row.get(0)?;
        let data = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
        decode_row_each(calendar, row_index, data, |slot, window| {
            let index = row_index * slots + i64::from(slot);
            if first <= index && index <= last {
                more = each(index, window);
            }
            more
        })
        .map_err(|e| {
            StoreError::Corrupt(format!("window row (size {}, series {series}, row {row_index}): {e}", calendar.code()))
        })?;
    }
    Ok(())
}

/// Quarantined readings of a sensor (or all), newest first, at most `limit`.
pub fn quarantine(conn: &Connection, series: Option<u32>, limit: usize) -> Result<Vec<QuarantineRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT q.offset, s.name, q.ts, q.value, q.received_at, q.reason FROM quarantine q JOIN series s ON s.id = q.series
         WHERE ?1 IS NULL OR q.series = ?1 ORDER BY q.offset DESC LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![series.map(i64::from), limit as i64], |r| {
            Ok(QuarantineRow {
                offset: r.get::<_, i64>(0)?.max(0) as u64,
                sensor: r.get(1)?,
                ts: r.get(2)?,
                value: r.get(3)?,
                received_at: r.get(4)?,
                reason: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// A log block the processor set aside instead of folding it in.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
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

/// A page of a list, and whether more rows follow.
pub struct Page<T> {
    pub rows: Vec<T>,
    pub more: bool,
}

impl<T> Page<T> {
    /// The first `limit` of `rows`, read with a limit of `limit + 1` to learn whether more follow.
    pub fn of(mut rows: Vec<T>, limit: usize) -> Page<T> {
        let more = rows.len() > limit;
        rows.truncate(limit);
        Page { rows, more }
    }
}

/// Up to `limit` set-aside blocks after log offset `after`, by offset.
pub fn set_aside(conn: &Connection, after: Option<u64>, limit: usize) -> Result<Page<SetAsideRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT first_offset, count, agent_id, reason, set_aside_at FROM set_aside
         WHERE first_offset > ?1 ORDER BY first_offset LIMIT ?2",
    )?;
    let after = after.map_or(-1, |a| a.min(i64::MAX as u64) as i64);
    let rows: Vec<SetAsideRow> = stmt
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
    Ok(Page::of(rows, limit))
}

/// (blocks, readings) set aside so far.
pub fn set_aside_totals(conn: &Connection) -> Result<(u64, u64), StoreError> {
    Ok(conn.query_row("SELECT COUNT(*), COALESCE(SUM(count), 0) FROM set_aside", [], |r| {
        Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, i64>(1)?.max(0) as u64))
    })?)
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

/// An anomaly event: the reading, the range its model expected and how far out it was.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AnomalyRow {
    pub sensor: String,
    pub ts: i64,
    pub value: f64,
    pub expected_low: f64,
    pub expected_high: f64,
    pub score: f64,
    /// Log offset of the reading.
    pub offset: u64,
}

/// Anomalies of the sensors in `series` (all when `None`) with `from <= ts < to`, ordered by
/// (ts, offset) and after the cursor `after` (a previous page's last (ts, offset)), at most `limit`.
pub fn anomalies(
    conn: &Connection,
    series: Option<&[u32]>,
    from: i64,
    to: i64,
    after: Option<(i64, u64)>,
    limit: usize,
) -> Result<Page<AnomalyRow>, StoreError> {
    let (after_ts, after_offset) = after.map_or((i64::MIN, -1), |(ts, o)| (ts, o.min(i64::MAX as u64) as i64));
    let read = |r: &rusqlite::Row<'_>| {
        Ok(AnomalyRow {
            sensor: r.get(0)?,
            ts: r.get(1)?,
            value: r.get(2)?,
            expected_low: r.get(3)?,
            expected_high: r.get(4)?,
            score: r.get(5)?,
            offset: r.get::<_, i64>(6)?.max(0) as u64,
        })
    };
    let columns = "SELECT s.name, a.ts, a.value, a.expected_low, a.expected_high, a.score, a.offset
                   FROM anomalies a JOIN series s ON s.id = a.series";
    let mut rows: Vec<AnomalyRow> = Vec::new();
    match series {
        None => {
            let mut stmt = conn.prepare_cached(&format!(
                "{columns} WHERE a.ts >= ?1 AND a.ts < ?2 AND (a.ts > ?3 OR (a.ts = ?3 AND a.offset > ?4))
                 ORDER BY a.ts, a.offset LIMIT ?5"
            ))?;
            rows = stmt
                .query_map(params![from, to, after_ts, after_offset, limit.saturating_add(1) as i64], read)?
                .collect::<Result<_, _>>()?;
        }
        Some(ids) => {
            let mut stmt = conn.prepare_cached(&format!(
                "{columns} WHERE a.series = ?1 AND a.ts >= ?2 AND a.ts < ?3 AND (a.ts > ?4 OR (a.ts = ?4 AND a.offset > ?5))
                 ORDER BY a.ts, a.offset LIMIT ?6"
            ))?;
            // Each sensor's first limit + 1 events, merged: the overall first limit + 1 are among them.
            for id in ids {
                let more: Vec<AnomalyRow> = stmt
                    .query_map(
                        params![*id as i64, from, to, after_ts, after_offset, limit.saturating_add(1) as i64],
                        read,
                    )?
                    .collect::<Result<_, _>>()?;
                rows.extend(more);
                rows.sort_by_key(|a| (a.ts, a.offset));
                rows.truncate(limit.saturating_add(1));
            }
        }
    }
    Ok(Page::of(rows, limit))
}

/// An event-time alert (see [`crate::pipeline::alert`]): fired and maybe resolved by readings.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AlertRow {
    pub id: u64,
    pub rule: String,
    pub sensor: String,
    pub severity: String,
    pub state: String,
    /// Event time and value of the reading that fired it.
    pub fired_ts: i64,
    pub fired_value: f64,
    pub resolved_ts: Option<i64>,
    pub resolved_value: Option<f64>,
    /// Log offset of the reading that fired it.
    #[serde(skip)]
    pub fired_offset: u64,
}

/// Event-time alerts in `state` (or all), newest first, at most `limit`.
pub fn alerts(conn: &Connection, state: Option<&str>, limit: usize) -> Result<Page<AlertRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT a.id, a.rule, s.name, a.severity, a.state, a.fired_ts, a.fired_value, a.resolved_ts, a.resolved_value,
                a.fired_offset
         FROM alerts a JOIN series s ON s.id = a.series WHERE ?1 IS NULL OR a.state = ?1 ORDER BY a.id DESC LIMIT ?2",
    )?;
    let rows: Vec<AlertRow> = stmt
        .query_map(params![state, limit.saturating_add(1) as i64], |r| {
            Ok(AlertRow {
                id: r.get::<_, i64>(0)?.max(0) as u64,
                rule: r.get(1)?,
                sensor: r.get(2)?,
                severity: r.get(3)?,
                state: r.get(4)?,
                fired_ts: r.get(5)?,
                fired_value: r.get(6)?,
                resolved_ts: r.get(7)?,
                resolved_value: r.get(8)?,
                fired_offset: r.get::<_, i64>(9)?.max(0) as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Page::of(rows, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_size(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap()
    }

    /// The WAL's length at which a commit checkpoints it, in bytes.
    fn checkpoint_bytes(conn: &Connection) -> i64 {
        let pages: i64 = conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)).unwrap();
        pages * page_size(conn)
    }

    #[test]
    fn a_new_store_takes_the_larger_pages_and_a_store_made_before_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let new = open_write(&dir.path().join("new.db")).unwrap();
        assert_eq!(page_size(&new), PAGE_SIZE);
        assert_eq!(checkpoint_bytes(&new), 16 << 20);

        // A store of this layout made with SQLite's default pages, as before PAGE_SIZE.
        let path = dir.path().join("old.db");
        let old = Connection::open(&path).unwrap();
        old.pragma_update(None, "page_size", 4096).unwrap();
        old.pragma_update(None, "journal_mode", "WAL").unwrap();
        old.execute_batch("CREATE TABLE series (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)").unwrap();
        old.execute("INSERT INTO series (id, name) VALUES (0, 'kept')", []).unwrap();
        old.pragma_update(None, "user_version", LAYOUT_VERSION).unwrap();
        drop(old);

        let conn = open_write(&path).unwrap();
        assert_eq!(page_size(&conn), 4096, "a store keeps the pages it was made with");
        assert_eq!(checkpoint_bytes(&conn), 16 << 20);
        assert!(!dir.path().join(format!("old.db.layout-{LAYOUT_VERSION}")).exists(), "not moved aside: same layout");
        let kept: String = conn.query_row("SELECT name FROM series WHERE id = 0", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, "kept");
        conn.execute("INSERT INTO processor_offsets (name, next_offset) VALUES ('main', 42)", []).unwrap();
        assert_eq!(offset(&conn, "main").unwrap(), 42);
    }

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap()
    }

    /// A store a replay builds is written without fsync while a marker names this boot; synced,
    /// it loses the marker; with a marker of another boot (the machine went down meanwhile) it is
    /// deleted before it opens, whatever it holds.
    #[test]
    fn a_store_built_unsynced_is_kept_in_this_boot_and_deleted_after_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store-v2.db");
        let marker = unsynced_marker(&path);
        assert_eq!(marker, dir.path().join("store-v2.db-unsynced"));
        let conn = open_write(&path).unwrap();
        assert_eq!(synchronous(&conn), 1, "NORMAL");
        assert!(begin_unsynced(&[&conn], &path).unwrap(), "Linux tells its boot");
        assert_eq!(synchronous(&conn), 0, "OFF");
        assert_eq!(checkpoint_bytes(&conn), 256 << 20);
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), boot.trim());
        conn.execute("INSERT INTO processor_offsets (name, next_offset) VALUES ('main', 42)", []).unwrap();
        drop(conn);
        let wal = dir.path().join("store-v2.db-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0, "closed without a checkpoint: the commit is in the WAL");

        // The process died (a SIGKILL loses nothing the kernel was given): same boot, kept.
        assert!(recover_unsynced(&path).unwrap());
        let conn = open_write(&path).unwrap();
        assert_eq!(offset(&conn, "main").unwrap(), 42);
        end_unsynced(&[&conn], &path).unwrap();
        assert_eq!(synchronous(&conn), 1);
        assert_eq!(checkpoint_bytes(&conn), 16 << 20);
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0, "checkpointed into the file");
        assert!(!marker.exists());
        assert!(!recover_unsynced(&path).unwrap());
        drop(conn);

        // Unsynced again, then the machine goes down: at the next boot the marker names another.
        let conn = open_write(&path).unwrap();
        assert!(begin_unsynced(&[&conn], &path).unwrap());
        drop(conn);
        std::fs::write(&marker, "00000000-0000-0000-0000-000000000000\n").unwrap();
        let conn = open_write(&path).unwrap();
        assert_eq!(offset(&conn, "main").unwrap(), 0, "deleted and made anew: the log rebuilds it");
        assert!(!marker.exists());
    }
}
