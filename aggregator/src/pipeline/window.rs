//! Tumbling windows by event time: one operator per configured size, stored as rows.
//!
//! A row holds [`Calendar::slots`] consecutive windows of one sensor (20 minutes or more), so the
//! store writes a row per sensor and hour touched per commit, not a row per window, and a query
//! for a sensor-day reads a few rows (DESIGN.md, "The serving store: windows in blocks too").
//! Rows being written live in memory; a row not in memory is loaded only if the store can have
//! it (late data), which the operator knows from the highest row it stored per sensor.
//!
//! A row is stored in parts, each its windows' encodings one after the other: *sealed* parts
//! (`part` = their first slot), written once, and the open tail (`part` = [`TAIL`]), rewritten
//! while its windows change. Each sensor's newest row stays in memory, but only its open windows
//! do: a commit seals the windows before the newest few into a part of their own and drops them
//! from memory. A commit then writes a few windows per sensor instead of rewriting its whole
//! row, so commits can be frequent and memory stays a few windows per sensor and size. A reading
//! for a sealed window (late data) reads the row's parts back first, and the next commit writes
//! the row again from scratch. The parts of a row in order are the bytes of the whole row, so
//! what a row holds does not depend on when commits happened.
//!
//! Late readings are never dropped: they update the window of their own event time, whose
//! `revision` counts the log blocks that changed it after it had closed.

use rusqlite::{Connection, params};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::calendar::{Calendar, floor_div};
use super::stats::Stats;
use crate::store::StoreError;

/// Memory for rows kept after a commit, per operator. Each sensor's newest row stays whatever it
/// costs (live data lands there); older rows, kept for late data, leave least recently used first
/// once the total is over. A count of rows bounded nothing: a full row is 11 KB, and 4,096 of them
/// per window size were most of the aggregator's memory.
const KEEP_BYTES: usize = 8 << 20;

/// Windows of a sensor's newest row that stay open (in memory) after a commit, at least: the
/// newest and the one before. More stay open when readings arrive further behind their sensor's
/// newest window (senders' batches interleave: 4 senders of 10 s batches put readings 4 windows
/// of 10 s back), up to [`MAX_OPEN_WINDOWS`]; readings further back are late data, rare enough
/// to read their sealed windows back for.
const OPEN_WINDOWS: u16 = 2;
const MAX_OPEN_WINDOWS: u16 = 32;
const MAX_OPEN_WINDOWS_I64: i64 = MAX_OPEN_WINDOWS as i64;

/// `Window::bumped_by` of a window no block has bumped (no log offset is this large); a plain
/// u64 keeps a window 8 bytes smaller than an `Option`.
const NOT_BUMPED: u64 = u64::MAX;

/// One window: its statistics, how often late data revised it, and when it last changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub stats: Stats,
    /// Log blocks that changed this window after it had closed (late data).
    pub revision: u32,
    /// The latest `received_at` (aggregator clock, Unix ms) of a reading in it: from the log,
    /// so replays reproduce it.
    pub updated_at: i64,
    /// The log block that last raised `revision` (not stored: a block never spans two commits).
    bumped_by: u64,
}

impl Window {
    pub fn new(stats: Stats, revision: u32, updated_at: i64) -> Window {
        Window { stats, revision, updated_at, bumped_by: NOT_BUMPED }
    }

    /// Merges a later window's readings (for coarser views at query time).
    pub fn merge(&mut self, other: &Window) {
        self.stats.merge(&other.stats);
        self.revision += other.revision;
        self.updated_at = self.updated_at.max(other.updated_at);
    }
}

/// A window as a row holds it in memory. Most windows of the finer sizes hold one reading or
/// two (a sensor reading every 43 s gets a 10 s window per reading, a minute's window for one or
/// two): such a window is its readings, in the 64 bytes this takes, and gets its statistics on the
/// heap (a [`Stats`] is 128 bytes with its sketch) only when a third reading comes. [`Stats::of`]
/// the first reading, with the second added, is exactly the statistics they stand for, so what
/// is folded and stored is the same bit for bit. A 160-byte window made, moved, regrown and sealed
/// per reading cost the operators their reallocations and a share of their cache misses.
#[derive(Debug, Clone, PartialEq)]
struct Held {
    slot: u16,
    /// How many of `readings` the window holds while `stats` is `None` (1 or 2).
    held: u8,
    revision: u32,
    updated_at: i64,
    /// As [`Window`]'s.
    bumped_by: u64,
    /// (event time, value) of the window's readings in log order, while `stats` is `None`.
    readings: [(i64, f64); 2],
    stats: Option<Box<Stats>>,
}

impl Held {
    /// A window made by its first reading, in the log block at `block`.
    fn new(slot: u16, ts: i64, value: f64, received_at: i64, block: u64) -> Held {
        Held {
            slot,
            held: 1,
            revision: 0,
            updated_at: received_at,
            bumped_by: block,
            readings: [(ts, value), (0, 0.0)],
            stats: None,
        }
    }

    /// A window read from the store: one reading is held as such when its statistics are those
    /// of that reading alone (they always are: a stored window of one reading is its reading).
    fn of(slot: u16, w: Window) -> Held {
        let (ts, value) = w.stats.first;
        let one = w.stats.count == 1 && w.stats == Stats::of(ts, value);
        Held {
            slot,
            held: u8::from(one),
            revision: w.revision,
            updated_at: w.updated_at,
            bumped_by: w.bumped_by,
            readings: [(ts, value), (0, 0.0)],
            stats: (!one).then(|| Box::new(w.stats)),
        }
    }

    /// The statistics of the readings held as such.
    fn held_stats(&self) -> Stats {
        let [(t0, v0), (t1, v1)] = self.readings;
        let mut stats = Stats::of(t0, v0);
        if self.held == 2 {
            stats.add(t1, v1);
        }
        stats
    }

    /// The window with its statistics (a copy).
    fn window(&self) -> Window {
        let stats = match &self.stats {
            Some(stats) => Stats::clone(stats),
            None => self.held_stats(),
        };
        Window { stats, revision: self.revision, updated_at: self.updated_at, bumped_by: self.bumped_by }
    }

    /// Adds a reading of the log block at `block` (received at `received_at`) to a window that
    /// ends at `end`; returns the heap bytes the window grew by.
    fn add(&mut self, ts: i64, value: f64, received_at: i64, block: u64, end: i64) -> usize {
        let grown = match &mut self.stats {
            Some(stats) => {
                let heap = stats.sketch.heap_bytes();
                stats.add(ts, value);
                // A sketch that spilled or grew its buckets (most of a busy window's memory).
                stats.sketch.heap_bytes().saturating_sub(heap)
            }
            None if self.held == 1 => {
                self.readings[1] = (ts, value);
                self.held = 2;
                0
            }
            None => {
                let mut stats = self.held_stats();
                stats.add(ts, value);
                let grown = std::mem::size_of::<Stats>() + stats.sketch.heap_bytes();
                self.stats = Some(Box::new(stats));
                self.held = 0;
                grown
            }
        };
        self.updated_at = self.updated_at.max(received_at);
        if received_at >= end && self.bumped_by != block {
            self.revision += 1;
            self.bumped_by = block;
        }
        grown
    }

    /// What the window holds on the heap.
    fn heap_bytes(&self) -> usize {
        self.stats.as_ref().map_or(0, |s| std::mem::size_of::<Stats>() + s.sketch.heap_bytes())
    }
}

/// The `part` of a row's open tail (above every slot).
const TAIL: i64 = 1 << 16;

/// A row of up to [`Calendar::slots`] windows of one sensor.
#[derive(Debug, Clone)]
pub struct Row {
    /// The windows in the order they were made. Senders' batches interleave, so a reading
    /// often makes a window before others of its row: kept sorted, each such window shifted the
    /// ones after it (a tenth of the fold's time went to that).
    windows: Vec<Held>,
    /// `at[slot]` is 1 + the index in `windows` of the slot's window, 0 for none: a reading finds
    /// its window without a search (each probe of a search was a cache miss).
    at: Box<[u16]>,
    dirty: bool,
    /// The commit in which the row was last changed (for eviction).
    used: u64,
    /// Windows of slots below this one are sealed: in the store only (every window in memory
    /// has a slot at or above it).
    sealed_below: u16,
    /// 1 + the highest slot of a window in memory (0: none): a reading for a slot at or above it
    /// makes a window without looking `at` it (a cache miss per reading of a sparse sensor).
    top: u16,
    /// The row's windows in memory include what its stored parts hold (it was read back): the
    /// next commit deletes those parts and writes the row anew.
    replace: bool,
    /// The last sealed part while it spans less than a quarter of the row: (its first slot, its
    /// bytes). The next seal rewrites it with the new windows appended, so that a row has a few
    /// parts, not one per commit (with data in real time, a part per window), and memory holds
    /// its windows encoded (a third of their size decoded).
    last_part: Option<(u16, Vec<u8>)>,
    /// What the row held in memory at the last commit it was changed in (see [`Row::bytes`]).
    held: usize,
}

impl Row {
    fn new(slots: i64, capacity: usize) -> Row {
        let at = vec![0; slots as usize].into_boxed_slice();
        Row {
            windows: Vec::with_capacity(capacity),
            at,
            dirty: false,
            used: 0,
            sealed_below: 0,
            top: 0,
            replace: false,
            last_part: None,
            held: 0,
        }
    }

    /// A row of `windows` read from the store (distinct slots below `slots`, as [`decode_row`]
    /// checks).
    fn of(windows: Vec<(u16, Window)>, slots: i64) -> Row {
        let windows = windows.into_iter().map(|(slot, w)| Held::of(slot, w)).collect();
        let mut row = Row { windows, replace: true, ..Row::new(slots, 0) };
        row.index_windows();
        row
    }

    /// What the row holds in memory, the sketches' heap included (they are most of a busy
    /// window's bytes). A walk over its windows.
    fn bytes(&self) -> usize {
        self.bytes_with(self.windows.iter().map(Held::heap_bytes).sum())
    }

    /// [`Row::bytes`] with its windows' heap bytes known.
    fn bytes_with(&self, heap: usize) -> usize {
        std::mem::size_of::<Row>()
            + self.at.len() * 2
            + self.windows.capacity() * std::mem::size_of::<Held>()
            + heap
            + self.last_part.as_ref().map_or(0, |(_, bytes)| bytes.capacity())
    }

    fn index_windows(&mut self) {
        self.at.fill(0);
        self.top = 0;
        for (i, w) in self.windows.iter().enumerate() {
            self.at[usize::from(w.slot)] = i as u16 + 1;
            self.top = self.top.max(w.slot + 1);
        }
    }

    /// Where a commit would seal this row if it is its sensor's newest: below the newest `open`
    /// windows (0: nothing to seal).
    fn seal_below(&self, open: u16) -> u16 {
        let top = self.windows.iter().map(|w| w.slot).max().unwrap_or(0);
        let below = top.saturating_sub(open - 1);
        if below > self.sealed_below { below } else { 0 }
    }

    /// After a commit wrote the windows below `below` into a sealed part: they leave memory.
    fn seal(&mut self, below: u16, open: u16) {
        self.sealed_below = below;
        self.windows.retain(|w| w.slot >= below);
        self.windows.shrink_to(usize::from(open) + 2);
        self.index_windows();
    }

    /// Reads the sealed windows back from the store, before a reading changes one of them or
    /// makes a window among them.
    fn unseal(
        &mut self,
        conn: &Connection,
        calendar: &Calendar,
        series: u32,
        row_index: i64,
        writing: Option<&EncodedRows>,
    ) -> Result<(), StoreError> {
        let code = calendar.code();
        let corrupt =
            |e: String| StoreError::Corrupt(format!("window row (size {code}, series {series}, row {row_index}): {e}"));
        let data = read_row(conn, code, series, row_index, writing)?
            .ok_or_else(|| corrupt("its sealed windows are not in the store".into()))?;
        let mut windows: Vec<Held> = decode_row(calendar, row_index, &data)
            .map_err(corrupt)?
            .into_iter()
            // The tail's windows as last stored: memory has them as they are now.
            .filter(|(slot, _)| *slot < self.sealed_below)
            .map(|(slot, w)| Held::of(slot, w))
            .collect();
        windows.append(&mut self.windows);
        self.windows = windows;
        self.sealed_below = 0;
        self.replace = true;
        self.last_part = None;
        self.index_windows();
        Ok(())
    }

    /// The windows by slot.
    fn in_order(&self) -> Box<dyn Iterator<Item = &Held> + '_> {
        // Usually made in slot order already (data in time order); else found through `at`,
        // a walk over every slot of the row.
        if self.windows.windows(2).all(|pair| pair[0].slot < pair[1].slot) {
            Box::new(self.windows.iter())
        } else {
            Box::new(self.at.iter().filter(|i| **i != 0).map(|i| &self.windows[usize::from(*i) - 1]))
        }
    }
}

/// The rows in memory: one list, found by key through a hash map and, for the row a series used
/// last (nearly always the one its next reading needs), through a dense index by series. The
/// hash lookup per run of a sensor's readings was a fifth of the operators' own time in a profile
/// of the three sizes' fold, nearly all of it cache misses; the dense index is small enough to
/// stay in cache, and says where a row is before it is needed, so the row can be fetched ahead
/// ([`prefetch`]).
#[derive(Debug, Default)]
struct Rows {
    list: Vec<((u32, i64), Row)>,
    index: FxHashMap<(u32, i64), u32>,
    /// Per series: (row index, 1 + its place in `list`) of the row it used last (0: none).
    last: Vec<(i64, u32)>,
}

impl Rows {
    fn len(&self) -> usize {
        self.list.len()
    }

    /// Where the row of `key` is in `list`.
    fn find(&self, key: (u32, i64)) -> Option<usize> {
        match self.last.get(key.0 as usize) {
            Some(&(row_index, at)) if at != 0 && row_index == key.1 => Some(at as usize - 1),
            _ => self.index.get(&key).map(|at| *at as usize),
        }
    }

    fn get(&self, key: &(u32, i64)) -> Option<&Row> {
        self.find(*key).map(|at| &self.list[at].1)
    }

    fn get_mut(&mut self, key: &(u32, i64)) -> Option<&mut Row> {
        self.find(*key).map(|at| &mut self.list[at].1)
    }

    #[cfg(test)]
    fn contains_key(&self, key: &(u32, i64)) -> bool {
        self.find(*key).is_some()
    }

    /// Remembers `at` as the row its series used last.
    fn used(&mut self, key: (u32, i64), at: usize) {
        let series = key.0 as usize;
        if self.last.len() <= series {
            self.last.resize(series + 1, (0, 0));
        }
        self.last[series] = (key.1, at as u32 + 1);
    }

    /// Adds a row that is not in memory; returns its place.
    fn insert(&mut self, key: (u32, i64), row: Row) -> usize {
        let at = self.list.len();
        self.list.push((key, row));
        self.index.insert(key, at as u32);
        at
    }

    /// Removes the row at `at`: the last row takes its place.
    fn remove_at(&mut self, at: usize) -> Row {
        let (key, row) = self.list.swap_remove(at);
        self.index.remove(&key);
        if let Some(last) = self.last.get_mut(key.0 as usize).filter(|l| l.1 as usize == at + 1) {
            *last = (0, 0);
        }
        if let Some(&(moved, _)) = self.list.get(at) {
            self.index.insert(moved, at as u32);
            if let Some(last) = self.last.get_mut(moved.0 as usize).filter(|l| l.1 as usize == self.list.len() + 1) {
                last.1 = at as u32 + 1;
            }
        }
        row
    }

    fn remove(&mut self, key: &(u32, i64)) -> Option<Row> {
        let at = self.find(*key)?;
        Some(self.remove_at(at))
    }

    fn retain(&mut self, mut keep: impl FnMut(&(u32, i64), &mut Row) -> bool) {
        let mut at = 0;
        while at < self.list.len() {
            let (key, row) = &mut self.list[at];
            if keep(key, row) {
                at += 1;
            } else {
                self.remove_at(at);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&(u32, i64), &Row)> {
        self.list.iter().map(|(key, row)| (key, row))
    }

    #[cfg(test)]
    fn values(&self) -> impl Iterator<Item = &Row> {
        self.list.iter().map(|(_, row)| row)
    }

    /// Asks the CPU to fetch what the next readings of `series` will need from memory (only
    /// hints: nothing is read that is not in cache soon anyway): the row it used last (`depth`
    /// 0), that row's newest window (1: its place is in the row, fetched a run before), the
    /// window's statistics (2: their place is in the window).
    fn prefetch(&self, series: u32, depth: u8) {
        let Some(&(_, at)) = self.last.get(series as usize).filter(|l| l.1 != 0) else { return };
        self.prefetch_at(at as usize - 1, depth);
    }

    /// [`Rows::prefetch`] of the row at `at` in `list` (depth 1: its first and newest windows).
    fn prefetch_at(&self, at: usize, depth: u8) {
        let Some(entry) = self.list.get(at) else { return };
        if depth == 0 {
            let start: *const ((u32, i64), Row) = entry;
            prefetch(start.cast());
            prefetch(start.cast::<u8>().wrapping_add(64));
            return;
        }
        let Some(window) = entry.1.windows.last() else { return };
        if depth == 1 {
            prefetch((window as *const Held).cast());
            prefetch(entry.1.windows.as_ptr().cast());
        } else if let Some(stats) = &window.stats {
            let start: *const Stats = &**stats;
            prefetch(start.cast());
            prefetch(start.cast::<u8>().wrapping_add(64));
        }
    }
}

#[cfg(test)]
impl std::ops::Index<&(u32, i64)> for Rows {
    type Output = Row;

    fn index(&self, key: &(u32, i64)) -> &Row {
        self.get(key).expect("a row in memory")
    }
}

/// A hint that the cache line at `p` will be read soon.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and cannot fault, whatever the address (SSE is part of
    // x86-64).
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Rows encoded for a commit, in key order, and the bytes of their parts.
#[derive(Debug, Default)]
pub struct EncodedRows {
    rows: Vec<EncodedRow>,
    bytes: Vec<u8>,
}

#[derive(Debug)]
struct EncodedRow {
    key: (u32, i64),
    /// Where the row was in [`Rows::list`] when it was encoded (where it still is until the
    /// operator changes, which [`WindowOperator::committed`] checks).
    at: u32,
    /// Delete the row's stored parts first.
    replace: bool,
    /// Where the row's bytes start.
    start: usize,
    /// A part sealed now: (its first slot, where its bytes end, the slot its windows are below);
    /// the row's `last_part` is in front of the windows sealed now.
    sealed: Option<(u16, usize, u16)>,
    /// Where the tail's bytes end (it starts where the sealed part ends, or at `start`).
    end: usize,
    /// Heap bytes of the windows that stay in memory after the commit (counted while encoding
    /// them: a walk over the windows again after the commit was a cache miss per window).
    kept_heap: usize,
}

/// A reading as the operators see it.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub series: u32,
    pub ts: i64,
    pub value: f64,
    pub received_at: i64,
    /// Offset of the log block the reading came in.
    pub block: u64,
}

/// Folds readings into the windows of one size.
pub struct WindowOperator {
    pub calendar: Calendar,
    rows: Rows,
    /// Per sensor, the highest row index in the store: rows above it are new, no read needed.
    stored_max: FxHashMap<u32, i64>,
    commits: u64,
    /// Bytes of rows made, loaded or grown since the last commit.
    grown: usize,
    /// Per series, the most windows a row of it has held: a new row reserves that many.
    width: Vec<u16>,
    /// A read connection of its own to the store, so that it can fold on a thread of its own.
    reader: Option<Connection>,
    /// (index, start, end) of the last window a reading fell in: most readings fall in the same
    /// one as the reading before, and a calendar-day lookup is not free.
    last_bucket: (i64, i64, i64),
    /// Per series, the index of its newest window.
    newest: Vec<i64>,
    /// How many windows behind its sensor's newest a reading has landed (up to
    /// [`MAX_OPEN_WINDOWS`]) since each of the last commits: the windows a row keeps open.
    /// Commits come every few milliseconds under load, so one interval says little.
    behind: [u16; 16],
    /// The rows of a commit still being written on another thread (see
    /// [`super::Pipeline::commit_behind`]): a row read back meanwhile is read through them.
    writing: Option<std::sync::Arc<EncodedRows>>,
}

impl WindowOperator {
    /// Loads what it needs to know of the store (the highest stored row per sensor).
    pub fn open(calendar: Calendar, conn: &Connection) -> Result<WindowOperator, StoreError> {
        let mut stored_max = FxHashMap::default();
        let mut stmt = conn.prepare("SELECT series, MAX(row) FROM windows WHERE size = ?1 GROUP BY series")?;
        let rows = stmt.query_map([calendar.code()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (series, max) = row?;
            stored_max.insert(series as u32, max);
        }
        Ok(WindowOperator {
            calendar,
            rows: Rows::default(),
            stored_max,
            commits: 0,
            grown: 0,
            width: Vec::new(),
            reader: crate::store::open_reader_beside(conn),
            last_bucket: (0, 0, 0),
            newest: Vec::new(),
            behind: [0; 16],
            writing: None,
        })
    }

    /// Rows of a commit another thread writes, which the store does not show yet (`None` once
    /// it is committed).
    pub fn set_writing(&mut self, rows: Option<std::sync::Arc<EncodedRows>>) {
        self.writing = rows;
    }

    /// Whether the operator has a read connection of its own (to fold on another thread).
    pub fn has_reader(&self) -> bool {
        self.reader.is_some()
    }

    /// Adds a batch of staged readings ([`BySeries::of`]). Rows late data needs are read through
    /// the operator's own connection, else through `conn`.
    pub fn add_batch(&mut self, conn: Option<&Connection>, batch: &BySeries) -> Result<(), StoreError> {
        let reader = self.reader.take();
        let result = match reader.as_ref().or(conn) {
            Some(conn) => {
                let BySeries { points, runs } = batch;
                // The operator's own connection reads the rows late data needs in one read
                // transaction: a statement each of its own took and dropped SQLite's locks (two
                // `fcntl`s) and reread the pages from the file, a tenth of a replay of many
                // sensors. One snapshot is enough: the rows of a commit still being written come
                // from `writing` whether the snapshot has them or not, and no other commit lands
                // while readings are added (commits are made between calls).
                let own = reader.is_some();
                let begun = if own { conn.execute_batch("BEGIN").map_err(StoreError::from) } else { Ok(()) };
                let added = begun.and_then(|()| self.add_all(conn, points, runs));
                let ended = if own { conn.execute_batch("COMMIT").map_err(StoreError::from) } else { Ok(()) };
                added.and(ended)
            }
            None => Err(StoreError::Corrupt("a window operator without a connection to the store".into())),
        };
        self.reader = reader;
        result
    }

    /// Adds one reading (in log order) to the window of its event time.
    pub fn add(&mut self, conn: &Connection, p: &Point) -> Result<(), StoreError> {
        self.add_all(conn, std::slice::from_ref(p), &[0])
    }

    /// Adds readings (each sensor's in log order) to the windows of their event times. A run of
    /// readings for the same row (a sensor's, folded one after the other) finds the row once,
    /// not with a hash lookup per reading. `runs`: where each sensor's readings start, ascending;
    /// the rows of the next runs are fetched into the cache while this one folds.
    fn add_all(&mut self, conn: &Connection, points: &[Point], runs: &[u32]) -> Result<(), StoreError> {
        let slots = self.calendar.slots();
        let commits = self.commits;
        // The row of the readings before: its key and place.
        let mut current: Option<((u32, i64), usize)> = None;
        let mut run = 0;
        // The window (and its row) of the reading before: most readings of a busy sensor fall
        // in it. Kept in locals, not in `self`: stored there and read back at once, it stalled
        // every reading that needed a new window (a fifth of this loop's samples in a profile).
        let mut bucket = self.last_bucket;
        let mut row_index = floor_div(bucket.0, slots);
        for (i, p) in points.iter().enumerate() {
            if runs.get(run).is_some_and(|start| *start as usize == i) {
                // Three runs ahead the row, two its newest window, one the window's statistics:
                // each found through what the one before fetched.
                for depth in 0..3u8 {
                    if let Some(next) = runs.get(run + 3 - usize::from(depth)) {
                        self.rows.prefetch(points[*next as usize].series, depth);
                    }
                }
                run += 1;
            }
            if !(bucket.1 <= p.ts && p.ts < bucket.2) {
                bucket = self.calendar.bucket(p.ts);
                row_index = floor_div(bucket.0, slots);
            }
            let (index, end) = (bucket.0, bucket.2);
            let slot = (index - row_index * slots) as u16;
            let key = (p.series, row_index);
            let series = p.series as usize;
            if self.newest.len() <= series {
                self.newest.resize(series + 1, i64::MIN);
            }
            let newest = self.newest[series];
            match newest.saturating_sub(index) {
                ..=0 => self.newest[series] = index,
                behind @ 1..MAX_OPEN_WINDOWS_I64 => {
                    let now = &mut self.behind[commits as usize % 16];
                    *now = (*now).max(behind as u16);
                }
                _ => {}
            }
            let at = match current {
                Some((k, at)) if k == key => at,
                _ => {
                    // Every row in memory took a reading, so none is above its sensor's newest
                    // window: a row above it is new, no need to look for it (a cache miss).
                    let above = newest == i64::MIN || row_index > floor_div(newest, slots);
                    let at = match if above { None } else { self.rows.find(key) } {
                        Some(at) => at,
                        None => {
                            let row = match self.stored_max.get(&p.series) {
                                Some(max) if row_index <= *max => load_row(
                                    conn,
                                    self.calendar.code(),
                                    p.series,
                                    row_index,
                                    &self.calendar,
                                    self.writing.as_deref(),
                                )?
                                .unwrap_or_else(|| Row::new(slots, 4)),
                                _ => {
                                    // As many windows as the sensor's rows have held, up to 32:
                                    // growing a row one window at a time was a tenth of the fold
                                    // (reallocations), reserving a whole row per sensor too much
                                    // memory between commits.
                                    let width = self.width.get(series).copied().unwrap_or(0).clamp(4, 32);
                                    Row::new(slots, usize::from(width))
                                }
                            };
                            self.grown += row.bytes();
                            self.rows.insert(key, row)
                        }
                    };
                    self.rows.used(key, at);
                    let row = &mut self.rows.list[at].1;
                    row.dirty = true;
                    row.used = commits;
                    current = Some((key, at));
                    at
                }
            };
            let row = &mut self.rows.list[at].1;
            if slot < row.sealed_below {
                row.unseal(conn, &self.calendar, p.series, row_index, self.writing.as_deref())?;
            }
            // Most readings make a window above the row's others (a sparse sensor) or land in
            // the newest one (a busy one): neither needs `at`.
            let at = if slot >= row.top {
                0
            } else {
                match row.windows.last() {
                    Some(w) if w.slot == slot => row.windows.len() as u16,
                    _ => row.at[usize::from(slot)],
                }
            };
            match at {
                at @ 1.. => {
                    let w = &mut row.windows[usize::from(at) - 1];
                    self.grown += w.add(p.ts, p.value, p.received_at, p.block, end);
                }
                0 => {
                    // A window that is new when its readings arrive after it closed was also
                    // made by late data; it starts at revision 0 all the same: nothing was
                    // served before. The rest of this block's readings for the window are part
                    // of its first version.
                    let w = Held::new(slot, p.ts, p.value, p.received_at, p.block);
                    let capacity = row.windows.capacity();
                    row.windows.push(w);
                    self.grown += (row.windows.capacity() - capacity) * std::mem::size_of::<Held>();
                    let len = row.windows.len() as u16;
                    row.at[usize::from(slot)] = len;
                    row.top = row.top.max(slot + 1);
                    if self.width.len() <= series {
                        self.width.resize(series + 1, 0);
                    }
                    self.width[series] = self.width[series].max(len);
                }
            }
        }
        self.last_bucket = bucket;
        Ok(())
    }

    /// Encodes every changed row, in key order: the store's B-tree is then written front to
    /// back instead of at random pages. Needs no connection, so operators encode in parallel.
    /// The windows of a sensor's newest row below the newest few go into a sealed part.
    pub fn encode_dirty(&self) -> EncodedRows {
        // Bytes to reserve: most windows take under 24 (one or two readings); growing the buffer
        // by doubling copied it again and again.
        let mut reserve = 0;
        let mut keys: Vec<((u32, i64), u32)> = Vec::new();
        for (at, (key, r)) in self.rows.list.iter().enumerate() {
            if r.dirty {
                reserve += r.windows.len() * 24 + r.last_part.as_ref().map_or(0, |(_, bytes)| bytes.len());
                keys.push((*key, at as u32));
            }
        }
        keys.sort_unstable();
        let open = self.open_windows();
        let slots = self.calendar.slots();
        // One buffer for all rows: an allocation per row, and its growth, were a third of it.
        let mut encoded = EncodedRows { rows: Vec::with_capacity(keys.len()), bytes: Vec::with_capacity(reserve) };
        for (i, &(key, at)) in keys.iter().enumerate() {
            // Rows in key order are all over memory: the next ones are fetched ahead.
            for depth in 0..2u8 {
                if let Some((_, next)) = keys.get(i + 2 - usize::from(depth)) {
                    self.rows.prefetch_at(*next as usize, depth);
                }
            }
            let row = &self.rows.list[at as usize].1;
            let newest = self.newest.get(key.0 as usize).is_some_and(|index| index.div_euclid(slots) == key.1);
            let seal_below = if newest { row.seal_below(open) } else { 0 };
            let start = encoded.bytes.len();
            // In slot order: the windows to seal come first (after the last part, if it grows),
            // then the tail.
            let (mut first_sealed, mut sealed_end) = (None, None);
            let mut kept_heap = 0;
            if let Some((first, bytes)) = row.last_part.as_ref().filter(|_| seal_below > 0) {
                first_sealed = Some(*first);
                encoded.bytes.extend_from_slice(bytes);
            }
            for w in row.in_order() {
                if w.slot < seal_below {
                    first_sealed.get_or_insert(w.slot);
                } else {
                    kept_heap += w.heap_bytes();
                    if first_sealed.is_some() && sealed_end.is_none() {
                        sealed_end = Some(encoded.bytes.len());
                    }
                }
                encode_held(&self.calendar, key.1, w, &mut encoded.bytes);
            }
            let sealed = first_sealed.map(|first| (first, sealed_end.unwrap_or(encoded.bytes.len()), seal_below));
            let end = encoded.bytes.len();
            encoded.rows.push(EncodedRow { key, at, replace: row.replace, start, sealed, end, kept_heap });
        }
        encoded
    }

    /// Writes rows [`WindowOperator::encode_dirty`] encoded (inside the caller's transaction).
    pub fn write(&self, tx: &Connection, encoded: &EncodedRows) -> Result<usize, StoreError> {
        write_rows(self.calendar.code(), tx, encoded)
    }

    /// The windows a sensor's newest row keeps open: as far back as readings landed lately.
    fn open_windows(&self) -> u16 {
        (self.behind.iter().max().copied().unwrap_or(0) + 1).clamp(OPEN_WINDOWS, MAX_OPEN_WINDOWS)
    }

    /// After a successful commit of `encoded`: rows are clean, sealed windows leave memory, and
    /// older rows untouched for a while leave too.
    pub fn committed(&mut self, encoded: &EncodedRows) {
        let open = self.open_windows();
        self.behind[(self.commits as usize + 1) % 16] = 0;
        for (i, written) in encoded.rows.iter().enumerate() {
            if let Some(next) = encoded.rows.get(i + 2) {
                self.rows.prefetch_at(next.at as usize, 0);
            }
            if let Some(next) = encoded.rows.get(i + 1) {
                self.rows.prefetch_at(next.at as usize, 1);
            }
            let row = match self.rows.list.get_mut(written.at as usize) {
                Some((key, row)) if *key == written.key => row,
                _ => match self.rows.get_mut(&written.key) {
                    Some(row) => row,
                    None => continue,
                },
            };
            let (series, row_index) = written.key;
            let max = self.stored_max.entry(series).or_insert(row_index);
            *max = (*max).max(row_index);
            row.dirty = false;
            row.replace = false;
            // Windows' `bumped_by` stay: the blocks they name are behind the commit, and later
            // blocks have other offsets.
            if let Some((first, end, below)) = written.sealed {
                row.seal(below, open);
                // A part that spans a quarter of the row is done; a shorter one grows at the
                // next seal.
                let done = below - first >= (self.calendar.slots() / 4) as u16;
                row.last_part = (!done).then(|| (first, encoded.bytes[written.start..end].to_vec()));
            }
            row.held = row.bytes_with(written.kept_heap);
        }
        let slots = self.calendar.slots();
        let newest = &self.newest;
        // The row before a sensor's newest takes readings for a while after the newest began
        // (senders interleave); once all its windows are behind the open ones it is done, and
        // leaves. Kept on for late data, a thousand sensors' such rows were 8 MiB per size;
        // evicted by size instead, a reading or two behind loaded them whole again and rewrote them.
        self.rows.retain(|&(series, row_index), row| {
            let Some(&newest) = newest.get(series as usize).filter(|n| **n != i64::MIN) else { return true };
            let previous = newest.div_euclid(slots) == row_index + 1;
            let first_open = newest - i64::from(open) + 1;
            row.dirty || !previous || (row_index + 1) * slots > first_open
        });
        // Older rows (kept for late data) count against KEEP_BYTES; each sensor's newest row,
        // down to its open windows, stays.
        let is_newest = |(series, row_index): &(u32, i64)| {
            newest.get(*series as usize).is_some_and(|index| index.div_euclid(slots) == *row_index)
        };
        let bytes: usize = self.rows.iter().filter(|(k, _)| !is_newest(k)).map(|(_, r)| r.held).sum();
        if bytes > KEEP_BYTES {
            let mut by_age: Vec<(u64, (u32, i64))> =
                self.rows.iter().filter(|(k, _)| !is_newest(k)).map(|(k, r)| (r.used, *k)).collect();
            by_age.sort_unstable();
            let mut excess = bytes - KEEP_BYTES;
            for (_, key) in by_age {
                if excess == 0 {
                    break;
                }
                if let Some(row) = self.rows.remove(&key) {
                    excess = excess.saturating_sub(row.held);
                }
            }
        }
        self.commits += 1;
        self.grown = 0;
    }

    /// Memory taken by rows made, loaded or grown since the last commit (they stay until it).
    pub fn grown_bytes(&self) -> usize {
        self.grown
    }

    /// Forgets everything in memory (after a failed commit, to reload from the store).
    pub fn reset(&mut self, conn: &Connection) -> Result<(), StoreError> {
        *self = WindowOperator::open(self.calendar.clone(), conn)?;
        Ok(())
    }

    /// The window in memory that holds `ts` of `series`: (start, end, a copy of the window).
    pub fn window_at(&self, series: u32, ts: i64) -> Option<(i64, i64, Window)> {
        let (index, start, end) = self.calendar.bucket(ts);
        let slots = self.calendar.slots();
        let row = self.rows.get(&(series, index.div_euclid(slots)))?;
        // A sealed window's slot has no index (0): None.
        let at = usize::from(row.at[index.rem_euclid(slots) as usize]);
        row.windows.get(at.checked_sub(1)?).map(|w| (start, end, w.window()))
    }

    /// Rows in memory (for metrics).
    pub fn rows_in_memory(&self) -> usize {
        self.rows.len()
    }
}

/// A batch of staged readings as the window operators fold it: those not quarantined, a sensor's
/// one after the other and each sensor's in log order, and where each sensor's start. A window's
/// bits depend only on the order of its own readings (and what the operator tracks per sensor,
/// on the order of that sensor's), so folding in this order writes the same tables; a sensor's
/// row and windows then stay in cache from one of its readings to the next, where log order
/// (sensors interleaved) missed the cache at each reading. Made once per batch and shared by the
/// operators (each making its own copy was a tenth of their time).
#[derive(Debug, Default)]
pub struct BySeries {
    points: Vec<Point>,
    runs: Vec<u32>,
}

impl BySeries {
    pub fn of(staged: &[super::Staged]) -> BySeries {
        let (points, runs) = by_series(staged);
        BySeries { points, runs }
    }
}

/// [`BySeries`]'s readings and runs. The readings are copied in that order (a counting sort):
/// read through a list of indices instead, each was a cache miss in the fold.
fn by_series(staged: &[super::Staged]) -> (Vec<Point>, Vec<u32>) {
    let series = staged.iter().map(|s| s.point.series as usize + 1).max().unwrap_or(0);
    // Where each sensor's readings start.
    let mut start = vec![0u32; series + 1];
    for s in staged.iter().filter(|s| s.quarantine.is_none()) {
        start[s.point.series as usize + 1] += 1;
    }
    let mut runs = Vec::new();
    for i in 1..start.len() {
        if start[i] != 0 {
            runs.push(start[i - 1]);
        }
        start[i] += start[i - 1];
    }
    let filler = Point { series: 0, ts: 0, value: 0.0, received_at: 0, block: 0 };
    let mut points = vec![filler; start[series] as usize];
    for s in staged.iter().filter(|s| s.quarantine.is_none()) {
        let at = &mut start[s.point.series as usize];
        points[*at as usize] = s.point;
        *at += 1;
    }
    (points, runs)
}

/// [`WindowOperator::write`] for the size of `code`: needs no operator, so a commit writes one
/// size's rows while another size's encode.
pub fn write_rows(code: i64, tx: &Connection, encoded: &EncodedRows) -> Result<usize, StoreError> {
    let mut put = tx.prepare_cached(
        "INSERT INTO windows (size, series, row, part, data) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (size, series, row, part) DO UPDATE SET data = excluded.data",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM windows WHERE size = ?1 AND series = ?2 AND row = ?3")?;
    let mut delete_tail =
        tx.prepare_cached("DELETE FROM windows WHERE size = ?1 AND series = ?2 AND row = ?3 AND part = ?4")?;
    for row in &encoded.rows {
        let mut start = row.start;
        let (series, row_index) = (i64::from(row.key.0), row.key.1);
        if row.replace {
            delete.execute(params![code, series, row_index])?;
        }
        if let Some((first, end, _)) = row.sealed {
            put.execute(params![code, series, row_index, first, &encoded.bytes[start..end]])?;
            start = end;
        }
        if start < row.end {
            put.execute(params![code, series, row_index, TAIL, &encoded.bytes[start..row.end]])?;
        } else if !row.replace {
            delete_tail.execute(params![code, series, row_index, TAIL])?;
        }
    }
    Ok(encoded.rows.len())
}

/// Reads one stored row.
pub fn load_row(
    conn: &Connection,
    code: i64,
    series: u32,
    row_index: i64,
    calendar: &Calendar,
    writing: Option<&EncodedRows>,
) -> Result<Option<Row>, StoreError> {
    match read_row(conn, code, series, row_index, writing)? {
        None => Ok(None),
        Some(data) => {
            decode_row(calendar, row_index, &data).map(|windows| Some(Row::of(windows, calendar.slots()))).map_err(
                |e| StoreError::Corrupt(format!("window row (size {code}, series {series}, row {row_index}): {e}")),
            )
        }
    }
}

/// The stored bytes of one row: its parts in order. `writing`: rows of a commit being written
/// (not visible to `conn` yet), applied over what the store holds as [`write_rows`] will.
fn read_row(
    conn: &Connection,
    code: i64,
    series: u32,
    row_index: i64,
    writing: Option<&EncodedRows>,
) -> Result<Option<Vec<u8>>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT part, data FROM windows WHERE size = ?1 AND series = ?2 AND row = ?3 ORDER BY part")?;
    let mut rows = stmt.query(params![code, series as i64, row_index])?;
    let written = writing
        .and_then(|w| w.rows.binary_search_by_key(&(series, row_index), |r| r.key).ok().map(|i| (w, &w.rows[i])));
    let Some((w, r)) = written else {
        let mut data: Option<Vec<u8>> = None;
        while let Some(part) = rows.next()? {
            let bytes = part.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
            data.get_or_insert_with(Vec::new).extend_from_slice(bytes);
        }
        return Ok(data);
    };
    let mut parts: Vec<(i64, Vec<u8>)> = Vec::new();
    while let Some(part) = rows.next()? {
        parts.push((part.get(0)?, part.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?.to_vec()));
    }
    let mut start = r.start;
    if r.replace {
        parts.clear();
    }
    let mut put = |part: i64, bytes: &[u8]| match parts.binary_search_by_key(&part, |(p, _)| *p) {
        Ok(i) => parts[i].1 = bytes.to_vec(),
        Err(i) => parts.insert(i, (part, bytes.to_vec())),
    };
    if let Some((first, end, _)) = r.sealed {
        put(i64::from(first), &w.bytes[start..end]);
        start = end;
    }
    if start < r.end {
        put(TAIL, &w.bytes[start..r.end]);
    } else if !r.replace {
        parts.retain(|(p, _)| *p != TAIL);
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(parts.iter().map(|(_, bytes)| bytes.len()).sum());
    for (_, bytes) in parts {
        data.extend_from_slice(&bytes);
    }
    Ok(Some(data))
}

/// A window as stored: times as deltas from the window's start, and small windows as their
/// values (their statistics are refolded on load, bit for bit as the processor folded them).
#[derive(Serialize, Deserialize)]
enum StoredWindow {
    /// One reading.
    One { slot: u16, ts: i64, value: f64, updated: i64, revision: u32 },
    /// Up to the sketch's exact limit: the values in log order, and first/last by index.
    Few { slot: u16, values: Vec<f64>, first: (i64, u8), last: (i64, u8), updated: i64, revision: u32 },
    /// Everything else.
    Many { slot: u16, stats: Stats, updated: i64, revision: u32 },
}

/// [`StoredWindow`] borrowed for writing: the same variants and fields in the same order, so
/// postcard writes the same bytes without copying a window's values. `One` and `Few` are written
/// by hand ([`encode_window`]); the test checks those bytes against these variants.
#[derive(Serialize)]
#[cfg_attr(not(test), allow(dead_code))]
enum StoredWindowRef<'a> {
    One { slot: u16, ts: i64, value: f64, updated: i64, revision: u32 },
    Few { slot: u16, values: &'a [f64], first: (i64, u8), last: (i64, u8), updated: i64, revision: u32 },
    Many { slot: u16, stats: &'a Stats, updated: i64, revision: u32 },
}

/// A whole row as stored: its windows' encodings one after the other, in slot order (what its
/// parts joined hold).
#[cfg(test)]
fn encode_row(calendar: &Calendar, row_index: i64, row: &Row, out: &mut Vec<u8>) {
    out.reserve(row.windows.len() * 24);
    for w in row.in_order() {
        encode_held(calendar, row_index, w, out);
    }
}

/// [`encode_window`] of a window as a row holds it.
fn encode_held(calendar: &Calendar, row_index: i64, w: &Held, out: &mut Vec<u8>) {
    let start = calendar.start_of(row_index * calendar.slots() + i64::from(w.slot));
    match &w.stats {
        None if w.held == 1 => encode_one(start, w.slot, w.readings[0], w.updated_at, w.revision, out),
        None => encode_two(start, w.slot, w.readings, w.updated_at, w.revision, out),
        Some(stats) => encode_stats(start, w.slot, stats, w.updated_at, w.revision, out),
    }
}

/// A window of two readings (in log order), as postcard writes [`StoredWindowRef::Few`] of the
/// statistics [`Stats::add`] makes of them: the earlier by event time is first (the first in the
/// log on a tie), the later last (the second on a tie), each named by the index of the first
/// value with its bits.
fn encode_two(start: i64, slot: u16, [a, b]: [(i64, f64); 2], updated_at: i64, revision: u32, out: &mut Vec<u8>) {
    let (first, last) = if b.0 < a.0 { (b, a) } else { (a, b) };
    let index_of = |v: f64| u8::from(v.to_bits() != a.1.to_bits());
    let mut put = Put::default();
    put.byte(1);
    put.varint(u64::from(slot));
    put.byte(2);
    put.f64(a.1);
    put.f64(b.1);
    put.zigzag(first.0 - start);
    put.byte(index_of(first.1));
    put.zigzag(last.0 - start);
    put.byte(index_of(last.1));
    put.zigzag(updated_at.saturating_sub(start));
    put.varint(u64::from(revision));
    put.append_to(out);
}

/// A window of one reading, as postcard writes [`StoredWindowRef::One`].
fn encode_one(start: i64, slot: u16, (ts, value): (i64, f64), updated_at: i64, revision: u32, out: &mut Vec<u8>) {
    let mut put = Put::default();
    put.byte(0);
    put.varint(u64::from(slot));
    put.zigzag(ts - start);
    put.f64(value);
    put.zigzag(updated_at.saturating_sub(start));
    put.varint(u64::from(revision));
    put.append_to(out);
}

#[cfg(test)]
fn encode_window(calendar: &Calendar, row_index: i64, slot: u16, w: &Window, out: &mut Vec<u8>) {
    let start = calendar.start_of(row_index * calendar.slots() + i64::from(slot));
    encode_stats(start, slot, &w.stats, w.updated_at, w.revision, out);
}

/// A window of the row slot `slot` (starting at `start`) as stored.
fn encode_stats(start: i64, slot: u16, s: &Stats, updated_at: i64, revision: u32, out: &mut Vec<u8>) {
    let updated = updated_at.saturating_sub(start);
    // One and Few (nearly every window of the finer sizes) are written by hand, the bytes
    // postcard writes for them (tested): through serde they were most of a commit's encoding.
    match &s.sketch {
        super::sketch::Sketch::Exact(values) if s.count == 1 => {
            encode_one(start, slot, (s.first.0, values[0]), updated_at, revision, out);
        }
        super::sketch::Sketch::Exact(values) if values.len() as u64 == s.count => {
            let index_of = |(ts, v): (i64, f64)| {
                let i = values.iter().position(|x| x.to_bits() == v.to_bits()).unwrap_or(0);
                (ts - start, i as u8)
            };
            let (first, last) = (index_of(s.first), index_of(s.last));
            out.reserve(48 + 8 * values.len());
            let mut put = Put::default();
            put.byte(1);
            put.varint(u64::from(slot));
            put.varint(values.len() as u64);
            put.append_to(out);
            for v in values {
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            let mut put = Put::default();
            put.zigzag(first.0);
            put.byte(first.1);
            put.zigzag(last.0);
            put.byte(last.1);
            put.zigzag(updated);
            put.varint(u64::from(revision));
            put.append_to(out);
        }
        _ => {
            let stored = StoredWindowRef::Many { slot, stats: s, updated, revision };
            // Serialising these types into a Vec cannot fail.
            if let Ok(bytes) = postcard::to_extend(&stored, std::mem::take(out)) {
                *out = bytes;
            }
        }
    }
}

/// A few fields encoded as postcard encodes them, on the stack (one copy into the row's buffer
/// instead of a capacity check per byte). 64 bytes: the most a window's fields around its values
/// take (a tag, a u16, three i64 and a u32 as varints, and two f64 and three bytes).
struct Put {
    buf: [u8; 64],
    len: usize,
}

impl Default for Put {
    fn default() -> Put {
        Put { buf: [0; 64], len: 0 }
    }
}

impl Put {
    fn byte(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// postcard's unsigned integers: LEB128.
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte(v as u8 | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    /// postcard's signed integers: zigzag, then a varint.
    fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    fn f64(&mut self, v: f64) {
        self.buf[self.len..self.len + 8].copy_from_slice(&v.to_bits().to_le_bytes());
        self.len += 8;
    }

    /// Appends the fields to `out`: all 64 bytes, then cut back (a copy of a known size is a
    /// few vector moves; of `len` bytes, a call to `memcpy` per window).
    fn append_to(&self, out: &mut Vec<u8>) {
        let len = out.len();
        out.extend_from_slice(&self.buf);
        out.truncate(len + self.len);
    }
}

/// [`encode_window`] through serde alone, as it was written before (to test the hand-written
/// encodings against).
#[cfg(test)]
fn encode_window_serde(calendar: &Calendar, row_index: i64, slot: u16, w: &Window, out: &mut Vec<u8>) {
    let start = calendar.start_of(row_index * calendar.slots() + i64::from(slot));
    let updated = w.updated_at.saturating_sub(start);
    let s = &w.stats;
    let stored = match &s.sketch {
        super::sketch::Sketch::Exact(values) if s.count == 1 => {
            StoredWindowRef::One { slot, ts: s.first.0 - start, value: values[0], updated, revision: w.revision }
        }
        super::sketch::Sketch::Exact(values) if values.len() as u64 == s.count => {
            let index_of = |(ts, v): (i64, f64)| {
                let i = values.iter().position(|x| x.to_bits() == v.to_bits()).unwrap_or(0);
                (ts - start, i as u8)
            };
            StoredWindowRef::Few {
                slot,
                values,
                first: index_of(s.first),
                last: index_of(s.last),
                updated,
                revision: w.revision,
            }
        }
        _ => StoredWindowRef::Many { slot, stats: s, updated, revision: w.revision },
    };
    *out = postcard::to_extend(&stored, std::mem::take(out)).unwrap();
}

/// Decodes a stored row into its windows.
pub fn decode_row(calendar: &Calendar, row_index: i64, data: &[u8]) -> Result<Vec<(u16, Window)>, String> {
    let mut windows = Vec::new();
    decode_row_each(calendar, row_index, data, |slot, window| {
        windows.push((slot, window));
        true
    })?;
    Ok(windows)
}

/// [`decode_row`] handing each window to `each` as it is decoded, until `each` says stop
/// (false): a read of many rows then moves no window through lists.
pub fn decode_row_each(
    calendar: &Calendar,
    row_index: i64,
    data: &[u8],
    mut each: impl FnMut(u16, Window) -> bool,
) -> Result<(), String> {
    let slots = calendar.slots();
    let mut previous: Option<u16> = None;
    let mut rest = data;
    while !rest.is_empty() {
        let (w, after) = postcard::take_from_bytes::<StoredWindow>(rest).map_err(|e| e.to_string())?;
        rest = after;
        let (slot, window) = match w {
            StoredWindow::One { slot, ts, value, updated, revision } => {
                let start = calendar.start_of(row_index * slots + i64::from(slot));
                (slot, Window::new(Stats::of(start + ts, value), revision, start + updated))
            }
            StoredWindow::Few { slot, values, first, last, updated, revision } => {
                let start = calendar.start_of(row_index * slots + i64::from(slot));
                let (Some(v0), Some(fv), Some(lv)) =
                    (values.first(), values.get(first.1 as usize), values.get(last.1 as usize))
                else {
                    return Err(format!("slot {slot}: a window without its values"));
                };
                let mut stats = Stats::of(0, *v0);
                for v in &values[1..] {
                    stats.add(0, *v);
                }
                stats.first = (start + first.0, *fv);
                stats.last = (start + last.0, *lv);
                (slot, Window::new(stats, revision, start + updated))
            }
            StoredWindow::Many { slot, stats, updated, revision } => {
                let start = calendar.start_of(row_index * slots + i64::from(slot));
                (slot, Window::new(stats, revision, start + updated))
            }
        };
        if i64::from(slot) >= slots {
            return Err(format!("slot {slot} out of range"));
        }
        // The row's slot bitmap counts on sorted, distinct slots.
        if previous.is_some_and(|previous| previous >= slot) {
            return Err(format!("slot {slot} out of order"));
        }
        previous = Some(slot);
        if !each(slot, window) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(op: &mut WindowOperator, conn: &mut Connection) {
        let encoded = op.encode_dirty();
        write(op, conn, &encoded);
        op.committed(&encoded);
    }

    fn write(op: &WindowOperator, conn: &mut Connection, encoded: &EncodedRows) {
        let tx = conn.transaction().unwrap();
        op.write(&tx, encoded).unwrap();
        tx.commit().unwrap();
    }

    fn stored_rows(conn: &Connection) -> Vec<(i64, i64, i64, Vec<u8>)> {
        // A row's parts in order make the whole row, whatever was sealed when.
        let mut stmt =
            conn.prepare("SELECT size, series, row, data FROM windows ORDER BY size, series, row, part").unwrap();
        let parts = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, Vec<u8>>(3)?))).unwrap();
        let mut rows: Vec<(i64, i64, i64, Vec<u8>)> = Vec::new();
        for (size, series, row, data) in parts.map(Result::unwrap) {
            match rows.last_mut() {
                Some(last) if (last.0, last.1, last.2) == (size, series, row) => last.3.extend(data),
                _ => rows.push((size, series, row, data)),
            }
        }
        rows
    }

    /// Live data in order with late readings mixed in (into sealed windows, into empty slots
    /// among them, into an older row): committing and sealing every block gives the rows an
    /// operator that never committed (never sealed) has, byte for byte.
    #[test]
    fn sealed_windows_are_read_back_for_late_data_to_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut sealing = crate::store::open_write(&dir.path().join("a.db")).unwrap();
        let mut whole = crate::store::open_write(&dir.path().join("b.db")).unwrap();
        let calendar = Calendar::fixed(10_000);
        let mut a = WindowOperator::open(calendar.clone(), &sealing).unwrap();
        let mut b = WindowOperator::open(calendar.clone(), &whole).unwrap();
        assert!(a.has_reader());
        // c commits as a replay does (`Pipeline::commit_behind`): each commit is written only
        // after the next chunk has folded, which reads rows back through the unwritten commit.
        let mut behind = crate::store::open_write(&dir.path().join("c.db")).unwrap();
        let mut c = WindowOperator::open(calendar.clone(), &behind).unwrap();
        let mut unwritten: Option<std::sync::Arc<EncodedRows>> = None;
        let base = 1_764_547_200_000i64; // a row boundary: 20-minute rows of 10 s windows
        assert_eq!(calendar.bucket(base).0.rem_euclid(calendar.slots()), 0);
        let mut points = Vec::new();
        for i in 0..6_000i64 {
            // Two sensors, one reading a second each, 50 minutes: three rows (and late data in
            // the row before).
            let ts = base + i / 2 * 1_000 + (i % 2) * 7;
            let mut p =
                Point { series: (i % 2) as u32, ts, value: (i % 97) as f64 * 0.5, received_at: ts + 50, block: 0 };
            if i % 37 == 5 && i > 400 {
                p.ts -= 400_000 + (i % 5) * 1_000; // 7 minutes late: a sealed window
                p.value = 1e308;
            }
            if i % 13 == 1 {
                p.ts -= 35_000; // a few windows back: they stay open
            }
            if i % 101 == 3 && i > 1_500 {
                p.ts = base + 3_001 + (i % 11) * 13_000 + 3; // a window of the first row, some empty
            }
            points.push(p);
        }
        for (n, chunk) in points.chunks_mut(40).enumerate() {
            for p in chunk.iter_mut() {
                p.block = n as u64;
                a.add(&sealing, p).unwrap();
                b.add(&whole, p).unwrap();
                c.add(&behind, p).unwrap();
            }
            commit(&mut a, &mut sealing);
            if let Some(rows) = unwritten.take() {
                write(&c, &mut behind, &rows);
                c.set_writing(None);
            }
            let rows = std::sync::Arc::new(c.encode_dirty());
            c.committed(&rows);
            c.set_writing(Some(rows.clone()));
            unwritten = Some(rows);
            // The newest row of each sensor holds its open windows only: the last few, as far
            // back as readings arrived (35 s, 4 windows), but not the 7 minutes of late data.
            for series in 0..2 {
                let newest = a.stored_max[&series];
                let row = &a.rows[&(series, newest)];
                assert!(row.windows.len() <= 6, "{} windows", row.windows.len());
            }
        }
        assert!(a.rows.values().any(|r| r.sealed_below > 0));
        // The row before the newest (minutes 20-40), its windows all closed, has left memory:
        // the late readings that landed in it after it had left read it back and were kept.
        for series in 0..2 {
            let newest = a.stored_max[&series];
            assert!(!a.rows.contains_key(&(series, newest - 1)), "series {series}: the row before the newest stayed");
        }
        // A few parts per row, however often commits came.
        let parts: Vec<i64> = sealing
            .prepare("SELECT count(*) FROM windows GROUP BY size, series, row")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(parts.iter().any(|n| *n > 1) && parts.iter().all(|n| *n <= 5), "parts per row: {parts:?}");
        commit(&mut b, &mut whole);
        assert_eq!(stored_rows(&sealing), stored_rows(&whole));
        assert_eq!(stored_rows(&sealing).len(), 8);
        write(&c, &mut behind, &unwritten.unwrap());
        assert_eq!(stored_rows(&behind), stored_rows(&whole));
    }

    /// The hand-written encodings of `One` and `Few` windows are postcard's bytes, for times
    /// and values of every size and sign.
    #[test]
    fn hand_written_encodings_are_postcards_bytes() {
        let calendar = Calendar::fixed(10_000);
        let row_index = 1_764_547_200_000i64 / 10_000 / calendar.slots();
        let values = [0.0, -0.0, 1.5, -2.25e300, f64::MAX, f64::MIN_POSITIVE, 5e-324, 21.7, -1e-7, 1e308];
        let offsets = [0i64, 1, 63, 64, 127, 128, 8_191, 8_192, 9_999, -1, -64, -65, -1_000_000, 1 << 40];
        let (mut hand, mut serde) = (Vec::new(), Vec::new());
        let mut n = 0;
        for slot in [0u16, 1, 127, 128, 119] {
            let start = calendar.start_of(row_index * calendar.slots() + i64::from(slot));
            for (i, dt) in offsets.iter().enumerate() {
                for count in 1..=17usize {
                    let ts = start + dt;
                    let mut stats = Stats::of(ts, values[i % values.len()]);
                    for k in 1..count {
                        let at = ts + offsets[(i + k) % offsets.len()] % 10_000;
                        stats.add(at, values[(i + k * 3) % values.len()]);
                    }
                    for revision in [0u32, 1, 300, u32::MAX] {
                        let updated = start + offsets[(i + 5) % offsets.len()] * 7;
                        let w = Window::new(stats.clone(), revision, updated);
                        let before = hand.len();
                        encode_window(&calendar, row_index, slot, &w, &mut hand);
                        encode_window_serde(&calendar, row_index, slot, &w, &mut serde);
                        assert_eq!(hand[before..], serde[before..], "slot {slot}, {count} values, revision {revision}");
                        n += 1;
                    }
                }
            }
        }
        assert_eq!(hand, serde);
        assert!(n > 1_000);
    }

    #[test]
    fn rows_round_trip_bit_for_bit() {
        let calendar = Calendar::fixed(60_000);
        let base = 1_764_547_200_000i64;
        let (index, ..) = calendar.bucket(base);
        let row_index = index.div_euclid(calendar.slots());
        let row_start = calendar.start_of(row_index * calendar.slots());
        let mut windows = Vec::new();
        // one reading, a few, many
        windows.push((0, Window::new(Stats::of(row_start + 5, 21.5), 0, row_start + 100)));
        let mut few = Stats::of(row_start + 60_000 + 10, 1.0);
        few.add(row_start + 60_000 + 5, 2.0);
        few.add(row_start + 60_000 + 50, 1e308);
        windows.push((1, Window::new(few, 2, row_start + 999_999)));
        let mut many = Stats::of(row_start + 120_000, 0.5);
        for i in 0..100 {
            many.add(row_start + 120_000 + i, f64::from(i as u32) * 0.1);
        }
        windows.push((2, Window::new(many, 0, row_start + 130_000)));
        // Made out of order, written by slot.
        windows.swap(0, 2);
        let row = Row::of(windows, calendar.slots());
        let mut buf = Vec::new();
        encode_row(&calendar, row_index, &row, &mut buf);
        let decoded = decode_row(&calendar, row_index, &buf).unwrap();
        assert_eq!(decoded, row.in_order().map(|w| (w.slot, w.window())).collect::<Vec<_>>());
        assert_eq!(decoded.iter().map(|(slot, _)| *slot).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(decode_row(&calendar, row_index, &buf[..buf.len() / 2]).is_err());
    }

    /// A window held as its one reading and then given more (up to a sketch of buckets) has the
    /// statistics, revision and bytes of a full window folded the same way, for extremes too.
    #[test]
    fn a_window_of_one_reading_grows_into_the_full_windows_bits() {
        let calendar = Calendar::fixed(10_000);
        let row_index = 1_764_547_200_000i64 / 10_000 / calendar.slots();
        let slot = 7u16;
        let start = calendar.start_of(row_index * calendar.slots() + i64::from(slot));
        let end = start + 10_000;
        let values = [1e308, -1e308, 0.0, -0.0, 21.5, f64::MAX, -f64::MAX, 5e-324, 1e-300, 3.25];
        for first in values {
            // (ts, value, received_at, block): on time, then late (received after the end) in
            // two blocks, with event times before and after the first.
            let mut readings = vec![(start + 5_000, first, start + 5_100, 1u64)];
            for (i, v) in values.iter().cycle().take(40).enumerate() {
                let i = i as i64;
                let ts = start + (i * 977) % 10_000;
                let received = if i < 3 { start + 6_000 + i } else { end + 3_600_000 + i };
                readings.push((ts, *v, received, if i < 3 { 1 } else { 2 + (i as u64) / 7 }));
            }
            let (ts, v, received, block) = readings[0];
            let mut held = Held::new(slot, ts, v, received, block);
            let mut full = Window::new(Stats::of(ts, v), 0, received);
            full.bumped_by = block;
            for (n, &(ts, v, received, block)) in readings.iter().enumerate() {
                if n > 0 {
                    let heap = held.heap_bytes();
                    let grown = held.add(ts, v, received, block, end);
                    assert!(held.heap_bytes() <= heap + grown);
                    full.stats.add(ts, v);
                    full.updated_at = full.updated_at.max(received);
                    if received >= end && full.bumped_by != block {
                        full.revision += 1;
                        full.bumped_by = block;
                    }
                }
                assert_eq!(held.stats.is_none(), n < 2);
                let w = held.window();
                // Bit for bit (PartialEq on f64 would take -0.0 for 0.0).
                assert_eq!(format!("{w:?}"), format!("{full:?}"), "after {} readings", n + 1);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                encode_held(&calendar, row_index, &held, &mut a);
                encode_window_serde(&calendar, row_index, slot, &full, &mut b);
                assert_eq!(a, b, "after {} readings", n + 1);
                // Read back from those bytes, it is held the same way again.
                let decoded = decode_row(&calendar, row_index, &a).unwrap();
                let again = Held::of(decoded[0].0, decoded[0].1.clone());
                assert_eq!(again.stats.is_none(), n == 0);
                assert_eq!(format!("{:?}", again.window().stats), format!("{:?}", full.stats));
            }
            assert!(matches!(held.stats.as_ref().unwrap().sketch, super::super::sketch::Sketch::Buckets(_)));
            assert_eq!(held.revision, 6);
        }
        assert!(std::mem::size_of::<Held>() <= 64, "{} bytes", std::mem::size_of::<Held>());
    }

    /// Staged readings are folded a sensor's after another's, each sensor's in log order, the
    /// quarantined left out.
    #[test]
    fn staged_readings_are_ordered_by_sensor_keeping_log_order() {
        let series = [3u32, 0, 3, 7, 0, 3, 7, 1];
        let staged: Vec<super::super::Staged> = series
            .iter()
            .enumerate()
            .map(|(i, s)| super::super::Staged {
                point: Point { series: *s, ts: i as i64, value: 0.0, received_at: 0, block: 0 },
                offset: i as u64,
                quarantine: (i == 4).then_some("future"),
            })
            .collect();
        let (points, runs) = by_series(&staged);
        assert_eq!(points.iter().map(|p| p.ts).collect::<Vec<_>>(), [1, 7, 0, 2, 5, 3, 6]);
        assert_eq!(points.iter().map(|p| p.series).collect::<Vec<_>>(), [0, 1, 3, 3, 3, 7, 7]);
        assert_eq!(runs, [0, 1, 2, 5]);
        let (points, runs) = by_series(&[]);
        assert!(points.is_empty() && runs.is_empty());
    }

    /// Rows found through the dense index by series stay where the hash map says they are while
    /// rows come and go (a removed row's place is taken by the last one).
    #[test]
    fn rows_are_found_by_key_while_rows_come_and_go() {
        let mut rows = Rows::default();
        let mut model: std::collections::HashMap<(u32, i64), usize> = Default::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut random = move |n: u64| rng.u64(..n);
        for step in 0..20_000usize {
            let key = (random(40) as u32, random(6) as i64);
            match random(4) {
                0 => {
                    if let Some(row) = rows.remove(&key) {
                        assert_eq!(Some(row.held), model.remove(&key), "step {step}");
                    }
                }
                1 => rows.retain(|k, _| (k.0 as usize + k.1 as usize + step) % 7 != 0),
                _ => match rows.find(key) {
                    Some(at) => rows.used(key, at),
                    None => {
                        let row = Row { held: step, ..Row::new(60, 0) };
                        let at = rows.insert(key, row);
                        rows.used(key, at);
                        model.insert(key, step);
                    }
                },
            }
            model.retain(|k, _| rows.contains_key(k));
            assert_eq!(rows.len(), model.len());
            for (k, held) in &model {
                assert_eq!(rows.get(k).map(|r| r.held), Some(*held), "step {step}, {k:?}");
            }
            for (i, (k, _)) in rows.list.iter().enumerate() {
                assert_eq!(rows.index[k] as usize, i);
                assert_eq!(rows.find(*k), Some(i));
            }
        }
    }

    /// Staged readings of many sensors, folded a sensor's after another's (with the rows of the
    /// next sensors fetched ahead) and committed now and then, give the rows that adding them one
    /// by one in log order gives, late readings and quarantined ones among them.
    #[test]
    fn staged_readings_fold_to_the_rows_of_log_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut staged_conn = crate::store::open_write(&dir.path().join("a.db")).unwrap();
        let mut each_conn = crate::store::open_write(&dir.path().join("b.db")).unwrap();
        let calendar = Calendar::fixed(10_000);
        let mut staged_op = WindowOperator::open(calendar.clone(), &staged_conn).unwrap();
        let mut each_op = WindowOperator::open(calendar.clone(), &each_conn).unwrap();
        let base = 1_764_547_200_000i64;
        let mut rng = fastrand::Rng::with_seed(99);
        let mut random = move |n: u64| rng.u64(..n);
        for batch in 0..60u64 {
            let mut staged = Vec::new();
            for i in 0..500u64 {
                // 50 sensors, a reading every ~25 s each, 4 senders' worth of disorder.
                let now = base + (batch * 500 + i) as i64 * 500;
                let mut ts = now - random(40_000) as i64;
                if random(40) == 0 && batch > 20 {
                    ts -= 3_600_000 + random(3_600_000) as i64; // late: sealed windows, old rows
                }
                let value = match random(7) {
                    0 => 1e308,
                    1 => -0.0,
                    _ => random(1000) as f64 * 0.5,
                };
                let point = Point { series: random(50) as u32, ts, value, received_at: now, block: batch };
                let quarantine = (random(100) == 0).then_some("future");
                if quarantine.is_none() {
                    each_op.add(&each_conn, &point).unwrap();
                }
                staged.push(super::super::Staged { point, offset: i, quarantine });
            }
            staged_op.add_batch(Some(&staged_conn), &BySeries::of(&staged)).unwrap();
            if batch % 4 == 3 {
                commit(&mut staged_op, &mut staged_conn);
                commit(&mut each_op, &mut each_conn);
            }
        }
        commit(&mut staged_op, &mut staged_conn);
        commit(&mut each_op, &mut each_conn);
        let rows = stored_rows(&staged_conn);
        assert!(rows.len() > 100, "{} rows", rows.len());
        assert_eq!(rows, stored_rows(&each_conn));
    }

    /// Two readings held as such are written as the `Few` window their statistics make, whatever
    /// the order of their event times (before, tied, after) and values (equal bits or not).
    #[test]
    fn a_window_of_two_readings_is_written_as_its_statistics() {
        let calendar = Calendar::fixed(60_000);
        let row_index = 1_764_547_200_000i64 / 60_000 / calendar.slots();
        for slot in [0u16, 59] {
            let start = calendar.start_of(row_index * calendar.slots() + i64::from(slot));
            for (t0, t1) in [(10, 20), (20, 10), (15, 15), (0, 59_999), (-3_600_000, 7)] {
                for (v0, v1) in [(1.0, 2.0), (2.0, 1.0), (5.5, 5.5), (0.0, -0.0), (1e308, -1e308), (-1e308, -1e308)] {
                    let mut held = Held::new(slot, start + t0, v0, start + 100, 4);
                    held.add(start + t1, v1, start + 7_200_000, 9, start + 60_000);
                    assert!(held.stats.is_none());
                    let mut stats = Stats::of(start + t0, v0);
                    stats.add(start + t1, v1);
                    let full = Window { stats, revision: 1, updated_at: start + 7_200_000, bumped_by: 9 };
                    assert_eq!(format!("{:?}", held.window()), format!("{full:?}"));
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    encode_held(&calendar, row_index, &held, &mut a);
                    encode_window_serde(&calendar, row_index, slot, &full, &mut b);
                    assert_eq!(a, b, "{t0} {t1} {v0} {v1}");
                }
            }
        }
    }

    /// The operator's stored rows, with commits, seals and late readings read back into sealed
    /// windows (most windows one reading, some many, extremes among them), are the rows of plain
    /// full windows folded reading by reading in log order.
    #[test]
    fn rows_are_those_of_full_windows_folded_in_log_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_write(&dir.path().join("a.db")).unwrap();
        let calendar = Calendar::fixed(10_000);
        let mut op = WindowOperator::open(calendar.clone(), &conn).unwrap();
        let base = 1_764_547_200_000i64;
        let mut truth: std::collections::BTreeMap<(u32, i64), Window> = Default::default();
        let mut state = 12345u64;
        let mut random = move |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut late = 0;
        for block in 0..400u64 {
            for i in 0..30 {
                let series = random(5) as u32;
                // Readings every ~10 s per sensor over 2 h, some in the same 10 s window.
                let now = base + block as i64 * 18_000 + i * 600;
                let mut ts = now - random(4_000) as i64;
                if series == 3 {
                    ts = now - now % 60_000 + 1 + random(3) as i64; // a minute of readings in a window
                }
                if random(50) == 0 && block > 100 {
                    ts -= 3_600_000 + random(3_600_000) as i64; // 1-2 h late: sealed windows
                    late += 1;
                }
                let value = match random(9) {
                    0 => 1e308,
                    1 => -1e308,
                    2 => -0.0,
                    _ => random(1000) as f64 * 0.25 - 100.0,
                };
                let p = Point { series, ts, value, received_at: now, block };
                op.add(&conn, &p).unwrap();
                let (index, _, end) = calendar.bucket(ts);
                match truth.entry((series, index)) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        let mut w = Window::new(Stats::of(ts, value), 0, now);
                        w.bumped_by = block;
                        e.insert(w);
                    }
                    std::collections::btree_map::Entry::Occupied(mut e) => {
                        let w = e.get_mut();
                        w.stats.add(ts, value);
                        w.updated_at = w.updated_at.max(now);
                        if now >= end && w.bumped_by != block {
                            w.revision += 1;
                            w.bumped_by = block;
                        }
                    }
                }
            }
            if block % 3 == 2 {
                commit(&mut op, &mut conn);
                truth.values_mut().for_each(|w| w.bumped_by = NOT_BUMPED);
            }
        }
        commit(&mut op, &mut conn);
        assert!(late > 30, "{late} late readings");
        assert!(truth.values().any(|w| w.revision > 0));
        assert!(truth.values().any(|w| w.stats.count > 16), "a window with buckets");
        let slots = calendar.slots();
        let mut expected: Vec<(i64, i64, i64, Vec<u8>)> = Vec::new();
        for ((series, index), w) in &truth {
            let (row, slot) = (index.div_euclid(slots), index.rem_euclid(slots) as u16);
            let key = (calendar.code(), i64::from(*series), row);
            if expected.last().is_none_or(|last| (last.0, last.1, last.2) != key) {
                expected.push((key.0, key.1, key.2, Vec::new()));
            }
            encode_window_serde(&calendar, row, slot, w, &mut expected.last_mut().unwrap().3);
        }
        assert_eq!(stored_rows(&conn), expected);
    }
}
