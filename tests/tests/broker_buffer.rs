//! `mqtt.broker_buffer_bytes`: the embedded broker's in-memory log of what the agent has not read.
//! rumqttd evicts the oldest messages of a full log whether read or not; the agent's connections
//! wait instead while the agent is that far behind, so a log far smaller than a burst loses
//! nothing: the clients are slowed down (counted as
//! `tributary_agent_broker_backlog_waits_total`).

use std::time::Duration;

use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish};

/// `n` messages of about 200 bytes, one reading each (`value` is the index; `note` pads).
fn burst(n: u64) -> Vec<(String, Vec<u8>)> {
    let pad = "x".repeat(160);
    (0..n)
        .map(|i| ("sensors/burst/temp".to_string(), format!("{{\"value\": {i}, \"note\": \"{pad}\"}}").into_bytes()))
        .collect()
}

/// Two publishers' bursts of `n` each; with `all`, waits for every reading at the aggregator (else
/// for the metrics to show them all taken or dropped). The agent's backlog waits and evictions.
async fn run(buffer_bytes: Option<usize>, n: u64, all: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let extra = buffer_bytes.map(|b| format!("broker_buffer_bytes = {b}\n")).unwrap_or_default();
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, &extra).await;
    // Two publishers at once, 50 messages in flight each: up to 20 KiB unread at times.
    let (a, b) = (burst(n), burst(n));
    tokio::join!(publish(agent.mqtt_port, "burst-a", &a), publish(agent.mqtt_port, "burst-b", &b));
    if !all {
        return (
            agent.metric("tributary_agent_broker_backlog_waits_total").await,
            agent.metric("tributary_agent_broker_dropped_total").await,
        );
    }
    eventually("every reading at the aggregator", Duration::from_secs(60), || async {
        (aggregator.total_readings().await == 2 * n).then_some(())
    })
    .await;
    let mut values: Vec<u64> = aggregator.logged_readings().iter().map(|r| r.2 as u64).collect();
    values.sort();
    let want: Vec<u64> = (0..n).flat_map(|i| [i, i]).collect();
    assert_eq!(values, want, "each reading of both publishers once");
    (
        agent.metric("tributary_agent_broker_backlog_waits_total").await,
        agent.metric("tributary_agent_broker_dropped_total").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_broker_buffer_slows_clients_down() {
    // 16 KiB, the least: clients may be at most 8 KiB (about 40 of these messages) ahead of the agent.
    let (waits, _) = run(Some(16384), 2000, false).await;
    assert!(waits > 0.0, "with 16 KiB the connections must have waited for the agent at least once");
}

/// The smallest log under two bursting clients: every reading arrives once, nothing evicted. (A
/// first version of the flow control lost a few messages here about one run in five, when the
/// agent's link stalled with messages in rumqttd's log; see `LinkReader::settle`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_broker_buffer_loses_nothing() {
    let (_, dropped) = run(Some(16384), 2000, true).await;
    assert_eq!(dropped, 0.0, "nothing evicted unread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_buffer_must_hold_a_few_messages() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "agent_id = \"gw-1\"\ndata_dir = \"data\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\ntoken = \"t\"\n\
         [mqtt]\nbroker_buffer_bytes = 8192\n",
    )
    .unwrap();
    let out = std::process::Command::new(tributary_tests::bin("tributary-agent"))
        .arg("--check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mqtt.broker_buffer_bytes") && stderr.contains("16384"), "{stderr}");
}

/// Started with systemd's default soft limit of 1,024 open files, the agent raises it to the hard
/// limit: its broker takes up to 10,000 device connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_lifts_its_open_file_limit_for_many_clients() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0) };
    let hard = limit.rlim_max;
    assert!(hard > 1_024, "the hard limit ({hard}) leaves nothing to raise");
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    // The agent inherits 1,024 from this process, which then takes its own back.
    let start_with = libc::rlimit { rlim_cur: 1_024, rlim_max: hard };
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &start_with), 0) };
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, "").await;
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0) };
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.process.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let soft: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(soft[3], hard.to_string(), "{line}");
}
