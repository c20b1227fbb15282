//! Live data is never stuck behind a backlog: after an outage the agent sends the newest readings
//! first and drains the backlog oldest first with the rest, so the dashboard is current within
//! seconds of the link returning while history fills in, and every reading still arrives once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tributary_tests::{AckedPublisher, Agent, Aggregator, MqttInput, eventually, publish};

const TOKEN: &str = "secret-gw-1";
/// The backlog: an hour of event time, one reading a second from each of 50 sensors, sent as one
/// message a second holding every sensor's field (`plant/s00` .. `plant/s49`).
const SENSORS: usize = 50;
const SECONDS: usize = 3_600;
const BACKLOG: u64 = (SENSORS * SECONDS) as u64;
/// The live sensor, publishing a reading every 200 ms whose value is its index.
const LIVE: &str = "live/temp";
/// Small blocks and requests: draining the backlog takes 3,600 requests, several seconds, so
/// an oldest-first forwarder shows the live reading only long after the link returned.
const AGENT_EXTRA: &str = "[spool]\nmax_block_readings = 50\n";
const BATCH_MAX_READINGS: usize = 50;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn backlog() -> Vec<(String, Vec<u8>)> {
    let start = now_ms() - 3_600_000;
    (0..SECONDS)
        .map(|s| {
            let fields: Vec<String> = (0..SENSORS).map(|i| format!("\"s{i:02}\": {}", (s * 7 + i) % 100)).collect();
            let ts = start + s as i64 * 1_000;
            ("sensors/plant".to_string(), format!("{{\"ts\": {ts}, {}}}", fields.join(", ")).into_bytes())
        })
        .collect()
}

/// A sensor publishing every 200 ms over one MQTT connection until stopped; records when each
/// reading (value = index) went out.
struct LiveSensor {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl LiveSensor {
    fn start(port: u16) -> LiveSensor {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (stopped, record) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let publisher = AckedPublisher::connect(port, "live-sensor");
            let mut i = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                publisher.publish(i, &format!("sensors/{LIVE}"), format!("{i}").into_bytes()).await;
                record.lock().unwrap().push(Instant::now());
                i += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            publisher.finish(Duration::from_secs(10)).await
        });
        LiveSensor { stop, sent, task }
    }

    fn published(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    /// The first reading published at or after `t`: (index, when).
    fn first_after(&self, t: Instant) -> Option<(u64, Instant)> {
        let sent = self.sent.lock().unwrap();
        sent.iter().position(|at| *at >= t).map(|i| (i as u64, sent[i]))
    }

    /// Stops publishing; the indices the broker acknowledged.
    async fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("live sensor task")
    }
}

/// Readings of the backlog's sensors the API has processed.
fn backlog_processed(counts: &BTreeMap<String, u64>) -> u64 {
    counts.iter().filter(|(id, _)| id.starts_with("plant/")).map(|(_, n)| n).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_reading_overtakes_an_hour_of_backlog_when_the_link_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    aggregator.process.kill9();
    let mut agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, AGENT_EXTRA).await;
    // The harness closes [upstream] before `extra`: set the request size in its file and restart.
    agent.process.terminate();
    let config = std::fs::read_to_string(&agent.config_path).unwrap();
    let config =
        config.replacen("[upstream]\n", &format!("[upstream]\nbatch_max_readings = {BATCH_MAX_READINGS}\n"), 1);
    std::fs::write(&agent.config_path, config).unwrap();
    agent.restart().await;

    // The link is down: the live sensor keeps publishing while an hour of backlog piles up.
    let live = LiveSensor::start(agent.mqtt_port);
    // In slices the agent takes in before the next: the embedded broker evicts what queues up.
    let mut sent = 0u64;
    for slice in backlog().chunks(300) {
        publish(agent.mqtt_port, "plant", slice).await;
        sent += (slice.len() * SENSORS) as u64;
        eventually("the backlog to be spooled", Duration::from_secs(60), || async {
            // At most one live reading is spooled before it is counted here, and backlog readings come
            // 50 to a message: this holds only once the whole slice is spooled.
            let live_before = live.published() as f64;
            let spooled = agent.metric("tributary_agent_readings_spooled_total").await;
            (spooled >= sent as f64 + live_before).then_some(())
        })
        .await;
    }
    assert_eq!(agent.metric("tributary_agent_broker_dropped_total").await, 0.0);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The link returns.
    aggregator.restart().await;
    let link_back = Instant::now();
    let (index, published_at) = eventually("a live reading after the link returned", Duration::from_secs(5), || {
        let found = live.first_after(link_back);
        async move { found }
    })
    .await;
    let visible_at = eventually("the live reading in the API", Duration::from_secs(60), || async {
        let (_, sensor) = aggregator.get(&format!("/api/v1/sensors/{}", LIVE.replace('/', "%2F"))).await;
        sensor["last_value"].as_f64().is_some_and(|v| v >= index as f64).then(Instant::now)
    })
    .await;
    let processed = backlog_processed(&aggregator.sensor_counts().await);
    let forwarded = agent.metric("tributary_agent_readings_forwarded_total").await;
    eprintln!(
        "live reading #{index} visible {:?} after the link returned ({:?} after it was published); \
         by then {processed} of {BACKLOG} backlog readings processed, {forwarded} readings forwarded",
        visible_at - link_back,
        visible_at - published_at
    );
    assert!(
        visible_at - link_back <= Duration::from_secs(2),
        "live reading #{index} took {:?} after the link returned",
        visible_at - link_back
    );
    // Otherwise the test would prove nothing: the backlog is still on its way.
    assert!(processed < BACKLOG, "the backlog had already drained: {processed}");
    assert!(forwarded < BACKLOG as f64, "the backlog had already been forwarded: {forwarded}");

    // History fills in: every reading exactly once, no hole left at the aggregator.
    let drain_start = Instant::now();
    eventually("the backlog to drain", Duration::from_secs(120), || async {
        (backlog_processed(&aggregator.sensor_counts().await) == BACKLOG).then_some(())
    })
    .await;
    eprintln!("backlog processed {:?} after the live reading was visible", drain_start.elapsed());
    let acked = live.stop().await;
    let mut expected: BTreeMap<String, u64> =
        (0..SENSORS).map(|i| (format!("plant/s{i:02}"), SECONDS as u64)).collect();
    expected.insert(LIVE.to_string(), acked.len() as u64);
    let counts = eventually("every live reading", Duration::from_secs(30), || async {
        let counts = aggregator.sensor_counts().await;
        (counts == expected).then_some(counts)
    })
    .await;
    assert_eq!(counts, expected, "per-sensor counts: nothing lost, nothing doubled");
    let total = BACKLOG + acked.len() as u64;
    assert_eq!(aggregator.log_contents().1 as u64, total, "the log holds each reading once");
    assert_eq!(aggregator.log_gap_readings(), 0, "every hole the live requests opened was filled");
    let opened = aggregator.metric("tributary_ingest_gap_readings_total").await;
    let filled = aggregator.metric("tributary_ingest_gap_filled_readings_total").await;
    assert!(opened > 0.0 && filled == opened, "holes opened {opened}, filled {filled}");

    // In the log, the live reading sits ahead of most of the backlog.
    let logged = aggregator.logged_readings();
    let live_at = logged.iter().position(|(s, _, v)| s == LIVE && *v == index as f64).expect("the live reading");
    let behind = logged[live_at..].iter().filter(|(s, _, _)| s.starts_with("plant/")).count() as u64;
    assert!(behind > BACKLOG / 2, "only {behind} backlog readings were logged after live reading #{index}");

    // The agent: live readings counted, and everything delivered is deleted from the spool,
    // the ranges sent live first included.
    assert!(agent.metric("tributary_agent_readings_forwarded_live_first_total").await > 0.0);
    eventually("the spool to empty", Duration::from_secs(30), || async {
        (agent.metric("tributary_agent_spool_readings").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(agent.metric("tributary_agent_readings_forwarded_total").await as u64, total);
    assert!(agent.process.is_running() && aggregator.process.is_running());
}
