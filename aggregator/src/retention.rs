//! Log retention (`[log] retain`): drops the oldest log blocks by age or by the log's size, and
//! records each dropped range in the log's `dropped` table.
//!
//! Only a prefix of the log goes, so the log stays one contiguous range of offsets; only blocks
//! the serving pipeline has committed, so retention never takes a reading out of the windows; and
//! never the newest block, whose end is where the next append's offset comes from. Deleted pages
//! are reused by later appends: the file stops growing rather than shrinking.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};

use crate::config::Retain;
use crate::log::LogError;
use crate::metrics::Metrics;

/// Blocks dropped per transaction at most (a big backlog goes in several, the writer between).
const BATCH_BLOCKS: i64 = 10_000;
/// Bytes a block row costs beyond its data (row header, key, agent id), for size retention.
const ROW_OVERHEAD: u64 = 48;

/// The running retention thread; dropping `stop` ends it.
pub struct Retention {
    pub stop: mpsc::Sender<()>,
    pub thread: JoinHandle<()>,
}

/// What one pass dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub first_offset: u64,
    pub end_offset: u64,
    pub blocks: u64,
    pub readings: u64,
}

/// How often retention looks: a tenth of the age kept, within bounds.
fn tick(retain: Retain) -> Duration {
    match retain {
        Retain::Age(age) => (age / 10).clamp(Duration::from_millis(100), Duration::from_secs(60)),
        Retain::Bytes(_) => Duration::from_secs(1),
    }
}

/// Starts dropping what `retain` no longer keeps from the log at `path`.
pub fn start(path: &Path, retain: Retain, metrics: Arc<Metrics>) -> Result<Retention, LogError> {
    let mut conn = crate::log::open_write(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("log-retention".into())
        .spawn(move || {
            let every = tick(retain);
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                // Committed by the serving pipeline: safe to drop up to there.
                let safe_end = metrics.processor_offset.get().max(0) as u64;
                loop {
                    match drop_old(&mut conn, retain, safe_end, crate::unix_ms()) {
                        Ok(Some(d)) => {
                            metrics.log_dropped_readings.inc_by(d.readings);
                            metrics.log_first_offset.set(d.end_offset as i64);
                            tracing::info!(
                                first_offset = d.first_offset,
                                end_offset = d.end_offset,
                                readings = d.readings,
                                "log retention dropped the oldest blocks"
                            );
                        }
                        Ok(None) => break,
                        Err(error) => {
                            // A busy file: the next tick tries again.
                            tracing::warn!(%error, "log retention failed; retrying");
                            break;
                        }
                    }
                }
            }
        })
        .map_err(LogError::Spawn)?;
    Ok(Retention { stop, thread })
}

/// Drops one batch of the oldest blocks that `retain` no longer keeps, ending at or before
/// `safe_end`; `None` when there is nothing (more) to drop.
pub fn drop_old(
    conn: &mut Connection,
    retain: Retain,
    safe_end: u64,
    now: i64,
) -> Result<Option<Dropped>, rusqlite::Error> {
    let newest: Option<i64> = conn.query_row("SELECT MAX(first_offset) FROM blocks", [], |r| r.get(0))?;
    let Some(newest) = newest else { return Ok(None) };
    let mut excess = match retain {
        Retain::Age(_) => 0,
        Retain::Bytes(limit) => {
            let used: i64 = conn.query_row(
                "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count(), pragma_freelist_count(), \
                 pragma_page_size()",
                [],
                |r| r.get(0),
            )?;
            let excess = (used.max(0) as u64).saturating_sub(limit);
            if excess == 0 {
                return Ok(None);
            }
            excess
        }
    };
    let horizon = match retain {
        Retain::Age(age) => now.saturating_sub(age.as_millis().min(i64::MAX as u128) as i64),
        Retain::Bytes(_) => i64::MAX,
    };
    let mut last: Option<(u64, u64, u64)> = None; // (first offset, end offset, blocks)
    let mut readings = 0u64;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT first_offset, count, received_at, length(data) FROM blocks ORDER BY first_offset LIMIT ?1",
        )?;
        let mut rows = stmt.query([BATCH_BLOCKS])?;
        while let Some(row) = rows.next()? {
            let (first, count, received_at, bytes): (i64, i64, i64, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            let end = (first + count).max(0) as u64;
            let kept_by_age = matches!(retain, Retain::Age(_)) && received_at >= horizon;
            let done_by_size = matches!(retain, Retain::Bytes(_)) && excess == 0;
            if first >= newest || end > safe_end || kept_by_age || done_by_size {
                break;
            }
            excess = excess.saturating_sub(bytes.max(0) as u64 + ROW_OVERHEAD);
            readings += count.max(0) as u64;
            last = Some(match last {
                Some((start, _, blocks)) => (start, end, blocks + 1),
                None => (first.max(0) as u64, end, 1),
            });
        }
    }
    let Some((first_offset, end_offset, blocks)) = last else { return Ok(None) };
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM blocks WHERE first_offset < ?1", [end_offset as i64])?;
    tx.execute(
        "INSERT INTO dropped (first_offset, end_offset, blocks, readings, dropped_at, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            first_offset as i64,
            end_offset as i64,
            blocks as i64,
            readings as i64,
            now,
            match retain {
                Retain::Age(_) => "age",
                Retain::Bytes(_) => "size",
            }
        ],
    )?;
    tx.commit()?;
    Ok(Some(Dropped { first_offset, end_offset, blocks, readings }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with_blocks(received_at: &[i64]) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::log::open_write(&dir.path().join("log.db")).unwrap();
        for (i, at) in received_at.iter().enumerate() {
            conn.execute(
                "INSERT INTO blocks (first_offset, count, agent_id, epoch, first_seq, received_at, data)
                 VALUES (?1, 10, 'gw', 1, ?1, ?2, zeroblob(1000))",
                params![i as i64 * 10, at],
            )
            .unwrap();
        }
        (dir, conn)
    }

    #[test]
    fn age_drops_a_prefix_up_to_what_the_pipeline_committed_never_the_newest_block() {
        let (_dir, mut conn) = log_with_blocks(&[100, 200, 300, 400, 500]);
        let age = Retain::Age(Duration::from_millis(250));
        // Committed up to offset 10: only the first block may go.
        assert_eq!(drop_old(&mut conn, age, 10, 600).unwrap().map(|d| d.end_offset), Some(10));
        assert_eq!(drop_old(&mut conn, age, 10, 600).unwrap(), None);
        // Everything committed, all old: all but the newest block.
        let d = drop_old(&mut conn, age, 50, 10_000).unwrap().unwrap();
        assert_eq!((d.first_offset, d.end_offset, d.blocks, d.readings), (10, 40, 3, 30));
        assert_eq!(drop_old(&mut conn, age, 50, 10_000).unwrap(), None);
        let ranges: i64 = conn.query_row("SELECT COUNT(*) FROM dropped", [], |r| r.get(0)).unwrap();
        assert_eq!(ranges, 2);
        assert_eq!(crate::log::end_offset(&conn).unwrap(), 50, "the end offset survives");
    }

    #[test]
    fn size_drops_the_oldest_until_the_log_fits() {
        let (_dir, mut conn) = log_with_blocks(&[0; 200]);
        let used = |c: &Connection| -> i64 {
            c.query_row(
                "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count(), pragma_freelist_count(), \
                 pragma_page_size()",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        let before = used(&conn);
        let limit = (before / 2) as u64;
        while drop_old(&mut conn, Retain::Bytes(limit), u64::MAX, 0).unwrap().is_some() {}
        assert!(used(&conn) as u64 <= limit + 8_192, "{} > {limit}", used(&conn));
        let first: i64 = conn.query_row("SELECT MIN(first_offset) FROM blocks", [], |r| r.get(0)).unwrap();
        assert!(first > 0 && first < 2_000, "a prefix went: the log starts at {first}");
    }
}
