//! Client mode: the agent joins an existing Mosquitto with a persistent session and acknowledges
//! messages only after its spool commit.

use std::time::Duration;

use tributary_tests::{eventually, publish, start_client_mode};

fn reading(i: usize) -> (String, Vec<u8>) {
    (format!("sensors/line{}/pressure", i % 3), format!("{}", 1000.0 + i as f64 * 0.5).into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_while_the_agent_is_down_arrive_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (mosquitto, aggregator, mut agent) = start_client_mode(dir.path(), "gw-2").await;

    // The session exists once the agent has subscribed: prove it with readings that arrive.
    let first: Vec<_> = (0..30).map(reading).collect();
    publish(mosquitto.port, "plc-1", &first).await;
    eventually("the first 30 readings", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 30).then_some(())
    })
    .await;

    // The agent dies; sensors keep publishing to the broker.
    agent.process.kill9();
    let while_down: Vec<_> = (30..530).map(reading).collect();
    publish(mosquitto.port, "plc-1", &while_down).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(aggregator.total_readings().await, 30, "nothing can arrive while the agent is down");

    agent.restart().await;
    eventually("the 500 readings published while the agent was down", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 530).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = aggregator.sensor_counts().await;
    assert_eq!(counts.values().sum::<u64>(), 530, "{counts:?}");
    assert_eq!(counts["line0/pressure"], 177);
    assert_eq!(agent.metric("tributary_agent_mqtt_connected").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_acknowledges_what_it_committed_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mosquitto, aggregator, mut agent) = start_client_mode(dir.path(), "gw-3").await;
    publish(mosquitto.port, "plc-2", &[reading(0)]).await;
    eventually("the first reading", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 1).then_some(())
    })
    .await;

    // Publish in the background and stop the agent (SIGTERM) in the middle of it.
    let port = mosquitto.port;
    let burst =
        tokio::spawn(async move { publish(port, "plc-2", &(1..20_001).map(reading).collect::<Vec<_>>()).await });
    while agent.metric("tributary_agent_readings_spooled_total").await < 200.0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = agent.process.terminate();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    let at_stop = aggregator.total_readings().await;
    assert!(at_stop < 20_001, "the agent must stop in the middle of the burst for this test to mean anything");
    burst.await.unwrap();
    agent.restart().await;
    eventually("all 20,001 readings", Duration::from_secs(60), || async {
        (aggregator.total_readings().await >= 20_001).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A clean stop acknowledges every committed message (and lets the broker read those acks),
    // so none is redelivered and spooled twice.
    assert_eq!(aggregator.total_readings().await, 20_001);
}
