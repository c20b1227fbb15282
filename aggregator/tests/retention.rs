//! Log retention (`[log] retain`): the oldest blocks go once the serving pipeline has them in its
//! windows; dropped ranges are recorded and asking the log for them is refused with where it
//! starts now; offsets go on from where they were, also across a restart; a new pipeline version
//! replays what the log still holds.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Aggregator, BIN, T0, log_totals, postcard_batch};

const PER_BATCH: u64 = 1_000;

fn batch(n: u64) -> Vec<u8> {
    let readings: Vec<(&str, i64, f64)> =
        (0..PER_BATCH).map(|i| ("r/a", T0 + (n * PER_BATCH + i) as i64 * 1_000, i as f64)).collect();
    postcard_batch("gw-1", 1, &[(n * PER_BATCH, &readings)])
}

fn served(agg: &Aggregator) -> u64 {
    let (_, body) = agg.get_json("/api/v1/sensors/r%2Fa/windows?size=1m");
    body.as_array().unwrap().iter().map(|w| w["count"].as_u64().unwrap()).sum()
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn old_blocks_go_after_processing_and_the_log_goes_on_from_its_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let retain = "[log]\nretain = \"2s\"\n";
    let agg = Aggregator::start_with(dir.path(), retain);
    for n in 0..10 {
        agg.ingest_ok(0, &batch(n));
    }
    agg.wait_processed();
    std::thread::sleep(Duration::from_millis(2_500));
    let ack = agg.ingest_ok(0, &batch(10));
    agg.wait_processed();
    // Everything received more than 2 s ago goes; the newest block always stays.
    let deadline = Instant::now() + Duration::from_secs(20);
    while log_totals(&agg.data_dir).1 as u64 > PER_BATCH {
        assert!(Instant::now() < deadline, "retention dropped nothing:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agg.metric("tributary_log_dropped_readings_total"), (10 * PER_BATCH) as f64);
    assert_eq!(agg.metric("tributary_log_first_offset"), (10 * PER_BATCH) as f64);
    assert_eq!(served(&agg), 11 * PER_BATCH, "the windows keep what the log dropped");
    assert_eq!(ack["accepted"], PER_BATCH, "{ack}");

    let config = dir.path().join("aggregator.toml").display().to_string();
    let (ok, stdout, stderr) = cli(&["log", "stats", "--config", &config]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("dropped by retention: 10000 readings, offsets 0..10000"), "{stdout}");
    let (ok, _, stderr) = cli(&["log", "inspect", "--config", &config, "--from-offset", "5"]);
    assert!(!ok);
    assert!(stderr.contains("dropped by log retention") && stderr.contains("--from-offset 10000"), "{stderr}");
    let (ok, stdout, stderr) = cli(&["log", "inspect", "--config", &config, "--from-offset", "10000", "--limit", "1"]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("offset=10000 "), "{stdout}");
    assert_eq!(agg.terminate().code(), Some(0));

    // After a restart, offsets go on from the newest block; a new version replays what is kept.
    let v2 = format!("{retain}[pipeline]\nversion = 2\n");
    let agg = Aggregator::start_with(dir.path(), &v2);
    agg.ingest_ok(0, &batch(11));
    let deadline = Instant::now() + Duration::from_secs(30);
    while agg.get_json("/api/v1/pipeline").1["serving"] != 2 {
        assert!(Instant::now() < deadline, "version 2 never served:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    agg.wait_processed();
    assert_eq!(agg.metric("tributary_log_end_offset"), (12 * PER_BATCH) as f64);
    assert_eq!(served(&agg), 2 * PER_BATCH, "version 2 holds what the log kept: batches 10 and 11");
}
