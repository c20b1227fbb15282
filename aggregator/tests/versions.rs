//! Pipeline versions (Kappa reprocessing): raising `[pipeline] version` replays the log into the
//! new version's tables in the background while the old version serves and ingest goes on, then
//! switches; the result equals what a fresh aggregator given only the new version computes from
//! the same log (same checksum, also after SIGKILLs during the replay); the same version with
//! other settings is refused; `pipeline rollback` serves the previous version again.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Aggregator, BIN, Receiver, T0, postcard_batch, run_with_config};
use serde_json::Value;

const V1: &str = "[pipeline]\nwindows = [\"1m\", \"1h\"]\n\
    [[alerts]]\nname = \"hot\"\nsensor = \"line*/temp\"\nabove = 85.0\nclear = 80.0\n";
/// Another window size and another threshold: a new version.
const V2: &str = "[pipeline]\nversion = 2\nwindows = [\"10s\", \"1m\", \"1h\"]\n\
    [[alerts]]\nname = \"hot\"\nsensor = \"line*/temp\"\nabove = 75.0\nclear = 70.0\n";
const SENSORS: [&str; 3] = ["line1/temp", "line2/temp", "pump/1"];
const PER_BATCH: u64 = 1_000;

/// Batch `n`: readings one second apart, values swinging between 60 and 90.
fn batch(n: u64) -> Vec<u8> {
    let readings: Vec<(&str, i64, f64)> = (0..PER_BATCH)
        .map(|i| {
            let k = n * PER_BATCH + i;
            (SENSORS[(k % 3) as usize], T0 + k as i64 * 1_000, 75.0 + 15.0 * (k as f64 / 700.0).sin())
        })
        .collect();
    postcard_batch("gw-1", 1, &[(n * PER_BATCH, &readings)])
}

/// Readings of real sensors (not the derived `_alert/...` streams) in the 1-minute windows.
fn counted(body: &Value) -> u64 {
    body.as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["sensor"].as_str().unwrap().starts_with('_'))
        .flat_map(|s| s["windows"].as_array().unwrap())
        .map(|w| w["count"].as_u64().unwrap())
        .sum()
}

/// What the API serves for the real sensors, minus what depends on the wall clock.
fn snapshot(agg: &Aggregator, sizes: &[&str]) -> Value {
    let mut out = common::served_windows_and_sensors(agg, sizes);
    // Whether an alert fired during a replay depends on when the version was switched to, not on
    // the log: compared apart.
    let (_, mut alerts) = agg.get_json("/api/v1/alerts?limit=10000");
    for a in alerts.as_array_mut().unwrap() {
        a.as_object_mut().unwrap().remove("replayed");
    }
    out.insert("alerts".into(), alerts);
    Value::Object(out)
}

fn pipeline(agg: &Aggregator) -> Value {
    let (status, body) = agg.get_json("/api/v1/pipeline");
    assert_eq!(status, 200, "{body}");
    body
}

fn version(pipeline: &Value, v: u64) -> &Value {
    pipeline["versions"].as_array().unwrap().iter().find(|r| r["version"] == v).unwrap_or(&Value::Null)
}

fn copy_log(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("data")).unwrap();
    for file in ["log.db", "log.db-wal"] {
        let source = from.join("data").join(file);
        if source.exists() {
            std::fs::copy(&source, to.join("data").join(file)).unwrap();
        }
    }
}

#[test]
fn a_new_version_replays_in_the_background_switches_cleanly_and_can_be_rolled_back() {
    // Enough that the replay is still running when the new version starts answering, however fast
    // it folds (the 10 s windows of V1_BATCHES + 50 batches stay under what one request reads).
    const V1_BATCHES: u64 = 250;
    let dir = tempfile::tempdir().unwrap();
    // Alert transitions of readings received now are sent; a replay's are not.
    let hook = Receiver::start(0);
    let notify = format!("[[notify]]\nurl = \"{}\"\n", hook.url);
    let (v1_config, v2_config) = (format!("{V1}{notify}"), format!("{V2}{notify}"));
    let agg = Aggregator::start_with(dir.path(), &v1_config);
    for n in 0..V1_BATCHES {
        agg.ingest_ok(0, &batch(n));
    }
    agg.wait_processed();
    let v1 = snapshot(&agg, &["1m", "1h"]);
    assert_eq!(pipeline(&agg)["serving"], 1);
    assert_eq!(agg.terminate().code(), Some(0));
    let notified_before = hook.bodies().len();
    assert!(notified_before > 0, "version 1 notified its alerts");

    // Version 2: the old version serves while the new one replays; ingest goes on meanwhile, and
    // a probe polls throughout.
    let agg = Aggregator::start_with(dir.path(), &v2_config);
    let p = pipeline(&agg);
    assert_eq!(p["serving"], 1, "{p}");
    assert_eq!(version(&p, 2)["state"], "replaying", "{p}");
    let done = Arc::new(AtomicBool::new(false));
    let probe = {
        let (addr, done) = (agg.addr, done.clone());
        std::thread::spawn(move || {
            let (mut answers, mut last, mut versions_seen) = (0, 0u64, Vec::new());
            // At least three looks, however slow the machine is against the replay.
            while !done.load(Ordering::Relaxed) || answers < 3 {
                let r = common::http(addr, "GET", "/api/v1/windows?sensor=**&size=1m", &[], &[]);
                assert_eq!(r.status, 200, "{}", r.text());
                let count = counted(&serde_json::from_slice(&r.body).unwrap());
                assert!(count >= last, "the served count went back from {last} to {count}: a partial answer");
                assert!(count >= V1_BATCHES * PER_BATCH, "an answer without readings already served: {count}");
                last = count;
                let p: Value =
                    serde_json::from_slice(&common::http(addr, "GET", "/api/v1/pipeline", &[], &[]).body).unwrap();
                let serving = p["serving"].as_u64().unwrap();
                if versions_seen.last() != Some(&serving) {
                    versions_seen.push(serving);
                }
                answers += 1;
            }
            (answers, versions_seen)
        })
    };
    for n in V1_BATCHES..V1_BATCHES + 30 {
        agg.ingest_ok(0, &batch(n));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while pipeline(&agg)["serving"] != 2 {
        assert!(Instant::now() < deadline, "version 2 was never promoted:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in V1_BATCHES + 30..V1_BATCHES + 50 {
        agg.ingest_ok(0, &batch(n));
    }
    agg.wait_processed();
    done.store(true, Ordering::Relaxed);
    let (answers, versions_seen) = probe.join().unwrap();
    assert!(answers >= 3, "the probe ran {answers} times");
    // (On a fast machine the replay may be over before the probe's first look.)
    assert!(
        versions_seen == [1, 2] || versions_seen == [2],
        "the serving version as the probe saw it: {versions_seen:?}"
    );
    eprintln!("probe: {answers} answers, saw versions {versions_seen:?}");
    let p = pipeline(&agg);
    assert_eq!(version(&p, 1)["state"], "retired", "{p}");
    assert_eq!(version(&p, 2)["state"], "serving", "{p}");
    let switched = snapshot(&agg, &["10s", "1m", "1h"]);
    assert_eq!(counted(&switched["windows 1m"]), (V1_BATCHES + 50) * PER_BATCH);
    // The new threshold is what the alerts now show.
    assert_ne!(switched["alerts"], v1["alerts"]);
    assert!(switched["alerts"].as_array().unwrap().len() > v1["alerts"].as_array().unwrap().len());
    let switched_sum = common::settled_checksum(&agg, 2);
    let agg_alerts = agg.get_json("/api/v1/alerts?limit=10000");
    assert_eq!(agg.terminate().code(), Some(0));
    // Since the restart, only transitions of readings sent since: none of version 2's replay of
    // the first V1_BATCHES batches.
    std::thread::sleep(Duration::from_millis(500));
    let restart_ts = T0 + (V1_BATCHES * PER_BATCH) as i64 * 1_000;
    // In the API, the alerts of the history version 2 replayed say so.
    let (_, alerts) = agg_alerts;
    let history: Vec<&Value> =
        alerts.as_array().unwrap().iter().filter(|a| a["fired_ts"].as_i64().unwrap() < restart_ts).collect();
    assert!(!history.is_empty());
    assert!(history.iter().all(|a| a["replayed"] == true), "{alerts}");
    let since = hook.bodies()[notified_before..].to_vec();
    assert!(!since.is_empty(), "live alerts after the restart were sent");
    for body in &since {
        assert!(body["ts"].as_i64().unwrap() >= restart_ts, "a replayed transition was sent: {body}");
    }

    // A fresh aggregator given only version 2 computes the same from the same log, also when it
    // is SIGKILLed several times during its replay.
    let fresh_dir = tempfile::tempdir().unwrap();
    copy_log(dir.path(), fresh_dir.path());
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..4 {
        let agg = Aggregator::start_with(fresh_dir.path(), V2);
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        agg.kill();
    }
    let fresh = Aggregator::start_with(fresh_dir.path(), V2);
    fresh.wait_processed();
    assert_eq!(pipeline(&fresh)["serving"], 2);
    assert_eq!(snapshot(&fresh, &["10s", "1m", "1h"]), switched);
    assert_eq!(common::settled_checksum(&fresh, 2), switched_sum, "same log, same version: same tables");
    drop(fresh);

    // Rollback: version 1 serves again, with its own windows (no 10 s).
    let config = dir.path().join("aggregator.toml");
    let out = Command::new(BIN).args(["pipeline", "rollback", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 1 serves again"));
    let (status, stderr, _) = run_with_config(dir.path(), &(common::config_text(&dir.path().join("data")) + V2));
    assert!(!status.success());
    assert!(stderr.contains("rolled back") && stderr.contains("raise it to 3"), "{stderr}");
    let agg = Aggregator::start_with(dir.path(), V1);
    agg.wait_processed();
    let p = pipeline(&agg);
    assert_eq!(p["serving"], 1, "{p}");
    assert_eq!(version(&p, 2)["state"], "rolled_back", "{p}");
    assert_eq!(agg.get("/api/v1/sensors/line1%2Ftemp/windows?size=10s").status, 400);
    // Version 1 caught up with what arrived while version 2 served.
    let back = snapshot(&agg, &["1m", "1h"]);
    assert_eq!(counted(&back["windows 1m"]), (V1_BATCHES + 50) * PER_BATCH);
}

#[test]
fn the_same_version_with_other_settings_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), V1);
    agg.ingest_ok(0, &batch(0));
    agg.wait_processed();
    assert_eq!(agg.terminate().code(), Some(0));
    let changed = V1.replace("above = 85.0", "above = 95.0");
    let (status, stderr, _) = run_with_config(dir.path(), &(common::config_text(&dir.path().join("data")) + &changed));
    assert!(!status.success());
    assert!(stderr.contains("raise [pipeline] version to 2"), "{stderr}");
    // The unchanged settings start again, and so does a layout-only change of the file.
    let reordered = V1.replace("windows = [\"1m\", \"1h\"]", "windows = [\"1h\", \"1m\"]");
    let agg = Aggregator::start_with(dir.path(), &reordered);
    assert_eq!(pipeline(&agg)["serving"], 1);
}

#[test]
fn sighup_with_a_raised_version_replays_and_switches_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), V1);
    for n in 0..20 {
        agg.ingest_ok(0, &batch(n));
    }
    agg.wait_processed();
    let config = dir.path().join("aggregator.toml");
    let reload = |text: &str| {
        std::fs::write(&config, common::config_text(&dir.path().join("data")) + text).unwrap();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(agg.child.id() as i32, libc::SIGHUP) };
    };
    // A file that does not load, or the same version with other settings: nothing changes.
    // (One at a time: signals sent close together may arrive as one.)
    let logged = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agg.stderr.lock().unwrap().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in:\n{}", agg.stderr.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    reload("[pipeline]\nwindows = [\"1m\"\n");
    logged("SIGHUP:");
    reload(&V1.replace("above = 85.0", "above = 99.0"));
    logged("raise [pipeline] version to 2");
    assert_eq!(pipeline(&agg)["serving"], 1);

    reload(V2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while pipeline(&agg)["serving"] != 2 {
        assert!(Instant::now() < deadline, "version 2 never served:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    agg.ingest_ok(0, &batch(20));
    agg.wait_processed();
    assert_eq!(counted(&snapshot(&agg, &["10s"])["windows 10s"]), 21 * PER_BATCH);
    // All through one process on one port: a restart would have picked another port.
}

#[test]
fn an_offline_replay_computes_a_new_version_ahead_of_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), V1);
    for n in 0..30 {
        agg.ingest_ok(0, &batch(n));
    }
    agg.wait_processed();
    assert_eq!(agg.terminate().code(), Some(0));
    let config = dir.path().join("aggregator.toml");
    std::fs::write(&config, common::config_text(&dir.path().join("data")) + V2).unwrap();
    let replay = |args: &[&str]| {
        let out = Command::new(BIN).args(["replay", "--config"]).arg(&config).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let folded = |stdout: &str| -> u64 {
        assert!(stdout.starts_with("replayed ") && stdout.contains(" readings into version 2 "), "{stdout}");
        stdout.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // The log holds version 1's alert transitions too: blocks do not end on round offsets.
    let logged = common::log_totals(&dir.path().join("data")).1 as u64;
    let (ok, stdout, stderr) = replay(&["--until-offset", "10000"]);
    assert!(ok, "{stderr}");
    let first = folded(&stdout);
    assert!((10_000..11_100).contains(&first), "stops at the block boundary after 10000: {stdout}");
    assert!(stdout.contains("version 1 still serves"), "{stdout}");
    let (ok, _, stderr) = replay(&["--from-offset", "5"]);
    assert!(!ok);
    assert!(stderr.contains(&format!("already holds the log up to offset {first}")), "{stderr}");
    let (ok, stdout, stderr) = replay(&[]);
    assert!(ok, "{stderr}");
    // Everything logged before, and version 2's own alert transitions the first run appended.
    assert!(first + folded(&stdout) > logged, "{stdout}");

    let agg = Aggregator::start_with(dir.path(), V2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pipeline(&agg)["serving"] != 2 {
        assert!(Instant::now() < deadline, "version 2 never served:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    agg.wait_processed();
    assert_eq!(counted(&snapshot(&agg, &["10s"])["windows 10s"]), 30 * PER_BATCH);
}

// Version 1 with 1-minute windows only; version 2 adds two sizes. No alert rules: a version's
// derived readings are stamped with the time they were appended, so two runs that each append
// their own would differ by that time alone.
const PLAIN: &str = "[pipeline]\nwindows = [\"1m\"]\n";
const NEXT: &str = "[pipeline]\nversion = 2\nwindows = [\"10s\", \"1m\", \"1h\"]\n";

/// Version 1 holding `batches`, stopped.
fn stopped_version_1(batches: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), PLAIN);
    for n in 0..batches {
        agg.ingest_ok(0, &batch(n));
    }
    agg.wait_processed();
    assert_eq!(agg.terminate().code(), Some(0));
    dir
}

/// A copy of `dir`'s data with version 2's configuration, for a `replay` run.
fn copy_for_version_2(dir: &Path) -> (tempfile::TempDir, std::path::PathBuf) {
    let copy = tempfile::tempdir().unwrap();
    copy_log(dir, copy.path());
    for file in ["store.db", "pipeline.json"] {
        std::fs::copy(dir.join("data").join(file), copy.path().join("data").join(file)).unwrap();
    }
    let config = copy.path().join("aggregator.toml");
    std::fs::write(&config, common::config_text(&copy.path().join("data")) + NEXT).unwrap();
    (copy, config)
}

/// Starts `copy` as version 2 and returns its settled checksum once it serves (synced: a replay
/// writes without fsync until it has caught up).
fn served_version_2(copy: &Path) -> String {
    let agg = Aggregator::start_with(copy, NEXT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pipeline(&agg)["serving"] != 2 {
        assert!(Instant::now() < deadline, "version 2 never served:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!unsynced_marker(copy).exists(), "version 2 serves unsynced");
    common::settled_checksum(&agg, 2)
}

/// A copy of `dir`'s data replayed offline as version 2 and then served: the copy and its checksum
/// (what a replay never cut short computes).
fn replayed_version_2(dir: &Path) -> (tempfile::TempDir, String) {
    let (clean, config) = copy_for_version_2(dir);
    assert!(Command::new(BIN).args(["replay", "--config"]).arg(&config).status().unwrap().success());
    let checksum = served_version_2(clean.path());
    (clean, checksum)
}

/// The file that says version 2's store is being written without fsync, and in which boot.
fn unsynced_marker(dir: &Path) -> std::path::PathBuf {
    dir.join("data").join("store-v2.db-unsynced")
}

#[test]
fn replays_cut_into_different_steps_compute_the_same_tables() {
    let dir = stopped_version_1(40);
    let mut sums = Vec::new();
    for steps in [vec![], vec![1, 2_500, 2_501, 9_999, 17_000, 33_333]] {
        let (copy, config) = copy_for_version_2(dir.path());
        for until in steps.iter().map(|s| Some(s.to_string())).chain([None]) {
            let mut cmd = Command::new(BIN);
            cmd.args(["replay", "--config"]).arg(&config);
            if let Some(until) = &until {
                cmd.args(["--until-offset", until]);
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        sums.push(served_version_2(copy.path()));
    }
    assert_eq!(sums[0], sums[1], "one replay in one go, one in seven steps");
}

#[test]
fn a_replay_command_sigkilled_at_random_moments_resumes_to_the_same_tables() {
    // A replay writes its commits on a thread of its own while it folds on: a SIGKILL may land
    // with a commit half written, and the next run must resume from what the store holds.
    let dir = stopped_version_1(1_200);
    let replay = |config: &Path| Command::new(BIN).args(["replay", "--config"]).arg(config).spawn().unwrap();

    let (whole, config) = copy_for_version_2(dir.path());
    let started = Instant::now();
    assert!(replay(&config).wait().unwrap().success());
    let took = started.elapsed();
    let expected = served_version_2(whole.path());

    let (killed, config) = copy_for_version_2(dir.path());
    let mut rng = fastrand::Rng::with_seed(5);
    let mut kills = 0;
    for _ in 0..8 {
        let mut child = replay(&config);
        std::thread::sleep(took.mul_f64(rng.f64() * 0.9));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(replay(&config).wait().unwrap().success());
    assert!(kills > 0, "no run was killed mid-replay ({took:?} a replay)");
    assert_eq!(served_version_2(killed.path()), expected, "after {kills} SIGKILLs during replays of {took:?}");
}

#[test]
fn a_replay_left_unsynced_when_the_machine_went_down_is_replayed_anew() {
    // A replay writes the store it builds without fsync (nothing is served from it yet, and the
    // log can build it again), beside a marker naming the machine's boot. A power cut cannot be
    // made here: the test fakes what one leaves behind, the marker of an earlier boot and pages
    // that never reached the disk (a page of zeros in the store).
    let dir = stopped_version_1(400);
    let (_clean, expected) = replayed_version_2(dir.path());

    let (cut, config) = copy_for_version_2(dir.path());
    let out = Command::new(BIN)
        .args(["replay", "--config"])
        .arg(&config)
        .args(["--until-offset", "200000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let marker = unsynced_marker(cut.path());
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), boot.trim(), "an offline replay leaves it unsynced");

    std::fs::write(&marker, "a boot before a power cut\n").unwrap();
    // Until it is synced, the replay's commits are in the store's WAL (not checkpointed).
    let wal = cut.path().join("data").join("store-v2.db-wal");
    let mut bytes = std::fs::read(&wal).unwrap();
    let page = tributary_aggregator::store::PAGE_SIZE as usize;
    assert!(bytes.len() >= 3 * page, "{} bytes", bytes.len());
    bytes[page..2 * page].fill(0);
    std::fs::write(&wal, bytes).unwrap();

    let agg = Aggregator::start_with(cut.path(), NEXT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pipeline(&agg)["serving"] != 2 {
        assert!(Instant::now() < deadline, "version 2 never served:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let stderr = agg.stderr.lock().unwrap().clone();
    assert!(stderr.contains("deleted and replayed from the log"), "{stderr}");
    let started = stderr.lines().find(|l| l.contains("replaying the log into a new pipeline version")).unwrap_or("");
    assert!(started.contains("from_offset=0"), "replayed from the start: {started}");
    assert!(!marker.exists(), "synced once caught up");
    let aside: Vec<String> = std::fs::read_dir(cut.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("damaged"))
        .collect();
    assert!(aside.is_empty(), "deleted, not set aside as damaged: {aside:?}");
    assert_eq!(common::settled_checksum(&agg, 2), expected, "the same tables as a replay never cut short");
}

#[test]
fn sigterm_during_a_background_replay_is_resumed_at_the_next_start_to_the_same_tables() {
    // Enough for several commits of the replay (one every 500 ms while it is behind) even when it runs
    // at millions of readings a second: the test must see it part way.
    // (A reading a second over 3 sensors: 75,000 1-minute windows, under what one request may read.)
    const BATCHES_TO_REPLAY: u64 = 1_500;
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), PLAIN);
    for n in 0..BATCHES_TO_REPLAY {
        agg.ingest_ok(0, &batch(n));
    }
    agg.wait_processed();
    assert_eq!(agg.terminate().code(), Some(0));

    // Version 2 starts replaying; SIGTERM arrives while it does, with ingest going on.
    let agg = Aggregator::start_with(dir.path(), NEXT);
    agg.ingest_ok(0, &batch(BATCHES_TO_REPLAY));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = pipeline(&agg);
        assert_eq!(p["serving"], 1, "the replay finished before the test could stop it: {p}");
        if version(&p, 2)["offset"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the replay never started: {p}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stderr = agg.stderr.clone();
    assert_eq!(agg.terminate().code(), Some(0), "{}", stderr.lock().unwrap());
    assert!(!stderr.lock().unwrap().contains("panicked"), "{}", stderr.lock().unwrap());

    // The next start resumes the replay where it stopped and switches; the tables are those of a
    // version 2 that never stopped.
    let agg = Aggregator::start_with(dir.path(), NEXT);
    // What the replay resumed from is in the aggregator's log (the API may already show it done).
    let deadline = Instant::now() + Duration::from_secs(10);
    let from_offset = loop {
        let stderr = agg.stderr.lock().unwrap().clone();
        let line = stderr.lines().find(|l| l.contains("replaying the log into a new pipeline version"));
        let field = line.and_then(|l| l.split("from_offset=").nth(1)).and_then(|f| f.split_whitespace().next());
        if let Some(offset) = field.and_then(|f| f.parse::<u64>().ok()) {
            break offset;
        }
        assert!(Instant::now() < deadline, "no replay start logged:\n{stderr}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(from_offset > 0, "resumed, not restarted from 0");
    let p = pipeline(&agg);
    assert!(p["serving"] == 2 || version(&p, 2)["state"] == "replaying", "{p}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pipeline(&agg)["serving"] != 2 {
        assert!(Instant::now() < deadline, "version 2 never served:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    agg.wait_processed();
    let resumed = common::settled_checksum(&agg, 2);
    assert_eq!(counted(&snapshot(&agg, &["1m"])["windows 1m"]), (BATCHES_TO_REPLAY + 1) * PER_BATCH);
    assert_eq!(agg.terminate().code(), Some(0));

    // What version 2 computes from the same log alone, on a copy.
    let fresh = tempfile::tempdir().unwrap();
    copy_log(dir.path(), fresh.path());
    let agg = Aggregator::start_with(fresh.path(), NEXT);
    assert_eq!(pipeline(&agg)["serving"], 2);
    assert_eq!(common::settled_checksum(&agg, 2), resumed, "resumed replay = one that never stopped");
}

#[test]
fn a_damaged_pipeline_json_stops_the_start_with_the_file_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), V1);
    agg.ingest_ok(0, &batch(0));
    assert_eq!(agg.terminate().code(), Some(0));
    std::fs::write(dir.path().join("data/pipeline.json"), b"{\"serving\": 1, \"versio").unwrap();
    let (status, stderr, _) = run_with_config(dir.path(), &(common::config_text(&dir.path().join("data")) + V1));
    assert!(!status.success());
    assert!(stderr.contains("pipeline.json") && stderr.contains("restore it from a backup"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_replay_out_of_disk_space_waits_for_room_and_sets_nothing_aside() {
    // The disk fills while version 2 replays (here no file may grow past a limit, as on a full
    // disk: a mount needs rights a test may not have). Every commit fails; a commit of one
    // block's set-aside record would still fit, but no block is to blame: nothing may be set
    // aside. Version 1 serves meanwhile; once there is room, version 2 finishes with the tables
    // a replay with room computes.
    let dir = stopped_version_1(400);
    let (clean, expected) = replayed_version_2(dir.path());
    let needed = std::fs::metadata(clean.path().join("data").join("store-v2.db")).unwrap().len();

    let (full, _) = copy_for_version_2(dir.path());
    // Files already larger (the log, version 1's store) are only read: no write goes past it.
    let limit = 2 << 20;
    assert!(needed > 3 * limit, "version 2's store ({needed} B) must not fit in {limit} B");
    let agg = Aggregator::start_with_file_size_limit(full.path(), NEXT, limit);
    let deadline = Instant::now() + Duration::from_secs(30);
    while agg.stderr.lock().unwrap().matches("processor step failed").count() < 4 {
        assert!(Instant::now() < deadline, "the replay never ran out of space:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Time for the narrowing down to one block a bad block gets (a few ms a step).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pipeline(&agg)["serving"], 1, "version 1 serves while version 2 cannot commit");
    let stderr = agg.stderr.lock().unwrap().clone();
    assert!(!stderr.contains("narrowing down"), "no block is to blame for a full disk:\n{stderr}");
    assert!(!stderr.contains("set aside a log block"), "{stderr}");

    agg.lift_file_size_limit();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pipeline(&agg)["serving"] != 2 {
        assert!(Instant::now() < deadline, "version 2 never served:\n{}", agg.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, set_aside) = agg.get_json("/api/v1/set-aside");
    assert_eq!(status, 200, "{set_aside}");
    assert_eq!(set_aside, serde_json::json!([]), "nothing set aside");
    assert_eq!(common::settled_checksum(&agg, 2), expected, "the same tables as a replay with room");
}
