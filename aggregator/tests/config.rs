//! A bad configuration stops the process at start, naming the file, the key and the reason.

mod common;

use common::run_with_config;

fn assert_refused(text: &str, key: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr, path) = run_with_config(dir.path(), text);
    assert!(!status.success(), "exited {status} with: {text}");
    assert!(stderr.contains(&path.display().to_string()), "no file path in: {stderr}");
    assert!(stderr.contains(key), "no key {key:?} in: {stderr}");
    assert!(stderr.contains(reason), "no reason {reason:?} in: {stderr}");
}

const AGENT: &str = "[[agents]]\nid = \"gw-1\"\ntoken = \"t\"\n";

#[test]
fn unknown_key_stops_start_naming_file_key_and_reason() {
    assert_refused(
        &format!("data_dir = \"/tmp/x\"\n[http]\nlistn = \"127.0.0.1:0\"\n{AGENT}"),
        "http.listn",
        "unknown field `listn`",
    );
}

#[test]
fn missing_data_dir_stops_start() {
    assert_refused(AGENT, "data_dir", "missing field");
}

#[test]
fn unparsable_listen_address_stops_start() {
    assert_refused(&format!("data_dir = \"/tmp/x\"\n[http]\nlisten = \"nope\"\n{AGENT}"), "http.listen", "invalid");
}

#[test]
fn duplicate_agent_id_stops_start() {
    assert_refused(
        &format!("data_dir = \"/tmp/x\"\n{AGENT}[[agents]]\nid = \"gw-1\"\ntoken = \"u\"\n"),
        "agents[1].id",
        "duplicate agent id `gw-1`",
    );
}

#[test]
fn duplicate_token_stops_start() {
    assert_refused(
        &format!("data_dir = \"/tmp/x\"\n{AGENT}[[agents]]\nid = \"gw-2\"\ntoken = \"t\"\n"),
        "agents[1].token",
        "duplicate token: agents[0] (`gw-1`) has the same one",
    );
}

#[test]
fn empty_token_stops_start() {
    assert_refused(
        "data_dir = \"/tmp/x\"\n[[agents]]\nid = \"gw-1\"\ntoken = \"\"\n",
        "agents[0].token",
        "must not be empty",
    );
}

#[test]
fn alert_rules_that_cannot_work_stop_start() {
    let rule = |body: &str| format!("data_dir = \"/tmp/x\"\n{AGENT}[[alerts]]\nname = \"r\"\nsensor = \"a/*\"\n{body}");
    assert_refused(&rule("stale = \"0s\"\n"), "alerts[0].stale", "longer than 0s");
    assert_refused(&rule("above = 1.0\nbelow = 0.0\n"), "alerts[0]", "exactly one condition");
    assert_refused(&rule("anomaly = true\n"), "alerts[0].anomaly", "no [[anomaly]] model");
}

#[test]
fn generate_config_prints_a_config_that_loads() {
    let output = std::process::Command::new(common::BIN).arg("generate-config").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("[[agents]]") && text.contains("# "), "{text}");
    let config = tributary_aggregator::Config::parse(&text, std::path::Path::new("generated.toml")).unwrap();
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
}
