//! Damaged files, made on purpose: a torn write at the log's tail recovers to the last complete
//! transaction with nothing acknowledged lost; a damaged or cut-short store is set aside and
//! rebuilt from the log; a damaged log stops the aggregator with the file and the recovery
//! command, never a panic.

mod common;

use std::io::Write;
use std::path::Path;

use common::{Aggregator, T0, log_totals, postcard_batch, run_with_config};

const BATCHES: u64 = 20;
const PER_BATCH: u64 = 500;

fn batch(n: u64) -> Vec<u8> {
    let readings: Vec<(&str, i64, f64)> = (0..PER_BATCH)
        .map(|i| {
            let k = n * PER_BATCH + i;
            (["d/a", "d/b"][(k % 2) as usize], T0 + k as i64 * 1_000, k as f64)
        })
        .collect();
    postcard_batch("gw-1", 1, &[(n * PER_BATCH, &readings)])
}

/// Readings counted in the 1-minute windows the API serves.
fn served(agg: &Aggregator) -> u64 {
    let (status, body) = agg.get_json("/api/v1/windows?sensor=d/*&size=1m");
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["windows"].as_array().unwrap())
        .map(|w| w["count"].as_u64().unwrap())
        .sum()
}

/// Loads every batch, waits until processed, and stops the aggregator as `how` says.
fn loaded(dir: &Path, sigkill: bool) {
    let agg = Aggregator::start(dir);
    for n in 0..BATCHES {
        agg.ingest_ok(0, &batch(n));
    }
    agg.wait_processed();
    if sigkill {
        agg.kill();
    } else {
        assert_eq!(agg.terminate().code(), Some(0));
    }
}

/// Moves everything in `path`'s WAL into the file itself, so that damage to the file is not
/// hidden behind newer copies of its pages in the WAL.
fn checkpoint(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
}

/// Overwrites `len` bytes of `path` at `at` with a pattern no SQLite page holds.
fn scribble(path: &Path, at: u64, len: usize) {
    checkpoint(path);
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&vec![0xA5; len]).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn a_torn_write_at_the_log_tail_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    loaded(dir.path(), true);
    let wal = dir.path().join("data/log.db-wal");
    let len = std::fs::metadata(&wal).expect("after a SIGKILL the log's WAL is still there").len();
    assert!(len > 0);
    // Half a frame of a transaction that was being written when the power went: a frame header
    // with a plausible page number and salt-less checksum, then part of a page.
    let mut file = std::fs::OpenOptions::new().append(true).open(&wal).unwrap();
    let mut torn = vec![0u8, 0, 0, 7, 0, 0, 0, 9];
    torn.extend(std::iter::repeat_n(0x5A, 1_500));
    file.write_all(&torn).unwrap();
    drop(file);

    let agg = Aggregator::start(dir.path());
    agg.wait_processed();
    assert_eq!(log_totals(&agg.data_dir).1 as u64, BATCHES * PER_BATCH);
    assert_eq!(served(&agg), BATCHES * PER_BATCH, "every acknowledged reading is served");
    // And the log goes on taking batches after the torn tail.
    agg.ingest_ok(0, &batch(BATCHES));
    agg.wait_processed();
    assert_eq!(served(&agg), (BATCHES + 1) * PER_BATCH);
}

#[test]
fn a_damaged_or_cut_short_store_is_set_aside_and_rebuilt_from_the_log() {
    for cut_short in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        loaded(dir.path(), false);
        let store = dir.path().join("data/store.db");
        checkpoint(&store);
        let len = std::fs::metadata(&store).unwrap().len();
        // The whole of the store's second page: its first page's tail can be free space, which
        // nothing reads.
        let page = tributary_aggregator::store::PAGE_SIZE as u64;
        assert!(len > 3 * page, "a store of several pages ({len} B)");
        if cut_short {
            std::fs::OpenOptions::new().write(true).open(&store).unwrap().set_len(len / 2).unwrap();
        } else {
            scribble(&store, page, page as usize);
        }

        let agg = Aggregator::start(dir.path());
        agg.wait_processed();
        assert_eq!(served(&agg), BATCHES * PER_BATCH, "rebuilt from the log (cut short: {cut_short})");
        let stderr = agg.stderr.lock().unwrap().clone();
        assert!(stderr.contains("damaged serving store set aside"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let aside: Vec<_> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("store.db.damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged file is kept for a look: {aside:?}");
    }
}

#[test]
fn a_store_of_an_older_layout_is_set_aside_and_rebuilt_with_the_same_answers() {
    // What an upgrade across a store layout change does (layout 6 made window rows 20 minutes
    // of 10 s windows): the old file is kept beside, the new one is computed from the log.
    let dir = tempfile::tempdir().unwrap();
    loaded(dir.path(), false);
    let answers = |agg: &Aggregator| {
        let windows: Vec<_> = ["10s", "1m", "1h"]
            .iter()
            .map(|size| agg.get_json(&format!("/api/v1/windows?sensor=d/*&size={size}")).1)
            .collect();
        windows
    };
    let before = {
        let agg = Aggregator::start(dir.path());
        agg.wait_processed();
        let answers = answers(&agg);
        assert_eq!(agg.terminate().code(), Some(0));
        answers
    };
    let store = dir.path().join("data/store.db");
    let conn = rusqlite::Connection::open(&store).unwrap();
    let layout: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    conn.pragma_update(None, "user_version", layout - 1).unwrap();
    drop(conn);

    let agg = Aggregator::start(dir.path());
    agg.wait_processed();
    assert_eq!(served(&agg), BATCHES * PER_BATCH);
    assert_eq!(answers(&agg), before, "the rebuilt store answers as the old one did");
    let stderr = agg.stderr.lock().unwrap().clone();
    assert!(stderr.contains("rebuilding it from the log"), "{stderr}");
    assert!(dir.path().join(format!("data/store.db.layout-{}", layout - 1)).exists(), "the old store is kept");
}

#[test]
fn a_damaged_log_stops_the_aggregator_with_the_file_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    loaded(dir.path(), false);
    let log = dir.path().join("data/log.db");
    scribble(&log, 4_096, 8_192);
    let (status, stderr, _) = run_with_config(dir.path(), &common::config_text(&dir.path().join("data")));
    assert!(!status.success());
    assert!(stderr.contains("log.db is damaged"), "{stderr}");
    assert!(stderr.contains("tributary-aggregator restore"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A file that is not a database at all, the same.
    std::fs::write(&log, b"this is not a database, it is a text file restored by mistake").unwrap();
    let (status, stderr, _) = run_with_config(dir.path(), &common::config_text(&dir.path().join("data")));
    assert!(!status.success());
    assert!(stderr.contains("log.db is damaged"), "{stderr}");
}
