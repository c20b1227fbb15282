//! The stream processor: tails the log, aggregates blocks in memory, commits to the store.
//!
//! It reads whole blocks (up to [`MAX_READINGS_PER_STEP`] readings) from its committed offset on a
//! read-only connection, folds them into an [`Aggregate`] (per-sensor state, 1-minute windows,
//! per-agent counts), and writes the aggregate together with the new offset in one store
//! transaction. A crash at any point therefore resumes from the last committed offset with
//! nothing lost and nothing counted twice.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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
const MAX_BLOCKS_PER_STEP: i64 = 10_000;
/// Fallback poll when no end-of-log notification arrives.
const POLL: Duration = Duration::from_secs(1);

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

/// What a run of log blocks adds to the store. Sensor ids are interned so the per-reading work is
/// array and small-key hash lookups, not string hashing.
#[derive(Debug, Default)]
pub struct Aggregate {
    ids: Vec<String>,
    index: HashMap<String, u32>,
    sensors: Vec<SensorState>,
    windows: HashMap<(u32, i64), Window>,
    agents: HashMap<String, AgentState>,
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
}

struct Processor {
    log: Connection,
    store: StoreWriter,
    next_offset: u64,
    metrics: Arc<Metrics>,
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
    let log = log::open_read(log_path)?;
    metrics.processor_offset.set(next_offset as i64);
    tracing::info!(next_offset, "processor resumes");
    let (stop_tx, stop_rx) = watch::channel(false);
    let processor = Processor { log, store, next_offset, metrics };
    let guard = alive.guard();
    let thread = std::thread::Builder::new()
        .name("processor".into())
        .spawn(move || {
            let _alive = guard;
            processor.run(end, stop_rx, runtime);
        })
        .map_err(ProcessError::Spawn)?;
    Ok(ProcessorThread { stop: StopSignal(Arc::new(stop_tx)), thread })
}

impl Processor {
    fn run(mut self, mut end: watch::Receiver<u64>, mut stop: watch::Receiver<bool>, runtime: tokio::runtime::Handle) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                break;
            }
            let behind = self.next_offset < *end.borrow_and_update();
            let wait = if behind {
                match self.step() {
                    Ok(_) => {
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    Err(error) => {
                        // Usually a full disk or a locked file: retry without spinning.
                        tracing::error!(%error, offset = self.next_offset, "processor step failed; retrying");
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        backoff
                    }
                }
            } else {
                POLL
            };
            let stopped = runtime.block_on(async {
                // Once the writer has gone (shutdown) its end offset no longer moves: just poll.
                let end_moved = async {
                    if end.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = end_moved => false,
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

    /// Processes one run of blocks; returns how many readings it committed.
    fn step(&mut self) -> Result<u64, ProcessError> {
        let mut aggregate = Aggregate::default();
        let mut next = self.next_offset;
        {
            let mut stmt = self.log.prepare_cached(
                "SELECT first_offset, count, agent_id, received_at, data FROM blocks
                 WHERE first_offset >= ?1 ORDER BY first_offset LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![next as i64, MAX_BLOCKS_PER_STEP])?;
            while let Some(row) = rows.next()? {
                let first_offset = row.get::<_, i64>(0)?.max(0) as u64;
                let count = row.get::<_, i64>(1)?.max(0) as u64;
                let agent_id: String = row.get(2)?;
                let received_at: i64 = row.get(3)?;
                let data = row.get_ref(4)?.as_blob().map_err(rusqlite::Error::from)?;
                if first_offset != next {
                    tracing::error!(expected = next, found = first_offset, "hole in log offsets; continuing");
                }
                match Block::decode(data) {
                    Ok(block) if block.len() as u64 == count => aggregate.add_block(&agent_id, received_at, &block),
                    Ok(block) => {
                        tracing::error!(first_offset, count, decoded = block.len(), "log block count mismatch; skipped")
                    }
                    // Cannot happen for blocks the writer validated; never stop the pipeline on it.
                    Err(error) => {
                        tracing::error!(first_offset, %error, "log block does not decode; skipped")
                    }
                }
                next = first_offset + count;
                if aggregate.readings() >= MAX_READINGS_PER_STEP {
                    break;
                }
            }
        }
        if next == self.next_offset {
            return Ok(0);
        }
        self.store.apply(store::PROCESSOR_NAME, &aggregate, next)?;
        self.next_offset = next;
        self.metrics.processor_offset.set(next as i64);
        tracing::debug!(readings = aggregate.readings(), next_offset = next, "processed");
        Ok(aggregate.readings())
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
        assert_eq!(windows[0], ("a".into(), T, Window { count: 2, min: 1.0, max: 3.0, sum: 4.0 }));
        assert_eq!(windows[1], ("a".into(), T + 60_000, Window::of(4.0)));
        let (agent, state) = agg.agents().next().unwrap();
        assert_eq!((agent, state.readings), ("gw", 3));
    }
}
