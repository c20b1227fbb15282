//! `[spool] max_age`: while the aggregator is away, readings older than it leave the spool, oldest
//! first, and are counted; when it returns, the newer readings arrive and the aggregator lists
//! what went as a gap (`GET /api/v1/gaps`), with what the agent reported about it: why, which
//! sensors, which event times.

use std::time::Duration;

use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish};

const TOKEN: &str = "secret-gw-1";

fn messages(sensor: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|i| (format!("sensors/{sensor}"), format!("{}", 20.0 + i as f64 / 10.0).into_bytes())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_older_than_max_age_leave_the_spool_and_the_aggregator_lists_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    aggregator.process.kill9();
    let agent =
        Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, "[spool]\nmax_age = \"2s\"\n")
            .await;
    let spooled = |n: f64| {
        let agent = &agent;
        async move { (agent.metric("tributary_agent_spool_readings").await == n).then_some(()) }
    };
    let published = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    publish(agent.mqtt_port, "old", &messages("old/level", 300)).await;
    eventually("the old readings to be stored", Duration::from_secs(30), || spooled(300.0)).await;

    // Older than max_age now: the next commit drops them, and only them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publish(agent.mqtt_port, "new", &messages("new/level", 200)).await;
    eventually("the old readings to age out", Duration::from_secs(30), || spooled(200.0)).await;
    assert_eq!(agent.metric("tributary_agent_spool_dropped_readings_total").await, 300.0);

    aggregator.restart().await;
    eventually("the new readings to arrive", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 200).then_some(())
    })
    .await;
    assert_eq!(aggregator.sensor_counts().await.keys().collect::<Vec<_>>(), ["new/level"]);
    let (status, gaps) = aggregator.get("/api/v1/gaps?agent=gw-1").await;
    assert_eq!(status, 200, "{gaps}");
    let ranges: Vec<(u64, u64)> = gaps
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["from_seq"].as_u64().unwrap(), g["to_seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranges, [(0, 300)], "{gaps}");
    // The agent's report arrives once the link is back (at most a second after an ack).
    let report = eventually("the agent's gap report", Duration::from_secs(30), || async {
        let (_, gaps) = aggregator.get("/api/v1/gaps?agent=gw-1").await;
        gaps[0]["reports"].as_array().and_then(|r| r.first().cloned())
    })
    .await;
    assert_eq!((report["from_seq"].as_u64(), report["to_seq"].as_u64()), (Some(0), Some(300)), "{report}");
    assert_eq!((report["reason"].as_str(), report["readings"].as_u64()), (Some("max_age"), Some(300)), "{report}");
    assert_eq!(report["sensors"], serde_json::json!(["old/level"]), "{report}");
    // Stamped on arrival at the agent: within the seconds the old readings were published in.
    let (first, last) = (report["first_ts"].as_i64().unwrap(), report["last_ts"].as_i64().unwrap());
    assert!(published - 1_000 <= first && first <= last && last <= published + 10_000, "{report}");
}
