//! Exactly once: the log drops what it has seen by (agent, epoch, sequence range) and records
//! what an agent never sent.

mod common;

use common::{Aggregator, T0, gap_rows, handshake, log_totals, postcard_batch, steady};

#[test]
fn a_resent_batch_is_acked_as_duplicates_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let batch = postcard_batch("gw-1", 7, &[(0, &steady("room1/temp", T0, 10)), (10, &steady("room2/temp", T0, 6))]);
    let first = agg.ingest_ok(0, &batch);
    assert_eq!(first, serde_json::json!({"accepted": 16, "duplicates": 0, "next_seq": 16, "missing": 0}));
    let again = agg.ingest_ok(0, &batch);
    assert_eq!(again, serde_json::json!({"accepted": 0, "duplicates": 16, "next_seq": 16, "missing": 0}));
    agg.wait_processed();
    assert_eq!(log_totals(&agg.data_dir), (2, 16));
    let (_, sensor) = agg.get_json("/api/v1/sensors/room1%2Ftemp");
    assert_eq!(sensor["count"], 10);
    assert_eq!(agg.metric("tributary_ingest_readings_total{result=\"duplicate\"}"), 16.0);
    // Another epoch of the same agent (a new spool) starts its own sequence.
    let fresh = agg.ingest_ok(0, &postcard_batch("gw-1", 8, &[(0, &steady("room1/temp", T0, 3))]));
    assert_eq!(fresh["accepted"], 3);
}

#[test]
fn a_straddling_block_keeps_only_its_new_tail() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &steady("s/a", T0, 4))]));
    // seq 2..8: 2 and 3 are known, 4..8 are new; values 100.. mark the resent block.
    let resent: Vec<_> = (0..6).map(|i| ("s/a", T0 + 10_000 + i * 1000, 100.0 + i as f64)).collect();
    let ack = agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(2, &resent)]));
    assert_eq!(ack, serde_json::json!({"accepted": 4, "duplicates": 2, "next_seq": 8, "missing": 0}));
    agg.wait_processed();
    assert_eq!(log_totals(&agg.data_dir), (2, 8));
    let (_, sensor) = agg.get_json("/api/v1/sensors/s%2Fa");
    assert_eq!(sensor["count"], 8);
    assert_eq!(sensor["last_value"], 105.0);
    let (_, windows) = agg.get_json("/api/v1/sensors/s%2Fa/windows");
    // Kept: 0,1,2,3 from the first block and 102..105 from the tail.
    assert_eq!(windows[0]["min"], 0.0);
    assert_eq!(windows[0]["max"], 105.0);
    assert_eq!(windows[0]["mean"], (6.0 + 102.0 + 103.0 + 104.0 + 105.0) / 8.0);
}

#[test]
fn skipped_sequence_numbers_are_recorded_as_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &steady("s/a", T0, 5))]));
    let ack = agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(12, &steady("s/a", T0 + 60_000, 3))]));
    assert_eq!(ack, serde_json::json!({"accepted": 3, "duplicates": 0, "next_seq": 15, "missing": 7}));
    assert_eq!(agg.metric("tributary_ingest_gap_readings_total"), 7.0);
    let conn =
        rusqlite::Connection::open_with_flags(agg.data_dir.join("log.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let gap: (String, i64, i64, i64) = conn
        .query_row("SELECT agent_id, epoch, from_seq, to_seq FROM gaps", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap();
    assert_eq!(gap, ("gw-1".to_string(), 1, 5, 12));
}

#[test]
fn a_late_block_fills_the_gap_it_was_recorded_as() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(10, &steady("s/a", T0 + 10_000, 5))]));
    assert_eq!(gap_rows(&agg.data_dir, "gw-1", 1), [(0, 10)]);
    // 3..6 arrives late: the gap is split, and both halves stay recorded.
    let ack = agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(3, &steady("s/a", T0 + 3_000, 3))]));
    assert_eq!(ack, serde_json::json!({"accepted": 3, "duplicates": 0, "next_seq": 15, "missing": 7}));
    assert_eq!(gap_rows(&agg.data_dir, "gw-1", 1), [(0, 3), (6, 10)]);
    let ack = agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &steady("s/a", T0, 12))]));
    assert_eq!(ack, serde_json::json!({"accepted": 7, "duplicates": 5, "next_seq": 15, "missing": 0}));
    assert_eq!(gap_rows(&agg.data_dir, "gw-1", 1), []);
    assert_eq!(log_totals(&agg.data_dir), (4, 15));
    agg.wait_processed();
    let (_, sensor) = agg.get_json("/api/v1/sensors/s%2Fa");
    assert_eq!(sensor["count"], 15);
}

#[test]
fn an_empty_batch_answers_the_mark_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let unknown = agg.ingest_ok(0, &handshake("gw-1", 9));
    assert_eq!(unknown, serde_json::json!({"accepted": 0, "duplicates": 0, "next_seq": 0, "missing": 0}));
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &steady("s/a", T0, 10)), (20, &steady("s/a", T0, 10))]));
    let wal = agg.data_dir.join("log.db-wal");
    let wal_before = std::fs::read(&wal).unwrap();
    let known = agg.ingest_ok(0, &handshake("gw-1", 1));
    assert_eq!(known, serde_json::json!({"accepted": 0, "duplicates": 0, "next_seq": 30, "missing": 10}));
    // JSON clients can shake hands too.
    let json =
        agg.ingest(Some(common::AGENTS[0].1), "application/json", br#"{"agent_id":"gw-1","epoch":1,"blocks":[]}"#);
    assert_eq!(json.json()["next_seq"], 30);
    assert_eq!(agg.ingest_ok(0, &handshake("gw-1", 9))["next_seq"], 0);
    assert_eq!(std::fs::read(&wal).unwrap(), wal_before, "a handshake wrote to the log");
    assert_eq!(log_totals(&agg.data_dir), (2, 20));
    let conn =
        rusqlite::Connection::open_with_flags(agg.data_dir.join("log.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let epochs: Vec<i64> = conn
        .prepare("SELECT epoch FROM agent_sequences")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(epochs, [1], "a handshake for an unknown epoch left a row");
}

#[test]
fn json_batches_are_logged_like_postcard_ones() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let body = format!(
        r#"{{"agent_id":"gw-2","epoch":3,"blocks":[{{"first_seq":0,"readings":[{{"sensor":"j/t","ts":{T0},"value":2.5}},{{"sensor":"j/t","ts":{},"value":3.5}}]}}]}}"#,
        T0 + 1000
    );
    let response = agg.ingest(Some(common::AGENTS[1].1), "application/json", body.as_bytes());
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), serde_json::json!({"accepted": 2, "duplicates": 0, "next_seq": 2, "missing": 0}));
    let again = agg.ingest(Some(common::AGENTS[1].1), "application/json; charset=utf-8", body.as_bytes());
    assert_eq!(again.json()["duplicates"], 2);
    agg.wait_processed();
    let (_, sensor) = agg.get_json("/api/v1/sensors/j%2Ft");
    assert_eq!((sensor["count"].as_u64(), sensor["last_value"].as_f64()), (Some(2), Some(3.5)));
}
