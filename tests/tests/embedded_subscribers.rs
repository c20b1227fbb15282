//! The embedded broker is a broker for the gateway's other MQTT clients too: a client subscribed to
//! it gets what sensors publish (retained messages and wills included), while the agent takes every
//! reading exactly once, whether or not anyone subscribes (publishes reach the agent without
//! rumqttd's router, and go through it only when another client could want them).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish};

/// An aggregator and an agent with its embedded broker, in a fresh directory.
async fn gateway() -> (tempfile::TempDir, Aggregator, Agent) {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, "").await;
    (dir, aggregator, agent)
}

/// `n` messages on `topic`, values from `first`.
fn messages(topic: &str, first: u64, n: u64) -> Vec<(String, Vec<u8>)> {
    (first..first + n).map(|i| (topic.to_string(), format!("{{\"value\": {i}}}").into_bytes())).collect()
}

/// A client subscribed to `filter` (QoS 1), once its SUBACK has come.
async fn subscriber(port: u16, id: &str, filter: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return (client, eventloop),
            Ok(Ok(_)) => {}
            other => panic!("subscriber {id}: no SUBACK: {other:?}"),
        }
    }
}

/// Polls `eventloop` until it has received `n` publishes (topic, payload, retain), or 10 s pass
/// without one.
async fn receive(eventloop: &mut EventLoop, n: usize) -> Vec<(String, String, bool)> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.push((p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned(), p.retain))
            }
            Ok(Ok(_)) => {}
            other => panic!("after {} of {n} publishes: {other:?}", got.len()),
        }
    }
    got
}

/// Readings at the aggregator per sensor, once `total` have arrived (and no more a moment later).
async fn readings_once(aggregator: &Aggregator, total: u64) -> BTreeMap<String, Vec<u64>> {
    eventually(&format!("{total} readings at the aggregator"), Duration::from_secs(30), || async {
        (aggregator.total_readings().await >= total).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(aggregator.total_readings().await, total, "each reading once");
    let mut by_sensor = BTreeMap::<String, Vec<u64>>::new();
    for (sensor, _, value) in aggregator.logged_readings() {
        by_sensor.entry(sensor).or_default().push(value as u64);
    }
    by_sensor.values_mut().for_each(|v| v.sort());
    by_sensor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_publishes_and_retained_messages_while_the_agent_takes_each_reading_once() {
    let (_dir, aggregator, agent) = gateway().await;
    let port = agent.mqtt_port;

    // Nobody subscribes yet.
    publish(port, "early", &messages("sensors/early/temp", 0, 50)).await;

    let (watcher, mut watching) = subscriber(port, "watcher", "sensors/#").await;
    publish(port, "room", &messages("sensors/room/temp", 0, 200)).await;
    let got = receive(&mut watching, 200).await;
    let values: Vec<String> = got.iter().map(|(_, payload, _)| payload.clone()).collect();
    let want: Vec<String> = (0..200).map(|i| format!("{{\"value\": {i}}}")).collect();
    assert_eq!(values, want, "the subscriber gets every publish, in order");
    assert!(got.iter().all(|(topic, _, _)| topic == "sensors/room/temp"), "only what was published after SUBACK");

    // QoS 2 and a retained message, while someone subscribes.
    let mut options = MqttOptions::new("meter", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30)).set_inflight(10);
    let (meter, mut metering) = AsyncClient::new(options, 100);
    let sender = tokio::spawn(async move {
        for i in 0..20 {
            meter.publish("sensors/meter/energy", QoS::ExactlyOnce, false, format!("{i}")).await.unwrap();
        }
        meter.publish("sensors/door/state", QoS::AtLeastOnce, true, "7").await.unwrap();
        meter
    });
    let (mut comps, mut acks) = (0, 0);
    while comps < 20 || acks < 1 {
        match tokio::time::timeout(Duration::from_secs(10), metering.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubComp(_)))) => comps += 1,
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            other => panic!("publisher broke after {comps} PUBCOMP, {acks} PUBACK: {other:?}"),
        }
    }
    let meter = sender.await.unwrap();
    assert_eq!((comps, acks), (20, 1), "one answer per publish");
    let got = receive(&mut watching, 21).await;
    assert_eq!(got.iter().filter(|(topic, _, _)| topic == "sensors/meter/energy").count(), 20);
    assert!(got.contains(&("sensors/door/state".into(), "7".into(), false)), "{got:?}");

    // A later subscriber gets the retained message; the agent does not take it again.
    let (late, mut late_watching) = subscriber(port, "latecomer", "sensors/door/#").await;
    let got = receive(&mut late_watching, 1).await;
    assert_eq!((got[0].0.as_str(), got[0].1.as_str()), ("sensors/door/state", "7"), "{got:?}");

    // With the subscribers gone, publishes still reach the agent once.
    for (client, mut eventloop) in [(watcher, watching), (late, late_watching), (meter, metering)] {
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while eventloop.poll().await.is_ok() {} }).await;
    }
    publish(port, "later", &messages("sensors/later/temp", 0, 50)).await;

    let readings = readings_once(&aggregator, 50 + 200 + 20 + 1 + 50).await;
    assert_eq!(readings["early/temp"], (0..50).collect::<Vec<u64>>());
    assert_eq!(readings["room/temp"], (0..200).collect::<Vec<u64>>());
    assert_eq!(readings["meter/energy"], (0..20).collect::<Vec<u64>>());
    assert_eq!(readings["door/state"], vec![7]);
    assert_eq!(readings["later/temp"], (0..50).collect::<Vec<u64>>());
}

/// Opens a raw MQTT 3.1.1 connection (clean session, keep alive 60 s) with a last will (`topic`,
/// `message`, QoS 0) or none, and waits for CONNACK.
fn connect_raw(port: u16, client_id: &str, will: Option<(&str, &str)>) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let flags = if will.is_some() { 0x02 | 0x04 } else { 0x02 };
    let mut rest = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x3c];
    let mut fields = vec![client_id];
    fields.extend(will.iter().flat_map(|(topic, message)| [*topic, *message]));
    for field in fields {
        rest.extend_from_slice(&(field.len() as u16).to_be_bytes());
        rest.extend_from_slice(field.as_bytes());
    }
    assert!(rest.len() < 128);
    let mut packet = vec![0x10, rest.len() as u8];
    packet.extend_from_slice(&rest);
    s.write_all(&packet).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK, accepted");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_of_a_vanished_client_reaches_the_agent_once_and_subscribers() {
    let (_dir, aggregator, agent) = gateway().await;
    let port = agent.mqtt_port;

    // No subscriber: a client vanishes (its socket closes without DISCONNECT, as when its process is
    // killed); another says goodbye, so its will is not due.
    let vanishing =
        tokio::task::spawn_blocking(move || connect_raw(port, "vanishing-a", Some(("sensors/will/a", "1"))));
    let vanishing = vanishing.await.unwrap();
    let polite = tokio::task::spawn_blocking(move || {
        let mut s = connect_raw(port, "polite", Some(("sensors/will/polite", "3")));
        s.write_all(&[0xe0, 0x00]).unwrap();
        let mut end = [0u8; 1];
        // The broker closes after DISCONNECT.
        assert_eq!(s.read(&mut end).unwrap_or(0), 0);
    });
    polite.await.unwrap();
    drop(vanishing);

    // With a subscriber: the will goes to it too.
    let (_watcher, mut watching) = subscriber(port, "watcher", "sensors/will/#").await;
    let vanishing =
        tokio::task::spawn_blocking(move || connect_raw(port, "vanishing-b", Some(("sensors/will/b", "2"))));
    drop(vanishing.await.unwrap());
    let got = receive(&mut watching, 1).await;
    assert_eq!(got, vec![("sensors/will/b".to_string(), "2".to_string(), false)]);

    let readings = readings_once(&aggregator, 2).await;
    assert_eq!(readings.get("will/a"), Some(&vec![1]), "{readings:?}");
    assert_eq!(readings.get("will/b"), Some(&vec![2]), "{readings:?}");
    assert!(!readings.contains_key("will/polite"), "a client that said goodbye leaves no will: {readings:?}");
}

/// A gateway's other client that subscribes to everything and then stops reading its socket (a
/// hung dashboard, a process stopped with SIGSTOP) must not hold up the sensors or the agent: the
/// broker keeps a bounded log for it and the publishers go on being acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_holds_up_neither_the_publishers_nor_the_agent() {
    let (_dir, aggregator, agent) = gateway().await;
    let port = agent.mqtt_port;

    let stuck = tokio::task::spawn_blocking(move || {
        let mut s = connect_raw(port, "stuck", None);
        // SUBSCRIBE to `#` at QoS 1.
        s.write_all(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x01]).unwrap();
        let mut suback = [0u8; 5];
        s.read_exact(&mut suback).unwrap();
        assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x01], "SUBACK, QoS 1 granted");
        // From here on it reads nothing.
        s
    })
    .await
    .unwrap();

    // Far more than the subscriber's socket buffers and rumqttd's log for it hold.
    let n = 20_000;
    let many: Vec<(String, Vec<u8>)> =
        (0..n).map(|i| (format!("sensors/s{}/temp", i % 100), format!("{{\"value\": {i}}}").into_bytes())).collect();
    tokio::time::timeout(Duration::from_secs(90), publish(port, "busy", &many))
        .await
        .expect("the publisher is acknowledged while a subscriber reads nothing");

    let readings = readings_once(&aggregator, n).await;
    for k in [0, 57, 99] {
        let want: Vec<u64> = (k..n).step_by(100).collect();
        assert_eq!(readings[&format!("s{k}/temp")], want, "sensor s{k}: every reading, once");
    }
    drop(stuck);
}
