//! `tributary-aggregator --check-config FILE` loads a configuration without starting anything:
//! exit 0 and a summary for a usable file, 1 with the file, the key and the reason for a bad one.
//! The Debian package's CI check (.ci/deb-check) runs it on the installed configuration.

use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tributary-aggregator");

fn check_config(path: &std::path::Path) -> Output {
    Command::new(BIN).arg("--check-config").arg(path).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn check_config_accepts_the_example_without_touching_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let example = Command::new(BIN).arg("generate-config").output().unwrap();
    assert!(example.status.success());
    let text = String::from_utf8(example.stdout).unwrap();
    // The example's data_dir, pointed into the temporary directory.
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("data_dir = ") {
                format!("data_dir = {:?}", data_dir.display().to_string())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = dir.path().join("aggregator.toml");
    std::fs::write(&config, text).unwrap();

    let out = check_config(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("{}: ok", config.display())), "{stdout}");
    assert!(stdout.contains(&format!("data in {}", data_dir.display())), "{stdout}");
    assert!(stdout.contains("listens on 127.0.0.1:8080"), "{stdout}");
    assert!(stdout.contains("1 agent(s)"), "{stdout}");
    // Checking starts nothing: no data directory, no databases.
    assert!(!data_dir.exists(), "--check-config created {}", data_dir.display());
}

#[test]
fn check_config_refuses_a_bad_file_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aggregator.toml");
    std::fs::write(
        &config,
        "data_dir = \"/tmp/x\"\n[http]\nlistn = \"127.0.0.1:0\"\n[[agents]]\nid = \"a\"\ntoken = \"t\"\n",
    )
    .unwrap();

    let out = check_config(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "no file path in: {stderr}");
    assert!(stderr.contains("http.listn"), "no key in: {stderr}");
    assert!(stderr.contains("unknown field `listn`"), "no reason in: {stderr}");
}

#[test]
fn check_config_refuses_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = check_config(&dir.path().join("nope.toml"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nope.toml"), "{stderr}");
}

/// The Debian package installs deploy/debian/tributary-aggregator/aggregator.toml as
/// /etc/tributary/aggregator.toml: the example with data_dir in the unit's StateDirectory
/// (ProtectSystem=strict leaves nothing else writable). Anything else in it must be the example's.
#[test]
fn packaged_config_is_the_example_with_data_dir_in_the_state_directory() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let packaged = std::fs::read_to_string(root.join("deploy/debian/tributary-aggregator/aggregator.toml")).unwrap();
    let unit = std::fs::read_to_string(root.join("deploy/tributary-aggregator.service")).unwrap();
    let state_dir = unit.lines().find_map(|l| l.strip_prefix("StateDirectory=")).expect("StateDirectory= in the unit");
    let example = tributary_aggregator::config::EXAMPLE_CONFIG;
    let data_dir_line = example.lines().find(|l| l.starts_with("data_dir = ")).expect("data_dir in the example");
    let expected = example.replacen(data_dir_line, &format!("data_dir = \"/var/lib/{state_dir}\""), 1);
    assert!(
        packaged == expected,
        "deploy/debian/tributary-aggregator/aggregator.toml is not deploy/aggregator.toml with \
         data_dir = \"/var/lib/{state_dir}\"; write it again with:\n  sed 's|^data_dir = .*|data_dir = \
         \"/var/lib/{state_dir}\"|' deploy/aggregator.toml > deploy/debian/tributary-aggregator/aggregator.toml"
    );
    // And the copy loads.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aggregator.toml");
    std::fs::write(&config, &packaged).unwrap();
    let out = check_config(&config);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
