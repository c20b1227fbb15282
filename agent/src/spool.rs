//! The SQLite spool: every accepted reading is committed here, numbered, before anything else
//! happens to it, and stays until the aggregator has acknowledged it.
//!
//! Inputs collect readings into [`Chunk`]s (sensor ids interned, 24 bytes a reading) and hand a
//! chunk over whenever the writer's short queue has room; while the writer is busy (an fsync can
//! take a hundred milliseconds on a shared disk, more on an SD card) the chunk just grows. One
//! writer thread owns the write connection and group-commits: it waits for the first command, lets
//! the commit interval pass since its previous commit, takes everything queued, and writes it as one
//! or more blocks plus any pending deletion of acknowledged blocks, in one transaction. A reading's
//! sequence number is its block's `first_seq` plus its index. The spool epoch, a random id made with
//! the file, keeps a replaced disk from colliding with its past.
//!
//! A commit costs a page or two of WAL whatever it holds, and an fsync'ed one a 4 KiB write to the
//! flash: on a quiet gateway, where every reading would be its own commit, that is what wears the SD
//! card. So the interval follows the rate ([`CommitPace`]): under load `gather_interval` (25 ms), or
//! `commit_interval` (5 ms) while an input's acknowledgements wait for commits (client mode, see
//! [`AckWaiters`]), growing up to `max_commit_interval` while commits hold few readings (a reading
//! after a quiet spell is committed at once); and with `sync = "full"` commits are fsync'ed at most
//! `sync_interval` after they are made rather than each on its own (SQLite's `synchronous=NORMAL`
//! plus the writer's own fsync of the WAL). A clean stop commits and fsyncs everything at once.
//!
//! The forwarder's commands ([`Spool::ack`], [`Spool::dead_letter`], [`Spool::verify`]) travel on a
//! second, unbounded channel, so deleting what the aggregator holds never waits behind appends, not
//! even while the disk refuses them. When the spool reaches its size limit or its file system is
//! full, `spool.overflow` decides what is dropped; drops are counted and the aggregator records the
//! hole in the sequence numbers.
//!
//! Sequence numbers are never reused: every transaction that deletes (acks, drops, dead letters) or
//! skips numbers also persists the end, as `meta.next_seq` or as the end of the newest block it keeps,
//! and opening takes the highest number anything holds.
//! The blocks in the file when it is opened are original content, safe to resend; numbers given out
//! from `meta.unverified_from` on may collide with a timeline the file lost (a restored image, a WAL
//! tail lost to a power cut), so the forwarder learns the aggregator's mark before sending them and
//! the writer renumbers them past it if the spool turns out to be behind ([`Spool::verify`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot, watch};
use tributary_shared::gap::MAX_REPORTED_SENSORS;
use tributary_shared::{Block, BlockBuilder, BlockClock, GapReport};

use crate::config::{Overflow, SpoolConfig, SyncMode};
use crate::metrics::Metrics;

/// Largest block the spool writes; reads rely on it to find the block holding a sequence number.
pub const MAX_BLOCK_READINGS: usize = 65_536;

/// The spool's database file and the lock file that keeps a second process from writing it.
pub const SPOOL_FILE: &str = "spool.db";
pub const LOCK_FILE: &str = "spool.lock";

/// Testing aid where no small file system can be mounted: caps the spool file at this many pages
/// (SQLite's `max_page_count`), which then answers SQLITE_FULL like a full disk.
pub const MAX_PAGE_COUNT_ENV: &str = "TRIBUTARY_SPOOL_MAX_PAGE_COUNT";

/// Commands queued in front of the writer. Short on purpose: while it is full, inputs keep
/// growing their current chunk, which stores a reading in 24 bytes rather than a queue slot each.
const QUEUE_COMMANDS: usize = 16;

/// Share of (free space + the spool's files) the spool may fill when `max_bytes` does not fit: the
/// rest is for SQLite's page overhead, its WAL and whatever else shares the file system.
const FIT_PERCENT: u64 = 80;
/// While the file system is full, how often its free space is checked to lift the lowered limit.
const SPACE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Free space that counts as "space has returned".
const SPACE_RETURNED_BYTES: u64 = 1 << 20;
/// Kept on the spool's file system (`spool.reserve`) and given back when it is full, so that the
/// spool can still checkpoint its WAL and write the deletions that make room.
const RESERVE_BYTES: u64 = 1 << 20;
pub const RESERVE_FILE: &str = "spool.reserve";
/// SQLite's default WAL autocheckpoint, and the smaller one while the file system is full.
const WAL_PAGES: i64 = 1000;
const WAL_PAGES_WHILE_FULL: i64 = 100;
/// Each connection's page cache, in KiB (SQLite's `cache_size` as a negative number). SQLite's
/// default, 2 MiB per connection, fills as the spool's pages pass through it: 4 MiB of heap over a
/// long run, against an RSS bar of 10 MiB. The spool reads what it wrote moments ago (the tail)
/// and the oldest blocks (the head), and the kernel's page cache holds the rest.
const CACHE_KIB: i64 = 256;
/// Commit attempts under an ever lower limit before a commit's new readings are dropped outright.
const FULL_ATTEMPTS: u32 = 4;
/// Drops are logged at most this often (with the count since the last line): a full disk drops on
/// every group commit.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often a commit looks for readings older than `max_age` (a read of the oldest block or few).
const AGE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Forwarder commands that failed to commit are retried after this, doubling up to the max.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Readings a commit should gather before the commit interval stops growing: a commit costs a page
/// or two of WAL whatever it holds, so at 8 readings a commit that is an eighth per reading. Kept
/// below the inflight windows of common brokers (Mosquitto and VerneMQ 20, RabbitMQ 10, EMQX 32):
/// in client mode each PUBACK waits for its commit, and a broker that ran out of window before a
/// commit gathered this many would make the interval grow instead of shrink. Above this many
/// readings a commit, the floor takes over: `gather_interval` where nothing waits for commits, so
/// that a busy gateway's commits hold a few hundred readings ([`CommitPace`]).
const COMMIT_TARGET_READINGS: f64 = 8.0;
/// Group-commit waits up to this long sleep the writer thread, as under load: inputs meanwhile
/// grow their chunks instead of handing over every message. Longer waits (a quiet gateway) take
/// chunks as they come, so that a stop (a closed queue, [`Command::Flush`]) or a due fsync is not
/// held up by them.
const SHORT_WAIT: Duration = Duration::from_millis(50);

/// The writer's queue of readings, on a short bounded channel: the batching happens in the
/// [`Chunk`] an input fills while the queue is full.
#[derive(Debug)]
pub enum Command {
    /// Readings to commit.
    Append(Chunk),
    /// Commit what is queued now, whatever the interval (an input stopping: its acks wait on it).
    Flush,
}

/// The forwarder's commands, on an unbounded channel: they are few (one per request) and must
/// never wait behind readings.
#[derive(Debug)]
enum Control {
    /// Everything the forwarder sent below `next_seq` is in the aggregator's log: delete it.
    Ack { next_seq: u64 },
    /// The aggregator refuses these readings for good: move them aside, keep them for inspection.
    DeadLetter { first_seq: u64, count: u32, reason: String },
    /// The aggregator's mark for this epoch is `mark`; nothing from `from` on was ever sent.
    Verify { from: u64, mark: u64, reply: oneshot::Sender<Verified> },
    /// The aggregator stored these gap reports (`from_seq`, `to_seq`): forget them. One that grew
    /// since it was read no longer matches and is sent again.
    Reported { ranges: Vec<(u64, u64)> },
    /// The clock is synchronised in boot `boot_id`, its wall clock `offset_ms` ahead of its
    /// boot-time clock: re-stamp the blocks of that boot stamped before (see [`crate::clock`]).
    Restamp { boot_id: [u8; 16], offset_ms: i64 },
}

/// What [`Spool::verify`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// How far the readings numbered from `from` on moved up (0: the spool was not behind).
    pub shift: u64,
    /// How many readings moved.
    pub readings: u64,
}

/// Readings on their way to the spool, and the intake number of the last message they came from
/// (once committed, [`Spool::committed`] reaches it: client mode acknowledges by it).
#[derive(Debug, Default)]
pub struct Chunk {
    pub readings: BlockBuilder,
    pub through: u64,
    /// Readings to be stored in flagged blocks (boxed: most chunks have none).
    pub flagged: Option<Box<FlaggedReadings>>,
}

/// The readings of a chunk that go into flagged blocks.
#[derive(Debug, Default)]
pub struct FlaggedReadings {
    /// Readings the agent stamped before the clock was synchronised, in the frame of the flag
    /// ([`BlockClock::Unsynced`]) their block gets (see [`crate::clock`]).
    pub unsynced: Option<(BlockClock, BlockBuilder)>,
    /// Device timestamps beyond the limits, kept to be sent flagged ([`BlockClock::DeviceSkew`]).
    pub skewed: BlockBuilder,
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.readings.len()
            + self.flagged.as_ref().map_or(0, |f| f.unsynced.as_ref().map_or(0, |(_, b)| b.len()) + f.skewed.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the flagged readings out of the chunk, as blocks of their own: the unsynced ones
    /// re-based onto the frame of `frame` (the first unsynced flag of the batch) if they share its
    /// boot, so that chunks of one boot make one block.
    fn take_flagged(&mut self, frame: &mut Option<BlockClock>) -> Vec<Block> {
        let mut out = Vec::new();
        let Some(flagged) = self.flagged.take() else { return out };
        let FlaggedReadings { unsynced, skewed } = *flagged;
        if let Some((clock, builder)) = unsynced {
            let mut block = Block { clock, ..builder.finish() };
            match (*frame, clock) {
                (
                    Some(BlockClock::Unsynced { boot_id: to_boot, offset_ms: to }),
                    BlockClock::Unsynced { boot_id, offset_ms: from },
                ) if to_boot == boot_id => {
                    for e in &mut block.entries {
                        e.ts = e.ts.saturating_sub(from).saturating_add(to);
                    }
                    block.clock = BlockClock::Unsynced { boot_id, offset_ms: to };
                }
                _ => *frame = frame.or(Some(clock)),
            }
            out.push(block);
        }
        if !skewed.is_empty() {
            out.push(Block { clock: BlockClock::DeviceSkew, ..skewed.finish() });
        }
        out
    }
}

/// The flagged readings of a batch of chunks as encoded blocks of at most `max_block_readings`,
/// one run per flag; unsynced readings of the boot `restamp` names are re-stamped on the way
/// (the clock was synchronised after they were stamped and before they reached the spool).
fn flagged_blocks(
    chunks: &mut [Chunk],
    max_block_readings: usize,
    restamp: Option<([u8; 16], i64)>,
) -> (Vec<(usize, Vec<u8>)>, u64) {
    let mut frame = None;
    let mut merged: Vec<(BlockClock, BlockBuilder)> = Vec::new();
    for chunk in chunks.iter_mut() {
        for block in chunk.take_flagged(&mut frame) {
            let at = match merged.iter().position(|(clock, _)| *clock == block.clock) {
                Some(at) => at,
                None => {
                    merged.push((block.clock, BlockBuilder::default()));
                    merged.len() - 1
                }
            };
            for (sensor, ts, value) in block.readings() {
                merged[at].1.push(sensor, ts, value);
            }
        }
    }
    let mut restamped = 0u64;
    let mut out = Vec::new();
    for (clock, builder) in merged {
        let mut block = Block { clock, ..builder.finish() };
        if let Some(fixed) = restamp.and_then(|(boot_id, offset_ms)| crate::clock::restamp(&block, boot_id, offset_ms))
        {
            restamped += fixed.len() as u64;
            block = fixed;
        }
        let step = max_block_readings.max(1);
        let mut from = 0;
        while from < block.len() {
            let part = block.sub_block(from..from + step);
            out.push((part.len(), part.encode()));
            from += step;
        }
    }
    (out, restamped)
}

/// A block as stored: `count` readings numbered from `first_seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBlock {
    pub first_seq: u64,
    pub count: u32,
    pub data: Vec<u8>,
}

/// A block the aggregator refused for good, as `spool dead-letters list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub first_seq: u64,
    pub count: u32,
    pub reason: String,
    /// When it was set aside (Unix ms).
    pub at_ms: i64,
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
    #[error("{path} is held by a running tributary-agent; stop it first (one process at a time may write a spool)")]
    Locked { path: String },
    #[error("cannot lock {path}: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error("no spool at {path}: is data_dir right, and has the agent run with it?")]
    NotFound { path: String },
    #[error("{0}")]
    DeadLetters(String),
    #[error("cannot start the spool writer: {0}")]
    Start(std::io::Error),
}

/// The async side of the spool: queue readings and forwarder commands, read blocks, watch the end
/// of the spool.
#[derive(Clone)]
pub struct Spool {
    tx: mpsc::Sender<Command>,
    control: mpsc::UnboundedSender<Control>,
    reader: Arc<Mutex<Connection>>,
    end: watch::Receiver<u64>,
    committed: watch::Receiver<u64>,
    ack_waiters: AckWaiters,
    epoch: u64,
    unverified_from: u64,
}

/// The inputs whose acknowledgements wait for a commit, counted while they run (client mode: each
/// PUBACK waits for its message's commit, and the broker sends no more than its inflight window,
/// Mosquitto's 20 by default, ahead of the PUBACKs). While there is any, the spool commits every
/// `commit_interval` under load; while there is none (the embedded broker, which acknowledges from
/// its own log, and serial ports, which acknowledge nothing), every `gather_interval`, so that a
/// commit, its WAL pages and the forwarder's request carry a few hundred readings rather than fifty.
#[derive(Debug, Clone, Default)]
pub struct AckWaiters(Arc<AtomicUsize>);

impl AckWaiters {
    /// Counts one more input whose acks wait for commits, until the guard is dropped.
    pub fn hold(&self) -> AcksWaiting {
        self.0.fetch_add(1, Ordering::Relaxed);
        AcksWaiting(self.0.clone())
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

/// An input whose acks wait for commits, counted in [`AckWaiters`] until dropped.
#[derive(Debug)]
#[must_use = "the input counts only while the guard lives"]
pub struct AcksWaiting(Arc<AtomicUsize>);

impl Drop for AcksWaiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the writer thread keeps between commits.
struct Writer {
    conn: Connection,
    /// `spool.db`, for log lines, and its directory, for free space.
    path: PathBuf,
    dir: PathBuf,
    config: SpoolConfig,
    metrics: Arc<Metrics>,
    next_seq: u64,
    readings: u64,
    bytes: u64,
    /// `spool.max_bytes`, or less if that did not fit on the file system at open.
    limit: u64,
    /// Set while the file system refuses writes: the stored bytes it still allows.
    disk_cap: Option<u64>,
    last_space_check: Instant,
    /// [`MAX_PAGE_COUNT_ENV`], when set.
    max_pages: Option<u64>,
    /// `spool.reserve` is on disk.
    reserve_held: bool,
    /// Readings dropped because the spool was full, and for their age, not logged yet.
    full_drops: DropLog,
    age_drops: DropLog,
    /// When the spool last looked for readings older than `max_age`.
    last_age_check: Instant,
    /// The first commit not fsync'ed yet, with `sync = "full"` and a `sync_interval`.
    unsynced_since: Option<Instant>,
    end: watch::Sender<u64>,
    committed: watch::Sender<u64>,
    /// Inputs whose acks wait for commits: while there is any, the short floor (`commit_interval`).
    ack_waiters: AckWaiters,
    /// Set once the clock is synchronised ([`Spool::restamp`]): unsynced blocks of this boot that
    /// arrive later are re-stamped before they are stored.
    restamp: Option<([u8; 16], i64)>,
    /// Held while the writer lives: one process at a time writes a spool.
    _lock: File,
}

/// What the spool file holds when it is opened.
struct Opened {
    epoch: u64,
    next_seq: u64,
    readings: u64,
    bytes: u64,
    unverified_from: u64,
}

impl Spool {
    /// Opens (or creates) `dir/spool.db` and starts the writer thread. The thread ends, after a
    /// last commit, once every sender of its queues (every [`Spool`] clone and [`Spool::sender`])
    /// is dropped. Fails with [`SpoolError::Locked`] while another process has the spool open.
    pub fn open(
        dir: &Path,
        config: &SpoolConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Spool, JoinHandle<()>), SpoolError> {
        let max_pages = std::env::var(MAX_PAGE_COUNT_ENV).ok().and_then(|v| v.parse::<u64>().ok());
        Self::open_with(dir, config, metrics, max_pages)
    }

    fn open_with(
        dir: &Path,
        config: &SpoolConfig,
        metrics: Arc<Metrics>,
        max_pages: Option<u64>,
    ) -> Result<(Spool, JoinHandle<()>), SpoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| SpoolError::CreateDir { path: dir.display().to_string(), source })?;
        let lock = lock_dir(dir)?;
        let path = dir.join(SPOOL_FILE);
        // A damaged file (a bad SD card, a cut-off write, a deleted WAL) does not stop the agent:
        // what can be read goes into a fresh spool, and new readings are taken at once.
        if let Some(reason) = path.exists().then(|| crate::salvage::damage(&path)).flatten() {
            tracing::error!(path = %path.display(), reason, "the spool is damaged; salvaging what can be read");
            let s = crate::salvage::salvage_locked(dir, now_ms())?;
            metrics.spool_salvaged_readings.inc_by(s.readings);
            metrics.spool_salvage_lost_readings.inc_by(s.lost_readings);
            tracing::warn!(
                damaged = %s.damaged.display(),
                blocks = s.blocks,
                readings = s.readings,
                lost_blocks = s.lost_blocks,
                lost_readings = s.lost_readings,
                unreadable = s.unreadable.as_deref().unwrap_or("-"),
                epoch_kept = s.epoch.is_some(),
                end_known = s.end_known,
                "spool salvaged: the damaged file is kept beside it; lost sequence numbers become gaps at the aggregator"
            );
        }
        let open_err = |source| SpoolError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(&path).map_err(open_err)?;
        if let Some(pages) = max_pages {
            conn.pragma_update(None, "max_page_count", pages as i64).map_err(open_err)?;
        }
        let opened = init_schema(&conn, fsync_each_commit(config)).map_err(open_err)?;
        let reader =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(open_err)?;
        reader.pragma_update(None, "cache_size", -CACHE_KIB).map_err(open_err)?;
        // The reserve first, so that what fits is counted without it.
        let reserve_held = hold_reserve(dir);
        let free = match max_pages {
            Some(pages) => page_space(&conn, pages),
            None => free_bytes(dir),
        };
        let limit = effective_limit(config.max_bytes, dir, free, spool_files_size(&path));

        metrics.spool_readings.set(opened.readings as i64);
        metrics.spool_bytes.set(opened.bytes as i64);
        metrics.spool_max_bytes.set(limit as i64);
        // The writer waits on two queues (readings, forwarder commands) and a retry timer.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().map_err(SpoolError::Start)?;
        let (end_tx, end_rx) = watch::channel(opened.next_seq);
        let (committed_tx, committed_rx) = watch::channel(0);
        let (tx, rx) = mpsc::channel(QUEUE_COMMANDS);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let ack_waiters = AckWaiters::default();
        let writer = Writer {
            conn,
            path: path.clone(),
            dir: dir.to_path_buf(),
            config: config.clone(),
            metrics,
            next_seq: opened.next_seq,
            readings: opened.readings,
            bytes: opened.bytes,
            limit,
            disk_cap: None,
            last_space_check: Instant::now(),
            max_pages,
            reserve_held,
            full_drops: DropLog::default(),
            age_drops: DropLog::default(),
            last_age_check: Instant::now().checked_sub(AGE_CHECK_INTERVAL).unwrap_or_else(Instant::now),
            unsynced_since: None,
            end: end_tx,
            committed: committed_tx,
            ack_waiters: ack_waiters.clone(),
            restamp: None,
            _lock: lock,
        };
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(runtime, rx, control_rx))
            .map_err(SpoolError::Start)?;
        tracing::info!(
            path = %path.display(),
            epoch = opened.epoch,
            next_seq = opened.next_seq,
            readings = opened.readings,
            unverified_from = opened.unverified_from,
            max_bytes = limit,
            "spool open"
        );
        let spool = Spool {
            tx,
            control: control_tx,
            reader: Arc::new(Mutex::new(reader)),
            end: end_rx,
            committed: committed_rx,
            ack_waiters,
            epoch: opened.epoch,
            unverified_from: opened.unverified_from,
        };
        Ok((spool, thread))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The first sequence number that may collide with a timeline the file lost: the forwarder
    /// must learn the aggregator's mark and call [`Spool::verify`] before sending it or anything after.
    pub fn unverified_from(&self) -> u64 {
        self.unverified_from
    }

    /// Queues a command for the writer (waits while the queue is full).
    pub async fn send(&self, command: Command) -> Result<(), SpoolError> {
        self.tx.send(command).await.map_err(|_| SpoolError::Closed)
    }

    /// The writer's queue, for inputs that hand over chunks as room appears.
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }

    /// The intake number ([`Chunk::through`]) of the last committed (or dropped) chunk.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Where inputs whose acknowledgements wait for commits say so (see [`AckWaiters`]).
    pub fn ack_waiters(&self) -> AckWaiters {
        self.ack_waiters.clone()
    }

    /// The sequence number after the last committed reading; changes after every commit.
    pub fn end(&self) -> watch::Receiver<u64> {
        self.end.clone()
    }

    /// The aggregator holds everything the forwarder sent below `next_seq`: delete those blocks
    /// with the next commit. Never waits.
    pub fn ack(&self, next_seq: u64) -> Result<(), SpoolError> {
        self.control.send(Control::Ack { next_seq }).map_err(|_| SpoolError::Closed)
    }

    /// Moves the readings `first_seq .. first_seq + count` (all within one stored block) to the
    /// `dead_letters` table with the next commit; the rest of their block stays. Never waits.
    pub fn dead_letter(&self, first_seq: u64, count: u32, reason: String) -> Result<(), SpoolError> {
        self.control.send(Control::DeadLetter { first_seq, count, reason }).map_err(|_| SpoolError::Closed)
    }

    /// The aggregator's mark for this epoch is `mark`, and nothing numbered from `from` (at most
    /// [`Spool::unverified_from`]) on was ever sent. If `mark > from`, the spool went back in time:
    /// those readings are renumbered to start at `mark`, so they are not taken for duplicates.
    /// Returns once that is durable, so nothing is sent under a number about to change.
    pub async fn verify(&self, from: u64, mark: u64) -> Result<Verified, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.control.send(Control::Verify { from, mark, reply }).map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)
    }

    /// Up to `limit` reports of readings this spool dropped, oldest first, for the forwarder to
    /// send (`POST /api/v1/gaps`); [`Spool::reported`] forgets them once the aggregator has them.
    pub async fn gap_reports(&self, limit: usize) -> Result<Vec<GapReport>, SpoolError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            read_gap_reports(&conn, limit)
        })
        .await
        .map_err(|_| SpoolError::Closed)?
    }

    /// The aggregator stored these reports (as read: `from_seq`, `to_seq`): forget them with the
    /// next commit. Never waits.
    pub fn reported(&self, ranges: Vec<(u64, u64)>) -> Result<(), SpoolError> {
        self.control.send(Control::Reported { ranges }).map_err(|_| SpoolError::Closed)
    }

    /// The clock is synchronised in boot `boot_id`, its wall clock `offset_ms` ahead of its
    /// boot-time clock: the blocks of that boot stamped before are re-stamped with the next
    /// commit (and so is any that arrives later), then [`Spool::end`] wakes the forwarder. Never waits.
    pub fn restamp(&self, boot_id: [u8; 16], offset_ms: i64) -> Result<(), SpoolError> {
        self.control.send(Control::Restamp { boot_id, offset_ms }).map_err(|_| SpoolError::Closed)
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

/// Takes `dir/spool.lock` for as long as the returned file is open. The kernel drops the lock
/// when the process dies, kill -9 included.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let lock_err = |source| SpoolError::Lock { path: path.display().to_string(), source };
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(lock_err)?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(if error.kind() == std::io::ErrorKind::WouldBlock {
                SpoolError::Locked { path: dir.display().to_string() }
            } else {
                lock_err(error)
            });
        }
    }
    Ok(file)
}

/// Bytes available to an unprivileged writer on the file system holding `dir`.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) with a NUL-terminated path and a zeroed struct for it to fill.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

/// Makes sure `dir/spool.reserve` holds [`RESERVE_BYTES`] of allocated space; false if the file
/// system has no room for it (it is taken when space returns).
fn hold_reserve(dir: &Path) -> bool {
    let path = dir.join(RESERVE_FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES) {
        return true;
    }
    let allocated = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .and_then(|file| allocate(&file, RESERVE_BYTES));
    if allocated.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    allocated.is_ok()
}

/// Allocates `len` bytes of disk to `file` (blocks, not a sparse hole).
fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fallocate(3) on a descriptor we own; it returns the error number.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(rc)) }
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::io::Write;
        let mut file = file;
        let zeros = vec![0u8; 64 << 10];
        for _ in 0..len.div_ceil(zeros.len() as u64) {
            file.write_all(&zeros)?;
        }
        file.sync_all()
    }
}

/// Room left under a `max_page_count` cap (unused pages plus the free list).
fn page_space(conn: &Connection, max_pages: u64) -> Option<u64> {
    let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0)).ok();
    let (pages, free_list, page_size) = (pragma("page_count")?, pragma("freelist_count")?, pragma("page_size")?);
    Some((max_pages.saturating_sub(pages as u64) + free_list as u64) * page_size as u64)
}

/// The spool's files on disk: the database, its WAL and the WAL index.
fn spool_files_size(db: &Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
        .map(|m| allocated(&m))
        .sum()
}

/// The space a file takes on its file system: what deleting it would give back, as free space
/// counts it. Its length is not that: a file of 1 KiB SQLite pages holds whole 4 KiB blocks, and
/// what fits then came out a few hundred bytes different from one look to the next.
fn allocated(metadata: &std::fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        metadata.blocks() * 512
    }
    #[cfg(not(unix))]
    {
        metadata.len()
    }
}

/// `max_bytes`, or ~80 % of what fits (free space plus the spool's files) if it does not.
fn effective_limit(max_bytes: u64, dir: &Path, free: Option<u64>, files: u64) -> u64 {
    let Some(free) = free else { return max_bytes };
    let fits = free.saturating_add(files);
    if max_bytes <= fits {
        return max_bytes;
    }
    let limit = fits / 100 * FIT_PERCENT;
    tracing::warn!(
        "spool.max_bytes {} does not fit on {} ({} free); using {}",
        human_bytes(max_bytes),
        dir.display(),
        human_bytes(free),
        human_bytes(limit)
    );
    limit
}

/// `1 GiB`, `3.2 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() < 0.05 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Whether SQLite fsyncs every commit itself (`synchronous=FULL`): `sync = "full"` with
/// `sync_interval = "0s"`. Otherwise it runs `NORMAL` (fsyncs at checkpoints) and, with
/// `sync = "full"`, the writer fsyncs the WAL within `sync_interval` of a commit.
fn fsync_each_commit(config: &SpoolConfig) -> bool {
    config.sync == SyncMode::Full && config.sync_interval.is_zero()
}

fn init_schema(conn: &Connection, fsync_each_commit: bool) -> rusqlite::Result<Opened> {
    // Every commit writes whole pages, and an idle gateway commits one reading at a time: 1 KiB
    // pages keep a commit within one 4 KiB page of the OS (4 KiB pages straddle two), which halves
    // the bytes written to flash when idle and cuts a third when busy. Takes effect on a new file.
    conn.pragma_update(None, "page_size", 1024)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", if fsync_each_commit { "FULL" } else { "NORMAL" })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    create_tables(conn)?;
    // The epoch is made once, with the file; 63 bits so it is a non-negative SQLite integer.
    let fresh = (getrandom::u64().unwrap_or_else(|_| fastrand::u64(..)) >> 1) as i64;
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)", [fresh])?;
    let epoch: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0))?;
    let next_seq = stored_next_seq(conn)?;
    // Kept if already there: a life that crashed before verifying leaves its numbers unverified too.
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('unverified_from', ?1)", [next_seq as i64])?;
    let unverified_from: i64 =
        conn.query_row("SELECT value FROM meta WHERE key = 'unverified_from'", [], |r| r.get(0))?;
    let (readings, bytes): (i64, i64) =
        conn.query_row("SELECT coalesce(sum(count), 0), coalesce(sum(length(data)), 0) FROM blocks", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    Ok(Opened {
        epoch: epoch as u64,
        next_seq,
        readings: readings as u64,
        bytes: bytes as u64,
        unverified_from: (unverified_from.max(0) as u64).min(next_seq),
    })
}

pub(crate) fn create_tables(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS blocks (first_seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, data BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS gap_reports (
             from_seq INTEGER PRIMARY KEY, to_seq INTEGER NOT NULL, readings INTEGER NOT NULL,
             first_ts INTEGER, last_ts INTEGER, sensors TEXT NOT NULL, sensor_count INTEGER NOT NULL,
             reason TEXT NOT NULL, recorded_at INTEGER NOT NULL);",
    )?;
    // When a block was stored (Unix ms, for `max_age`); NULL in spools written before it existed.
    let has_stored_at: bool =
        conn.query_row("SELECT count(*) FROM pragma_table_info('blocks') WHERE name = 'stored_at'", [], |r| {
            r.get::<_, i64>(0).map(|n| n > 0)
        })?;
    if !has_stored_at {
        conn.execute_batch("ALTER TABLE blocks ADD COLUMN stored_at INTEGER")?;
    }
    // Dead letters have their own key, so setting a block aside never replaces an earlier one.
    // Spools written before that keyed them by first_seq: move their rows over once.
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('dead_letters')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let create = "CREATE TABLE dead_letters (
             id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, count INTEGER NOT NULL,
             data BLOB NOT NULL, reason TEXT NOT NULL, at_ms INTEGER NOT NULL)";
    if columns.is_empty() {
        conn.execute_batch(create)?;
    } else if !columns.iter().any(|c| c == "id") {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             ALTER TABLE dead_letters RENAME TO dead_letters_v1;
             {create};
             INSERT INTO dead_letters (first_seq, count, data, reason, at_ms)
                 SELECT first_seq, count, data, reason, at_ms FROM dead_letters_v1 ORDER BY first_seq;
             DROP TABLE dead_letters_v1;
             COMMIT;"
        ))?;
    }
    Ok(())
}

/// The first sequence number nothing in the file has used: past every block, every dead letter
/// and the persisted `next_seq` (and `acked_seq`, its name in older spools).
fn stored_next_seq(conn: &Connection) -> rusqlite::Result<u64> {
    let next: i64 = conn.query_row(
        "SELECT max(
             (SELECT coalesce(max(first_seq + count), 0) FROM blocks),
             (SELECT coalesce(max(first_seq + count), 0) FROM dead_letters),
             (SELECT coalesce(max(value), 0) FROM meta WHERE key IN ('next_seq', 'acked_seq')))",
        [],
        |r| r.get(0),
    )?;
    Ok(next.max(0) as u64)
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

/// The readings `from..to` of a block, as a block of their own.
pub fn slice_block(block: &Block, from: usize, to: usize) -> Block {
    let mut builder = BlockBuilder::default();
    for e in block.entries.get(from..to).unwrap_or(&[]) {
        builder.push(block.sensor_of(e), e.ts, e.value);
    }
    Block { clock: block.clock, ..builder.finish() }
}

/// Forwarder commands waiting for a commit.
#[derive(Default)]
struct Pending {
    ack: Option<u64>,
    dead_letters: Vec<(u64, u32, String)>,
    verifies: Vec<(u64, u64, oneshot::Sender<Verified>)>,
    reported: Vec<(u64, u64)>,
    restamp: Option<([u8; 16], i64)>,
}

impl Pending {
    fn add(&mut self, control: Control) {
        match control {
            Control::Ack { next_seq } => self.ack = Some(self.ack.map_or(next_seq, |a| a.max(next_seq))),
            Control::DeadLetter { first_seq, count, reason } => self.dead_letters.push((first_seq, count, reason)),
            Control::Verify { from, mark, reply } => self.verifies.push((from, mark, reply)),
            Control::Reported { ranges } => self.reported.extend(ranges),
            Control::Restamp { boot_id, offset_ms } => self.restamp = Some((boot_id, offset_ms)),
        }
    }

    fn is_empty(&self) -> bool {
        self.ack.is_none()
            && self.dead_letters.is_empty()
            && self.verifies.is_empty()
            && self.reported.is_empty()
            && self.restamp.is_none()
    }

    /// Commands other than acks: these need room on disk (a dead letter copies its block).
    fn has_moves(&self) -> bool {
        !self.dead_letters.is_empty() || !self.verifies.is_empty() || self.restamp.is_some()
    }
}

/// Which forwarder commands a transaction applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    All,
    /// Acks only (never past a block waiting to be dead-lettered): when the others fail, deleting
    /// what the aggregator holds must still go through.
    AcksOnly,
}

/// What one transaction did, applied to the writer's state only once it committed.
#[derive(Default)]
struct Applied {
    next_seq: u64,
    readings: u64,
    bytes: u64,
    added: u64,
    dropped: u64,
    /// Of `dropped`, readings older than `max_age`.
    expired: u64,
    dead: u64,
    /// (from, mark, result) for each verify.
    verified: Vec<(u64, u64, Verified)>,
    /// The pending ack was applied in full.
    acked: bool,
    /// The gap reports the aggregator stored were forgotten.
    forgot_reports: bool,
    /// Readings re-stamped now that the clock is synchronised.
    restamped: u64,
}

/// What woke the writer.
enum Event {
    Append(Option<Command>),
    Control(Option<Control>),
    Timer,
}

/// Whether the writer's queues are still open.
struct Queues {
    appends_open: bool,
    control_open: bool,
}

impl Queues {
    /// Takes what woke the writer. True if it should commit at once: an input is stopping
    /// ([`Command::Flush`]) or a queue closed (the agent is stopping).
    fn take(&mut self, event: Event, chunks: &mut Vec<Chunk>, pending: &mut Pending) -> bool {
        match event {
            Event::Append(Some(Command::Append(chunk))) => {
                chunks.push(chunk);
                false
            }
            Event::Append(Some(Command::Flush)) => true,
            Event::Append(None) => {
                self.appends_open = false;
                true
            }
            Event::Control(Some(c)) => {
                pending.add(c);
                false
            }
            Event::Control(None) => {
                self.control_open = false;
                true
            }
            Event::Timer => false,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The group-commit interval, following the rate readings arrive at: after each commit of
/// readings, the time [`COMMIT_TARGET_READINGS`] took to arrive at that commit's pace (since the
/// previous one), kept between a floor and `max_commit_interval`. The floor is `commit_interval`
/// while an input's acks wait for commits ([`AckWaiters`]: client mode), `gather_interval` otherwise
/// (kept within `commit_interval` ..= `max_commit_interval`). One busy commit brings the interval
/// down to the floor; a commit of a reading or two after a quiet spell takes it to the max. A commit
/// waits for the interval since the previous commit only, so a reading after a spell longer than
/// the interval is committed at once, and none waits longer than the max.
///
/// The floor only matters above 8 readings per floor (320 readings/s with the default 25 ms): below
/// that, the time 8 readings take is longer, and quiet gateways commit as before. Above, a commit
/// holds `rate × gather_interval` readings (250 at 10,000 readings/s) instead of `rate ×
/// commit_interval` (50), which is what a commit's fixed costs (a WAL page or two, a wake-up of the
/// writer, the forwarder's request) are shared by. The price, bounded: under load a reading waits up
/// to `gather_interval` (instead of `commit_interval`) to be committed and forwarded, and in embedded
/// mode what a crash can lose of what the broker acknowledged is that much; client mode keeps
/// `commit_interval`, so a broker's inflight window (20 at Mosquitto) turns over every 5 ms, not 25.
#[derive(Debug)]
struct CommitPace {
    /// `commit_interval`: the floor while acks wait for commits.
    min: Duration,
    /// `gather_interval`, within `min ..= max`: the floor while none do.
    gather: Duration,
    max: Duration,
    /// The time the target took to arrive at the last commit's pace, within `min ..= max`.
    paced: Duration,
    /// When the last commit of readings began (the spool's opening before the first).
    last: Instant,
}

impl CommitPace {
    fn new(min: Duration, gather: Duration, max: Duration, now: Instant) -> CommitPace {
        let max = max.max(min);
        CommitPace { min, gather: gather.clamp(min, max), max, paced: min, last: now }
    }

    /// The shortest interval: `commit_interval` while acks wait for commits, `gather_interval` otherwise.
    fn floor(&self, acks_wait: bool) -> Duration {
        if acks_wait { self.min } else { self.gather }
    }

    fn interval(&self, acks_wait: bool) -> Duration {
        self.paced.max(self.floor(acks_wait))
    }

    /// A commit that began `at` held `readings` readings (0: only the forwarder's commands, which
    /// say nothing of the rate).
    fn committed(&mut self, at: Instant, readings: u64) {
        if readings == 0 {
            return;
        }
        let since = at.saturating_duration_since(self.last);
        self.last = at;
        let gather = since.as_secs_f64() * COMMIT_TARGET_READINGS / readings as f64;
        self.paced = Duration::from_secs_f64(gather.min(self.max.as_secs_f64())).max(self.min);
    }
}

impl Writer {
    fn run(
        mut self,
        runtime: tokio::runtime::Runtime,
        mut appends: mpsc::Receiver<Command>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut pace = CommitPace::new(
            self.config.commit_interval,
            self.config.gather_interval,
            self.config.max_commit_interval,
            Instant::now(),
        );
        let mut last_commit: Option<Instant> = None;
        let mut pending = Pending::default();
        let mut retry = RETRY_MIN;
        let mut queues = Queues { appends_open: true, control_open: true };
        while queues.appends_open || queues.control_open {
            let mut chunks = Vec::new();
            let held = !pending.is_empty();
            let sync_at = self.sync_due();
            let first = runtime.block_on(async {
                tokio::select! {
                    c = appends.recv(), if queues.appends_open => Event::Append(c),
                    c = control.recv(), if queues.control_open => Event::Control(c),
                    _ = tokio::time::sleep(retry), if held => Event::Timer,
                    _ = sleep_until(sync_at), if sync_at.is_some() => Event::Timer,
                }
            });
            let mut now = queues.take(first, &mut chunks, &mut pending);
            if !now && chunks.is_empty() && pending.is_empty() {
                // An fsync fell due.
                self.sync_if_due();
                continue;
            }
            // Group commit: let the interval since the last commit pass, then take everything queued.
            // A stop (Flush, a closed queue) commits at once.
            while !now {
                self.sync_if_due();
                // A commit's worth gathered (a burst after a quiet spell): only the floor applies,
                // so a burst is never held for the quiet gateway's long interval.
                let gathered: usize = chunks.iter().map(Chunk::len).sum();
                let acks_wait = self.ack_waiters.any();
                let interval = match gathered as f64 >= COMMIT_TARGET_READINGS {
                    true => pace.floor(acks_wait),
                    false => pace.interval(acks_wait),
                };
                let Some(deadline) = last_commit.map(|at| at + interval) else { break };
                let wait = deadline.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    break;
                }
                if wait <= SHORT_WAIT {
                    std::thread::sleep(wait);
                    break;
                }
                let wake = self.sync_due().map_or(deadline, |at| at.min(deadline));
                let event = runtime.block_on(async {
                    tokio::select! {
                        c = appends.recv(), if queues.appends_open => Event::Append(c),
                        c = control.recv(), if queues.control_open => Event::Control(c),
                        _ = tokio::time::sleep_until(wake.into()) => Event::Timer,
                    }
                });
                now = queues.take(event, &mut chunks, &mut pending);
            }
            while let Ok(c) = appends.try_recv() {
                if let Command::Append(chunk) = c {
                    chunks.push(chunk);
                }
            }
            while let Ok(c) = control.try_recv() {
                pending.add(c);
            }
            if chunks.is_empty() && pending.is_empty() {
                self.sync_if_due();
                continue;
            }
            let started = Instant::now();
            last_commit = Some(started);
            let readings: u64 = chunks.iter().map(|c| c.len() as u64).sum();
            self.process(chunks, &mut pending, &mut control);
            pace.committed(started, readings);
            retry = if pending.is_empty() { RETRY_MIN } else { (retry * 2).min(RETRY_MAX) };
        }
        if !pending.is_empty() {
            self.try_commit(&[], &mut pending, Scope::All);
            if !pending.is_empty() {
                // Harmless: unapplied acks make the next start resend what the aggregator then
                // drops as duplicates; a block not yet dead-lettered is refused again.
                tracing::warn!("the spool stopped before applying some of the forwarder's commands");
            }
        }
        if self.unsynced_since.is_some() {
            self.sync_wal();
        }
        self.log_drops(0, 0, true);
        tracing::debug!("spool writer stopped");
    }

    /// When the oldest commit not fsync'ed yet is due to be.
    fn sync_due(&self) -> Option<Instant> {
        self.unsynced_since.map(|since| since + self.config.sync_interval)
    }

    fn sync_if_due(&mut self) {
        if self.sync_due().is_some_and(|at| at <= Instant::now()) {
            self.sync_wal();
        }
    }

    /// fsyncs the WAL, which holds every commit since the last checkpoint (SQLite fsyncs the WAL
    /// before a checkpoint and the database after it): what was committed is now on the disk. The
    /// WAL takes no locks (SQLite's are on the database and `-shm` files), so opening and closing
    /// it beside SQLite's own handle is safe.
    fn sync_wal(&mut self) {
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        match File::open(&wal).and_then(|f| f.sync_data()) {
            Ok(()) => self.unsynced_since = None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.unsynced_since = None,
            Err(error) => {
                // Tried again after another interval; the commits stay safe from a process crash.
                tracing::error!(path = %wal.display(), %error, "cannot fsync the spool's WAL");
                self.unsynced_since = Some(Instant::now());
            }
        }
    }

    /// A transaction committed: with a `sync_interval`, it is due to be fsync'ed within it.
    fn note_unsynced(&mut self) {
        if self.config.sync == SyncMode::Full && !fsync_each_commit(&self.config) && self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
    }

    /// Commits the chunks and the pending forwarder commands. A disk that refuses (SQLITE_FULL)
    /// lowers the spool's limit and drops by `spool.overflow`; other errors hold the readings and
    /// retry. Either way acks keep being applied.
    fn process(
        &mut self,
        mut chunks: Vec<Chunk>,
        pending: &mut Pending,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) {
        let (flagged, restamped) = flagged_blocks(&mut chunks, self.config.max_block_readings, self.restamp);
        self.metrics.clock_restamped_readings.inc_by(restamped);
        let mut batch = Batch::from_chunks(chunks, self.config.max_block_readings);
        batch.blocks.extend(flagged);
        self.maybe_lift_disk_cap();
        let mut scope = Scope::All;
        let mut full_attempts = 0;
        let mut delay = Duration::from_millis(100);
        loop {
            // Acks that arrived meanwhile join this attempt: they never wait behind a failing append.
            while let Ok(c) = control.try_recv() {
                pending.add(c);
            }
            let started = Instant::now();
            let error = match self.commit(&batch.blocks, pending, scope) {
                Ok(applied) => {
                    self.metrics.spool_commit_seconds.observe(started.elapsed().as_secs_f64());
                    self.apply(applied, pending, scope);
                    break;
                }
                Err(e) => e,
            };
            let full = is_disk_full(&error);
            let episode_began = full && self.disk_cap.is_none();
            if full {
                self.on_disk_full();
            }
            if batch.blocks.is_empty() {
                tracing::warn!(%error, "spool could not apply the forwarder's commands; retrying");
                if scope == Scope::All && pending.ack.is_some() {
                    self.try_commit(&[], pending, Scope::AcksOnly);
                }
                break;
            }
            if scope == Scope::All && pending.has_moves() {
                // Set dead letters and renumbering aside: they may be what fails.
                scope = Scope::AcksOnly;
                continue;
            }
            if full {
                full_attempts += 1;
                if !episode_began {
                    self.lower_disk_cap();
                }
                if self.config.overflow == Overflow::DropOldest {
                    // Deleted and committed first: SQLite reliably reuses pages freed by an earlier
                    // transaction, not always those freed by the one that needs them.
                    let incoming: u64 = batch.blocks.iter().map(|(_, data)| data.len() as u64).sum();
                    self.make_room(incoming);
                }
                if full_attempts < FULL_ATTEMPTS {
                    continue;
                }
                // Not even a smaller spool takes these readings: apply the acks (they free space)
                // and drop the readings rather than hold the inputs.
                self.try_commit(&[], pending, Scope::AcksOnly);
                let count: u64 = batch.blocks.iter().map(|(n, _)| *n as u64).sum();
                // Numbered, not stored: the aggregator sees the hole.
                self.next_seq += count;
                self.end.send_replace(self.next_seq);
                self.note_drops(count, 0);
                break;
            }
            tracing::error!(%error, retry_in = ?delay, "spool commit failed; holding the readings and retrying");
            if pending.ack.is_some() {
                self.try_commit(&[], pending, Scope::AcksOnly);
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        if let Some(through) = batch.through {
            // Keep the max: a serial chunk carries the number committed when it was read, so a batch
            // of only serial readings can hold a lower number than an MQTT commit just published;
            // moving back would make an ack waiter miss its message until the next commit.
            self.committed.send_if_modified(|committed| {
                let moved = through > *committed;
                *committed = (*committed).max(through);
                moved
            });
        }
    }

    /// Commits without retrying; a failure leaves `pending` as it was.
    fn try_commit(&mut self, blocks: &[(usize, Vec<u8>)], pending: &mut Pending, scope: Scope) {
        match self.commit(blocks, pending, scope) {
            Ok(applied) => self.apply(applied, pending, scope),
            Err(error) => {
                if is_disk_full(&error) {
                    self.on_disk_full();
                }
                tracing::debug!(%error, ?scope, "spool commit of the forwarder's commands failed");
            }
        }
    }

    /// The stored bytes allowed now.
    fn cap(&self) -> u64 {
        self.disk_cap.map_or(self.limit, |cap| cap.min(self.limit))
    }

    /// The file system refused a write. The first time in an episode: keep at most what is stored
    /// now (drop_oldest: 7/8 of it, so that deleting leaves free pages to write into), give back
    /// the reserve and the WAL's space, so that deletions (acks, drops) can still be written.
    fn on_disk_full(&mut self) {
        self.metrics.spool_disk_full.inc();
        if self.disk_cap.is_some() {
            return;
        }
        let stored = self.bytes.min(self.limit);
        self.disk_cap = Some(match self.config.overflow {
            Overflow::DropNewest => stored,
            Overflow::DropOldest => stored / 8 * 7,
        });
        self.last_space_check = Instant::now();
        self.metrics.spool_max_bytes.set(self.cap() as i64);
        let released = self.reserve_held && std::fs::remove_file(self.dir.join(RESERVE_FILE)).is_ok();
        self.reserve_held &= !released;
        // A checkpoint moves the WAL into the database and TRUNCATE gives its space back; a small
        // autocheckpoint keeps it small while space is short.
        let _ = self.conn.pragma_update(None, "wal_autocheckpoint", WAL_PAGES_WHILE_FULL);
        let _ = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        tracing::warn!(
            path = %self.path.display(),
            overflow = ?self.config.overflow,
            released_reserve = released,
            "the spool's file system is full: keeping at most {} and dropping readings by spool.overflow until space returns",
            human_bytes(self.cap())
        );
    }

    /// The file system refused again within the episode: keep a quarter less.
    fn lower_disk_cap(&mut self) {
        self.disk_cap = Some(self.cap() / 4 * 3);
        self.metrics.spool_max_bytes.set(self.cap() as i64);
    }

    /// Drops the oldest blocks, in a transaction of their own, until `incoming` bytes fit under the
    /// limit.
    fn make_room(&mut self, incoming: u64) {
        let target = self.cap().saturating_sub(incoming);
        if self.bytes <= target {
            return;
        }
        let excess = self.bytes - target;
        let next_seq = self.next_seq;
        let result = (|| {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let dropped = drop_oldest(&tx, excess, "disk_full")?;
            tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?1)", [next_seq as i64])?;
            tx.commit()?;
            Ok::<_, rusqlite::Error>(dropped)
        })();
        match result {
            Ok((readings, bytes)) => {
                self.note_unsynced();
                self.readings = self.readings.saturating_sub(readings);
                self.bytes = self.bytes.saturating_sub(bytes);
                self.metrics.spool_commits.inc();
                self.metrics.spool_readings.set(self.readings as i64);
                self.metrics.spool_bytes.set(self.bytes as i64);
                self.note_drops(readings, 0);
            }
            Err(error) => {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                tracing::debug!(%error, "spool could not drop its oldest blocks to make room");
            }
        }
    }

    /// While the disk cap is in force, checks now and then whether space has returned; if so,
    /// takes the reserve back and raises the limit to what fits, as at open.
    fn maybe_lift_disk_cap(&mut self) {
        let Some(cap) = self.disk_cap else { return };
        if self.last_space_check.elapsed() < SPACE_CHECK_INTERVAL {
            return;
        }
        self.last_space_check = Instant::now();
        let needed = SPACE_RETURNED_BYTES + if self.reserve_held { 0 } else { RESERVE_BYTES };
        if self.free_space().is_none_or(|free| free < needed) {
            return;
        }
        self.reserve_held = self.reserve_held || hold_reserve(&self.dir);
        let fits = self.free_space().unwrap_or(0).saturating_add(spool_files_size(&self.path));
        let lifted = (fits / 100 * FIT_PERCENT).max(cap);
        self.disk_cap = (lifted < self.limit).then_some(lifted);
        if self.disk_cap.is_none() {
            let _ = self.conn.pragma_update(None, "wal_autocheckpoint", WAL_PAGES);
        }
        tracing::info!(path = %self.path.display(), "space has returned on the spool's file system: limit now {}",
            human_bytes(self.cap()));
        self.metrics.spool_max_bytes.set(self.cap() as i64);
    }

    fn free_space(&self) -> Option<u64> {
        match self.max_pages {
            Some(pages) => page_space(&self.conn, pages),
            None => free_bytes(&self.dir),
        }
    }

    fn commit(&mut self, blocks: &[(usize, Vec<u8>)], pending: &Pending, scope: Scope) -> rusqlite::Result<Applied> {
        let result = self.transaction(blocks, pending, scope);
        if result.is_err() && !self.conn.is_autocommit() {
            // A failed COMMIT can leave the transaction open; never let the next one nest in it.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        result
    }

    fn transaction(
        &mut self,
        blocks: &[(usize, Vec<u8>)],
        pending: &Pending,
        scope: Scope,
    ) -> rusqlite::Result<Applied> {
        let cap = self.cap();
        let overflow = self.config.overflow;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut a =
            Applied { next_seq: self.next_seq, readings: self.readings, bytes: self.bytes, ..Applied::default() };
        // Anything deleted or skipped could lower the spool's end: persist next_seq with it.
        let mut persist_end = false;
        if scope == Scope::All {
            for (first_seq, count, reason) in &pending.dead_letters {
                let moved = dead_letter(&tx, *first_seq, *count, reason)?;
                a.dead += moved.readings;
                a.readings = a.readings.saturating_sub(moved.readings);
                a.bytes = (a.bytes + moved.added_bytes).saturating_sub(moved.removed_bytes);
                persist_end |= moved.readings > 0;
            }
            for (from, mark, _) in &pending.verifies {
                let shift = mark.saturating_sub(*from);
                let readings = if shift > 0 { renumber(&tx, *from, shift)? } else { 0 };
                if shift > 0 {
                    // Every block from `from` on moved up by `shift`, and so does the end.
                    a.next_seq = a.next_seq.max(*from) + shift;
                    persist_end = true;
                }
                a.verified.push((*from, *mark, Verified { shift, readings }));
            }
            if !pending.verifies.is_empty() {
                tx.execute("DELETE FROM meta WHERE key = 'unverified_from'", [])?;
            }
            if let Some((boot_id, offset_ms)) = pending.restamp {
                let (readings, before, after) = restamp_stored(&tx, boot_id, offset_ms)?;
                a.restamped = readings;
                a.bytes = (a.bytes + after).saturating_sub(before);
            }
        }
        if let Some(ack) = pending.ack {
            let mut target = ack;
            if scope == Scope::AcksOnly {
                if let Some(first) = pending.dead_letters.iter().map(|d| d.0).min() {
                    target = target.min(first);
                }
            }
            let (r, b) = delete_below(&tx, target)?;
            a.readings = a.readings.saturating_sub(r);
            a.bytes = a.bytes.saturating_sub(b);
            a.acked = target == ack;
            persist_end = true;
        }
        if !pending.reported.is_empty() {
            let mut forget = tx.prepare_cached("DELETE FROM gap_reports WHERE from_seq = ?1 AND to_seq = ?2")?;
            for (from, to) in &pending.reported {
                forget.execute(params![*from as i64, *to as i64])?;
            }
            a.forgot_reports = true;
        }
        let reason = if self.disk_cap.is_some() { "disk_full" } else { "spool_full" };
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO blocks (first_seq, count, data, stored_at) VALUES (?1, ?2, ?3, ?4)")?;
            let stored_at = now_ms();
            let mut dropping = false;
            let mut newest = DropSummary::default();
            for (count, data) in blocks {
                let count = *count as u64;
                if overflow == Overflow::DropNewest && (dropping || a.bytes + data.len() as u64 > cap) {
                    // Numbered, not stored: the aggregator sees the hole and records it.
                    dropping = true;
                    newest.add(a.next_seq, count, data);
                    a.dropped += count;
                    a.next_seq += count;
                    persist_end = true;
                    continue;
                }
                insert.execute(params![a.next_seq as i64, count as i64, data, stored_at])?;
                a.next_seq += count;
                a.added += count;
                a.readings += count;
                a.bytes += data.len() as u64;
            }
            record_gap(&tx, &newest, reason)?;
        }
        note_unsynced(&tx, blocks, self.next_seq)?;
        if overflow == Overflow::DropOldest && a.bytes > cap {
            let (r, b) = drop_oldest(&tx, a.bytes - cap, reason)?;
            a.dropped += r;
            a.readings = a.readings.saturating_sub(r);
            a.bytes = a.bytes.saturating_sub(b);
            persist_end = true;
        }
        if let Some(max_age) = self.config.max_age.filter(|_| self.last_age_check.elapsed() >= AGE_CHECK_INTERVAL) {
            self.last_age_check = Instant::now();
            let cutoff = now_ms().saturating_sub(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX));
            let (r, b) = drop_older_than(&tx, cutoff, "max_age")?;
            a.expired += r;
            a.dropped += r;
            a.readings = a.readings.saturating_sub(r);
            a.bytes = a.bytes.saturating_sub(b);
            persist_end |= r > 0;
        }
        // The newest block kept, if it ends at the spool's end, persists it already: on a quiet
        // gateway, where each commit deletes what was acknowledged and adds a block, that spares a
        // second page (the meta table's) in every commit.
        if persist_end && newest_block_end(&tx)? != Some(a.next_seq) {
            tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?1)", [a.next_seq as i64])?;
        }
        tx.commit()?;
        Ok(a)
    }

    /// The transaction is committed (durable, or due to be fsync'ed within `sync_interval`): only
    /// now does anything outside learn of it.
    fn apply(&mut self, a: Applied, pending: &mut Pending, scope: Scope) {
        self.note_unsynced();
        let moved_end = a.next_seq != self.next_seq;
        self.next_seq = a.next_seq;
        self.readings = a.readings;
        self.bytes = a.bytes;
        let m = self.metrics.clone();
        m.spool_commits.inc();
        m.readings_spooled.inc_by(a.added);
        m.spool_readings.set(self.readings as i64);
        m.spool_bytes.set(self.bytes as i64);
        m.dead_letter_readings.inc_by(a.dead);
        self.note_drops(a.dropped - a.expired, a.expired);
        if a.added > 0 || moved_end {
            self.end.send_replace(self.next_seq);
        }
        if a.acked {
            pending.ack = None;
        }
        if a.forgot_reports {
            pending.reported.clear();
        }
        if scope == Scope::All {
            pending.dead_letters.clear();
            if let Some(restamp) = pending.restamp.take() {
                // Blocks of this boot that reach the spool from now on are re-stamped as they come.
                self.restamp = Some(restamp);
                m.clock_restamped_readings.inc_by(a.restamped);
                tracing::info!(
                    readings = a.restamped,
                    "re-stamped the spooled readings stamped before the clock was synchronised"
                );
                self.end.send_replace(self.next_seq);
            }
            for ((from, mark, reply), (_, _, verified)) in pending.verifies.drain(..).zip(a.verified) {
                if verified.shift > 0 {
                    m.spool_rewinds.inc();
                    m.spool_renumbered_readings.inc_by(verified.readings);
                    tracing::warn!(
                        path = %self.path.display(),
                        spool_end = from,
                        aggregator_mark = mark,
                        renumbered = verified.readings,
                        "the spool is behind the aggregator for its epoch (restored from a copy, or a power cut \
                         lost its last commits): readings numbered since it was opened move past the aggregator's mark"
                    );
                }
                // The forwarder may have stopped waiting; the renumbering stands either way.
                let _ = reply.send(verified);
            }
        }
    }

    /// Counts readings dropped because the spool was full and for their age; logs each kind at
    /// most every [`DROP_LOG_INTERVAL`].
    fn note_drops(&mut self, full: u64, expired: u64) {
        self.metrics.spool_dropped_readings.inc_by(full + expired);
        self.log_drops(full, expired, false);
    }

    /// Adds drops to log and logs what is due (`now`: whatever the interval, at stop).
    fn log_drops(&mut self, full: u64, expired: u64, now: bool) {
        if let Some(dropped) = self.age_drops.due(expired, now) {
            tracing::warn!(
                dropped,
                max_age = ?self.config.max_age,
                "dropped readings older than spool.max_age, oldest first; the aggregator records the gap"
            );
        }
        let Some(dropped) = self.full_drops.due(full, now) else { return };
        let which = match self.config.overflow {
            Overflow::DropOldest => "oldest",
            Overflow::DropNewest => "newest",
        };
        tracing::warn!(
            dropped,
            limit = self.cap(),
            disk_full = self.disk_cap.is_some(),
            "spool full: dropped the {which} readings (spool.overflow); the aggregator records the gap"
        );
    }
}

/// Where the newest stored block ends (a rowid lookup: the table's last page).
fn newest_block_end(tx: &rusqlite::Transaction) -> rusqlite::Result<Option<u64>> {
    let end: Option<i64> = tx
        .prepare_cached("SELECT first_seq + count FROM blocks ORDER BY first_seq DESC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(end.map(|e| e.max(0) as u64))
}

fn is_disk_full(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::DiskFull)
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

/// Dropped readings not logged yet, and when the last line about them was written: a line at
/// most every [`DROP_LOG_INTERVAL`], so that a spool dropping at every commit does not flood the log.
#[derive(Debug, Default)]
struct DropLog {
    unlogged: u64,
    last: Option<Instant>,
}

impl DropLog {
    /// Adds `dropped`; returns how many to log if a line is due (`now`: whatever the interval).
    fn due(&mut self, dropped: u64, now: bool) -> Option<u64> {
        self.unlogged += dropped;
        if self.unlogged == 0 || (!now && self.last.is_some_and(|t| t.elapsed() < DROP_LOG_INTERVAL)) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Readings stored while the clock read before this (2020-01-01) have no age we can trust.
const CLOCK_SET_MS: i64 = 1_577_836_800_000;

/// Drops the oldest blocks stored before `cutoff` (Unix ms), stopping at the first younger one
/// (or one without a trustworthy time), so what goes is always a prefix; returns (readings, bytes).
fn drop_older_than(tx: &rusqlite::Transaction, cutoff: i64, reason: &str) -> rusqlite::Result<(u64, u64)> {
    let last: Option<i64> = {
        let mut stmt = tx.prepare_cached("SELECT first_seq, stored_at FROM blocks ORDER BY first_seq")?;
        let mut rows = stmt.query([])?;
        let mut last = None;
        while let Some(row) = rows.next()? {
            match row.get::<_, Option<i64>>(1)? {
                Some(at) if (CLOCK_SET_MS..cutoff).contains(&at) => last = Some(row.get(0)?),
                _ => break,
            }
        }
        last
    };
    let Some(last) = last else { return Ok((0, 0)) };
    delete_through(tx, last, reason)
}

/// Deletes the blocks up to the one starting at `last`, and records them as a gap for `reason`;
/// returns (readings, bytes).
fn delete_through(tx: &rusqlite::Transaction, last: i64, reason: &str) -> rusqlite::Result<(u64, u64)> {
    let mut stmt =
        tx.prepare_cached("DELETE FROM blocks WHERE first_seq <= ?1 RETURNING first_seq, count, length(data), data")?;
    let mut rows = stmt.query([last])?;
    let (mut readings, mut bytes) = (0u64, 0u64);
    let mut dropped = DropSummary::default();
    while let Some(row) = rows.next()? {
        let (first_seq, count) = (row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64);
        readings += count;
        bytes += row.get::<_, i64>(2)? as u64;
        dropped.add(first_seq, count, row.get_ref(3)?.as_blob().unwrap_or_default());
    }
    drop(rows);
    record_gap(tx, &dropped, reason)?;
    Ok((readings, bytes))
}

fn read_gap_reports(conn: &Connection, limit: usize) -> Result<Vec<GapReport>, SpoolError> {
    let mut stmt = conn.prepare_cached(
        "SELECT from_seq, to_seq, readings, first_ts, last_ts, sensors, sensor_count, reason, recorded_at
         FROM gap_reports ORDER BY from_seq LIMIT ?1",
    )?;
    let reports = stmt.query_map([limit as i64], GapReport::from_row)?.collect::<Result<_, _>>()?;
    Ok(reports)
}

/// Drops the oldest blocks until at least `excess` bytes are freed, recording them as a gap for
/// `reason`; returns (readings, bytes).
fn drop_oldest(tx: &rusqlite::Transaction, excess: u64, reason: &str) -> rusqlite::Result<(u64, u64)> {
    let last: Option<i64> = {
        let mut stmt = tx.prepare_cached("SELECT first_seq, length(data) FROM blocks ORDER BY first_seq")?;
        let mut rows = stmt.query([])?;
        let (mut last, mut freed) = (None, 0u64);
        while freed < excess {
            let Some(row) = rows.next()? else { break };
            last = Some(row.get(0)?);
            freed += row.get::<_, i64>(1)? as u64;
        }
        last
    };
    match last {
        Some(last) => delete_through(tx, last, reason),
        None => Ok((0, 0)),
    }
}

/// What one transaction dropped for one reason: a run of sequence numbers, and what the readings
/// in it were (read from the blocks before they go).
#[derive(Debug, Default)]
struct DropSummary {
    range: Option<(u64, u64)>,
    readings: u64,
    first_ts: Option<i64>,
    last_ts: Option<i64>,
    sensors: std::collections::BTreeSet<String>,
}

impl DropSummary {
    fn add(&mut self, first_seq: u64, count: u64, data: &[u8]) {
        let end = first_seq + count;
        self.range = Some(self.range.map_or((first_seq, end), |(from, to)| (from.min(first_seq), to.max(end))));
        self.readings += count;
        // A block that does not decode still counts; only its sensors and times are unknown.
        if let Ok(block) = Block::decode(data) {
            for (sensor, ts, _) in block.readings() {
                self.first_ts = Some(self.first_ts.map_or(ts, |t| t.min(ts)));
                self.last_ts = Some(self.last_ts.map_or(ts, |t| t.max(ts)));
                if !self.sensors.contains(sensor) {
                    self.sensors.insert(sensor.to_string());
                }
            }
        }
    }
}

/// Records a drop as a gap report for the forwarder to send ([`Spool::gap_reports`]), merged into
/// the report that ends where it begins for the same reason (a spool that drops at every commit
/// makes one report, not thousands). Best effort: on a full disk a report that cannot be written
/// must not stop the drop that makes room, and the aggregator sees the hole anyway.
fn record_gap(tx: &rusqlite::Transaction, dropped: &DropSummary, reason: &str) -> rusqlite::Result<()> {
    let Some((from, to)) = dropped.range else { return Ok(()) };
    tx.execute_batch("SAVEPOINT gap_report")?;
    let result = (|| {
        type Stored = (i64, i64, Option<i64>, Option<i64>, String, i64);
        let before: Option<Stored> = tx
            .query_row(
                "SELECT from_seq, readings, first_ts, last_ts, sensors, sensor_count FROM gap_reports
                 WHERE to_seq = ?1 AND reason = ?2",
                params![from as i64, reason],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()?;
        let mut names: Vec<String> = dropped.sensors.iter().take(MAX_REPORTED_SENSORS).cloned().collect();
        let mut count = dropped.sensors.len() as i64;
        let (mut start, mut readings, mut first_ts, mut last_ts) =
            (from as i64, dropped.readings as i64, dropped.first_ts, dropped.last_ts);
        if let Some((b_from, b_readings, b_first, b_last, b_sensors, b_count)) = before {
            start = b_from;
            readings += b_readings;
            first_ts = [first_ts, b_first].into_iter().flatten().min();
            last_ts = [last_ts, b_last].into_iter().flatten().max();
            let mut union: std::collections::BTreeSet<String> =
                serde_json::from_str::<Vec<String>>(&b_sensors).unwrap_or_default().into_iter().collect();
            union.extend(names);
            // Past the names kept, only a lower bound of the distinct sensors is known.
            count = count.max(b_count).max(union.len() as i64);
            names = union.into_iter().take(MAX_REPORTED_SENSORS).collect();
        }
        let names = serde_json::to_string(&names).unwrap_or_else(|_| "[]".into());
        tx.execute(
            "INSERT OR REPLACE INTO gap_reports (from_seq, to_seq, readings, first_ts, last_ts, sensors,
             sensor_count, reason, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![start, to as i64, readings, first_ts, last_ts, names, count, reason, now_ms()],
        )?;
        Ok::<_, rusqlite::Error>(())
    })();
    match result {
        Ok(()) => tx.execute_batch("RELEASE gap_report"),
        Err(error) => {
            tracing::warn!(%error, from, to, reason, "cannot record the dropped readings as a gap report");
            tx.execute_batch("ROLLBACK TO gap_report; RELEASE gap_report")
        }
    }
}

#[derive(Debug, Default)]
struct Moved {
    readings: u64,
    removed_bytes: u64,
    added_bytes: u64,
}

/// Moves readings `first_seq .. first_seq + count` of the block holding `first_seq` to
/// `dead_letters`; the rest of the block stays in the spool as blocks of their own.
fn dead_letter(tx: &rusqlite::Transaction, first_seq: u64, count: u32, reason: &str) -> rusqlite::Result<Moved> {
    let found: Option<(i64, i64, Vec<u8>)> = tx
        .query_row(
            "SELECT first_seq, count, data FROM blocks WHERE first_seq <= ?1 AND first_seq > ?1 - ?2
             ORDER BY first_seq DESC LIMIT 1",
            params![first_seq as i64, MAX_BLOCK_READINGS as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((block_first, block_count, data)) = found else { return Ok(Moved::default()) };
    let (block_first, block_end) = (block_first as u64, block_first as u64 + block_count as u64);
    if first_seq >= block_end {
        // Acknowledged or dropped meanwhile.
        return Ok(Moved::default());
    }
    let end = (first_seq + u64::from(count)).min(block_end);
    let whole = first_seq == block_first && end == block_end;
    // A block that does not decode goes aside whole: its parts cannot be told apart.
    let block =
        if whole { None } else { Block::decode(&data).ok().filter(|b| b.len() as u64 == block_end - block_first) };
    tx.execute("DELETE FROM blocks WHERE first_seq = ?1", [block_first as i64])?;
    let mut moved = Moved { removed_bytes: data.len() as u64, ..Moved::default() };
    let mut insert_dead = tx.prepare_cached(
        "INSERT INTO dead_letters (first_seq, count, data, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    match block {
        None => {
            insert_dead.execute(params![block_first as i64, block_count, data, reason, now_ms()])?;
            moved.readings = block_end - block_first;
        }
        Some(block) => {
            let (from, to) = ((first_seq - block_first) as usize, (end - block_first) as usize);
            let mut insert = tx.prepare_cached("INSERT INTO blocks (first_seq, count, data) VALUES (?1, ?2, ?3)")?;
            for (a, b) in [(0, from), (to, block.len())] {
                if a < b {
                    let part = slice_block(&block, a, b).encode();
                    insert.execute(params![(block_first + a as u64) as i64, (b - a) as i64, part])?;
                    moved.added_bytes += part.len() as u64;
                }
            }
            let bad = slice_block(&block, from, to).encode();
            insert_dead.execute(params![first_seq as i64, (to - from) as i64, bad, reason, now_ms()])?;
            moved.readings = (to - from) as u64;
        }
    }
    Ok(moved)
}

/// Moves every block from `from` on up by `shift`; returns the readings moved.
fn renumber(tx: &rusqlite::Transaction, from: u64, shift: u64) -> rusqlite::Result<u64> {
    let readings: i64 =
        tx.query_row("SELECT coalesce(sum(count), 0) FROM blocks WHERE first_seq >= ?1", [from as i64], |r| r.get(0))?;
    // first_seq is the INTEGER PRIMARY KEY: moving rows up in place could collide with rows not
    // yet moved, so they pass through negative keys, which no block uses.
    tx.execute(
        "UPDATE blocks SET first_seq = -(first_seq + ?2) - 1 WHERE first_seq >= ?1",
        params![from as i64, shift as i64],
    )?;
    tx.execute("UPDATE blocks SET first_seq = -first_seq - 1 WHERE first_seq < 0", [])?;
    Ok(readings as u64)
}

/// Re-stamps the stored blocks of boot `boot_id` stamped before the clock was synchronised (see
/// [`crate::clock::restamp`]); returns (readings, bytes before, bytes after).
/// Only blocks from `meta.unsynced_from` on are looked at (none if it is unset, as in every spool
/// that never held an unsynced block), and it is cleared: what is left flagged then is of an
/// earlier boot, which no later synchronisation can re-stamp.
fn restamp_stored(tx: &rusqlite::Transaction, boot_id: [u8; 16], offset_ms: i64) -> rusqlite::Result<(u64, u64, u64)> {
    let from: Option<i64> =
        tx.query_row("SELECT value FROM meta WHERE key = 'unsynced_from'", [], |r| r.get(0)).optional()?;
    let Some(from) = from else { return Ok((0, 0, 0)) };
    tx.execute("DELETE FROM meta WHERE key = 'unsynced_from'", [])?;
    let flagged: Vec<(i64, Vec<u8>)> = tx
        .prepare_cached("SELECT first_seq, data FROM blocks WHERE first_seq >= ?1 AND substr(data, 1, 1) = ?2")?
        .query_map(params![from, vec![tributary_shared::block::FORMAT_FLAGGED]], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut update = tx.prepare_cached("UPDATE blocks SET data = ?2 WHERE first_seq = ?1")?;
    let (mut readings, mut before, mut after) = (0u64, 0u64, 0u64);
    for (first_seq, data) in flagged {
        // A block that does not decode is left for the aggregator to judge (and `spool check` to name).
        let Some(fixed) = Block::decode(&data).ok().and_then(|b| crate::clock::restamp(&b, boot_id, offset_ms)) else {
            continue;
        };
        let encoded = fixed.encode();
        update.execute(params![first_seq, encoded])?;
        readings += fixed.len() as u64;
        before += data.len() as u64;
        after += encoded.len() as u64;
    }
    Ok((readings, before, after))
}

/// Remembers where the first block stamped by an unsynchronised clock may be (`meta.unsynced_from`,
/// at most `next_seq`, the number of the first of `blocks`), so that re-stamping need not read the
/// whole spool.
fn note_unsynced(tx: &rusqlite::Transaction, blocks: &[(usize, Vec<u8>)], next_seq: u64) -> rusqlite::Result<()> {
    let unsynced = |data: &[u8]| matches!(BlockClock::of(data), Ok(BlockClock::Unsynced { .. }));
    if blocks.iter().any(|(_, data)| unsynced(data)) {
        tx.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('unsynced_from', ?1)", [next_seq as i64])?;
    }
    Ok(())
}

/// Everything one transaction appends, prepared from the queued chunks.
struct Batch {
    /// (count, encoded block)
    blocks: Vec<(usize, Vec<u8>)>,
    /// The highest intake number among the chunks.
    through: Option<u64>,
}

impl Batch {
    /// Merges the chunks into blocks of at most `max_block_readings`, re-interning sensor ids.
    fn from_chunks(chunks: Vec<Chunk>, max_block_readings: usize) -> Batch {
        let mut batch = Batch { blocks: Vec::new(), through: None };
        let mut builder = BlockBuilder::default();
        let seal = |builder: &mut BlockBuilder, blocks: &mut Vec<(usize, Vec<u8>)>| {
            let block = builder.take();
            blocks.push((block.len(), block.encode()));
        };
        for chunk in chunks {
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
        if !builder.is_empty() {
            seal(&mut builder, &mut batch.blocks);
        }
        batch
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The spool in `dir`, opened read-only: safe while the agent runs.
fn open_read_only(dir: &Path) -> Result<Connection, SpoolError> {
    let path = dir.join(SPOOL_FILE);
    if !path.exists() {
        return Err(SpoolError::NotFound { path: path.display().to_string() });
    }
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| SpoolError::Open { path: path.display().to_string(), source })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// What `tributary-agent spool stats` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolStats {
    /// Blocks and readings waiting to be acknowledged by the aggregator.
    pub blocks: u64,
    pub readings: u64,
    /// Sequence numbers of the pending readings: `[first_seq, end_seq)`.
    pub first_seq: Option<u64>,
    pub end_seq: Option<u64>,
    /// Bytes of the pending blocks' data, and of the files (database and its WAL).
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub dead_letters: u64,
}

/// Counts what the spool in `dir` holds, from its tables alone (no block decoded). Reads only.
pub fn stats(dir: &Path) -> Result<SpoolStats, SpoolError> {
    let conn = open_read_only(dir)?;
    let (blocks, readings, first, end, data): (i64, i64, Option<i64>, Option<i64>, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(count), 0), min(first_seq), max(first_seq + count), coalesce(sum(length(data)), 0)
         FROM blocks",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    let has_dead: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'", [], |r| {
            r.get(0)
        })?;
    let dead_letters: i64 =
        if has_dead > 0 { conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))? } else { 0 };
    let file_bytes = ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(dir.join(format!("{SPOOL_FILE}{suffix}"))).ok())
        .map(|m| m.len())
        .sum();
    Ok(SpoolStats {
        blocks: blocks.max(0) as u64,
        readings: readings.max(0) as u64,
        first_seq: first.map(|s| s.max(0) as u64),
        end_seq: end.map(|s| s.max(0) as u64),
        data_bytes: data.max(0) as u64,
        file_bytes,
        dead_letters: dead_letters.max(0) as u64,
    })
}

/// Checks the spool in `dir`: SQLite's integrity check, then every pending block decoded and
/// validated against its count. Returns what is wrong, empty when nothing is. Reads only.
pub fn check(dir: &Path) -> Result<Vec<String>, SpoolError> {
    let conn = open_read_only(dir)?;
    let mut problems: Vec<String> = Vec::new();
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    for line in stmt.query_map([], |r| r.get::<_, String>(0))? {
        let line = line?;
        if line != "ok" {
            problems.push(format!("integrity: {line}"));
        }
    }
    let mut stmt = conn.prepare("SELECT first_seq, count, data FROM blocks ORDER BY first_seq")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (first_seq, count): (i64, i64) = (row.get(0)?, row.get(1)?);
        let data = row.get_ref(2)?.as_blob().map_err(rusqlite::Error::from)?;
        let verdict = Block::decode(data).map_err(|e| e.to_string()).and_then(|block| {
            block.validate().map_err(|e| e.to_string())?;
            match block.len() as i64 == count {
                true => Ok(()),
                false => Err(format!("holds {} readings, its count says {count}", block.len())),
            }
        });
        if let Err(reason) = verdict {
            problems.push(format!("block at seq {first_seq} ({count} readings): {reason}"));
        }
    }
    Ok(problems)
}

/// The dead letters of the spool in `dir`, oldest sequence first. Reads only: safe while the
/// agent runs.
pub fn list_dead_letters(dir: &Path) -> Result<Vec<DeadLetter>, SpoolError> {
    let conn = open_read_only(dir)?;
    let exists: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'", [], |r| {
            r.get(0)
        })?;
    if exists == 0 {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare("SELECT first_seq, count, reason, at_ms FROM dead_letters ORDER BY first_seq")?;
    let rows = stmt.query_map([], |r| {
        Ok(DeadLetter {
            first_seq: r.get::<_, i64>(0)? as u64,
            count: r.get::<_, i64>(1)? as u32,
            reason: r.get(2)?,
            at_ms: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Moves dead letters (all, or the one at `first_seq`) back into the spool under their own
/// sequence numbers, to be sent again; returns (blocks, readings) moved. Needs the agent stopped:
/// it takes the spool's lock and fails with [`SpoolError::Locked`] while the agent holds it.
pub fn retry_dead_letters(dir: &Path, first_seq: Option<u64>) -> Result<(u64, u64), SpoolError> {
    let path = dir.join(SPOOL_FILE);
    if !path.exists() {
        return Err(SpoolError::NotFound { path: path.display().to_string() });
    }
    let _lock = lock_dir(dir)?;
    let open_err = |source| SpoolError::Open { path: path.display().to_string(), source };
    let mut conn = Connection::open(&path).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(open_err)?;
    create_tables(&conn).map_err(open_err)?;
    let filter = first_seq.map(|s| s as i64);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (blocks, readings): (i64, i64) = tx.query_row(
        "SELECT count(*), coalesce(sum(count), 0) FROM dead_letters WHERE ?1 IS NULL OR first_seq = ?1",
        [filter],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if let (Some(seq), 0) = (first_seq, blocks) {
        return Err(SpoolError::DeadLetters(format!(
            "no dead letter with first_seq {seq} (see `tributary-agent --config <file> spool dead-letters list`)"
        )));
    }
    let clash: Option<i64> = tx
        .query_row(
            "SELECT d.first_seq FROM dead_letters d JOIN blocks b
               ON b.first_seq < d.first_seq + d.count AND d.first_seq < b.first_seq + b.count
             WHERE ?1 IS NULL OR d.first_seq = ?1 LIMIT 1",
            [filter],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(seq) = clash {
        return Err(SpoolError::DeadLetters(format!(
            "the dead letter at first_seq {seq} overlaps readings already in the spool; nothing was moved"
        )));
    }
    tx.execute(
        "INSERT INTO blocks (first_seq, count, data)
         SELECT first_seq, count, data FROM dead_letters WHERE ?1 IS NULL OR first_seq = ?1 ORDER BY first_seq",
        [filter],
    )
    .map_err(|e| SpoolError::DeadLetters(format!("cannot move the dead letters back ({e}); nothing was moved")))?;
    tx.execute("DELETE FROM dead_letters WHERE ?1 IS NULL OR first_seq = ?1", [filter])?;
    tx.commit()?;
    Ok((blocks as u64, readings as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::Block;

    /// A fixed 1 ms commit interval, unless a test lets it grow.
    fn config() -> SpoolConfig {
        SpoolConfig {
            commit_interval: Duration::from_millis(1),
            max_commit_interval: Duration::from_millis(1),
            max_block_readings: 100,
            ..SpoolConfig::default()
        }
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

    /// Applies an ack and waits until a following (empty) commit has gone through.
    async fn ack_and_wait(spool: &Spool, next_seq: u64) {
        spool.ack(next_seq).unwrap();
        append_and_wait(spool, Chunk::default()).await;
    }

    async fn spans(spool: &Spool) -> Vec<(u64, u32)> {
        spool.read_from(0, usize::MAX, usize::MAX).await.unwrap().iter().map(|b| (b.first_seq, b.count)).collect()
    }

    fn close(spool: Spool, thread: JoinHandle<()>) {
        drop(spool);
        thread.join().unwrap();
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
        close(spool, thread);

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
        spool.ack(150).unwrap();
        append_and_wait(&spool, readings(1, 500)).await;
        assert_eq!(spans(&spool).await, [(150, 1)]);
        ack_and_wait(&spool, 151).await;
        close(spool, thread);
        assert_eq!(metrics.spool_readings.get(), 0);

        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics).unwrap();
        assert_eq!(*spool.end().borrow(), 151, "sequence numbers are never reused");
    }

    #[tokio::test]
    async fn a_second_process_cannot_open_a_spool_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, thread) = Spool::open(dir.path(), &config(), Arc::new(Metrics::new())).unwrap();
        let err = Spool::open(dir.path(), &config(), Arc::new(Metrics::new())).err().expect("second open must fail");
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("stop it first"), "{err}");
        close(spool, thread);
        // The writer has ended and released the lock.
        Spool::open(dir.path(), &config(), Arc::new(Metrics::new())).unwrap();
    }

    #[tokio::test]
    async fn readings_older_than_max_age_are_dropped_oldest_first_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let config = SpoolConfig { max_age: Some(Duration::from_millis(1500)), ..config() };
        let (spool, thread) = Spool::open(dir.path(), &config, metrics.clone()).unwrap();
        append_and_wait(&spool, readings(100, 0)).await;
        append_and_wait(&spool, readings(100, 1000)).await;
        // Stored while the clock was not set (1970): no age to go by, kept.
        let conn = Connection::open(dir.path().join(SPOOL_FILE)).unwrap();
        conn.execute("UPDATE blocks SET stored_at = 5000 WHERE first_seq = 100", []).unwrap();
        tokio::time::sleep(Duration::from_millis(1600)).await;
        append_and_wait(&spool, readings(50, 2000)).await;
        assert_eq!(spans(&spool).await, [(100, 100), (200, 50)], "the block before the unset clock went");
        assert_eq!(metrics.spool_dropped_readings.get(), 100);
        // What goes is always a prefix: once the unset-clock block is acked, the one after it ages out.
        ack_and_wait(&spool, 200).await;
        tokio::time::sleep(Duration::from_millis(1600)).await;
        append_and_wait(&spool, readings(1, 3000)).await;
        assert_eq!(spans(&spool).await, [(250, 1)]);
        assert_eq!(metrics.spool_dropped_readings.get(), 150);
        assert_eq!(*spool.end().borrow(), 251, "dropped readings keep their numbers: the aggregator sees the gap");
        let reports: Vec<_> =
            spool.gap_reports(10).await.unwrap().into_iter().map(|r| (r.from_seq, r.to_seq, r.reason)).collect();
        assert_eq!(reports, [(0, 100, "max_age".to_string()), (200, 250, "max_age".to_string())]);
        close(spool, thread);
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
        // The drops of every commit make one report: the run of numbers, its readings' times,
        // its sensors, the reason; the forwarder forgets it once the aggregator has it.
        let reports = spool.gap_reports(10).await.unwrap();
        assert_eq!(reports.len(), 1, "{reports:?}");
        let r = &reports[0];
        let dropped = 2000 - kept;
        assert_eq!((r.from_seq, r.to_seq, r.readings), (0, dropped, dropped));
        assert_eq!((r.sensors.as_slice(), r.sensor_count), (&["s0".to_string(), "s1".into(), "s2".into()][..], 3));
        assert_eq!(r.first_ts, Some(1_764_000_000_000));
        assert_eq!(r.last_ts, Some(1_764_000_000_000 + (dropped as i64 / 100 - 1) * 1000 + 99));
        assert_eq!(r.reason, "spool_full");
        spool.reported(vec![(r.from_seq, r.to_seq)]).unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        assert_eq!(spool.gap_reports(10).await.unwrap(), []);
    }

    #[tokio::test]
    async fn a_report_that_grew_after_it_was_read_is_not_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { max_bytes: 4000, ..config() };
        let (spool, _thread) = Spool::open(dir.path(), &config, Arc::new(Metrics::new())).unwrap();
        for i in 0..20 {
            append_and_wait(&spool, readings(100, i * 1000)).await;
        }
        let read = spool.gap_reports(10).await.unwrap();
        // More drops before the aggregator's answer: the report grows under the same start.
        for i in 20..30 {
            append_and_wait(&spool, readings(100, i * 1000)).await;
        }
        spool.reported(vec![(read[0].from_seq, read[0].to_seq)]).unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        let left = spool.gap_reports(10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].from_seq, read[0].from_seq);
        assert!(left[0].to_seq > read[0].to_seq, "{left:?} after {read:?}");
    }

    #[tokio::test]
    async fn drop_newest_keeps_what_is_stored_and_still_uses_up_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let config = SpoolConfig { max_bytes: 4000, overflow: Overflow::DropNewest, ..config() };
        let (spool, thread) = Spool::open(dir.path(), &config, metrics.clone()).unwrap();
        for i in 0..20 {
            append_and_wait(&spool, readings(100, i * 1000)).await;
        }
        let left = spans(&spool).await;
        assert_eq!(left.first(), Some(&(0, 100)), "the oldest data is kept");
        let kept: u64 = left.iter().map(|(_, n)| u64::from(*n)).sum();
        assert!(kept < 2000 && kept + metrics.spool_dropped_readings.get() == 2000);
        assert_eq!(*spool.end().borrow(), 2000, "dropped readings consumed their numbers");
        let reports = spool.gap_reports(10).await.unwrap();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!((reports[0].from_seq, reports[0].to_seq, reports[0].reason.as_str()), (kept, 2000, "spool_full"));
        assert_eq!(reports[0].last_ts, Some(1_764_000_000_000 + 19_000 + 99));
        // Room again: the next readings are stored after the hole, never inside it.
        ack_and_wait(&spool, kept).await;
        append_and_wait(&spool, readings(10, 50_000)).await;
        assert_eq!(spans(&spool).await, [(2000, 10)]);
        close(spool, thread);
        let (spool, _thread) = Spool::open(dir.path(), &config, metrics).unwrap();
        assert_eq!(*spool.end().borrow(), 2010);
    }

    #[tokio::test]
    async fn a_commit_larger_than_the_spool_never_reuses_its_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let config = SpoolConfig { max_bytes: 100, ..config() };
        let (spool, thread) = Spool::open(dir.path(), &config, metrics.clone()).unwrap();
        append_and_wait(&spool, readings(500, 0)).await;
        assert_eq!(spans(&spool).await, [], "every block exceeds the limit");
        assert_eq!(metrics.spool_dropped_readings.get(), 500);
        close(spool, thread);
        let (spool, _thread) = Spool::open(dir.path(), &config, metrics).unwrap();
        assert_eq!(*spool.end().borrow(), 500, "the aggregator may hold numbers below 500");
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
    async fn a_commit_carrying_an_older_intake_number_never_moves_committed_back() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _thread) = Spool::open(dir.path(), &config(), Arc::new(Metrics::new())).unwrap();
        let mut chunk = readings(3, 0);
        chunk.through = 5;
        spool.send(Command::Append(chunk)).await.unwrap();
        spool.committed().wait_for(|c| *c >= 5).await.unwrap();
        // Serial inputs' chunks carry the number committed when they were read, here older than 5.
        // Two commits, one after the other: once the second is in `end`, the first has set `committed`.
        let mut end = spool.end();
        for through in [3, 4] {
            let before = *end.borrow();
            let mut chunk = readings(2, 100 * through as i64);
            chunk.through = through;
            spool.send(Command::Append(chunk)).await.unwrap();
            end.wait_for(|e| *e >= before + 2).await.unwrap();
        }
        assert_eq!(*spool.committed().borrow(), 5, "message 5 was durable and must stay acknowledged");
    }

    #[tokio::test]
    async fn dead_lettered_blocks_leave_the_spool_but_not_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        append_and_wait(&spool, readings(100, 0)).await;
        append_and_wait(&spool, readings(10, 0)).await;
        spool.dead_letter(0, 100, "bad".into()).unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        assert_eq!(spans(&spool).await, [(100, 10)]);
        assert_eq!(metrics.dead_letter_readings.get(), 100);
        let listed = list_dead_letters(dir.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].first_seq, listed[0].count, listed[0].reason.as_str()), (0, 100, "bad"));
    }

    #[tokio::test]
    async fn dead_lettering_part_of_a_block_keeps_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        append_and_wait(&spool, readings(100, 0)).await;
        spool.dead_letter(40, 20, "reading #3 is bad".into()).unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        let blocks = spool.read_from(0, usize::MAX, usize::MAX).await.unwrap();
        assert_eq!(blocks.iter().map(|b| (b.first_seq, b.count)).collect::<Vec<_>>(), [(0, 40), (60, 40)]);
        let after = Block::decode(&blocks[1].data).unwrap();
        assert_eq!(after.readings().next(), Some(("s0", 1_764_000_000_060, 60.0)), "readings keep their numbers");
        assert_eq!(metrics.spool_readings.get(), 80);
        assert_eq!(metrics.dead_letter_readings.get(), 20);
        let listed = list_dead_letters(dir.path()).unwrap();
        assert_eq!((listed[0].first_seq, listed[0].count), (40, 20));
    }

    #[tokio::test]
    async fn a_dead_lettered_tail_never_gives_its_numbers_again_nor_replaces_a_dead_letter() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        append_and_wait(&spool, readings(10, 0)).await;
        spool.dead_letter(0, 10, "first".into()).unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        close(spool, thread);
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        assert_eq!(*spool.end().borrow(), 10);
        append_and_wait(&spool, readings(5, 100)).await;
        assert_eq!(spans(&spool).await, [(10, 5)]);
        spool.dead_letter(10, 5, "second".into()).unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        close(spool, thread);
        let listed = list_dead_letters(dir.path()).unwrap();
        let seen: Vec<_> = listed.iter().map(|d| (d.first_seq, d.count, d.reason.as_str())).collect();
        assert_eq!(seen, [(0, 10, "first"), (10, 5, "second")]);
    }

    #[tokio::test]
    async fn dead_letters_of_an_older_spool_are_kept_when_it_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The schema before dead letters had their own key.
            let conn = Connection::open(dir.path().join(SPOOL_FILE)).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
                 CREATE TABLE blocks (first_seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, data BLOB NOT NULL);
                 CREATE TABLE dead_letters (first_seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, data BLOB NOT NULL,
                     reason TEXT NOT NULL, at_ms INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('epoch', 42), ('acked_seq', 30);
                 INSERT INTO dead_letters VALUES (20, 10, x'01', 'old', 1764000000000);",
            )
            .unwrap();
        }
        let (spool, _thread) = Spool::open(dir.path(), &config(), Arc::new(Metrics::new())).unwrap();
        assert_eq!((spool.epoch(), *spool.end().borrow()), (42, 30));
        let listed = list_dead_letters(dir.path()).unwrap();
        assert_eq!((listed[0].first_seq, listed[0].count, listed[0].reason.as_str()), (20, 10, "old"));
    }

    #[tokio::test]
    async fn retried_dead_letters_return_under_their_own_numbers_but_only_while_the_agent_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        append_and_wait(&spool, readings(30, 0)).await;
        append_and_wait(&spool, readings(5, 100)).await;
        spool.dead_letter(0, 30, "bad".into()).unwrap();
        spool.dead_letter(30, 5, "bad too".into()).unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        let err = retry_dead_letters(dir.path(), None).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        close(spool, thread);

        let err = retry_dead_letters(dir.path(), Some(7)).unwrap_err();
        assert!(err.to_string().contains("no dead letter with first_seq 7"), "{err}");
        assert_eq!(retry_dead_letters(dir.path(), Some(30)).unwrap(), (1, 5));
        assert_eq!(list_dead_letters(dir.path()).unwrap().len(), 1);
        assert_eq!(retry_dead_letters(dir.path(), None).unwrap(), (1, 30));
        assert!(list_dead_letters(dir.path()).unwrap().is_empty());
        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics).unwrap();
        assert_eq!(spans(&spool).await, [(0, 30), (30, 5)]);
        assert_eq!(*spool.end().borrow(), 35);
    }

    #[tokio::test]
    async fn a_rewound_spool_renumbers_what_it_numbered_since_it_was_opened() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        assert_eq!(spool.unverified_from(), 0);
        assert_eq!(spool.verify(0, 0).await.unwrap(), Verified { shift: 0, readings: 0 });
        append_and_wait(&spool, readings(100, 0)).await;
        ack_and_wait(&spool, 100).await;
        close(spool, thread);

        // Reopened at 100, while the aggregator already holds 250 numbers of this epoch.
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        assert_eq!(spool.unverified_from(), 100);
        append_and_wait(&spool, readings(130, 1000)).await;
        assert_eq!(spans(&spool).await, [(100, 100), (200, 30)]);
        assert_eq!(spool.verify(100, 250).await.unwrap(), Verified { shift: 150, readings: 130 });
        assert_eq!(spans(&spool).await, [(250, 100), (350, 30)]);
        assert_eq!(*spool.end().borrow(), 380);
        let first = spool.read_from(250, 1, usize::MAX).await.unwrap();
        assert_eq!(Block::decode(&first[0].data).unwrap().readings().next(), Some(("s0", 1_764_000_001_000, 0.0)));
        append_and_wait(&spool, readings(5, 5000)).await;
        assert_eq!(spans(&spool).await.last(), Some(&(380, 5)), "new readings follow the renumbered ones");
        assert_eq!(metrics.spool_rewinds.get(), 1);
        assert_eq!(metrics.spool_renumbered_readings.get(), 130);
        close(spool, thread);
        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics).unwrap();
        assert_eq!((spool.unverified_from(), *spool.end().borrow()), (385, 385));
    }

    #[tokio::test]
    async fn a_crash_before_verification_leaves_that_life_unverified() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        spool.verify(0, 0).await.unwrap();
        append_and_wait(&spool, readings(10, 0)).await;
        close(spool, thread);
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        append_and_wait(&spool, readings(20, 100)).await;
        close(spool, thread); // no verify: nothing of these 20 was sent
        let (spool, _thread) = Spool::open(dir.path(), &config(), metrics).unwrap();
        assert_eq!(spool.unverified_from(), 10, "the 20 readings of the last life are still unverified");
        assert_eq!(spool.verify(10, 40).await.unwrap(), Verified { shift: 30, readings: 20 });
        assert_eq!(spans(&spool).await, [(0, 10), (40, 20)]);
    }

    #[tokio::test]
    async fn a_full_disk_drops_by_policy_while_acks_keep_freeing_space() {
        for overflow in [Overflow::DropOldest, Overflow::DropNewest] {
            let dir = tempfile::tempdir().unwrap();
            let metrics = Arc::new(Metrics::new());
            let config = SpoolConfig { overflow, ..config() };
            // 200 pages of 1 KiB: SQLite answers SQLITE_FULL like a full disk.
            let (spool, thread) = Spool::open_with(dir.path(), &config, metrics.clone(), Some(200)).unwrap();
            let mut published = 0u64;
            for i in 0..400 {
                if metrics.spool_disk_full.get() > 0 && metrics.spool_dropped_readings.get() > 0 {
                    break;
                }
                let mut chunk = Chunk::default();
                for j in 0..100 {
                    // Noisy values and ids: about 20 bytes a reading even compressed.
                    let v = fastrand::f64();
                    chunk.readings.push(&format!("sensor-{}", fastrand::u32(..)), 1_764_000_000_000 + j, v);
                }
                append_and_wait(&spool, chunk).await;
                published += 100;
                assert!(i < 399, "{overflow:?}: the spool never filled");
            }
            assert!(metrics.spool_disk_full.get() > 0, "{overflow:?}");
            let stored: u64 = spans(&spool).await.iter().map(|(_, n)| u64::from(*n)).sum();
            assert_eq!(stored + metrics.spool_dropped_readings.get(), published, "{overflow:?}");
            assert!(stored > 0, "{overflow:?}: what fits is kept");
            assert!(metrics.spool_max_bytes.get() < SpoolConfig::default().max_bytes as i64, "{overflow:?}");

            // The aggregator takes everything: the acks go through and room returns.
            let end = *spool.end().borrow();
            ack_and_wait(&spool, end).await;
            assert_eq!(spans(&spool).await, [], "{overflow:?}");
            let dropped = metrics.spool_dropped_readings.get();
            append_and_wait(&spool, readings(50, 0)).await;
            assert_eq!(spans(&spool).await, [(end, 50)], "{overflow:?}: new readings are stored again");
            assert_eq!(metrics.spool_dropped_readings.get(), dropped, "{overflow:?}");
            close(spool, thread);
        }
    }

    #[tokio::test]
    async fn a_max_bytes_beyond_the_file_system_is_lowered_to_what_fits() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let config = SpoolConfig { max_bytes: 1 << 62, ..config() };
        let (_spool, _thread) = Spool::open(dir.path(), &config, metrics.clone()).unwrap();
        let limit = metrics.spool_max_bytes.get() as u64;
        let free = free_bytes(dir.path()).unwrap();
        assert!(limit > 0 && limit < 1 << 62, "{limit}");
        assert!(limit <= (free + (1 << 20)) / 100 * FIT_PERCENT, "{limit} vs {free} free");
    }

    #[test]
    fn the_commit_interval_grows_while_readings_are_few_and_snaps_back_under_load() {
        let (min, gather, max) = (Duration::from_millis(5), Duration::from_millis(25), Duration::from_secs(2));
        let close_to = |d: Duration, secs: f64| (d.as_secs_f64() - secs).abs() < 1e-6;
        let mut at = Instant::now();
        let mut pace = CommitPace::new(min, gather, max, at);
        // Client mode: acks wait for commits, and the floor is commit_interval.
        let waited = true;
        assert_eq!(pace.interval(waited), min, "a spool starts at commit_interval");
        // One sensor, a reading a second: 8 readings would take 8 s, so the max.
        for _ in 0..3 {
            at += Duration::from_secs(1);
            pace.committed(at, 1);
            assert_eq!(pace.interval(waited), max);
        }
        // Traffic grows: 2,000 readings in those 2 s bring it down in one commit.
        at += max;
        pace.committed(at, 2_000);
        assert!(close_to(pace.interval(waited), 0.008), "{:?}", pace.interval(waited));
        at += pace.interval(waited);
        pace.committed(at, 80);
        assert_eq!(pace.interval(waited), min, "10,000 readings/s: commit_interval");
        // Ten sensors, a reading a second each: 8 readings' worth, and it stays there.
        at += Duration::from_secs(1);
        pace.committed(at, 10);
        assert!(close_to(pace.interval(waited), 0.8), "{:?}", pace.interval(waited));
        at += pace.interval(waited);
        pace.committed(at, 8);
        assert!(close_to(pace.interval(waited), 0.8), "{:?}", pace.interval(waited));
        // Commits of the forwarder's commands alone say nothing of the rate.
        pace.committed(at + Duration::from_secs(60), 0);
        assert!(close_to(pace.interval(waited), 0.8), "{:?}", pace.interval(waited));
    }

    #[test]
    fn under_load_with_no_acks_waiting_commits_gather_for_gather_interval() {
        let (min, gather, max) = (Duration::from_millis(5), Duration::from_millis(25), Duration::from_secs(4));
        let close_to = |d: Duration, secs: f64| (d.as_secs_f64() - secs).abs() < 1e-6;
        let mut at = Instant::now();
        let mut pace = CommitPace::new(min, gather, max, at);
        assert_eq!(pace.interval(false), gather, "the embedded broker and serial ports start at gather_interval");
        // 10,000 readings/s: 250 readings a commit, not 50; with acks waiting, 5 ms as before.
        for _ in 0..10 {
            at += pace.interval(false);
            pace.committed(at, 250);
            assert_eq!(pace.interval(false), gather);
        }
        assert_eq!(pace.interval(true), min, "an input whose acks wait takes the interval back to 5 ms");
        assert_eq!(pace.floor(false), gather, "a burst after a quiet spell waits for gather_interval only");
        // 1,000 readings/s: still the floor (8 readings take 8 ms); 25 readings a commit.
        at += gather;
        pace.committed(at, 25);
        assert_eq!((pace.interval(false), pace.interval(true)), (gather, Duration::from_millis(8)));
        // Below 320 readings/s the floor no longer matters: the quiet gateway's pace is unchanged.
        at += Duration::from_millis(100);
        pace.committed(at, 20);
        assert!(close_to(pace.interval(false), 0.04), "{:?}", pace.interval(false));
        assert_eq!(pace.interval(false), pace.interval(true));
        at += Duration::from_secs(4);
        pace.committed(at, 1);
        assert_eq!((pace.interval(false), pace.interval(true)), (max, max));
        // gather_interval is kept within commit_interval ..= max_commit_interval.
        let fixed = CommitPace::new(min, gather, min, at);
        assert_eq!((fixed.interval(false), fixed.floor(false)), (min, min), "a fixed interval stays fixed");
        let below = CommitPace::new(min, Duration::from_millis(1), max, at);
        assert_eq!(below.floor(false), min);
    }

    #[test]
    fn the_commit_interval_never_leaves_its_bounds() {
        let (min, gather, max) = (Duration::from_millis(5), Duration::from_millis(25), Duration::from_secs(2));
        let mut at = Instant::now();
        let mut pace = CommitPace::new(min, gather, max, at);
        let mut rng = fastrand::Rng::with_seed(9);
        for _ in 0..10_000 {
            at += Duration::from_micros(rng.u64(0..10_000_000));
            let readings = [0, 1, 2, 7, 8, 9, 1_000, u64::MAX][rng.usize(0..8)];
            pace.committed(at, readings);
            for (waited, floor) in [(true, min), (false, gather)] {
                let interval = pace.interval(waited);
                assert!(floor <= interval && interval <= max, "{readings} readings, {waited}: {interval:?}");
            }
        }
        // A clock that did not move, then a year of silence.
        pace.committed(at, 1);
        assert_eq!((pace.interval(true), pace.interval(false)), (min, gather));
        pace.committed(at + Duration::from_secs(365 * 86_400), 1);
        assert_eq!((pace.interval(true), pace.interval(false)), (max, max));
        // max_commit_interval = commit_interval (or below, as the config refuses): a fixed interval.
        let mut fixed = CommitPace::new(min, gather, Duration::ZERO, at);
        fixed.committed(at + Duration::from_secs(10), 1);
        assert_eq!((fixed.interval(true), fixed.interval(false)), (min, min));
    }

    #[test]
    fn an_input_whose_acks_wait_is_counted_while_it_runs() {
        let waiters = AckWaiters::default();
        assert!(!waiters.any());
        let client = waiters.hold();
        let another = waiters.clone().hold();
        drop(client);
        assert!(waiters.any(), "one input still waits");
        drop(another);
        assert!(!waiters.any());
    }

    #[tokio::test]
    async fn a_quiet_spool_commits_a_lone_reading_at_once_and_lets_the_next_ones_gather() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let config = SpoolConfig { max_commit_interval: Duration::from_secs(30), ..config() };
        let (spool, thread) = Spool::open(dir.path(), &config, metrics.clone()).unwrap();
        // A quiet second: after the next commit, the interval is at least 8 s.
        tokio::time::sleep(Duration::from_secs(1)).await;
        append_and_wait(&spool, readings(1, 0)).await;
        assert_eq!(spans(&spool).await, [(0, 1)]);
        let mut committed = spool.committed();
        for (i, through) in [(1, 2), (2, 3)] {
            spool.send(Command::Append(Chunk { through, ..readings(1, i) })).await.unwrap();
        }
        assert_eq!(*spool.end().borrow(), 1, "the next readings wait for the interval");
        // An input stopping commits them at once, in one block.
        spool.send(Command::Flush).await.unwrap();
        committed.wait_for(|c| *c >= 3).await.unwrap();
        assert_eq!(spans(&spool).await, [(0, 1), (1, 2)]);
        assert_eq!(metrics.spool_commits.get(), 2);
        close(spool, thread);
    }

    #[tokio::test]
    async fn a_busy_spool_gathers_for_gather_interval_unless_an_input_waits_for_its_commits() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        // A gather_interval no test outlives, so that "still waiting" is not a matter of timing.
        let long = Duration::from_secs(60);
        let config = SpoolConfig { gather_interval: long, max_commit_interval: long, ..config() };
        let (spool, thread) = Spool::open(dir.path(), &config, metrics.clone()).unwrap();
        append_and_wait(&spool, readings(20, 0)).await;
        // A commit's worth (8 readings or more) waits for the floor: gather_interval, no input waits.
        let mut committed = spool.committed();
        let through = *committed.borrow();
        spool.send(Command::Append(Chunk { through: through + 1, ..readings(20, 100) })).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*spool.end().borrow(), 20, "the next readings gather");
        // Client mode starts: its acks wait, so commits come every commit_interval (1 ms) again.
        let client = spool.ack_waiters().hold();
        spool.send(Command::Append(Chunk { through: through + 2, ..readings(20, 200) })).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(30), committed.wait_for(|c| *c >= through + 2)).await;
        assert!(waited.is_ok(), "the readings of an input whose acks wait were held for gather_interval");
        assert_eq!(spans(&spool).await, [(0, 20), (20, 40)]);
        drop(client);
        close(spool, thread);
    }

    #[tokio::test]
    async fn a_stop_commits_what_a_quiet_spool_gathers_without_waiting_out_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { max_commit_interval: Duration::from_secs(60), ..config() };
        let (spool, thread) = Spool::open(dir.path(), &config, Arc::new(Metrics::new())).unwrap();
        // Two quiet seconds: the interval after the next commit is at least 16 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        append_and_wait(&spool, readings(1, 0)).await;
        spool.send(Command::Append(readings(3, 1))).await.unwrap();
        let stopping = Instant::now();
        close(spool, thread);
        assert!(stopping.elapsed() < Duration::from_secs(8), "the stop waited {:?}", stopping.elapsed());
        let (spool, thread) = Spool::open(dir.path(), &config, Arc::new(Metrics::new())).unwrap();
        assert_eq!(spans(&spool).await, [(0, 1), (1, 3)]);
        close(spool, thread);
    }

    #[tokio::test]
    async fn a_commit_that_deletes_and_adds_a_block_lets_the_block_keep_the_end() {
        let dir = tempfile::tempdir().unwrap();
        // A fixed one-second interval: an ack and the readings right behind it share a commit.
        let second = Duration::from_secs(1);
        let config = SpoolConfig { commit_interval: second, max_commit_interval: second, ..config() };
        let (spool, thread) = Spool::open(dir.path(), &config, Arc::new(Metrics::new())).unwrap();
        append_and_wait(&spool, readings(5, 0)).await;
        spool.ack(5).unwrap();
        append_and_wait(&spool, readings(3, 10)).await;
        assert_eq!(spans(&spool).await, [(5, 3)]);
        let stored_end = |dir: &Path| {
            let conn = Connection::open_with_flags(dir.join(SPOOL_FILE), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let meta: Option<i64> =
                conn.query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| r.get(0)).optional().unwrap();
            (meta, stored_next_seq(&conn).unwrap())
        };
        // One page written, not two: the meta table's next_seq is not touched, the block holds the end.
        let (meta, end) = stored_end(dir.path());
        assert!(meta.is_none_or(|m| m < 8), "{meta:?}");
        assert_eq!(end, 8);
        // Deleting the last block leaves nothing to hold the end: then meta does.
        ack_and_wait(&spool, 8).await;
        assert_eq!(stored_end(dir.path()), (Some(8), 8));
        close(spool, thread);
        let (spool, thread) = Spool::open(dir.path(), &config, Arc::new(Metrics::new())).unwrap();
        append_and_wait(&spool, readings(1, 20)).await;
        assert_eq!(spans(&spool).await, [(8, 1)]);
        close(spool, thread);
    }

    #[test]
    fn byte_sizes_read_like_a_person_wrote_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(3_355_443), "3.2 MiB");
        assert_eq!(human_bytes(200 << 20), "200 MiB");
    }

    /// A chunk of `n` readings stamped 1 s apart by a clock not synchronised yet in boot `boot_id`,
    /// whose wall clock read `offset_ms` ahead of its boot-time clock.
    fn unsynced(n: usize, boot_id: [u8; 16], offset_ms: i64, first_wall: i64) -> Chunk {
        let mut part = BlockBuilder::default();
        for i in 0..n {
            part.push("agent-stamped", first_wall + i as i64 * 1000, i as f64);
        }
        let flagged = FlaggedReadings {
            unsynced: Some((BlockClock::Unsynced { boot_id, offset_ms }, part)),
            ..Default::default()
        };
        Chunk { flagged: Some(Box::new(flagged)), ..Chunk::default() }
    }

    async fn stored_blocks(spool: &Spool) -> Vec<Block> {
        let stored = spool.read_from(0, usize::MAX, usize::MAX).await.unwrap();
        stored.iter().map(|b| Block::decode(&b.data).unwrap()).collect()
    }

    #[tokio::test]
    async fn unsynced_readings_are_restamped_at_the_first_sync_and_an_earlier_boots_stay_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, thread) = Spool::open(dir.path(), &config(), metrics.clone()).unwrap();
        let (this_boot, earlier_boot) = ([1u8; 16], [2u8; 16]);
        // Booted in 1970: wall clock = boot-time clock. The first reading 5 s after boot.
        let mut mixed = unsynced(3, this_boot, 0, 5_000);
        mixed.readings.push("device-stamped", 1_764_000_000_000, 7.0);
        append_and_wait(&spool, mixed).await;
        append_and_wait(&spool, unsynced(2, earlier_boot, 0, 9_000)).await;
        let blocks = stored_blocks(&spool).await;
        let clocks: Vec<BlockClock> = blocks.iter().map(|b| b.clock).collect();
        assert_eq!(
            clocks,
            [
                BlockClock::Synced,
                BlockClock::Unsynced { boot_id: this_boot, offset_ms: 0 },
                BlockClock::Unsynced { boot_id: earlier_boot, offset_ms: 0 }
            ],
            "the device-stamped reading in a block of its own, unflagged"
        );
        assert_eq!(blocks[1].entries[0].ts, 5_000, "stored as stamped, in 1970");

        // NTP sets the clock 60 s after boot: the wall clock reads T, offset T - 60 s.
        let t = 1_764_000_100_000;
        spool.restamp(this_boot, t - 60_000).unwrap();
        append_and_wait(&spool, Chunk::default()).await;
        let blocks = stored_blocks(&spool).await;
        assert_eq!(blocks[1].clock, BlockClock::Synced);
        let ts: Vec<i64> = blocks[1].entries.iter().map(|e| e.ts).collect();
        assert_eq!(ts, [t - 55_000, t - 54_000, t - 53_000], "each at its time since boot");
        assert_eq!(blocks[1].validate(), Ok(()));
        assert_eq!(blocks[0].entries[0].ts, 1_764_000_000_000, "device timestamps do not move");
        assert!(matches!(blocks[2].clock, BlockClock::Unsynced { .. }), "an earlier boot's cannot be re-stamped");
        assert_eq!(metrics.clock_restamped_readings.get(), 3);

        // Stamped before the sync, reaching the spool after it: re-stamped on the way in, and a
        // reading stamped before 2000 becomes valid.
        append_and_wait(&spool, unsynced(1, this_boot, 0, 59_000)).await;
        let last = stored_blocks(&spool).await.pop().unwrap();
        assert_eq!((last.clock, last.entries[0].ts), (BlockClock::Synced, t - 1_000));
        assert_eq!(metrics.clock_restamped_readings.get(), 4);
        close(spool, thread);
    }
}
