//! The immutable log: a SQLite table of blocks, appended by one writer thread.
//!
//! A reading's offset is its block's `first_offset` plus its index, so offsets are dense from 0
//! while SQLite stores one row per block. The writer owns the only write connection and is fed by
//! a bounded channel; it drains every request waiting and commits them in one transaction (one
//! fsync for many concurrent agents), and answers each request only after that commit. Dedup is
//! by (agent, epoch, sequence range) against an in-memory copy of `agent_sequences`, so it costs
//! no read query.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot, watch};
use tributary_shared::{Block, BlockError, IngestAck};

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
}

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
    reply: oneshot::Sender<Result<IngestAck, AppendError>>,
}

enum Command {
    Append(AppendRequest),
    /// Sent once the HTTP server has stopped: commit what is queued and exit.
    Stop,
}

/// The handlers' side of the writer.
#[derive(Clone)]
pub struct LogHandle {
    tx: mpsc::Sender<Command>,
}

impl LogHandle {
    /// Queues a validated batch and waits until it is committed (or failed as a whole).
    pub async fn append(&self, agent_id: &str, epoch: i64, blocks: Vec<LogBlock>) -> Result<IngestAck, AppendError> {
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest { agent_id: agent_id.to_string(), epoch, blocks, reply };
        self.tx.send(Command::Append(request)).await.map_err(|_| AppendError::Unavailable)?;
        answer.await.map_err(|_| AppendError::Unavailable)?
    }

    /// Asks the writer to finish what is queued and stop.
    pub async fn stop(&self) {
        // An error means the writer has already gone, which is what we want.
        let _ = self.tx.send(Command::Stop).await;
    }
}

/// What to do with one block of a batch, given the (agent, epoch)'s high-water mark `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Every reading is below `next`: seen before.
    Duplicate,
    /// Append the block minus its first `skip` readings (already logged). `gap` is the range of
    /// sequence numbers the agent never sent (dropped by its spool policy).
    Append { skip: u32, gap: Option<(u64, u64)> },
}

/// Range dedup of one block (exactly-once: the agent resends whole blocks after a lost ack).
pub fn dispose(next: u64, first_seq: u64, count: u32) -> Disposition {
    let end = first_seq.saturating_add(u64::from(count));
    if count == 0 || end <= next {
        Disposition::Duplicate
    } else if first_seq < next {
        // `next - first_seq < count` here, so it fits in u32.
        Disposition::Append { skip: (next - first_seq) as u32, gap: None }
    } else if first_seq > next {
        Disposition::Append { skip: 0, gap: Some((next, first_seq)) }
    } else {
        Disposition::Append { skip: 0, gap: None }
    }
}

/// Opens (creating if needed) `log.db` with the pragmas the guarantees need.
pub fn open_write(path: &Path) -> Result<Connection, LogError> {
    let conn = Connection::open(path)?;
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
        );",
    )?;
    Ok(conn)
}

/// A read-only connection for the processor (and tests); the writer must have created the file.
pub fn open_read(path: &Path) -> Result<Connection, LogError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
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

/// Opens the log, loads the sequence map and starts the writer thread.
pub fn start(path: &Path, metrics: Arc<Metrics>, alive: Liveness) -> Result<LogWriter, LogError> {
    let conn = open_write(path)?;
    let mut next_seq = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT agent_id, epoch, next_seq FROM agent_sequences")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
        for row in rows {
            let (agent, epoch, next) = row?;
            next_seq.insert((agent, epoch), next.max(0) as u64);
        }
    }
    let end_offset = end_offset(&conn)?;
    metrics.log_end_offset.set(end_offset as i64);
    let (end_tx, end_rx) = watch::channel(end_offset);
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let state = WriterState { conn, next_seq, end_offset, end_tx, metrics };
    let guard = alive.guard();
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            let _alive = guard;
            state.run(rx);
        })
        .map_err(LogError::Spawn)?;
    tracing::info!(path = %path.display(), end_offset, "log opened");
    Ok(LogWriter { handle: LogHandle { tx }, end: end_rx, thread })
}

struct WriterState {
    conn: Connection,
    next_seq: HashMap<(String, i64), u64>,
    end_offset: u64,
    end_tx: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// The outcome of one group commit, applied to the in-memory state only after COMMIT succeeded.
struct GroupOutcome {
    acks: Vec<IngestAck>,
    next_seq: HashMap<(String, i64), u64>,
    end_offset: u64,
    appended: u64,
    duplicates: u64,
    gap_readings: u64,
}

impl WriterState {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(QUEUE_DEPTH);
        let mut stopping = false;
        while !stopping {
            match rx.blocking_recv() {
                Some(Command::Append(request)) => group.push(request),
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
                    if let Command::Append(request) = command {
                        group.push(request);
                    }
                }
                if !group.is_empty() {
                    self.commit_group(std::mem::take(&mut group));
                }
            }
        }
        tracing::info!(end_offset = self.end_offset, "log writer stopped");
    }

    fn commit_group(&mut self, group: Vec<AppendRequest>) {
        match self.write_group(&group) {
            Ok(outcome) => {
                self.next_seq.extend(outcome.next_seq);
                self.end_offset = outcome.end_offset;
                self.metrics.readings_appended.inc_by(outcome.appended);
                self.metrics.readings_duplicate.inc_by(outcome.duplicates);
                self.metrics.gap_readings.inc_by(outcome.gap_readings);
                self.metrics.log_end_offset.set(self.end_offset as i64);
                self.end_tx.send_replace(self.end_offset);
                for (request, ack) in group.into_iter().zip(outcome.acks) {
                    // The agent may have hung up; its data is committed and a resend dedups.
                    let _ = request.reply.send(Ok(ack));
                }
            }
            Err(error) => {
                tracing::error!(%error, requests = group.len(), "group commit failed; nothing of it was logged");
                let message = error.to_string();
                for request in group {
                    let _ = request.reply.send(Err(AppendError::Storage(message.clone())));
                }
            }
        }
    }

    fn write_group(&mut self, group: &[AppendRequest]) -> Result<GroupOutcome, LogError> {
        let received_at = unix_ms();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcome = GroupOutcome {
            acks: Vec::with_capacity(group.len()),
            next_seq: HashMap::new(),
            end_offset: self.end_offset,
            appended: 0,
            duplicates: 0,
            gap_readings: 0,
        };
        {
            let mut insert_block = tx.prepare_cached(
                "INSERT INTO blocks (first_offset, count, agent_id, epoch, first_seq, received_at, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut upsert_seq = tx.prepare_cached(
                "INSERT INTO agent_sequences (agent_id, epoch, next_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (agent_id, epoch) DO UPDATE SET next_seq = excluded.next_seq",
            )?;
            let mut insert_gap = tx.prepare_cached(
                "INSERT INTO gaps (agent_id, epoch, from_seq, to_seq, detected_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for request in group {
                let key = (request.agent_id.clone(), request.epoch);
                let before = outcome.next_seq.get(&key).or_else(|| self.next_seq.get(&key)).copied().unwrap_or(0);
                let mut next = before;
                let mut ack = IngestAck { accepted: 0, duplicates: 0, next_seq: next };
                for block in &request.blocks {
                    let (skip, gap) = match dispose(next, block.first_seq, block.count) {
                        Disposition::Duplicate => {
                            ack.duplicates += u64::from(block.count);
                            continue;
                        }
                        Disposition::Append { skip, gap } => (skip, gap),
                    };
                    if let Some((from, to)) = gap {
                        insert_gap.execute(params![
                            request.agent_id,
                            request.epoch,
                            from as i64,
                            to as i64,
                            received_at
                        ])?;
                        outcome.gap_readings += to - from;
                        tracing::warn!(agent = %request.agent_id, epoch = request.epoch, from, to, "gap: the agent never sent these sequence numbers");
                    }
                    let (first_seq, count, data) = if skip == 0 {
                        (block.first_seq, block.count, Cow::Borrowed(&block.data[..]))
                    } else {
                        // A resent block that is partly known: keep only its new tail.
                        let tail = Block::decode(&block.data)?.tail(skip as usize);
                        (block.first_seq + u64::from(skip), block.count - skip, Cow::Owned(tail.encode()))
                    };
                    insert_block.execute(params![
                        outcome.end_offset as i64,
                        count,
                        request.agent_id,
                        request.epoch,
                        first_seq as i64,
                        received_at,
                        &data[..]
                    ])?;
                    outcome.end_offset += u64::from(count);
                    next = first_seq + u64::from(count);
                    ack.accepted += u64::from(count);
                    ack.duplicates += u64::from(skip);
                }
                if next != before {
                    upsert_seq.execute(params![request.agent_id, request.epoch, next as i64])?;
                    outcome.next_seq.insert(key, next);
                }
                ack.next_seq = next;
                outcome.appended += ack.accepted;
                outcome.duplicates += ack.duplicates;
                outcome.acks.push(ack);
            }
        }
        tx.commit()?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_below_the_high_water_mark_are_duplicates() {
        assert_eq!(dispose(10, 0, 10), Disposition::Duplicate);
        assert_eq!(dispose(10, 3, 5), Disposition::Duplicate);
        assert_eq!(dispose(10, 10, 0), Disposition::Duplicate);
    }

    #[test]
    fn a_straddling_block_keeps_only_its_tail() {
        assert_eq!(dispose(10, 5, 10), Disposition::Append { skip: 5, gap: None });
        assert_eq!(dispose(10, 9, 2), Disposition::Append { skip: 1, gap: None });
    }

    #[test]
    fn a_block_above_the_mark_records_a_gap() {
        assert_eq!(dispose(10, 10, 5), Disposition::Append { skip: 0, gap: None });
        assert_eq!(dispose(10, 15, 5), Disposition::Append { skip: 0, gap: Some((10, 15)) });
        assert_eq!(dispose(0, 0, 1), Disposition::Append { skip: 0, gap: None });
    }

    fn block(first_seq: u64, n: usize) -> LogBlock {
        let mut b = tributary_shared::BlockBuilder::default();
        for i in 0..n {
            b.push("s", 1_764_000_000_000 + i as i64, i as f64);
        }
        LogBlock { first_seq, count: n as u32, data: Bytes::from(b.finish().encode()) }
    }

    fn request(blocks: Vec<LogBlock>) -> (AppendRequest, oneshot::Receiver<Result<IngestAck, AppendError>>) {
        let (reply, rx) = oneshot::channel();
        (AppendRequest { agent_id: "gw".into(), epoch: 1, blocks, reply }, rx)
    }

    #[test]
    fn one_group_dedups_across_its_requests_and_commits_once() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_write(&dir.path().join("log.db")).unwrap();
        let (end_tx, _end_rx) = watch::channel(0);
        let mut state =
            WriterState { conn, next_seq: HashMap::new(), end_offset: 0, end_tx, metrics: Arc::new(Metrics::new()) };
        let (a, mut a_rx) = request(vec![block(0, 10), block(10, 5)]);
        let (b, mut b_rx) = request(vec![block(12, 8), block(25, 5)]);
        let (c, mut c_rx) = request(vec![block(0, 10)]);
        state.commit_group(vec![a, b, c]);
        assert_eq!(a_rx.try_recv().unwrap().unwrap(), IngestAck { accepted: 15, duplicates: 0, next_seq: 15 });
        assert_eq!(b_rx.try_recv().unwrap().unwrap(), IngestAck { accepted: 10, duplicates: 3, next_seq: 30 });
        assert_eq!(c_rx.try_recv().unwrap().unwrap(), IngestAck { accepted: 0, duplicates: 10, next_seq: 30 });
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
        let gaps: (i64, i64) =
            state.conn.query_row("SELECT from_seq, to_seq FROM gaps", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!(gaps, (20, 25));
        let tail: Vec<u8> =
            state.conn.query_row("SELECT data FROM blocks WHERE first_offset = 15", [], |r| r.get(0)).unwrap();
        let tail = Block::decode(&tail).unwrap();
        assert_eq!(tail.entries.first().map(|e| e.value), Some(3.0));
    }
}
