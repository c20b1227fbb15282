//! The SQLite spool: every accepted reading is committed here, numbered, before anything else
//! happens to it, and stays until the aggregator has acknowledged it.
//!
//! Inputs collect readings into [`Chunk`]s (sensor ids interned, 24 bytes a reading) and hand a
//! chunk over whenever the writer's short queue has room; while the writer is busy (an fsync can
//! take a hundred milliseconds on a shared disk, more on an SD card) the chunk just grows. One
//! writer thread owns the write connection and group-commits: it waits for the first command, lets
//! `commit_interval` pass since its previous commit, takes everything queued, and writes it as one
//! or more blocks plus any pending deletion of acknowledged blocks, in one transaction. A reading's
//! sequence number is its block's `first_seq` plus its index. The spool epoch, a random id made with
//! the file, keeps a replaced disk from colliding with its past.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, watch};
use tributary_shared::BlockBuilder;

use crate::config::{SpoolConfig, SyncMode};
use crate::metrics::Metrics;

/// Largest block the spool writes; reads rely on it to find the block holding a sequence number.
pub const MAX_BLOCK_READINGS: usize = 65_536;

/// Commands queued in front of the writer. Short on purpose: while it is full, inputs keep
/// growing their current chunk, which stores a reading in 24 bytes rather than a queue slot each.
const QUEUE_COMMANDS: usize = 16;

/// Commands queued for the writer, on a short bounded channel: the batching happens in the
/// [`Chunk`] an input fills while the queue is full.
#[derive(Debug)]
pub enum Command {
    /// Readings to commit.
    Append(Chunk),
    /// The aggregator holds everything below `next_seq`: delete it.
    Ack { next_seq: u64 },
    /// The aggregator refuses this block as malformed: move it aside, keep it for inspection.
    DeadLetter { first_seq: u64, reason: String },
}

/// Readings on their way to the spool, and the intake number of the last message they came from
/// (once committed, [`Spool::committed`] reaches it: client mode acknowledges by it).
#[derive(Debug, Default)]
pub struct Chunk {
    pub readings: BlockBuilder,
    pub through: u64,
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.readings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
    }
}

/// A block as stored: `count` readings numbered from `first_seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBlock {
    pub first_seq: u64,
    pub count: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("cannot create the spool directory {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
    #[error("spool read: {0}")]
    Read(#[from] rusqlite::Error),
    #[error("the spool writer has stopped")]
    Closed,
}

/// The async side of the spool: queue commands, read blocks, watch the end of the spool.
#[derive(Clone)]
pub struct Spool {
    tx: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    end: watch::Receiver<u64>,
    committed: watch::Receiver<u64>,
    epoch: u64,
}

/// What the writer thread keeps between commits.
struct Writer {
    conn: Connection,
    config: SpoolConfig,
    metrics: Arc<Metrics>,
    next_seq: u64,
    bytes: u64,
    end: watch::Sender<u64>,
    committed: watch::Sender<u64>,
}

impl Spool {
    /// Opens (or creates) `dir/spool.db` and starts the writer thread. The thread ends, after a
    /// last commit, once every sender of its queue (every [`Spool`] clone and [`Spool::sender`]) is dropped.
    pub fn open(
        dir: &Path,
        config: &SpoolConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Spool, JoinHandle<()>), SpoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| SpoolError::CreateDir { path: dir.display().to_string(), source })?;
        let path = dir.join("spool.db");
        let open_err = |source| SpoolError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(&path).map_err(open_err)?;
        let (epoch, next_seq, readings, bytes) = init_schema(&conn, config.sync).map_err(open_err)?;
        let reader =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(open_err)?;

        metrics.spool_readings.set(readings as i64);
        metrics.spool_bytes.set(bytes as i64);
        let (end_tx, end_rx) = watch::channel(next_seq);
        let (committed_tx, committed_rx) = watch::channel(0);
        let (tx, rx) = mpsc::channel(QUEUE_COMMANDS);
        let writer =
            Writer { conn, config: config.clone(), metrics, next_seq, bytes, end: end_tx, committed: committed_tx };
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| SpoolError::CreateDir { path: dir.display().to_string(), source: e })?;
        tracing::info!(path = %path.display(), epoch, next_seq, readings, "spool open");
        Ok((Spool { tx, reader: Arc::new(Mutex::new(reader)), end: end_rx, committed: committed_rx, epoch }, thread))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Queues a command for the writer (waits while the queue is full).
    pub async fn send(&self, command: Command) -> Result<(), SpoolError> {
        self.tx.send(command).await.map_err(|_| SpoolError::Closed)
    }

    /// The writer's queue, for inputs that hand over chunks as room appears.
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }

    /// The intake number ([`Chunk::through`]) of the last committed chunk.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// The sequence number after the last committed reading; changes after every commit.
    pub fn end(&self) -> watch::Receiver<u64> {
        self.end.clone()
    }

    /// Blocks holding readings from `seq` on, oldest first, up to about `max_readings` readings
    /// and `max_bytes` bytes (at least one block if there is any).
    pub async fn read_from(
        &self,
        seq: u64,
        max_readings: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredBlock>, SpoolError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            read_blocks(&conn, seq, max_readings, max_bytes)
        })
        .await
        .map_err(|_| SpoolError::Closed)?
    }
}

fn init_schema(conn: &Connection, sync: SyncMode) -> rusqlite::Result<(u64, u64, u64, u64)> {
    // Every commit writes whole pages, and an idle gateway commits one reading at a time: 1 KiB
    // pages keep a commit within one 4 KiB page of the OS (4 KiB pages straddle two), which halves
    // the bytes written to flash when idle and cuts a third when busy. Takes effect on a new file.
    conn.pragma_update(None, "page_size", 1024)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", if sync == SyncMode::Full { "FULL" } else { "NORMAL" })?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS blocks (first_seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, data BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS dead_letters (
             first_seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, data BLOB NOT NULL,
             reason TEXT NOT NULL, at_ms INTEGER NOT NULL);",
    )?;
    // The epoch is made once, with the file; 63 bits so it is a non-negative SQLite integer.
    let fresh = (getrandom::u64().unwrap_or_else(|_| fastrand::u64(..)) >> 1) as i64;
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)", [fresh])?;
    let epoch: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0))?;
    let acked: Option<i64> =
        conn.query_row("SELECT value FROM meta WHERE key = 'acked_seq'", [], |r| r.get(0)).optional()?;
    let (end, readings, bytes): (i64, i64, i64) = conn.query_row(
        "SELECT coalesce(max(first_seq + count), 0), coalesce(sum(count), 0), coalesce(sum(length(data)), 0) FROM blocks",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let next_seq = end.max(acked.unwrap_or(0)) as u64;
    Ok((epoch as u64, next_seq, readings as u64, bytes as u64))
}

fn read_blocks(
    conn: &Connection,
    seq: u64,
    max_readings: usize,
    max_bytes: usize,
) -> Result<Vec<StoredBlock>, SpoolError> {
    let mut stmt = conn.prepare_cached(
        "SELECT first_seq, count, data FROM blocks
         WHERE first_seq > ?1 - ?2 AND first_seq + count > ?1 ORDER BY first_seq",
    )?;
    let mut rows = stmt.query(params![seq as i64, MAX_BLOCK_READINGS as i64])?;
    let (mut out, mut readings, mut bytes) = (Vec::new(), 0usize, 0usize);
    while let Some(row) = rows.next()? {
        let block = StoredBlock {
            first_seq: row.get::<_, i64>(0)? as u64,
            count: row.get::<_, i64>(1)? as u32,
            data: row.get(2)?,
        };
        if !out.is_empty() && (readings + block.count as usize > max_readings || bytes + block.data.len() > max_bytes) {
            break;
        }
        readings += block.count as usize;
        bytes += block.data.len();
        out.push(block);
    }
    Ok(out)
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let interval = self.config.commit_interval;
        let mut last_commit = Instant::now() - interval;
        while let Some(first) = rx.blocking_recv() {
            // Group commit: let the interval since the last commit pass, then take everything queued.
            let wait = (last_commit + interval).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            let mut commands = vec![first];
            while let Ok(command) = rx.try_recv() {
                commands.push(command);
            }
            last_commit = Instant::now();
            self.commit_with_retry(commands);
        }
        tracing::debug!("spool writer stopped");
    }

    /// Commits, retrying with backoff while the disk refuses: the readings are accepted, so they
    /// are held (and inputs wait behind the full queue) rather than dropped.
    fn commit_with_retry(&mut self, commands: Vec<Command>) {
        let batch = Batch::from_commands(commands, self.config.max_block_readings);
        let mut delay = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.commit(&batch) {
                Ok(()) => {
                    self.metrics.spool_commit_seconds.observe(started.elapsed().as_secs_f64());
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?delay, "spool commit failed; holding the readings and retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Some(through) = batch.through {
            self.committed.send_replace(through);
        }
    }

    fn commit(&mut self, batch: &Batch) -> rusqlite::Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut seq = self.next_seq;
        let (mut added_readings, mut added_bytes) = (0u64, 0u64);
        {
            let mut insert = tx.prepare_cached("INSERT INTO blocks (first_seq, count, data) VALUES (?1, ?2, ?3)")?;
            for (count, data) in &batch.blocks {
                insert.execute(params![seq as i64, *count as i64, data])?;
                seq += *count as u64;
                added_readings += *count as u64;
                added_bytes += data.len() as u64;
            }
        }
        let (mut removed_readings, mut removed_bytes) = (0u64, 0u64);
        if let Some(next) = batch.ack {
            let (r, b) = delete_below(&tx, next)?;
            tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('acked_seq', ?1)", [next as i64])?;
            removed_readings += r;
            removed_bytes += b;
        }
        let mut dead = 0u64;
        for (first_seq, reason) in &batch.dead_letters {
            let moved = tx.execute(
                "INSERT OR REPLACE INTO dead_letters (first_seq, count, data, reason, at_ms)
                 SELECT first_seq, count, data, ?2, ?3 FROM blocks WHERE first_seq = ?1",
                params![*first_seq as i64, reason, now_ms()],
            )?;
            if moved > 0 {
                let (r, b): (i64, i64) = tx.query_row(
                    "DELETE FROM blocks WHERE first_seq = ?1 RETURNING count, length(data)",
                    [*first_seq as i64],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?;
                dead += r as u64;
                removed_readings += r as u64;
                removed_bytes += b as u64;
            }
        }
        let bytes_now = self.bytes + added_bytes - removed_bytes.min(self.bytes + added_bytes);
        let mut dropped = 0u64;
        if bytes_now > self.config.max_bytes {
            let (r, b) = drop_oldest(&tx, bytes_now - self.config.max_bytes)?;
            dropped = r;
            removed_readings += r;
            removed_bytes += b;
        }
        tx.commit()?;

        // Only now, with the transaction durable, does anything outside learn of it.
        self.next_seq = seq;
        self.bytes = (self.bytes + added_bytes).saturating_sub(removed_bytes);
        let m = &self.metrics;
        m.spool_commits.inc();
        m.readings_spooled.inc_by(added_readings);
        m.spool_readings.inc_by(added_readings as i64 - removed_readings as i64);
        m.spool_bytes.set(self.bytes as i64);
        m.dead_letter_readings.inc_by(dead);
        if dropped > 0 {
            m.spool_dropped_readings.inc_by(dropped);
            tracing::warn!(dropped, max_bytes = self.config.max_bytes, "spool full: dropped the oldest readings");
        }
        if added_readings > 0 {
            self.end.send_replace(self.next_seq);
        }
        Ok(())
    }
}

/// Deletes blocks wholly below `next_seq`; returns (readings, bytes) removed.
fn delete_below(tx: &rusqlite::Transaction, next_seq: u64) -> rusqlite::Result<(u64, u64)> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM blocks WHERE first_seq < ?1 AND first_seq + count <= ?1 RETURNING count, length(data)",
    )?;
    let mut rows = stmt.query([next_seq as i64])?;
    let (mut readings, mut bytes) = (0u64, 0u64);
    while let Some(row) = rows.next()? {
        readings += row.get::<_, i64>(0)? as u64;
        bytes += row.get::<_, i64>(1)? as u64;
    }
    Ok((readings, bytes))
}

/// Drops the oldest blocks until at least `excess` bytes are freed; returns (readings, bytes).
fn drop_oldest(tx: &rusqlite::Transaction, excess: u64) -> rusqlite::Result<(u64, u64)> {
    let victims: Vec<(i64, i64, i64)> = {
        let mut stmt = tx.prepare_cached("SELECT first_seq, count, length(data) FROM blocks ORDER BY first_seq")?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        let mut freed = 0u64;
        while freed < excess {
            let Some(row) = rows.next()? else { break };
            let v: (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            freed += v.2 as u64;
            out.push(v);
        }
        out
    };
    let (mut readings, mut bytes) = (0u64, 0u64);
    if let Some(last) = victims.last() {
        tx.execute("DELETE FROM blocks WHERE first_seq <= ?1", [last.0])?;
        for (_, count, len) in &victims {
            readings += *count as u64;
            bytes += *len as u64;
        }
    }
    Ok((readings, bytes))
}

/// Everything one transaction writes, prepared from the queued commands.
struct Batch {
    /// (count, encoded block)
    blocks: Vec<(usize, Vec<u8>)>,
    ack: Option<u64>,
    dead_letters: Vec<(u64, String)>,
    /// The highest intake number among the chunks.
    through: Option<u64>,
}

impl Batch {
    /// Merges the chunks into blocks of at most `max_block_readings`, re-interning sensor ids.
    fn from_commands(commands: Vec<Command>, max_block_readings: usize) -> Batch {
        let mut batch = Batch { blocks: Vec::new(), ack: None, dead_letters: Vec::new(), through: None };
        let mut builder = BlockBuilder::default();
        let seal = |builder: &mut BlockBuilder, blocks: &mut Vec<(usize, Vec<u8>)>| {
            let block = builder.take();
            blocks.push((block.len(), block.encode()));
        };
        for command in commands {
            match command {
                Command::Append(chunk) => {
                    batch.through = Some(batch.through.map_or(chunk.through, |t| t.max(chunk.through)));
                    let chunk_block = chunk.readings.finish();
                    // chunk's sensor index -> builder's, found on first use and forgotten when a block is sealed
                    let mut map: Vec<Option<u32>> = vec![None; chunk_block.sensors.len()];
                    for e in &chunk_block.entries {
                        let slot = &mut map[e.sensor as usize];
                        let idx = match *slot {
                            Some(i) => i,
                            None => *slot.insert(builder.intern(&chunk_block.sensors[e.sensor as usize])),
                        };
                        builder.push_interned(idx, e.ts, e.value);
                        if builder.len() >= max_block_readings {
                            seal(&mut builder, &mut batch.blocks);
                            map.fill(None);
                        }
                    }
                }
                Command::Ack { next_seq } => batch.ack = Some(batch.ack.map_or(next_seq, |a| a.max(next_seq))),
                Command::DeadLetter { first_seq, reason } => batch.dead_letters.push((first_seq, reason)),
            }
        }
        if !builder.is_empty() {
            seal(&mut builder, &mut batch.blocks);
        }
        batch
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::Block;

    fn config() -> SpoolConfig {
        SpoolConfig { commit_interval: Duration::from_millis(1), max_block_readings: 100, ..SpoolConfig::default() }
    }

    /// `n` readings over three sensors.
    fn readings(n: usize, base: i64) -> Chunk {
        let mut chunk = Chunk::default();
        for i in 0..n {
            chunk.readings.push(&format!("s{}", i % 3), 1_764_000_000_000 + base + i as i64, i as f64);
        }
        chunk
    }

    /// Queues the chunk and waits for its commit.
    async fn append_and_wait(spool: &Spool, mut chunk: Chunk) {
        let mut committed = spool.committed();
        let through = *committed.borrow() + 1;
        chunk.through = through;
        spool.send(Command::Append(chunk)).await.unwrap();
        committed.wait_for(|c| *c >= through).await.unwrap();
    }

    #[tokio::test]
    async fn readings_are_numbered_in_blocks_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        let epoch = spool.epoch();
        append_and_wait(&spool, readings(250, 0)).await;
        append_and_wait(&spool, readings(5, 1000)).await;
        assert_eq!(*spool.end().borrow(), 255);
        let blocks = spool.read_from(0, 1_000_000, usize::MAX).await.unwrap();
        let counts: Vec<_> = blocks.iter().map(|b| (b.first_seq, b.count)).collect();
        assert_eq!(counts, [(0, 100), (100, 100), (200, 50), (250, 5)]);
        let decoded = Block::decode(&blocks[1].data).unwrap();
        assert_eq!(decoded.readings().next(), Some(("s1", 1_764_000_000_100, 100.0)));
        assert_eq!(metrics.readings_spooled.get(), 255);
        drop(spool);
        thread.join().unwrap();

        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics).unwrap();
        assert_eq!(spool.epoch(), epoch, "the epoch belongs to the file");
        assert_eq!(*spool.end().borrow(), 255);
        assert_eq!(spool.read_from(100, 150, usize::MAX).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn acked_blocks_are_deleted_and_numbering_continues_after_an_empty_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        append_and_wait(&spool, readings(150, 0)).await;
        spool.send(Command::Ack { next_seq: 150 }).await.unwrap();
        append_and_wait(&spool, readings(1, 500)).await;
        assert_eq!(
            spool.read_from(0, 1000, usize::MAX).await.unwrap().iter().map(|b| b.first_seq).collect::<Vec<_>>(),
            [150]
        );
        spool.send(Command::Ack { next_seq: 151 }).await.unwrap();
        drop(spool);
        thread.join().unwrap();
        assert_eq!(metrics.spool_readings.get(), 0);

        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics).unwrap();
        assert_eq!(*spool.end().borrow(), 151, "sequence numbers are never reused");
    }

    #[tokio::test]
    async fn a_full_spool_drops_its_oldest_blocks_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let config = SpoolConfig { max_bytes: 4000, ..config() };
        let (spool, _thread) = Spool::open(dir.path(), &config, metrics.clone()).unwrap();
        for i in 0..20 {
            append_and_wait(&spool, readings(100, i * 1000)).await;
        }
        let left = spool.read_from(0, usize::MAX, usize::MAX).await.unwrap();
        let bytes: usize = left.iter().map(|b| b.data.len()).sum();
        assert!(bytes <= 4000, "{bytes}");
        let kept: u64 = left.iter().map(|b| b.count as u64).sum();
        assert_eq!(kept + metrics.spool_dropped_readings.get(), 2000);
        assert_eq!(left.last().unwrap().first_seq, 1900, "the newest data is kept");
    }

    #[tokio::test]
    async fn queued_chunks_are_merged_into_full_blocks_with_one_id_table() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        // A slow commit interval so that all five chunks wait in the queue together.
        let config = SpoolConfig { commit_interval: Duration::from_millis(300), ..config() };
        let (spool, _thread) = Spool::open(dir.path(), &config, metrics.clone()).unwrap();
        append_and_wait(&spool, readings(1, 0)).await;
        let mut committed = spool.committed();
        for i in 0..5u64 {
            let mut chunk = readings(30, 100 * i as i64);
            chunk.through = 10 + i;
            spool.send(Command::Append(chunk)).await.unwrap();
        }
        committed.wait_for(|c| *c >= 14).await.unwrap();
        let blocks = spool.read_from(1, 1000, usize::MAX).await.unwrap();
        let counts: Vec<_> = blocks.iter().map(|b| (b.first_seq, b.count)).collect();
        assert_eq!(counts, [(1, 100), (101, 50)], "150 readings from five chunks in one commit");
        let block = Block::decode(&blocks[0].data).unwrap();
        assert_eq!(block.sensors, ["s0", "s1", "s2"]);
        assert_eq!(block.readings().nth(30), Some(("s0", 1_764_000_000_100, 0.0)));
        assert_eq!(metrics.spool_commits.get(), 2);
    }

    #[tokio::test]
    async fn dead_lettered_blocks_leave_the_spool_but_not_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        append_and_wait(&spool, readings(100, 0)).await;
        append_and_wait(&spool, readings(10, 0)).await;
        spool.send(Command::DeadLetter { first_seq: 0, reason: "bad".into() }).await.unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        assert_eq!(spool.read_from(0, 1000, usize::MAX).await.unwrap()[0].first_seq, 100);
        assert_eq!(metrics.dead_letter_readings.get(), 100);
        let conn = Connection::open(dir.path().join("spool.db")).unwrap();
        let kept: i64 = conn.query_row("SELECT count FROM dead_letters WHERE first_seq = 0", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, 100);
    }
}
