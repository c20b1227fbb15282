//! Gateway clocks: readings the agent stamps before its clock is first synchronised are held and
//! re-stamped when it is; held too long, or device timestamps beyond the limits, they reach the
//! aggregator flagged and are quarantined, never folded into windows.
//!
//! The machine's clock cannot be moved, so the agent reads a FAKE clock (test-only:
//! `TRIBUTARY_FAKE_CLOCK` names a file holding the wall clock's offset from the real one and the
//! synchronised flag, which the test rewrites).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tributary_tests::{Agent, Aggregator, eventually, publish};

const MIN_TS_MS: i64 = tributary_shared::MIN_TS_MS;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A fake clock that reads 1970-01-01T01:00 now (a gateway without a real-time clock, just
/// booted), not synchronised.
fn fake_clock_in_1970(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("fake-clock");
    std::fs::write(&path, format!("wall_offset_ms={}\nsynced=0\n", 3_600_000 - now_ms())).unwrap();
    path
}

fn sync_fake_clock(path: &Path) {
    // Written whole, then renamed: the agent never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, "wall_offset_ms=0\nsynced=1\n").unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start_agent(dir: &Path, id: &str, token: &str, aggregator: &Aggregator, clock: &Path, extra: &str) -> Agent {
    let clock = clock.display().to_string();
    Agent::start_with_env(dir, id, token, &aggregator.url(), extra, &[("TRIBUTARY_FAKE_CLOCK", clock.as_str())]).await
}

async fn quarantine(aggregator: &Aggregator, sensor: &str) -> Vec<Value> {
    let (_, rows) = aggregator.get(&format!("/api/v1/quarantine?sensor={sensor}&limit=1000")).await;
    rows.as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_stamped_before_the_first_sync_reach_the_aggregator_at_their_real_times() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-clock", "t-clock")]).await;
    let clock = fake_clock_in_1970(dir.path());
    let agent =
        start_agent(dir.path(), "gw-clock", "t-clock", &aggregator, &clock, "[clock]\nhold_unsynced = \"10m\"\n").await;

    // Readings without timestamps: the agent stamps them, in 1970.
    let before = now_ms();
    let messages: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| ("sensors/room/temp".to_string(), format!("{}", 20 + i).into_bytes()))
        .chain(std::iter::once(("sensors/room".to_string(), b"{\"humidity\": 40}".to_vec())))
        .collect();
    publish(agent.mqtt_port, "sensor-1", &messages).await;
    let after = now_ms();
    eventually("the readings in the spool", Duration::from_secs(20), || async {
        (agent.metric("tributary_agent_readings_spooled_total").await >= 4.0).then_some(())
    })
    .await;
    // Held for the clock: a forwarder that sent them would have been acknowledged by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(agent.metric("tributary_agent_readings_forwarded_total").await, 0.0, "held while unsynchronised");
    assert_eq!(agent.metric("tributary_agent_clock_synced").await, 0.0);
    assert!(aggregator.logged_readings().is_empty());

    // NTP sets the clock.
    sync_fake_clock(&clock);
    let logged = eventually("the re-stamped readings at the aggregator", Duration::from_secs(30), || async {
        let logged = aggregator.logged_readings();
        let ours: Vec<_> = logged.into_iter().filter(|(s, _, _)| s.starts_with("room")).collect();
        (ours.len() == 4).then_some(ours)
    })
    .await;
    for (sensor, ts, _) in &logged {
        assert!(*ts >= before - 2_000 && *ts <= after + 2_000, "{sensor} at {ts}, published in [{before}, {after}]");
    }
    let counts = eventually("the readings in windows", Duration::from_secs(20), || async {
        let counts = aggregator.sensor_counts().await;
        (counts.get("room/temp") == Some(&3) && counts.get("room/humidity") == Some(&1)).then_some(counts)
    })
    .await;
    assert!(quarantine(&aggregator, "room/temp").await.is_empty(), "{counts:?}");
    assert_eq!(agent.metric("tributary_agent_clock_restamped_readings_total").await, 4.0);
    assert_eq!(agent.metric("tributary_agent_readings_forwarded_flagged_total").await, 0.0);
    assert_eq!(agent.metric("tributary_agent_clock_synced").await, 1.0);
    assert!(aggregator.logged_readings().iter().all(|(_, ts, _)| *ts >= MIN_TS_MS), "nothing in 1970");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_held_past_hold_unsynced_are_sent_flagged_and_quarantined_not_windowed() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-nosync", "t-nosync")]).await;
    let clock = fake_clock_in_1970(dir.path());
    // "0s": sent at once, flagged.
    let agent =
        start_agent(dir.path(), "gw-nosync", "t-nosync", &aggregator, &clock, "[clock]\nhold_unsynced = \"0s\"\n")
            .await;
    let messages: Vec<(String, Vec<u8>)> =
        (0..5).map(|i| ("sensors/shed/temp".to_string(), format!("{i}.5").into_bytes())).collect();
    publish(agent.mqtt_port, "sensor-2", &messages).await;
    let rows = eventually("the readings quarantined", Duration::from_secs(30), || async {
        let rows = quarantine(&aggregator, "shed/temp").await;
        (rows.len() == 5).then_some(rows)
    })
    .await;
    for row in &rows {
        assert_eq!(row["reason"], "clock_unsynced", "{row}");
        assert!(row["ts"].as_i64().unwrap() < MIN_TS_MS, "kept as stamped, in 1970: {row}");
    }
    // Logged = windowed + quarantined: none of them in a window.
    assert_eq!(aggregator.logged_readings().iter().filter(|(s, _, _)| s == "shed/temp").count(), 5);
    assert!(aggregator.window_counts("shed/temp").await.is_empty());
    let (_, sensor) = aggregator.get("/api/v1/sensors/shed%2Ftemp").await;
    assert_eq!((sensor["count"].as_u64(), sensor["quarantined"].as_u64()), (Some(0), Some(5)), "{sensor}");
    assert_eq!(agent.metric("tributary_agent_readings_forwarded_flagged_total").await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_timestamps_far_ahead_are_flagged_or_restamped_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-flag", "t-flag"), ("gw-restamp", "t-restamp")]).await;
    let clock = dir.path().join("fake-clock");
    std::fs::write(&clock, "wall_offset_ms=0\nsynced=1\n").unwrap();
    let day = 86_400_000;
    let ahead = now_ms() + day;
    let message =
        |sensor: &str| (format!("sensors/{sensor}"), format!("{{\"value\": 1.5, \"ts\": {ahead}}}").into_bytes());
    let good = now_ms() - 60_000;
    let on_time =
        |sensor: &str| (format!("sensors/{sensor}"), format!("{{\"value\": 2.5, \"ts\": {good}}}").into_bytes());

    for (id, token, policy) in [("gw-flag", "t-flag", "flag"), ("gw-restamp", "t-restamp", "restamp")] {
        let sub = dir.path().join(id);
        std::fs::create_dir_all(&sub).unwrap();
        let extra = format!("[clock]\non_device_skew = {policy:?}\n");
        let agent = start_agent(&sub, id, token, &aggregator, &clock, &extra).await;
        let sensor = format!("{policy}/dev");
        let before = now_ms();
        publish(agent.mqtt_port, "device", &[message(&sensor), on_time(&sensor)]).await;
        let after = now_ms();
        let logged = eventually("the device's readings logged", Duration::from_secs(30), || async {
            let logged: Vec<_> = aggregator.logged_readings().into_iter().filter(|(s, _, _)| *s == sensor).collect();
            (logged.len() == 2).then_some(logged)
        })
        .await;
        assert_eq!(agent.metric("tributary_agent_device_skew_readings_total").await, 1.0, "{policy}");
        assert!(logged.iter().any(|(_, ts, v)| *ts == good && *v == 2.5), "on time, untouched: {logged:?}");
        let skewed = logged.iter().find(|(_, _, v)| *v == 1.5).unwrap().1;
        let rows = eventually("the processor caught up", Duration::from_secs(20), || async {
            let counts = aggregator.sensor_counts().await;
            let rows = quarantine(&aggregator, &sensor).await;
            (counts.get(&sensor).copied().unwrap_or(0) + rows.len() as u64 == 2).then_some(rows)
        })
        .await;
        if policy == "flag" {
            assert_eq!(skewed, ahead, "kept as the device sent it");
            assert_eq!(rows.len(), 1, "{rows:?}");
            assert_eq!(rows[0]["reason"], "device_clock_skew");
        } else {
            assert!(skewed >= before && skewed <= after + 1_000, "re-stamped at receipt: {skewed}");
            assert!(rows.is_empty(), "{rows:?}");
        }
    }
}
