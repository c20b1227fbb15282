//! Serial sensors end to end: `tributary-sim serial` plays devices into one end of a real
//! pseudo-terminal pair (socat, standing in for the UART cable), the real agent reads the other end,
//! and what the aggregator's API shows is compared with what the simulator recorded it sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tributary_tests::{Agent, Aggregator, MqttInput, SerialLine, bin, encode_path_segment, eventually};

/// A reading the simulator recorded sending.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    sensor: String,
    ts: Option<i64>,
    value: f64,
    fault: String,
}

/// Runs `tributary-sim serial --port <port> <args>` to the end; returns its summary line and what
/// it recorded.
async fn play(dir: &Path, port: &Path, args: &[&str]) -> (String, Vec<Sent>) {
    let record = dir.join(format!("sent-{}.jsonl", fastrand_name()));
    let mut command = std::process::Command::new(bin("tributary-sim"));
    command.arg("serial").arg("--port").arg(port).arg("--record").arg(&record).args(args);
    let output = tokio::task::spawn_blocking(move || command.output().expect("run tributary-sim")).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(output.status.success(), "tributary-sim failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let text = std::fs::read_to_string(&record).expect("read the record");
    let mut sent = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("record line is JSON");
        for r in v["readings"].as_array().expect("readings") {
            sent.push(Sent {
                sensor: r["sensor"].as_str().expect("sensor").to_string(),
                ts: r["ts"].as_i64(),
                value: r["value"].as_f64().expect("value"),
                fault: v["fault"].as_str().expect("fault").to_string(),
            });
        }
    }
    (stdout, sent)
}

fn fastrand_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// What a sensor's readings add up to, as the API reports them.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    count: u64,
    min: f64,
    max: f64,
    /// (ts, value) of the reading with the latest timestamp, where the device sent timestamps.
    last: Option<(i64, f64)>,
}

fn expected(sent: &[Sent]) -> BTreeMap<String, Expected> {
    let mut out: BTreeMap<String, Expected> = BTreeMap::new();
    for s in sent.iter().filter(|s| s.fault == "none") {
        let e = out.entry(s.sensor.clone()).or_insert(Expected { min: f64::MAX, max: f64::MIN, ..Default::default() });
        e.count += 1;
        e.min = e.min.min(s.value);
        e.max = e.max.max(s.value);
        if let Some(ts) = s.ts {
            if e.last.is_none_or(|(last, _)| ts > last) {
                e.last = Some((ts, s.value));
            }
        }
    }
    out
}

/// Asserts that the aggregator shows exactly `expected`: every sensor, its count, its extremes
/// over its 1-minute windows and, where the devices sent timestamps, its latest reading.
async fn assert_arrived(aggregator: &Aggregator, expected: &BTreeMap<String, Expected>) {
    let total: u64 = expected.values().map(|e| e.count).sum();
    assert!(total > 0, "nothing expected: the test would prove nothing");
    eventually(&format!("{total} readings in the aggregator"), Duration::from_secs(30), || async {
        (aggregator.total_readings().await >= total).then_some(())
    })
    .await;
    let counts = aggregator.sensor_counts().await;
    let want: BTreeMap<String, u64> = expected.iter().map(|(k, e)| (k.clone(), e.count)).collect();
    assert_eq!(counts, want, "readings per sensor");
    for (sensor, e) in expected {
        let (_, windows) =
            aggregator.get(&format!("/api/v1/sensors/{}/windows?size=1m", encode_path_segment(sensor))).await;
        let windows = windows.as_array().expect("windows");
        let count: u64 = windows.iter().map(|w| w["count"].as_u64().unwrap()).sum();
        let min = windows.iter().map(|w| w["min"].as_f64().unwrap()).fold(f64::MAX, f64::min);
        let max = windows.iter().map(|w| w["max"].as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert_eq!((count, min, max), (e.count, e.min, e.max), "{sensor}: count, min, max");
        if let Some((ts, value)) = e.last {
            let (_, s) = aggregator.get(&format!("/api/v1/sensors/{}", encode_path_segment(sensor))).await;
            assert_eq!((s["last_ts"].as_i64(), s["last_value"].as_f64()), (Some(ts), Some(value)), "{sensor}");
        }
    }
}

/// The agent's serial counters of one port: reason → count, plus "readings" and "opens".
async fn port_metrics(agent: &Agent, port: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (key, value) in agent.metrics().await {
        let Some(rest) = key.strip_prefix("tributary_agent_serial_rejected_total{") else {
            continue;
        };
        if rest.starts_with(&format!("port=\"{port}\",")) {
            let reason = rest.split("reason=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
            out.insert(reason.to_string(), value);
        }
    }
    for name in ["readings", "opens"] {
        let key = format!("tributary_agent_serial_{name}_total{{port=\"{port}\"}}");
        out.insert(name.to_string(), agent.metric(&key).await);
    }
    out
}

async fn wait_open(agent: &Agent, port: &str, open: bool) {
    let key = format!("tributary_agent_serial_open{{port=\"{port}\"}}");
    let want = if open { 1.0 } else { 0.0 };
    eventually(&format!("{key} == {want}"), Duration::from_secs(20), || async {
        (agent.metric(&key).await == want).then_some(())
    })
    .await;
}

/// Writes bytes into the device's end of the line, as a device not playing by the rules would.
fn serial_section(path: &Path, format: &str, extra: &str) -> String {
    format!("[[serial]]\npath = {:?}\nformat = {format:?}\n{extra}", path.display().to_string())
}

async fn start(dir: &Path, serial: &str) -> (Aggregator, Agent) {
    let aggregator = Aggregator::start(dir, &[("gw-1", "secret-gw-1")]).await;
    let agent = Agent::start(dir, "gw-1", "secret-gw-1", &aggregator.url(), MqttInput::Embedded, serial).await;
    (aggregator, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_the_simulator_arrive_exactly_with_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let line = SerialLine::start(dir.path(), "tty-frames");
    let (aggregator, agent) = start(dir.path(), &serial_section(&line.agent_end, "frames", "baud = 115200\n")).await;
    wait_open(&agent, "tty-frames-agent", true).await;

    // Stuck sensors, spikes, a fast clock and bursts are all valid data: every reading must arrive
    // with its value and its device timestamp.
    let (report, sent) = play(
        dir.path(),
        &line.device_end,
        &[
            "--devices",
            "3",
            "--interval",
            "20ms",
            "--count",
            "40",
            "--stuck-rate",
            "0.05",
            "--spike-rate",
            "0.05",
            "--burst-rate",
            "0.05",
            "--clock-drift-ppm",
            "50000",
            "--seed",
            "7",
        ],
    )
    .await;
    assert!(sent.iter().all(|s| s.fault == "none" && s.ts.is_some()), "{report}");
    assert!(sent.len() > 3 * 3 * 40, "bursts add samples: {report}");
    assert_arrived(&aggregator, &expected(&sent)).await;

    let m = port_metrics(&agent, "tty-frames-agent").await;
    assert_eq!(m["readings"], sent.len() as f64);
    assert_eq!(m["opens"], 1.0);
    let rejected: f64 = m.iter().filter(|(k, _)| !["readings", "opens"].contains(&k.as_str())).map(|(_, v)| v).sum();
    assert_eq!(rejected, 0.0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_lost_bytes_and_wrong_baud_garbage_are_counted_and_every_intact_frame_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let line = SerialLine::start(dir.path(), "tty-noisy");
    let (mut aggregator, mut agent) = start(dir.path(), &serial_section(&line.agent_end, "frames", "")).await;
    wait_open(&agent, "tty-noisy-agent", true).await;

    let args = [
        "--devices",
        "2",
        "--interval",
        "10ms",
        "--count",
        "60",
        "--corrupt-rate",
        "0.15",
        "--drop-rate",
        "0.15",
        "--no-clock",
    ];
    let (report1, mut sent) = play(dir.path(), &line.device_end, &args).await;

    // A device at the wrong baud rate: random bytes, zeros (delimiters) among them.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let garbage: Vec<u8> = (0..4000)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 50 == 0 { 0 } else { (rng >> 32) as u8 }
        })
        .collect();
    line.write(&garbage);

    let (report2, more) = play(dir.path(), &line.device_end, &[&args[..], &["--seed", "2"]].concat()).await;
    sent.extend(more);
    let bad_frames = |fault: &str| sent.iter().filter(|s| s.fault == fault).count() as f64 / 3.0;
    assert!(bad_frames("corrupt") > 0.0 && bad_frames("drop") > 0.0, "{report1}\n{report2}");
    assert_arrived(&aggregator, &expected(&sent)).await;

    let m = port_metrics(&agent, "tty-noisy-agent").await;
    let intact = sent.iter().filter(|s| s.fault == "none").count() as f64;
    assert_eq!(m["readings"], intact, "{m:?}");
    // Each damaged frame is rejected once, as bad COBS or a bad CRC; the garbage adds its own.
    let framing = m["cobs"] + m["crc"] + m["too_long"] + m["version"] + m["decode"];
    assert!(framing > bad_frames("corrupt") + bad_frames("drop"), "the garbage was not counted: {m:?}");
    assert_eq!((m["not_finite"], m["bad_timestamp"], m["bad_sensor_id"]), (0.0, 0.0, 0.0), "{m:?}");
    assert!(agent.process.is_running() && aggregator.process.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_frames_are_each_rejected_once_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let line = SerialLine::start(dir.path(), "tty-exact");
    let (aggregator, agent) = start(dir.path(), &serial_section(&line.agent_end, "frames", "")).await;
    wait_open(&agent, "tty-exact-agent", true).await;

    let (report, sent) = play(
        dir.path(),
        &line.device_end,
        &["--devices", "4", "--interval", "5ms", "--count", "50", "--corrupt-rate", "0.1", "--drop-rate", "0.1"],
    )
    .await;
    assert_arrived(&aggregator, &expected(&sent)).await;
    let damaged = sent.iter().filter(|s| s.fault == "corrupt" || s.fault == "drop").count() as f64 / 3.0;
    assert!(damaged > 0.0, "{report}");
    let m = port_metrics(&agent, "tty-exact-agent").await;
    assert_eq!(m["cobs"] + m["crc"], damaged, "{m:?}\n{report}");
    assert_eq!(m["too_long"] + m["version"] + m["decode"], 0.0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_and_bare_numbers_arrive_and_bad_lines_are_counted_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let line = SerialLine::start(dir.path(), "ttyACM0");
    let serial = serial_section(&line.agent_end, "lines", "baud = 9600\nsensor_prefix = \"bench\"\n");
    let (aggregator, agent) = start(dir.path(), &serial).await;
    let port = "ttyACM0-agent";
    wait_open(&agent, port, true).await;

    let (_, mut sent) = play(
        dir.path(),
        &line.device_end,
        &["--format", "lines", "--devices", "2", "--interval", "10ms", "--count", "30", "--baud", "9600", "--unpaced"],
    )
    .await;
    // What cheap firmware also prints: noise, half-parsed lines, NaN, an endless line.
    let mut noise = b"hello world\r\ntemp=\r\ntemp=21.5,hum\r\nx=NaN\r\n\xff\xfe\r\n".to_vec();
    noise.extend(vec![b'7'; 5000]);
    noise.extend(b"\r\n");
    line.write(&noise);
    let (_, numbers) =
        play(dir.path(), &line.device_end, &["--format", "number", "--interval", "10ms", "--count", "25", "--unpaced"])
            .await;

    for s in &mut sent {
        s.sensor = format!("bench/{}", s.sensor);
    }
    // A bare number is the sensor_prefix itself.
    sent.extend(numbers.into_iter().map(|s| Sent { sensor: "bench".into(), ..s }));
    assert_arrived(&aggregator, &expected(&sent)).await;

    let m = port_metrics(&agent, port).await;
    assert_eq!(m["readings"], sent.len() as f64);
    assert_eq!((m["bad_line"], m["not_finite"], m["too_long"], m["partial_line"]), (4.0, 1.0, 1.0, 0.0), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ports_are_read_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let frames = SerialLine::start(dir.path(), "ttyUSB0");
    let lines = SerialLine::start(dir.path(), "ttyUSB1");
    let serial = format!(
        "{}{}",
        serial_section(&frames.agent_end, "frames", ""),
        serial_section(&lines.agent_end, "lines", "sensor_prefix = \"usb1\"\n")
    );
    let (aggregator, agent) = start(dir.path(), &serial).await;
    wait_open(&agent, "ttyUSB0-agent", true).await;
    wait_open(&agent, "ttyUSB1-agent", true).await;

    let args = ["--devices", "3", "--interval", "10ms", "--count", "40"];
    let lines_args = [&args[..], &["--format", "lines", "--seed", "9"]].concat();
    let ((_, mut sent), (_, from_lines)) =
        tokio::join!(play(dir.path(), &frames.device_end, &args), play(dir.path(), &lines.device_end, &lines_args),);
    sent.extend(from_lines.into_iter().map(|s| Sent { sensor: format!("usb1/{}", s.sensor), ..s }));
    assert_eq!(sent.len(), 2 * 3 * 3 * 40);
    assert_arrived(&aggregator, &expected(&sent)).await;
    assert_eq!(port_metrics(&agent, "ttyUSB0-agent").await["readings"], 360.0);
    assert_eq!(port_metrics(&agent, "ttyUSB1-agent").await["readings"], 360.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_device_is_reopened_and_its_readings_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut line = SerialLine::start(dir.path(), "ttyS1");
    let (aggregator, agent) = start(dir.path(), &serial_section(&line.agent_end, "frames", "")).await;
    let port = "ttyS1-agent";
    wait_open(&agent, port, true).await;

    let args = ["--devices", "2", "--interval", "10ms", "--count", "30"];
    let (_, mut sent) = play(dir.path(), &line.device_end, &args).await;
    assert_arrived(&aggregator, &expected(&sent)).await;

    line.unplug();
    wait_open(&agent, port, false).await;
    // Unplugged for longer than the first retry: the agent finds nothing and backs off.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    line.plug();
    wait_open(&agent, port, true).await;

    let (_, more) = play(dir.path(), &line.device_end, &[&args[..], &["--seed", "5"]].concat()).await;
    sent.extend(more);
    assert_arrived(&aggregator, &expected(&sent)).await;
    let m = port_metrics(&agent, port).await;
    assert_eq!((m["opens"], m["readings"]), (2.0, sent.len() as f64), "{m:?}");
    assert!(agent.process.log_text().contains("serial device went away"), "the agent says why it reopens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_by_id_link_follows_the_device_to_its_new_name() {
    let dir = tempfile::tempdir().unwrap();
    let by_id = dir.path().join("serial/by-id");
    std::fs::create_dir_all(&by_id).unwrap();
    let link = by_id.join("usb-Tributary_Sim_0001-if00-port0");
    let mut first = SerialLine::start(dir.path(), "ttyUSB0");
    std::os::unix::fs::symlink(&first.agent_end, &link).unwrap();
    let (aggregator, agent) = start(dir.path(), &serial_section(&link, "frames", "")).await;
    let port = "usb-Tributary_Sim_0001-if00-port0";
    wait_open(&agent, port, true).await;

    let args = ["--devices", "1", "--interval", "10ms", "--count", "30"];
    let (_, mut sent) = play(dir.path(), &first.device_end, &args).await;
    assert_arrived(&aggregator, &expected(&sent)).await;

    // Unplugged, and back as another tty (a new pty pair, made while the old one still exists, so
    // it cannot get the same device node): udev points the by-id link at it.
    let second = SerialLine::start(dir.path(), "ttyUSB1");
    first.unplug();
    wait_open(&agent, port, false).await;
    let tmp = by_id.join(".new-link");
    std::os::unix::fs::symlink(&second.agent_end, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    wait_open(&agent, port, true).await;

    let (_, more) = play(dir.path(), &second.device_end, &[&args[..], &["--seed", "3"]].concat()).await;
    sent.extend(more);
    assert_arrived(&aggregator, &expected(&sent)).await;
    assert_eq!(port_metrics(&agent, port).await["opens"], 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_commits_every_reading_the_serial_port_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let line = SerialLine::start(dir.path(), "ttyS2");
    // A slow group commit keeps readings waiting in memory when the stop comes; a second port whose
    // device is missing keeps its task in backoff. Neither may hold up or lose anything.
    let serial = format!(
        "{}{}[spool]\ncommit_interval = \"1s\"\n",
        serial_section(&line.agent_end, "frames", ""),
        serial_section(&dir.path().join("ttyUSB9"), "lines", "")
    );
    let (mut aggregator, mut agent) = start(dir.path(), &serial).await;
    wait_open(&agent, "ttyS2-agent", true).await;
    // Nothing is forwarded: what the agent took stays in its spool, to be counted there.
    aggregator.process.kill9();

    let (_, sent) = play(dir.path(), &line.device_end, &["--devices", "4", "--interval", "0", "--count", "50"]).await;
    let taken = sent.len() as f64;
    eventually("the agent to take every reading", Duration::from_secs(20), || async {
        (agent.metric("tributary_agent_serial_readings_total{port=\"ttyS2-agent\"}").await == taken).then_some(())
    })
    .await;
    let status = agent.process.terminate();
    assert!(status.success(), "{status:?}");

    let spool = rusqlite::Connection::open(agent.data_dir.join("spool.db")).unwrap();
    let spooled: i64 = spool.query_row("SELECT coalesce(sum(count), 0) FROM blocks", [], |r| r.get(0)).unwrap();
    assert_eq!(spooled as f64, taken);
}
