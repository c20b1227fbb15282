//! Pre-filters end to end: known sequences published over real MQTT (the agent's embedded broker,
//! or Mosquitto in client mode) or written into a real pseudo-terminal, through the real agent with
//! `[[filter]]` sections, into the real aggregator, whose log must hold exactly what passed.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tributary_tests::{Agent, Aggregator, Mosquitto, MqttInput, SerialLine, eventually, publish};

/// An hour ago, on a minute boundary: old enough for any interval, within validation's bounds.
fn base_ts() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let t = now - 3_600_000;
    t - t % 60_000
}

/// One message per reading, `{"value": v, "ts": t}` on `sensors/<sensor>`, in this order.
fn messages(readings: &[(&str, i64, f64)]) -> Vec<(String, Vec<u8>)> {
    readings
        .iter()
        .map(|(sensor, ts, value)| {
            (format!("sensors/{sensor}"), format!("{{\"value\": {value:?}, \"ts\": {ts}}}").into_bytes())
        })
        .collect()
}

/// The aggregator's log, per sensor, in log order: (ts, value).
fn logged(aggregator: &Aggregator) -> BTreeMap<String, Vec<(i64, f64)>> {
    let mut out: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for (sensor, ts, value) in aggregator.logged_readings() {
        out.entry(sensor).or_default().push((ts, value));
    }
    out
}

/// Waits until the log holds `want` readings (and gives the agent a moment to send any extra),
/// then returns it per sensor.
async fn wait_logged(aggregator: &Aggregator, want: usize) -> BTreeMap<String, Vec<(i64, f64)>> {
    eventually(&format!("{want} readings in the aggregator's log"), Duration::from_secs(20), || async {
        (aggregator.logged_readings().len() >= want).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    logged(aggregator)
}

fn dropped(filter: &str, reason: &str) -> String {
    format!("tributary_agent_filter_dropped_total{{filter=\"{filter}\",reason=\"{reason}\"}}")
}

const FILTERS: &str = r#"
[[filter]]
sensor = "range/*"
range = { min = 0.0, max = 100.0 }
[[filter]]
sensor = "clamp/*"
range = { min = 0.0, max = 100.0, action = "clamp" }
[[filter]]
sensor = "db/*"
deadband = { delta = 0.5, max_silence = "60s" }
[[filter]]
sensor = "spike/*"
spike = { max_jump = 10.0, max_hold = "3s" }
[[filter]]
sensor = "ds/*"
downsample = { interval = "3s", agg = "mean" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregator_holds_exactly_what_the_filters_pass() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, FILTERS).await;
    let t = base_ts();
    let s = 1000;
    let sequence = [
        ("range/a", t, -1.0),
        ("range/a", t + 1, 0.0),
        ("range/a", t + 2, 100.0),
        ("range/a", t + 3, 100.5),
        ("range/a", t + 4, 50.0),
        ("clamp/a", t, -5.0),
        ("clamp/a", t + 1, 105.0),
        ("clamp/a", t + 2, 42.0),
        ("db/a", t, 20.0),
        ("db/a", t + s, 20.2),
        ("db/a", t + 2 * s, 20.5), // a change of exactly delta stays in the band
        ("db/a", t + 3 * s, 21.0),
        ("db/a", t + 63 * s, 21.0), // max_silence after the last one passed: a heartbeat
        ("db/a", t + 64 * s, 20.9),
        ("spike/a", t, 10.0),
        ("spike/a", t + 1, 11.0),
        ("spike/a", t + 2, 80.0),
        ("spike/a", t + 3, 12.0),
        ("spike/a", t + 4, 13.0), // held until max_hold passes
        ("ds/a", t, 1.0),
        ("ds/a", t + 500, 3.0),
        ("ds/a", t + 3 * s, 10.0),
        ("ds/a", t + 7 * s, 7.0), // its interval goes out on the timer
        ("plain/a", t, 1.0),      // no section matches: untouched
        ("plain/a", t + 1, 1.0),
    ];
    let mut all = messages(&sequence);
    // Validation rejects non-finite values before the filters: nothing of them gets through.
    all.push(("sensors/range/a".to_string(), b"NaN".to_vec()));
    all.push(("sensors/clamp/a".to_string(), b"inf".to_vec()));
    publish(agent.mqtt_port, "sensors-1", &all).await;

    let want: BTreeMap<String, Vec<(i64, f64)>> = [
        ("range/a", vec![(t + 1, 0.0), (t + 2, 100.0), (t + 4, 50.0)]),
        ("clamp/a", vec![(t, 0.0), (t + 1, 100.0), (t + 2, 42.0)]),
        ("db/a", vec![(t, 20.0), (t + 3 * s, 21.0), (t + 63 * s, 21.0)]),
        ("spike/a", vec![(t, 10.0), (t + 1, 11.0), (t + 3, 12.0), (t + 4, 13.0)]),
        ("ds/a", vec![(t, 2.0), (t + 3 * s, 10.0), (t + 6 * s, 7.0)]),
        ("plain/a", vec![(t, 1.0), (t + 1, 1.0)]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let total = want.values().map(Vec::len).sum();
    assert_eq!(wait_logged(&aggregator, total).await, want);

    let m = agent.metrics().await;
    for (key, value) in [
        (dropped("range", "below_min"), 1.0),
        (dropped("range", "above_max"), 1.0),
        ("tributary_agent_filter_clamped_total".to_string(), 2.0),
        (dropped("deadband", "unchanged"), 3.0),
        ("tributary_agent_filter_heartbeats_total".to_string(), 1.0),
        (dropped("spike", "spike"), 1.0),
        (dropped("downsample", "aggregated"), 1.0),
        ("tributary_agent_filter_held_readings".to_string(), 0.0),
        ("tributary_agent_rejected_total{reason=\"not_finite\"}".to_string(), 2.0),
        ("tributary_agent_readings_accepted_total".to_string(), sequence.len() as f64),
        ("tributary_agent_readings_spooled_total".to_string(), total as f64),
    ] {
        assert_eq!(m.get(&key).copied(), Some(value), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_readings_are_spooled_at_sigterm_and_arrive_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    // Nothing would let these go before the stop: the next reading or an hour.
    let filters = "[[filter]]\nsensor = \"spike/*\"\nspike = { max_jump = 10.0, max_hold = \"1h\" }\n\
                   [[filter]]\nsensor = \"ds/*\"\ndownsample = { interval = \"1h\", agg = \"max\" }\n";
    let mut agent =
        Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, filters).await;
    let t = base_ts() - 3_600_000;
    let t = t - t % 3_600_000;
    let sequence = [
        ("spike/a", t, 10.0),
        ("spike/a", t + 1, 11.0), // held: no next reading
        ("ds/a", t, 5.0),
        ("ds/a", t + 10, 9.0),
        ("ds/a", t + 20, 6.0), // the interval's max, 9.0, is held
    ];
    publish(agent.mqtt_port, "sensors-1", &messages(&sequence)).await;
    eventually("two readings held by the filters", Duration::from_secs(10), || async {
        (agent.metric("tributary_agent_filter_held_readings").await == 2.0).then_some(())
    })
    .await;
    // Only the first spike-filtered reading (passed unjudged) got through before the stop.
    let before = wait_logged(&aggregator, 1).await;
    assert_eq!(before, [("spike/a".to_string(), vec![(t, 10.0)])].into_iter().collect());

    let status = agent.process.terminate();
    assert!(status.success(), "the agent stops cleanly on SIGTERM: {status:?}");
    agent.restart().await;
    let got = wait_logged(&aggregator, 3).await;
    let want: BTreeMap<String, Vec<(i64, f64)>> =
        [("spike/a".to_string(), vec![(t, 10.0), (t + 1, 11.0)]), ("ds/a".to_string(), vec![(t + 10, 9.0)])]
            .into_iter()
            .collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_acknowledges_messages_whose_readings_the_deadband_drops() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).await;
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let filters = "[[filter]]\nsensor = \"**\"\ndeadband = { delta = 1.0, max_silence = \"1h\" }\n";
    let input = MqttInput::Client { port: mosquitto.port };
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), input, filters).await;
    eventually("the agent connected to Mosquitto", Duration::from_secs(10), || async {
        (agent.metric("tributary_agent_mqtt_connected").await == 1.0).then_some(())
    })
    .await;
    // More unchanged readings than Mosquitto lets be unacknowledged (100): had their messages waited
    // for a commit that never comes, the broker would stop delivering and the publisher stall.
    let t = base_ts();
    let mut sequence: Vec<(&str, i64, f64)> = (0..300).map(|i| ("db/a", t + i, 20.0)).collect();
    sequence.push(("db/a", t + 300, 25.0));
    publish(mosquitto.port, "sensors-1", &messages(&sequence)).await;

    let got = wait_logged(&aggregator, 2).await;
    assert_eq!(got.get("db/a"), Some(&vec![(t, 20.0), (t + 300, 25.0)]));
    assert_eq!(agent.metric(&dropped("deadband", "unchanged")).await, 299.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_readings_go_through_the_filters_too() {
    let dir = tempfile::tempdir().unwrap();
    let line = SerialLine::start(dir.path(), "tty-filtered");
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let config = format!(
        "[[serial]]\npath = {:?}\nformat = \"lines\"\nsensor_prefix = \"bench\"\n\
         [[filter]]\nsensor = \"bench/*\"\nrange = {{ min = 0.0, max = 100.0 }}\n",
        line.agent_end.display().to_string()
    );
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, &config).await;
    let open = "tributary_agent_serial_open{port=\"tty-filtered-agent\"}";
    eventually("the serial port open", Duration::from_secs(10), || async {
        (agent.metric(open).await == 1.0).then_some(())
    })
    .await;
    // A newline first, as firmware prints at boot: the first line after an open is dropped.
    line.write(b"\nt=5\nt=500\nt=-3\nt=7\n");

    let got = wait_logged(&aggregator, 2).await;
    let values: Vec<f64> = got.get("bench/t").map(|r| r.iter().map(|r| r.1).collect()).unwrap_or_default();
    assert_eq!(values, [5.0, 7.0]);
    assert_eq!(agent.metric(&dropped("range", "above_max")).await, 1.0);
    assert_eq!(agent.metric(&dropped("range", "below_min")).await, 1.0);
}
