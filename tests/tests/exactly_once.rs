//! Guarantee 1: a reading accepted into the agent's spool reaches the aggregator's log exactly
//! once, through aggregator crashes, agent crashes and resends of what was already logged.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish};

const SENSORS: usize = 5;

/// A window's (count, min, max, sum).
type Window = (u64, f64, f64, f64);

struct Published {
    messages: Vec<(String, Vec<u8>)>,
    /// sensor → count
    counts: BTreeMap<String, u64>,
    /// sensor → minute start → (count, min, max, sum)
    windows: BTreeMap<String, BTreeMap<i64, Window>>,
}

/// `n` readings over five sensors, with event times 137 ms apart starting two hours ago, so they
/// fall into many 1-minute windows.
fn readings(n: usize) -> Published {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let base = (now - 2 * 3_600_000) / 60_000 * 60_000;
    let mut p = Published { messages: Vec::new(), counts: BTreeMap::new(), windows: BTreeMap::new() };
    for i in 0..n {
        let sensor = format!("room{}/temp", i % SENSORS + 1);
        let ts = base + i as i64 * 137;
        let value = (i % 50) as f64 + 0.25;
        let payload = format!("{{\"value\": {value}, \"ts\": {ts}}}");
        p.messages.push((format!("sensors/{sensor}"), payload.into_bytes()));
        *p.counts.entry(sensor.clone()).or_default() += 1;
        let w =
            p.windows.entry(sensor).or_default().entry(ts / 60_000 * 60_000).or_insert((0, f64::MAX, f64::MIN, 0.0));
        *w = (w.0 + 1, w.1.min(value), w.2.max(value), w.3 + value);
    }
    p
}

fn spooled_readings(dir: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("spool.db")).unwrap();
    conn.query_row("SELECT coalesce(sum(count), 0) FROM blocks", [], |r| r.get(0)).unwrap()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_survive_aggregator_and_agent_crashes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = readings(6_000);
    let mut aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let mut agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, "").await;
    let port = agent.mqtt_port;

    // Phase A: the first 1,000 readings flow; the aggregator is SIGKILLed while the agent forwards.
    publish(port, "sensor-a", &data.messages[..1_000]).await;
    aggregator.process.kill9();
    // Phase B: 3,500 more while the centre is down; they can only wait in the spool.
    publish(port, "sensor-b", &data.messages[1_000..4_500]).await;
    eventually("all 4,500 readings committed to the spool", Duration::from_secs(30), || async {
        (agent.metric("tributary_agent_readings_spooled_total").await == 4_500.0).then_some(())
    })
    .await;
    assert!(agent.metric("tributary_agent_spool_readings").await > 0.0, "readings must be waiting in the spool");

    // The agent dies with readings in its spool. Its disk as it is now is kept, to replay later.
    agent.process.kill9();
    let snapshot = dir.path().join("spool-snapshot");
    copy_dir(&agent.data_dir, &snapshot);
    let replayed = spooled_readings(&snapshot);
    assert!(replayed >= 3_500, "phase B is in the spool: {replayed}");

    aggregator.restart().await;
    agent.restart().await;
    // Phase C: 1,500 more after both came back.
    publish(port, "sensor-c", &data.messages[4_500..]).await;
    let total = eventually("the API to count all 6,000 readings", Duration::from_secs(60), || async {
        let total = aggregator.total_readings().await;
        (total == 6_000).then_some(total)
    })
    .await;
    assert_eq!(total, 6_000);
    eventually("the spool to empty", Duration::from_secs(30), || async {
        (agent.metric("tributary_agent_spool_readings").await == 0.0).then_some(())
    })
    .await;

    // A crash after the aggregator logged a batch but before the agent deleted it makes the agent
    // send it again. Replaying the snapshot does exactly that, for 3,500+ readings at once.
    agent.process.kill9();
    std::fs::remove_dir_all(&agent.data_dir).unwrap();
    copy_dir(&snapshot, &agent.data_dir);
    agent.restart().await;
    eventually("the replayed spool to be acknowledged", Duration::from_secs(30), || async {
        (agent.metric("tributary_agent_spool_readings").await == 0.0
            && agent.metric("tributary_agent_readings_forwarded_total").await > 0.0)
            .then_some(())
    })
    .await;
    // Give the processor time to (wrongly) count anything twice before checking.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let duplicates = aggregator.metric("tributary_ingest_readings_total{result=\"duplicate\"}").await;
    assert!(
        duplicates >= replayed as f64,
        "the aggregator dropped {duplicates} resent readings, expected >= {replayed}"
    );

    assert_eq!(aggregator.sensor_counts().await, data.counts, "per-sensor counts: nothing lost, nothing doubled");
    assert_eq!(aggregator.log_contents().1, 6_000, "the log holds each reading once");
    let (_, agents) = aggregator.get("/api/v1/agents").await;
    assert_eq!(agents[0]["id"], "gw-1");
    assert_eq!(agents[0]["readings"], 6_000);
    for (sensor, expected) in &data.windows {
        let counts: BTreeMap<i64, u64> = expected.iter().map(|(start, w)| (*start, w.0)).collect();
        assert_eq!(aggregator.window_counts(sensor).await, counts, "1-minute windows of {sensor}");
    }
    // One window in full: count, min, max, mean, end.
    let (start, (count, min, max, sum)) = data.windows["room3/temp"].iter().nth(2).map(|(s, w)| (*s, *w)).unwrap();
    let (_, windows) =
        aggregator.get(&format!("/api/v1/sensors/room3%2Ftemp/windows?size=1m&from={start}&to={}", start + 1)).await;
    assert_eq!(windows.as_array().map(Vec::len), Some(1), "{windows}");
    assert_eq!(windows[0]["end"], start + 60_000);
    assert_eq!(windows[0]["count"], count);
    assert_eq!(windows[0]["min"], min);
    assert_eq!(windows[0]["max"], max);
    assert!((windows[0]["mean"].as_f64().unwrap() - sum / count as f64).abs() < 1e-9);
    assert!(agent.process.is_running() && aggregator.process.is_running());
}
