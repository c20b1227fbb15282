//! A quiet gateway: the spool lets a few readings gather into one commit (up to
//! `spool.max_commit_interval`) and fsyncs at most every `spool.sync_interval`, to spare the SD
//! card. The dashboard must still see each reading within the interval, and a stop must still
//! commit, and later forward, what the agent took.

use std::time::{Duration, Instant};

use tributary_tests::{AckedPublisher, Agent, Aggregator, MqttInput, eventually, publish};

const TOKEN: &str = "secret-gw-1";

/// Waits until the aggregator counts `n` readings; how long that took.
async fn arrived(aggregator: &Aggregator, n: u64, within: Duration) -> Duration {
    let start = Instant::now();
    eventually(&format!("{n} readings at the aggregator"), within, || async {
        (aggregator.total_readings().await >= n).then_some(())
    })
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_agent_gathers_readings_into_few_commits_and_forwards_each_within_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    // A minute between fsyncs: forwarding must not wait for them.
    let extra = "[spool]\nmax_commit_interval = \"1s\"\nsync_interval = \"60s\"\n";
    let agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, extra).await;
    // The bound is the interval; the rest is slack for a busy machine (forwarding takes milliseconds).
    let bound = Duration::from_secs(1) + Duration::from_secs(5);

    // One sensor, four readings a second for four seconds.
    let sensor = AckedPublisher::connect(agent.mqtt_port, "attic");
    for i in 0..16u64 {
        sensor.publish(i, "sensors/attic/temp", format!("{}.5", 20 + i % 3).into_bytes()).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(sensor.finish(Duration::from_secs(10)).await.len(), 16);
    let took = arrived(&aggregator, 16, Duration::from_secs(30)).await;
    assert!(took <= bound, "the last reading took {took:?} after its PUBACK");
    // Every reading its own commit would be 16 commits, and deletes besides.
    let commits = agent.metric("tributary_agent_spool_commits_total").await;
    assert!(commits < 12.0, "{commits} commits for 16 readings");

    // After a quiet spell, a lone reading goes at once, without a later one to push it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish(agent.mqtt_port, "attic-2", &[("sensors/attic/temp".into(), b"21.5".to_vec())]).await;
    let took = arrived(&aggregator, 17, Duration::from_secs(30)).await;
    assert!(took <= bound, "a lone reading took {took:?} after its PUBACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_of_a_quiet_agent_commits_what_it_took_and_forwards_it_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    let extra = "[spool]\nmax_commit_interval = \"60s\"\n";
    let mut agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, extra).await;
    // Two quiet seconds, then a reading: committed at once, and the interval grows past 15 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    publish(agent.mqtt_port, "door", &[("sensors/door/open".into(), b"1".to_vec())]).await;
    arrived(&aggregator, 1, Duration::from_secs(30)).await;

    // The aggregator goes away; three more readings, acknowledged by the broker, wait to be committed.
    aggregator.process.kill9();
    let more: Vec<_> = (0..3).map(|i| ("sensors/door/open".to_string(), format!("{}", i % 2).into_bytes())).collect();
    publish(agent.mqtt_port, "door", &more).await;
    assert_eq!(agent.metric("tributary_agent_readings_spooled_total").await, 1.0, "gathering, not committed yet");

    // SIGTERM commits them at once rather than waiting out the interval.
    let status = agent.process.terminate_within(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "the agent did not stop cleanly within 10 s: {status:?}");
    aggregator.restart().await;
    agent.restart().await;
    arrived(&aggregator, 4, Duration::from_secs(30)).await;
    assert_eq!(aggregator.log_contents().1, 4, "each reading once");
}
