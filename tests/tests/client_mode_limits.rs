//! Client mode holds memory to a byte budget, yet an oversized message never blocks the good ones
//! behind it.

use std::time::Duration;

use tributary_tests::{Agent, Aggregator, Mosquitto, MqttInput, eventually, publish, start_client_mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_above_the_packet_limit_is_read_once_rejected_and_acknowledged_and_good_ones_follow() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).await;
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let input = MqttInput::Client { port: mosquitto.port };
    // The first line belongs to the harness's [mqtt] table: packets above 8 x 1 KiB + topic room
    // (72 KiB) are beyond the agent's limit.
    let mut agent =
        Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), input, "max_payload_bytes = 1024\n").await;
    eventually("the agent's subscription", Duration::from_secs(10), || async {
        (agent.metric("tributary_agent_mqtt_connected").await == 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut messages = vec![("sensors/camera/frame".to_string(), vec![b'7'; 1 << 20])];
    messages.extend((0..20).map(|i| (format!("sensors/line{}/flow", i % 2), format!("{i}.5").into_bytes())));
    publish(mosquitto.port, "plc-1", &messages).await;
    eventually("the 20 good readings behind the oversized one", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 20).then_some(())
    })
    .await;
    assert_eq!(agent.metric("tributary_agent_rejected_total{reason=\"too_large\"}").await, 1.0);
    assert!(agent.process.log_text().contains("above the agent's limit"), "the oversized packet is logged");

    // Everything was acknowledged: after a restart the broker has nothing left to send.
    assert!(agent.process.terminate().success());
    agent.restart().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(agent.metric("tributary_agent_mqtt_messages_total").await, 0.0, "nothing is redelivered");
    assert_eq!(aggregator.total_readings().await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_broker_sends_again_after_a_crash_are_counted_as_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let (mosquitto, aggregator, mut agent) = start_client_mode(dir.path(), "gw-4").await;
    publish(mosquitto.port, "plc-3", &[("sensors/tank/level".to_string(), b"1".to_vec())]).await;
    eventually("the first reading", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 1).then_some(())
    })
    .await;

    // A frozen agent: the broker sends it messages it can neither spool nor acknowledge.
    // SAFETY: kill(2) on a pid we own and have not reaped.
    unsafe { libc::kill(agent.process.pid() as libc::pid_t, libc::SIGSTOP) };
    let burst: Vec<_> = (0..50).map(|i| ("sensors/tank/level".to_string(), format!("{i}").into_bytes())).collect();
    publish(mosquitto.port, "plc-3", &burst).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.process.kill9();
    agent.restart().await;
    eventually("the 50 readings of the burst", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 51).then_some(())
    })
    .await;
    // They were in flight to the dead session: the broker sends them again with the dup flag.
    let redelivered = agent.metric("tributary_agent_mqtt_redelivered_total").await;
    assert!((1.0..=50.0).contains(&redelivered), "{redelivered} counted as redelivered");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(aggregator.total_readings().await, 51, "none spooled twice: the frozen agent spooled none");
}
