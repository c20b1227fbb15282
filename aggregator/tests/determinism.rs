//! Crash safety of the pipeline: SIGKILLed 20 times at random moments during live ingest, the
//! aggregator ends with exactly the tables an uninterrupted run computes from the same log
//! (every window of every size, sensors, quarantine, anomalies, alerts).

mod common;

use std::time::Duration;

use common::{Aggregator, T0, postcard_batch, try_ingest};
use serde_json::Value;

const KILLS: usize = 20;
const BATCHES: u64 = 300;
const PER_BATCH: u64 = 100;
const SENSORS: [&str; 6] = ["det/a", "det/b", "det/c", "line1/temp", "line2/temp", "pump/1"];

const PIPELINE: &str = "[pipeline]\ndays = { tz = \"Europe/Berlin\" }\n\
    [[anomaly]]\nsensor = \"pump/*\"\nwarmup = 20\n\
    [[alerts]]\nname = \"hot\"\nsensor = \"line*/temp\"\nabove = 80.0\nfor = \"20s\"\nclear = 70.0\n\
    [[alerts]]\nname = \"jump\"\nsensor = \"det/*\"\nrate_above = 50.0\n\
    [[alerts]]\nname = \"odd\"\nsensor = \"pump/*\"\nanomaly = true\n";

/// Batch `n` (sequence numbers from n * PER_BATCH): readings of every sensor, event time moving
/// on ~0.3 s per reading; 1 % of them 1-3 h late, a few an hour in the future, some spikes.
fn batch(n: u64, now: i64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(n);
    let readings: Vec<(&str, i64, f64)> = (0..PER_BATCH)
        .map(|i| {
            let k = n * PER_BATCH + i;
            let sensor = SENSORS[rng.usize(..SENSORS.len())];
            let mut ts = T0 + k as i64 * 300 + rng.i64(0..300);
            let roll = rng.u32(..1000);
            if roll < 10 {
                ts -= rng.i64(3_600_000..10_800_000);
            } else if roll == 10 {
                ts = now + 3_600_000;
            }
            let mut value = 60.0 + 15.0 * ((k as f64) / 500.0).sin() + rng.f64();
            if rng.u32(..300) == 0 {
                value *= 8.0;
            }
            (sensor, ts, value)
        })
        .collect();
    postcard_batch("gw-1", 1, &[(n * PER_BATCH, &readings)])
}

/// What the API serves, minus what depends on the wall clock (a sensor's online/stale status).
fn snapshot(agg: &Aggregator) -> Value {
    let mut out = common::served_windows_and_sensors(agg, &["10s", "1m", "1h", "day"]);
    out.insert("quarantine".into(), agg.get_json("/api/v1/quarantine?limit=10000").1);
    out.insert("anomalies".into(), agg.get_json("/api/v1/anomalies?limit=10000").1);
    out.insert("alerts".into(), agg.get_json("/api/v1/alerts?limit=10000").1);
    Value::Object(out)
}

#[test]
fn twenty_sigkills_during_live_ingest_leave_the_tables_of_an_uninterrupted_run() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let bodies: Vec<Vec<u8>> = (0..BATCHES).map(|n| batch(n, now)).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut next = 0usize;
    for _ in 0..KILLS {
        let agg = Aggregator::start_with(dir.path(), PIPELINE);
        let pid = agg.child.id() as i32;
        let after = Duration::from_millis(rng.u64(30..400));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(after);
            // SAFETY: plain kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        // Send until the kill cuts a request; an unanswered batch is sent again after the restart.
        while next < bodies.len() {
            match try_ingest(agg.addr, 0, &bodies[next]) {
                Ok(r) if r.status == 200 => next += 1,
                _ => break,
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        killer.join().unwrap();
        drop(agg);
    }
    assert!(next < bodies.len(), "every kill came while batches were still being sent");
    let agg = Aggregator::start_with(dir.path(), PIPELINE);
    for body in &bodies[next..] {
        agg.ingest_ok(0, body);
    }
    agg.wait_processed();
    let interrupted = snapshot(&agg);
    assert_eq!(agg.terminate().code(), Some(0));

    // The same log, folded from offset 0 in one go.
    let again = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(again.path().join("data")).unwrap();
    for file in ["log.db", "log.db-wal"] {
        let from = dir.path().join("data").join(file);
        if from.exists() {
            std::fs::copy(&from, again.path().join("data").join(file)).unwrap();
        }
    }
    let fresh = Aggregator::start_with(again.path(), PIPELINE);
    fresh.wait_processed();
    let uninterrupted = snapshot(&fresh);

    let logged: u64 = interrupted["sensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["id"].as_str().unwrap().starts_with('_'))
        .map(|s| s["count"].as_u64().unwrap() + s["quarantined"].as_u64().unwrap())
        .sum();
    assert_eq!(logged, BATCHES * PER_BATCH, "every reading sent is counted once");
    for key in uninterrupted.as_object().unwrap().keys() {
        assert!(
            interrupted[key] == uninterrupted[key],
            "{key} differs after {KILLS} kills:\n{}\nvs\n{}",
            interrupted[key],
            uninterrupted[key]
        );
    }
    // The run was not vacuous: late data, quarantine, anomalies and alerts all happened.
    assert!(!uninterrupted["quarantine"].as_array().unwrap().is_empty());
    assert!(!uninterrupted["anomalies"].as_array().unwrap().is_empty());
    assert!(uninterrupted["alerts"].as_array().unwrap().len() >= 3, "{}", uninterrupted["alerts"]);
    let revised = uninterrupted["windows 1h"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["windows"].as_array().unwrap())
        .filter(|w| w["revision"].as_u64().unwrap() > 0)
        .count();
    assert!(revised > 0);
}
