//! A SIGKILL at any moment loses nothing acknowledged and counts nothing twice; SIGTERM stops
//! cleanly with exit 0.

mod common;

use common::{Aggregator, T0, log_totals, postcard_batch};

fn agent_batch(agent: &str, seq: u64, n: usize) -> Vec<u8> {
    let readings: Vec<_> =
        (0..n).map(|i| (["k/a", "k/b", "k/c"][i % 3], T0 + (seq as i64 + i as i64) * 997, i as f64)).collect();
    postcard_batch(agent, 42, &[(seq, &readings)])
}

fn batch(seq: u64, n: usize) -> Vec<u8> {
    agent_batch("gw-1", seq, n)
}

#[test]
fn sigkill_right_after_acks_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let (batches, per_batch) = (20u64, 3000usize);
    // Two agents at once, so group commits and processor steps overlap the kill.
    std::thread::scope(|s| {
        for agent in 0..2 {
            let agg = &agg;
            s.spawn(move || {
                for b in 0..batches {
                    let body = agent_batch(common::AGENTS[agent].0, b * per_batch as u64, per_batch);
                    let ack = agg.ingest_ok(agent, &body);
                    assert_eq!(ack["accepted"], per_batch);
                }
            });
        }
    });
    let total = 2 * batches * per_batch as u64;
    agg.kill();

    let agg = Aggregator::start(dir.path());
    assert_eq!(log_totals(&agg.data_dir).1 as u64, total);
    agg.wait_processed();
    let (_, sensors) = agg.get_json("/api/v1/sensors");
    let counted: u64 = sensors.as_array().unwrap().iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, total);
    let (_, agents) = agg.get_json("/api/v1/agents");
    assert_eq!(agents[0]["readings"].as_u64(), Some(total / 2));
    assert_eq!(agents[1]["readings"].as_u64(), Some(total / 2));
    // The sequence high-water mark survived too: resending everything is all duplicates.
    let ack = agg.ingest_ok(0, &batch(0, per_batch));
    assert_eq!(ack["duplicates"], per_batch);
    assert_eq!(ack["next_seq"].as_u64(), Some(total / 2));
}

#[test]
fn sigterm_stops_cleanly_and_a_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &batch(0, 100));
    let status = agg.terminate();
    assert!(status.success(), "exit status {status}");
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &batch(100, 50));
    agg.wait_processed();
    let (_, agents) = agg.get_json("/api/v1/agents");
    assert_eq!(agents[0]["readings"], 150);
    assert_eq!(agg.metric("tributary_processor_offset"), 150.0);
}
