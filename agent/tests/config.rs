//! A configuration the agent cannot use stops it at start, naming the file, the key and the reason.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const GOOD: &str = r#"
agent_id = "gw-1"
data_dir = "DATA"
[http]
listen = "127.0.0.1:0"
[upstream]
url = "http://127.0.0.1:9"
token = "secret-gw-1"
[mqtt]
mode = "client"
url = "mqtt://127.0.0.1:9"
"#;

/// Runs the agent on `config`; returns (exit code, stderr). Fails if it keeps running.
fn start_with(dir: &Path, config: &str) -> (Option<i32>, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, config.replace("DATA", &dir.join("data").display().to_string())).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary-agent"))
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the agent kept running with a bad configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn assert_refused(config: &str, key: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = start_with(dir.path(), config);
    assert_eq!(code, Some(1), "exit code; stderr: {stderr}");
    let file = dir.path().join("agent.toml").display().to_string();
    assert!(stderr.contains(&file), "names the file {file}: {stderr}");
    assert!(stderr.contains(key), "names the key {key}: {stderr}");
    assert!(stderr.contains(reason), "gives the reason {reason:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_unknown_key_stops_the_agent_naming_file_key_and_reason() {
    let config = GOOD.replace("token = ", "tokn = \"x\"\ntoken = ");
    assert_refused(&config, "upstream.tokn", "unknown field `tokn`");
}

#[test]
fn a_missing_required_key_stops_the_agent() {
    let config = GOOD.replace("agent_id = \"gw-1\"\n", "");
    assert_refused(&config, "agent_id", "missing field `agent_id`");
    let config = GOOD.replace("token = \"secret-gw-1\"\n", "");
    assert_refused(&config, "upstream.token", "or `token_file`");
}

#[test]
fn a_bad_value_stops_the_agent() {
    assert_refused(&GOOD.replace("127.0.0.1:0", "localhost:http"), "http.listen", "invalid socket address");
    assert_refused(&GOOD.replace("mode = \"client\"", "mode = \"bridge\""), "mqtt.mode", "unknown variant `bridge`");
    assert_refused(&format!("{GOOD}[spool]\ncommit_interval = \"soon\"\n"), "spool.commit_interval", "");
    assert_refused(&format!("{GOOD}[validation]\nmax_clock_skew = 300\n"), "validation.max_clock_skew", "");
    assert_refused(&GOOD.replace("url = \"mqtt://127.0.0.1:9\"", ""), "mqtt.url", "required when mqtt.mode");
}

#[test]
fn a_port_in_use_stops_the_agent_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = GOOD.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = start_with(dir.path(), &config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("http.listen") && stderr.contains(&port.to_string()), "{stderr}");
}

#[test]
fn generate_config_prints_a_config_that_loads() {
    let output = Command::new(env!("CARGO_BIN_EXE_tributary-agent")).arg("generate-config").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("[upstream]") && text.contains("commit_interval"));
    tributary_agent::config::Config::parse(&text, Path::new("generated.toml")).unwrap();
}

#[test]
fn a_missing_config_file_is_named_with_the_reason() {
    let output = Command::new(env!("CARGO_BIN_EXE_tributary-agent"))
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/agent.toml: cannot read the configuration file: No such file"), "{stderr}");
}

#[test]
fn check_config_says_what_a_file_sets_up_or_why_not_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(dir.path().join("token"), "secret-from-file\n").unwrap();
    let text = GOOD
        .replace("DATA", &dir.path().join("data").display().to_string())
        .replace("token = \"secret-gw-1\"", "token_file = \"token\"");
    std::fs::write(&path, &text).unwrap();
    let check = |path: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_tributary-agent")).arg("--check-config").arg(path).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": ok") && stdout.contains("agent gw-1 forwards to http://127.0.0.1:9/"), "{stdout}");
    assert!(!stdout.contains("secret-from-file"), "the token is not printed: {stdout}");
    assert!(!dir.path().join("data").exists(), "nothing was started or created");

    std::fs::write(&path, text.replace("token_file = \"token\"", "token_file = \"missing\"")).unwrap();
    let (code, _, stderr) = check(&path);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("upstream.token_file") && stderr.contains("cannot read"), "{stderr}");
}
