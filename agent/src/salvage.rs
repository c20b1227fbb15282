//! A damaged spool, repaired: the file is moved aside, every block that can still be read and
//! decoded goes into a fresh spool under its own epoch and sequence numbers, and the agent goes on
//! with the fresh file at once.
//!
//! Keeping the epoch and the numbers is what makes this exactly-once: a salvaged block the
//! aggregator already holds (acknowledged, its deletion lost with the damage) is dropped there as a
//! duplicate, and what could not be salvaged leaves a hole in the numbers, which the aggregator
//! records as a gap, as long as the highest number the file held can still be read. Numbers given
//! out after the salvage are checked against the aggregator's mark first, so they never collide
//! with lost ones that had reached it. Only when the spool's own `meta` table is unreadable does
//! the fresh file get a new epoch, and then a salvaged block the aggregator already had can arrive
//! twice.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};
use tributary_shared::Block;

use crate::spool::{SPOOL_FILE, SpoolError};

/// What a salvage did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Salvaged {
    /// Where the damaged file went (`spool.db.damaged-<ms>`, with its `-wal`).
    pub damaged: PathBuf,
    /// The epoch kept, if the damaged file's `meta` could be read.
    pub epoch: Option<u64>,
    pub blocks: u64,
    pub readings: u64,
    /// Blocks read but not decodable (their readings are known), and why reading stopped early.
    pub lost_blocks: u64,
    pub lost_readings: u64,
    pub unreadable: Option<String>,
    /// Whether the highest sequence number the damaged file held could be read: then every lost
    /// reading is a gap the aggregator records; else readings after the last one read may be lost
    /// without a trace (counted as unknown).
    pub end_known: bool,
}

/// Why the spool file at `path` cannot be used as it is, if it cannot: it does not open as a
/// database, or `PRAGMA quick_check` finds damage.
pub fn damage(path: &Path) -> Option<String> {
    let conn =
        match Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX) {
            Ok(conn) => conn,
            Err(e) => return Some(e.to_string()),
        };
    let report: Result<Vec<String>, rusqlite::Error> = conn
        .prepare("PRAGMA quick_check(10)")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get::<_, String>(0))?.collect());
    match report {
        Ok(lines) if lines == ["ok"] => None,
        Ok(lines) => Some(lines.join("; ")),
        Err(e) => Some(e.to_string()),
    }
}

/// Moves the spool of `dir` aside and writes a fresh one holding what could be read from it. The
/// caller holds the spool's lock.
pub(crate) fn salvage_locked(dir: &Path, now_ms: i64) -> Result<Salvaged, SpoolError> {
    let path = dir.join(SPOOL_FILE);
    let damaged = dir.join(format!("{SPOOL_FILE}.damaged-{now_ms}"));
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", damaged.display()));
            std::fs::rename(&from, &to)
                .map_err(|source| SpoolError::CreateDir { path: to.display().to_string(), source })?;
        }
    }
    pad_to_header_size(&damaged);
    let mut report = Salvaged { damaged: damaged.clone(), ..Salvaged::default() };
    let mut meta = Meta::default();
    let mut good: Vec<(i64, i64, Vec<u8>)> = Vec::new();
    let mut dead: Vec<(i64, i64, Vec<u8>, String, i64)> = Vec::new();
    match Connection::open_with_flags(&damaged, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX) {
        Ok(old) => {
            meta = Meta::read(&old);
            if let Err(e) = read_blocks(&old, &mut good, &mut report, &mut meta) {
                report.unreadable = Some(e.to_string());
            }
            report.end_known = meta.end_known;
            // Dead letters are worth keeping too, but never at the price of the salvage.
            let _ = read_dead_letters(&old, &mut dead);
        }
        Err(e) => report.unreadable = Some(e.to_string()),
    }
    report.epoch = meta.epoch.map(|e| e as u64);

    let conn =
        Connection::open(&path).map_err(|source| SpoolError::Open { path: path.display().to_string(), source })?;
    let write = || -> rusqlite::Result<()> {
        conn.pragma_update(None, "page_size", 1024)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
        crate::spool::create_tables(&conn)?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        if let Some(epoch) = meta.epoch {
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?1)", [epoch])?;
        }
        // No number is ever given out twice: past everything the damaged file shows.
        let next_seq = good
            .iter()
            .map(|(first, count, _)| first + count)
            .chain(meta.next_seq)
            .chain(meta.lost_end)
            .max()
            .unwrap_or(0);
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?1)", [next_seq])?;
        // New numbers are checked against the aggregator's mark before they are sent: if the
        // lost part of the file had numbers past `next_seq` that reached the aggregator, the
        // forwarder renumbers past them instead of colliding.
        let unverified = meta.unverified_from.unwrap_or(next_seq).min(next_seq);
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('unverified_from', ?1)", [unverified])?;
        for (first, count, data) in &good {
            conn.execute(
                "INSERT INTO blocks (first_seq, count, data) VALUES (?1, ?2, ?3)",
                params![first, count, data],
            )?;
        }
        // What is known lost: the numbers between the blocks read back, and after the last of them
        // up to the highest the damaged file shows. Before the first, readings may as well have
        // been delivered and deleted; the aggregator's holes tell.
        let mut expected: Option<i64> = None;
        let ends = good.iter().map(|(first, count, _)| (*first, first + count));
        for (first, end) in ends.chain(meta.lost_end.map(|end| (end, end))) {
            if let Some(from) = expected.filter(|from| *from < first) {
                conn.execute(
                    "INSERT OR REPLACE INTO gap_reports (from_seq, to_seq, readings, first_ts, last_ts, sensors,
                     sensor_count, reason, recorded_at) VALUES (?1, ?2, ?3, NULL, NULL, '[]', 0, 'corrupt_spool', ?4)",
                    params![from, first, first - from, now_ms],
                )?;
            }
            expected = Some(expected.map_or(end, |e| e.max(end)));
        }
        for (first, count, data, reason, at) in &dead {
            conn.execute(
                "INSERT INTO dead_letters (first_seq, count, data, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![first, count, data, reason, at],
            )?;
        }
        conn.execute_batch("COMMIT")
    };
    write().map_err(|source| SpoolError::Open { path: path.display().to_string(), source })?;
    Ok(report)
}

/// Takes the spool's lock, then [`salvage_locked`]: `tributary-agent spool salvage`.
pub fn salvage(dir: &Path) -> Result<Salvaged, SpoolError> {
    let path = dir.join(SPOOL_FILE);
    if !path.exists() {
        return Err(SpoolError::NotFound { path: path.display().to_string() });
    }
    let _lock = crate::spool::lock_dir(dir)?;
    salvage_locked(dir, crate::spool::now_ms())
}

/// A file cut short is refused whole by SQLite (its header names more pages than there are):
/// padded with zeros to that size, the pages that are left read again, and the missing ones are
/// just damaged pages.
fn pad_to_header_size(path: &Path) {
    use std::io::Read;
    let Ok(mut file) = std::fs::OpenOptions::new().read(true).write(true).open(path) else { return };
    let mut header = [0u8; 100];
    if file.read_exact(&mut header).is_err() || &header[..16] != b"SQLite format 3\0" {
        return;
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    let pages = u64::from(u32::from_be_bytes([header[28], header[29], header[30], header[31]]));
    let want = page_size * pages;
    if file.metadata().is_ok_and(|m| m.len() < want) && want <= 1 << 40 {
        let _ = file.set_len(want);
    }
}

#[derive(Debug, Default)]
struct Meta {
    epoch: Option<i64>,
    next_seq: Option<i64>,
    unverified_from: Option<i64>,
    /// The end of the last block read, decodable or not.
    lost_end: Option<i64>,
    /// Whether the highest number the file holds could be read (then every loss is a gap).
    end_known: bool,
}

impl Meta {
    fn read(conn: &Connection) -> Meta {
        let value = |key: &str| -> Option<i64> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).ok()
        };
        Meta {
            epoch: value("epoch"),
            next_seq: value("next_seq").max(value("acked_seq")),
            unverified_from: value("unverified_from"),
            lost_end: None,
            end_known: false,
        }
    }
}

/// Every block that reads and decodes, in order. Where a damaged page stops the scan, it seeks
/// past it (each seek starts from the B-tree's root, so an intact leaf further on still reads),
/// by growing steps up to the highest number the file holds.
fn read_blocks(
    old: &Connection,
    good: &mut Vec<(i64, i64, Vec<u8>)>,
    report: &mut Salvaged,
    meta: &mut Meta,
) -> rusqlite::Result<()> {
    // The last row by key: one walk down the B-tree's right edge (`max(first_seq + count)` would
    // scan every row, and stop at the damage).
    let end: Option<i64> =
        old.query_row("SELECT first_seq + count FROM blocks ORDER BY first_seq DESC LIMIT 1", [], |r| r.get(0)).ok();
    meta.lost_end = meta.lost_end.max(end);
    meta.end_known = end.is_some();
    let mut from = i64::MIN;
    loop {
        let mut last = None;
        match scan(old, from, good, report, meta, &mut last) {
            Ok(()) => return Ok(()),
            Err(error) => {
                let (Some(end), Some(resume)) = (end, last.map(|l: i64| l + 1).or(Some(from.max(0)))) else {
                    return Err(error);
                };
                report.unreadable.get_or_insert_with(|| error.to_string());
                let mut step = 1i64;
                let next = loop {
                    let probe = resume.saturating_add(step);
                    if probe >= end {
                        break None;
                    }
                    let found: rusqlite::Result<Option<i64>> = old
                        .query_row(
                            "SELECT first_seq FROM blocks WHERE first_seq >= ?1 ORDER BY first_seq LIMIT 1",
                            [probe],
                            |r| r.get(0),
                        )
                        .map(Some)
                        .or_else(|e| if matches!(e, rusqlite::Error::QueryReturnedNoRows) { Ok(None) } else { Err(e) });
                    match found {
                        Ok(Some(key)) => break Some(key),
                        Ok(None) => break None,
                        Err(_) => step = step.saturating_mul(2),
                    }
                };
                match next {
                    Some(key) => from = key,
                    None => return Ok(()),
                }
            }
        }
    }
}

/// Reads blocks from `from` on in key order until the end or the first error; `last` is the last
/// key read.
fn scan(
    old: &Connection,
    from: i64,
    good: &mut Vec<(i64, i64, Vec<u8>)>,
    report: &mut Salvaged,
    meta: &mut Meta,
    last: &mut Option<i64>,
) -> rusqlite::Result<()> {
    let mut stmt = old.prepare("SELECT first_seq, count, data FROM blocks WHERE first_seq >= ?1 ORDER BY first_seq")?;
    let mut rows = stmt.query([from])?;
    while let Some(row) = rows.next()? {
        let (first, count, data): (i64, i64, Vec<u8>) = (row.get(0)?, row.get(1)?, row.get(2)?);
        *last = Some(first);
        meta.lost_end = meta.lost_end.max(Some(first.saturating_add(count)));
        let sound = Block::decode(&data).ok().filter(|b| b.validate().is_ok() && b.len() as i64 == count && count > 0);
        if sound.is_some() {
            report.blocks += 1;
            report.readings += count as u64;
            good.push((first, count, data));
        } else {
            report.lost_blocks += 1;
            report.lost_readings += count.max(0) as u64;
        }
    }
    Ok(())
}

fn read_dead_letters(old: &Connection, dead: &mut Vec<(i64, i64, Vec<u8>, String, i64)>) -> rusqlite::Result<()> {
    let mut stmt = old.prepare("SELECT first_seq, count, data, reason, at_ms FROM dead_letters ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        dead.push((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?));
    }
    Ok(())
}
