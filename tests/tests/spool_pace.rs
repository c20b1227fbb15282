//! The spool's pace under load (`spool.gather_interval`): where nothing waits for a commit (the
//! embedded broker), a busy gateway's commits each carry a few hundred readings, so a commit's fixed
//! costs (WAL pages, a wake-up, a request to the aggregator) are shared by many; in client mode,
//! where each PUBACK waits for its commit, commits keep coming every `spool.commit_interval`, so a
//! broker's inflight window is not held for the longer interval. A quiet gateway is unchanged.

use std::time::Duration;

use tributary_tests::{Agent, Aggregator, Mosquitto, MqttInput, bin, eventually, publish};

const TOKEN: &str = "secret-gw-1";

async fn arrived(aggregator: &Aggregator, n: u64, within: Duration) {
    eventually(&format!("{n} readings at the aggregator"), within, || async {
        (aggregator.total_readings().await >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_embedded_broker_gathers_hundreds_of_readings_a_commit_and_a_lone_one_still_goes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    // Spool defaults, but for a quiet interval no test outlives: a lone reading that arrives at all
    // was committed at once, not held for the max.
    let extra = "[spool]\nmax_commit_interval = \"60s\"\n";
    let agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, extra).await;

    // A steady 10,000 readings/s for 3 s: 1,000 devices, a QoS-1 message (one reading) every 100 ms each.
    let (devices, count) = (1_000u64, 30u64);
    let broker = format!("127.0.0.1:{}", agent.mqtt_port);
    let (devices_arg, count_arg) = (devices.to_string(), count.to_string());
    let mut sim = std::process::Command::new(bin("tributary-sim"));
    sim.args(["mqtt", "--broker", &broker, "--interval", "100ms", "--format", "object"]);
    sim.args(["--devices", &devices_arg, "--count", &count_arg]);
    let output = tokio::task::spawn_blocking(move || sim.output().expect("run tributary-sim")).await.unwrap();
    assert!(output.status.success(), "tributary-sim failed: {}", String::from_utf8_lossy(&output.stderr));
    let sent = devices * count;
    arrived(&aggregator, sent, Duration::from_secs(60)).await;
    assert_eq!(aggregator.total_readings().await, sent, "each reading once");

    // At 10,000 readings/s: 250 readings a commit with the default 25 ms (50 at commit_interval's
    // 5 ms, before gather_interval). Deletes of what the aggregator acknowledged share those commits.
    let spooled = agent.metric("tributary_agent_readings_spooled_total").await;
    let commits = agent.metric("tributary_agent_spool_commits_total").await;
    assert_eq!(spooled, sent as f64);
    assert!(spooled / commits >= 100.0, "{commits} commits for {spooled} readings");

    // A quiet spell, then a lone reading: committed at once, not after the 60 s quiet interval.
    tokio::time::sleep(Duration::from_secs(2)).await;
    publish(agent.mqtt_port, "door", &[("sensors/door/open".into(), b"1".to_vec())]).await;
    arrived(&aggregator, sent + 1, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_commits_every_commit_interval_so_acks_are_not_held_for_the_gather_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).await;
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    // A gather_interval of a second, so that a client mode waiting for it shows plainly: each round
    // below would take a second.
    let extra = "[spool]\ngather_interval = \"1s\"\n";
    let input = MqttInput::Client { port: mosquitto.port };
    let agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), input, extra).await;
    let spooled = || agent.metric("tributary_agent_readings_spooled_total");
    // The agent has subscribed once a probe goes through (one published before is not kept).
    eventually("the agent's subscription", Duration::from_secs(30), || async {
        publish(mosquitto.port, "probe", &[("sensors/probe/up".into(), b"1".to_vec())]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        (aggregator.total_readings().await > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probes = spooled().await as u64;

    // 30 rounds of a broker's inflight window (Mosquitto's default 20), each published once the
    // round before is committed, as a broker holding back more messages until the PUBACKs of those
    // in flight would. At commit_interval (5 ms) a round takes a few milliseconds of commit; at the
    // gather interval, a second, and the 30 rounds more than the 20 s allowed here.
    let (rounds, window) = (30u64, 20u64);
    let started = std::time::Instant::now();
    for round in 0..rounds {
        let messages: Vec<_> = (0..window)
            .map(|i| (format!("sensors/line{}/pressure", i % 4), format!("{}.5", round * window + i).into_bytes()))
            .collect();
        publish(mosquitto.port, "plc", &messages).await;
        let expected = probes + (round + 1) * window;
        while (spooled().await as u64) < expected {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "round {round} of {rounds} not committed after 20 s: client mode waits for gather_interval"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let n = rounds * window;
    let delivered = || async {
        let counts = aggregator.sensor_counts().await;
        counts.iter().filter(|(sensor, _)| sensor.starts_with("line")).map(|(_, n)| n).sum::<u64>()
    };
    eventually(&format!("{n} readings at the aggregator"), Duration::from_secs(30), || async {
        (delivered().await >= n).then_some(())
    })
    .await;
    assert_eq!(delivered().await, n, "each reading once");
}
