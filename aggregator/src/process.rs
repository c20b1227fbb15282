//! The stream processor: tails the log, aggregates blocks in memory, commits to the store.
//!
//! It reads whole blocks (up to [`MAX_READINGS_PER_STEP`] readings) from its committed offset on a
//! read-only connection, folds them into an [`Aggregate`] (per-sensor state, 1-minute windows,
//! per-agent counts), and writes the aggregate together with the new offset in one store
//! transaction. A crash at any point therefore resumes from the last committed offset with
//! nothing lost and nothing counted twice.
//!
//! Bad data never stops it. A block that does not read, decode or validate, or whose count lies,
//! is set aside (listed in the store's `set_aside` table with the reason, counted in /metrics, and
//! left in the log). A step whose commit keeps failing is narrowed down by bisection to the block
//! that makes it fail, which is set aside the same way, unless an empty commit fails too: then the
//! store itself is the problem (disk full, file locked), nothing is set aside, and the processor
//! reports itself stalled ([`ProcessorStatus`]) and retries until the store recovers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, params};
use tokio::sync::watch;
use tributary_shared::Block;

use crate::Liveness;
use crate::log::{self, LogError};
use crate::metrics::Metrics;
use crate::store::{self, StoreError, StoreWriter, Window};

/// Readings folded per store transaction: large enough that commits are rare at full speed,
/// small enough that a step takes well under a second.
pub const MAX_READINGS_PER_STEP: u64 = 100_000;
/// Blocks fetched per step at most (many tiny blocks when agents are idle).
const MAX_BLOCKS_PER_STEP: usize = 10_000;
/// Fallback poll when no end-of-log notification arrives.
const POLL: Duration = Duration::from_secs(1);
/// First wait after a failed step; doubles up to [`MAX_BACKOFF`] while the failures go on.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Pause between the steps of a bisection (each halves the suspect run of blocks).
const BISECT_PAUSE: Duration = Duration::from_millis(10);
/// How long the processor may fail without progress before `/healthz` reports it: a busy file or
/// a bisection clears within this.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

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
}

/// A sensor's state within one aggregate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SensorState {
    pub count: u64,
    /// Event time of the newest reading (greatest `ts`); ties go to the later one in the log.
    pub last_ts: i64,
    pub last_value: f64,
    /// When the aggregator appended the most recent block holding this sensor (Unix ms).
    pub last_seen: i64,
}

/// An agent's state within one aggregate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentState {
    pub readings: u64,
    pub last_seen: i64,
}

/// A log block left out of the store, and why. It stays in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct SetAside {
    pub first_offset: u64,
    /// What the log's `count` column says (0 if even that does not read).
    pub count: u64,
    pub agent_id: String,
    pub reason: String,
}

/// What a run of log blocks adds to the store. Sensor ids are interned so the per-reading work is
/// array and small-key hash lookups, not string hashing.
#[derive(Debug, Default)]
pub struct Aggregate {
    ids: Vec<String>,
    index: HashMap<String, u32>,
    sensors: Vec<SensorState>,
    windows: HashMap<(u32, i64), Window>,
    agents: HashMap<String, AgentState>,
    set_aside: Vec<SetAside>,
    readings: u64,
}

impl Aggregate {
    /// Folds in one block, in log order.
    pub fn add_block(&mut self, agent_id: &str, received_at: i64, block: &Block) {
        let map: Vec<u32> = block.sensors.iter().map(|id| self.intern(id)).collect();
        for entry in &block.entries {
            // Block::decode already checked the indices; skip rather than panic all the same.
            let Some(&g) = map.get(entry.sensor as usize) else {
                continue;
            };
            let state = &mut self.sensors[g as usize];
            state.count += 1;
            if entry.ts >= state.last_ts {
                state.last_ts = entry.ts;
                state.last_value = entry.value;
            }
            state.last_seen = state.last_seen.max(received_at);
            self.windows
                .entry((g, store::minute_of(entry.ts)))
                .and_modify(|w| w.add(entry.value))
                .or_insert_with(|| Window::of(entry.value));
        }
        let agent = self.agents.entry(agent_id.to_string()).or_insert(AgentState { readings: 0, last_seen: i64::MIN });
        agent.readings += block.entries.len() as u64;
        agent.last_seen = agent.last_seen.max(received_at);
        self.readings += block.entries.len() as u64;
    }

    /// Records a block left out of the store.
    pub fn set_aside_block(&mut self, block: SetAside) {
        self.set_aside.push(block);
    }

    fn intern(&mut self, id: &str) -> u32 {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let i = self.ids.len() as u32;
        self.ids.push(id.to_string());
        self.index.insert(id.to_string(), i);
        self.sensors.push(SensorState { count: 0, last_ts: i64::MIN, last_value: 0.0, last_seen: i64::MIN });
        i
    }

    /// Readings folded in so far.
    pub fn readings(&self) -> u64 {
        self.readings
    }

    pub fn sensors(&self) -> impl Iterator<Item = (&str, &SensorState)> {
        self.ids.iter().map(String::as_str).zip(&self.sensors).filter(|(_, s)| s.count > 0)
    }

    pub fn windows(&self) -> impl Iterator<Item = (&str, i64, &Window)> {
        self.windows.iter().map(|((g, start), w)| (self.ids[*g as usize].as_str(), *start, w))
    }

    pub fn agents(&self) -> impl Iterator<Item = (&str, &AgentState)> {
        self.agents.iter().map(|(id, a)| (id.as_str(), a))
    }

    /// Blocks set aside in this run.
    pub fn set_aside(&self) -> &[SetAside] {
        &self.set_aside
    }
}

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
}

struct Processor {
    log: Connection,
    store: StoreWriter,
    next_offset: u64,
    metrics: Arc<Metrics>,
    status: ProcessorStatus,
}

/// Opens the store, resumes from its committed offset and starts the processor thread. The waits
/// between steps run on `runtime` (for the watch channels); the work itself runs on the thread.
pub fn start(
    log_path: &Path,
    store_path: &Path,
    end: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    alive: Liveness,
    runtime: tokio::runtime::Handle,
) -> Result<ProcessorThread, ProcessError> {
    let store = StoreWriter::open(store_path)?;
    let next_offset = store.offset(store::PROCESSOR_NAME)?;
    let (set_aside_blocks, set_aside_readings) = store.set_aside_totals()?;
    let log = log::open_read(log_path)?;
    metrics.processor_offset.set(next_offset as i64);
    metrics.set_aside_blocks.inc_by(set_aside_blocks);
    metrics.set_aside_readings.inc_by(set_aside_readings);
    tracing::info!(next_offset, set_aside_blocks, "processor resumes");
    let (stop_tx, stop_rx) = watch::channel(false);
    let status = ProcessorStatus::default();
    let processor = Processor { log, store, next_offset, metrics, status: status.clone() };
    let guard = alive.guard();
    let thread = std::thread::Builder::new()
        .name("processor".into())
        .spawn(move || {
            let _alive = guard;
            processor.run(end, stop_rx, runtime);
        })
        .map_err(ProcessError::Spawn)?;
    Ok(ProcessorThread { stop: StopSignal(Arc::new(stop_tx)), thread, status })
}

/// The first block of a step, kept so that a step narrowed down to it can set it aside.
#[derive(Debug, Clone)]
struct BlockMeta {
    first_offset: u64,
    count: u64,
    agent_id: String,
    /// Where the next block starts.
    end: u64,
}

/// What one step read from the log.
struct Fold {
    aggregate: Aggregate,
    next: u64,
    blocks: usize,
    first: Option<BlockMeta>,
}

enum StepError {
    /// The log could not be read: nothing to narrow down, just retry.
    Read(rusqlite::Error),
    /// The store did not take the step's results.
    Apply { error: StoreError, blocks: usize, first: Option<BlockMeta> },
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Read(error) => write!(f, "reading the log: {error}"),
            StepError::Apply { error, .. } => write!(f, "{error}"),
        }
    }
}

/// What to do after a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Try the same step again after a backoff: the failure may be passing (a busy file).
    Retry,
    /// Try the first half of the failing run of blocks.
    Narrow,
    /// One block keeps failing: check that the store takes an empty commit, then set it aside.
    Probe,
}

/// Narrows down a step that keeps failing to the block that makes it fail, in O(log n) steps.
#[derive(Debug, Default)]
struct Bisection {
    /// The failing step's blocks not yet proven good, counted from the processor's offset.
    suspect: Option<usize>,
    /// Whether the step that just failed was already a retry of the same size.
    retried: bool,
}

impl Bisection {
    /// Blocks the next step may take.
    fn limit(&self) -> usize {
        self.suspect.map_or(MAX_BLOCKS_PER_STEP, |n| n.div_ceil(2).max(1))
    }

    fn succeeded(&mut self, blocks: usize) {
        self.retried = false;
        // Past the whole suspect run without a failure: it was passing after all.
        self.suspect = self.suspect.and_then(|n| n.checked_sub(blocks)).filter(|&left| left > 0);
    }

    fn failed(&mut self, blocks: usize) -> Recovery {
        if !self.retried && (blocks <= 1 || self.suspect.is_none()) {
            self.retried = true;
            return Recovery::Retry;
        }
        if blocks <= 1 {
            self.suspect = Some(1);
            return Recovery::Probe;
        }
        self.retried = false;
        self.suspect = Some(blocks);
        Recovery::Narrow
    }

    fn set_aside(&mut self) {
        *self = Bisection::default();
    }
}

impl Processor {
    fn run(mut self, mut end: watch::Receiver<u64>, mut stop: watch::Receiver<bool>, runtime: tokio::runtime::Handle) {
        let mut backoff = MIN_BACKOFF;
        let mut bisection = Bisection::default();
        loop {
            if *stop.borrow() {
                break;
            }
            let behind = self.next_offset < *end.borrow_and_update();
            // After a failure, wait out the backoff even if new data arrives meanwhile.
            let mut wake_on_data = true;
            let wait = if !behind {
                POLL
            } else {
                match self.step(bisection.limit()) {
                    Ok(blocks) => {
                        self.status.progressed();
                        bisection.succeeded(blocks);
                        backoff = MIN_BACKOFF;
                        if blocks > 0 {
                            continue;
                        }
                        // Behind, yet no block at the offset (a count in the log that lies): do not spin.
                        POLL
                    }
                    Err(failure) => {
                        wake_on_data = false;
                        self.metrics.processor_step_failures.inc();
                        tracing::error!(error = %failure, offset = self.next_offset, "processor step failed");
                        self.status.failed(self.next_offset, failure.to_string());
                        match failure {
                            StepError::Read(_) => Self::backoff(&mut backoff),
                            StepError::Apply { blocks, first, error } => match bisection.failed(blocks) {
                                Recovery::Retry => Self::backoff(&mut backoff),
                                Recovery::Narrow => {
                                    tracing::warn!(
                                        offset = self.next_offset,
                                        blocks,
                                        "the step keeps failing; narrowing it down to the block that makes it fail"
                                    );
                                    BISECT_PAUSE
                                }
                                Recovery::Probe => match first.map(|block| self.set_aside_failing(block, &error)) {
                                    Some(Ok(())) => {
                                        self.status.progressed();
                                        bisection.set_aside();
                                        backoff = MIN_BACKOFF;
                                        continue;
                                    }
                                    Some(Err(probe)) => {
                                        tracing::error!(error = %probe, "the store takes no commit at all; retrying");
                                        self.status.failed(self.next_offset, probe.to_string());
                                        Self::backoff(&mut backoff)
                                    }
                                    None => Self::backoff(&mut backoff),
                                },
                            },
                        }
                    }
                }
            };
            let stopped = runtime.block_on(async {
                // Once the writer has gone (shutdown) its end offset no longer moves: just poll.
                let end_moved = async {
                    if end.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = end_moved, if wake_on_data => false,
                    // An error means the stop sender is gone, which also means stop.
                    changed = stop.changed() => changed.is_err() || *stop.borrow(),
                    _ = tokio::time::sleep(wait) => false,
                }
            });
            if stopped {
                break;
            }
        }
        tracing::info!(offset = self.next_offset, "processor stopped");
    }

    /// The wait before the next try; doubles up to [`MAX_BACKOFF`].
    fn backoff(backoff: &mut Duration) -> Duration {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        wait
    }

    /// Processes one run of up to `max_blocks` blocks; returns how many blocks it committed.
    fn step(&mut self, max_blocks: usize) -> Result<usize, StepError> {
        let fold = self.fold(max_blocks).map_err(StepError::Read)?;
        if fold.next == self.next_offset {
            return Ok(0);
        }
        self.commit(&fold.aggregate, fold.next).map_err(|error| StepError::Apply {
            error,
            blocks: fold.blocks,
            first: fold.first,
        })?;
        tracing::debug!(readings = fold.aggregate.readings(), next_offset = fold.next, "processed");
        Ok(fold.blocks)
    }

    /// Writes an aggregate and the offset after it, then publishes the progress.
    fn commit(&mut self, aggregate: &Aggregate, next: u64) -> Result<(), StoreError> {
        self.store.apply(store::PROCESSOR_NAME, aggregate, next)?;
        self.next_offset = next;
        self.metrics.processor_offset.set(next as i64);
        for block in aggregate.set_aside() {
            tracing::error!(
                first_offset = block.first_offset,
                count = block.count,
                agent = %block.agent_id,
                reason = %block.reason,
                "log block set aside: left out of the store, kept in the log"
            );
            self.metrics.set_aside_blocks.inc();
            self.metrics.set_aside_readings.inc_by(block.count);
        }
        Ok(())
    }

    /// Reads and folds up to `max_blocks` blocks from the processor's offset.
    fn fold(&mut self, max_blocks: usize) -> Result<Fold, rusqlite::Error> {
        let mut fold = Fold { aggregate: Aggregate::default(), next: self.next_offset, blocks: 0, first: None };
        let mut stmt = self.log.prepare_cached(
            "SELECT first_offset, count, agent_id, received_at, data FROM blocks
             WHERE first_offset >= ?1 ORDER BY first_offset LIMIT ?2",
        )?;
        let limit = i64::try_from(max_blocks).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![fold.next.min(i64::MAX as u64) as i64, limit])?;
        while let Some(row) = rows.next()? {
            let first_offset = row.get::<_, i64>(0)?.max(0) as u64;
            if first_offset != fold.next {
                tracing::error!(expected = fold.next, found = first_offset, "hole in log offsets; continuing");
            }
            let block = LogRow::read(row);
            let end = first_offset.saturating_add(block.length());
            if fold.first.is_none() {
                fold.first = Some(BlockMeta {
                    first_offset,
                    count: block.count.unwrap_or(0),
                    agent_id: block.agent_id.clone().unwrap_or_default(),
                    end,
                });
            }
            match block.usable() {
                Ok((agent_id, received_at, decoded)) => fold.aggregate.add_block(agent_id, received_at, decoded),
                Err(reason) => fold.aggregate.set_aside_block(SetAside {
                    first_offset,
                    count: block.count.unwrap_or(0),
                    agent_id: block.agent_id.clone().unwrap_or_default(),
                    reason,
                }),
            }
            fold.next = end;
            fold.blocks += 1;
            if fold.aggregate.readings() >= MAX_READINGS_PER_STEP {
                break;
            }
        }
        Ok(fold)
    }

    /// A single block keeps failing. If the store takes an empty commit, the block is the
    /// problem: set it aside. If not, the store is (and nothing is set aside).
    fn set_aside_failing(&mut self, block: BlockMeta, error: &StoreError) -> Result<(), StoreError> {
        self.store.apply(store::PROCESSOR_NAME, &Aggregate::default(), self.next_offset)?;
        let mut aggregate = Aggregate::default();
        aggregate.set_aside_block(SetAside {
            first_offset: block.first_offset,
            count: block.count,
            agent_id: block.agent_id,
            reason: format!("the serving store refused it: {error}"),
        });
        self.commit(&aggregate, block.end.max(self.next_offset))
    }
}

/// One row of the log's `blocks` table, each column read without trusting it: the file is ours,
/// but a disk error or a hand edit must cost one block, not the processor.
struct LogRow {
    count: Option<u64>,
    agent_id: Option<String>,
    received_at: Result<i64, String>,
    block: Result<Block, String>,
}

impl LogRow {
    fn read(row: &rusqlite::Row<'_>) -> LogRow {
        let count = row.get::<_, i64>(1).ok().and_then(|c| u64::try_from(c).ok());
        let agent_id = row.get::<_, String>(2).ok();
        let received_at = row.get::<_, i64>(3).map_err(|e| format!("received_at does not read: {e}"));
        let block = match row.get_ref(4) {
            Ok(ValueRef::Blob(data)) => Block::decode(data).map_err(|e| e.to_string()),
            Ok(other) => Err(format!("data is {:?}, not a blob", other.data_type())),
            Err(e) => Err(format!("data does not read: {e}")),
        };
        LogRow { count, agent_id, received_at, block }
    }

    /// Readings the block spans in the log, so that the next block is never skipped: when the
    /// `count` column and the data disagree, the smaller; at least 1, so the processor moves on.
    fn length(&self) -> u64 {
        let decoded = self.block.as_ref().ok().map(|b| b.len() as u64);
        match (self.count, decoded) {
            (Some(count), Some(decoded)) => count.min(decoded),
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => 1,
        }
        .max(1)
    }

    /// The block to fold in, or why it must be set aside.
    fn usable(&self) -> Result<(&str, i64, &Block), String> {
        let block = self.block.as_ref().map_err(|e| format!("block does not decode: {e}"))?;
        let agent_id = self.agent_id.as_deref().ok_or("agent_id is not text")?;
        let received_at = self.received_at.clone()?;
        let count = self.count.ok_or("count is not a non-negative integer")?;
        if count != block.len() as u64 {
            return Err(format!("the log's count says {count} readings, the block holds {}", block.len()));
        }
        // Ingest validated every reading; the bytes may have changed on disk since.
        block.validate().map_err(|e| format!("block fails validation: {e}"))?;
        Ok((agent_id, received_at, block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::BlockBuilder;

    const T: i64 = 1_764_000_000_000 / 60_000 * 60_000;

    #[test]
    fn last_value_follows_event_time_not_arrival() {
        let mut b = BlockBuilder::default();
        b.push("a", T + 5_000, 1.0);
        b.push("a", T + 1_000, 2.0); // late: older event time, arrives later
        b.push("a", T + 5_000, 3.0); // tie: later in the log wins
        let mut agg = Aggregate::default();
        agg.add_block("gw", 42, &b.finish());
        let (_, s) = agg.sensors().next().unwrap();
        assert_eq!((s.count, s.last_ts, s.last_value, s.last_seen), (3, T + 5_000, 3.0, 42));
    }

    #[test]
    fn readings_land_in_their_event_minute() {
        let mut b = BlockBuilder::default();
        b.push("a", T + 59_999, 1.0);
        b.push("a", T + 60_000, 4.0);
        b.push("a", T, 3.0);
        let mut agg = Aggregate::default();
        agg.add_block("gw", 1, &b.finish());
        let mut windows: Vec<_> = agg.windows().map(|(id, start, w)| (id.to_string(), start, *w)).collect();
        windows.sort_by_key(|w| w.1);
        assert_eq!(windows[0], ("a".into(), T, Window { count: 2, min: 1.0, max: 3.0, mean: 2.0 }));
        assert_eq!(windows[1], ("a".into(), T + 60_000, Window::of(4.0)));
        let (agent, state) = agg.agents().next().unwrap();
        assert_eq!((agent, state.readings), ("gw", 3));
    }

    /// Drives a [`Bisection`] over `n` blocks whose commit fails whenever it includes one of
    /// `poison`, with `fails(step)` adding failures of the store itself. Returns the blocks set
    /// aside, the blocks committed and the number of steps.
    fn bisect(n: usize, poison: &[usize], fails: impl Fn(usize) -> bool) -> (Vec<usize>, usize, usize) {
        let mut bisection = Bisection::default();
        let (mut pos, mut committed, mut set_aside) = (0, 0, Vec::new());
        let mut steps = 0;
        while pos < n {
            steps += 1;
            assert!(steps < 10_000, "no progress at block {pos}");
            let take = bisection.limit().min(n - pos);
            let store_down = fails(steps);
            if store_down || poison.iter().any(|p| (pos..pos + take).contains(p)) {
                if bisection.failed(take) == Recovery::Probe && !store_down {
                    assert_eq!(take, 1);
                    set_aside.push(pos);
                    bisection.set_aside();
                    pos += 1;
                }
            } else {
                bisection.succeeded(take);
                committed += take;
                pos += take;
            }
        }
        (set_aside, committed, steps)
    }

    #[test]
    fn bisection_sets_aside_only_the_failing_block_in_few_steps() {
        for (n, poison) in [(1, vec![0]), (2, vec![1]), (10_000, vec![0]), (10_000, vec![7_000]), (9_999, vec![9_998])]
        {
            let (set_aside, committed, steps) = bisect(n, &poison, |_| false);
            assert_eq!(set_aside, poison, "n = {n}");
            assert_eq!(committed, n - poison.len());
            // Two tries of the full step, then one step per halving down and the probe.
            assert!(steps <= 2 * 14 + 4, "{steps} steps for n = {n}");
        }
        let (set_aside, committed, _) = bisect(5_000, &[10, 11, 4_000], |_| false);
        assert_eq!((set_aside, committed), (vec![10, 11, 4_000], 4_997));
    }

    #[test]
    fn bisection_sets_nothing_aside_when_the_store_is_the_problem() {
        // A passing failure is retried, not bisected.
        assert_eq!(bisect(100, &[], |step| step == 1), (vec![], 100, 2));
        // A store that refuses everything for a while (disk full): the bisection narrows down,
        // the probe fails, nothing is set aside, and everything goes in once it recovers.
        let (set_aside, committed, _) = bisect(100, &[], |step| step <= 40);
        assert_eq!((set_aside, committed), (vec![], 100));
        let (set_aside, committed, _) = bisect(100, &[50], |step| step <= 40);
        assert_eq!((set_aside, committed), (vec![50], 99));
    }
}
