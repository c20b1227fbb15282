//! Tumbling windows by event time: one operator per configured size, stored as rows.
//!
//! A row holds [`Calendar::slots`] consecutive windows of one sensor (20 minutes or more), so the
//! store writes a row per sensor and hour touched per commit, not a row per window, and a query
//! for a sensor-day reads a few rows (DESIGN.md, "The serving store: windows in blocks too").
//! Rows being written live in memory; a row not in memory is loaded only if the store can have
//! it (late data), which the operator knows from the highest row it stored per sensor.
//!
//! Late readings are never dropped: they update the window of their own event time, whose
//! `revision` counts the log blocks that changed it after it had closed.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::calendar::Calendar;
use super::stats::Stats;
use crate::store::StoreError;

/// Memory for rows kept after a commit, per operator. Each sensor's newest row stays whatever it
/// costs (live data lands there); older rows, kept for late data, leave least recently used first
/// once the total is over. A count of rows bounded nothing: a full row is 11 KB, and 4,096 of them
/// per window size were most of the aggregator's memory.
const KEEP_BYTES: usize = 8 << 20;

/// `Window::bumped_by` of a window no block has bumped since the last commit (no log offset is
/// this large); a plain u64 keeps a window 8 bytes smaller than an `Option`.
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

/// A row of up to [`Calendar::slots`] windows of one sensor.
#[derive(Debug, Clone)]
pub struct Row {
    /// (slot, window) in the order the windows were made. Senders' batches interleave, so a
    /// reading often makes a window before others of its row: kept sorted, each such window
    /// shifted the ones after it (a tenth of the fold's time went to that).
    windows: Vec<(u16, Window)>,
    /// `at[slot]` is 1 + the index in `windows` of the slot's window, 0 for none: a reading finds
    /// its window without a search (each probe of a search was a cache miss).
    at: Box<[u16]>,
    dirty: bool,
    /// The commit in which the row was last changed (for eviction).
    used: u64,
}

impl Row {
    fn new(slots: i64, capacity: usize) -> Row {
        let at = vec![0; slots as usize].into_boxed_slice();
        Row { windows: Vec::with_capacity(capacity), at, dirty: false, used: 0 }
    }

    /// A row of `windows` (distinct slots below `slots`, as [`decode_row`] checks).
    fn of(windows: Vec<(u16, Window)>, slots: i64) -> Row {
        let mut row = Row { windows, ..Row::new(slots, 0) };
        for (i, (slot, _)) in row.windows.iter().enumerate() {
            row.at[usize::from(*slot)] = i as u16 + 1;
        }
        row
    }

    /// What the row holds in memory, roughly (sketches that spilled to the heap not counted).
    fn bytes(&self) -> usize {
        std::mem::size_of::<Row>() + self.at.len() * 2 + self.windows.capacity() * std::mem::size_of::<(u16, Window)>()
    }

    /// The windows by slot.
    pub fn in_order(&self) -> Box<dyn Iterator<Item = &(u16, Window)> + '_> {
        // Usually made in slot order already (data in time order); else found through `at`,
        // a walk over every slot of the row.
        if self.windows.windows(2).all(|pair| pair[0].0 < pair[1].0) {
            Box::new(self.windows.iter())
        } else {
            Box::new(self.at.iter().filter(|i| **i != 0).map(|i| &self.windows[usize::from(*i) - 1]))
        }
    }
}

/// Rows encoded for a commit: (series, row) keys in order, and where each one's bytes end.
#[derive(Debug, Default)]
pub struct EncodedRows {
    keys: Vec<(u32, i64)>,
    ends: Vec<usize>,
    bytes: Vec<u8>,
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
    rows: FxHashMap<(u32, i64), Row>,
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
            rows: FxHashMap::default(),
            stored_max,
            commits: 0,
            grown: 0,
            width: Vec::new(),
            reader: crate::store::open_reader_beside(conn),
            last_bucket: (0, 0, 0),
        })
    }

    /// Whether the operator has a read connection of its own (to fold on another thread).
    pub fn has_reader(&self) -> bool {
        self.reader.is_some()
    }

    /// Adds the staged readings that are not quarantined, in order. Rows late data needs are
    /// read through the operator's own connection, else through `conn`.
    pub fn add_staged(&mut self, conn: Option<&Connection>, staged: &[super::Staged]) -> Result<(), StoreError> {
        let reader = self.reader.take();
        let result = match reader.as_ref().or(conn) {
            Some(conn) => staged.iter().filter(|s| !s.future).try_for_each(|s| self.add(conn, &s.point)),
            None => Err(StoreError::Corrupt("a window operator without a connection to the store".into())),
        };
        self.reader = reader;
        result
    }

    /// Adds one reading (in log order) to the window of its event time.
    pub fn add(&mut self, conn: &Connection, p: &Point) -> Result<(), StoreError> {
        let (index, start, end) = self.last_bucket;
        let (index, end) = if start <= p.ts && p.ts < end {
            (index, end)
        } else {
            self.last_bucket = self.calendar.bucket(p.ts);
            (self.last_bucket.0, self.last_bucket.2)
        };
        let slots = self.calendar.slots();
        let (row_index, slot) = (index.div_euclid(slots), index.rem_euclid(slots) as u16);
        let key = (p.series, row_index);
        // One hash lookup for a row in memory (the common case), a second only to insert.
        let row = match self.rows.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let row = match self.stored_max.get(&p.series) {
                    Some(max) if row_index <= *max => {
                        load_row(conn, self.calendar.code(), p.series, row_index, &self.calendar)?
                            .unwrap_or_else(|| Row::new(slots, 4))
                    }
                    _ => {
                        // As many windows as the sensor's rows have held: growing a row one
                        // window at a time was a tenth of the fold (reallocations).
                        let width = self.width.get(p.series as usize).copied().unwrap_or(0).max(4);
                        Row::new(slots, usize::from(width))
                    }
                };
                self.grown += row.bytes();
                entry.insert(row)
            }
        };
        row.dirty = true;
        row.used = self.commits;
        match row.at[usize::from(slot)] {
            at @ 1.. => {
                let w = &mut row.windows[usize::from(at) - 1].1;
                w.stats.add(p.ts, p.value);
                w.updated_at = w.updated_at.max(p.received_at);
                if p.received_at >= end && w.bumped_by != p.block {
                    w.revision += 1;
                    w.bumped_by = p.block;
                }
            }
            0 => {
                // A window that is new when its readings arrive after it closed was also made
                // by late data; it starts at revision 0 all the same: nothing was served before.
                let mut w = Window::new(Stats::of(p.ts, p.value), 0, p.received_at);
                // The rest of this block's readings for the window are part of its first version.
                w.bumped_by = p.block;
                let capacity = row.windows.capacity();
                row.windows.push((slot, w));
                self.grown += (row.windows.capacity() - capacity) * std::mem::size_of::<(u16, Window)>();
                let len = row.windows.len() as u16;
                row.at[usize::from(slot)] = len;
                let series = p.series as usize;
                if self.width.len() <= series {
                    self.width.resize(series + 1, 0);
                }
                self.width[series] = self.width[series].max(len);
            }
        }
        Ok(())
    }

    /// Encodes every changed row, in key order: the store's B-tree is then written front to
    /// back instead of at random pages. Needs no connection, so operators encode in parallel.
    pub fn encode_dirty(&self) -> EncodedRows {
        let mut keys: Vec<(u32, i64)> = self.rows.iter().filter(|(_, r)| r.dirty).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        // One buffer for all rows: an allocation per row, and its growth, were a third of it.
        let mut encoded = EncodedRows { ends: Vec::with_capacity(keys.len()), ..EncodedRows::default() };
        for key in keys {
            if let Some(row) = self.rows.get(&key) {
                encode_row(&self.calendar, key.1, row, &mut encoded.bytes);
                encoded.keys.push(key);
                encoded.ends.push(encoded.bytes.len());
            }
        }
        encoded
    }

    /// Writes rows [`WindowOperator::encode_dirty`] encoded (inside the caller's transaction).
    pub fn write(&self, tx: &Connection, encoded: &EncodedRows) -> Result<usize, StoreError> {
        let code = self.calendar.code();
        let mut stmt = tx.prepare_cached(
            "INSERT INTO windows (size, series, row, data) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (size, series, row) DO UPDATE SET data = excluded.data",
        )?;
        let mut start = 0;
        for ((series, row_index), end) in encoded.keys.iter().zip(&encoded.ends) {
            stmt.execute(params![code, *series as i64, *row_index, &encoded.bytes[start..*end]])?;
            start = *end;
        }
        Ok(encoded.keys.len())
    }

    /// After a successful commit: rows are clean, and rows untouched for a while leave memory.
    pub fn committed(&mut self) {
        let commits = self.commits;
        let mut bytes = 0;
        for ((series, row_index), row) in self.rows.iter_mut() {
            bytes += row.bytes();
            if row.dirty {
                row.dirty = false;
                let max = self.stored_max.entry(*series).or_insert(*row_index);
                *max = (*max).max(*row_index);
                // Only a row changed since the last commit can have a window bumped in it.
                for (_, w) in &mut row.windows {
                    w.bumped_by = NOT_BUMPED;
                }
            }
        }
        if bytes > KEEP_BYTES {
            // Keep each sensor's newest row (live data lands there) and the most recently used.
            let mut newest: HashMap<u32, i64> = HashMap::new();
            for (series, row_index) in self.rows.keys() {
                let e = newest.entry(*series).or_insert(*row_index);
                *e = (*e).max(*row_index);
            }
            let mut by_age: Vec<(u64, (u32, i64))> =
                self.rows.iter().filter(|(k, _)| newest.get(&k.0) != Some(&k.1)).map(|(k, r)| (r.used, *k)).collect();
            by_age.sort_unstable();
            let mut excess = bytes - KEEP_BYTES;
            for (_, key) in by_age {
                if excess == 0 {
                    break;
                }
                if let Some(row) = self.rows.remove(&key) {
                    excess = excess.saturating_sub(row.bytes());
                }
            }
        }
        self.commits = commits + 1;
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

    /// The window in memory that holds `ts` of `series`: (start, end, window).
    pub fn window_at(&self, series: u32, ts: i64) -> Option<(i64, i64, &Window)> {
        let (index, start, end) = self.calendar.bucket(ts);
        let slots = self.calendar.slots();
        let row = self.rows.get(&(series, index.div_euclid(slots)))?;
        let at = usize::from(row.at[index.rem_euclid(slots) as usize]);
        row.windows.get(at.checked_sub(1)?).map(|(_, w)| (start, end, w))
    }

    /// Rows in memory (for metrics).
    pub fn rows_in_memory(&self) -> usize {
        self.rows.len()
    }
}

/// Reads one stored row.
pub fn load_row(
    conn: &Connection,
    code: i64,
    series: u32,
    row_index: i64,
    calendar: &Calendar,
) -> Result<Option<Row>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT data FROM windows WHERE size = ?1 AND series = ?2 AND row = ?3")?;
    let data: Option<Vec<u8>> = stmt.query_row(params![code, series as i64, row_index], |r| r.get(0)).optional()?;
    match data {
        None => Ok(None),
        Some(data) => {
            decode_row(calendar, row_index, &data).map(|windows| Some(Row::of(windows, calendar.slots()))).map_err(
                |e| StoreError::Corrupt(format!("window row (size {code}, series {series}, row {row_index}): {e}")),
            )
        }
    }
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
/// postcard writes the same bytes without copying a window's values.
#[derive(Serialize)]
enum StoredWindowRef<'a> {
    One { slot: u16, ts: i64, value: f64, updated: i64, revision: u32 },
    Few { slot: u16, values: &'a [f64], first: (i64, u8), last: (i64, u8), updated: i64, revision: u32 },
    Many { slot: u16, stats: &'a Stats, updated: i64, revision: u32 },
}

fn encode_row(calendar: &Calendar, row_index: i64, row: &Row, out: &mut Vec<u8>) {
    let slots = calendar.slots();
    // Postcard writes a sequence as its length and then its items: written one by one into the
    // output, the bytes are those of the whole Vec, without collecting it first.
    let mut len = [0u8; 10];
    if let Ok(len) = postcard::to_slice(&row.windows.len(), &mut len) {
        out.extend_from_slice(len);
    }
    out.reserve(row.windows.len() * 24);
    for (slot, w) in row.in_order() {
        let stored = {
            let start = calendar.start_of(row_index * slots + i64::from(*slot));
            let updated = w.updated_at.saturating_sub(start);
            let s = &w.stats;
            match &s.sketch {
                super::sketch::Sketch::Exact(values) if s.count == 1 => StoredWindowRef::One {
                    slot: *slot,
                    ts: s.first.0 - start,
                    value: values[0],
                    updated,
                    revision: w.revision,
                },
                super::sketch::Sketch::Exact(values) if values.len() as u64 == s.count => {
                    let index_of = |(ts, v): (i64, f64)| {
                        let i = values.iter().position(|x| x.to_bits() == v.to_bits()).unwrap_or(0);
                        (ts - start, i as u8)
                    };
                    StoredWindowRef::Few {
                        slot: *slot,
                        values,
                        first: index_of(s.first),
                        last: index_of(s.last),
                        updated,
                        revision: w.revision,
                    }
                }
                _ => StoredWindowRef::Many { slot: *slot, stats: s, updated, revision: w.revision },
            }
        };
        // Serialising these types into a Vec cannot fail.
        if let Ok(bytes) = postcard::to_extend(&stored, std::mem::take(out)) {
            *out = bytes;
        }
    }
}

/// Decodes a stored row into its windows.
pub fn decode_row(calendar: &Calendar, row_index: i64, data: &[u8]) -> Result<Vec<(u16, Window)>, String> {
    let slots = calendar.slots();
    let stored: Vec<StoredWindow> = postcard::from_bytes(data).map_err(|e| e.to_string())?;
    let mut windows = Vec::with_capacity(stored.len());
    for w in stored {
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
        if windows.last().is_some_and(|(previous, _)| *previous >= slot) {
            return Err(format!("slot {slot} out of order"));
        }
        windows.push((slot, window));
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(decoded.iter().collect::<Vec<_>>(), row.in_order().collect::<Vec<_>>());
        assert_eq!(decoded.iter().map(|(slot, _)| *slot).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(decode_row(&calendar, row_index, &buf[..buf.len() / 2]).is_err());
    }
}
