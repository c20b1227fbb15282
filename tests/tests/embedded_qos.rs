//! The embedded broker's acknowledgements: QoS 2 works end to end, and PUBREC (like PUBACK) only
//! comes once the message is in the broker's log the agent drains.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tributary_tests::{Agent, Aggregator, MqttInput, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publishes_complete_and_are_spooled_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, "").await;

    let mut options = MqttOptions::new("meter-1", "127.0.0.1", agent.mqtt_port);
    options.set_keep_alive(Duration::from_secs(5)).set_inflight(10);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let sender = tokio::spawn(async move {
        for i in 0..100 {
            client.publish("sensors/meter/energy", QoS::ExactlyOnce, false, format!("{i}")).await.unwrap();
        }
        client
    });
    let (mut recs, mut comps) = (0, 0);
    while comps < 100 {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubRec(_)))) => recs += 1,
            Ok(Ok(Event::Incoming(Packet::PubComp(_)))) => comps += 1,
            Ok(Ok(_)) => {}
            other => panic!("QoS-2 flow broke after {recs} PUBREC, {comps} PUBCOMP: {other:?}"),
        }
    }
    let _client = sender.await.unwrap();
    assert_eq!(recs, 100);
    eventually("the 100 readings", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 100).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(aggregator.total_readings().await, 100, "each once");
    let mut values: Vec<u64> = aggregator.logged_readings().iter().map(|r| r.2 as u64).collect();
    values.sort();
    assert_eq!(values, (0..100).collect::<Vec<u64>>());
}

/// MQTT lets a client send packets right behind its CONNECT, before the CONNACK arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_written_together_with_connect_is_acknowledged_and_spooled() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, "").await;
    let port = agent.mqtt_port;
    let answer = tokio::task::spawn_blocking(move || {
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
        let mut answer = [0u8; 8];
        s.read_exact(&mut answer).unwrap();
        answer
    })
    .await
    .unwrap();
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00, 0x40, 0x02, 0x00, 0x07], "CONNACK, then PUBACK of packet 7");
    eventually("the reading", Duration::from_secs(30), || async {
        (aggregator.sensor_counts().await.get("eager/temp") == Some(&1)).then_some(())
    })
    .await;
}
