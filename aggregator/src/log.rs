//! The immutable log: a SQLite table of blocks, appended by one writer thread.
//!
//! A reading's offset is its block's `first_offset` plus its index, so offsets are dense from 0
//! while SQLite stores one row per block. The writer owns the only write connection and is fed by
//! a bounded channel; it drains every request waiting and commits them in one transaction (one
//! fsync for many concurrent agents), and answers each request only after that commit.
//!
//! Dedup is by (agent, epoch, sequence range) against an in-memory copy of what is logged
//! ([`SeqRanges`]: the high-water mark in `agent_sequences` minus the holes in `gaps`), so it costs
//! no read query. Blocks may arrive in any order (concurrent requests, a retry after a timeout,
//! clients other than the agent): a block below the mark appends exactly its unlogged parts,
//! each as its own log block, and fills the holes it covers.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot, watch};
use tributary_shared::{Block, BlockError, GapReport, IngestAck};

use crate::metrics::Metrics;
use crate::{Liveness, unix_ms};

/// Requests waiting for the writer. Bounded so that a flood of agents waits in HTTP (backpressure)
/// instead of growing memory; a group commit drains up to this many at once.
const QUEUE_DEPTH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("log database: journal_mode is {0}, WAL is needed")]
    NotWal(String),
    #[error("a logged block does not decode: {0}")]
    Block(#[from] BlockError),
    #[error("cannot start the log writer thread: {0}")]
    Spawn(std::io::Error),
}

/// Why an append was not acknowledged. Either way nothing of the batch is in the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    #[error("the log writer is not running")]
    Unavailable,
    #[error("the log could not commit the batch: {0}")]
    Storage(String),
    #[error(
        "agent `{agent}` epoch {epoch} would have {holes} holes in its sequence numbers, the limit is \
         {MAX_HOLES}: send the missing ranges first (or start a new epoch); nothing of this batch was logged"
    )]
    TooManyHoles { agent: String, epoch: i64, holes: usize },
}

/// Sequence numbers are stored as SQLite integers (i64).
const MAX_SEQ: u64 = i64::MAX as u64;

/// One validated block of a batch, its bytes as the agent encoded them.
#[derive(Debug, Clone)]
pub struct LogBlock {
    pub first_seq: u64,
    pub count: u32,
    pub data: Bytes,
}

struct AppendRequest {
    agent_id: String,
    epoch: i64,
    blocks: Vec<LogBlock>,
    /// The client sends no sequence numbers (`POST /write`): the blocks are numbered from 0 within
    /// the request and the writer places them at the (agent, epoch)'s mark when it plans the group,
    /// so concurrent such requests never collide and never dedup each other.
    assign_seq: bool,
    reply: oneshot::Sender<Result<IngestAck, AppendError>>,
}

/// An agent's reports of ranges it dropped, stored as they come (rare, small).
struct ReportRequest {
    agent_id: String,
    epoch: i64,
    reports: Vec<GapReport>,
    reply: oneshot::Sender<Result<(), AppendError>>,
}

enum Command {
    Append(AppendRequest),
    Report(ReportRequest),
    /// Sent once the HTTP server has stopped: commit what is queued and exit.
    Stop,
}

/// The handlers' side of the writer.
#[derive(Clone)]
pub struct LogHandle {
    tx: mpsc::Sender<Command>,
}

impl LogHandle {
    /// Queues a validated batch and waits until it is committed (or failed as a whole). An empty
    /// batch writes nothing and is answered with the (agent, epoch)'s current mark.
    pub async fn append(&self, agent_id: &str, epoch: i64, blocks: Vec<LogBlock>) -> Result<IngestAck, AppendError> {
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest { agent_id: agent_id.to_string(), epoch, blocks, assign_seq: false, reply };
        self.tx.send(Command::Append(request)).await.map_err(|_| AppendError::Unavailable)?;
        answer.await.map_err(|_| AppendError::Unavailable)?
    }

    /// Appends blocks of a client that has no sequence numbers: `blocks` are numbered from 0
    /// within this call (consecutive, as [`LogBlock::first_seq`] says), and the writer adds the
    /// (agent, epoch)'s mark at commit time. Nothing is ever a duplicate: a resend is logged again.
    pub async fn append_assigned(
        &self,
        agent_id: &str,
        epoch: i64,
        blocks: Vec<LogBlock>,
    ) -> Result<IngestAck, AppendError> {
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest { agent_id: agent_id.to_string(), epoch, blocks, assign_seq: true, reply };
        self.tx.send(Command::Append(request)).await.map_err(|_| AppendError::Unavailable)?;
        answer.await.map_err(|_| AppendError::Unavailable)?
    }

    /// Stores an agent's reports of ranges it dropped (see [`GapReport`]).
    pub async fn report_gaps(&self, agent_id: &str, epoch: i64, reports: Vec<GapReport>) -> Result<(), AppendError> {
        let (reply, answer) = oneshot::channel();
        let request = ReportRequest { agent_id: agent_id.to_string(), epoch, reports, reply };
        self.tx.send(Command::Report(request)).await.map_err(|_| AppendError::Unavailable)?;
        answer.await.map_err(|_| AppendError::Unavailable)?
    }

    /// Asks the writer to finish what is queued and stop.
    pub async fn stop(&self) {
        // An error means the writer has already gone, which is what we want.
        let _ = self.tx.send(Command::Stop).await;
    }
}

/// Most holes one (agent, epoch) may have below its mark. Each is a `gaps` row and a map entry;
/// a client sending every other sequence number is refused here instead of growing both for ever.
/// 10,000 holes cost well under a megabyte of memory.
pub const MAX_HOLES: usize = 10_000;

/// The logged sequence numbers of one (agent, epoch): everything below `next` (the high-water mark,
/// the end of the highest logged range) except the `holes`. Kept as the complement because agents
/// send in order: their state is one number, and the holes are exactly the `gaps` rows.
///
/// Invariants: holes are disjoint, each `from < to < next`, and never adjacent (a logged run
/// follows every hole); `missing` is their total size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqRanges {
    next: u64,
    /// from → to (exclusive).
    holes: BTreeMap<u64, u64>,
    missing: u64,
}

/// A change to the `gaps` rows of one (agent, epoch), in the order it happened. A filled hole's
/// row is deleted; a partly filled one is shrunk, or split in two rows that keep its `detected_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoleChange {
    /// A new hole `[from, to)`: a block started above the mark.
    Opened { from: u64, to: u64 },
    /// The hole that started at `was` is now `[from, to)`.
    Shrunk { was: u64, from: u64, to: u64 },
    /// A fill inside the hole that started at `was` left `[was, to)` and `[right_from, right_to)`.
    Split { was: u64, to: u64, right_from: u64, right_to: u64 },
    /// The hole that started at `was` is filled entirely.
    Filled { was: u64 },
}

impl SeqRanges {
    /// The high-water mark: the end of the highest logged range.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Sequence numbers below the mark that are not logged.
    pub fn missing(&self) -> u64 {
        self.missing
    }

    pub fn holes(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.holes.iter().map(|(&from, &to)| from..to)
    }

    pub fn hole_count(&self) -> usize {
        self.holes.len()
    }

    /// Rebuilds the state from a stored mark and stored holes (any order, possibly overlapping or
    /// reaching the mark in a log written by hand). Returns the state and whether the stored rows
    /// were already in normal form (disjoint, non-adjacent, below the mark, one row per hole).
    pub fn restore(next: u64, stored: impl IntoIterator<Item = (u64, u64)>) -> (SeqRanges, bool) {
        let mut stored: Vec<(u64, u64)> = stored.into_iter().collect();
        stored.sort_unstable();
        let rows = stored.len();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(rows);
        for (from, to) in stored {
            let to = to.min(next);
            if from >= to {
                continue;
            }
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        let mut next = next;
        // A hole that reaches the mark means the highest logged range ends at its start.
        if let Some(&(from, to)) = merged.last() {
            if to == next {
                next = from;
                merged.pop();
            }
        }
        let exact = merged.len() == rows;
        let missing = merged.iter().map(|(from, to)| to - from).sum();
        (SeqRanges { next, holes: merged.into_iter().collect(), missing }, exact)
    }

    /// Marks `[first, end)` logged. Returns the parts of it that were not logged before, in order
    /// (never adjacent to each other, so each is one run), and records the hole changes.
    pub fn insert(&mut self, first: u64, end: u64, changes: &mut Vec<HoleChange>) -> Vec<Range<u64>> {
        let mut new = Vec::new();
        if first >= end {
            return new;
        }
        // Below the mark, only what falls into holes is new.
        let below = end.min(self.next);
        if first < below {
            // The hole holding `first`, if any, starts at or before it; later ones start inside.
            let start = self.holes.range(..=first).next_back().map_or(first, |(&from, _)| from);
            let touched: Vec<(u64, u64)> =
                self.holes.range(start..below).map(|(&from, &to)| (from, to)).filter(|&(_, to)| to > first).collect();
            for (from, to) in touched {
                let (a, b) = (from.max(first), to.min(below));
                new.push(a..b);
                self.missing -= b - a;
                self.holes.remove(&from);
                let change = match (from < a, b < to) {
                    (false, false) => HoleChange::Filled { was: from },
                    (true, false) => {
                        self.holes.insert(from, a);
                        HoleChange::Shrunk { was: from, from, to: a }
                    }
                    (false, true) => {
                        self.holes.insert(b, to);
                        HoleChange::Shrunk { was: from, from: b, to }
                    }
                    (true, true) => {
                        self.holes.insert(from, a);
                        self.holes.insert(b, to);
                        HoleChange::Split { was: from, to: a, right_from: b, right_to: to }
                    }
                };
                changes.push(change);
            }
        }
        // Above the mark, everything is new; starting beyond it leaves a hole.
        if end > self.next {
            let from = first.max(self.next);
            if from > self.next {
                self.holes.insert(self.next, from);
                self.missing += from - self.next;
                changes.push(HoleChange::Opened { from: self.next, to: from });
            }
            new.push(from..end);
            self.next = end;
        }
        new
    }
}

/// Opens (creating if needed) `log.db` with the pragmas the guarantees need.
pub fn open_write(path: &Path) -> Result<Connection, LogError> {
    let conn = Connection::open(path)?;
    crate::store::plan_once(&conn)?;
    // WAL must be set outside a transaction; check it took (it cannot on some filesystems).
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LogError::NotWal(mode));
    }
    // FULL: an acknowledged batch survives power loss, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS blocks (
            first_offset INTEGER PRIMARY KEY,
            count INTEGER NOT NULL,
            agent_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            first_seq INTEGER NOT NULL,
            received_at INTEGER NOT NULL,
            data BLOB NOT NULL
        );
        CREATE TABLE IF NOT EXISTS agent_sequences (
            agent_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            next_seq INTEGER NOT NULL,
            PRIMARY KEY (agent_id, epoch)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS gaps (
            agent_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            from_seq INTEGER NOT NULL,
            to_seq INTEGER NOT NULL,
            detected_at INTEGER NOT NULL
        );
        -- A hole is found by its start when a late block fills it.
        CREATE INDEX IF NOT EXISTS gaps_by_start ON gaps (agent_id, epoch, from_seq);
        -- What agents said about ranges they dropped (POST /api/v1/gaps): why, which sensors,
        -- which event times. A resent report (the same start) replaces the one before.
        CREATE TABLE IF NOT EXISTS gap_reports (
            agent_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            from_seq INTEGER NOT NULL,
            to_seq INTEGER NOT NULL,
            readings INTEGER NOT NULL,
            first_ts INTEGER,
            last_ts INTEGER,
            sensors TEXT NOT NULL,
            sensor_count INTEGER NOT NULL,
            reason TEXT NOT NULL,
            recorded_at INTEGER NOT NULL,
            received_at INTEGER NOT NULL,
            PRIMARY KEY (agent_id, epoch, from_seq)
        ) WITHOUT ROWID;
        -- Ranges of offsets dropped by retention ([log] retain).
        CREATE TABLE IF NOT EXISTS dropped (
            first_offset INTEGER NOT NULL,
            end_offset INTEGER NOT NULL,
            blocks INTEGER NOT NULL,
            readings INTEGER NOT NULL,
            dropped_at INTEGER NOT NULL,
            reason TEXT NOT NULL
        );",
    )?;
    Ok(conn)
}

/// A range of an agent's sequence numbers the log has not received: readings its spool dropped
/// (`[spool] overflow`, `max_bytes`), lost with a damaged spool, or still on their way. A range
/// that late readings fill leaves the list.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct GapRow {
    /// Its key for paging (`after=`).
    pub id: i64,
    pub agent: String,
    pub epoch: i64,
    /// The sequence numbers missing: `from_seq` up to, not including, `to_seq`.
    pub from_seq: u64,
    pub to_seq: u64,
    /// How many readings that is.
    pub readings: u64,
    /// When the aggregator first saw the range missing (Unix ms).
    pub detected_at: i64,
    /// What the agent reported about readings it dropped in this range (why, which sensors and
    /// event times); empty for a range still on its way, or an agent that did not say.
    pub reports: Vec<GapReport>,
}

/// Most reports listed with one gap.
const REPORTS_PER_GAP: i64 = 20;

/// Up to `limit` gaps after the one with id `after`, in the order they were found, of one agent
/// or all; and whether more follow.
pub fn gaps(
    conn: &Connection,
    agent: Option<&str>,
    after: Option<i64>,
    limit: usize,
) -> Result<(Vec<GapRow>, bool), LogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT rowid, agent_id, epoch, from_seq, to_seq, detected_at FROM gaps
         WHERE rowid > ?1 AND (?2 IS NULL OR agent_id = ?2) ORDER BY rowid LIMIT ?3",
    )?;
    let mut rows: Vec<GapRow> = stmt
        .query_map(params![after.unwrap_or(0), agent, limit.saturating_add(1) as i64], |r| {
            let (from, to) = (r.get::<_, i64>(3)?.max(0) as u64, r.get::<_, i64>(4)?.max(0) as u64);
            Ok(GapRow {
                id: r.get(0)?,
                agent: r.get(1)?,
                epoch: r.get(2)?,
                from_seq: from,
                to_seq: to,
                readings: to.saturating_sub(from),
                detected_at: r.get(5)?,
                reports: Vec::new(),
            })
        })?
        .collect::<Result<_, _>>()?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let mut reports = conn.prepare_cached(
        "SELECT from_seq, to_seq, readings, first_ts, last_ts, sensors, sensor_count, reason, recorded_at
         FROM gap_reports WHERE agent_id = ?1 AND epoch = ?2 AND from_seq < ?4 AND to_seq > ?3
         ORDER BY from_seq LIMIT ?5",
    )?;
    for gap in &mut rows {
        let range = params![gap.agent, gap.epoch, gap.from_seq as i64, gap.to_seq as i64, REPORTS_PER_GAP];
        gap.reports = reports.query_map(range, GapReport::from_row)?.collect::<Result<_, _>>()?;
    }
    Ok((rows, more))
}

/// A read-only connection for the processor (and tests); the writer must have created the file.
pub fn open_read(path: &Path) -> Result<Connection, LogError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    crate::store::plan_once(&conn)?;
    Ok(conn)
}

/// The offset the next appended reading will get.
pub fn end_offset(conn: &Connection) -> Result<u64, LogError> {
    let end: i64 = conn.query_row("SELECT COALESCE(MAX(first_offset + count), 0) FROM blocks", [], |r| r.get(0))?;
    Ok(end.max(0) as u64)
}

/// The running writer: its handle, the log's end offset as it moves, and its thread.
pub struct LogWriter {
    pub handle: LogHandle,
    pub end: watch::Receiver<u64>,
    pub thread: JoinHandle<()>,
}

type Key = (String, i64);

/// Opens the log, loads what is logged per (agent, epoch) and starts the writer thread.
pub fn start(path: &Path, metrics: Arc<Metrics>, alive: Liveness) -> Result<LogWriter, LogError> {
    let mut conn = open_write(path)?;
    let ranges = load_ranges(&mut conn)?;
    let end_offset = end_offset(&conn)?;
    metrics.log_end_offset.set(end_offset as i64);
    let first: i64 = conn.query_row("SELECT COALESCE(MIN(first_offset), 0) FROM blocks", [], |r| r.get(0))?;
    metrics.log_first_offset.set(first);
    let (end_tx, end_rx) = watch::channel(end_offset);
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let holes: usize = ranges.values().map(SeqRanges::hole_count).sum();
    let state = WriterState { conn, ranges, end_offset, end_tx, metrics };
    let guard = alive.guard();
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            let _alive = guard;
            state.run(rx);
        })
        .map_err(LogError::Spawn)?;
    tracing::info!(path = %path.display(), end_offset, holes, "log opened");
    Ok(LogWriter { handle: LogHandle { tx }, end: end_rx, thread })
}

/// Reads every (agent, epoch)'s mark and holes. Rows not in normal form (only a log written by
/// hand or by a buggy version has them) are rewritten, so that each hole is one row again.
fn load_ranges(conn: &mut Connection) -> Result<HashMap<Key, SeqRanges>, LogError> {
    let mut stored: HashMap<Key, (u64, Vec<(u64, u64)>)> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT agent_id, epoch, next_seq FROM agent_sequences")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
        for row in rows {
            let (agent, epoch, next) = row?;
            stored.entry((agent, epoch)).or_default().0 = next.max(0) as u64;
        }
        let mut stmt = conn.prepare("SELECT agent_id, epoch, from_seq, to_seq FROM gaps")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
        })?;
        for row in rows {
            let (agent, epoch, from, to) = row?;
            stored.entry((agent, epoch)).or_default().1.push((from.max(0) as u64, to.max(0) as u64));
        }
    }
    let mut ranges = HashMap::with_capacity(stored.len());
    let mut rewrite = Vec::new();
    for (key, (next, holes)) in stored {
        let (restored, exact) = SeqRanges::restore(next, holes);
        if !exact || restored.next != next {
            rewrite.push((key.clone(), restored.clone()));
        }
        ranges.insert(key, restored);
    }
    if !rewrite.is_empty() {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for ((agent, epoch), restored) in &rewrite {
            tracing::warn!(
                agent,
                epoch,
                "gaps rows overlap or pass the mark; rewriting them as {} holes",
                restored.hole_count()
            );
            let detected_at: Option<i64> = tx.query_row(
                "SELECT MIN(detected_at) FROM gaps WHERE agent_id = ?1 AND epoch = ?2",
                params![agent, epoch],
                |r| r.get(0),
            )?;
            tx.execute("DELETE FROM gaps WHERE agent_id = ?1 AND epoch = ?2", params![agent, epoch])?;
            for hole in restored.holes() {
                tx.execute(
                    "INSERT INTO gaps (agent_id, epoch, from_seq, to_seq, detected_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![agent, epoch, hole.start as i64, hole.end as i64, detected_at.unwrap_or_else(unix_ms)],
                )?;
            }
            tx.execute(
                "INSERT INTO agent_sequences (agent_id, epoch, next_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (agent_id, epoch) DO UPDATE SET next_seq = excluded.next_seq",
                params![agent, epoch, restored.next as i64],
            )?;
        }
        tx.commit()?;
    }
    Ok(ranges)
}

/// One line per committed request that opened or filled holes (not one per hole: a client
/// skipping every other number would flood the log).
fn log_holes(group: &[AppendRequest], plans: &[Result<Plan, AppendError>]) {
    for (request, plan) in group.iter().zip(plans) {
        let Ok(plan) = plan else { continue };
        let (agent, epoch, missing) = (&request.agent_id, request.epoch, plan.ack.missing);
        if plan.opened > 0 {
            let holes = plan.changes.iter().filter(|c| matches!(c, HoleChange::Opened { .. })).count();
            tracing::warn!(
                agent,
                epoch,
                readings = plan.opened,
                holes,
                missing,
                "gap: sequence numbers skipped (dropped by the agent's spool, or still to come)"
            );
        }
        if plan.filled > 0 {
            tracing::info!(agent, epoch, readings = plan.filled, missing, "late readings filled gaps");
        }
    }
}

struct WriterState {
    conn: Connection,
    ranges: HashMap<Key, SeqRanges>,
    end_offset: u64,
    end_tx: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// What one request writes, decided in memory before the transaction so that a refused request
/// writes nothing while the others of its group commit.
#[derive(Debug, Default)]
struct Plan {
    ack: IngestAck,
    /// The unlogged parts of the request's blocks, in order.
    parts: Vec<LogBlock>,
    changes: Vec<HoleChange>,
    /// The new mark, if it moved.
    next: Option<u64>,
    /// Readings in holes this request opened, and in holes it filled.
    opened: u64,
    filled: u64,
}

impl Plan {
    fn writes(&self) -> bool {
        !self.parts.is_empty() || !self.changes.is_empty() || self.next.is_some()
    }
}

impl WriterState {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(QUEUE_DEPTH);
        let mut stopping = false;
        while !stopping {
            match rx.blocking_recv() {
                Some(Command::Append(request)) => group.push(request),
                Some(Command::Report(request)) => self.store_reports(request),
                Some(Command::Stop) => stopping = true,
                None => break,
            }
            if stopping {
                // No new requests can be queued now; commit whatever already was.
                rx.close();
            }
            while group.len() < QUEUE_DEPTH {
                match rx.try_recv() {
                    Ok(Command::Append(request)) => group.push(request),
                    Ok(Command::Report(request)) => self.store_reports(request),
                    Ok(Command::Stop) => {
                        stopping = true;
                        rx.close();
                    }
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.commit_group(std::mem::take(&mut group));
            }
            if stopping {
                while let Ok(command) = rx.try_recv() {
                    match command {
                        Command::Append(request) => group.push(request),
                        Command::Report(request) => self.store_reports(request),
                        Command::Stop => {}
                    }
                }
                if !group.is_empty() {
                    self.commit_group(std::mem::take(&mut group));
                }
            }
        }
        tracing::info!(end_offset = self.end_offset, "log writer stopped");
    }

    fn store_reports(&mut self, request: ReportRequest) {
        let result = self.write_reports(&request).map_err(|e| AppendError::Storage(e.to_string()));
        if let Err(error) = &result {
            tracing::warn!(%error, agent = %request.agent_id, "storing gap reports failed");
        }
        let _ = request.reply.send(result);
    }

    fn write_reports(&mut self, request: &ReportRequest) -> Result<(), LogError> {
        let now = unix_ms();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT OR REPLACE INTO gap_reports (agent_id, epoch, from_seq, to_seq, readings, first_ts, last_ts,
                 sensors, sensor_count, reason, recorded_at, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for r in &request.reports {
                let sensors = serde_json::to_string(&r.sensors).unwrap_or_else(|_| "[]".into());
                upsert.execute(params![
                    request.agent_id,
                    request.epoch,
                    r.from_seq as i64,
                    r.to_seq as i64,
                    r.readings as i64,
                    r.first_ts,
                    r.last_ts,
                    sensors,
                    r.sensor_count as i64,
                    r.reason,
                    r.recorded_at,
                    now
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn commit_group(&mut self, group: Vec<AppendRequest>) {
        // The new state of each (agent, epoch) the group touches; applied only after COMMIT.
        let mut working = HashMap::new();
        let plans: Vec<Result<Plan, AppendError>> = group.iter().map(|r| self.plan(r, &mut working)).collect();
        let written = if plans.iter().any(|p| p.as_ref().is_ok_and(Plan::writes)) {
            self.write_group(&group, &plans)
        } else {
            // Handshakes, duplicates and refusals only: nothing to commit.
            Ok(self.end_offset)
        };
        match written {
            Ok(end_offset) => {
                self.ranges.extend(working);
                self.end_offset = end_offset;
                for plan in plans.iter().flatten() {
                    self.metrics.readings_appended.inc_by(plan.ack.accepted);
                    self.metrics.readings_duplicate.inc_by(plan.ack.duplicates);
                    self.metrics.gap_readings.inc_by(plan.opened);
                    self.metrics.gap_filled_readings.inc_by(plan.filled);
                }
                self.metrics.log_end_offset.set(self.end_offset as i64);
                self.end_tx.send_replace(self.end_offset);
                log_holes(&group, &plans);
                for (request, plan) in group.into_iter().zip(plans) {
                    // The agent may have hung up; its data is committed and a resend dedups.
                    let _ = request.reply.send(plan.map(|p| p.ack));
                }
            }
            Err(error) => {
                tracing::error!(%error, requests = group.len(), "group commit failed; nothing of it was logged");
                let message = error.to_string();
                for (request, plan) in group.into_iter().zip(plans) {
                    let answer = match plan {
                        Err(refusal) => Err(refusal),
                        Ok(_) => Err(AppendError::Storage(message.clone())),
                    };
                    let _ = request.reply.send(answer);
                }
            }
        }
    }

    /// Decides what `request` appends, against the state left by the group's earlier requests.
    fn plan(&self, request: &AppendRequest, working: &mut HashMap<Key, SeqRanges>) -> Result<Plan, AppendError> {
        let key = (request.agent_id.clone(), request.epoch);
        let current = working.get(&key).or_else(|| self.ranges.get(&key));
        let mut plan = Plan::default();
        if request.blocks.is_empty() {
            // The agent's handshake: the mark as it stands, and nothing written or remembered.
            plan.ack.next_seq = current.map_or(0, SeqRanges::next);
            plan.ack.missing = current.map_or(0, SeqRanges::missing);
            return Ok(plan);
        }
        let mut ranges = current.cloned().unwrap_or_default();
        let (next_before, holes_before, missing_before) = (ranges.next, ranges.hole_count(), ranges.missing);
        let placed: Vec<LogBlock>;
        let blocks = if request.assign_seq {
            // Numbered from the mark as it stands after the group's earlier requests.
            placed = request
                .blocks
                .iter()
                .map(|b| match b.first_seq.checked_add(ranges.next) {
                    Some(first_seq) if first_seq.checked_add(u64::from(b.count)).is_some_and(|e| e <= MAX_SEQ) => {
                        Ok(LogBlock { first_seq, ..b.clone() })
                    }
                    _ => {
                        Err(AppendError::Storage(format!("sequence numbers of epoch {} are exhausted", request.epoch)))
                    }
                })
                .collect::<Result<_, _>>()?;
            &placed
        } else {
            &request.blocks
        };
        for block in blocks {
            let parts = ranges.insert(block.first_seq, block.first_seq + u64::from(block.count), &mut plan.changes);
            let mut decoded: Option<Block> = None;
            let mut new = 0u32;
            for part in parts {
                // A part is at most the block, so it fits in u32.
                let count = (part.end - part.start) as u32;
                let data = if count == block.count {
                    block.data.clone()
                } else {
                    let whole = match &mut decoded {
                        Some(whole) => whole,
                        None => decoded.insert(Block::decode(&block.data).map_err(|e| {
                            AppendError::Storage(format!("block {} does not decode: {e}", block.first_seq))
                        })?),
                    };
                    let skip = (part.start - block.first_seq) as usize;
                    Bytes::from(whole.sub_block(skip..skip + count as usize).encode())
                };
                plan.parts.push(LogBlock { first_seq: part.start, count, data });
                new += count;
            }
            plan.ack.accepted += u64::from(new);
            plan.ack.duplicates += u64::from(block.count - new);
        }
        if ranges.hole_count() > MAX_HOLES && ranges.hole_count() > holes_before {
            return Err(AppendError::TooManyHoles {
                agent: request.agent_id.clone(),
                epoch: request.epoch,
                holes: ranges.hole_count(),
            });
        }
        plan.opened = plan
            .changes
            .iter()
            .map(|c| match *c {
                HoleChange::Opened { from, to } => to - from,
                _ => 0,
            })
            .sum();
        // missing after = missing before + opened - filled.
        plan.filled = (missing_before + plan.opened).saturating_sub(ranges.missing);
        plan.next = (ranges.next != next_before).then_some(ranges.next);
        plan.ack.next_seq = ranges.next;
        plan.ack.missing = ranges.missing;
        working.insert(key, ranges);
        Ok(plan)
    }

    /// Writes the accepted plans in one transaction; returns the log's new end offset.
    fn write_group(&mut self, group: &[AppendRequest], plans: &[Result<Plan, AppendError>]) -> Result<u64, LogError> {
        let now = unix_ms();
        let mut end_offset = self.end_offset;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert_block = tx.prepare_cached(
                "INSERT INTO blocks (first_offset, count, agent_id, epoch, first_seq, received_at, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut upsert_seq = tx.prepare_cached(
                "INSERT INTO agent_sequences (agent_id, epoch, next_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (agent_id, epoch) DO UPDATE SET next_seq = excluded.next_seq",
            )?;
            let mut open_gap = tx.prepare_cached(
                "INSERT INTO gaps (agent_id, epoch, from_seq, to_seq, detected_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut shrink_gap = tx.prepare_cached(
                "UPDATE gaps SET from_seq = ?4, to_seq = ?5 WHERE agent_id = ?1 AND epoch = ?2 AND from_seq = ?3",
            )?;
            // The right half of a split keeps the time the hole was first seen.
            let mut split_gap = tx.prepare_cached(
                "INSERT INTO gaps (agent_id, epoch, from_seq, to_seq, detected_at)
                 SELECT agent_id, epoch, ?4, ?5, detected_at FROM gaps
                 WHERE agent_id = ?1 AND epoch = ?2 AND from_seq = ?3",
            )?;
            let mut fill_gap =
                tx.prepare_cached("DELETE FROM gaps WHERE agent_id = ?1 AND epoch = ?2 AND from_seq = ?3")?;
            for (request, plan) in group.iter().zip(plans) {
                let Ok(plan) = plan else { continue };
                let (agent, epoch) = (&request.agent_id, request.epoch);
                for change in &plan.changes {
                    match *change {
                        HoleChange::Opened { from, to } => {
                            open_gap.execute(params![agent, epoch, from as i64, to as i64, now])?;
                        }
                        HoleChange::Shrunk { was, from, to } => {
                            shrink_gap.execute(params![agent, epoch, was as i64, from as i64, to as i64])?;
                        }
                        HoleChange::Split { was, to, right_from, right_to } => {
                            split_gap.execute(params![agent, epoch, was as i64, right_from as i64, right_to as i64])?;
                            shrink_gap.execute(params![agent, epoch, was as i64, was as i64, to as i64])?;
                        }
                        HoleChange::Filled { was } => {
                            fill_gap.execute(params![agent, epoch, was as i64])?;
                        }
                    }
                }
                for part in &plan.parts {
                    insert_block.execute(params![
                        end_offset as i64,
                        part.count,
                        agent,
                        epoch,
                        part.first_seq as i64,
                        now,
                        &part.data[..]
                    ])?;
                    end_offset += u64::from(part.count);
                }
                if let Some(next) = plan.next {
                    upsert_seq.execute(params![agent, epoch, next as i64])?;
                }
            }
        }
        tx.commit()?;
        Ok(end_offset)
    }
}

#[cfg(test)]
// Expected results are lists of ranges, some of one element.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn ranges_of(blocks: &[(u64, u64)]) -> SeqRanges {
        let mut r = SeqRanges::default();
        for &(first, end) in blocks {
            r.insert(first, end, &mut Vec::new());
        }
        r
    }

    #[test]
    fn blocks_below_the_mark_without_holes_are_duplicates() {
        let mut r = ranges_of(&[(0, 10)]);
        let mut changes = Vec::new();
        assert_eq!(r.insert(0, 10, &mut changes), []);
        assert_eq!(r.insert(3, 8, &mut changes), []);
        assert_eq!(r.insert(4, 4, &mut changes), []);
        assert_eq!((r.next(), r.missing(), changes), (10, 0, vec![]));
    }

    #[test]
    fn a_straddling_block_keeps_only_its_new_tail() {
        let mut r = ranges_of(&[(0, 10)]);
        assert_eq!(r.insert(5, 15, &mut Vec::new()), [10..15]);
        assert_eq!(r.next(), 15);
    }

    #[test]
    fn a_block_above_the_mark_opens_a_hole() {
        let mut r = ranges_of(&[(0, 10)]);
        let mut changes = Vec::new();
        assert_eq!(r.insert(15, 20, &mut changes), [15..20]);
        assert_eq!(changes, [HoleChange::Opened { from: 10, to: 15 }]);
        assert_eq!((r.next(), r.missing(), r.holes().collect::<Vec<_>>()), (20, 5, vec![10..15]));
        // A first block that does not start at 0: the numbers before it are a hole too.
        let mut changes = Vec::new();
        assert_eq!(SeqRanges::default().insert(7, 9, &mut changes), [7..9]);
        assert_eq!(changes, [HoleChange::Opened { from: 0, to: 7 }]);
    }

    #[test]
    fn late_blocks_fill_holes_at_either_end_in_the_middle_and_across() {
        let mut r = ranges_of(&[(0, 10), (20, 30), (40, 50)]);
        assert_eq!(r.holes().collect::<Vec<_>>(), [10..20, 30..40]);
        let mut changes = Vec::new();
        assert_eq!(r.insert(5, 12, &mut changes), [10..12]);
        assert_eq!(r.insert(18, 22, &mut changes), [18..20]);
        assert_eq!(r.insert(14, 16, &mut changes), [14..16]);
        assert_eq!(
            changes,
            [
                HoleChange::Shrunk { was: 10, from: 12, to: 20 },
                HoleChange::Shrunk { was: 12, from: 12, to: 18 },
                HoleChange::Split { was: 12, to: 14, right_from: 16, right_to: 18 },
            ]
        );
        assert_eq!((r.holes().collect::<Vec<_>>(), r.missing()), (vec![12..14, 16..18, 30..40], 14));
        let mut changes = Vec::new();
        assert_eq!(r.insert(0, 60, &mut changes), [12..14, 16..18, 30..40, 50..60]);
        assert_eq!(
            changes,
            [HoleChange::Filled { was: 12 }, HoleChange::Filled { was: 16 }, HoleChange::Filled { was: 30 }]
        );
        assert_eq!((r.next(), r.missing(), r.hole_count()), (60, 0, 0));
    }

    /// The `gaps` rows of one (agent, epoch) as the SQL in `write_group` changes them.
    fn apply(rows: &mut BTreeMap<u64, u64>, change: HoleChange) {
        match change {
            HoleChange::Opened { from, to } => assert!(rows.insert(from, to).is_none()),
            HoleChange::Shrunk { was, from, to } => {
                assert!(rows.remove(&was).is_some());
                rows.insert(from, to);
            }
            HoleChange::Split { was, to, right_from, right_to } => {
                assert!(rows.insert(was, to).is_some());
                rows.insert(right_from, right_to);
            }
            HoleChange::Filled { was } => assert!(rows.remove(&was).is_some()),
        }
    }

    /// Random blocks covering `0..n` several times over, cut at different places, in random order.
    fn shuffled_cover(rng: &mut fastrand::Rng, n: u64) -> Vec<(u64, u64)> {
        let mut blocks = Vec::new();
        for _ in 0..rng.u64(1..4) {
            let mut first = 0;
            while first < n {
                let end = (first + rng.u64(1..=n / 4 + 1)).min(n);
                blocks.push((first, end));
                first = end;
            }
        }
        // Some arbitrary ranges on top, like a client resending odd pieces.
        for _ in 0..rng.usize(0..5) {
            let first = rng.u64(0..n);
            blocks.push((first, rng.u64(first + 1..=n)));
        }
        rng.shuffle(&mut blocks);
        blocks
    }

    #[test]
    fn random_blocks_in_random_order_log_every_sequence_once() {
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let n = rng.u64(1..500);
            let mut r = SeqRanges::default();
            let mut times_new = vec![0u32; n as usize];
            let mut rows = BTreeMap::new();
            for (first, end) in shuffled_cover(&mut rng, n) {
                let mut changes = Vec::new();
                for part in r.insert(first, end, &mut changes) {
                    assert!(first <= part.start && part.end <= end && part.start < part.end, "seed {seed}");
                    for seq in part {
                        times_new[seq as usize] += 1;
                    }
                }
                for change in changes {
                    apply(&mut rows, change);
                }
                // The holes are exactly what is below the mark and not logged, and so are the rows.
                let logged = |seq: u64| times_new[seq as usize] > 0;
                let expected: Vec<u64> = (0..r.next()).filter(|&s| !logged(s)).collect();
                let holes: Vec<u64> = r.holes().flatten().collect();
                assert_eq!(holes, expected, "seed {seed}");
                assert_eq!(r.missing(), expected.len() as u64, "seed {seed}");
                assert_eq!(rows.iter().map(|(&f, &t)| f..t).collect::<Vec<_>>(), r.holes().collect::<Vec<_>>());
                assert!(r.next() == n || !logged(r.next()), "seed {seed}");
                assert!(r.next() == 0 || logged(r.next() - 1), "seed {seed}");
            }
            assert!(times_new.iter().all(|&t| t == 1), "seed {seed}: {times_new:?}");
            assert_eq!((r.next(), r.missing(), r.hole_count()), (n, 0, 0), "seed {seed}");
        }
    }

    #[test]
    fn restored_rows_are_normalised() {
        let (r, exact) = SeqRanges::restore(50, [(30, 40), (10, 20)]);
        assert!(exact);
        assert_eq!((r.next(), r.missing(), r.holes().collect::<Vec<_>>()), (50, 20, vec![10..20, 30..40]));
        // Overlapping and adjacent rows merge, rows past the mark are cut, a hole up to the mark
        // lowers it.
        let (r, exact) = SeqRanges::restore(50, [(10, 20), (15, 25), (25, 28), (60, 70), (45, 55)]);
        assert!(!exact);
        assert_eq!((r.next(), r.missing(), r.holes().collect::<Vec<_>>()), (45, 18, vec![10..28]));
        assert_eq!(SeqRanges::restore(5, []), (SeqRanges { next: 5, ..SeqRanges::default() }, true));
    }

    fn block(first_seq: u64, n: usize) -> LogBlock {
        let mut b = tributary_shared::BlockBuilder::default();
        for i in 0..n {
            b.push("s", 1_764_000_000_000 + i as i64, (first_seq + i as u64) as f64);
        }
        LogBlock { first_seq, count: n as u32, data: Bytes::from(b.finish().encode()) }
    }

    type Reply = oneshot::Receiver<Result<IngestAck, AppendError>>;

    fn request_for(agent: &str, blocks: Vec<LogBlock>) -> (AppendRequest, Reply) {
        let (reply, rx) = oneshot::channel();
        (AppendRequest { agent_id: agent.into(), epoch: 1, blocks, assign_seq: false, reply }, rx)
    }

    fn request(blocks: Vec<LogBlock>) -> (AppendRequest, Reply) {
        request_for("gw", blocks)
    }

    fn writer(path: &Path) -> WriterState {
        let mut conn = open_write(path).unwrap();
        let ranges = load_ranges(&mut conn).unwrap();
        let end_offset = end_offset(&conn).unwrap();
        let (end_tx, _end_rx) = watch::channel(end_offset);
        WriterState { conn, ranges, end_offset, end_tx, metrics: Arc::new(Metrics::new()) }
    }

    fn ack(accepted: u64, duplicates: u64, next_seq: u64, missing: u64) -> IngestAck {
        IngestAck { accepted, duplicates, next_seq, missing }
    }

    /// Every logged reading's sequence number (its value, by construction), in offset order.
    fn logged_seqs(conn: &Connection) -> Vec<u64> {
        let mut stmt = conn.prepare("SELECT first_seq, count, data FROM blocks ORDER BY first_offset").unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?)));
        let mut seqs = Vec::new();
        for row in rows.unwrap() {
            let (first_seq, count, data) = row.unwrap();
            let block = Block::decode(&data).unwrap();
            assert_eq!(block.len() as i64, count);
            for (i, (_, _, value)) in block.readings().enumerate() {
                assert_eq!(value, (first_seq as u64 + i as u64) as f64, "block at seq {first_seq} holds another seq");
                seqs.push(value as u64);
            }
        }
        seqs
    }

    fn gap_rows(conn: &Connection) -> Vec<(i64, i64)> {
        let mut stmt = conn.prepare("SELECT from_seq, to_seq FROM gaps ORDER BY from_seq").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn one_group_dedups_across_its_requests_and_commits_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = writer(&dir.path().join("log.db"));
        let (a, mut a_rx) = request(vec![block(0, 10), block(10, 5)]);
        let (b, mut b_rx) = request(vec![block(12, 8), block(25, 5)]);
        let (c, mut c_rx) = request(vec![block(0, 10)]);
        state.commit_group(vec![a, b, c]);
        assert_eq!(a_rx.try_recv().unwrap().unwrap(), ack(15, 0, 15, 0));
        assert_eq!(b_rx.try_recv().unwrap().unwrap(), ack(10, 3, 30, 5));
        assert_eq!(c_rx.try_recv().unwrap().unwrap(), ack(0, 10, 30, 5));
        assert_eq!(state.end_offset, 25);
        let rows: Vec<(i64, i64, i64)> = state
            .conn
            .prepare("SELECT first_offset, count, first_seq FROM blocks ORDER BY first_offset")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(0, 10, 0), (10, 5, 10), (15, 5, 15), (20, 5, 25)]);
        assert_eq!(gap_rows(&state.conn), [(20, 25)]);
        assert_eq!(logged_seqs(&state.conn), [(0..20).collect::<Vec<_>>(), (25..30).collect()].concat());
    }

    #[test]
    fn a_late_block_appends_only_its_unlogged_parts_each_as_its_own_block() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = writer(&dir.path().join("log.db"));
        let (a, mut a_rx) = request(vec![block(10, 10), block(30, 10), block(50, 10)]);
        state.commit_group(vec![a]);
        assert_eq!(a_rx.try_recv().unwrap().unwrap(), ack(30, 0, 60, 30));
        assert_eq!(gap_rows(&state.conn), [(0, 10), (20, 30), (40, 50)]);
        // 5..45 covers the end of one hole, a whole one and the start of another.
        let (b, mut b_rx) = request(vec![block(5, 40)]);
        state.commit_group(vec![b]);
        assert_eq!(b_rx.try_recv().unwrap().unwrap(), ack(20, 20, 60, 10));
        assert_eq!(gap_rows(&state.conn), [(0, 5), (45, 50)]);
        let parts: Vec<(i64, i64)> = state
            .conn
            .prepare("SELECT first_seq, count FROM blocks WHERE first_offset >= 30 ORDER BY first_offset")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(parts, [(5, 5), (20, 10), (40, 5)]);
        // A fill in the middle of a hole splits its row; both halves keep when it was detected.
        state.conn.execute("UPDATE gaps SET detected_at = 42", []).unwrap();
        let (c, mut c_rx) = request(vec![block(2, 1), block(47, 1)]);
        state.commit_group(vec![c]);
        assert_eq!(c_rx.try_recv().unwrap().unwrap(), ack(2, 0, 60, 8));
        assert_eq!(gap_rows(&state.conn), [(0, 2), (3, 5), (45, 47), (48, 50)]);
        let detected: Vec<i64> = state
            .conn
            .prepare("SELECT DISTINCT detected_at FROM gaps")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(detected, [42]);
        let mut seqs = logged_seqs(&state.conn);
        seqs.sort_unstable();
        let expected: Vec<u64> = (0..60).filter(|s| ![0, 1, 3, 4, 45, 46, 48, 49].contains(s)).collect();
        assert_eq!(seqs, expected);
    }

    #[test]
    fn random_groups_keep_sqlite_and_memory_in_step_through_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        for seed in 0..8 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let agent = format!("gw-{seed}");
            let n = rng.u64(50..2000);
            let blocks = shuffled_cover(&mut rng, n);
            let mut state = writer(&path);
            for (i, group) in blocks.chunks(rng.usize(1..6)).enumerate() {
                if i % 7 == 6 {
                    // A restart: the state must come back from log.db as it was.
                    let before = state.ranges.clone();
                    drop(state);
                    state = writer(&path);
                    assert_eq!(state.ranges, before, "seed {seed}");
                }
                let mut replies = Vec::new();
                let requests = group
                    .chunks(2)
                    .map(|pair| {
                        let (request, rx) = request_for(
                            &agent,
                            pair.iter().map(|&(first, end)| block(first, (end - first) as usize)).collect(),
                        );
                        replies.push(rx);
                        request
                    })
                    .collect();
                state.commit_group(requests);
                for mut rx in replies {
                    assert!(rx.try_recv().unwrap().is_ok(), "seed {seed}");
                }
                let key = (agent.clone(), 1);
                let rows: Vec<(i64, i64)> = state
                    .conn
                    .prepare("SELECT from_seq, to_seq FROM gaps WHERE agent_id = ?1 ORDER BY from_seq")
                    .unwrap()
                    .query_map([&agent], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                let holes: Vec<(i64, i64)> =
                    state.ranges[&key].holes().map(|h| (h.start as i64, h.end as i64)).collect();
                assert_eq!(rows, holes, "seed {seed}");
            }
            let key = (agent.clone(), 1);
            assert_eq!((state.ranges[&key].next(), state.ranges[&key].missing()), (n, 0), "seed {seed}");
            let mut seqs: Vec<u64> = {
                let mut stmt = state.conn.prepare("SELECT first_seq, data FROM blocks WHERE agent_id = ?1").unwrap();
                let rows = stmt.query_map([&agent], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))).unwrap();
                rows.flat_map(|row| {
                    let (first_seq, data) = row.unwrap();
                    let block = Block::decode(&data).unwrap();
                    block
                        .entries
                        .iter()
                        .enumerate()
                        .map(|(i, e)| {
                            assert_eq!(e.value, (first_seq as u64 + i as u64) as f64);
                            e.value as u64
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
            };
            seqs.sort_unstable();
            assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "seed {seed}");
        }
    }

    #[test]
    fn beyond_max_holes_only_the_offending_request_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = writer(&dir.path().join("log.db"));
        // Every other sequence number: exactly MAX_HOLES one-number holes.
        let every_other: Vec<LogBlock> = (0..MAX_HOLES as u64).map(|i| block(2 * i + 1, 1)).collect();
        let (a, mut a_rx) = request(every_other);
        state.commit_group(vec![a]);
        let limit = MAX_HOLES as u64;
        assert_eq!(a_rx.try_recv().unwrap().unwrap(), ack(limit, 0, 2 * limit, limit));
        let end_before = state.end_offset;
        let (hostile, mut hostile_rx) = request(vec![block(2 * limit + 1, 1)]);
        let (other_agent, mut other_rx) = request_for("gw-2", vec![block(0, 3)]);
        let (filler, mut filler_rx) = request(vec![block(0, 1)]);
        state.commit_group(vec![hostile, other_agent, filler]);
        let refusal = hostile_rx.try_recv().unwrap().unwrap_err();
        assert!(matches!(refusal, AppendError::TooManyHoles { holes: 10_001, .. }), "{refusal}");
        assert!(refusal.to_string().contains("limit is 10000"), "{refusal}");
        assert_eq!(other_rx.try_recv().unwrap().unwrap(), ack(3, 0, 3, 0));
        assert_eq!(filler_rx.try_recv().unwrap().unwrap(), ack(1, 0, 2 * limit, limit - 1));
        assert_eq!(state.end_offset, end_before + 4);
        let gaps: i64 = state.conn.query_row("SELECT COUNT(*) FROM gaps", [], |r| r.get(0)).unwrap();
        assert_eq!(gaps, MAX_HOLES as i64 - 1);
        // Now at one below the limit, the same request fits.
        let (again, mut again_rx) = request(vec![block(2 * limit + 1, 1)]);
        state.commit_group(vec![again]);
        assert_eq!(again_rx.try_recv().unwrap().unwrap(), ack(1, 0, 2 * limit + 2, limit));
    }

    #[test]
    fn an_empty_request_answers_the_mark_and_remembers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = writer(&dir.path().join("log.db"));
        let (a, _a_rx) = request(vec![block(0, 10), block(20, 10)]);
        state.commit_group(vec![a]);
        let (known, mut known_rx) = request(vec![]);
        let (unknown, mut unknown_rx) = request_for("gw-new", vec![]);
        state.commit_group(vec![known, unknown]);
        assert_eq!(known_rx.try_recv().unwrap().unwrap(), ack(0, 0, 30, 10));
        assert_eq!(unknown_rx.try_recv().unwrap().unwrap(), ack(0, 0, 0, 0));
        assert!(!state.ranges.contains_key(&("gw-new".to_string(), 1)));
        let marks: i64 = state.conn.query_row("SELECT COUNT(*) FROM agent_sequences", [], |r| r.get(0)).unwrap();
        assert_eq!(marks, 1);
    }

    #[test]
    fn assigned_requests_are_numbered_from_the_mark_in_group_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = writer(&dir.path().join("log.db"));
        let assigned = |blocks: Vec<LogBlock>| {
            let (reply, rx) = oneshot::channel();
            (AppendRequest { agent_id: "gw".into(), epoch: -1, blocks, assign_seq: true, reply }, rx)
        };
        // Numbered from 0 within each request; the same numbers again are new data, not duplicates.
        let (a, mut a_rx) = assigned(vec![block(0, 3), block(3, 2)]);
        let (b, mut b_rx) = assigned(vec![block(0, 4)]);
        state.commit_group(vec![a, b]);
        assert_eq!(a_rx.try_recv().unwrap().unwrap(), ack(5, 0, 5, 0));
        assert_eq!(b_rx.try_recv().unwrap().unwrap(), ack(4, 0, 9, 0));
        let (c, mut c_rx) = assigned(vec![block(0, 4)]);
        state.commit_group(vec![c]);
        assert_eq!(c_rx.try_recv().unwrap().unwrap(), ack(4, 0, 13, 0));
        let rows: Vec<(i64, i64, i64)> = state
            .conn
            .prepare("SELECT epoch, first_seq, count FROM blocks ORDER BY first_offset")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(-1, 0, 3), (-1, 3, 2), (-1, 5, 4), (-1, 9, 4)]);
        assert!(gap_rows(&state.conn).is_empty());
        // The mark survives a restart, so numbering goes on after it.
        drop(state);
        let state = writer(&dir.path().join("log.db"));
        assert_eq!(state.ranges[&("gw".to_string(), -1)].next(), 13);
    }

    #[test]
    fn overlapping_gap_rows_are_rewritten_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let conn = open_write(&path).unwrap();
        conn.execute_batch(
            "INSERT INTO agent_sequences VALUES ('gw', 1, 100);
             INSERT INTO gaps VALUES ('gw', 1, 10, 20, 7), ('gw', 1, 15, 30, 9), ('gw', 1, 90, 100, 9);",
        )
        .unwrap();
        drop(conn);
        let state = writer(&path);
        let r = &state.ranges[&("gw".to_string(), 1)];
        assert_eq!((r.next(), r.missing()), (90, 20));
        assert_eq!(gap_rows(&state.conn), [(10, 30)]);
        let next: i64 = state.conn.query_row("SELECT next_seq FROM agent_sequences", [], |r| r.get(0)).unwrap();
        assert_eq!(next, 90);
    }
}
