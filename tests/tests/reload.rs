//! SIGHUP on a running agent: new `[[filter]]` rules and `[[serial]]` ports apply without a restart,
//! over MQTT connections that stay up; a configuration with an error is refused and the old one
//! stays in force. Through the real binary, its embedded broker, real pseudo-terminals (socat) and
//! the real aggregator.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tributary_tests::{AckedPublisher, Agent, Aggregator, MqttInput, SerialLine, eventually};

/// An hour ago, on a minute boundary: within validation's bounds.
fn base_ts() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let t = now - 3_600_000;
    t - t % 60_000
}

fn payload(ts: i64, value: f64) -> Vec<u8> {
    format!("{{\"value\": {value:?}, \"ts\": {ts}}}").into_bytes()
}

/// The aggregator's log, per sensor, in log order: values.
fn logged(aggregator: &Aggregator) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (sensor, _, value) in aggregator.logged_readings() {
        out.entry(sensor).or_default().push(value);
    }
    out
}

async fn wait_logged(aggregator: &Aggregator, want: usize) -> BTreeMap<String, Vec<f64>> {
    eventually(&format!("{want} readings in the aggregator's log"), Duration::from_secs(15), || async {
        (aggregator.logged_readings().len() >= want).then_some(())
    })
    .await;
    // A moment for anything that should not be there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    logged(aggregator)
}

/// Rewrites the agent's configuration file and sends it SIGHUP.
fn reconfigure(agent: &Agent, edit: impl FnOnce(String) -> String) {
    let config = edit(std::fs::read_to_string(&agent.config_path).unwrap());
    std::fs::write(&agent.config_path, config).unwrap();
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(agent.process.pid() as i32, libc::SIGHUP) };
}

async fn wait_reloads(agent: &Agent, result: &str, count: f64) {
    let key = format!("tributary_agent_config_reloads_total{{result=\"{result}\"}}");
    eventually(&format!("{key} == {count}"), Duration::from_secs(10), || async {
        (agent.metric(&key).await == count).then_some(())
    })
    .await;
}

async fn start(dir: &Path, extra: &str) -> (Aggregator, Agent) {
    let aggregator = Aggregator::start(dir, &[("gw-1", "secret-gw-1")]).await;
    let agent = Agent::start(dir, "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, extra).await;
    (aggregator, agent)
}

const ABOVE_MAX: &str = "tributary_agent_filter_dropped_total{filter=\"range\",reason=\"above_max\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_added_by_sighup_applies_to_later_readings_on_the_same_mqtt_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (aggregator, agent) = start(dir.path(), "").await;
    let pid = agent.process.pid();
    // One connection for the whole test: the publisher stops at the first connection error rather
    // than reconnect, and `finish` fails if it did.
    let publisher = AckedPublisher::connect(agent.mqtt_port, "sensor-1");
    let t = base_ts();
    for (i, value) in [10.0, 200.0].into_iter().enumerate() {
        publisher.publish(i as u64, "sensors/room/t", payload(t + i as i64, value)).await;
    }
    assert_eq!(wait_logged(&aggregator, 2).await["room/t"], [10.0, 200.0], "no filter before the reload");

    reconfigure(&agent, |config| {
        // A restart-only change rides along: it must be named, and change nothing now.
        config.replace("retry_max = \"500ms\"", "retry_max = \"600ms\"")
            + "[[filter]]\nsensor = \"room/*\"\nrange = { max = 100.0 }\n"
    });
    wait_reloads(&agent, "applied", 1.0).await;
    for (i, value) in [20.0, 300.0, 30.0].into_iter().enumerate() {
        let i = i as u64 + 2;
        publisher.publish(i, "sensors/room/t", payload(t + i as i64, value)).await;
    }
    let acked = publisher.finish(Duration::from_secs(10)).await;
    assert_eq!(acked, [0, 1, 2, 3, 4], "every message acknowledged on the first connection");
    assert_eq!(wait_logged(&aggregator, 4).await["room/t"], [10.0, 200.0, 20.0, 30.0]);
    assert_eq!(agent.metric(ABOVE_MAX).await, 1.0);
    assert_eq!(agent.metric("tributary_agent_config_reloads_total{result=\"refused\"}").await, 0.0);

    assert_eq!(agent.process.pid(), pid, "the same process");
    let log = agent.process.log_text();
    assert!(log.contains("the new [[filter]] rules apply now"), "{log}");
    assert!(log.contains("upstream.retry_max changed; that applies at the next restart"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_ports_added_and_removed_by_sighup_start_and_stop_and_the_others_read_on() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, removed, added) = (
        SerialLine::start(dir.path(), "tty-kept"),
        SerialLine::start(dir.path(), "tty-removed"),
        SerialLine::start(dir.path(), "tty-added"),
    );
    let section = |line: &SerialLine, prefix: &str| {
        format!(
            "[[serial]]\npath = {:?}\nformat = \"lines\"\nsensor_prefix = {prefix:?}\n",
            line.agent_end.display().to_string()
        )
    };
    let (kept_section, removed_section, added_section) =
        (section(&kept, "kept"), section(&removed, "removed"), section(&added, "added"));
    let (aggregator, agent) = start(dir.path(), &format!("{kept_section}{removed_section}")).await;
    let metric = |name: &str, port: &str| format!("tributary_agent_serial_{name}{{port=\"{port}\"}}");
    for port in ["tty-kept-agent", "tty-removed-agent"] {
        eventually(&format!("{port} open"), Duration::from_secs(10), || async {
            (agent.metric(&metric("open", port)).await == 1.0).then_some(())
        })
        .await;
    }
    // A newline first: the first line after an open is dropped as possibly cut.
    removed.write(b"\nt=1\nt=2\n");

    // The kept port's device writes a reading every 20 ms all through the reload.
    let device = std::sync::Arc::new(kept);
    let writer = {
        let device = device.clone();
        tokio::spawn(async move {
            device.write(b"\n");
            for i in 0..100 {
                device.write(format!("t={i}\n").as_bytes());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    reconfigure(&agent, |config| config.replace(&removed_section, &added_section));
    wait_reloads(&agent, "applied", 1.0).await;
    eventually("the added port open, the removed one closed", Duration::from_secs(10), || async {
        let open = agent.metric(&metric("open", "tty-added-agent")).await == 1.0;
        let closed = agent.metric(&metric("open", "tty-removed-agent")).await == 0.0;
        (open && closed).then_some(())
    })
    .await;
    added.write(b"\nt=7\n");
    writer.await.unwrap();

    let got = wait_logged(&aggregator, 2 + 100 + 1).await;
    assert_eq!(got["removed/t"], [1.0, 2.0], "what the removed port read before it stopped");
    assert_eq!(got["added/t"], [7.0]);
    let want: Vec<f64> = (0..100).map(f64::from).collect();
    assert_eq!(got["kept/t"], want, "the kept port read on without a gap");
    assert_eq!(agent.metric(&metric("opens_total", "tty-kept-agent")).await, 1.0, "never reopened");
    assert_eq!(agent.metric(&metric("opens_total", "tty-removed-agent")).await, 1.0, "not reopened");
    let log = agent.process.log_text();
    assert!(log.contains("serial ports changed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_with_an_error_is_refused_and_the_old_filters_stay() {
    let dir = tempfile::tempdir().unwrap();
    let filter = "[[filter]]\nsensor = \"room/*\"\nrange = { max = 100.0 }\n";
    let (aggregator, mut agent) = start(dir.path(), filter).await;
    let pid = agent.process.pid();
    let publisher = AckedPublisher::connect(agent.mqtt_port, "sensor-1");

    reconfigure(&agent, |config| config.replace("max = 100.0", "min = 5.0, max = 1.0"));
    wait_reloads(&agent, "refused", 1.0).await;
    let t = base_ts();
    for (i, value) in [50.0, 500.0, 60.0].into_iter().enumerate() {
        publisher.publish(i as u64, "sensors/room/t", payload(t + i as i64, value)).await;
    }
    publisher.finish(Duration::from_secs(10)).await;
    assert_eq!(wait_logged(&aggregator, 2).await["room/t"], [50.0, 60.0], "the old filter still applies");
    assert_eq!(agent.metric(ABOVE_MAX).await, 1.0);
    assert_eq!(agent.metric("tributary_agent_config_reloads_total{result=\"applied\"}").await, 0.0);

    assert!(agent.process.is_running(), "the agent runs on");
    assert_eq!(agent.process.pid(), pid);
    let log = agent.process.log_text();
    assert!(log.contains("configuration refused, the one in force stays"), "{log}");
    assert!(log.contains("filter[0].range") && log.contains("min 5 is above max 1"), "the log says why: {log}");
}
