//! An agent whose token the aggregator refuses keeps its readings, counts the refusals, and goes
//! on once the token in its file is fixed and it gets SIGHUP: no restart, no reading lost.

use std::time::Duration;

use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_fixed_by_sighup_without_losing_a_reading() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "the-right-token")]).await;
    let agent = Agent::start(dir.path(), "gw-1", "a-wrong-token", &aggregator.url(), MqttInput::Embedded, "").await;
    let messages: Vec<(String, Vec<u8>)> =
        (0..40).map(|i| ("sensors/room/t".to_string(), format!("{}", 20 + i).into_bytes())).collect();
    publish(agent.mqtt_port, "pub-1", &messages).await;
    eventually("401s counted", Duration::from_secs(20), || async {
        (agent.metric("tributary_agent_forward_requests_total{outcome=\"unauthorized\"}").await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(aggregator.total_readings().await, 0);
    assert_eq!(agent.metric("tributary_agent_spool_readings").await, 40.0, "kept in the spool");

    let pid = agent.process.pid();
    let config = std::fs::read_to_string(&agent.config_path).unwrap().replace("a-wrong-token", "the-right-token");
    std::fs::write(&agent.config_path, config).unwrap();
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    eventually("every spooled reading at the aggregator", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 40).then_some(())
    })
    .await;
    assert_eq!(agent.process.pid(), pid, "the same process");
    assert!(agent.process.log_text().contains("the new upstream token applies now"));
}
