//! The forwarder against what stands between it and the aggregator: proxies that refuse, body
//! limits, a block the aggregator refuses for good, and long idle periods.

use std::time::{Duration, Instant};

use tributary_tests::{Agent, Aggregator, MqttInput, Refusal, RefusingProxy, eventually, publish};

const TOKEN: &str = "secret-gw-1";

fn messages(sensor: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|i| (format!("sensors/{sensor}"), format!("{}.5", i % 90).into_bytes())).collect()
}

async fn spooled(agent: &Agent, n: f64) {
    eventually("the readings to be committed to the spool", Duration::from_secs(30), || async {
        (agent.metric("tributary_agent_readings_spooled_total").await == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_errors_are_retried_with_backoff_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    // Mounted under a path, as behind a reverse proxy: the agent must keep it (upstream.url has no
    // trailing slash).
    let proxy = RefusingProxy::start(&aggregator.url(), "/tributary").await;
    // Every request refused as too large, whatever its size: an agent that retries at once sends
    // hundreds a second. Retry delays here are 50 ms doubling to 500 ms: a few a second.
    proxy.refuse(&[Refusal::TooLarge]);
    let agent = Agent::start(dir.path(), "gw-1", TOKEN, &proxy.url(), MqttInput::Embedded, "").await;
    let mut published = messages("line1/flow", 120);
    published.extend(messages("line2/flow", 180));
    publish(agent.mqtt_port, "plc", &published).await;
    eventually("the proxy to refuse a few requests", Duration::from_secs(20), || async {
        (proxy.seen().len() >= 4).then_some(())
    })
    .await;
    let window = Duration::from_secs(3);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let in_window = proxy.seen().iter().filter(|r| r.at >= start && r.at < start + window).count();
    assert!((2..=60).contains(&in_window), "{in_window} requests in {window:?}");

    // A proxy's own 400 (plain text) and 502 are not verdicts on the data.
    proxy.refuse(&[Refusal::PlainBadRequest, Refusal::BadGateway]);
    let seen = proxy.seen().len();
    eventually("the proxy to refuse a few more", Duration::from_secs(20), || async {
        (proxy.seen().len() >= seen + 4).then_some(())
    })
    .await;
    assert_eq!(aggregator.total_readings().await, 0);

    proxy.refuse(&[]);
    eventually("all 300 readings once the proxy behaves", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 300).then_some(())
    })
    .await;
    assert_eq!(agent.metric("tributary_agent_dead_letter_readings_total").await, 0.0, "proxy errors are not verdicts");
    let metrics = agent.metrics().await;
    for outcome in ["too_large", "bad_request", "server_error", "ok"] {
        let key = format!("tributary_agent_forward_requests_total{{outcome=\"{outcome}\"}}");
        assert!(metrics.get(&key).copied().unwrap_or(0.0) >= 1.0, "{key}: {metrics:?}");
    }
    let (ok, out, err) = agent.cli(&["spool", "dead-letters", "list"]);
    assert!(ok && out.contains("no dead letters"), "{out}{err}");
    assert!(!agent.process.log_text().contains("never sent"), "ordinary acks are not suspect");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = aggregator.sensor_counts().await;
    assert_eq!((counts["line1/flow"], counts["line2/flow"]), (120, 180));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_too_large_for_a_proxy_is_split_and_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    let proxy = RefusingProxy::start(&aggregator.url(), "").await;
    const LIMIT: usize = 4 << 10;
    proxy.limit_body(Some(LIMIT));
    // A one-second group commit puts a burst into a few large blocks.
    let extra = "[spool]\ncommit_interval = \"1s\"\n";
    let agent = Agent::start(dir.path(), "gw-1", TOKEN, &proxy.url(), MqttInput::Embedded, extra).await;
    let published: Vec<_> = (0..4000)
        .map(|i| {
            (format!("sensors/rack{}/s{i:04}", i % 10), format!("{}", (i * 7919 % 10007) as f64 / 7.0).into_bytes())
        })
        .collect();
    publish(agent.mqtt_port, "rack", &published).await;

    eventually("all 4,000 readings through a proxy that takes 4 KiB", Duration::from_secs(60), || async {
        (aggregator.total_readings().await == 4000).then_some(())
    })
    .await;
    let seen = proxy.seen();
    assert!(
        seen.iter().any(|r| r.status == 413 && r.blocks.len() == 1),
        "a single block was too large for the proxy: {:?}",
        seen.iter().map(|r| (r.status, r.body_len, r.blocks.len())).collect::<Vec<_>>()
    );
    assert!(seen.iter().filter(|r| r.status == 200).all(|r| r.body_len <= LIMIT));
    assert_eq!(aggregator.log_contents().1, 4000, "each reading once");
    assert_eq!(agent.metric("tributary_agent_dead_letter_readings_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_reading_after_an_idle_period_is_forwarded_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    let agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, "").await;
    // A sparse sensor: one reading, then silence. Each must arrive without a later one to push it.
    for round in 1..=4u64 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        publish(agent.mqtt_port, "sparse", &messages("attic/temp", 1)).await;
        eventually(&format!("reading {round} to arrive on its own"), Duration::from_secs(10), || async {
            (aggregator.total_readings().await == round).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_the_aggregator_refuses_is_dead_lettered_alone_then_listed_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    let proxy = RefusingProxy::start(&aggregator.url(), "").await;
    // The link is down while three blocks pile up, so that they travel in one request.
    proxy.refuse(&[Refusal::BadGateway]);
    let mut agent = Agent::start(dir.path(), "gw-1", TOKEN, &proxy.url(), MqttInput::Embedded, "").await;
    publish(agent.mqtt_port, "s1", &messages("good/a", 10)).await;
    spooled(&agent, 10.0).await;
    publish(agent.mqtt_port, "s2", &messages("good/b", 10)).await;
    spooled(&agent, 20.0).await;
    publish(agent.mqtt_port, "s3", &messages("poison/x", 1)).await;
    spooled(&agent, 21.0).await;

    proxy.refuse_blocks_of_sensor(Some("poison"));
    proxy.refuse(&[]);
    eventually(
        "the good neighbours to arrive and the refused block to be set aside",
        Duration::from_secs(30),
        || async {
            (aggregator.total_readings().await == 20
                && agent.metric("tributary_agent_dead_letter_readings_total").await == 1.0)
                .then_some(())
        },
    )
    .await;
    assert!(proxy.seen().iter().any(|r| r.status == 400 && r.blocks.len() >= 3), "one request held all three");
    assert_eq!(agent.metric("tributary_agent_forward_requests_total{outcome=\"invalid_block\"}").await, 1.0);

    let (ok, out, err) = agent.cli(&["spool", "dead-letters", "list"]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains("stand-in verdict")).unwrap_or_else(|| panic!("no dead letter:\n{out}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&fields[..2], ["20", "1"], "first_seq and count: {row}");

    let (ok, _, err) = agent.cli(&["spool", "dead-letters", "retry"]);
    assert!(!ok && err.contains("stop it first"), "retry must refuse while the agent runs: {err}");

    agent.process.terminate();
    let (ok, out, err) = agent.cli(&["spool", "dead-letters", "retry", "--first-seq", "20"]);
    assert!(ok && out.contains("moved 1"), "{out}{err}");
    let (ok, out, _) = agent.cli(&["spool", "dead-letters", "list"]);
    assert!(ok && out.contains("no dead letters"), "{out}");

    // Fixed upstream: the retried block goes out under its own sequence number.
    proxy.refuse_blocks_of_sensor(None);
    agent.restart().await;
    eventually("the retried reading", Duration::from_secs(30), || async {
        (aggregator.sensor_counts().await.get("poison/x") == Some(&1)).then_some(())
    })
    .await;
    assert_eq!(aggregator.total_readings().await, 21);
    assert_eq!(aggregator.log_contents().1, 21);
}
