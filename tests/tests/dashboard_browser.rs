//! The dashboard in a real browser: Debian's Chromium, driven by playwright-core
//! (`tests/browser/dashboard.mjs`), against the real aggregator, fed by `tributary-sim` through an
//! agent's embedded broker. Screenshots land in `target/tmp/dashboard-screenshots/`.
//!
//! Needs `chromium`, `mosquitto-clients`, Node.js and `npm ci --prefix tests/browser` (`.ci/run`
//! installs them); without them the test fails and says what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tributary_tests::{Agent, Aggregator, MqttInput, Process, bin, eventually};

const TOKEN: &str = "secret-gw-1";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Fails at once, saying what to install, when the browser driver is missing.
fn require_browser() {
    let driver = browser_dir().join("node_modules/playwright-core");
    assert!(
        driver.exists(),
        "{} is missing: run `npm ci --prefix tests/browser` (and `apt-get install chromium mosquitto-clients`)",
        driver.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_fleet_sensors_charts_live_readings_and_alerts_in_chromium() {
    require_browser();
    let dir = tempfile::tempdir().unwrap();
    let rule = "[[alerts]]\nname = \"too-hot\"\nsensor = \"*/temperature\"\nabove = 100.0\n";
    let aggregator = Aggregator::start_with(dir.path(), &[("gw-1", TOKEN)], rule).await;
    let agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, "").await;
    let _sim = Process::spawn(
        "sim",
        bin("tributary-sim"),
        ["mqtt", "--broker", &format!("127.0.0.1:{}", agent.mqtt_port), "--devices", "3", "--interval", "250ms"]
            .map(String::from)
            .to_vec(),
        dir.path().join("sim.log"),
    );
    eventually("the simulator's readings at the aggregator", Duration::from_secs(30), || async {
        (aggregator.total_readings().await > 0).then_some(())
    })
    .await;
    run_browser("dashboard.mjs", vec![aggregator.url(), agent.mqtt_port.to_string()]).await;
}

/// Runs `tests/browser/<script> <args...> <screenshot dir>` in Node (playwright-core driving
/// Debian's chromium) and checks that it passed with no console errors on the page.
async fn run_browser(script: &'static str, args: Vec<String>) {
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(browser_dir().join(script))
            .args(&args)
            .arg(&shots)
            .output()
            .expect("run node (install Node.js)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the browser run failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("no console errors"), "{stdout}");
}

/// 10,000 sensors of 100 agents (`tests/browser/large_fleet.mjs` posts them): the fleet view lists
/// every agent, the sensor list shows a page of 100 and pages on, its search finds a sensor of the
/// last page, and live readings reach the rows shown. What it shows, not how fast: the load times
/// are `tests/bench/page.sh`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_pages_a_fleet_of_100_agents_and_10000_sensors() {
    const AGENTS: usize = 100;
    require_browser();
    let dir = tempfile::tempdir().unwrap();
    let agents: Vec<(String, String)> =
        (1..=AGENTS).map(|n| (format!("gw-{n:03}"), format!("secret-gw-{n:03}"))).collect();
    let agents: Vec<(&str, &str)> = agents.iter().map(|(id, token)| (id.as_str(), token.as_str())).collect();
    let aggregator = Aggregator::start(dir.path(), &agents).await;
    run_browser("large_fleet.mjs", vec![aggregator.url(), AGENTS.to_string()]).await;
}
