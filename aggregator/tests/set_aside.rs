//! Bad blocks in the log cost themselves, never the rest: a block that does not decode, fails
//! validation or whose count lies is set aside and listed; a block the store refuses is narrowed
//! down and set aside; a store that refuses everything makes the processor report a stall, sets
//! nothing aside, and recovers when the store does.
//!
//! SQLite triggers on `store.db` stand in for what cannot be made on demand here: a block that
//! makes the store fail (`refusing_trigger` on one sensor) and a store that cannot commit at all
//! (disk full, file locked: `refusing_trigger` on every offset write).

mod common;

use std::time::{Duration, Instant};

use common::{Aggregator, Readings, T0, postcard_batch};
use rusqlite::Connection;
use serde_json::Value;

/// Block `b` of the tests: 10 readings of two sensors.
fn block_readings(b: usize) -> Vec<(&'static str, i64, f64)> {
    (0..10).map(|i| (["c/a", "c/b"][i % 2], T0 + (b * 10 + i) as i64 * 1000, (b * 10 + i) as f64)).collect()
}

/// Polls `check` every 50 ms for up to 30 s.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn counts(agg: &Aggregator) -> Vec<(String, u64)> {
    let (_, sensors) = agg.get_json("/api/v1/sensors");
    sensors
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().into(), s["count"].as_u64().unwrap()))
        .collect()
}

fn set_aside(agg: &Aggregator) -> Vec<Value> {
    let (status, list) = agg.get_json("/api/v1/set-aside");
    assert_eq!(status, 200, "{list}");
    list.as_array().unwrap().clone()
}

/// A trigger that makes every write matching `when` on `table` fail with `message`.
fn refusing_trigger(store: &Connection, name: &str, event: &str, table: &str, when: &str, message: &str) {
    store
        .execute_batch(&format!(
            "CREATE TRIGGER {name} BEFORE {event} ON {table} WHEN {when} BEGIN SELECT RAISE(ABORT, '{message}'); END;"
        ))
        .unwrap();
}

fn open_store(agg_dir: &std::path::Path) -> Connection {
    let conn = Connection::open(agg_dir.join("store.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

#[test]
fn corrupt_log_blocks_are_set_aside_and_every_other_reading_is_processed() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    for b in 0..6 {
        agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(b as u64 * 10, &block_readings(b))]));
    }
    agg.wait_processed();
    let data_dir = agg.data_dir.clone();
    agg.kill();

    // Corrupt three blocks while the aggregator is stopped, then rebuild the store from the log.
    let log = Connection::open(data_dir.join("log.db")).unwrap();
    // Block 1's bytes: garbage.
    log.execute("UPDATE blocks SET data = X'01DEADBEEF' WHERE first_offset = 10", []).unwrap();
    // Block 2's count lies (25, not 10): trusting it would skip blocks 3 and 4.
    log.execute("UPDATE blocks SET count = 25 WHERE first_offset = 20", []).unwrap();
    // Block 4's last value becomes NaN (little-endian f64 bits at the end of the uncompressed block).
    log.execute(
        "UPDATE blocks SET data = CAST(substr(data, 1, length(data) - 8) || X'000000000000F87F' AS BLOB) \
         WHERE first_offset = 40",
        [],
    )
    .unwrap();
    drop(log);
    for file in ["store.db", "store.db-wal", "store.db-shm"] {
        let _ = std::fs::remove_file(data_dir.join(file));
    }

    let agg = Aggregator::start(dir.path());
    agg.wait_processed();
    // Blocks 0, 3 and 5 are processed; 1, 2 and 4 are set aside.
    assert_eq!(counts(&agg), [("c/a".to_string(), 15), ("c/b".to_string(), 15)]);
    let list = set_aside(&agg);
    let offsets: Vec<u64> = list.iter().map(|b| b["first_offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, [10, 20, 40], "{list:#?}");
    for (block, reason) in
        list.iter().zip(["does not decode", "count says 25 readings, the block holds 10", "not a finite number"])
    {
        assert!(block["reason"].as_str().unwrap().contains(reason), "{block}");
        assert_eq!(block["agent"], "gw-1");
        assert!(block["set_aside_at"].as_i64().unwrap() > T0 - 86_400_000 * 365);
    }
    assert_eq!(list[1]["count"], 25, "the count as the log claims it");
    assert_eq!(agg.metric("tributary_processor_set_aside_blocks_total"), 3.0);
    assert_eq!(agg.metric("tributary_processor_set_aside_readings_total"), 45.0);
    assert_eq!(agg.get("/healthz").status, 200);

    // New data goes on; a restart keeps the list and the counts, and counts nothing twice.
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(60, &block_readings(6))]));
    agg.wait_processed();
    agg.kill();
    let agg = Aggregator::start(dir.path());
    agg.wait_processed();
    assert_eq!(counts(&agg), [("c/a".to_string(), 20), ("c/b".to_string(), 20)]);
    assert_eq!(set_aside(&agg), list);
    assert_eq!(agg.metric("tributary_processor_set_aside_blocks_total"), 3.0);
}

#[test]
fn a_block_the_store_refuses_is_narrowed_down_and_set_aside_alone() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let data_dir = agg.data_dir.clone();
    agg.kill();
    refusing_trigger(
        &open_store(&data_dir),
        "refuse_poison",
        "INSERT",
        "series",
        "NEW.name = 'poison'",
        "refused by the test trigger",
    );

    let agg = Aggregator::start(dir.path());
    // 40 blocks of 5 readings in one request, so the processor meets them in one step; block 23
    // holds the poison.
    let blocks: Vec<Vec<(&str, i64, f64)>> = (0..40)
        .map(|b| {
            (0..5)
                .map(|i| (if b == 23 && i == 2 { "poison" } else { "good" }, T0 + (b * 5 + i) as i64 * 1000, 1.0))
                .collect()
        })
        .collect();
    let batch: Vec<(u64, Readings<'_>)> = blocks.iter().enumerate().map(|(b, r)| (b as u64 * 5, &r[..])).collect();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &batch));
    agg.wait_processed();

    assert_eq!(counts(&agg), [("good".to_string(), 39 * 5)], "every other block is processed");
    let list = set_aside(&agg);
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!((list[0]["first_offset"].as_u64(), list[0]["count"].as_u64()), (Some(115), Some(5)));
    assert!(list[0]["reason"].as_str().unwrap().contains("refused by the test trigger"), "{}", list[0]);
    assert!(agg.metric("tributary_processor_step_failures_total") >= 2.0);
    assert_eq!(agg.metric("tributary_processor_stalled"), 0.0);
    assert_eq!(agg.get("/healthz").status, 200);
}

#[test]
fn a_store_that_refuses_every_commit_is_reported_stalled_until_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let data_dir = agg.data_dir.clone();
    agg.kill();
    let store = open_store(&data_dir);
    for event in ["INSERT", "UPDATE"] {
        let name = format!("refuse_{}", event.to_lowercase());
        refusing_trigger(&store, &name, event, "processor_offsets", "1", "no space left (test trigger)");
    }

    let agg = Aggregator::start(dir.path());
    for b in 0..3 {
        agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(b as u64 * 10, &block_readings(b))]));
    }
    let reason = eventually("/healthz to report the stall", || {
        let health = agg.get("/healthz");
        (health.status == 503).then(|| health.text())
    });
    assert!(reason.starts_with("processor stalled at offset 0 for "), "{reason}");
    assert!(reason.contains("no space left (test trigger)"), "{reason}");
    assert_eq!(agg.metric("tributary_processor_stalled"), 1.0);
    assert_eq!(agg.metric("tributary_processor_lag_readings"), 30.0);
    assert!(agg.metric("tributary_processor_step_failures_total") >= 2.0);
    assert!(set_aside(&agg).is_empty(), "good blocks are never set aside because the store fails");
    assert_eq!(agg.get("/api/v1/sensors").json(), serde_json::json!([]), "reads still work");

    store.execute_batch("DROP TRIGGER refuse_insert; DROP TRIGGER refuse_update;").unwrap();
    eventually("/healthz to recover", || (agg.get("/healthz").status == 200).then_some(()));
    agg.wait_processed();
    assert_eq!(counts(&agg), [("c/a".to_string(), 15), ("c/b".to_string(), 15)]);
    assert!(set_aside(&agg).is_empty());
    assert_eq!(agg.metric("tributary_processor_stalled"), 0.0);
    assert_eq!(agg.metric("tributary_processor_lag_readings"), 0.0);
}
