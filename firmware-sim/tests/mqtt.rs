//! The real `tributary-sim mqtt` binary against a real Mosquitto on loopback.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A Mosquitto process on a loopback port of its own, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Self {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(&config, format!("listener {port} 127.0.0.1\nallow_anonymous true\n")).unwrap();
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mosquitto is installed at /usr/sbin/mosquitto");
        let broker = Mosquitto { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A QoS 1 subscriber to `sensors/#`, subscribed before this returns.
async fn subscribe(broker: &Mosquitto) -> mpsc::UnboundedReceiver<(String, Vec<u8>)> {
    let mut options = MqttOptions::new(format!("test-sub-{}", broker.port), "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe("sensors/#", QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client;
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed).await.expect("no SubAck").unwrap();
    rx
}

/// Collects messages until `expected` arrived and then 300 ms went by with nothing more
/// (so extras would be seen), or 15 s passed.
async fn collect(rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>, expected: usize) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let quiet = if got.len() >= expected { Duration::from_millis(300) } else { Duration::from_secs(15) };
        let wait = quiet.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(message)) => got.push(message),
            _ => return got,
        }
    }
}

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tributary-sim"))
}

async fn run_sim(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || sim().args(args).output().unwrap()).await.unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn stdout_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// (messages, readings) from `published M messages (R readings) in ...`.
fn totals(line: &str) -> (u64, u64) {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((words[0], words[2], words[4]), ("published", "messages", "readings)"), "{line}");
    (words[1].parse().unwrap(), words[3].trim_start_matches('(').parse().unwrap())
}

fn per_device(messages: &[(String, Vec<u8>)], devices: usize) -> Vec<usize> {
    (1..=devices).map(|n| messages.iter().filter(|(t, _)| *t == format!("sensors/dev-{n}")).count()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_published_message_reaches_the_broker() {
    let broker = Mosquitto::start();
    let mut rx = subscribe(&broker).await;
    let output = run_sim(args(&[
        "mqtt",
        "--broker",
        &broker.addr(),
        "--count",
        "50",
        "--devices",
        "3",
        "--interval",
        "0",
        "--format",
        "multi",
    ]))
    .await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(totals(&stdout_line(&output)), (150, 450));

    let messages = collect(&mut rx, 150).await;
    assert_eq!(messages.len(), 150);
    assert_eq!(per_device(&messages, 3), [50, 50, 50]);
    let now = now_ms();
    for (topic, payload) in &messages {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
        for field in ["temperature", "humidity", "pressure"] {
            assert!(v[field].is_f64(), "{topic}: {field} missing in {v}");
        }
        let ts = v["ts"].as_i64().unwrap();
        assert!((now - ts).abs() < 60_000, "ts {ts} is not near {now}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_and_number_payloads_carry_the_temperature() {
    let broker = Mosquitto::start();
    let mut rx = subscribe(&broker).await;
    let object = ["mqtt", "--broker", &broker.addr(), "--count", "5", "--devices", "2", "--interval", "0"];
    let output = run_sim(args(&[&object[..], &["--format", "object"]].concat())).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let messages = collect(&mut rx, 10).await;
    assert_eq!(per_device(&messages, 2), [5, 5]);
    for (_, payload) in &messages {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let fields: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(fields.len(), 2, "{v}");
        assert!((-40.0..=85.0).contains(&v["value"].as_f64().unwrap()) && v["ts"].is_i64(), "{v}");
    }

    // QoS 0 is fire and forget, but on loopback TCP nothing is lost.
    let output = run_sim(args(&[&object[..], &["--format", "number", "--qos", "0"]].concat())).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(totals(&stdout_line(&output)), (10, 10));
    let messages = collect(&mut rx, 10).await;
    assert_eq!(per_device(&messages, 2), [5, 5]);
    for (_, payload) in &messages {
        let value: f64 = std::str::from_utf8(payload).unwrap().parse().unwrap();
        assert!((-40.0..=85.0).contains(&value));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_fleet_cleanly_and_reports_what_the_broker_got() {
    let broker = Mosquitto::start();
    let mut rx = subscribe(&broker).await;
    let child = sim()
        .args([
            "mqtt",
            "--broker",
            &broker.addr(),
            "--devices",
            "4",
            "--interval",
            "20ms",
            "--topic-prefix",
            "sensors/",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it run (it waits for the connection first), then ask it to stop.
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("nothing published").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(output.status.success(), "{:?}: {}", output.status, String::from_utf8_lossy(&output.stderr));

    let (messages, readings) = totals(&stdout_line(&output));
    assert!(messages >= 20, "only {messages} messages in half a second");
    assert_eq!(readings, 3 * messages);
    let received = 1 + collect(&mut rx, messages as usize - 1).await.len() as u64;
    assert_eq!(received, messages, "the broker delivered {received}, the simulator reported {messages}");
    assert!(first.0.starts_with("sensors/dev-"), "{}", first.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_starts_late_still_gets_every_message() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let run = tokio::task::spawn_blocking(move || {
        sim().args(["mqtt", "--broker", &addr, "--count", "20", "--devices", "2", "--interval", "0"]).output().unwrap()
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _broker = Mosquitto::start_on(port);
    let output = tokio::time::timeout(Duration::from_secs(20), run).await.expect("the simulator hung").unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(totals(&stdout_line(&output)), (40, 120));
    assert!(String::from_utf8_lossy(&output.stderr).contains("retrying in"));
}

#[test]
fn bad_flags_are_rejected_before_connecting() {
    for bad in [
        &["mqtt", "--qos", "2"][..],
        &["mqtt", "--broker", "nohost"],
        &["mqtt", "--interval", "soon"],
        &["mqtt", "--devices", "0"],
        &["mqtt", "--format", "xml"],
    ] {
        let output = sim().args(bad).stdin(Stdio::null()).output().unwrap();
        assert!(!output.status.success(), "{bad:?} was accepted");
        assert!(!output.stderr.is_empty());
    }
}
