//! Caps at the edge: one publisher cannot flood the pipeline with sensor ids, neither with
//! thousands of fields in one message nor with thousands of new ids; known sensors keep flowing.

use std::time::{Duration, Instant};

use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish};

const NEW_PER_MINUTE: u64 = 50;
const FLOOD: u64 = 2_000;
const KNOWN: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_sensor_ids_is_capped_and_counted_while_known_sensors_keep_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    // The first line belongs to the harness's [mqtt] table, which comes last.
    let caps = format!("max_readings_per_message = 100\n[validation]\nmax_new_sensors_per_minute = {NEW_PER_MINUTE}\n");
    let started = Instant::now();
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, &caps).await;

    let known = |i: u64| ("sensors/boiler/temp".to_string(), format!("{}", 60 + i % 10).into_bytes());
    publish(agent.mqtt_port, "boiler", &[known(0)]).await;
    // Known readings interleaved with a new id per message, and one message of 5,000 fields.
    let mut messages = Vec::new();
    for i in 0..FLOOD {
        messages.push((format!("sensors/flood/{i}"), b"1".to_vec()));
        if i % (FLOOD / KNOWN) == 0 {
            messages.push(known(i));
        }
    }
    let fields: Vec<String> = (0..5_000).map(|i| format!("\"f{i}\": {i}")).collect();
    messages.insert(FLOOD as usize / 2, ("sensors/wide".to_string(), format!("{{{}}}", fields.join(",")).into_bytes()));
    publish(agent.mqtt_port, "flooder", &messages).await;

    eventually("every reading of the known sensor", Duration::from_secs(30), || async {
        (aggregator.sensor_counts().await.get("boiler/temp") == Some(&(KNOWN + 1))).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    let limited = agent.metric("tributary_agent_rejected_total{reason=\"sensor_limit\"}").await as u64;
    let too_many = agent.metric("tributary_agent_rejected_total{reason=\"too_many_readings\"}").await;
    let counts = eventually("the admitted flood ids in the API", Duration::from_secs(30), || async {
        let counts = aggregator.sensor_counts().await;
        let admitted = counts.keys().filter(|id| id.starts_with("flood/")).count() as u64;
        (admitted + limited == FLOOD).then_some(counts)
    })
    .await;
    let admitted = counts.keys().filter(|id| id.starts_with("flood/")).count() as u64;
    // A minute's worth at once, then NEW_PER_MINUTE a minute for as long as the test ran (the
    // known sensor took one).
    let allowance = NEW_PER_MINUTE + (elapsed.as_secs_f64() * NEW_PER_MINUTE as f64 / 60.0).ceil() as u64;
    assert!(
        admitted >= NEW_PER_MINUTE - 1 && admitted <= allowance,
        "{admitted} new ids admitted, {allowance} allowed"
    );
    assert_eq!(limited, FLOOD - admitted, "every refused id is counted");
    assert_eq!(too_many, 1.0, "the 5,000-field message is refused whole");
    assert!(!counts.keys().any(|id| id.starts_with("wide/")), "no field of it passed");
    assert_eq!(counts.len() as u64, admitted + 1, "{counts:?}");
}
