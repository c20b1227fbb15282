//! A spool that goes back in time (an SD card image or snapshot restored, or `spool.sync = normal`
//! losing its last commits in a power cut) must not lose the readings it takes afterwards: the
//! aggregator already holds sequence numbers the restored spool is about to give out again.

use std::path::Path;
use std::time::Duration;

use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish};

fn messages(sensor: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|i| (format!("sensors/{sensor}"), format!("{}.25", i % 40).into_bytes())).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The log without its colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

async fn drained(agent: &Agent, spooled: f64) {
    eventually("the spool to drain", Duration::from_secs(30), || async {
        let m = agent.metrics().await;
        let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
        (get("tributary_agent_readings_spooled_total") == spooled && get("tributary_agent_spool_readings") == 0.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_spool_keeps_every_new_reading() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", "secret-gw-1")]).await;
    let mut agent = Agent::start(dir.path(), "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, "").await;

    publish(agent.mqtt_port, "sensor-a", &messages("a/temp", 100)).await;
    drained(&agent, 100.0).await;
    agent.process.terminate();
    // An image of the gateway's disk, taken now.
    let image = dir.path().join("spool-image");
    copy_dir(&agent.data_dir, &image);

    agent.restart().await;
    publish(agent.mqtt_port, "sensor-b", &messages("b/temp", 100)).await;
    drained(&agent, 100.0).await;
    agent.process.terminate();
    // The image is restored: the spool is back at sequence number 100, the aggregator holds 200.
    std::fs::remove_dir_all(&agent.data_dir).unwrap();
    copy_dir(&image, &agent.data_dir);

    agent.restart().await;
    publish(agent.mqtt_port, "sensor-c", &messages("c/temp", 150)).await;
    eventually("the 150 readings taken after the restore", Duration::from_secs(30), || async {
        (aggregator.sensor_counts().await.get("c/temp") == Some(&150)).then_some(())
    })
    .await;
    drained(&agent, 150.0).await;
    // Time for the processor to count anything twice before checking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts: Vec<(String, u64)> = aggregator.sensor_counts().await.into_iter().collect();
    assert_eq!(counts, [("a/temp".to_string(), 100), ("b/temp".to_string(), 100), ("c/temp".to_string(), 150)]);
    assert_eq!(aggregator.log_contents().1, 350, "the log holds each reading once");
    assert_eq!(agent.metric("tributary_agent_spool_rewinds_total").await, 1.0);
    // Renumbered: what was spooled of the 150 when the forwarder learned the mark (at least the first).
    let renumbered = agent.metric("tributary_agent_spool_renumbered_readings_total").await;
    assert!((1.0..=150.0).contains(&renumbered), "{renumbered}");
    assert_eq!(aggregator.metric("tributary_ingest_gap_readings_total").await, 0.0, "renumbered to the mark, no gap");
    let log = strip_ansi(&agent.process.log_text());
    let warning = log.lines().find(|l| l.contains("behind the aggregator")).expect("a warning about the rewind");
    assert!(
        warning.contains("spool_end=100") && warning.contains("aggregator_mark=200") && warning.contains("spool.db"),
        "{warning}"
    );
    assert_eq!(log.matches("behind the aggregator").count(), 1, "one rewind, one warning");
    assert!(!log.contains("never sent"), "ordinary acks are not suspect:\n{log}");
}
