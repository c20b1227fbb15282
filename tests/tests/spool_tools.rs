//! `tributary-agent spool stats|check` through the real binary, beside a running agent whose
//! aggregator is unreachable (so what it took stays in the spool), and on a spool damaged on purpose.

use std::time::Duration;

use tributary_tests::{Agent, MqttInput, eventually, free_port, publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_stats_and_check_tell_what_the_spool_holds_and_name_a_damaged_block() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens upstream: every reading the agent takes stays spooled.
    let upstream = format!("http://127.0.0.1:{}", free_port());
    let mut agent = Agent::start(dir.path(), "gw-1", "t", &upstream, MqttInput::Embedded, "").await;
    let messages: Vec<(String, Vec<u8>)> =
        (0..50).map(|i| ("sensors/line1/temp".to_string(), format!("{}", 20.0 + f64::from(i)).into_bytes())).collect();
    publish(agent.mqtt_port, "pub-1", &messages).await;
    eventually("50 readings spooled", Duration::from_secs(20), || async {
        (agent.metric("tributary_agent_spool_readings").await == 50.0).then_some(())
    })
    .await;

    // While the agent runs: both read only.
    let (ok, out, err) = agent.cli(&["spool", "stats"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("pending readings:  50"), "{out}");
    assert!(out.contains("dead letters:      0"), "{out}");
    let (ok, out, err) = agent.cli(&["spool", "check"]);
    assert!(ok && out.contains("spool ok"), "{out}{err}");

    // Stopped, and one block's bytes flipped on disk.
    agent.process.terminate();
    let spool = agent.data_dir.join("spool.db");
    let conn = rusqlite::Connection::open(&spool).unwrap();
    let (first_seq, data): (i64, Vec<u8>) = conn
        .query_row("SELECT first_seq, data FROM blocks ORDER BY first_seq LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    let damaged: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    conn.execute("UPDATE blocks SET data = ?1 WHERE first_seq = ?2", rusqlite::params![damaged, first_seq]).unwrap();
    drop(conn);

    let (ok, out, err) = agent.cli(&["spool", "check"]);
    assert!(!ok, "a damaged block must fail the check: {out}{err}");
    assert!(out.contains(&format!("block at seq {first_seq}")), "{out}");
    assert!(err.contains("problem"), "{err}");
    // Stats count from the tables: still there, still 50.
    let (ok, out, _) = agent.cli(&["spool", "stats"]);
    assert!(ok && out.contains("pending readings:  50"), "{out}");
}
