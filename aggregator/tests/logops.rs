//! Operating the log from the command line: `log inspect|tail|stats` run as their own process
//! against the data directory of a running aggregator, and `backup`/`restore`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Aggregator, BIN, T0, postcard_batch};

/// Runs the binary with `args` and returns (success, stdout, stderr); it must exit within 20 s.
fn cli(args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let status = common::wait_exit(&mut child, Duration::from_secs(20), &format!("`{}`", args.join(" ")));
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.success(), reader.join().unwrap(), stderr)
}

/// `cli` that must succeed; its stdout lines.
fn cli_ok(args: &[&str]) -> Vec<String> {
    let (ok, stdout, stderr) = cli(args);
    assert!(ok, "`{}` failed: {stderr}", args.join(" "));
    stdout.lines().map(str::to_string).collect()
}

/// The lines without their `received_at` (the aggregator's clock), checked to be there.
fn without_received_at(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let (head, received) = l.split_once(" received_at=").unwrap_or_else(|| panic!("no received_at: {l}"));
            assert!(received.ends_with('Z'), "{l}");
            head.to_string()
        })
        .collect()
}

/// Five readings: gw-1 epoch 1 at offsets 0..3, then gw-2 epoch 2 at offsets 3..5.
fn ingest_known(agg: &Aggregator) {
    let gw1 = [("room1/temp", T0, 1.0), ("room2/temp", T0 + 1000, 2.0), ("room1/hum", T0 + 2000, 3.5)];
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &gw1)]));
    let gw2 = [("room1/temp", T0 + 3000, 4.0), ("hall/temp", T0 + 4000, -5.25)];
    agg.ingest_ok(1, &postcard_batch("gw-2", 2, &[(10, &gw2)]));
}

/// The expected text lines (up to `received_at`) for offsets of [`ingest_known`].
fn expected(offsets: &[usize]) -> Vec<String> {
    let all = [
        "offset=0 agent=gw-1 epoch=1 seq=0 sensor=room1/temp time=2025-11-24T16:00:00Z ts_ms=1764000000000 value=1",
        "offset=1 agent=gw-1 epoch=1 seq=1 sensor=room2/temp time=2025-11-24T16:00:01Z ts_ms=1764000001000 value=2",
        "offset=2 agent=gw-1 epoch=1 seq=2 sensor=room1/hum time=2025-11-24T16:00:02Z ts_ms=1764000002000 value=3.5",
        "offset=3 agent=gw-2 epoch=2 seq=10 sensor=room1/temp time=2025-11-24T16:00:03Z ts_ms=1764000003000 value=4",
        "offset=4 agent=gw-2 epoch=2 seq=11 sensor=hall/temp time=2025-11-24T16:00:04Z ts_ms=1764000004000 value=-5.25",
    ];
    offsets.iter().map(|&i| all[i].to_string()).collect()
}

fn config_arg(dir: &Path) -> String {
    dir.join("aggregator.toml").display().to_string()
}

#[test]
fn inspect_prints_exactly_the_readings_each_filter_selects_while_the_aggregator_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    assert_eq!(T0, 1_764_000_000_000, "the expected lines spell out T0");
    ingest_known(&agg);
    let config = config_arg(dir.path());
    let inspect = |extra: &[&str]| {
        let mut args = vec!["log", "inspect", "--config", &config];
        args.extend_from_slice(extra);
        without_received_at(&cli_ok(&args))
    };
    assert_eq!(inspect(&[]), expected(&[0, 1, 2, 3, 4]));
    assert_eq!(inspect(&["--sensor", "room1/*"]), expected(&[0, 2, 3]));
    assert_eq!(inspect(&["--sensor", "*/temp"]), expected(&[0, 1, 3, 4]));
    assert_eq!(inspect(&["--agent", "gw-2"]), expected(&[3, 4]));
    assert_eq!(inspect(&["--from-offset", "1", "--until-offset", "4"]), expected(&[1, 2, 3]));
    assert_eq!(inspect(&["--from-offset", "2", "--agent", "gw-1"]), expected(&[2]));
    assert_eq!(inspect(&["--limit", "2"]), expected(&[0, 1]));
    assert_eq!(inspect(&["--limit", "0", "--sensor", "room1/temp"]), expected(&[0, 3]));
    assert_eq!(inspect(&["--since", "1h"]), expected(&[0, 1, 2, 3, 4]));
    assert_eq!(inspect(&["--since", "2999-01-01T00:00:00Z"]), Vec::<String>::new());
    // The aggregator kept running and accepting meanwhile.
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(3, &[("room1/temp", T0 + 5000, 6.0)])]));
    assert_eq!(cli_ok(&["log", "inspect", "--config", &config, "--from-offset", "5"]).len(), 1);
}

#[test]
fn inspect_jsonl_lines_parse_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    ingest_known(&agg);
    let lines =
        cli_ok(&["log", "inspect", "--config", &config_arg(dir.path()), "--format", "jsonl", "--agent", "gw-2"]);
    let parsed: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(parsed.len(), 2);
    let last = &parsed[1];
    assert_eq!(
        (&last["offset"], &last["agent"], &last["epoch"], &last["seq"], &last["sensor"]),
        (
            &serde_json::json!(4),
            &serde_json::json!("gw-2"),
            &serde_json::json!(2),
            &serde_json::json!(11),
            &serde_json::json!("hall/temp")
        )
    );
    assert_eq!(
        (&last["time"], &last["ts_ms"], &last["value"]),
        (&serde_json::json!("2025-11-24T16:00:04Z"), &serde_json::json!(T0 + 4000), &serde_json::json!(-5.25))
    );
    assert!(last["received_at"].as_str().unwrap().ends_with('Z'));
    assert!(last["received_at_ms"].as_i64().unwrap() > T0);
}

#[test]
fn tail_prints_the_last_readings_and_follows_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    ingest_known(&agg);
    let config = config_arg(dir.path());
    assert_eq!(without_received_at(&cli_ok(&["log", "tail", "--config", &config, "-n", "2"])), expected(&[3, 4]));
    assert_eq!(
        without_received_at(&cli_ok(&["log", "tail", "--config", &config, "-n", "2", "--agent", "gw-1"])),
        expected(&[1, 2])
    );

    let mut follower = Command::new(BIN)
        .args(["log", "tail", "--config", &config, "-n", "1", "--follow", "--sensor", "room1/*"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait = Duration::from_secs(20);
    let first = rx.recv_timeout(wait).expect("tail printed nothing");
    assert_eq!(without_received_at(&[first]), expected(&[3]));
    // After it started: one reading it must skip (another sensor) and one it must print.
    let later = [("hall/temp", T0 + 5000, 7.0), ("room1/hum", T0 + 6000, 8.5)];
    agg.ingest_ok(1, &postcard_batch("gw-2", 2, &[(12, &later)]));
    let followed = rx.recv_timeout(wait).expect("tail --follow did not print the new reading");
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(
        without_received_at(&[followed]),
        ["offset=6 agent=gw-2 epoch=2 seq=13 sensor=room1/hum time=2025-11-24T16:00:06Z ts_ms=1764000006000 value=8.5"]
    );
}

#[test]
fn stats_shows_offsets_readings_and_each_agents_highest_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    ingest_known(&agg);
    let lines = cli_ok(&["log", "stats", "--config", &config_arg(dir.path())]);
    for want in [
        "offsets: 0..5",
        "blocks: 2",
        "readings: 5",
        "agents: 2",
        "  agent=gw-1 epoch=1 highest_seq=2 holes=0 missing=0",
        // gw-2 started at seq 10: 0..10 is a hole the log knows about.
        "  agent=gw-2 epoch=2 highest_seq=11 holes=1 missing=10",
    ] {
        assert!(lines.iter().any(|l| l == want), "no {want:?} in {lines:#?}");
    }
    assert!(lines.iter().any(|l| l.starts_with("bytes on disk: ")), "{lines:#?}");
}

#[test]
fn a_missing_log_or_config_is_a_clear_error_with_a_failure_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("never-ran");
    std::fs::write(dir.path().join("aggregator.toml"), common::config_text(&data_dir)).unwrap();
    let config = config_arg(dir.path());
    for sub in ["inspect", "tail", "stats"] {
        let (ok, stdout, stderr) = cli(&["log", sub, "--config", &config]);
        assert!(!ok && stdout.is_empty(), "{sub}: {stdout}");
        assert!(stderr.contains("no log at") && stderr.contains("never-ran"), "{sub}: {stderr}");
        assert!(!data_dir.exists(), "{sub} created the data dir");
    }
    let (ok, _, stderr) = cli(&["log", "inspect", "--config", "/nonexistent/aggregator.toml"]);
    assert!(!ok && stderr.contains("cannot read the configuration file"), "{stderr}");
    let (ok, _, stderr) = cli(&["log", "inspect", "--config", &config, "--sensor", "a/[b"]);
    assert!(!ok && stderr.contains("not a sensor glob"), "{stderr}");
}

#[test]
fn a_damaged_block_is_reported_by_offset_and_the_rest_still_printed() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    ingest_known(&agg);
    assert!(agg.terminate().success());
    // Stand-in for disk corruption: overwrite the first block's bytes with an unknown format.
    let conn = rusqlite::Connection::open(dir.path().join("data/log.db")).unwrap();
    conn.execute("UPDATE blocks SET data = x'07ff' WHERE first_offset = 0", []).unwrap();
    drop(conn);
    let lines = cli_ok(&["log", "inspect", "--config", &config_arg(dir.path())]);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(
        lines[0].starts_with("offset=0 damaged block of 3 readings from agent=gw-1: ")
            && lines[0].contains("format byte 7"),
        "{}",
        lines[0]
    );
    assert_eq!(without_received_at(&lines[1..]), expected(&[3, 4]));
    let json = cli_ok(&["log", "inspect", "--config", &config_arg(dir.path()), "--format", "jsonl", "--limit", "1"]);
    let damaged: serde_json::Value = serde_json::from_str(&json[0]).unwrap();
    assert_eq!((&damaged["offset"], &damaged["count"]), (&serde_json::json!(0), &serde_json::json!(3)));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    // Enough output to fill the pipe's buffer many times over.
    let many: Vec<(&str, i64, f64)> = (0..20_000).map(|i| ("bulk/x", T0 + i * 1000, i as f64)).collect();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &many)]));
    let config = config_arg(dir.path());
    for (sub, all) in [("inspect", ["--limit", "0"]), ("tail", ["-n", "20000"])] {
        let mut child = Command::new(BIN)
            .args(["log", sub, "--config", &config])
            .args(all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("offset="), "{sub}: {line}");
        drop(stdout);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert!(status.success() && stderr.is_empty(), "{sub}: {status} {stderr}");
    }
}

/// (offset, agent, seq, sensor, value) of every reading in the log of `config`, via `log inspect`.
fn logged(config: &str) -> Vec<(u64, String, u64, String, f64)> {
    cli_ok(&["log", "inspect", "--config", config, "--limit", "0", "--format", "jsonl"])
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["offset"].as_u64().unwrap(),
                v["agent"].as_str().unwrap().to_string(),
                v["seq"].as_u64().unwrap(),
                v["sensor"].as_str().unwrap().to_string(),
                v["value"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Batch `n` of an agent: 50 readings of its own sensor, seq 50n..50n+50.
fn numbered_batch(agent: usize, n: u64) -> Vec<u8> {
    let (id, sensor) = [("gw-1", "bk/one"), ("gw-2", "bk/two")][agent];
    let readings: Vec<(&str, i64, f64)> =
        (0..50).map(|i| (sensor, T0 + (n * 50 + i) as i64 * 1000, (n * 50 + i) as f64)).collect();
    postcard_batch(id, 1, &[(n * 50, &readings)])
}

#[test]
fn a_backup_taken_during_ingest_restores_every_acknowledged_reading_and_dedups_resends() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let config = config_arg(dir.path());
    for n in 0..10 {
        agg.ingest_ok(0, &numbered_batch(0, n));
        agg.ingest_ok(1, &numbered_batch(1, n));
    }
    // gw-1 keeps sending while the backup runs; `acked` counts its acknowledged batches.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(10));
    let sender = {
        let (stop, acked, addr) = (stop.clone(), acked.clone(), agg.addr);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = acked.load(Ordering::Relaxed);
                let response = common::try_ingest(addr, 0, &numbered_batch(0, n)).unwrap();
                assert_eq!(response.status, 200, "{}", response.text());
                acked.store(n + 1, Ordering::Relaxed);
            }
        })
    };
    // Let it get going, then note what was acknowledged before the backup starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.load(Ordering::Relaxed) < 15 {
        assert!(Instant::now() < deadline, "the sender is stuck");
        std::thread::sleep(Duration::from_millis(10));
    }
    let acked_before = acked.load(Ordering::Relaxed);
    let backup_dir = dir.path().join("backup");
    let backup_arg = backup_dir.display().to_string();
    let done = cli_ok(&["backup", "--config", &config, "--to", &backup_arg]);
    let acked_after = acked.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    assert!(done[0].starts_with("backed up pipeline.json, store.db, log.db ("), "{done:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup_dir.join("backup.json")).unwrap()).unwrap();
    let end = manifest["log_end_offset"].as_u64().unwrap();
    assert_eq!(manifest["log_readings"].as_u64().unwrap(), end);

    // Refusals: a non-empty backup dir, and a restore under the running aggregator.
    let (ok, _, stderr) = cli(&["backup", "--config", &config, "--to", &backup_arg]);
    assert!(!ok && stderr.contains("is not empty") && stderr.contains("--force"), "{stderr}");
    let (ok, _, stderr) = cli(&["restore", "--config", &config, "--from", &backup_arg, "--force"]);
    assert!(!ok && stderr.contains("locked by another process"), "{stderr}");

    let original = logged(&config);
    let fresh = tempfile::tempdir().unwrap();
    std::fs::write(fresh.path().join("aggregator.toml"), common::config_text(&fresh.path().join("data"))).unwrap();
    let fresh_config = config_arg(fresh.path());
    let done = cli_ok(&["restore", "--config", &fresh_config, "--from", &backup_arg]);
    assert!(done[0].starts_with("restored the backup of "), "{done:?}");
    let (ok, _, stderr) = cli(&["restore", "--config", &fresh_config, "--from", &backup_arg]);
    assert!(!ok && stderr.contains("is not empty"), "{stderr}");

    // The restored log is exactly the original's first `end` readings (a consistent snapshot),
    // and holds every batch acknowledged before the backup started.
    let restored = logged(&fresh_config);
    assert_eq!(restored.len() as u64, end);
    assert_eq!(restored[..], original[..end as usize]);
    let gw1_batches = restored.iter().filter(|r| r.1 == "gw-1").count() as u64 / 50;
    eprintln!("gw-1 batches acked before the backup: {acked_before}, in it: {gw1_batches}, acked after: {acked_after}");
    assert!(
        gw1_batches >= acked_before && gw1_batches <= acked_after,
        "{acked_before} <= {gw1_batches} <= {acked_after}"
    );
    assert_eq!(restored.iter().filter(|r| r.1 == "gw-2").count(), 500);

    // The restored aggregator serves the restored data and dedups resends of backed-up batches.
    drop(agg);
    let restored_agg = Aggregator::start(fresh.path());
    restored_agg.wait_processed();
    // Its tables equal those of a store rebuilt from offset 0 of the same log.
    let restored_sum = common::settled_checksum(&restored_agg, 1);
    let rebuilt = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(rebuilt.path().join("data")).unwrap();
    std::fs::copy(backup_dir.join("log.db"), rebuilt.path().join("data/log.db")).unwrap();
    let rebuilt_agg = Aggregator::start(rebuilt.path());
    rebuilt_agg.wait_processed();
    assert_eq!(common::settled_checksum(&rebuilt_agg, 1), restored_sum, "restored and rebuilt tables differ");
    drop(rebuilt_agg);
    let (_, sensor) = restored_agg.get_json("/api/v1/sensors/bk%2Fone");
    assert_eq!(sensor["count"], gw1_batches * 50);
    let again = restored_agg.ingest_ok(0, &numbered_batch(0, acked_before - 1));
    assert_eq!((again["accepted"].as_u64(), again["duplicates"].as_u64()), (Some(0), Some(50)));
    let next = restored_agg.ingest_ok(0, &numbered_batch(0, gw1_batches));
    assert_eq!((next["accepted"].as_u64(), next["missing"].as_u64()), (Some(50), Some(0)));
}

#[test]
fn restore_refuses_a_damaged_backup_and_leaves_the_data_dir_alone() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    for n in 0..20 {
        agg.ingest_ok(1, &numbered_batch(1, n));
    }
    let backup_dir = dir.path().join("backup");
    cli_ok(&["backup", "--config", &config_arg(dir.path()), "--to", &backup_dir.display().to_string()]);
    drop(agg);
    // Stand-in for a bad disk: zeroes over the log copy's second page on.
    let log_copy = backup_dir.join("log.db");
    let mut bytes = std::fs::read(&log_copy).unwrap();
    assert!(bytes.len() > 8192, "{}", bytes.len());
    bytes[4096..8192].fill(0xa5);
    std::fs::write(&log_copy, bytes).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    std::fs::write(fresh.path().join("aggregator.toml"), common::config_text(&fresh.path().join("data"))).unwrap();
    let (ok, _, stderr) =
        cli(&["restore", "--config", &config_arg(fresh.path()), "--from", &backup_dir.display().to_string()]);
    assert!(!ok && stderr.contains("log.db is damaged") && stderr.contains("nothing was restored"), "{stderr}");
    assert!(!fresh.path().join("data/log.db").exists());
}

#[test]
fn a_second_aggregator_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let _running = Aggregator::start(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (status, stderr, _) = common::run_with_config(other.path(), &common::config_text(&dir.path().join("data")));
    assert!(!status.success() && stderr.contains("locked by another process"), "{stderr}");
}
