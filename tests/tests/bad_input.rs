//! Guarantee 5: bad input never crashes a component and never blocks good input; each reject is
//! counted where an operator looks (the agent's /metrics, the aggregator's status codes).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tributary_tests::{Agent, Aggregator, Mosquitto, MqttInput, eventually, http, publish, start_client_mode};

/// The bad payloads an MQTT client can send, each with the reason the agent must count.
fn bad_payloads() -> Vec<(Vec<u8>, &'static str)> {
    vec![
        (b"garbage{".to_vec(), "malformed"),
        (b"NaN".to_vec(), "not_finite"),
        (b"\"twenty-one\"".to_vec(), "not_a_number"),
        (br#"{"value": "hot"}"#.to_vec(), "not_a_number"),
        (br#"{"value": 1, "ts": 42}"#.to_vec(), "bad_timestamp"),
        (br#"{"value": 1, "ts": 99999999999999}"#.to_vec(), "bad_timestamp"),
        (br#"{"firmware": "1.2"}"#.to_vec(), "no_readings"),
        (vec![0xff, 0xfe, 0x00], "malformed"),
        (vec![b'7'; 1 << 20], "too_large"),
    ]
}

/// Good and bad messages interleaved: every good one is followed by a bad one.
fn interleaved(good: usize) -> Vec<(String, Vec<u8>)> {
    let bad = bad_payloads();
    let mut out = Vec::new();
    for i in 0..good {
        out.push((format!("sensors/tank{}/level", i % 4), format!("{}.5", i).into_bytes()));
        out.push((format!("sensors/tank{}/level", i % 4), bad[i % bad.len()].0.clone()));
    }
    out
}

async fn expect_rejects(agent: &Agent, good: usize) {
    let bad = bad_payloads();
    let mut expected = std::collections::BTreeMap::<&str, f64>::new();
    for i in 0..good {
        *expected.entry(bad[i % bad.len()].1).or_default() += 1.0;
    }
    let metrics = agent.metrics().await;
    for (reason, count) in expected {
        let key = format!("tributary_agent_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(metrics.get(&key).copied(), Some(count), "{key}");
    }
}

/// An MQTT 3.1.1 CONNECT and a QoS-0 PUBLISH whose topic is not UTF-8, written by hand: no client
/// library will produce one.
fn publish_non_utf8_topic(port: u16) {
    publish_raw_topic(port, b"sensors/\xff\xfe/temp");
}

/// The same with any topic bytes (e.g. a first character of two bytes, which panics rumqttd's own
/// topic matching: one such publish used to kill the embedded broker).
fn publish_raw_topic(port: u16, topic: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let client_id = b"raw-client";
    let mut connect = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, client_id.len() as u8];
    connect.extend_from_slice(client_id);
    s.write_all(&[0x10, connect.len() as u8]).unwrap();
    s.write_all(&connect).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    let mut publish = vec![0x00, topic.len() as u8];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(b"21.5");
    s.write_all(&[0x30, publish.len() as u8]).unwrap();
    s.write_all(&publish).unwrap();
    // The broker refuses it by closing the connection.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mqtt_input_is_counted_and_never_blocks_good_readings() {
    let dir = tempfile::tempdir().unwrap();
    let mut aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let mut agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, "").await;

    let good = 90;
    let messages = interleaved(good);
    let (first, second) = messages.split_at(messages.len() / 2);
    publish(agent.mqtt_port, "mixed-1", first).await;
    let port = agent.mqtt_port;
    tokio::task::spawn_blocking(move || publish_non_utf8_topic(port)).await.unwrap();
    tokio::task::spawn_blocking(move || publish_raw_topic(port, "é/temp".as_bytes())).await.unwrap();
    publish(agent.mqtt_port, "mixed-2", second).await;

    eventually("every good reading", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == good as u64).then_some(())
    })
    .await;
    eventually("the broker's refusal of both topics to be counted", Duration::from_secs(10), || async {
        (agent.metric("tributary_agent_broker_rejected_total").await == 2.0).then_some(())
    })
    .await;
    expect_rejects(&agent, good).await;
    assert_eq!(agent.metric("tributary_agent_broker_dropped_total").await, 0.0);
    assert_eq!(agent.metric("tributary_agent_readings_spooled_total").await, good as f64);
    let counts = aggregator.sensor_counts().await;
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["tank0/level", "tank1/level", "tank2/level", "tank3/level"]);
    assert!(agent.process.is_running(), "the agent must survive bad input");
    assert!(aggregator.process.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_through_mosquitto_are_acknowledged_and_counted_not_redelivered_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let (mosquitto, aggregator, mut agent) = start_client_mode(dir.path(), "gw-1").await;
    eventually("the agent's subscription", Duration::from_secs(10), || async {
        (agent.metric("tributary_agent_mqtt_connected").await == 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let good = 45;
    publish(mosquitto.port, "mixed-3", &interleaved(good)).await;
    eventually("every good reading", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == good as u64).then_some(())
    })
    .await;
    expect_rejects(&agent, good).await;
    // A refused message must be acknowledged, or the broker would send it again on every reconnect.
    agent.process.terminate();
    agent.restart().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(agent.metric("tributary_agent_mqtt_messages_total").await, 0.0, "nothing is redelivered");
    assert!(agent.process.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_starting_with_a_multibyte_character_is_read_in_client_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).await;
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let input = MqttInput::Client { port: mosquitto.port };
    let mut agent =
        Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), input, "topics = [\"#\"]\n").await;
    eventually("the agent's subscription", Duration::from_secs(10), || async {
        (agent.metric("tributary_agent_mqtt_connected").await == 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let messages = [("é/temp".to_string(), b"21.5".to_vec()), ("sensors/x".to_string(), b"1".to_vec())];
    publish(mosquitto.port, "utf8-publisher", &messages).await;
    eventually("both readings", Duration::from_secs(20), || async {
        (aggregator.total_readings().await == 2).then_some(())
    })
    .await;
    let counts = aggregator.sensor_counts().await;
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["sensors/x", "é/temp"]);
    assert!(agent.process.is_running(), "the agent must survive the topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_ingest_requests_get_their_status_and_leave_the_log_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1"), ("gw-2", "secret-gw-2")]).await;
    let url = format!("{}/api/v1/ingest", aggregator.url());
    let good = r#"{"agent_id":"gw-1","epoch":1,"blocks":[{"first_seq":0,"readings":[{"sensor":"a","ts":1764000000000,"value":1}]}]}"#;
    let post = |token: Option<&'static str>, content_type: &'static str, body: Vec<u8>| {
        let url = url.clone();
        async move {
            let mut request = http().post(url).header("content-type", content_type).body(body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let json = "application/json";
    let cases = [
        ("wrong token", post(Some("secret-gw-x"), json, good.into()).await, 401),
        ("no token", post(None, json, good.into()).await, 401),
        ("malformed JSON", post(Some("secret-gw-1"), json, b"{\"agent_id\": \"gw-1\", ".to_vec()).await, 400),
        ("malformed postcard", post(Some("secret-gw-1"), "application/x-postcard", vec![0xff; 64]).await, 400),
        ("NaN smuggled in postcard", post(Some("secret-gw-1"), "application/x-postcard", nan_batch()).await, 400),
        ("unknown agent id", post(Some("secret-gw-1"), json, good.replace("gw-1", "gw-9").into()).await, 403),
        ("another agent's id", post(Some("secret-gw-2"), json, good.into()).await, 403),
    ];
    for (what, (status, body), expected) in &cases {
        assert_eq!(status, expected, "{what}: {body}");
        if *expected == 400 {
            assert!(body.contains("error"), "{what}: a 400 says why: {body}");
        }
    }
    assert_eq!(aggregator.log_contents(), (0, 0), "nothing refused was written");
    assert_eq!(aggregator.metric("tributary_log_end_offset").await, 0.0);
    // And the same endpoint still takes a good batch.
    assert_eq!(post(Some("secret-gw-1"), json, good.into()).await.0, 200);
    assert_eq!(aggregator.log_contents(), (1, 1));
}

/// A well-formed postcard batch whose only reading is NaN.
fn nan_batch() -> Vec<u8> {
    let mut b = tributary_shared::BlockBuilder::default();
    b.push("a", 1_764_000_000_000, f64::NAN);
    let data = b.finish().encode();
    let batch = tributary_shared::Batch {
        agent_id: "gw-1",
        epoch: 1,
        blocks: vec![tributary_shared::WireBlock { first_seq: 0, count: 1, data: &data }],
    };
    batch.to_postcard()
}
