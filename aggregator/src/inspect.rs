//! Reading the log from the command line (`tributary-aggregator log inspect|tail|stats`), like
//! kcat for a Kafka topic.
//!
//! Everything here opens `log.db` read-only: in WAL mode a reader never blocks the running
//! aggregator's writer, and the writer never blocks a reader. Blocks are read in pages of
//! [`PAGE_BLOCKS`] by offset, so memory stays bounded on a log of any size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::GlobMatcher;
use rusqlite::{Connection, OpenFlags, params};
use tributary_shared::BlockDecoder;

/// Blocks fetched per query.
const PAGE_BLOCKS: i64 = 256;

/// How often `tail --follow` looks for new blocks.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no log at {path}: is data_dir in the config right, and has the aggregator run there once? ({source})")]
    NoLog { path: PathBuf, source: rusqlite::Error },
    #[error("reading the log {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("writing the output: {0}")]
    Output(std::io::Error),
    #[error(
        "offsets {from}..{first} were dropped by log retention ([log] retain); the log starts at offset {first}: \
         ask from there (--from-offset {first})"
    )]
    Dropped { from: u64, first: u64 },
}

/// How readings are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One line of `key=value` fields per reading.
    #[default]
    Text,
    /// One JSON object per line.
    Jsonl,
}

/// Which readings to print. Offsets are the log's reading offsets; `until_offset` is exclusive.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sensor: Option<GlobMatcher>,
    pub agent: Option<String>,
    pub from_offset: u64,
    pub until_offset: Option<u64>,
    /// Only readings received at or after this Unix time in ms.
    pub since_ms: Option<i64>,
}

impl Filter {
    fn block_matches(&self, block: &BlockRow) -> bool {
        self.agent.as_ref().is_none_or(|a| *a == block.agent_id) && self.since_ms.is_none_or(|s| block.received_at >= s)
    }

    fn reading_matches(&self, offset: u64, sensor: &str) -> bool {
        offset >= self.from_offset
            && self.until_offset.is_none_or(|u| offset < u)
            && self.sensor.as_ref().is_none_or(|g| g.is_match(sensor))
    }
}

/// Parses `--since`: an RFC 3339 time, or a duration (`10m`, `2h 30m`) back from `now_ms`.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        return Ok(ts.as_millisecond());
    }
    match humantime::parse_duration(text) {
        Ok(d) => Ok(now_ms.saturating_sub(d.as_millis().min(i64::MAX as u128) as i64)),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2026-01-31T12:00:00Z) nor a duration back from now (10m, 2h)"
        )),
    }
}

/// Opens `data_dir/log.db` read-only; a missing file is an error, not an empty new log.
pub fn open_log(data_dir: &Path) -> Result<LogFile, InspectError> {
    let path = data_dir.join("log.db");
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .and_then(|conn| {
            // Opening is lazy: a file that is not a log (or not there) shows on the first query.
            conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'blocks'", [], |r| r.get::<_, i64>(0))
                .and_then(|n| if n == 1 { Ok(conn) } else { Err(rusqlite::Error::QueryReturnedNoRows) })
        })
        .map_err(|source| InspectError::NoLog { path: path.clone(), source })?;
    Ok(LogFile { conn, path })
}

/// A read-only connection to a log.
pub struct LogFile {
    conn: Connection,
    path: PathBuf,
}

struct BlockRow {
    first_offset: u64,
    count: u64,
    agent_id: String,
    epoch: i64,
    first_seq: u64,
    received_at: i64,
    data: Vec<u8>,
}

/// One printed line: a reading, or a block that does not decode.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Reading { offset: u64, agent: String, epoch: i64, seq: u64, sensor: String, ts: i64, value: f64, received_at: i64 },
    Damaged { offset: u64, count: u64, agent: String, reason: String },
}

impl LogFile {
    fn sqlite(&self, source: rusqlite::Error) -> InspectError {
        InspectError::Sqlite { path: self.path.clone(), source }
    }

    /// The offset the next appended reading will get.
    pub fn end_offset(&self) -> Result<u64, InspectError> {
        let end: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(first_offset + count), 0) FROM blocks", [], |r| r.get(0))
            .map_err(|e| self.sqlite(e))?;
        Ok(end.max(0) as u64)
    }

    /// Blocks holding offsets from `from` on (the block containing `from` included), in offset
    /// order, at most [`PAGE_BLOCKS`].
    fn page_from(&self, from: u64) -> Result<Vec<BlockRow>, InspectError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT first_offset, count, agent_id, epoch, first_seq, received_at, data FROM blocks
                 WHERE first_offset >= COALESCE((SELECT MAX(first_offset) FROM blocks WHERE first_offset <= ?1), 0)
                 ORDER BY first_offset LIMIT ?2",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = stmt.query_map(params![from.min(i64::MAX as u64) as i64, PAGE_BLOCKS], block_row);
        rows.and_then(|rows| rows.collect::<Result<Vec<_>, _>>()).map_err(|e| self.sqlite(e))
    }

    /// Blocks starting below `before`, newest first, at most [`PAGE_BLOCKS`].
    fn page_before(&self, before: u64) -> Result<Vec<BlockRow>, InspectError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT first_offset, count, agent_id, epoch, first_seq, received_at, data FROM blocks
                 WHERE first_offset < ?1 ORDER BY first_offset DESC LIMIT ?2",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = stmt.query_map(params![before.min(i64::MAX as u64) as i64, PAGE_BLOCKS], block_row);
        rows.and_then(|rows| rows.collect::<Result<Vec<_>, _>>()).map_err(|e| self.sqlite(e))
    }

    /// Calls `emit` with each matching line from `filter.from_offset` on, in offset order, until
    /// `limit` readings (0: no limit) or the end of the log. Returns the offset after the last
    /// block looked at (where a follower continues).
    pub fn scan(
        &self,
        filter: &Filter,
        limit: u64,
        emit: &mut dyn FnMut(&Line) -> Result<(), InspectError>,
    ) -> Result<u64, InspectError> {
        let mut decoder = BlockDecoder::default();
        let mut next = filter.from_offset;
        let mut printed = 0u64;
        loop {
            let page = self.page_from(next)?;
            for block in &page {
                if filter.until_offset.is_some_and(|u| block.first_offset >= u) {
                    return Ok(next);
                }
                // The page starts with the block holding `next`, which may be done already.
                if block.first_offset + block.count <= next {
                    continue;
                }
                for line in block_lines(&mut decoder, block, filter) {
                    if limit > 0 && printed >= limit {
                        return Ok(next);
                    }
                    if matches!(line, Line::Reading { .. }) {
                        printed += 1;
                    }
                    emit(&line)?;
                }
                next = next.max(block.first_offset + block.count);
            }
            if page.len() < PAGE_BLOCKS as usize {
                return Ok(next);
            }
        }
    }

    /// The last `n` matching lines (damaged blocks count as none), oldest first.
    pub fn last(&self, filter: &Filter, n: u64) -> Result<Vec<Line>, InspectError> {
        let mut decoder = BlockDecoder::default();
        let mut newest_first: Vec<Line> = Vec::new();
        let mut readings = 0u64;
        let mut before = filter.until_offset.unwrap_or(u64::MAX);
        while readings < n {
            let page = self.page_before(before)?;
            if page.is_empty() {
                break;
            }
            for block in &page {
                before = block.first_offset;
                if block.first_offset + block.count <= filter.from_offset {
                    before = 0;
                    break;
                }
                for line in block_lines(&mut decoder, block, filter).into_iter().rev() {
                    if readings >= n {
                        break;
                    }
                    if matches!(line, Line::Reading { .. }) {
                        readings += 1;
                    }
                    newest_first.push(line);
                }
                if readings >= n {
                    break;
                }
            }
            if before == 0 {
                break;
            }
        }
        newest_first.reverse();
        Ok(newest_first)
    }

    /// The figures `log stats` prints, from the blocks table without decoding blocks.
    /// Readings dropped by retention, and the end of the dropped prefix (0 when none was).
    pub fn dropped(&self) -> Result<(u64, u64), InspectError> {
        // A log from before retention existed has no such table: nothing was dropped.
        self.conn
            .query_row("SELECT COALESCE(SUM(readings), 0), COALESCE(MAX(end_offset), 0) FROM dropped", [], |r| {
                Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, i64>(1)?.max(0) as u64))
            })
            .or_else(|e| match e {
                rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => Ok((0, 0)),
                e => Err(InspectError::Sqlite { path: self.path.clone(), source: e }),
            })
    }

    pub fn stats(&self) -> Result<LogStats, InspectError> {
        let (blocks, readings, first, end, data_bytes, oldest, newest) = self
            .conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(count), 0), MIN(first_offset), MAX(first_offset + count),
                        COALESCE(SUM(length(data)), 0), MIN(received_at), MAX(received_at) FROM blocks",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                    ))
                },
            )
            .map_err(|e| self.sqlite(e))?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT s.agent_id, s.epoch, s.next_seq,
                        (SELECT COUNT(*) FROM gaps g WHERE g.agent_id = s.agent_id AND g.epoch = s.epoch),
                        (SELECT COALESCE(SUM(g.to_seq - g.from_seq), 0) FROM gaps g
                          WHERE g.agent_id = s.agent_id AND g.epoch = s.epoch)
                 FROM agent_sequences s ORDER BY s.agent_id, s.epoch",
            )
            .map_err(|e| self.sqlite(e))?;
        let agents = stmt
            .query_map([], |r| {
                Ok(AgentEpoch {
                    agent: r.get(0)?,
                    epoch: r.get(1)?,
                    next_seq: r.get::<_, i64>(2)?.max(0) as u64,
                    holes: r.get::<_, i64>(3)?.max(0) as u64,
                    missing: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sqlite(e))?;
        let file_bytes = ["", "-wal"]
            .iter()
            .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", self.path.display())).ok())
            .map(|m| m.len())
            .sum();
        Ok(LogStats {
            first_offset: first.unwrap_or(0).max(0) as u64,
            end_offset: end.unwrap_or(0).max(0) as u64,
            blocks: blocks.max(0) as u64,
            readings: readings.max(0) as u64,
            data_bytes: data_bytes.max(0) as u64,
            file_bytes,
            oldest_received: oldest,
            newest_received: newest,
            agents,
        })
    }
}

fn block_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BlockRow> {
    Ok(BlockRow {
        first_offset: r.get::<_, i64>(0)?.max(0) as u64,
        count: r.get::<_, i64>(1)?.max(0) as u64,
        agent_id: r.get(2)?,
        epoch: r.get(3)?,
        first_seq: r.get::<_, i64>(4)?.max(0) as u64,
        received_at: r.get(5)?,
        data: r.get(6)?,
    })
}

/// The matching lines of one block; a block that does not decode (or whose reading count
/// disagrees with its row) is one `Damaged` line.
fn block_lines(decoder: &mut BlockDecoder, block: &BlockRow, filter: &Filter) -> Vec<Line> {
    if !filter.block_matches(block) {
        return Vec::new();
    }
    let damaged = |reason: String| {
        vec![Line::Damaged { offset: block.first_offset, count: block.count, agent: block.agent_id.clone(), reason }]
    };
    let view = match decoder.decode(&block.data) {
        Ok(view) => view,
        Err(error) => return damaged(error.to_string()),
    };
    if view.len() as u64 != block.count {
        return damaged(format!("it holds {} readings, its row says {}", view.len(), block.count));
    }
    let mut lines = Vec::new();
    for (i, entry) in view.entries.iter().enumerate() {
        let offset = block.first_offset + i as u64;
        // The decoder checked the index against the interned ids.
        let sensor = view.sensors.get(entry.sensor as usize).copied().unwrap_or("?");
        if filter.reading_matches(offset, sensor) {
            lines.push(Line::Reading {
                offset,
                agent: block.agent_id.clone(),
                epoch: block.epoch,
                seq: block.first_seq + i as u64,
                sensor: sensor.to_string(),
                ts: entry.ts,
                value: entry.value,
                received_at: block.received_at,
            });
        }
    }
    lines
}

/// Unix ms as RFC 3339 UTC (or the raw number, for a time out of range).
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| format!("{ms}ms"), |t| t.to_string())
}

/// Writes one line in the chosen format.
pub fn write_line(out: &mut dyn Write, line: &Line, format: Format) -> std::io::Result<()> {
    match (line, format) {
        (Line::Reading { offset, agent, epoch, seq, sensor, ts, value, received_at }, Format::Text) => writeln!(
            out,
            "offset={offset} agent={agent} epoch={epoch} seq={seq} sensor={sensor} time={} ts_ms={ts} value={value} \
             received_at={}",
            rfc3339(*ts),
            rfc3339(*received_at)
        ),
        (Line::Reading { offset, agent, epoch, seq, sensor, ts, value, received_at }, Format::Jsonl) => {
            let json = serde_json::json!({
                "offset": offset, "agent": agent, "epoch": epoch, "seq": seq, "sensor": sensor,
                "time": rfc3339(*ts), "ts_ms": ts, "value": value,
                "received_at": rfc3339(*received_at), "received_at_ms": received_at,
            });
            writeln!(out, "{json}")
        }
        (Line::Damaged { offset, count, agent, reason }, Format::Text) => {
            writeln!(out, "offset={offset} damaged block of {count} readings from agent={agent}: {reason}")
        }
        (Line::Damaged { offset, count, agent, reason }, Format::Jsonl) => {
            let json = serde_json::json!({"offset": offset, "damaged": reason, "count": count, "agent": agent});
            writeln!(out, "{json}")
        }
    }
}

/// `log inspect`: matching readings from `filter.from_offset` on, at most `limit` (0: all).
pub fn inspect(
    data_dir: &Path,
    filter: &Filter,
    limit: u64,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    let log = open_log(data_dir)?;
    let (_, dropped_end) = log.dropped()?;
    if filter.from_offset < dropped_end {
        return Err(InspectError::Dropped { from: filter.from_offset, first: dropped_end });
    }
    log.scan(filter, limit, &mut |line| write_line(out, line, format).map_err(InspectError::Output))?;
    out.flush().map_err(InspectError::Output)
}

/// `log tail`: the last `n` matching readings, then (with `follow`) new ones as they are
/// appended, until the process is stopped or the output is closed.
pub fn tail(
    data_dir: &Path,
    filter: &Filter,
    n: u64,
    follow: bool,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    let log = open_log(data_dir)?;
    // The end first: whatever is appended after it is printed by the follower, not lost between.
    let end = log.end_offset()?;
    let mut upto = filter.clone();
    upto.until_offset = Some(filter.until_offset.map_or(end, |u| u.min(end)));
    for line in log.last(&upto, n)? {
        write_line(out, &line, format).map_err(InspectError::Output)?;
    }
    out.flush().map_err(InspectError::Output)?;
    if !follow {
        return Ok(());
    }
    let mut next = end.max(filter.from_offset);
    loop {
        let mut from = filter.clone();
        from.from_offset = next;
        next = log.scan(&from, 0, &mut |line| write_line(out, line, format).map_err(InspectError::Output))?;
        out.flush().map_err(InspectError::Output)?;
        if filter.until_offset.is_some_and(|u| next >= u) {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// One (agent, epoch) as `log stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEpoch {
    pub agent: String,
    pub epoch: i64,
    /// One past the highest logged sequence number.
    pub next_seq: u64,
    pub holes: u64,
    pub missing: u64,
}

/// What `log stats` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStats {
    pub first_offset: u64,
    pub end_offset: u64,
    pub blocks: u64,
    pub readings: u64,
    /// Bytes of block data (encoded, compressed where it paid).
    pub data_bytes: u64,
    /// `log.db` plus its WAL on disk.
    pub file_bytes: u64,
    pub oldest_received: Option<i64>,
    pub newest_received: Option<i64>,
    pub agents: Vec<AgentEpoch>,
}

/// `log stats`.
pub fn stats(data_dir: &Path, out: &mut dyn Write) -> Result<(), InspectError> {
    let log = open_log(data_dir)?;
    let s = log.stats()?;
    let per_reading = |bytes: u64| if s.readings == 0 { 0.0 } else { bytes as f64 / s.readings as f64 };
    let time = |ms: Option<i64>| ms.map_or_else(|| "-".to_string(), rfc3339);
    let mut text = format!(
        "log: {}\noffsets: {}..{}\nblocks: {}\nreadings: {}\nbytes on disk: {} ({:.1} per reading; block data {} = {:.1} per reading)\n\
         oldest received: {}\nnewest received: {}\nagents: {}\n",
        log.path.display(),
        s.first_offset,
        s.end_offset,
        s.blocks,
        s.readings,
        s.file_bytes,
        per_reading(s.file_bytes),
        s.data_bytes,
        per_reading(s.data_bytes),
        time(s.oldest_received),
        time(s.newest_received),
        s.agents.len(),
    );
    let (dropped, dropped_end) = log.dropped()?;
    if dropped > 0 {
        text.push_str(&format!("dropped by retention: {dropped} readings, offsets 0..{dropped_end}\n"));
    }
    for a in &s.agents {
        let highest = a.next_seq.checked_sub(1).map_or_else(|| "-".to_string(), |h| h.to_string());
        text.push_str(&format!(
            "  agent={} epoch={} highest_seq={highest} holes={} missing={}\n",
            a.agent, a.epoch, a.holes, a.missing
        ));
    }
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(InspectError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_a_duration_back_from_now() {
        assert_eq!(parse_since("2026-01-31T12:00:00Z", 0), Ok(1_769_860_800_000));
        assert_eq!(parse_since("10m", 1_000_000), Ok(400_000));
        assert!(parse_since("yesterday-ish", 0).unwrap_err().contains("RFC 3339"));
    }
}
