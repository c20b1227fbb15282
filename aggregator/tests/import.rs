//! `tributary-aggregator import`: a CSV or JSON Lines history goes into the log as one more
//! stream, bad lines counted and reported without stopping the rest, a second import of the same
//! file appends nothing, and the aggregator processes the history when it starts.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Aggregator, BIN, T0, config_text};

fn import(config: &Path, file: &Path) -> (bool, String, String) {
    let out =
        Command::new(BIN).args(["import", "--agent", "history", "--config"]).arg(config).arg(file).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn served(agg: &Aggregator, sensor: &str) -> u64 {
    let (status, body) = agg.get_json(&format!("/api/v1/sensors/{sensor}/windows?size=1h"));
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().iter().map(|w| w["count"].as_u64().unwrap()).sum()
}

#[test]
fn a_history_is_imported_once_with_bad_lines_reported_and_then_processed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aggregator.toml");
    std::fs::write(&config, config_text(&dir.path().join("data"))).unwrap();

    let mut csv = String::from("sensor,ts,value\n");
    for i in 0..25_000i64 {
        csv.push_str(&format!("hist/{},{},{}\n", i % 5, T0 + i * 1_000, i as f64 / 10.0));
    }
    csv.push_str("hist/0,not-a-time,1\n");
    csv.push_str("hist/0,1764000000000,NaN\n");
    csv.push_str("hist/0\n");
    csv.push_str("\"hist/with,comma\",2025-11-24T16:00:00Z,7.5\n");
    let csv_path = dir.path().join("history.csv");
    std::fs::write(&csv_path, &csv).unwrap();

    let (ok, stdout, stderr) = import(&config, &csv_path);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("25001 readings: 25001 appended, 0 already in the log, 3 lines rejected"), "{stdout}");
    assert!(stdout.contains("rejected line 25002: time \"not-a-time\""), "{stdout}");
    assert!(stdout.contains("rejected line 25003:") && stdout.contains("rejected line 25004:"), "{stdout}");
    // The same file again: nothing new.
    let (ok, stdout, _) = import(&config, &csv_path);
    assert!(ok);
    assert!(stdout.contains("0 appended, 25001 already in the log"), "{stdout}");

    let jsonl_path = dir.path().join("more.jsonl");
    std::fs::write(
        &jsonl_path,
        format!(
            "{{\"sensor\": \"hist/json\", \"ts\": {T0}, \"value\": 1.0}}\n\
             {{\"sensor\": \"hist/json\", \"ts\": \"2025-11-24T16:00:01Z\", \"value\": 2.0}}\n\
             {{\"sensor\": \"hist/json\", \"value\": 3.0}}\n"
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = import(&config, &jsonl_path);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("2 readings: 2 appended, 0 already in the log, 1 lines rejected"), "{stdout}");

    let agg = Aggregator::start(dir.path());
    agg.wait_processed();
    let imported: u64 = (0..5).map(|i| served(&agg, &format!("hist%2F{i}"))).sum();
    assert_eq!(imported, 25_000);
    assert_eq!(served(&agg, "hist%2Fwith%2Ccomma"), 1);
    assert_eq!(served(&agg, "hist%2Fjson"), 2);

    // One writer per log: not while the aggregator runs.
    let (ok, _, stderr) = import(&config, &csv_path);
    assert!(!ok);
    assert!(stderr.contains("locked"), "{stderr}");
}

#[test]
fn an_endless_line_or_binary_bytes_are_rejected_lines_and_the_rest_goes_in() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aggregator.toml");
    std::fs::write(&config, config_text(&dir.path().join("data"))).unwrap();
    let mut bytes = format!("s/a,{T0},1\n").into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', 300_000)); // no line break for 300 KB
    bytes.extend_from_slice(format!("\ns/a,{},2\n", T0 + 1_000).as_bytes());
    bytes.extend_from_slice(b"\xff\xfe,\x00\x01,\x02\n");
    bytes.extend_from_slice(format!("s/a,{},3\n", T0 + 2_000).as_bytes());
    let path = dir.path().join("odd.csv");
    std::fs::write(&path, bytes).unwrap();
    let (ok, stdout, stderr) = import(&config, &path);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("3 readings: 3 appended, 0 already in the log, 2 lines rejected"), "{stdout}");
    assert!(stdout.contains("rejected line 2: longer than 65536 bytes"), "{stdout}");
    assert!(stdout.contains("rejected line 4: not UTF-8 text"), "{stdout}");
}
