//! A clean stop (SIGTERM) of an agent running the embedded broker, under load from devices that
//! connect for each publish: it stops promptly with status 0, and every message the broker
//! acknowledged reaches the log, exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish_once};

/// Battery devices: each connects, publishes one QoS-1 message, waits for its PUBACK, disconnects,
/// sleeps. 12 of them every 300 ms: some 40 connections and publishes a second.
const DEVICES: u64 = 12;
const DEVICE_PAUSE: Duration = Duration::from_millis(300);

/// Message ids: the reading's value. Devices count from `device * 1,000,000`, the steady
/// publisher from 900,000,000.
const STEADY: u64 = 900_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_connect_per_publish_load_stops_promptly_and_keeps_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let mut agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, "").await;
    let port = agent.mqtt_port;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let mut publishers = Vec::new();
    for device in 0..DEVICES {
        let (stop, acked) = (stop.clone(), acked.clone());
        publishers.push(tokio::spawn(async move {
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = device * 1_000_000 + n;
                let payload = format!("{{\"value\": {id}}}").into_bytes();
                if publish_once(port, &format!("battery-{device}"), &format!("sensors/battery/{device}"), payload).await
                {
                    acked.lock().unwrap().push(id);
                }
                tokio::time::sleep(DEVICE_PAUSE).await;
            }
        }));
    }
    // And one device on a steady connection, one message in flight at a time.
    let (steady_stop, steady_acked) = (stop.clone(), acked.clone());
    publishers.push(tokio::spawn(async move { steady_publisher(port, steady_stop, steady_acked).await }));

    eventually("the first 200 acknowledged messages", Duration::from_secs(30), || async {
        (acked.lock().unwrap().len() >= 200).then_some(())
    })
    .await;
    let sigterm = std::time::Instant::now();
    let status = agent.process.terminate_within(Duration::from_secs(10));
    let acked_at_stop = acked.lock().unwrap().len();
    eprintln!("stopped {:?} after SIGTERM with {acked_at_stop} messages acknowledged", sigterm.elapsed());
    // Devices keep trying for a moment while the agent is down: nothing they send is acknowledged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let Some(status) = status else {
        panic!("the agent was still running 10 s after SIGTERM\n{}", agent.process.log_tail(30));
    };
    assert!(status.success(), "SIGTERM is a clean stop: {status}\n{}", agent.process.log_tail(30));
    let acked: Vec<u64> = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), acked_at_stop, "nothing is acknowledged once the agent has stopped");
    let steady = acked.iter().filter(|id| **id >= STEADY).count();
    assert!(steady > 0 && steady < acked.len(), "both kinds of publishers got acknowledgements");

    // After a restart the spool forwards what the stop committed.
    agent.restart().await;
    let logged = eventually("every acknowledged message in the log", Duration::from_secs(30), || async {
        let logged = aggregator.logged_readings();
        let ids: std::collections::HashSet<u64> = logged.iter().map(|r| r.2 as u64).collect();
        acked.iter().all(|id| ids.contains(id)).then_some(logged)
    })
    .await;
    let mut copies = BTreeMap::<u64, usize>::new();
    for (_, _, value) in &logged {
        *copies.entry(*value as u64).or_default() += 1;
    }
    let doubled: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "messages logged more than once: {doubled:?}");
    assert_eq!(agent.metric("tributary_agent_broker_dropped_total").await, 0.0);
}

/// Publishes QoS-1 messages on one connection, each after the previous one's PUBACK, until `stop`
/// or until the connection fails (the agent stopped).
async fn steady_publisher(port: u16, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<u64>>>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new("steady-1", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let id = STEADY + n;
        if client.try_publish("sensors/steady/1", QoS::AtLeastOnce, false, format!("{id}")).is_err() {
            return;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                    acked.lock().unwrap().push(id);
                    break;
                }
                Ok(Ok(_)) => {}
                // The agent went away: this message and any later one are unacknowledged.
                Ok(Err(_)) | Err(_) => return,
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
