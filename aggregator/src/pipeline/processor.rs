//! The processor thread: tails the log from its committed offset, folds blocks into the
//! [`Pipeline`], and commits.
//!
//! Commits are grouped: the processor folds several reads of the log into memory and commits
//! when it has [`COMMIT_READINGS`] readings pending, when it has caught up with the log's end,
//! or after [`COMMIT_INTERVAL`]; so a replay writes each stored row about once, and live data is
//! visible within a commit interval. A failed commit throws the in-memory state away, reloads it
//! from the store and starts again from the committed offset.
//!
//! One bad block never stops the pipeline: a block that does not decode or validate, or whose
//! count lies, is set aside (listed by `/api/v1/set-aside`). A commit that keeps failing is
//! narrowed down, halving the blocks per commit, to the block that makes it fail; if the store
//! then takes a commit without that block, the block is set aside too. A failure of the machine
//! (a full disk, an I/O error, a locked or read-only file) is never narrowed down, and a store
//! that takes no commit at all sets nothing aside: the processor retries with backoff and
//! [`ProcessorStatus`] reports the stall to `/healthz` and `/metrics`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::watch;
use tributary_shared::BlockDecoder;

use super::alert::Transition;
use super::{CommitJob, DERIVED_AGENT, LiveReadings, Pipeline, PipelineSpec, SetAside};
use crate::Liveness;
use crate::log::{self, LogError, LogHandle};
use crate::metrics::Metrics;
use crate::notify::{Notifier, REPLAY_AGE_MS};
use crate::store::{self, StoreError};

/// Readings read from the log per query.
const READ_READINGS: u64 = 200_000;
/// Blocks fetched per read at most (many tiny blocks when agents are idle).
const READ_BLOCKS: i64 = 20_000;
/// Readings folded before a commit at the latest.
pub const COMMIT_READINGS: u64 = 2_000_000;
/// Memory the window operators may take between commits: a replay or a backlog commits when it
/// is reached rather than only after [`COMMIT_INTERVAL`], so memory does not grow with speed.
pub const COMMIT_BYTES: usize = 256 << 20;
/// [`COMMIT_BYTES`] once the processor has caught up with the log: a live processor that falls
/// behind for a moment (a slow disk, a burst) commits a few hundred thousand readings at a time
/// as it does when keeping up, instead of growing by 100 MiB before it commits. A replay keeps
/// the large bound: fewer commits rewrite each row fewer times.
pub const LIVE_COMMIT_BYTES: usize = 16 << 20;
/// Longest time between commits while the processor is behind.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// Shortest time between commits once caught up: live data is visible within it, and a busy
/// log does not make the processor rewrite its hot rows at every append.
pub const LIVE_COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// Shortest time between two hand-backs of freed memory ([`Processor::return_free_memory`]).
const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Fallback poll when no end-of-log notification arrives.
const POLL: Duration = Duration::from_secs(1);
/// The name the pipeline commits its offset under.
pub const PROCESSOR_NAME: &str = "main";
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Pause between the steps of narrowing down a failing commit.
const BISECT_PAUSE: Duration = Duration::from_millis(10);
/// How long the processor fails without progress before `/healthz` says it is stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

/// Whether the processor is making progress, shared with `/healthz` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ProcessorStatus(Arc<Mutex<Option<Stall>>>);

#[derive(Debug, Clone)]
struct Stall {
    offset: u64,
    since: Instant,
    error: String,
}

impl ProcessorStatus {
    fn lock(&self) -> MutexGuard<'_, Option<Stall>> {
        // The data is a plain value: a panic elsewhere cannot leave it half-written.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn failed(&self, offset: u64, error: String) {
        let mut stall = self.lock();
        match stall.as_mut() {
            Some(stall) if stall.offset == offset => stall.error = error,
            _ => *stall = Some(Stall { offset, since: Instant::now(), error }),
        }
    }

    fn progressed(&self) {
        *self.lock() = None;
    }

    /// Why the processor is stuck, once it has failed without progress for [`STALL_AFTER`]:
    /// `processor stalled at offset N for 42 s: <error>`.
    pub fn stalled(&self) -> Option<String> {
        let stall = self.lock();
        let stall = stall.as_ref()?;
        let for_ = stall.since.elapsed();
        (for_ >= STALL_AFTER)
            .then(|| format!("processor stalled at offset {} for {} s: {}", stall.offset, for_.as_secs(), stall.error))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the log: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot start the processor thread: {0}")]
    Spawn(std::io::Error),
    #[error("appending derived readings to the log: {0}")]
    Derived(String),
    #[error("{0}")]
    Range(String),
}

impl ProcessError {
    /// A failure of the machine, not of what is being folded (a full disk, an I/O error, a file
    /// locked or made read-only): no block is to blame, so none may be set aside for it. Near a
    /// full disk a commit of one block's set-aside record still fits where the block's own does
    /// not, and narrowing down would set good data aside.
    fn blames_no_block(&self) -> bool {
        use rusqlite::ErrorCode::*;
        let sqlite = match self {
            ProcessError::Store(StoreError::Sqlite(e))
            | ProcessError::Log(LogError::Sqlite(e))
            | ProcessError::Sqlite(e) => e,
            ProcessError::Store(StoreError::Unsynced { .. }) | ProcessError::Spawn(_) => return true,
            _ => return false,
        };
        matches!(
            sqlite.sqlite_error_code(),
            Some(DiskFull | SystemIoFailure | DatabaseBusy | DatabaseLocked | ReadOnly | CannotOpen | OutOfMemory)
        )
    }
}

/// Where the processor sends what it derives: the log (anomaly and alert streams) and webhooks.
#[derive(Clone)]
pub struct Outputs {
    pub log: LogHandle,
    pub notifier: Notifier,
    pub runtime: tokio::runtime::Handle,
    /// The live stream's events.
    pub live: crate::live::Hub,
    /// The log epoch this version's derived readings go under ([`crate::versions::derived_epoch`]);
    /// other versions' derived blocks are skipped.
    pub derived_epoch: i64,
    /// Whether this version serves: only the serving version notifies webhooks, feeds the live
    /// stream and reports its offset in /metrics (a version being replayed does none of these).
    pub serving: Arc<AtomicBool>,
}

impl Outputs {
    fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }
}

/// Tells the processor thread to stop after its current step.
#[derive(Clone)]
pub struct StopSignal(Arc<watch::Sender<bool>>);

impl StopSignal {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// The running processor.
pub struct ProcessorThread {
    pub stop: StopSignal,
    pub thread: JoinHandle<()>,
    pub status: ProcessorStatus,
    /// The offset committed to the store, after each commit.
    pub committed: watch::Receiver<u64>,
    /// The store is being built without fsync ([`store::unsynced_marker`]): it must not serve
    /// until this turns false, once the processor has caught up and synced it.
    pub unsynced: Arc<AtomicBool>,
}

/// One block read from the log.
pub struct LogBlock {
    pub first_offset: u64,
    pub count: u64,
    pub agent_id: String,
    pub epoch: i64,
    pub received_at: i64,
    pub data: Vec<u8>,
}

/// Reads blocks starting in `from..until`: about `max_readings` readings, whole blocks, at most
/// `max_blocks`.
pub fn read_log(
    log: &Connection,
    from: u64,
    until: u64,
    max_readings: u64,
    max_blocks: usize,
) -> Result<Vec<LogBlock>, rusqlite::Error> {
    let mut stmt = log.prepare_cached(
        "SELECT first_offset, count, agent_id, epoch, received_at, data FROM blocks
         WHERE first_offset >= ?1 AND first_offset < ?3 ORDER BY first_offset LIMIT ?2",
    )?;
    let until = until.min(i64::MAX as u64) as i64;
    let mut rows = stmt.query(rusqlite::params![from as i64, (max_blocks as i64).min(READ_BLOCKS), until])?;
    let (mut out, mut readings) = (Vec::new(), 0u64);
    while let Some(row) = rows.next()? {
        let block = LogBlock {
            first_offset: row.get::<_, i64>(0)?.max(0) as u64,
            count: row.get::<_, i64>(1)?.max(0) as u64,
            agent_id: row.get(2)?,
            epoch: row.get(3)?,
            received_at: row.get(4)?,
            data: row.get(5)?,
        };
        readings += block.count;
        out.push(block);
        if readings >= max_readings {
            break;
        }
    }
    Ok(out)
}

struct Processor {
    log: Connection,
    store: Connection,
    pipeline: Pipeline,
    /// Offset after the last folded block.
    next_offset: u64,
    /// Offset committed to the store.
    committed: u64,
    last_commit: Instant,
    /// When freed memory was last handed back to the system.
    last_trim: Instant,
    /// Whether it has reached the log's end since it started (it is live, not replaying).
    been_caught_up: bool,
    metrics: Arc<Metrics>,
    outputs: Outputs,
    status: ProcessorStatus,
    /// Blocks folded since the last commit, and the first of them (to set aside if it alone fails).
    cycle_blocks: usize,
    cycle_first: Option<SetAside>,
    /// While narrowing down a failing commit: at most this many blocks per commit, until the
    /// committed offset passes the end of the range that failed.
    limit: Option<(usize, u64)>,
    /// Failed attempts since the last successful commit.
    failures: u32,
    /// Where the time goes: reading and folding the log, and committing to the store.
    timings: Timings,
    decoder: BlockDecoder,
    committed_tx: watch::Sender<u64>,
    /// A replay's commits, written on a thread of their own while folding goes on
    /// ([`catch_up_range`] only).
    behind: Option<WriteBehind>,
    /// The store's path while it is written without fsync ([`store::begin_unsynced`]).
    unsynced: Option<std::path::PathBuf>,
    /// Shared with [`ProcessorThread::unsynced`].
    unsynced_flag: Arc<AtomicBool>,
    /// Sync an unsynced store once caught up (a live processor; an offline replay leaves it to
    /// the kernel and to the aggregator's next start, see [`store::unsynced_marker`]).
    sync_when_caught_up: bool,
}

/// The thread that writes a replay's commits ([`Pipeline::commit_behind`]), one at a time.
struct WriteBehind {
    jobs: Option<std::sync::mpsc::SyncSender<CommitJob>>,
    done: std::sync::mpsc::Receiver<Result<(), StoreError>>,
    /// Jobs sent whose results were not taken yet.
    pending: usize,
    thread: Option<JoinHandle<()>>,
}

impl WriteBehind {
    /// Starts the writer on a write connection of its own to `store_path`.
    fn start(store_path: &Path, unsynced: bool) -> Result<WriteBehind, ProcessError> {
        let mut conn = store::open_write(store_path)?;
        if unsynced {
            // As the processor's connection (the marker is written).
            store::write_unsynced(&conn, true)?;
        }
        let (jobs, todo) = std::sync::mpsc::sync_channel::<CommitJob>(1);
        let (result, done) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("store writer".into())
            .spawn(move || {
                // A job is sent while the one before may still be written: one that does not
                // start where the store's last commit ended follows a commit that failed, and
                // must not be written without it.
                let mut store_end: Option<u64> = None;
                for job in todo {
                    let done = match store_end {
                        Some(end) if end != job.from_offset => Err(StoreError::Corrupt(format!(
                            "the commit from offset {} follows one that was not written",
                            job.from_offset
                        ))),
                        _ => job.write(&mut conn),
                    };
                    store_end = Some(if done.is_ok() { job.next_offset } else { store_end.unwrap_or(job.from_offset) });
                    if result.send(done).is_err() {
                        break;
                    }
                }
            })
            .map_err(ProcessError::Spawn)?;
        Ok(WriteBehind { jobs: Some(jobs), done, pending: 0, thread: Some(thread) })
    }

    /// Waits until at most `keep` of the jobs sent are not committed yet (the last ones); after
    /// a failure, for all of them (those after it fail too).
    fn wait(&mut self, keep: usize) -> Result<(), ProcessError> {
        let mut result = Ok(());
        while self.pending > if result.is_ok() { keep } else { 0 } {
            self.pending -= 1;
            match self.done.recv() {
                Ok(done) => result = result.and(done.map_err(ProcessError::from)),
                Err(_) => {
                    self.pending = 0;
                    return Err(StoreError::Corrupt("the store writer thread stopped".into()).into());
                }
            }
        }
        result
    }

    fn send(&mut self, job: CommitJob) -> Result<(), ProcessError> {
        let sent = self.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            return Err(StoreError::Corrupt("the store writer thread stopped".into()).into());
        }
        self.pending += 1;
        Ok(())
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        // The writer finishes the job it has (a transaction either commits or not) and stops.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Time spent by a processor, for `catch_up`'s report (and benchmarks).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Reading blocks from the log, decoding and validating them.
    pub read: Duration,
    /// Folding readings into the operators (in memory, plus rows loaded for late data).
    pub fold: Duration,
    /// Committing: derived readings to the log, every operator's rows to the store.
    pub commit: Duration,
    pub commits: u64,
}

/// What [`catch_up`] did.
#[derive(Debug, Clone, Copy)]
pub struct CatchUp {
    pub folded: u64,
    pub timings: Timings,
}

/// Opens the store, resumes from its committed offset and starts the processor thread.
pub fn start(
    log_path: &Path,
    store_path: &Path,
    spec: PipelineSpec,
    end: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    alive: Liveness,
    outputs: Outputs,
) -> Result<ProcessorThread, ProcessError> {
    let runtime = outputs.runtime.clone();
    let store = store::open_write(store_path)?;
    let next_offset = store::offset(&store, PROCESSOR_NAME)?;
    let pipeline = Pipeline::open(spec, &store)?;
    let log = log::open_read(log_path)?;
    let (set_aside_blocks, set_aside_readings) = store::set_aside_totals(&store)?;
    if outputs.serving() {
        metrics.processor_offset.set(next_offset as i64);
        metrics.set_aside_blocks.inc_by(set_aside_blocks);
        metrics.set_aside_readings.inc_by(set_aside_readings);
    }
    tracing::info!(next_offset, set_aside_blocks, derived_epoch = outputs.derived_epoch, "processor resumes");
    let (stop_tx, stop_rx) = watch::channel(false);
    let status = ProcessorStatus::default();
    let serving = outputs.serving();
    let mut processor = Processor::new(log, store, pipeline, next_offset, metrics, outputs, status.clone());
    processor.choose_sync(store_path, serving, next_offset == 0)?;
    let committed = processor.committed_tx.subscribe();
    let unsynced = processor.unsynced_flag.clone();
    let guard = alive.guard();
    let thread = std::thread::Builder::new()
        .name("processor".into())
        .spawn(move || {
            let _alive = guard;
            processor.run(end, stop_rx, runtime);
        })
        .map_err(ProcessError::Spawn)?;
    Ok(ProcessorThread { stop: StopSignal(Arc::new(stop_tx)), thread, status, committed, unsynced })
}

/// Folds the log from the store's committed offset to the log's end, commits, and returns the
/// readings folded: the offline form of the processor (benchmarks, `replay`).
pub fn catch_up(
    log_path: &Path,
    store_path: &Path,
    spec: PipelineSpec,
    derived_epoch: i64,
) -> Result<CatchUp, ProcessError> {
    catch_up_range(log_path, store_path, spec, derived_epoch, None, None, &mut |_, _| {})
}

/// [`catch_up`] over part of the log: an empty store starts at `from` (the readings before it are
/// left out), and folding stops at the first block boundary at or after `until`. `progress` gets
/// (offset reached, offset to reach) after each step.
pub fn catch_up_range(
    log_path: &Path,
    store_path: &Path,
    spec: PipelineSpec,
    derived_epoch: i64,
    from: Option<u64>,
    until: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CatchUp, ProcessError> {
    let _kept = crate::allocator::KeepFreedPages::new();
    // Derived streams go to the log through a writer of its own: the aggregator must be stopped.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ProcessError::Spawn)?;
    let metrics = Arc::new(Metrics::new());
    let writer = log::start(log_path, metrics.clone(), Liveness::default())?;
    let outputs = Outputs {
        log: writer.handle.clone(),
        notifier: Notifier::default(),
        runtime: runtime.handle().clone(),
        live: crate::live::Hub::default(),
        derived_epoch,
        serving: Arc::new(AtomicBool::new(false)),
    };
    let store = store::open_write(store_path)?;
    let mut next_offset = store::offset(&store, PROCESSOR_NAME)?;
    let empty = next_offset == 0;
    let pipeline = Pipeline::open(spec, &store)?;
    let log = log::open_read(log_path)?;
    let mut head = log::end_offset(&log)?;
    if let Some(from) = from {
        if next_offset > 0 {
            return Err(ProcessError::Range(format!(
                "{} already holds the log up to offset {next_offset}; --from-offset starts a version that has \
                 processed nothing yet",
                store_path.display()
            )));
        }
        let first: i64 = log.query_row("SELECT COALESCE(MIN(first_offset), 0) FROM blocks", [], |r| r.get(0))?;
        if from < first.max(0) as u64 {
            return Err(ProcessError::Range(format!(
                "offsets before {first} are no longer in the log (dropped by [log] retain); replay from \
                 --from-offset {first} or later"
            )));
        }
        next_offset = from;
    }
    if let Some(until) = until {
        head = head.min(until);
    }
    let mut p = Processor::new(log, store, pipeline, next_offset, metrics, outputs, ProcessorStatus::default());
    p.choose_sync(store_path, false, empty)?;
    p.sync_when_caught_up = false;
    if p.pipeline.can_commit_behind() {
        p.behind = Some(WriteBehind::start(store_path, p.unsynced.is_some())?);
    }
    while p.next_offset < head {
        let before = p.next_offset;
        p.step(head)?;
        progress(p.next_offset, head);
        if p.next_offset == before {
            break;
        }
    }
    if p.next_offset != p.committed {
        p.commit()?;
    }
    p.written()?;
    let done = CatchUp { folded: p.committed.saturating_sub(next_offset), timings: p.timings };
    drop(p);
    runtime.block_on(writer.handle.stop());
    let _ = writer.thread.join();
    Ok(done)
}

impl Processor {
    fn new(
        log: Connection,
        store: Connection,
        pipeline: Pipeline,
        next_offset: u64,
        metrics: Arc<Metrics>,
        outputs: Outputs,
        status: ProcessorStatus,
    ) -> Processor {
        Processor {
            log,
            store,
            pipeline,
            next_offset,
            committed: next_offset,
            last_commit: Instant::now(),
            last_trim: Instant::now(),
            been_caught_up: false,
            metrics,
            outputs,
            status,
            cycle_blocks: 0,
            cycle_first: None,
            limit: None,
            failures: 0,
            timings: Timings::default(),
            decoder: BlockDecoder::default(),
            committed_tx: watch::Sender::new(next_offset),
            behind: None,
            unsynced: None,
            unsynced_flag: Arc::new(AtomicBool::new(false)),
            sync_when_caught_up: true,
        }
    }

    /// Writes the store without fsync if it is being built: empty, or built so during this boot
    /// already, and not serving. A serving store left unsynced (by an offline replay) is synced.
    fn choose_sync(&mut self, store_path: &Path, serving: bool, empty: bool) -> Result<(), ProcessError> {
        let marked = store::unsynced_marker(store_path).exists();
        if serving {
            if marked {
                store::end_unsynced(&[&self.store], store_path)?;
            }
            return Ok(());
        }
        if marked || empty {
            match store::begin_unsynced(&[&self.store], store_path) {
                Ok(true) => {
                    self.unsynced = Some(store_path.to_path_buf());
                    self.unsynced_flag.store(true, Ordering::Release);
                }
                Ok(false) => {}
                // Written with fsync then, as a serving store is.
                Err(error) => tracing::warn!(%error, "replaying with fsync"),
            }
        }
        Ok(())
    }

    /// Once caught up: syncs a store built without fsync, so that it may serve.
    fn sync_if_caught_up(&mut self) -> Result<(), ProcessError> {
        if let Some(path) = self.unsynced.as_ref().filter(|_| self.been_caught_up && self.sync_when_caught_up) {
            let started = Instant::now();
            store::end_unsynced(&[&self.store], path)?;
            tracing::info!(store = %path.display(), took_s = started.elapsed().as_secs_f64(), "caught up: store synced");
            self.unsynced = None;
            self.unsynced_flag.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn run(mut self, mut end: watch::Receiver<u64>, mut stop: watch::Receiver<bool>, runtime: tokio::runtime::Handle) {
        let mut backoff = MIN_BACKOFF;
        // Until it has caught up with the log (a version replaying, a restart far behind).
        let mut kept = Some(crate::allocator::KeepFreedPages::new());
        loop {
            if self.been_caught_up {
                drop(kept.take());
            }
            if *stop.borrow() {
                break;
            }
            let head = *end.borrow_and_update();
            // After a failure, wait out the backoff even if new data arrives meanwhile.
            let mut wake_on_data = true;
            let wait = match self.step(head) {
                Ok(None) => {
                    backoff = MIN_BACKOFF;
                    continue;
                }
                Ok(Some(wait)) => wait,
                Err(error) => {
                    wake_on_data = false;
                    match self.recover(&error) {
                        Some(pause) => pause,
                        None => {
                            let wait = backoff;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            wait
                        }
                    }
                }
            };
            let stopped = runtime.block_on(async {
                let end_moved = async {
                    if end.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = end_moved, if wake_on_data => false,
                    changed = stop.changed() => changed.is_err() || *stop.borrow(),
                    _ = tokio::time::sleep(wait) => false,
                }
            });
            if stopped {
                break;
            }
        }
        if self.pipeline.pending > 0 || self.next_offset != self.committed {
            if let Err(error) = self.commit() {
                tracing::error!(%error, "last commit at stop failed; the next start redoes it");
            }
        }
        tracing::info!(offset = self.committed, "processor stopped");
    }

    /// After a failed step: throws away what was folded, and decides how to go on. Returns the
    /// pause before the next step, or `None` to back off.
    fn recover(&mut self, error: &ProcessError) -> Option<Duration> {
        self.metrics.processor_step_failures.inc();
        tracing::error!(%error, offset = self.committed, "processor step failed");
        self.status.failed(self.committed, error.to_string());
        let (blocks, first, failed_end) = (self.cycle_blocks, self.cycle_first.take(), self.next_offset);
        if let Err(error) = self.reload() {
            tracing::error!(%error, "processor cannot reload its state from the store");
            return None;
        }
        self.failures += 1;
        if self.failures == 1 || error.blames_no_block() {
            // Maybe passing (a busy file, space freed): the same again, after a backoff.
            return None;
        }
        match (blocks, first) {
            (0, _) | (_, None) => None,
            (1, Some(block)) => {
                // One block, failing twice: set it aside if the store takes a commit without it.
                let end = block.first_offset + block.count;
                let reason = format!("the store refused it: {error}");
                self.pipeline.set_aside.push(SetAside { reason, ..block.clone() });
                self.next_offset = end;
                match self.commit() {
                    Ok(()) => {
                        tracing::warn!(first_offset = block.first_offset, "set aside a log block the store refuses");
                        Some(BISECT_PAUSE)
                    }
                    Err(probe) => {
                        tracing::error!(error = %probe, "the store takes no commit at all; retrying");
                        self.status.failed(self.committed, probe.to_string());
                        let _ = self.reload();
                        None
                    }
                }
            }
            (n, Some(_)) => {
                let until = self.limit.map_or(failed_end, |(_, end)| end.max(failed_end));
                self.limit = Some(((n / 2).max(1), until));
                tracing::warn!(
                    blocks = n,
                    offset = self.committed,
                    "commits keep failing; narrowing down to the block that makes them fail"
                );
                Some(BISECT_PAUSE)
            }
        }
    }

    /// Folds what the log holds beyond `next_offset` and commits when due. Returns `None` if
    /// there is more to do right away, else how long to wait at most for the log to move.
    fn step(&mut self, head: u64) -> Result<Option<Duration>, ProcessError> {
        let max_blocks = self.limit.map_or(usize::MAX, |(n, _)| n.saturating_sub(self.cycle_blocks).max(1));
        if !self.been_caught_up {
            self.pipeline.stage_readings = super::CATCH_UP_STAGE_READINGS;
        }
        if self.next_offset < head {
            // A client that connected since the last commit gets this commit's readings too.
            if self.pipeline.live.is_none() && self.outputs.serving() && self.outputs.live.wanted() {
                self.pipeline.live = Some(LiveReadings::default());
            }
            let started = Instant::now();
            let blocks = read_log(&self.log, self.next_offset, head, READ_READINGS, max_blocks)?;
            self.timings.read += started.elapsed();
            for b in &blocks {
                if b.first_offset != self.next_offset {
                    // Before the log's first block: dropped by retention (a new version replaying
                    // starts at the oldest block kept). Elsewhere it would be a hole.
                    tracing::warn!(
                        expected = self.next_offset,
                        found = b.first_offset,
                        "offsets missing from the log (dropped by [log] retain, or a hole); continuing after them"
                    );
                }
                let meta = SetAside {
                    first_offset: b.first_offset,
                    count: b.count,
                    agent_id: b.agent_id.clone(),
                    reason: String::new(),
                };
                if self.cycle_first.is_none() {
                    self.cycle_first = Some(meta.clone());
                }
                self.cycle_blocks += 1;
                if b.agent_id == DERIVED_AGENT && b.epoch != self.outputs.derived_epoch {
                    // Another pipeline version's anomalies and alerts: not this version's input.
                    self.next_offset = b.first_offset + b.count;
                    continue;
                }
                let started = Instant::now();
                let block =
                    self.decoder.decode(&b.data).map_err(|e| format!("does not decode: {e}")).and_then(|block| {
                        if block.len() as u64 != b.count {
                            return Err(format!("count says {} readings, the block holds {}", b.count, block.len()));
                        }
                        block.validate().map_err(|e| format!("does not validate: {e}"))?;
                        Ok(block)
                    });
                let folding = Instant::now();
                self.timings.read += folding - started;
                match block {
                    Ok(block) => {
                        self.pipeline.fold_block(&self.store, b.first_offset, &b.agent_id, b.received_at, &block)?;
                        self.timings.fold += folding.elapsed();
                    }
                    Err(reason) => {
                        tracing::error!(first_offset = b.first_offset, %reason, "log block set aside");
                        self.pipeline.set_aside.push(SetAside { reason, ..meta });
                    }
                }
                self.next_offset = b.first_offset + b.count;
                if self.pipeline.grown_bytes() >= self.commit_bytes() {
                    // The rest of this read comes again after the commit.
                    break;
                }
            }
            if self.next_offset >= head {
                let folding = Instant::now();
                self.pipeline.fold_staged(&self.store)?;
                self.timings.fold += folding.elapsed();
            }
            // Behind the log, what is staged waits for the next read, and the window operators
            // fold on while it comes in: they met after every read, each time waiting for the
            // slowest, and then idled while the log was read.
        }
        let caught_up = self.next_offset >= head;
        self.been_caught_up |= caught_up;
        if caught_up {
            self.pipeline.stage_readings = super::STAGE_READINGS;
        }
        let uncommitted = self.next_offset > self.committed;
        let since = self.last_commit.elapsed();
        let due = self.pipeline.pending >= COMMIT_READINGS
            || self.pipeline.grown_bytes() >= self.commit_bytes()
            || (uncommitted && since >= COMMIT_INTERVAL)
            || (uncommitted && caught_up && since >= LIVE_COMMIT_INTERVAL)
            || (uncommitted && self.limit.is_some_and(|(n, _)| self.cycle_blocks >= n));
        if due {
            self.commit()?;
            if caught_up {
                self.return_free_memory();
            }
        }
        if caught_up {
            self.sync_if_caught_up()?;
        }
        Ok(match (caught_up, self.next_offset > self.committed) {
            (false, _) => None,
            (true, true) => Some(LIVE_COMMIT_INTERVAL.saturating_sub(self.last_commit.elapsed())),
            (true, false) => Some(POLL),
        })
    }

    /// Memory the window operators may grow by before a commit is due.
    fn commit_bytes(&self) -> usize {
        if self.been_caught_up { LIVE_COMMIT_BYTES } else { COMMIT_BYTES }
    }

    /// Hands memory glibc's malloc freed after a burst back to the system, once caught up and at
    /// most every [`TRIM_INTERVAL`]: glibc keeps what was freed in its arenas (the aggregator's
    /// own allocations are jemalloc's, which returns pages by itself; SQLite's are glibc's).
    fn return_free_memory(&mut self) {
        if self.last_trim.elapsed() < TRIM_INTERVAL {
            return;
        }
        self.last_trim = Instant::now();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only gives free pages of the allocator's arenas back to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    fn commit(&mut self) -> Result<(), ProcessError> {
        if self.behind.is_some() {
            return self.commit_behind();
        }
        self.pipeline.fold_staged(&self.store)?;
        let started = Instant::now();
        self.append_derived()?;
        let transitions = self.pipeline.transitions().to_vec();
        let live = self.pipeline.live.take().map(|readings| self.live_batch(readings, &transitions));
        let set_aside: (u64, u64) =
            (self.pipeline.set_aside.len() as u64, self.pipeline.set_aside.iter().map(|b| b.count).sum());
        self.pipeline.commit(&mut self.store, PROCESSOR_NAME, self.next_offset)?;
        let serving = self.outputs.serving();
        if serving {
            self.metrics.set_aside_blocks.inc_by(set_aside.0);
            self.metrics.set_aside_readings.inc_by(set_aside.1);
        }
        self.cycle_blocks = 0;
        self.cycle_first = None;
        self.failures = 0;
        self.status.progressed();
        let now = crate::unix_ms();
        for t in transitions {
            if self.outputs.notifier.is_empty() || !serving {
                break;
            }
            if now.saturating_sub(t.received_at) > REPLAY_AGE_MS {
                // History being replayed (a restart far behind, a rebuild): stored, not sent.
                self.metrics.notify("replayed");
                continue;
            }
            let mut body = serde_json::to_value(&t).unwrap_or_default();
            body["sensor"] = self.pipeline.series.name(t.series).into();
            body["kind"] = "reading".into();
            self.outputs.notifier.send(body);
        }
        if let Some(batch) = live.filter(|_| serving) {
            self.outputs.live.publish(batch);
        }
        self.pipeline.live = (serving && self.outputs.live.wanted()).then(LiveReadings::default);
        self.committed = self.next_offset;
        self.last_commit = Instant::now();
        self.timings.commit += started.elapsed();
        self.timings.commits += 1;
        if serving {
            self.metrics.processor_offset.set(self.committed as i64);
        }
        self.committed_tx.send_replace(self.committed);
        if self.limit.is_some_and(|(_, until)| self.committed >= until) {
            self.limit = None;
        }
        Ok(())
    }

    /// [`Processor::commit`] of a replay: hands this commit to the store writer as it is
    /// encoded, waits for the previous one to be written, and folds on (nothing to notify or
    /// stream: no version serves while it replays).
    fn commit_behind(&mut self) -> Result<(), ProcessError> {
        self.pipeline.fold_staged(&self.store)?;
        let started = Instant::now();
        self.append_derived()?;
        // Encoded while the store writer may still be writing the commit before: at the end of
        // each stretch the fold had waited for it with both cores' encoding still to do.
        let Processor { pipeline, behind, committed, next_offset, .. } = self;
        let Some(behind) = behind.as_mut() else {
            return Err(StoreError::Corrupt("a replay's commit without its store writer".into()).into());
        };
        let encoded = pipeline.commit_behind(PROCESSOR_NAME, *committed, *next_offset, |job| behind.send(job))??;
        // The rows of one unwritten commit at most are read through: the one before must be in
        // the store before the operators fold on.
        self.written_but(1)?;
        self.pipeline.writing(&encoded);
        self.committed = self.next_offset;
        self.last_commit = Instant::now();
        self.timings.commit += started.elapsed();
        self.timings.commits += 1;
        Ok(())
    }

    /// Waits for the store writer to commit what it was given.
    fn written(&mut self) -> Result<(), ProcessError> {
        self.written_but(0)
    }

    /// Waits for the store writer to commit all but the last `keep` commits it was given.
    fn written_but(&mut self, keep: usize) -> Result<(), ProcessError> {
        if let Some(behind) = self.behind.as_mut() {
            behind.wait(keep)?;
            self.pipeline.written()?;
            self.committed_tx.send_replace(self.committed);
        }
        Ok(())
    }

    /// What this commit changed, for the live stream: its readings, the finest window each
    /// touched sensor's last reading is in, alert transitions and agents.
    fn live_batch(&self, live: LiveReadings, transitions: &[Transition]) -> crate::live::Batch {
        let mut batch = crate::live::Batch { omitted: live.omitted, ..Default::default() };
        let mut index: rustc_hash::FxHashMap<u32, usize> = rustc_hash::FxHashMap::default();
        let series = &self.pipeline.series;
        let mut sensor = |id: u32, sensors: &mut Vec<String>| {
            *index.entry(id).or_insert_with(|| {
                sensors.push(series.name(id).to_string());
                sensors.len() - 1
            })
        };
        let mut last: Vec<(u32, i64)> = Vec::new();
        for &(id, ts, value) in &live.readings {
            let i = sensor(id, &mut batch.sensors);
            let json = serde_json::to_string(&(&batch.sensors[i], ts, value)).unwrap_or_default();
            batch.readings.push((i, json));
            match last.get_mut(i) {
                Some(entry) => *entry = (id, ts),
                None => last.push((id, ts)),
            }
        }
        if let Some(op) = self.pipeline.windows.first() {
            for (i, &(id, ts)) in last.iter().enumerate() {
                if let Some((start, end, w)) = op.window_at(id, ts) {
                    let json = serde_json::json!({
                        "sensor": batch.sensors[i], "size": op.calendar.code(), "start": start, "end": end,
                        "count": w.stats.count, "min": w.stats.min, "max": w.stats.max, "mean": w.stats.mean(),
                        "last": {"ts": w.stats.last.0, "value": w.stats.last.1},
                    });
                    batch.windows.push((i, json.to_string()));
                }
            }
        }
        for t in transitions {
            let i = sensor(t.series, &mut batch.sensors);
            let mut json = serde_json::to_value(t).unwrap_or_default();
            json["sensor"] = batch.sensors[i].clone().into();
            batch.alerts.push((i, json.to_string()));
        }
        for (id, state) in self.pipeline.agents.changed() {
            let json = serde_json::json!({"id": id, "readings": state.readings, "last_seen": state.last_seen});
            batch.agents.push(json.to_string());
        }
        batch
    }

    /// Appends the derived readings of the pending commit to the log, before the commit: after a
    /// crash in between the same readings get the same sequence numbers, and the log drops them.
    fn append_derived(&mut self) -> Result<(), ProcessError> {
        if self.pipeline.derived.is_empty() {
            return Ok(());
        }
        let mut blocks = Vec::new();
        let mut seq = self.pipeline.derived_seq;
        for chunk in self.pipeline.derived.chunks(10_000) {
            let mut b = tributary_shared::BlockBuilder::default();
            for d in chunk {
                b.push(&d.sensor, d.ts, d.value);
            }
            let count = chunk.len() as u32;
            blocks.push(log::LogBlock { first_seq: seq, count, data: bytes::Bytes::from(b.finish().encode()) });
            seq += u64::from(count);
        }
        let log = self.outputs.log.clone();
        self.outputs
            .runtime
            .block_on(log.append(DERIVED_AGENT, self.outputs.derived_epoch, blocks))
            .map(|_| ())
            .map_err(|e| ProcessError::Derived(e.to_string()))
    }

    fn reload(&mut self) -> Result<(), ProcessError> {
        self.cycle_blocks = 0;
        self.cycle_first = None;
        self.pipeline = Pipeline::open(self.pipeline.spec.clone(), &self.store)?;
        self.next_offset = store::offset(&self.store, PROCESSOR_NAME)?;
        self.committed = self.next_offset;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::calendar::Calendar;
    use crate::pipeline::window::Point;

    /// A replay hands the store writer a commit while the one before may still be written: if
    /// that one fails, the next is refused (written alone it would move the offset past readings
    /// the store never got), and neither is in the store.
    #[test]
    fn a_commit_after_one_that_failed_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let conn = store::open_write(&path).unwrap();
        // The store refuses the first commit's rows (sensor 0), and would take the second's.
        conn.execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON windows WHEN NEW.series = 0
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .unwrap();
        let spec = PipelineSpec {
            calendars: vec![Calendar::fixed(60_000)],
            max_clock_skew_ms: 0,
            anomaly: vec![],
            alerts: vec![],
        };
        let mut pipeline = Pipeline::open(spec, &conn).unwrap();
        assert!(pipeline.can_commit_behind());
        let mut behind = WriteBehind::start(&path, false).unwrap();
        let point =
            |series| Point { series, ts: 1_764_547_200_000, value: 1.5, received_at: 1_764_547_200_000, block: 0 };

        pipeline.windows[0].add(&conn, &point(0)).unwrap();
        pipeline.commit_behind("main", 0, 10, |job| behind.send(job)).unwrap().unwrap();
        pipeline.windows[0].add(&conn, &point(1)).unwrap();
        pipeline.commit_behind("main", 10, 20, |job| behind.send(job)).unwrap().unwrap();

        let error = behind.wait(0).unwrap_err().to_string();
        assert!(error.contains("refused by the test"), "{error}");
        assert_eq!(behind.pending, 0, "the second commit's result was taken too");
        drop(behind);
        assert_eq!(store::offset(&conn, "main").unwrap(), 0);
        let rows: i64 = conn.query_row("SELECT count(*) FROM windows", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 0, "the second commit was not written without the first");

        // What the writer says of the second one.
        let mut behind = WriteBehind::start(&path, false).unwrap();
        conn.execute_batch("DROP TRIGGER refuse").unwrap();
        pipeline.windows[0].add(&conn, &point(2)).unwrap();
        pipeline.commit_behind("main", 0, 30, |job| behind.send(job)).unwrap().unwrap();
        pipeline.commit_behind("main", 40, 50, |job| behind.send(job)).unwrap().unwrap();
        let error = behind.wait(0).unwrap_err().to_string();
        assert!(error.contains("the commit from offset 40 follows one that was not written"), "{error}");
        assert_eq!(store::offset(&conn, "main").unwrap(), 30);
    }
}
