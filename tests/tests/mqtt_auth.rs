//! MQTT logins: the embedded broker lets in only its `[[mqtt.users]]`, and in client mode the agent
//! logs in to a Mosquitto that requires a password (and survives a wrong one).

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
use tributary_tests::{Agent, Aggregator, Mosquitto, MqttInput, eventually, publish_as};

fn reading(i: usize) -> (String, Vec<u8>) {
    (format!("sensors/dev/temp{}", i % 2), format!("{}", 20.0 + i as f64 * 0.25).into_bytes())
}

/// What the broker on `port` answers a CONNECT with `login`: the CONNACK's code, or the error.
async fn connack(port: u16, client_id: &str, login: Option<(&str, &str)>) -> Result<ConnectReturnCode, String> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((username, password)) = login {
        options.set_credentials(username, password);
    }
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => Ok(ack.code),
        Ok(Err(ConnectionError::ConnectionRefused(code))) => Ok(code),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_lets_in_only_clients_with_a_listed_password() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    // One password from a file beside the configuration, one from the environment.
    std::fs::write(dir.path().join("dev-1.pw"), "file-password\n").unwrap();
    let users = "[[mqtt.users]]\nusername = \"dev-1\"\npassword_file = \"dev-1.pw\"\n\
                 [[mqtt.users]]\nusername = \"dev-2\"\npassword = \"${DEV2_PASSWORD}\"\n";
    let agent = Agent::start_with_env(
        dir.path(),
        "gw-1",
        "secret-gw-1",
        &aggregator.url(),
        users,
        &[("DEV2_PASSWORD", "env-pw")],
    )
    .await;
    let port = agent.mqtt_port;

    assert_eq!(connack(port, "nobody", None).await, Ok(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(
        connack(port, "guesser", Some(("dev-1", "file-passwore"))).await,
        Ok(ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(connack(port, "swapped", Some(("dev-1", "env-pw"))).await, Ok(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(connack(port, "stranger", Some(("dev-3", "env-pw"))).await, Ok(ConnectReturnCode::BadUserNamePassword));

    // A client without a login that writes a PUBLISH right behind its CONNECT: refused, and the
    // publish never reaches the broker's log.
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // CONNECT (MQTT 3.1.1, clean session, keep alive 60, id "eager"), then PUBLISH QoS 1, packet id 7.
        let mut bytes = vec![0x10, 17, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x05];
        bytes.extend_from_slice(b"eager");
        let (topic, payload) = (b"sensors/eager/temp", b"21.5");
        bytes.extend_from_slice(&[0x32, (2 + topic.len() + 2 + payload.len()) as u8, 0x00, topic.len() as u8]);
        bytes.extend_from_slice(topic);
        bytes.extend_from_slice(&[0x00, 0x07]);
        bytes.extend_from_slice(payload);
        s.write_all(&bytes).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x04], "CONNACK 4 (bad username or password), then the connection closes");

    let good: Vec<_> = (0..40).map(reading).collect();
    publish_as(port, "dev-1", Some(("dev-1", "file-password")), &good[..20]).await;
    publish_as(port, "dev-2", Some(("dev-2", "env-pw")), &good[20..]).await;
    eventually("the 40 readings of the two users", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 40).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = aggregator.sensor_counts().await;
    assert_eq!(counts.values().sum::<u64>(), 40, "nothing of the refused clients: {counts:?}");
    assert!(!counts.contains_key("eager/temp"), "{counts:?}");
    assert_eq!(agent.metric("tributary_agent_broker_auth_failures_total").await, 5.0);
    assert!(agent.process.log_text().contains("bad username or password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_client_mode_the_agent_logs_in_to_a_broker_that_requires_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start_with_users(dir.path(), &[("tributary", "agent-pw"), ("plc", "plc-pw")]).await;
    let aggregator = Aggregator::start(dir.path(), &[("gw-2", "secret-gw-2")]).await;
    std::fs::write(dir.path().join("mqtt.pw"), "agent-pw\n").unwrap();
    let login = "username = \"tributary\"\npassword_file = \"mqtt.pw\"\n";
    let input = MqttInput::Client { port: mosquitto.port };
    let agent = Agent::start(dir.path(), "gw-2", "secret-gw-2", &aggregator.url(), input, login).await;
    eventually("the agent connected", Duration::from_secs(30), || async {
        (agent.metric("tributary_agent_mqtt_connected").await == 1.0).then_some(())
    })
    .await;
    // Subscribed once a reading gets through; then the rest.
    let messages: Vec<_> = (0..50).map(reading).collect();
    publish_as(mosquitto.port, "plc", Some(("plc", "plc-pw")), &messages[..1]).await;
    eventually("the first reading", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 1).then_some(())
    })
    .await;
    publish_as(mosquitto.port, "plc", Some(("plc", "plc-pw")), &messages[1..]).await;
    eventually("the 50 readings", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 50).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_client_mode_a_wrong_password_is_logged_and_retried_without_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start_with_users(dir.path(), &[("tributary", "agent-pw")]).await;
    let aggregator = Aggregator::start(dir.path(), &[("gw-3", "secret-gw-3")]).await;
    let login = "username = \"tributary\"\npassword = \"not-the-password\"\n";
    let input = MqttInput::Client { port: mosquitto.port };
    let mut agent = Agent::start(dir.path(), "gw-3", "secret-gw-3", &aggregator.url(), input, login).await;
    let refusal = "the MQTT broker refused the agent's login";
    eventually("three refused logins in the log", Duration::from_secs(30), || async {
        (agent.process.log_text().matches(refusal).count() >= 3).then_some(())
    })
    .await;
    assert!(agent.process.is_running(), "a refused login is retried, not fatal");
    assert_eq!(agent.metric("tributary_agent_mqtt_connected").await, 0.0);
}
