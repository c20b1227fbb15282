//! The gateway's own health as readings: `_agent/<id>/cpu`, `rss_bytes`, `disk_free_bytes`,
//! `spool_bytes`, `spool_readings`, `clock_synced` reach the aggregator like any sensor, and an
//! alert rule on them fires there; the agent's batches tell the aggregator its spool's backlog.

use std::time::Duration;

use tributary_tests::{Agent, Aggregator, MqttInput, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_its_own_health_as_sensors_the_aggregator_alerts_on() {
    let dir = tempfile::tempdir().unwrap();
    // A threshold every real disk is below: the rule must fire from the agent's reading.
    let rule = "[[alerts]]\nname = \"disk-low\"\nsensor = \"_agent/*/disk_free_bytes\"\nbelow = 1e18\n";
    let aggregator = Aggregator::start_with(dir.path(), &[("gw-1", "t-health")], rule).await;
    let _agent = Agent::start(
        dir.path(),
        "gw-1",
        "t-health",
        &aggregator.url(),
        MqttInput::Embedded,
        "[health]\ninterval = \"200ms\"\n",
    )
    .await;
    let names = ["cpu", "rss_bytes", "disk_free_bytes", "spool_bytes", "spool_readings", "clock_synced"];
    let counts = eventually("every health sensor at the aggregator", Duration::from_secs(30), || async {
        let counts = aggregator.sensor_counts().await;
        names.iter().all(|n| counts.get(&format!("_agent/gw-1/{n}")).is_some_and(|c| *c >= 2)).then_some(counts)
    })
    .await;
    assert_eq!(counts.keys().filter(|k| k.starts_with("_agent/gw-1/")).count(), names.len(), "{counts:?}");
    let (_, rss) = aggregator.get("/api/v1/sensors/_agent%2Fgw-1%2Frss_bytes").await;
    let rss = rss["last_value"].as_f64().unwrap();
    assert!(rss > 1e6 && rss < 1e9, "the agent's RSS: {rss}");
    let (_, synced) = aggregator.get("/api/v1/sensors/_agent%2Fgw-1%2Fclock_synced").await;
    assert!([0.0, 1.0].contains(&synced["last_value"].as_f64().unwrap()), "{synced}");
    // Its batches carry what its spool still holds: the fleet view shows the backlog and state.
    let (_, agents) = aggregator.get("/api/v1/agents").await;
    assert!(agents[0]["backlog_readings"].is_u64(), "{agents}");
    assert_eq!(agents[0]["state"], "online", "{agents}");
    eventually("the disk alert firing", Duration::from_secs(20), || async {
        let (_, alerts) = aggregator.get("/api/v1/alerts?state=firing").await;
        alerts
            .as_array()?
            .iter()
            .any(|a| a["rule"] == "disk-low" && a["sensor"] == "_agent/gw-1/disk_free_bytes")
            .then_some(())
    })
    .await;
}
