//! A damaged spool does not stop the agent: at start it is moved aside, every block that can be
//! read goes into a fresh spool under its own epoch and numbers and reaches the aggregator once,
//! what was lost is a recorded gap, and new readings are taken at once. Damage made on purpose:
//! pages scribbled over, the file cut short, and a file that is not a database at all.

use std::time::Duration;

use tributary_tests::{Agent, Aggregator, MqttInput, eventually, publish};

const TOKEN: &str = "secret-salvage";
const ROUNDS: u64 = 40;
const PER_ROUND: u64 = 50;
const SPOOLED: u64 = ROUNDS * PER_ROUND;

/// Scribbles over one table leaf page in the middle of the file (a flipped page on a bad card),
/// after moving the WAL into the file. Leaf pages of a table B-tree start with the byte 0x0D.
fn scribble(path: &std::path::Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    drop(conn);
    let mut bytes = std::fs::read(path).unwrap();
    let leaves: Vec<usize> = (1..bytes.len() / 1024).map(|p| p * 1024).filter(|&at| bytes[at] == 0x0D).collect();
    assert!(leaves.len() >= 4, "a spool of several leaf pages ({})", leaves.len());
    let at = leaves[leaves.len() / 2];
    bytes[at..at + 1024].fill(0xA5);
    std::fs::write(path, bytes).unwrap();
}

/// The log without its colour codes.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_is_salvaged_at_start_and_what_is_lost_is_a_gap() {
    for damage in ["scribbled", "cut short", "not a database"] {
        let dir = tempfile::tempdir().unwrap();
        let mut aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
        aggregator.process.terminate();
        // The aggregator is down: everything published stays in the spool.
        let mut agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, "").await;
        // Separate publishes become separate blocks: a spool of some tens of pages.
        for round in 0..ROUNDS {
            let messages: Vec<(String, Vec<u8>)> = (0..PER_ROUND)
                .map(|i| {
                    let k = round * PER_ROUND + i;
                    (format!("sensors/s{}/v", k % 7), format!("{:.4}", (k as f64 * 0.37).sin() * 1e3).into_bytes())
                })
                .collect();
            publish(agent.mqtt_port, &format!("pub-{round}"), &messages).await;
            eventually("the round spooled", Duration::from_secs(20), || async {
                let spooled = agent.metric("tributary_agent_spool_readings").await as u64;
                (spooled == (round + 1) * PER_ROUND).then_some(())
            })
            .await;
        }
        agent.process.terminate();
        let spool = agent.data_dir.join("spool.db");
        match damage {
            "scribbled" => scribble(&spool),
            "cut short" => {
                let conn = rusqlite::Connection::open(&spool).unwrap();
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
                drop(conn);
                let len = std::fs::metadata(&spool).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&spool)
                    .unwrap()
                    .set_len(len * 9 / 10 / 1024 * 1024)
                    .unwrap();
            }
            _ => {
                let _ = std::fs::remove_file(agent.data_dir.join("spool.db-wal"));
                std::fs::write(&spool, b"a text file where the spool was").unwrap();
            }
        }

        aggregator.restart().await;
        agent.restart().await;
        let salvaged = agent.metric("tributary_agent_spool_salvaged_readings_total").await as u64;
        let log = plain(&agent.process.log_text());
        assert!(log.contains("spool salvaged"), "{damage}: {log}");
        let aside = std::fs::read_dir(&agent.data_dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .any(|n| n.starts_with("spool.db.damaged-") && !n.ends_with("-wal") && !n.ends_with("-shm"));
        assert!(aside, "{damage}: the damaged file is kept");
        // New readings are taken at once, and everything salvaged arrives.
        let fresh: Vec<(String, Vec<u8>)> =
            (0..5).map(|i| ("sensors/s0/v".to_string(), format!("{i}").into_bytes())).collect();
        publish(agent.mqtt_port, "pub-after", &fresh).await;
        let total =
            eventually("the salvaged and the new readings at the aggregator", Duration::from_secs(30), || async {
                let total = aggregator.total_readings().await;
                (total == salvaged + 5).then_some(total)
            })
            .await;
        eprintln!("{damage}: salvaged {salvaged} of {SPOOLED}, {total} at the aggregator");
        match damage {
            "not a database" => assert_eq!(salvaged, 0),
            _ => assert!(salvaged > 0 && salvaged < SPOOLED, "{damage}: salvaged {salvaged}"),
        }
        // Nothing twice; and what was lost under the kept epoch is a gap the aggregator recorded,
        // whenever the damaged file still showed where its numbers ended.
        let gaps = aggregator.metric("tributary_ingest_gap_readings_total").await as u64;
        eprintln!("{damage}: {gaps} readings recorded as gaps; end known: {}", log.contains("end_known=true"));
        if damage == "scribbled" {
            assert!(log.contains("end_known=true"), "a middle leaf leaves the right edge readable: {log}");
        }
        if log.contains("end_known=true") {
            assert_eq!(salvaged + gaps, SPOOLED, "{damage}: {salvaged} salvaged + {gaps} in gaps");
            // The agent says why: what it could not read back is reported as lost with the spool.
            let reported = eventually("the agent's reports of what was lost", Duration::from_secs(30), || async {
                let (_, listed) = aggregator.get("/api/v1/gaps?agent=gw-1").await;
                let reports: Vec<serde_json::Value> = listed
                    .as_array()?
                    .iter()
                    .flat_map(|g| g["reports"].as_array().cloned().unwrap_or_default())
                    .collect();
                let readings: u64 = reports.iter().filter_map(|r| r["readings"].as_u64()).sum();
                (readings == gaps).then_some(reports)
            })
            .await;
            assert!(gaps == 0 || !reported.is_empty(), "{damage}: {gaps} lost, nothing reported");
            assert!(reported.iter().all(|r| r["reason"] == "corrupt_spool"), "{damage}: {reported:?}");
        } else {
            assert!(salvaged + gaps <= SPOOLED, "{damage}: {salvaged} salvaged + {gaps} in gaps");
        }
    }
}
